"""Model configuration: one frozen dataclass, built from HF ``config.json`` or GGUF metadata.

Every field is validated in ``__post_init__`` so a bad config fails here, with a message naming the
field, instead of as a shape error deep inside a compiled step.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import jax
import jax.numpy as jnp


class ConfigError(ValueError):
    """A model configuration that specjax cannot run."""


# HF `architectures` / `model_type` values and GGUF `general.architecture` values we implement.
# Qwen2 is Llama plus q/k/v bias; Mistral (without sliding windows) is plain Llama.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (HF ``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        if self.factor <= 0 or self.low_freq_factor <= 0 or self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(
                f"invalid llama3 rope scaling: factor={self.factor}, low_freq_factor={self.low_freq_factor}, "
                f"high_freq_factor={self.high_freq_factor} (need factor > 0 and high > low > 0)"
            )
        if self.original_max_position_embeddings <= 0:
            raise ConfigError("rope scaling original_max_position_embeddings must be positive")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on the q/k/v projections
    attention_out_bias: bool = False  # bias on the output projection (Llama's attention_bias sets both)
    architecture: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {self.architecture!r}; specjax runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads}) for GQA"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("rms_norm_eps and rope_theta must be positive")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        arch = _hf_architecture(cfg)
        if cfg.get("sliding_window") and cfg.get("use_sliding_window", arch == "mistral"):
            raise ConfigError("sliding-window attention is not supported")
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            kv_heads = int(cfg.get("num_key_value_heads") or heads)
            head_dim = int(cfg.get("head_dim") or hidden // heads)
            rope_theta, rope_scaling = _hf_rope(cfg)
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v bias; Llama exposes it as `attention_bias`.
                attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
                attention_out_bias=arch != "qwen2" and bool(cfg.get("attention_bias", False)),
                architecture=arch,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
            )
        except KeyError as e:
            raise ConfigError(f"config.json is missing required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"config.json has a malformed field: {e}") from None

    @classmethod
    def from_hf_json(cls, path: str | os.PathLike) -> "ModelConfig":
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(cfg)

    # ------------------------------------------------------------------ GGUF metadata
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], *, tied_embeddings: bool) -> "ModelConfig":
        """``tied_embeddings``: GGUF has no flag for it; the file simply lacks ``output.weight``."""
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported GGUF architecture {arch!r}; specjax runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def get(key, default=None, required=True):
            full = f"{arch}.{key}"
            if full in meta:
                return meta[full]
            if required and default is None:
                raise ConfigError(f"GGUF metadata is missing {full!r}")
            return default

        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        kv_heads = int(get("attention.head_count_kv", heads))
        head_dim = int(get("attention.key_length", hidden // heads, required=False))
        rope_dim = int(get("rope.dimension_count", head_dim, required=False))
        if rope_dim != head_dim:
            raise ConfigError(f"partial rotary embeddings (rope dim {rope_dim} < head dim {head_dim}) are not supported")
        vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
        if not vocab:
            raise ConfigError("GGUF metadata gives no vocabulary size")
        scaling = None
        if get("rope.scaling.type", "none", required=False) not in ("none", None):
            raise ConfigError(f"unsupported GGUF rope scaling {get('rope.scaling.type')!r}")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(get("context_length", 4096, required=False)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6, required=False)),
            rope_theta=float(get("rope.freq_base", 10000.0, required=False)),
            rope_scaling=scaling,
            tie_word_embeddings=tied_embeddings,
            attention_bias=arch == "qwen2",
            architecture=arch,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
        )


def _hf_architecture(cfg: Mapping[str, Any]) -> str:
    model_type = str(cfg.get("model_type", "")).lower()
    archs = [str(a).lower() for a in cfg.get("architectures") or []]
    for name in SUPPORTED_ARCHITECTURES:
        if model_type == name or any(a.startswith(name) for a in archs):
            return name
    shown = model_type or (archs[0] if archs else "unknown")
    raise ConfigError(f"unsupported architecture {shown!r}; specjax runs {', '.join(SUPPORTED_ARCHITECTURES)}")


def _hf_rope(cfg: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers 5.x nests RoPE settings under `rope_parameters`; older files keep them top-level.
    params = dict(cfg.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or (params if params.get("rope_type") not in (None, "default") else None)
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise ConfigError(f"unsupported rope scaling type {kind!r}; specjax supports default and llama3")
    return theta, RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
    )


# ---------------------------------------------------------------------------- dtype policy
DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "float16": jnp.float16, "fp16": jnp.float16}


def resolve_dtype(dtype: str | Any | None = "auto", backend: str | None = None):
    """The compute/weight dtype for a backend: bf16 on GPUs, fp32 on CPU unless forced.

    XLA's CPU backend runs bf16 matmuls several times slower than fp32, so "auto" keeps CPU in fp32.
    Softmax and normalisation always run in fp32 inside the model regardless of this dtype.
    """
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        backend = backend or jax.default_backend()
        return jnp.bfloat16 if backend in ("gpu", "cuda", "rocm", "tpu") else jnp.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


def matmul_precision(dtype) -> jax.lax.Precision:
    """fp32 models get true fp32 products: on GPUs XLA's default for fp32 dots is TF32 (about 1e-3 error)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT
