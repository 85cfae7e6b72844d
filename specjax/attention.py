"""The attention entry point: the Pallas tree-attention kernel or XLA, behind one signature.

The metadata, masks and reference live in ``specjax.attention_reference`` (which the kernel
imports too); they are re-exported here, where the rest of specjax imports them from.

On XLA, calls with many new tokens (prompt chunks) run ``blocked_paged_attention``: the
reference materialises fp32 scores for every new token against the whole gathered prefix,
[B, Hq, T, S] (150 MB a layer for a 512-token chunk after 8K tokens), and makes several passes
over them, so a long prompt's prefill was memory-bound at a tenth of the CPU's matmul rate. The
blocked form walks the prefix a block of pages at a time with an online softmax, touching only
the blocks some row's prefix reaches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import backend as kernel_backend
from pallas_kernels import tree_attention
from specjax.attention_reference import (MASKED_SCORE, AttentionMetadata, causal_mask, gather_pages, masked_attention,
                                         paged_attention)

__all__ = ["AttentionMetadata", "attention", "blocked_paged_attention", "causal_mask", "masked_attention",
           "paged_attention"]

# New tokens per sequence from which XLA calls without cached tree nodes take the blocked form.
BLOCKED_MIN_NEW_TOKENS = 64
# Prefix tokens per block: a block's scores for a 512-token chunk stay a few MB, in cache.
PREFIX_BLOCK_TOKENS = 256


def attention(q: jax.Array, new_k: jax.Array, new_v: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
              layer: jax.Array, meta: AttentionMetadata, backend: str | None = None) -> jax.Array:
    """``paged_attention`` on the backend ``pallas_kernels.backend.use_pallas`` picks.

    backend: "auto" (the Pallas kernel on NVIDIA GPUs when it supports the call, XLA otherwise),
    "pallas" (forced; interpreted off GPUs; errors on calls past the kernel's limits), "xla", or
    "reference" (the plain XLA reference alone, which reverse-mode autodiff can go through: the
    blocked path loops for a data-dependent count); None reads ``$SPECJAX_ATTENTION`` (default
    "auto"). Decided at trace time.
    """
    if backend == "reference":
        return paged_attention(q, new_k, new_v, k_pool, v_pool, layer, meta)
    supported = tree_attention.unsupported_reason(q, k_pool, meta) is None
    if kernel_backend.use_pallas(backend, supported):
        return tree_attention.tree_attention(q, new_k, new_v, k_pool, v_pool, layer, meta)
    if meta.tree_mask is None and q.shape[1] >= BLOCKED_MIN_NEW_TOKENS:
        return blocked_paged_attention(q, new_k, new_v, k_pool, v_pool, layer, meta)
    return paged_attention(q, new_k, new_v, k_pool, v_pool, layer, meta)


def blocked_paged_attention(q: jax.Array, new_k: jax.Array, new_v: jax.Array, k_pool: jax.Array,
                            v_pool: jax.Array, layer: jax.Array, meta: AttentionMetadata,
                            block_tokens: int = PREFIX_BLOCK_TOKENS) -> jax.Array:
    """``paged_attention`` (without cached tree nodes: ``meta.tree_mask`` must be None) by an online
    softmax over blocks of the prefix, then the new tokens; same arguments, same result up to
    float rounding. Blocks past every row's prefix are skipped (a loop of data-dependent length).
    A query that sees nothing at all (a padding row) gets zeros, not the reference's average."""
    if meta.tree_mask is not None:
        raise ValueError("blocked_paged_attention takes no cached tree nodes (meta.tree_mask must be None)")
    b, t, hq, hd = q.shape
    hkv = new_k.shape[2]
    g = hq // hkv
    page = k_pool.shape[2]
    pages_per_block = max(1, block_tokens // page)
    num_blocks = -(-meta.block_tables.shape[1] // pages_per_block)
    tables = jnp.pad(meta.block_tables, ((0, 0), (0, num_blocks * pages_per_block - meta.block_tables.shape[1])))
    # GQA: a KV head's g query heads become g * T rows of one matrix product.
    rows = (q.reshape(b, t, hkv, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * t, hd)
            .astype(jnp.float32) * hd**-0.5)

    def absorb(state, keys, values, visible):
        """Fold keys/values [B, S', Hkv, hd] into the running (max, sum, output); visible [B, 1, M, S']."""
        best, total, out = state
        scores = jnp.einsum("bkmd,bskd->bkms", rows, keys.astype(jnp.float32), preferred_element_type=jnp.float32)
        scores = jnp.where(visible, scores, MASKED_SCORE)
        new_best = jnp.maximum(best, scores.max(axis=-1))
        weights = jnp.where(visible, jnp.exp(scores - new_best[..., None]), 0.0)
        rescale = jnp.exp(best - new_best)
        out = out * rescale[..., None] + jnp.einsum("bkms,bskd->bkmd", weights, values.astype(jnp.float32),
                                                    preferred_element_type=jnp.float32)
        return new_best, total * rescale + weights.sum(axis=-1), out

    def prefix_block(i, state):
        block = jax.lax.dynamic_slice_in_dim(tables, i * pages_per_block, pages_per_block, axis=1)
        positions = i * pages_per_block * page + jnp.arange(pages_per_block * page)
        visible = (positions[None, :] < meta.context_lens[:, None])[:, None, None, :]
        return absorb(state, gather_pages(k_pool, layer, block), gather_pages(v_pool, layer, block), visible)

    start = (jnp.full((b, hkv, g * t), MASKED_SCORE, jnp.float32), jnp.zeros((b, hkv, g * t), jnp.float32),
             jnp.zeros((b, hkv, g * t, hd), jnp.float32))
    used = jnp.minimum(-(-jnp.max(meta.context_lens) // (pages_per_block * page)), num_blocks)
    state = jax.lax.fori_loop(0, used, prefix_block, start)
    new_visible = jnp.broadcast_to(meta.new_mask[:, None, None], (b, 1, g, t, t)).reshape(b, 1, g * t, t)
    _, total, out = absorb(state, new_k, new_v, new_visible)
    out = out / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[..., None]
    return out.reshape(b, hkv, g, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, hq, hd).astype(q.dtype)
