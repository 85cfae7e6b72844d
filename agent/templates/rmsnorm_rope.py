"""RMSNorm + RoPE: a 1-D grid over blocks of ``block_rows`` token rows, every head of a row in one program."""

SPACE = {"block_rows": (1, 2, 4, 8, 16), "num_warps": (4, 8), "num_stages": (1, 2)}

SOURCE = '''"""rmsnorm_rope: block_rows=${block_rows}, num_warps=${num_warps}, num_stages=${num_stages}."""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

TASK = "rmsnorm_rope"
BLOCK_ROWS = ${block_rows}


def _norm_rope(x_ref, w_ref, cos_ref, sin_ref, o_ref, *, eps: float):
    x = x_ref[...].astype(jnp.float32)  # [rows, H, hd]
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    y = x * inv_rms * w_ref[...].astype(jnp.float32)
    lo, hi = jnp.split(y, 2, axis=-1)
    cos = cos_ref[...].astype(jnp.float32)[:, None, :]
    sin = sin_ref[...].astype(jnp.float32)[:, None, :]
    o_ref[...] = jnp.concatenate([lo * cos - hi * sin, hi * cos + lo * sin], axis=-1).astype(o_ref.dtype)


def kernel(x, weight, cos, sin, *, eps):
    batch, seq, heads, head_dim = x.shape
    rows = batch * seq
    # A row count the block does not divide falls back to one block: still correct, just untuned.
    block = BLOCK_ROWS if rows % BLOCK_ROWS == 0 else rows
    rows_spec = pl.BlockSpec((block, heads, head_dim), lambda r: (r, 0, 0))
    angle_spec = pl.BlockSpec((block, head_dim // 2), lambda r: (r, 0))
    call = pl.pallas_call(
        functools.partial(_norm_rope, eps=eps),
        grid=(rows // block,),
        in_specs=[rows_spec, pl.BlockSpec((head_dim,), lambda r: (0,)), angle_spec, angle_spec],
        out_specs=rows_spec,
        out_shape=jax.ShapeDtypeStruct((rows, heads, head_dim), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=${num_warps}, num_stages=${num_stages}),
        interpret=jax.default_backend() != "gpu",
    )
    out = call(x.reshape(rows, heads, head_dim), weight, cos.reshape(rows, -1), sin.reshape(rows, -1))
    return out.reshape(batch, seq, heads, head_dim)
'''
