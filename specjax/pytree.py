"""Pytree dataclasses: flax's ``struct.dataclass`` (frozen, registered with JAX; fields marked
``static_field()`` are compile-time constants that ``jit`` hashes instead of tracing)."""

from flax import struct

pytree_dataclass = struct.dataclass


def static_field(**kwargs):
    """A field kept out of the pytree's leaves: part of the compiled program, not an argument."""
    return struct.field(pytree_node=False, **kwargs)
