"""Known-good Pallas candidate for ``int8_weight_only_matmul``: a K loop per output tile, one quantisation
group per step, so each int8 tile is dequantised in registers right before its dot."""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

TASK = "int8_weight_only_matmul"


def _kernel(x_ref, w_ref, s_ref, o_ref, *, group_size: int):
    groups = w_ref.shape[0] // group_size

    def step(g, acc):
        rows = pl.ds(g * group_size, group_size)
        w = w_ref[rows, :].astype(jnp.float32) * s_ref[pl.ds(g, 1), :].astype(jnp.float32)
        return acc + jnp.dot(x_ref[:, rows].astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)

    acc = jax.lax.fori_loop(0, groups, step, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def kernel(x, w_q, scales, *, group_size):
    m, k = x.shape
    n = w_q.shape[1]
    block_n = 128 if n % 128 == 0 else n
    return pl.pallas_call(
        functools.partial(_kernel, group_size=group_size),
        grid=(n // block_n,),
        in_specs=[pl.BlockSpec((m, k), lambda j: (0, 0)), pl.BlockSpec((k, block_n), lambda j: (0, j)),
                  pl.BlockSpec((k // group_size, block_n), lambda j: (0, j))],
        out_specs=pl.BlockSpec((m, block_n), lambda j: (0, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        interpret=jax.default_backend() != "gpu",
    )(x, w_q, scales)
