"""Source text the templates share: each rendered kernel is one self-contained module, so shared helpers
are pasted into it rather than imported (candidates may import only jax, numpy and the standard library)."""

IMPORTS = '''
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
'''

# Every kernel's Triton knobs and its interpret switch (CPU runs check kernels by interpreting them).
PARAMS = '''PARAMS = plgpu.CompilerParams(num_warps=${num_warps}, num_stages=${num_stages})
INTERPRET = jax.default_backend() != "gpu"
'''

# Triton needs every loaded or stored tile to have a power-of-two size, and a reduction must not read
# past an array's end; the tasks' shapes need neither, so kernels pad to whole tiles and slice back.
PAD = '''

def _pad(x, axis, multiple):
    """x zero-padded at the end of ``axis`` to a multiple of ``multiple`` (x itself when it already is one)."""
    extra = -x.shape[axis] % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)
'''

POW2 = '''

def _pow2(n):
    """The smallest power of two >= n."""
    return 1 << (n - 1).bit_length()
'''

