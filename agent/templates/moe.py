"""Mixture-of-experts kernels.

* moe_grouped_matmul: a (``block_m`` row tiles, ``block_n`` column tiles) grid over the expert-sorted
  rows; each program finds from the group ends which experts own rows of its tile (usually one, two at
  a boundary) and accumulates only those, ``block_k`` at a time, with the other experts' rows masked.
* moe_topk_router: one pass per ``block_m`` tokens: softmax, then k rounds of max and first-index-of-max
  (lax.top_k's order, ties to the lower id), renormalised in registers.
* moe_unpermute: a gather instead of XLA's scatter: the inverse of ``order`` names, for each token and
  slot, the row holding its expert output; a program reads its ``block_m`` tokens' k rows for one
  ``block_d`` column slice and writes their router-weighted sum once.
* moe_fused_layer: the three composed: the router kernel, XLA's stable sort of the expert ids, the
  grouped gate/up matmul with SwiGLU applied to each tile before it is stored (the [M k, 2F]
  gate/up activations never reach HBM), the grouped down matmul, and the gathering unpermute.
"""

from agent.templates.snippets import IMPORTS, PAD, PARAMS, POW2

_HEADER = '''"""${task}: ${knobs}."""
''' + IMPORTS + '''
TASK = "${task}"
'''
_HELPERS = PARAMS + PAD + POW2

_GROUPED = '''

def _grouped_tile(ends_ref, x_ref, w_ref, *, experts: int, block_k: int):
    """This program's [bm, bn] fp32 tile of the grouped product, for w_ref's columns."""
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

    return jax.lax.fori_loop(lo, hi + 1, expert, jnp.zeros((bm, w_ref.shape[2]), jnp.float32))


def _grouped_kernel(ends_ref, x_ref, w_ref, o_ref, *, experts: int, block_k: int):
    o_ref[...] = _grouped_tile(ends_ref, x_ref, w_ref, experts=experts, block_k=block_k).astype(o_ref.dtype)


def _group_ends(group_sizes, m):
    """Cumulative group ends, padded to a power of two with the row count: the padding experts own no rows."""
    return _pad(jnp.cumsum(group_sizes).astype(jnp.int32) - m, 0, _pow2(group_sizes.shape[0])) + m


def _grouped_matmul(lhs, rhs, group_sizes, block_m, block_n, block_k):
    m, k = lhs.shape
    experts, _, n = rhs.shape
    bk, bn = min(block_k, _pow2(k)), min(block_n, _pow2(n))
    x = _pad(_pad(lhs, 0, block_m), 1, bk)
    w = _pad(_pad(rhs, 1, bk), 2, bn)
    ends = _group_ends(group_sizes, m)
    out = pl.pallas_call(
        functools.partial(_grouped_kernel, experts=experts, block_k=bk),
        grid=(x.shape[0] // block_m, w.shape[2] // bn),
        in_specs=[pl.BlockSpec((ends.shape[0],), lambda i, j: (0,)),
                  pl.BlockSpec((block_m, x.shape[1]), lambda i, j: (i, 0)),
                  pl.BlockSpec((experts, x.shape[1], bn), lambda i, j: (0, 0, j))],
        out_specs=pl.BlockSpec((block_m, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((x.shape[0], w.shape[2]), lhs.dtype),
        compiler_params=PARAMS, interpret=INTERPRET,
    )(ends, x, w)
    return out[:m, :n]
'''

_ROUTER = '''

def _route_kernel(logits_ref, w_ref, id_ref, *, top_k: int, renormalize: bool):
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


def _route(logits, top_k, renormalize, block_m):
    m, experts = logits.shape
    x = _pad(logits, 0, block_m)
    weights, ids = pl.pallas_call(
        functools.partial(_route_kernel, top_k=top_k, renormalize=renormalize),
        grid=(x.shape[0] // block_m,),
        in_specs=[pl.BlockSpec((block_m, experts), lambda i: (i, 0))],
        out_specs=[pl.BlockSpec((top_k, block_m), lambda i: (0, i))] * 2,
        out_shape=[jax.ShapeDtypeStruct((top_k, x.shape[0]), jnp.float32),
                   jax.ShapeDtypeStruct((top_k, x.shape[0]), jnp.int32)],
        compiler_params=PARAMS, interpret=INTERPRET,
    )(x)
    return weights[:, :m].T, ids[:, :m].T
'''

_UNPERMUTE = '''

def _gather_sum(src_ref, w_ref, y_ref, o_ref, *, top_k: int):
    def token(t, carry):
        acc = jnp.zeros((1, o_ref.shape[1]), jnp.float32)
        for j in range(top_k):
            row = y_ref[pl.ds(src_ref[t, j], 1), :].astype(jnp.float32)
            acc += w_ref[t, j] * row
        o_ref[pl.ds(t, 1), :] = acc.astype(o_ref.dtype)
        return carry

    jax.lax.fori_loop(0, o_ref.shape[0], token, 0)


def _unpermute(y_sorted, order, weights, block_m, block_d):
    m, k = weights.shape
    d = y_sorted.shape[1]
    # source[t, j]: the row of y_sorted holding token t's slot-j output (order's inverse).
    source = jnp.zeros(m * k, jnp.int32).at[order].set(jnp.arange(m * k, dtype=jnp.int32)).reshape(m, k)
    bd = min(block_d, _pow2(d))
    y = _pad(y_sorted, 1, bd)
    # Padded tokens read row 0 with weight 0.
    source, w = _pad(source, 0, block_m), _pad(weights.astype(jnp.float32), 0, block_m)
    out = pl.pallas_call(
        functools.partial(_gather_sum, top_k=k),
        grid=(source.shape[0] // block_m, y.shape[1] // bd),
        in_specs=[pl.BlockSpec((block_m, k), lambda i, j: (i, 0)), pl.BlockSpec((block_m, k), lambda i, j: (i, 0)),
                  pl.BlockSpec((m * k, bd), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((block_m, bd), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((source.shape[0], y.shape[1]), y_sorted.dtype),
        compiler_params=PARAMS, interpret=INTERPRET,
    )(source, w, y)
    return out[:m, :d]
'''

GROUPED = _HEADER + '''BLOCK_M, BLOCK_N, BLOCK_K = ${block_m}, ${block_n}, ${block_k}
''' + _HELPERS + _GROUPED + '''

def kernel(lhs, rhs, group_sizes):
    return _grouped_matmul(lhs, rhs, group_sizes, BLOCK_M, BLOCK_N, BLOCK_K)
'''

ROUTER = _HEADER + '''BLOCK_M = ${block_m}
''' + _HELPERS + _ROUTER + '''

def kernel(logits, *, top_k, renormalize):
    return _route(logits, top_k, renormalize, BLOCK_M)
'''

UNPERMUTE = _HEADER + '''BLOCK_M, BLOCK_D = ${block_m}, ${block_d}
''' + _HELPERS + _UNPERMUTE + '''

def kernel(y_sorted, order, weights):
    return _unpermute(y_sorted, order, weights, BLOCK_M, BLOCK_D)
'''

FUSED = _HEADER + '''BLOCK_M, BLOCK_N, BLOCK_K = ${block_m}, ${block_n}, ${block_k}
# The router and the unpermute move little data: their tiles are not searched.
ROUTE_BLOCK_M, GATHER_BLOCK_M, GATHER_BLOCK_D = 64, 16, 512
''' + _HELPERS + _GROUPED + _ROUTER + _UNPERMUTE + '''

def _swiglu_kernel(ends_ref, x_ref, wg_ref, wu_ref, o_ref, *, experts: int, block_k: int):
    # The reference rounds gate and up to x's dtype before SwiGLU; so does this.
    gate, up = (_grouped_tile(ends_ref, x_ref, w, experts=experts, block_k=block_k).astype(x_ref.dtype)
                .astype(jnp.float32) for w in (wg_ref, wu_ref))
    o_ref[...] = (jax.nn.silu(gate) * up).astype(o_ref.dtype)


def _grouped_swiglu(xs, w_gate_up, group_sizes):
    m, d = xs.shape
    experts, _, f2 = w_gate_up.shape
    f = f2 // 2
    bk = min(BLOCK_K, _pow2(d))
    # Gate column j and up column f + j meet in one program, so a tile must divide F: at most the
    # largest power of two that divides F (f & -f).
    bn = min(BLOCK_N, f & -f)
    x = _pad(_pad(xs, 0, BLOCK_M), 1, bk)
    w = _pad(w_gate_up, 1, bk)
    w_spec = lambda shift: pl.BlockSpec((experts, x.shape[1], bn), lambda i, j: (0, 0, j + shift))
    out = pl.pallas_call(
        functools.partial(_swiglu_kernel, experts=experts, block_k=bk),
        grid=(x.shape[0] // BLOCK_M, f // bn),
        in_specs=[pl.BlockSpec((_pow2(experts),), lambda i, j: (0,)),
                  pl.BlockSpec((BLOCK_M, x.shape[1]), lambda i, j: (i, 0)), w_spec(0), w_spec(f // bn)],
        out_specs=pl.BlockSpec((BLOCK_M, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((x.shape[0], f), xs.dtype),
        compiler_params=PARAMS, interpret=INTERPRET,
    )(_group_ends(group_sizes, m), x, w, w)
    return out[:m]


def kernel(x, w_gate_up, w_down, gating_output, *, top_k, renormalize):
    experts = w_gate_up.shape[0]
    weights, ids = _route(gating_output, top_k, renormalize, ROUTE_BLOCK_M)
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    sizes = jnp.zeros(experts, jnp.int32).at[flat].add(1)
    h = _grouped_swiglu(x[order // top_k], w_gate_up, sizes)
    y = _grouped_matmul(h, w_down, sizes, BLOCK_M, BLOCK_N, BLOCK_K)
    return _unpermute(y, order, weights, GATHER_BLOCK_M, GATHER_BLOCK_D)
'''

_MATMUL_SPACE = {"block_m": (64, 32, 128), "block_n": (128, 64, 256), "block_k": (64, 32, 128), "num_warps": (4, 8),
                 "num_stages": (3, 2, 4)}
SPACES = {
    "moe_grouped_matmul": _MATMUL_SPACE,
    "moe_topk_router": {"block_m": (64, 16, 32, 128, 256), "num_warps": (4, 2, 8), "num_stages": (1,)},
    "moe_unpermute": {"block_m": (16, 8, 32), "block_d": (512, 128, 256, 1024), "num_warps": (4, 2, 8),
                      "num_stages": (1,)},
    "moe_fused_layer": _MATMUL_SPACE,
}
SOURCES = {task: source.replace("${task}", task).replace("${knobs}", ", ".join(f"{k}=${{{k}}}" for k in SPACES[task]))
           for task, source in (("moe_grouped_matmul", GROUPED), ("moe_topk_router", ROUTER),
                                ("moe_unpermute", UNPERMUTE), ("moe_fused_layer", FUSED))}
