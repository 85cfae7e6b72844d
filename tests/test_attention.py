"""The paged, mask-driven attention against attending each query to its allowed keys one at a time."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax.attention import AttentionMetadata, blocked_paged_attention, paged_attention

# The blocked form with blocks of two 4-token pages, so the prefixes below span several blocks.
BLOCKED = functools.partial(blocked_paged_attention, block_tokens=8)


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


def _check_against_per_query(got, q, new_k, new_v, pages_k, pages_v, block_tables, context_lens, new_mask):
    """Each query that sees something equals float64 attention over its prefix and the new tokens
    its mask row allows; a query that sees nothing (a padding row) got zeros."""
    b, t, hq, hd = q.shape
    hkv = new_k.shape[2]
    for i in range(b):
        prefix_k = pages_k[block_tables[i]].reshape(-1, hkv, hd)[: context_lens[i]]
        prefix_v = pages_v[block_tables[i]].reshape(-1, hkv, hd)[: context_lens[i]]
        for j in range(t):
            visible = new_mask[i, j]
            if context_lens[i] == 0 and not visible.any():
                np.testing.assert_array_equal(got[i, j], 0)
                continue
            for h in range(hq):
                kv = h // (hq // hkv)
                keys = np.concatenate([prefix_k[:, kv], new_k[i, visible, kv]]).astype(np.float64)
                values = np.concatenate([prefix_v[:, kv], new_v[i, visible, kv]]).astype(np.float64)
                expected = _one_query_at_a_time(q[i, j, h].astype(np.float64), keys, values)
                np.testing.assert_allclose(got[i, j, h], expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("implementation", [paged_attention, BLOCKED], ids=["reference", "blocked"])
def test_tree_mask_equals_per_query_attention(implementation):
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
    got = np.asarray(jax.jit(implementation)(q, new_k, new_v, k_pool, v_pool, jnp.int32(layer), meta))

    _check_against_per_query(got, q, new_k, new_v, k_pages, v_pages, block_tables, context_lens, new_mask)


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


@pytest.mark.parametrize("seed", range(3))
def test_blocked_attention_equals_per_query_attention_on_fresh_prompt_chunks(seed):
    """Causal chunks after prefixes of random lengths (empty, inside a block, past several), rows
    of different lengths in one batch, a padded tail of queries that see nothing; checked in
    float64 for every query that sees something."""
    rng = np.random.default_rng(100 + seed)
    b, t, hq, hkv, hd, page, n_pages, max_pages = 3, 20, 6, 2, 16, 4, 40, 12
    context_lens = rng.integers(0, max_pages * page + 1, b)
    context_lens[0] = 0
    real = rng.integers(1, t + 1, b)  # rows' new tokens; the rest of each row is padding
    block_tables = np.stack([rng.permutation(n_pages)[:max_pages] for _ in range(b)]).astype(np.int32)
    k_pool = rng.standard_normal((2, n_pages, page, hkv, hd)).astype(np.float32)
    v_pool = rng.standard_normal((2, n_pages, page, hkv, hd)).astype(np.float32)
    q = rng.standard_normal((b, t, hq, hd)).astype(np.float32)
    new_k = rng.standard_normal((b, t, hkv, hd)).astype(np.float32)
    new_v = rng.standard_normal((b, t, hkv, hd)).astype(np.float32)
    causal = np.tril(np.ones((t, t), bool))
    new_mask = np.stack([causal & (np.arange(t) < n)[:, None] & (np.arange(t) < n)[None, :] for n in real])
    meta = AttentionMetadata(block_tables=jnp.asarray(block_tables), context_lens=jnp.asarray(context_lens, jnp.int32),
                             new_mask=jnp.asarray(new_mask))
    block_tokens = int(rng.choice([4, 8, 16, 64]))
    got = np.asarray(jax.jit(functools.partial(blocked_paged_attention, block_tokens=block_tokens))(
        q, new_k, new_v, k_pool, v_pool, jnp.int32(1), meta))
    _check_against_per_query(got, q, new_k, new_v, k_pool[1], v_pool[1], block_tables, context_lens, new_mask)


def test_blocked_attention_takes_no_cached_tree_nodes():
    meta = AttentionMetadata(block_tables=jnp.zeros((1, 1), jnp.int32), context_lens=jnp.zeros(1, jnp.int32),
                             new_mask=jnp.ones((1, 1, 1), bool), tree_mask=jnp.ones((1, 1, 1), bool))
    x = jnp.zeros((1, 1, 1, 8))
    with pytest.raises(ValueError, match="tree_mask must be None"):
        blocked_paged_attention(x, x, x, jnp.zeros((1, 1, 4, 1, 8)), jnp.zeros((1, 1, 4, 1, 8)), jnp.int32(0), meta)
