"""What every loader returns: :class:`LoadedModel`, and ``merge_eos`` to make a config and its
tokenizer agree. A module of its own, so the loaders import it without importing the package that
re-exports them."""

from __future__ import annotations

from dataclasses import dataclass

from specjax.config import ModelConfig
from specjax.params import CheckpointError, Params
from specjax.tokenizer import Tokenizer


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
