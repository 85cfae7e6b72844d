"""Known-good Pallas candidate for ``moe_grouped_matmul``: a program per tile of rows; it loops over only
the experts whose rows fall in its tile (from the group offsets), masking the rows of the others."""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

TASK = "moe_grouped_matmul"


def _kernel(ends_ref, x_ref, w_ref, o_ref):
    block = x_ref.shape[0]
    first_row = pl.program_id(0) * block
    rows = first_row + jnp.arange(block)
    ends = ends_ref[...]
    group = jnp.sum(rows[:, None] >= ends[None, :], axis=1)  # each row's expert
    lo = jnp.sum(first_row >= ends)
    hi = jnp.minimum(jnp.sum(first_row + block - 1 >= ends), ends.shape[0] - 1)

    def expert(e, acc):
        x = jnp.where((group == e)[:, None], x_ref[...], 0).astype(jnp.float32)
        return acc + jnp.dot(x, w_ref[e].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)

    acc = jax.lax.fori_loop(lo, hi + 1, expert, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def kernel(lhs, rhs, group_sizes):
    m, k = lhs.shape
    e, _, n = rhs.shape
    block = 8
    padded = pl.cdiv(m, block) * block
    out = pl.pallas_call(
        _kernel,
        grid=(padded // block,),
        in_specs=[pl.BlockSpec((e,), lambda i: (0,)), pl.BlockSpec((block, k), lambda i: (i, 0)),
                  pl.BlockSpec((e, k, n), lambda i: (0, 0, 0))],
        out_specs=pl.BlockSpec((block, n), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((padded, n), lhs.dtype),
        interpret=jax.default_backend() != "gpu",
    )(jnp.cumsum(group_sizes).astype(jnp.int32), jnp.pad(lhs, ((0, padded - m), (0, 0))), rhs)
    return out[:m]
