"""The one projection entry point, and the weight types it dispatches on.

Every matrix product of the decoder goes through ``linear(x, w)``. A weight is a plain array
``[in, out]`` or one of the types registered here; a new kind of weight (LoRA-adapted,
quantised) is a new pytree type with its own ``linear`` implementation, not an edit to the layer
body. Weight types are pytrees, so stacked layers slice them under ``lax.scan`` like arrays.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from specjax.config import matmul_precision
from specjax.pytree import pytree_dataclass


@pytree_dataclass
class Bf16Bits:
    """A bfloat16 matrix stored as its raw bits (uint16), widened to fp32 where it is used.

    For CPUs, where a batch-1 step is bound by reading weights but XLA's bf16 matmuls are slow:
    half the weight bytes, fp32 arithmetic. Stored as integers because XLA hoists a plain
    bf16->f32 convert out of the layer loop and re-materialises every fp32 weight each step.
    """

    bits: jax.Array

    @classmethod
    def pack(cls, w: jax.Array) -> "Bf16Bits":
        return cls(jax.lax.bitcast_convert_type(w.astype(jnp.bfloat16), jnp.uint16))

    def widen(self) -> jax.Array:
        """float32 (exact): the bits are the high half of the fp32 word."""
        return jax.lax.bitcast_convert_type(self.bits.astype(jnp.uint32) << 16, jnp.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.bits.shape

    @property
    def dtype(self):
        return jnp.dtype(jnp.bfloat16)  # what it holds, whatever it is stored as


def _dense(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum("...d,df->...f", x, w, preferred_element_type=jnp.float32,
                      precision=matmul_precision(x.dtype)).astype(x.dtype)


def linear(x: jax.Array, w) -> jax.Array:
    """x [..., in] @ w [in, out] -> [..., out] in x's dtype, accumulated in fp32, for any weight
    type (``project.register`` adds one)."""
    return project(w, x)


@functools.singledispatch
def project(w, x: jax.Array) -> jax.Array:
    """``linear`` by the weight's type; a plain array here."""
    return _dense(x, w)


@project.register
def _(w: Bf16Bits, x: jax.Array) -> jax.Array:
    return _dense(x, w.widen())
