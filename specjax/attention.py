"""The attention entry point: the Pallas tree-attention kernel or the pure-JAX reference, behind
one signature.

The metadata, masks and reference live in ``specjax.attention_reference`` (which the kernel
imports too); they are re-exported here, where the rest of specjax imports them from.
"""

from __future__ import annotations

import jax

from pallas_kernels import backend as kernel_backend
from pallas_kernels import tree_attention
from specjax.attention_reference import AttentionMetadata, causal_mask, masked_attention, paged_attention

__all__ = ["AttentionMetadata", "attention", "causal_mask", "masked_attention", "paged_attention"]


def attention(q: jax.Array, new_k: jax.Array, new_v: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
              layer: jax.Array, meta: AttentionMetadata, backend: str | None = None) -> jax.Array:
    """``paged_attention`` on the backend ``pallas_kernels.backend.use_pallas`` picks.

    backend: "auto" (the Pallas kernel on NVIDIA GPUs when it supports the call, XLA otherwise),
    "pallas" (forced; interpreted off GPUs; errors on calls past the kernel's limits) or "xla";
    None reads ``$SPECJAX_ATTENTION`` (default "auto"). Decided at trace time.
    """
    supported = tree_attention.unsupported_reason(q, k_pool, meta) is None
    if kernel_backend.use_pallas(backend, supported):
        return tree_attention.tree_attention(q, new_k, new_v, k_pool, v_pool, layer, meta)
    return paged_attention(q, new_k, new_v, k_pool, v_pool, layer, meta)
