"""The functional Llama-family decoder.

``forward`` is a pure function of (params, tokens, positions, KV cache, attention metadata): it
returns a ``ForwardOutput``: logits, the new tokens' K/V for every layer (writing them to the
cache is the caller's, ``kv_cache.write_kv``, so a speculative verifier commits only what it
accepts), and the hidden states of the layers asked for (draft heads read them). Every
projection goes through ``linear.linear``, which dispatches on the weight's type. Layers run
under ``lax.scan`` over stacked weights: one compiled layer body instead of L copies.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from specjax.attention import AttentionMetadata, attention, masked_attention
from specjax.config import ModelConfig, matmul_precision
from specjax.kv_cache import KVCache
from specjax.linear import linear
from specjax.params import Params, layer_loop_parts, split_gate_up, split_qkv
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
    c = config
    b, t = tokens.shape
    dtype = params.embed.dtype
    x = params.embed[tokens].astype(dtype)
    cos, sin = rope_tables(c, positions)
    lw = params.layers

    sliced, at_layer = layer_loop_parts(lw)

    def layer(x, xs):
        layer_slice, index = xs
        w = at_layer(layer_slice, index)
        h = rms_norm(x, w.attn_norm, c.rms_norm_eps)
        qkv = linear(h, w.wqkv)
        if w.bqkv is not None:
            qkv = qkv + w.bqkv.astype(qkv.dtype)
        q, k, v = split_qkv(qkv, c)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            attn = masked_attention(q, k, v, meta.new_mask)
        else:
            k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
            attn = attention(q, k, v, cache.k, cache.v, index, meta, attention_backend)
        attn = linear(attn.reshape(b, t, c.q_size), w.wo)
        if w.bo is not None:
            attn = attn + w.bo.astype(attn.dtype)
        x = x + attn
        h = rms_norm(x, w.mlp_norm, c.rms_norm_eps)
        gate, up = split_gate_up(linear(h, w.w_gate_up))
        x = x + linear(jax.nn.silu(gate) * up, w.w_down)
        return x, (k, v, x if hidden_layers else None)

    if any(not 0 <= i <= c.num_layers for i in hidden_layers):
        raise ValueError(f"hidden_layers {hidden_layers} must be in [0, {c.num_layers}]")
    embedded = x
    x, (new_k, new_v, per_layer) = jax.lax.scan(layer, x, (sliced, jnp.arange(c.num_layers)))
    hidden = None
    if hidden_layers:
        final = rms_norm(x, params.final_norm, c.rms_norm_eps)
        hidden = jnp.stack([embedded if i == 0 else final if i == c.num_layers else per_layer[i - 1]
                            for i in hidden_layers])
    if logit_indices is not None:  # before the norm: only the rows whose logits are wanted
        x = jnp.take_along_axis(x, logit_indices[:, :, None], axis=1)
    x = rms_norm(x, params.final_norm, c.rms_norm_eps)
    if params.lm_head is None:  # tied: contract with the embedding table as stored, no transpose
        logits = jnp.einsum("bkd,vd->bkv", x, params.embed, preferred_element_type=jnp.float32,
                            precision=matmul_precision(x.dtype))
    else:
        logits = jnp.einsum("bkd,dv->bkv", x, params.lm_head, preferred_element_type=jnp.float32,
                            precision=matmul_precision(x.dtype))
    return ForwardOutput(logits=logits, new_k=new_k, new_v=new_v, hidden=hidden)
