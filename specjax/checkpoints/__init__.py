"""Loading and saving model weights: GGUF files, HF safetensors directories, orbax checkpoints.

``load_model(name_or_path)`` accepts a built-in name (``smollm2-135m``), a ``.gguf`` file, an HF model
directory or an orbax checkpoint directory written by :func:`save_checkpoint`, and returns a
:class:`LoadedModel`. Problems with files raise :class:`CheckpointError`; a config specjax cannot run
raises :class:`~specjax.config.ConfigError`; an unknown name raises :class:`ModelNotFoundError`.
"""

from __future__ import annotations

from dataclasses import dataclass

from specjax.config import ConfigError, ModelConfig
from specjax.params import CheckpointError, Params
from specjax.tokenizer import Tokenizer, TokenizerError


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run: its config, weights (see :class:`~specjax.params.Params` for shapes),
    tokenizer, and ``source``, a human-readable description of where it came from.

    ``tokenizer`` is None only for weights-only directories (an HF directory without tokenizer.json,
    an orbax checkpoint saved without a tokenizer).
    """

    config: ModelConfig
    params: Params
    tokenizer: Tokenizer | None
    source: str


def merge_eos(config: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    """Check the tokenizer fits the model, and make both agree on every id that ends generation
    (their union, config's first). Returns the updated config; updates ``tokenizer`` in place."""
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                              f"{config.vocab_size}: they do not belong together")
    ids = tuple(dict.fromkeys(config.eos_token_ids + tokenizer.eos_token_ids))
    if any(not 0 <= i < config.vocab_size for i in ids):
        raise CheckpointError(f"end-of-sequence ids {ids} fall outside the vocabulary ({config.vocab_size})")
    tokenizer.eos_token_ids = ids
    return config.replace(eos_token_ids=ids)


# Imported after LoadedModel exists: the loaders import it from this package.
from specjax.checkpoints.gguf import SUPPORTED_GGUF_TYPES, load_gguf  # noqa: E402
from specjax.checkpoints.hf import load_hf  # noqa: E402
from specjax.checkpoints.orbax_io import restore_checkpoint, save_checkpoint  # noqa: E402
from specjax.checkpoints.registry import (BUILTIN_MODELS, ModelNotFoundError, ResolvedModel,  # noqa: E402
                                          load_model, resolve_model)

__all__ = [
    "BUILTIN_MODELS", "CheckpointError", "ConfigError", "LoadedModel", "ModelNotFoundError", "ResolvedModel",
    "SUPPORTED_GGUF_TYPES", "TokenizerError", "load_gguf", "load_hf", "load_model", "resolve_model",
    "restore_checkpoint", "save_checkpoint",
]
