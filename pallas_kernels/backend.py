"""Where the Pallas kernels run, and which GPU lowering compiles them: the one place that decides.

Two choices live here:

* Pallas or XLA for attention (``use_pallas``): the function argument wins, then the environment
  variable ``SPECJAX_ATTENTION`` (``auto``, ``pallas`` or ``xla``), then ``auto``. ``auto`` takes
  the Pallas kernel on NVIDIA GPUs when the kernel supports the call, and XLA everywhere else;
  ``pallas`` forces the kernel (interpreted off GPUs, which is how CI tests it) and errors when
  the kernel cannot take the call; ``xla`` forces the reference. The choice is made when a
  function is traced, so a jit-compiled step keeps the backend it was traced with.
* The GPU lowering (``compiler_params``): Triton. Newer JAX defaults Pallas to Mosaic GPU and
  deprecates Triton from 0.11; the kernels are written against Triton's tile model (power-of-two
  blocks, gathers through pointer arithmetic), so moving to Mosaic GPU means changing this
  function and revisiting the kernels, nothing in the callers.
"""

from __future__ import annotations

import os

import jax
from jax.experimental.pallas import triton as pl_triton

ENV_VAR = "SPECJAX_ATTENTION"
BACKENDS = ("auto", "pallas", "xla")


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: ``backend`` if given, else ``$SPECJAX_ATTENTION``, else ``"auto"``."""
    source = "backend argument"
    if backend is None:
        backend, source = os.environ.get(ENV_VAR, "auto"), f"${ENV_VAR}"
    choice = backend.strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {backend!r}")
    return choice


def on_nvidia_gpu() -> bool:
    """Whether JAX's default backend is a CUDA GPU (ROCm and oneAPI GPUs are "gpu" too, but untested)."""
    if jax.default_backend() != "gpu":
        return False
    try:
        jax.devices("cuda")
    except RuntimeError:
        return False
    return True


def use_pallas(backend: str | None, supported: bool) -> bool:
    """Whether a call goes to the Pallas kernel; ``supported``: the kernel can take this call."""
    choice = requested_backend(backend)
    if choice == "auto":
        return supported and on_nvidia_gpu()
    return choice == "pallas"


def interpret() -> bool:
    """Run kernels in Pallas's interpreter: everywhere but GPUs (the only way Pallas runs on CPU)."""
    return jax.default_backend() != "gpu"


def compiler_params(*, num_warps: int, num_stages: int) -> pl_triton.CompilerParams:
    """Compiler parameters that select the Triton lowering of ``pl.pallas_call``."""
    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
