"""Attention over a paged KV cache with an explicit visibility mask.

A step appends T new tokens per sequence after its committed prefix. Every new token sees the
whole committed prefix (``context_lens``) and, among the new tokens, exactly those its row of
``new_mask`` allows. Causal prefill/decode is the lower-triangular mask; token-tree verification
passes the tree's ancestor mask. New tokens' K/V are not read back from the cache: they are used
straight from the projection, so a verifier can score a tree and commit only the accepted nodes.
A draft growing a token tree depth by depth keeps the nodes it has run in the cache just past the
committed prefix; ``tree_mask`` says which of those cached nodes (the ancestors) each new token sees.

This module holds the metadata, the masks and the pure-JAX implementation (XLA everywhere), the
reference the Pallas kernel (``pallas_kernels.tree_attention``) is tested against. It imports
neither the kernel nor ``specjax.attention``, the entry point that dispatches between the two, so
both can import it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specjax.config import matmul_precision
from specjax.pytree import pytree_dataclass

# Finite, so a query with no visible key (a padding row) yields a harmless average instead of NaN.
MASKED_SCORE = -1e30


@pytree_dataclass
class AttentionMetadata:
    """Where each sequence's prefix lives, and what each new token may see.

    block_tables: [B, P] int32, page ids of each sequence's committed prefix (entries past the
        prefix are ignored; P is bucketed so the step reads only the pages in use).
    context_lens: [B] int32, committed tokens before this step's new tokens.
    new_mask: [B, T, T] bool, ``new_mask[b, i, j]``: new token i may attend to new token j.
    tree_mask: [B, T, M] bool or None, ``tree_mask[b, i, m]``: new token i also sees the cached token
        at position ``context_lens[b] + m`` (a draft's earlier tree nodes); None: nothing past the prefix.
    """

    block_tables: jax.Array
    context_lens: jax.Array
    new_mask: jax.Array
    tree_mask: jax.Array | None = None


def causal_mask(batch: int, length: int) -> jax.Array:
    """[B, T, T] lower-triangular visibility for plain prefill and decode."""
    tri = jnp.tril(jnp.ones((length, length), dtype=bool))
    return jnp.broadcast_to(tri, (batch, length, length))


def gather_pages(pool: jax.Array, layer: jax.Array, block_tables: jax.Array) -> jax.Array:
    """Layer ``layer`` of a pool [L, N, page, Hkv, hd] gathered by block tables [B, P] -> [B, P * page, Hkv, hd].

    One gather on the whole pool: slicing the layer out first makes XLA copy all of its pages,
    so a step would cost the pool's capacity instead of the pages in use.
    """
    b, p = block_tables.shape
    _, _, page, hkv, hd = pool.shape
    return pool[layer, block_tables].reshape(b, p * page, hkv, hd)


def masked_attention(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array) -> jax.Array:
    """Plain attention with an explicit mask: the ground truth the fast paths are tested against.

    q [B, T, Hq, hd]; keys/values [B, S, Hkv, hd]; mask [B, T, S] bool -> [B, T, Hq, hd].
    Query heads are grouped onto KV heads (GQA); scores and softmax in fp32.
    """
    b, t, hq, hd = q.shape
    hkv = keys.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys, preferred_element_type=jnp.float32,
                        precision=matmul_precision(q.dtype)) * hd**-0.5
    scores = jnp.where(mask[:, None, None], scores, MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(values.dtype), values, preferred_element_type=jnp.float32,
                     precision=matmul_precision(q.dtype))
    return out.reshape(b, t, hq, hd).astype(q.dtype)


def _prefix_visible(meta: AttentionMetadata, s: int, t: int) -> jax.Array:
    """[B, T, S] bool: which of the S gathered cache positions each new token sees."""
    offset = jnp.arange(s)[None, :] - meta.context_lens[:, None]  # [B, S], < 0 inside the committed prefix
    visible = jnp.broadcast_to((offset < 0)[:, None, :], (offset.shape[0], t, s))
    if meta.tree_mask is None:
        return visible
    m = meta.tree_mask.shape[-1]
    index = jnp.broadcast_to(jnp.clip(offset, 0, m - 1)[:, None, :], visible.shape)
    in_tree = ((offset >= 0) & (offset < m))[:, None, :] & jnp.take_along_axis(meta.tree_mask, index, axis=2)
    return visible | in_tree


def paged_attention(q: jax.Array, new_k: jax.Array, new_v: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                    layer: jax.Array, meta: AttentionMetadata) -> jax.Array:
    """Attention of T new tokens over their committed prefix (paged) and each other (masked).

    q [B, T, Hq, hd]; new_k/new_v [B, T, Hkv, hd]; k_pool/v_pool [L, N, page, Hkv, hd], read at
    layer ``layer`` (int32 scalar).
    Returns [B, T, Hq, hd]. Prefix and new-token scores are computed as two blocks and share one
    softmax, so the gathered prefix is never concatenated (copied) with the new keys.
    """
    b, t, hq, hd = q.shape
    hkv = new_k.shape[2]
    g = hq // hkv
    cached_k = gather_pages(k_pool, layer, meta.block_tables)
    cached_v = gather_pages(v_pool, layer, meta.block_tables)
    s = cached_k.shape[1]
    scale = hd**-0.5

    qg = q.reshape(b, t, hkv, g, hd)
    precision = matmul_precision(q.dtype)
    prefix_scores = jnp.einsum("btkgd,bskd->bkgts", qg, cached_k, preferred_element_type=jnp.float32,
                               precision=precision) * scale
    new_scores = jnp.einsum("btkgd,bskd->bkgts", qg, new_k, preferred_element_type=jnp.float32,
                            precision=precision) * scale
    prefix_scores = jnp.where(_prefix_visible(meta, s, t)[:, None, None], prefix_scores, MASKED_SCORE)
    new_scores = jnp.where(meta.new_mask[:, None, None], new_scores, MASKED_SCORE)

    probs = jax.nn.softmax(jnp.concatenate([prefix_scores, new_scores], axis=-1), axis=-1)
    prefix_probs, new_probs = probs[..., :s], probs[..., s:]
    out = jnp.einsum("bkgts,bskd->btkgd", prefix_probs.astype(cached_v.dtype), cached_v,
                     preferred_element_type=jnp.float32, precision=precision)
    out = out + jnp.einsum("bkgts,bskd->btkgd", new_probs.astype(new_v.dtype), new_v,
                           preferred_element_type=jnp.float32, precision=precision)
    return out.reshape(b, t, hq, hd).astype(q.dtype)
