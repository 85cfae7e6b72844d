"""The decoder's parameter pytree, and its construction from Hugging Face-named tensors.

Per-layer weights are stacked on a leading layer axis so the forward pass runs the layers under
``lax.scan``. Matrices are stored ``[in, out]`` (x @ W). q/k/v share one fused matrix and gate/up
another: one matmul each instead of three and two, which matters for launch- and read-bound decode.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from specjax.config import ModelConfig


def pytree_dataclass(cls):
    """A frozen dataclass registered as a pytree whose fields are all children (None = empty)."""
    cls = dataclass(frozen=True)(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])


@pytree_dataclass
class LayerWeights:
    """All decoder layers' weights, each stacked on a leading axis L.

    Shapes: attn_norm [L, D]; wqkv [L, D, (Hq + 2 Hkv) * hd]; bqkv [L, (Hq + 2 Hkv) * hd] or None;
    wo [L, Hq * hd, D]; bo [L, D] or None; mlp_norm [L, D]; w_gate_up [L, D, 2 F]; w_down [L, F, D].
    """

    attn_norm: jax.Array
    wqkv: jax.Array
    bqkv: jax.Array | None
    wo: jax.Array
    bo: jax.Array | None
    mlp_norm: jax.Array
    w_gate_up: jax.Array
    w_down: jax.Array


@pytree_dataclass
class Params:
    """embed [V, D]; layers (stacked); final_norm [D]; lm_head [D, V], or None when tied to embed."""

    embed: jax.Array
    layers: LayerWeights
    final_norm: jax.Array
    lm_head: jax.Array | None


def store_bf16(params: Params) -> Params:
    """Layer matrices as raw bfloat16 bits (uint16), widened to fp32 inside each layer.

    For CPUs, where a batch-1 step is bound by reading weights but XLA's bf16 matmuls are slow:
    half the weight bytes, fp32 arithmetic. Stored as integers because XLA hoists a plain bf16->f32
    convert out of the layer loop and re-materialises every fp32 weight each step. The embedding,
    LM head and biases become fp32 (the activations' dtype follows the embedding): a tied head
    would otherwise widen the whole table every step.
    """
    def pack(w):
        return jax.lax.bitcast_convert_type(w.astype(jnp.bfloat16), jnp.uint16)

    def fp32(w):
        return None if w is None else w.astype(jnp.float32)

    lw = params.layers
    layers = dataclasses.replace(lw, wqkv=pack(lw.wqkv), wo=pack(lw.wo), w_gate_up=pack(lw.w_gate_up),
                                 w_down=pack(lw.w_down), bqkv=fp32(lw.bqkv), bo=fp32(lw.bo))
    return dataclasses.replace(params, embed=fp32(params.embed), lm_head=fp32(params.lm_head), layers=layers)


def inference_params(params: Params, backend: str | None = None) -> Params:
    """Params as the runner should hold them: on a CPU, bf16 weights become bf16-bit storage with
    fp32 arithmetic (``store_bf16``); elsewhere they are used as they are."""
    if (backend or jax.default_backend()) == "cpu" and params.embed.dtype == jnp.bfloat16:
        return store_bf16(params)
    return params


def widen_bf16_bits(w: jax.Array) -> jax.Array:
    """uint16 bfloat16 bits -> float32 (exact): the bits are the high half of the fp32 word."""
    return jax.lax.bitcast_convert_type(w.astype(jnp.uint32) << 16, jnp.float32)


def param_count(params: Params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def param_bytes(params: Params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not match its config."""


def read_json_object(path: Path, error: type[Exception] = CheckpointError, missing_ok: bool = False) -> dict:
    """The JSON object in ``path`` (``{}`` if absent and ``missing_ok``); ``error`` when missing or corrupt."""
    if not path.is_file():
        if missing_ok:
            return {}
        raise error(f"missing {path.name} in {path.parent}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise error(f"{path} must hold a JSON object")
    return value


def params_from_hf_tensors(config: ModelConfig, get: Callable[[str], np.ndarray], dtype=jnp.float32) -> Params:
    """Build Params from tensors named as in HF Llama/Qwen2 checkpoints (``model.layers.0.self_attn.q_proj.weight``).

    ``get(name)`` returns the tensor in PyTorch layout (``[out, in]`` for linears) or raises KeyError.
    Norms are kept in fp32 whatever ``dtype`` is, since normalisation runs in fp32.
    """
    c = config

    def tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
        try:
            x = np.asarray(get(name))
        except KeyError:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}") from None
        if tuple(x.shape) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(x.shape)}, config expects {shape}")
        return x.astype(np.float32, copy=False)

    def linear(name: str, out_dim: int, in_dim: int) -> np.ndarray:
        return tensor(name, (out_dim, in_dim)).T

    np_dtype = np.dtype(dtype)  # ml_dtypes makes bf16 a numpy dtype; cast per layer to bound host memory

    def stack(fn) -> jax.Array:
        return jnp.asarray(np.stack([fn(i).astype(np_dtype) for i in range(c.num_layers)]))

    def norm_stack(fn) -> jax.Array:
        return jnp.asarray(np.stack([fn(i) for i in range(c.num_layers)]), dtype=jnp.float32)

    D, F = c.hidden_size, c.intermediate_size
    pre = "model.layers.{}."

    def qkv(i):
        p = pre.format(i) + "self_attn."
        return np.concatenate([linear(p + "q_proj.weight", c.q_size, D), linear(p + "k_proj.weight", c.kv_size, D),
                               linear(p + "v_proj.weight", c.kv_size, D)], axis=1)

    def qkv_bias(i):
        p = pre.format(i) + "self_attn."
        return np.concatenate([tensor(p + "q_proj.bias", (c.q_size,)), tensor(p + "k_proj.bias", (c.kv_size,)),
                               tensor(p + "v_proj.bias", (c.kv_size,))])

    def gate_up(i):
        p = pre.format(i) + "mlp."
        return np.concatenate([linear(p + "gate_proj.weight", F, D), linear(p + "up_proj.weight", F, D)], axis=1)

    layers = LayerWeights(
        attn_norm=norm_stack(lambda i: tensor(pre.format(i) + "input_layernorm.weight", (D,))),
        wqkv=stack(qkv),
        bqkv=stack(qkv_bias) if c.attention_bias else None,
        wo=stack(lambda i: linear(pre.format(i) + "self_attn.o_proj.weight", D, c.q_size)),
        bo=stack(lambda i: tensor(pre.format(i) + "self_attn.o_proj.bias", (D,))) if c.attention_out_bias else None,
        mlp_norm=norm_stack(lambda i: tensor(pre.format(i) + "post_attention_layernorm.weight", (D,))),
        w_gate_up=stack(gate_up),
        w_down=stack(lambda i: linear(pre.format(i) + "mlp.down_proj.weight", D, F)),
    )
    embed = tensor("model.embed_tokens.weight", (c.vocab_size, D))
    lm_head = None if c.tie_word_embeddings else jnp.asarray(linear("lm_head.weight", c.vocab_size, D), dtype)
    return Params(
        embed=jnp.asarray(embed, dtype),
        layers=layers,
        final_norm=jnp.asarray(tensor("model.norm.weight", (D,)), jnp.float32),
        lm_head=lm_head,
    )


def random_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> Params:
    """Random weights of the right shapes (benchmarks of large shapes, and tests)."""
    c = config
    L, D, F = c.num_layers, c.hidden_size, c.intermediate_size
    qkv = c.q_size + 2 * c.kv_size
    keys = iter(jax.random.split(key, 8))

    def normal(shape):
        return (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    return Params(
        embed=normal((c.vocab_size, D)),
        layers=LayerWeights(
            attn_norm=jnp.ones((L, D), jnp.float32),
            wqkv=normal((L, D, qkv)),
            bqkv=normal((L, qkv)) if c.attention_bias else None,
            wo=normal((L, c.q_size, D)),
            bo=normal((L, D)) if c.attention_out_bias else None,
            mlp_norm=jnp.ones((L, D), jnp.float32),
            w_gate_up=normal((L, D, 2 * F)),
            w_down=normal((L, F, D)),
        ),
        final_norm=jnp.ones((D,), jnp.float32),
        lm_head=None if c.tie_word_embeddings else normal((D, c.vocab_size)),
    )
