"""Known-good Pallas candidate for ``rmsnorm_rope``: one program per block of token rows, all heads."""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

TASK = "rmsnorm_rope"


def _kernel(x_ref, w_ref, cos_ref, sin_ref, o_ref, *, eps: float):
    x = x_ref[...].astype(jnp.float32)  # [rows, H, hd]
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w_ref[...].astype(jnp.float32)
    half = x.shape[-1] // 2
    c, s = cos_ref[...][:, None, :], sin_ref[...][:, None, :]
    y1, y2 = y[..., :half], y[..., half:]
    o_ref[...] = jnp.concatenate([y1 * c - y2 * s, y2 * c + y1 * s], axis=-1).astype(o_ref.dtype)


def kernel(x, weight, cos, sin, *, eps):
    b, t, h, hd = x.shape
    rows = b * t
    block = 8 if rows % 8 == 0 else rows
    return pl.pallas_call(
        functools.partial(_kernel, eps=eps),
        grid=(rows // block,),
        in_specs=[pl.BlockSpec((block, h, hd), lambda i: (i, 0, 0)), pl.BlockSpec((hd,), lambda i: (0,)),
                  pl.BlockSpec((block, hd // 2), lambda i: (i, 0)), pl.BlockSpec((block, hd // 2), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((block, h, hd), lambda i: (i, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((rows, h, hd), x.dtype),
        interpret=jax.default_backend() != "gpu",
    )(x.reshape(rows, h, hd), weight, cos.reshape(rows, -1), sin.reshape(rows, -1)).reshape(b, t, h, hd)
