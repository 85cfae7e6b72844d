"""The functional Llama-family decoder.

``forward`` is a pure function of (params, tokens, positions, KV cache, attention metadata): it
returns a ``ForwardOutput``: logits, the new tokens' K/V for every layer (writing them to the
cache is the caller's, ``kv_cache.write_kv``, so a speculative verifier commits only what it
accepts), and the hidden states of the layers asked for (draft heads read them). Every
projection goes through ``linear.linear``, which dispatches on the weight's type. Layers run
under ``lax.scan`` over stacked weights: one compiled layer body instead of L copies.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from specjax.attention import AttentionMetadata, attention, masked_attention
from specjax.config import ModelConfig, matmul_precision
from specjax.kv_cache import KVCache
from specjax.linear import linear_groups, over_rows, share_base
from specjax.params import PROJECTIONS, Params, layer_loop_parts, split_gate_up, split_qkv
from specjax.pytree import pytree_dataclass


@pytree_dataclass
class ForwardOutput:
    """logits [B, K, V] fp32; new_k, new_v [L, B, T, Hkv, hd]; hidden [H, B, T, D] the hidden
    states of the layers ``forward`` was asked for (``hidden_layers``), or None."""

    logits: jax.Array
    new_k: jax.Array
    new_v: jax.Array
    hidden: jax.Array | None = None


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in fp32, result in x's dtype. x [..., D]; weight [D]."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * x32).astype(x.dtype)


@functools.lru_cache(maxsize=32)
def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """[hd / 2] float32 inverse frequencies, with llama3 frequency-dependent scaling when configured."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    s = config.rope_scaling
    if s is None:
        return inv_freq.astype(np.float32)
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    wavelen = 2 * np.pi / inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, hd / 2] in fp32 for integer positions [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inverse_frequencies(config))
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate halves (HF layout, not interleaved). x [B, T, H, hd]; cos/sin [B, T, hd / 2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class RowGroup:
    """Rows of a joint forward (``forward_groups``) that share a shape, a KV cache and attention
    metadata: ``forward``'s arguments of the same names. ``constant``: no derivative is taken
    through these rows (the products they share with the other groups would otherwise carry the
    others' tangents into them, and autodiff would go through their attention too)."""

    tokens: jax.Array
    positions: jax.Array
    cache: KVCache | None
    meta: AttentionMetadata
    logit_indices: jax.Array | None = None
    attention_backend: str | None = None
    constant: bool = False


def forward(
    params: Params,
    config: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache | None,
    meta: AttentionMetadata,
    logit_indices: jax.Array | None = None,
    *,
    hidden_layers: tuple[int, ...] = (),
    attention_backend: str | None = None,
) -> ForwardOutput:
    """Run the decoder on T new tokens per sequence.

    tokens, positions: [B, T] int32. cache: the paged pool, or None for no committed prefix
    (training, full-sequence scoring; ``meta.block_tables``/``context_lens`` are then ignored).
    logit_indices: [B, K] int32 positions within T whose logits are wanted (None: all T); prefill
    needs only the last token's, which saves a [T, D] x [D, V] product.
    hidden_layers (static): which hidden states to return, numbered as transformers'
    ``output_hidden_states``: 0 the embeddings, i the output of layer i, and L (the last) after the
    final norm. attention_backend (static): ``attention.attention``'s backend.
    """
    group = RowGroup(tokens, positions, cache, meta, logit_indices, attention_backend)
    return forward_groups(params, config, [group], hidden_layers=hidden_layers)[0]


def joint_params(groups: list[Params]) -> Params:
    """Several row groups' params over the same base weights (each the base, or adapted over it:
    ``lora.adapt``, ``lora.with_row_adapters``) as the one ``Params`` of their joint forward."""
    if len(groups) == 1:
        return groups[0]
    first = groups[0]
    layers = {name: share_base([getattr(p.layers, name) for p in groups]) for name in PROJECTIONS}
    return dataclasses.replace(first, layers=dataclasses.replace(first.layers, **layers))


def forward_groups(params: Params, config: ModelConfig, groups: list[RowGroup], *,
                   hidden_layers: tuple[int, ...] = ()) -> list[ForwardOutput]:
    """``forward`` of several groups of rows at once (each with its own shape, cache, attention and
    adapters: ``joint_params``), one ``ForwardOutput`` per group. Every projection, and the LM
    head, is one product over all the groups' rows, so a step reads the weights once for all of
    them: how finetuning tokens ride along with a decode step (``engine.finetuning``)."""
    c = config
    dtype = params.embed.dtype

    def frozen(values: list) -> list:
        return [jax.lax.stop_gradient(v) if g.constant else v for g, v in zip(groups, values)]

    xs = [params.embed[g.tokens].astype(dtype) for g in groups]
    ropes = [rope_tables(c, g.positions) for g in groups]
    sliced, at_layer = layer_loop_parts(params.layers)

    def layer(xs, layer_in):
        layer_slice, index = layer_in
        w = at_layer(layer_slice, index)
        qkvs = frozen(linear_groups([rms_norm(x, w.attn_norm, c.rms_norm_eps) for x in xs], w.wqkv))
        attns, ks, vs = [], [], []
        for g, qkv, (cos, sin) in zip(groups, qkvs, ropes):
            b, t = g.tokens.shape
            if w.bqkv is not None:
                qkv = qkv + w.bqkv.astype(qkv.dtype)
            q, k, v = split_qkv(qkv, c)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if g.cache is None:
                attn = masked_attention(q, k, v, g.meta.new_mask)
            else:
                k, v = k.astype(g.cache.k.dtype), v.astype(g.cache.v.dtype)
                attn = attention(q, k, v, g.cache.k, g.cache.v, index, g.meta, g.attention_backend)
            attns.append(attn.reshape(b, t, c.q_size))
            ks.append(k)
            vs.append(v)
        outs = frozen(linear_groups(attns, w.wo))
        if w.bo is not None:
            outs = [o + w.bo.astype(o.dtype) for o in outs]
        xs = [x + o for x, o in zip(xs, outs)]
        gate_ups = frozen(linear_groups([rms_norm(x, w.mlp_norm, c.rms_norm_eps) for x in xs], w.w_gate_up))
        mids = [jax.nn.silu(gate) * up for gate, up in map(split_gate_up, gate_ups)]
        xs = [x + d for x, d in zip(xs, frozen(linear_groups(mids, w.w_down)))]
        return xs, (ks, vs, xs if hidden_layers else None)

    if any(not 0 <= i <= c.num_layers for i in hidden_layers):
        raise ValueError(f"hidden_layers {hidden_layers} must be in [0, {c.num_layers}]")
    embedded = xs
    xs, (new_k, new_v, per_layer) = jax.lax.scan(layer, xs, (sliced, jnp.arange(c.num_layers)))
    hidden = [None] * len(groups)
    if hidden_layers:
        hidden = [jnp.stack([embedded[n] if i == 0 else rms_norm(xs[n], params.final_norm, c.rms_norm_eps)
                             if i == c.num_layers else per_layer[n][i - 1] for i in hidden_layers])
                  for n in range(len(groups))]
    # Before the norm: only the rows whose logits are wanted.
    picked = [x if g.logit_indices is None else jnp.take_along_axis(x, g.logit_indices[:, :, None], axis=1)
              for g, x in zip(groups, xs)]
    logits = frozen(lm_head_groups(params, [rms_norm(x, params.final_norm, c.rms_norm_eps) for x in picked]))
    return [ForwardOutput(logits=lg, new_k=k, new_v=v, hidden=h)
            for lg, k, v, h in zip(logits, new_k, new_v, hidden)]


def lm_head_groups(params: Params, xs: list) -> list:
    """Each group's logits [B, K, V] fp32 from its final hidden states [B, K, D]: one product
    with the head over every group's rows."""
    def head(rows):
        if params.lm_head is None:  # tied: contract with the embedding table as stored, no transpose
            return jnp.einsum("nd,vd->nv", rows, params.embed, preferred_element_type=jnp.float32,
                              precision=matmul_precision(rows.dtype))
        return jnp.einsum("nd,dv->nv", rows, params.lm_head, preferred_element_type=jnp.float32,
                          precision=matmul_precision(rows.dtype))

    return over_rows(xs, head)
