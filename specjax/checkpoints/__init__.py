"""Loading and saving model weights: GGUF files, HF safetensors directories, orbax checkpoints.

``load_model(name_or_path)`` accepts a built-in name (``smollm2-135m``), a ``.gguf`` file, an HF model
directory or an orbax checkpoint directory written by :func:`save_checkpoint`, and returns a
:class:`LoadedModel`. Problems with files raise :class:`CheckpointError`; a config specjax cannot run
raises :class:`~specjax.config.ConfigError`; an unknown name raises :class:`ModelNotFoundError`.
"""

from __future__ import annotations

from specjax.checkpoints.gguf import SUPPORTED_GGUF_TYPES, load_gguf
from specjax.checkpoints.hf import load_hf
from specjax.checkpoints.loaded_model import LoadedModel
from specjax.checkpoints.orbax_io import restore_checkpoint, save_checkpoint
from specjax.checkpoints.registry import BUILTIN_MODELS, ModelNotFoundError, ResolvedModel, load_model, resolve_model
from specjax.config import ConfigError
from specjax.params import CheckpointError
from specjax.tokenizer import TokenizerError

__all__ = [
    "BUILTIN_MODELS", "CheckpointError", "ConfigError", "LoadedModel", "ModelNotFoundError", "ResolvedModel",
    "SUPPORTED_GGUF_TYPES", "TokenizerError", "load_gguf", "load_hf", "load_model", "resolve_model",
    "restore_checkpoint", "save_checkpoint",
]
