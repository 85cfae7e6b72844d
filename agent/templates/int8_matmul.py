"""int8 weight-only matmul: a 2-D grid of (block_m, block_n) output tiles, each walking K one quantisation
group at a time so a weight tile is dequantised just before its dot."""

SPACE = {"block_m": (16, 64), "block_n": (8, 32, 128), "num_warps": (4, 8), "num_stages": (2, 3)}

SOURCE = '''"""int8_weight_only_matmul: block_m=${block_m}, block_n=${block_n}, num_warps=${num_warps},
num_stages=${num_stages}."""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

TASK = "int8_weight_only_matmul"
BLOCK_M = ${block_m}
BLOCK_N = ${block_n}


def _dequant_matmul(x_ref, w_ref, s_ref, o_ref, *, group_size: int):
    def add_group(g, acc):
        ks = pl.ds(g * group_size, group_size)
        tile = w_ref[ks, :].astype(jnp.float32) * s_ref[pl.ds(g, 1), :].astype(jnp.float32)
        x = x_ref[:, ks].astype(jnp.float32)
        return acc + jnp.dot(x, tile, precision=jax.lax.Precision.HIGHEST)

    groups = w_ref.shape[0] // group_size
    o_ref[...] = jax.lax.fori_loop(0, groups, add_group, jnp.zeros(o_ref.shape, jnp.float32)).astype(o_ref.dtype)


def kernel(x, w_q, scales, *, group_size):
    m, k = x.shape
    n = w_q.shape[1]
    # Sizes a block does not divide fall back to the whole dimension: still correct, just untuned.
    bm = BLOCK_M if m % BLOCK_M == 0 else m
    bn = BLOCK_N if n % BLOCK_N == 0 else n
    return pl.pallas_call(
        functools.partial(_dequant_matmul, group_size=group_size),
        grid=(m // bm, n // bn),
        in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)), pl.BlockSpec((k, bn), lambda i, j: (0, j)),
                  pl.BlockSpec((k // group_size, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=${num_warps}, num_stages=${num_stages}),
        interpret=jax.default_backend() != "gpu",
    )(x, w_q, scales)
'''
