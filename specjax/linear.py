"""The one projection entry point, and the weight types it dispatches on.

Every matrix product of the decoder goes through ``linear(x, w)``. A weight is a plain array
``[in, out]`` or one of the types registered here; a new kind of weight (LoRA-adapted,
quantised) is a new pytree type with its own ``linear`` implementation, not an edit to the layer
body. Weight types are pytrees, so stacked layers slice them under ``lax.scan`` like arrays.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

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


class OverBase:
    """A weight type that adds an update to a frozen ``base`` weight (a dataclass field): it has
    the base's shape and dtype, and ``update`` gives its part of ``linear`` beyond the base's."""

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    @property
    def dtype(self):
        return self.base.dtype


@functools.singledispatch
def update(w: OverBase, x: jax.Array) -> jax.Array:
    """``linear(x, w) - linear(x, w.base)``, computed without the base (which ``w`` may have
    left out: a ``SharedBase``'s updates hold None there)."""
    raise TypeError(f"no update rule for weight type {type(w).__name__}")


@project.register
def _(w: OverBase, x: jax.Array) -> jax.Array:
    return project(w.base, x) + update(w, x)


@pytree_dataclass
class SharedBase:
    """One weight as several groups of rows of a joint forward hold it: a ``base`` they share,
    and each group's ``updates`` (an ``OverBase`` weight with its base left out, or None: the
    base alone). ``linear_groups`` reads the base once for every group's rows."""

    base: object
    updates: tuple


def share_base(weights) -> object:
    """Several groups' versions of one weight (each the same base array, or an ``OverBase`` over
    it) as one weight for ``linear_groups``: the base alone if none adds anything."""
    bases = [w.base if isinstance(w, OverBase) else w for w in weights]
    if any(b is not bases[0] for b in bases):
        raise ValueError("a joint forward's row groups must share their base weights")
    if not any(isinstance(w, OverBase) for w in weights):
        return bases[0]
    return SharedBase(bases[0], tuple(dataclasses.replace(w, base=None) if isinstance(w, OverBase) else None
                                      for w in weights))


def over_rows(xs: list, product) -> list:
    """``product`` (of rows [N, in] -> [N, out]) of every array of ``xs`` ([..., in] each) in one
    call over all their rows, split back into one [..., out] per array."""
    rows = [x.reshape(-1, x.shape[-1]) for x in xs]
    out = product(jnp.concatenate(rows) if len(rows) > 1 else rows[0])
    ends = np.cumsum([r.shape[0] for r in rows])[:-1].tolist()
    return [y.reshape(x.shape[:-1] + y.shape[-1:]) for x, y in zip(xs, jnp.split(out, ends))]


def linear_groups(xs: list, w) -> list:
    """``linear`` of each group's activations xs[g] [..., in] with its version of ``w`` (a
    ``SharedBase``, or a weight all groups share): one product with the base over every group's
    rows (the weights are read once), then each group's own update."""
    if len(xs) == 1 and not isinstance(w, SharedBase):
        return [linear(xs[0], w)]
    base, updates = (w.base, w.updates) if isinstance(w, SharedBase) else (w, (None,) * len(xs))
    outs = over_rows(xs, lambda rows: linear(rows, base))
    return [y if u is None else y + update(u, x) for x, y, u in zip(xs, outs, updates)]
