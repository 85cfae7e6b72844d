"""Mixture-of-experts kernels.

* moe_grouped_matmul: a (``block_m`` row tiles, ``block_n`` column tiles) grid over the expert-sorted
  rows; each program finds from the group ends which experts own rows of its tile (usually one, two at
  a boundary) and accumulates only those, ``block_k`` at a time, with the other experts' rows masked.
* moe_topk_router: one pass per ``block_m`` tokens: softmax, then k rounds of max and first-index-of-max
  (lax.top_k's order, ties to the lower id), renormalised in registers.
* moe_unpermute: a gather instead of XLA's scatter: the inverse of ``order`` names, for each token and
  slot, the row holding its expert output; a program reads its ``block_m`` tokens' k rows for one
  ``block_d`` column slice and writes their router-weighted sum once.
"""

from agent.templates.snippets import IMPORTS, PAD, PARAMS, POW2

GROUPED = '''"""moe_grouped_matmul: block_m=${block_m}, block_n=${block_n}, block_k=${block_k}, num_warps=${num_warps},
num_stages=${num_stages}."""
''' + IMPORTS + '''
TASK = "moe_grouped_matmul"
BLOCK_M, BLOCK_N, BLOCK_K = ${block_m}, ${block_n}, ${block_k}
''' + PARAMS + PAD + POW2 + '''

def _grouped(ends_ref, x_ref, w_ref, o_ref, *, experts: int, block_k: int):
    bm = x_ref.shape[0]
    first = pl.program_id(0) * bm
    ends = ends_ref[...]
    group = jnp.sum((first + jnp.arange(bm))[:, None] >= ends[None, :], axis=1)  # each row's expert
    lo = jnp.sum(first >= ends)
    hi = jnp.minimum(jnp.sum(first + bm - 1 >= ends), experts - 1)

    def expert(e, acc):
        mine = (group == e)[:, None]

        def add_slice(i, acc):
            ks = pl.ds(i * block_k, block_k)
            x = jnp.where(mine, x_ref[:, ks], 0)
            return acc + jnp.dot(x, w_ref[e, ks, :], preferred_element_type=jnp.float32)

        return jax.lax.fori_loop(0, x_ref.shape[1] // block_k, add_slice, acc)

    acc = jax.lax.fori_loop(lo, hi + 1, expert, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def kernel(lhs, rhs, group_sizes):
    m, k = lhs.shape
    experts, _, n = rhs.shape
    bk, bn = min(BLOCK_K, _pow2(k)), min(BLOCK_N, _pow2(n))
    x = _pad(_pad(lhs, 0, BLOCK_M), 1, bk)
    w = _pad(_pad(rhs, 1, bk), 2, bn)
    # Group ends padded to a power of two with the row count: the padding experts own no rows.
    ends = _pad(jnp.cumsum(group_sizes).astype(jnp.int32) - m, 0, _pow2(experts)) + m
    out = pl.pallas_call(
        functools.partial(_grouped, experts=experts, block_k=bk),
        grid=(x.shape[0] // BLOCK_M, w.shape[2] // bn),
        in_specs=[pl.BlockSpec((ends.shape[0],), lambda i, j: (0,)),
                  pl.BlockSpec((BLOCK_M, x.shape[1]), lambda i, j: (i, 0)),
                  pl.BlockSpec((experts, x.shape[1], bn), lambda i, j: (0, 0, j))],
        out_specs=pl.BlockSpec((BLOCK_M, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((x.shape[0], w.shape[2]), lhs.dtype),
        compiler_params=PARAMS, interpret=INTERPRET,
    )(ends, x, w)
    return out[:m, :n]
'''

ROUTER = '''"""moe_topk_router: block_m=${block_m}, num_warps=${num_warps}, num_stages=${num_stages}."""
''' + IMPORTS + '''
TASK = "moe_topk_router"
BLOCK_M = ${block_m}
''' + PARAMS + PAD + '''

def _route(logits_ref, w_ref, id_ref, *, top_k: int, renormalize: bool):
    x = logits_ref[...].astype(jnp.float32)  # [bm, E]
    p = jnp.exp(x - jnp.max(x, axis=1, keepdims=True))
    p = p / jnp.sum(p, axis=1, keepdims=True)
    column = jax.lax.broadcasted_iota(jnp.int32, p.shape, 1)
    weights, ids = [], []
    for _ in range(top_k):
        best = jnp.max(p, axis=1)
        pick = jnp.min(jnp.where(p == best[:, None], column, p.shape[1]), axis=1)
        weights.append(best)
        ids.append(pick)
        p = jnp.where(column == pick[:, None], -1.0, p)  # probabilities are >= 0: never picked again
    total = sum(weights) if renormalize else 1.0
    # Outputs are [k, M] so each slot is one contiguous row store.
    for j in range(top_k):
        w_ref[j, :] = weights[j] / total
        id_ref[j, :] = ids[j]


def kernel(logits, *, top_k, renormalize):
    m, experts = logits.shape
    x = _pad(logits, 0, BLOCK_M)
    weights, ids = pl.pallas_call(
        functools.partial(_route, top_k=top_k, renormalize=renormalize),
        grid=(x.shape[0] // BLOCK_M,),
        in_specs=[pl.BlockSpec((BLOCK_M, experts), lambda i: (i, 0))],
        out_specs=[pl.BlockSpec((top_k, BLOCK_M), lambda i: (0, i))] * 2,
        out_shape=[jax.ShapeDtypeStruct((top_k, x.shape[0]), jnp.float32),
                   jax.ShapeDtypeStruct((top_k, x.shape[0]), jnp.int32)],
        compiler_params=PARAMS, interpret=INTERPRET,
    )(x)
    return weights[:, :m].T, ids[:, :m].T
'''

UNPERMUTE = '''"""moe_unpermute: block_m=${block_m}, block_d=${block_d}, num_warps=${num_warps}, num_stages=${num_stages}."""
''' + IMPORTS + '''
TASK = "moe_unpermute"
BLOCK_M, BLOCK_D = ${block_m}, ${block_d}
''' + PARAMS + PAD + POW2 + '''

def _gather_sum(src_ref, w_ref, y_ref, o_ref, *, top_k: int):
    def token(t, carry):
        acc = jnp.zeros((1, o_ref.shape[1]), jnp.float32)
        for j in range(top_k):
            row = y_ref[pl.ds(src_ref[t, j], 1), :].astype(jnp.float32)
            acc += w_ref[t, j] * row
        o_ref[pl.ds(t, 1), :] = acc.astype(o_ref.dtype)
        return carry

    jax.lax.fori_loop(0, o_ref.shape[0], token, 0)


def kernel(y_sorted, order, weights):
    m, k = weights.shape
    d = y_sorted.shape[1]
    # source[t, j]: the row of y_sorted holding token t's slot-j output (order's inverse).
    source = jnp.zeros(m * k, jnp.int32).at[order].set(jnp.arange(m * k, dtype=jnp.int32)).reshape(m, k)
    bd = min(BLOCK_D, _pow2(d))
    y = _pad(y_sorted, 1, bd)
    # Padded tokens read row 0 with weight 0.
    source, w = _pad(source, 0, BLOCK_M), _pad(weights.astype(jnp.float32), 0, BLOCK_M)
    out = pl.pallas_call(
        functools.partial(_gather_sum, top_k=k),
        grid=(source.shape[0] // BLOCK_M, y.shape[1] // bd),
        in_specs=[pl.BlockSpec((BLOCK_M, k), lambda i, j: (i, 0)), pl.BlockSpec((BLOCK_M, k), lambda i, j: (i, 0)),
                  pl.BlockSpec((m * k, bd), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((BLOCK_M, bd), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((source.shape[0], y.shape[1]), y_sorted.dtype),
        compiler_params=PARAMS, interpret=INTERPRET,
    )(source, w, y)
    return out[:m, :d]
'''

# Each task's knobs: a template's space is shared by its sources, so tasks with different knobs get their own.
SPACES = {
    "moe_grouped_matmul": {"block_m": (64, 32, 128), "block_n": (128, 64, 256), "block_k": (64, 32, 128),
                           "num_warps": (4, 8), "num_stages": (3, 2, 4)},
    "moe_topk_router": {"block_m": (64, 16, 32, 128, 256), "num_warps": (4, 2, 8), "num_stages": (1,)},
    "moe_unpermute": {"block_m": (16, 8, 32), "block_d": (512, 128, 256, 1024), "num_warps": (4, 2, 8),
                      "num_stages": (1,)},
}
SOURCES = {"moe_grouped_matmul": GROUPED, "moe_topk_router": ROUTER, "moe_unpermute": UNPERMUTE}
