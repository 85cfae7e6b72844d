"""Mixed-adapter LoRA as two dense passes: every adapter's A stacked side by side, so one shrink matmul
gives each row all adapters' r columns, of which it keeps its own adapter's (the rest zeroed), and one
expand matmul against the stacked B adds them to y. XLA's reference walks the adapters one by one with
masked full-size matmuls; this is two kernels whatever the adapter count, and y is read once.

Grid: shrink (row tiles) with a loop over ``block_d`` slices of D; expand (row tiles, ``block_n`` column
tiles), fused with the scaled add to y.
"""

from agent.templates.snippets import IMPORTS, PAD, PARAMS, POW2

SPACE = {"block_m": (32, 16, 64, 128), "block_n": (128, 64, 256), "block_d": (128, 64, 256),
         "num_warps": (4, 8), "num_stages": (2, 3, 4)}

SOURCES = {"grouped_lora": '''"""grouped_lora: block_m=${block_m}, block_n=${block_n}, block_d=${block_d},
num_warps=${num_warps}, num_stages=${num_stages}."""
''' + IMPORTS + '''
TASK = "grouped_lora"
BLOCK_M, BLOCK_N, BLOCK_D = ${block_m}, ${block_n}, ${block_d}
''' + PARAMS + PAD + POW2 + '''

def _shrink(ids_ref, x_ref, a_ref, s_ref, *, rank: int, block_d: int):
    def add_slice(i, acc):
        cols = pl.ds(i * block_d, block_d)
        return acc + jnp.dot(x_ref[:, cols], a_ref[cols, :], preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, x_ref.shape[1] // block_d, add_slice, jnp.zeros(s_ref.shape, jnp.float32))
    adapter_of_column = jax.lax.broadcasted_iota(jnp.int32, s_ref.shape, 1) // rank
    # Rows without an adapter (id -1) match no column, so they add nothing.
    s_ref[...] = jnp.where(adapter_of_column == ids_ref[...][:, None], acc, 0).astype(s_ref.dtype)


def _expand(y_ref, s_ref, b_ref, o_ref, *, scaling: float):
    delta = jnp.dot(s_ref[...], b_ref[...], preferred_element_type=jnp.float32)
    o_ref[...] = (y_ref[...].astype(jnp.float32) + scaling * delta).astype(o_ref.dtype)


def kernel(y, x, lora_a, lora_b, adapter_ids, *, scaling):
    m, n = y.shape
    adapters, d, rank = lora_a.shape
    # All adapters' columns side by side, padded to a power of two (and Triton's smallest dot, 16).
    width = max(16, _pow2(adapters * rank))
    a_all = _pad(jnp.moveaxis(lora_a, 0, 1).reshape(d, adapters * rank), 1, width)
    b_all = _pad(lora_b.reshape(adapters * rank, n), 0, width)
    bm, bd, bn = BLOCK_M, min(BLOCK_D, _pow2(d)), min(BLOCK_N, _pow2(n))
    xp, ids = _pad(_pad(x, 0, bm), 1, bd), _pad(adapter_ids, 0, bm)
    a_all = _pad(a_all, 0, bd)
    rows = xp.shape[0]
    shrunk = pl.pallas_call(
        functools.partial(_shrink, rank=rank, block_d=bd),
        grid=(rows // bm,),
        in_specs=[pl.BlockSpec((bm,), lambda i: (i,)), pl.BlockSpec((bm, xp.shape[1]), lambda i: (i, 0)),
                  pl.BlockSpec((xp.shape[1], width), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((bm, width), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((rows, width), x.dtype),
        compiler_params=PARAMS, interpret=INTERPRET,
    )(ids, xp, a_all)
    yp = _pad(_pad(y, 0, bm), 1, bn)
    out = pl.pallas_call(
        functools.partial(_expand, scaling=scaling),
        grid=(rows // bm, yp.shape[1] // bn),
        in_specs=[pl.BlockSpec((bm, bn), lambda i, j: (i, j)), pl.BlockSpec((bm, width), lambda i, j: (i, 0)),
                  pl.BlockSpec((width, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct(yp.shape, y.dtype),
        compiler_params=PARAMS, interpret=INTERPRET,
    )(yp, shrunk, _pad(b_all, 1, bn))
    return out[:m, :n]
'''}
SPACES = dict.fromkeys(SOURCES, SPACE)
