"""Kernel tasks: what a candidate must compute, on which shapes, to what tolerance, against what.

A task is data: a plain-JAX reference whose signature mirrors the production interface, an input
generator, shapes (small ``test_shapes`` that run on CPU, real ``bench_shapes`` from model configs
for GPUs), a tolerance per dtype, a level (1 single op, 2 fused, 3 layer), the production baselines
and a float64 NumPy oracle (written independently of the reference, as loops where that is clearer)
that the tests hold the reference to.

A candidate is called as ``kernel(*inputs, **static)``: ``inputs`` are the arrays ``make_inputs``
returns, ``static`` the shape entries named in ``static_keys`` (Python ints/floats, e.g. ``top_k``).

Shapes are dicts; ``vary`` names entries the harness may redraw (key -> step), so a candidate also
meets shapes it has never seen: the redrawn value stays a multiple of the step away from the original.
A step may name another entry of the shape (``{"t": "chunk"}``: t moves by whole chunks).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

FAMILIES = ("linear_attention", "ssm", "moe", "quantized", "multimodal", "specjax")
LEVELS = {1: "single op", 2: "fused ops", 3: "layer"}
# (atol, rtol) by the inputs' dtype; tasks override where calibration (harness.calibrate) asks for more.
DEFAULT_TOLERANCE = {"float32": (1e-5, 1e-4), "bfloat16": (1e-2, 2e-2)}

Shape = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    family: str
    level: int
    summary: str
    reference: Callable[..., Any]
    make_inputs: Callable[[Shape, np.random.Generator], tuple]
    oracle: Callable[..., Any]
    test_shapes: tuple[Shape, ...]
    bench_shapes: tuple[Shape, ...]
    flops: Callable[[Shape], float]
    static_keys: tuple[str, ...] = ()
    vary: dict[str, int | str] = dataclasses.field(default_factory=dict)
    tolerance: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    # name -> callable with the reference's signature; "xla" (jit of the reference) is always added.
    baselines: dict[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)
    # Baselines that only make sense on a GPU (compiled Pallas kernels); interpreted elsewhere.
    gpu_baselines: tuple[str, ...] = ()
    inputs_note: str = ""

    def static(self, shape: Shape) -> dict[str, Any]:
        """The shape's static arguments, hashable as ``jax.jit`` wants them (a list, as JSON brings
        shapes back, becomes a tuple)."""
        return {k: tuple(shape[k]) if isinstance(shape[k], list) else shape[k] for k in self.static_keys}

    def inputs(self, shape: Shape, seed: int) -> tuple:
        """The task's inputs for ``shape`` from ``seed``: device arrays, deterministic in the seed."""
        return tuple(jax.numpy.asarray(a) for a in self.make_inputs(shape, np.random.default_rng(seed)))

    def tolerance_for(self, shape: Shape) -> tuple[float, float]:
        dtype = shape.get("dtype", "float32")
        return self.tolerance.get(dtype, DEFAULT_TOLERANCE[dtype])

    def all_baselines(self) -> dict[str, Callable[..., Any]]:
        return {"xla": jax.jit(self.reference, static_argnames=self.static_keys), **self.baselines}

    def fresh_shape(self, shape: Shape, rng: np.random.Generator) -> Shape:
        """``shape`` with every ``vary`` entry moved by one or two steps up: a shape no table lists."""
        steps = {k: shape[step] if isinstance(step, str) else step for k, step in self.vary.items()}
        return {**shape, **{k: shape[k] + step * int(rng.integers(1, 3)) for k, step in steps.items()}}


_MODULES = ("linear_attention", "ssm", "moe", "quantized", "multimodal", "specjax_ops")


def all_tasks() -> dict[str, Task]:
    """Every task by name, in family order."""
    tasks: dict[str, Task] = {}
    for module in _MODULES:
        for task in importlib.import_module(f"agent.tasks.{module}").TASKS:
            if task.name in tasks:
                raise ValueError(f"two tasks are named {task.name!r}")
            tasks[task.name] = task
    return tasks


def get(name: str) -> Task:
    tasks = all_tasks()
    if name not in tasks:
        raise KeyError(f"no task {name!r}; known: {', '.join(sorted(tasks))}")
    return tasks[name]


# Draws of at least this many values are made by jax.random on the default device: NumPy takes about
# 25 s per billion values on the host, which made the benchmark shapes' inputs (up to 1.9 GB per
# array) cost more device-machine time than the timing itself.
DEVICE_DRAW_ELEMENTS = 1 << 22


def normal(rng: np.random.Generator, shape, dtype: str, scale: float = 1.0) -> np.ndarray | jax.Array:
    """Standard-normal values times ``scale``, rounded to ``dtype`` (bf16 through ml_dtypes).

    Deterministic in ``rng``'s state. Small draws are NumPy arrays; draws of ``DEVICE_DRAW_ELEMENTS``
    values or more are device arrays from a key drawn from ``rng``.
    """
    if int(np.prod(shape)) >= DEVICE_DRAW_ELEMENTS:
        key = jax.random.key(int(rng.integers(2**63)))
        return (jax.random.normal(key, shape, jax.numpy.float32) * scale).astype(dtype)
    return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(jax.numpy.dtype(dtype))


def as64(*arrays) -> list[np.ndarray]:
    """Inputs widened for an oracle: floats to float64, integers kept."""
    out = []
    for a in arrays:
        a = np.asarray(a)
        out.append(a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) or a.dtype.kind == "V"
                   or str(a.dtype) == "bfloat16" else a)
    return out
