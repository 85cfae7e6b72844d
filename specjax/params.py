"""The decoder's parameter pytree, and its construction from Hugging Face-named tensors.

Per-layer weights are stacked on a leading layer axis so the forward pass runs the layers under
``lax.scan``. Matrices are stored ``[in, out]`` (x @ W). q/k/v share one fused matrix and gate/up
another: one matmul each instead of three and two, which matters for launch- and read-bound decode.
The fused matrices are laid out so that splitting their output columns into equal contiguous
blocks splits whole units: q/k/v per KV-head group (the group's query heads, its key head, its
value head), gate/up per column pair. Tensor parallelism then shards them as they are, with no
gather of q, k and v apart (``sharding.LOGICAL_AXES``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from specjax.config import ModelConfig
from specjax.linear import Bf16Bits
from specjax.pytree import pytree_dataclass


# The layer matrices ``linear`` projects with (the rest of ``LayerWeights`` are norms and biases).
PROJECTIONS = ("wqkv", "wo", "w_gate_up", "w_down")


@pytree_dataclass
class LayerWeights:
    """All decoder layers' weights, each stacked on a leading axis L.

    Shapes: attn_norm [L, D]; wqkv [L, D, (Hq + 2 Hkv) * hd]; bqkv [L, (Hq + 2 Hkv) * hd] or None;
    wo [L, Hq * hd, D]; bo [L, D] or None; mlp_norm [L, D]; w_gate_up [L, D, 2 F]; w_down [L, F, D].
    The matrices are arrays or any weight type of ``linear`` (e.g. ``Bf16Bits``).
    """

    attn_norm: jax.Array
    wqkv: jax.Array | Bf16Bits
    bqkv: jax.Array | None
    wo: jax.Array | Bf16Bits
    bo: jax.Array | None
    mlp_norm: jax.Array
    w_gate_up: jax.Array | Bf16Bits
    w_down: jax.Array | Bf16Bits


@pytree_dataclass
class ReadInPlace:
    """A stacked part of a layer weight ([L, ...], an array or weight type) that the layer loop
    passes whole rather than slicing per layer: the layer body gets it as ``AtLayer`` and reads
    only what it uses, where it uses it (LoRA slots: the rows' adapters, and only when some row
    has one), instead of a copy of the whole layer's slice every step."""

    stacked: object


@pytree_dataclass
class AtLayer:
    """What a layer body sees of a ``ReadInPlace`` weight: the whole stack and this layer's index;
    ``shape`` is one layer's."""

    stacked: object
    layer: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.stacked.shape[1:])


def layer_loop_parts(layers: LayerWeights) -> tuple[list, Callable]:
    """What the layer loop slices (``layers``' leaves, ``ReadInPlace`` parts left out), and a
    function of (one layer's slice of it, the layer index) -> that layer's weights, each
    ``ReadInPlace`` part as ``AtLayer``."""

    def in_place(node) -> bool:
        return isinstance(node, ReadInPlace)

    leaves, treedef = jax.tree.flatten(layers, is_leaf=in_place)
    sliced = [None if in_place(leaf) else leaf for leaf in leaves]

    def at_layer(layer_slice: list, index: jax.Array) -> LayerWeights:
        return treedef.unflatten([AtLayer(leaf.stacked, index) if in_place(leaf) else part
                                  for leaf, part in zip(leaves, layer_slice)])

    return sliced, at_layer


@pytree_dataclass
class Params:
    """embed [V, D]; layers (stacked); final_norm [D]; lm_head [D, V], or None when tied to embed."""

    embed: jax.Array
    layers: LayerWeights
    final_norm: jax.Array
    lm_head: jax.Array | None


def store_bf16(params: Params) -> Params:
    """Layer matrices as ``linear.Bf16Bits``: bf16 bits, widened to fp32 inside each layer (half
    the weight bytes of fp32 on CPUs, where XLA's bf16 matmuls are slow). The embedding, LM head
    and biases become fp32 (the activations' dtype follows the embedding): a tied head would
    otherwise widen the whole table every step.
    """
    pack = Bf16Bits.pack

    def fp32(w):
        return None if w is None else w.astype(jnp.float32)

    lw = params.layers
    layers = dataclasses.replace(lw, **{name: pack(getattr(lw, name)) for name in PROJECTIONS}, bqkv=fp32(lw.bqkv),
                                 bo=fp32(lw.bo))
    return dataclasses.replace(params, embed=fp32(params.embed), lm_head=fp32(params.lm_head), layers=layers)


def inference_params(params: Params, backend: str | None = None) -> Params:
    """Params as the runner should hold them: on a CPU, bf16 weights become bf16-bit storage with
    fp32 arithmetic (``store_bf16``); elsewhere they are used as they are."""
    if (backend or jax.default_backend()) == "cpu" and params.embed.dtype == jnp.bfloat16:
        return store_bf16(params)
    return params


def fuse_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, config: ModelConfig, xp=np) -> np.ndarray:
    """q [..., Hq * hd], k and v [..., Hkv * hd] (weights' output columns, or biases) -> [...,
    Hkv * (G + 2) * hd], grouped per KV head: its G = Hq / Hkv query heads, then its key, its value.
    ``xp``: numpy, or jax.numpy for traced arrays."""
    c, lead = config, q.shape[:-1]
    groups = c.num_heads // c.num_kv_heads
    grouped = xp.concatenate([q.reshape(*lead, c.num_kv_heads, groups, c.head_dim),
                              k.reshape(*lead, c.num_kv_heads, 1, c.head_dim),
                              v.reshape(*lead, c.num_kv_heads, 1, c.head_dim)], axis=-2)
    return grouped.reshape(*lead, c.num_kv_heads * (groups + 2) * c.head_dim)


def split_qkv(qkv, config: ModelConfig):
    """The inverse of ``fuse_qkv`` on activations or weights: qkv [..., Hkv * (G + 2) * hd] ->
    q [..., Hq, hd], k and v [..., Hkv, hd]."""
    c, lead = config, qkv.shape[:-1]
    groups = c.num_heads // c.num_kv_heads
    grouped = qkv.reshape(*lead, c.num_kv_heads, groups + 2, c.head_dim)
    return (grouped[..., :groups, :].reshape(*lead, c.num_heads, c.head_dim), grouped[..., groups, :],
            grouped[..., groups + 1, :])


def fuse_gate_up(gate: np.ndarray, up: np.ndarray, xp=np) -> np.ndarray:
    """gate, up [..., F] -> [..., 2F], each gate column beside its up column."""
    return xp.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], 2 * gate.shape[-1])


def split_gate_up(gate_up):
    """The inverse of ``fuse_gate_up``: [..., 2F] -> gate, up [..., F]."""
    pairs = gate_up.reshape(*gate_up.shape[:-1], gate_up.shape[-1] // 2, 2)
    return pairs[..., 0], pairs[..., 1]


def regroup_legacy_layers(layers: LayerWeights, config: ModelConfig) -> LayerWeights:
    """Layers saved before the grouped layout (q/k/v and gate/up each in one contiguous block, orbax
    checkpoint version 1) in today's layout."""
    c = config

    def qkv(w):
        w = np.asarray(w)
        return jnp.asarray(fuse_qkv(w[..., : c.q_size], w[..., c.q_size: c.q_size + c.kv_size],
                                    w[..., c.q_size + c.kv_size:], c))

    def gate_up(w):
        w = np.asarray(w)
        return jnp.asarray(fuse_gate_up(w[..., : c.intermediate_size], w[..., c.intermediate_size:]))

    return dataclasses.replace(layers, wqkv=qkv(layers.wqkv), bqkv=None if layers.bqkv is None else qkv(layers.bqkv),
                               w_gate_up=gate_up(layers.w_gate_up))


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
        return fuse_qkv(linear(p + "q_proj.weight", c.q_size, D), linear(p + "k_proj.weight", c.kv_size, D),
                        linear(p + "v_proj.weight", c.kv_size, D), c)

    def qkv_bias(i):
        p = pre.format(i) + "self_attn."
        return fuse_qkv(tensor(p + "q_proj.bias", (c.q_size,)), tensor(p + "k_proj.bias", (c.kv_size,)),
                        tensor(p + "v_proj.bias", (c.kv_size,)), c)

    def gate_up(i):
        p = pre.format(i) + "mlp."
        return fuse_gate_up(linear(p + "gate_proj.weight", F, D), linear(p + "up_proj.weight", F, D))

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
