"""The paged, mask-driven attention against attending each query to its allowed keys one at a time."""

import jax
import jax.numpy as jnp
import numpy as np

from specjax.attention import AttentionMetadata, paged_attention


def _random_tree_mask(rng, n):
    """Ancestor-or-self visibility of a random tree over n nodes (node 0 is the root)."""
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, n)]
    mask = np.zeros((n, n), bool)
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return mask


def _one_query_at_a_time(q, keys, values):
    """softmax(q k^T / sqrt(d)) v for one query head over the keys it may see, in float64."""
    scores = keys @ q / np.sqrt(q.shape[-1])
    p = np.exp(scores - scores.max())
    return (p / p.sum()) @ values


def test_tree_mask_equals_per_query_attention():
    rng = np.random.default_rng(0)
    b, t, hq, hkv, hd, page, n_pages = 3, 12, 6, 2, 16, 4, 20
    context_lens = np.array([9, 0, 14])
    block_tables = np.stack([rng.permutation(n_pages)[:4] for _ in range(b)]).astype(np.int32)
    k_pages = rng.standard_normal((n_pages, page, hkv, hd)).astype(np.float32)
    v_pages = rng.standard_normal((n_pages, page, hkv, hd)).astype(np.float32)
    q = rng.standard_normal((b, t, hq, hd)).astype(np.float32)
    new_k = rng.standard_normal((b, t, hkv, hd)).astype(np.float32)
    new_v = rng.standard_normal((b, t, hkv, hd)).astype(np.float32)
    new_mask = np.stack([_random_tree_mask(rng, t) for _ in range(b)])

    meta = AttentionMetadata(block_tables=jnp.asarray(block_tables), context_lens=jnp.asarray(context_lens, jnp.int32),
                             new_mask=jnp.asarray(new_mask))
    layer = 1  # the pools hold two layers; the other one is noise that must not be read
    k_pool = np.stack([rng.standard_normal(k_pages.shape).astype(np.float32), k_pages])
    v_pool = np.stack([rng.standard_normal(v_pages.shape).astype(np.float32), v_pages])
    got = np.asarray(jax.jit(paged_attention)(q, new_k, new_v, k_pool, v_pool, jnp.int32(layer), meta))

    for i in range(b):
        prefix_k = k_pages[block_tables[i]].reshape(-1, hkv, hd)[: context_lens[i]]
        prefix_v = v_pages[block_tables[i]].reshape(-1, hkv, hd)[: context_lens[i]]
        for j in range(t):
            visible = new_mask[i, j]
            for h in range(hq):
                kv = h // (hq // hkv)
                keys = np.concatenate([prefix_k[:, kv], new_k[i, visible, kv]]).astype(np.float64)
                values = np.concatenate([prefix_v[:, kv], new_v[i, visible, kv]]).astype(np.float64)
                expected = _one_query_at_a_time(q[i, j, h].astype(np.float64), keys, values)
                np.testing.assert_allclose(got[i, j, h], expected, atol=2e-5, rtol=0)


def test_cached_tree_nodes_are_seen_only_through_the_tree_mask():
    """A draft growing a tree keeps earlier nodes in the cache past the prefix: each new token sees
    the prefix, the cached nodes its ``tree_mask`` row names, and the new tokens ``new_mask`` allows."""
    rng = np.random.default_rng(1)
    b, t, m, hq, hkv, hd, page, n_pages = 2, 3, 5, 4, 2, 8, 4, 12
    context_lens = np.array([6, 3])
    block_tables = np.stack([rng.permutation(n_pages)[:4] for _ in range(b)]).astype(np.int32)
    k_pool = rng.standard_normal((1, n_pages, page, hkv, hd)).astype(np.float32)
    v_pool = rng.standard_normal((1, n_pages, page, hkv, hd)).astype(np.float32)
    q = rng.standard_normal((b, t, hq, hd)).astype(np.float32)
    new_k = rng.standard_normal((b, t, hkv, hd)).astype(np.float32)
    new_v = rng.standard_normal((b, t, hkv, hd)).astype(np.float32)
    new_mask = np.broadcast_to(np.eye(t, dtype=bool), (b, t, t))
    tree_mask = rng.random((b, t, m)) < 0.5
    meta = AttentionMetadata(block_tables=jnp.asarray(block_tables), context_lens=jnp.asarray(context_lens, jnp.int32),
                             new_mask=jnp.asarray(new_mask), tree_mask=jnp.asarray(tree_mask))
    got = np.asarray(jax.jit(paged_attention)(q, new_k, new_v, k_pool, v_pool, jnp.int32(0), meta))

    for i in range(b):
        keys_all = k_pool[0, block_tables[i]].reshape(-1, hkv, hd)
        values_all = v_pool[0, block_tables[i]].reshape(-1, hkv, hd)
        for j in range(t):
            seen = list(range(context_lens[i])) + [context_lens[i] + x for x in np.flatnonzero(tree_mask[i, j])]
            for h in range(hq):
                kv = h // (hq // hkv)
                keys = np.concatenate([keys_all[seen, kv], new_k[i, [j], kv]]).astype(np.float64)
                values = np.concatenate([values_all[seen, kv], new_v[i, [j], kv]]).astype(np.float64)
                expected = _one_query_at_a_time(q[i, j, h].astype(np.float64), keys, values)
                np.testing.assert_allclose(got[i, j, h], expected, atol=2e-5, rtol=0)
