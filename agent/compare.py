"""The pass rule and tolerance calibration shared by the harness and the tests.

Pass rule (FastKernels'): max over elements of |candidate - reference| / (atol + rtol * |reference|) <= 1,
per output; integer outputs must match exactly; shapes and dtypes must match the reference's.

Calibration: the tolerance a task declares must admit the reference's own rounding noise. ``noise_ratio``
perturbs every floating input by one unit of rounding of its dtype (x * (1 + u * eps), u uniform in
[-1, 1], eps the dtype's machine epsilon; integer inputs such as ids are left alone), reruns the
reference and scores the change by the pass rule: a declared tolerance is calibrated when this ratio
stays well below 1 (the tests ask for <= 0.5) on every test shape, and it is not vacuous when a
candidate off by a relative 1e-2 (bf16: 1e-1) fails.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def leaves(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def error_ratio(candidate, reference, atol: float, rtol: float) -> float:
    """The pass rule's score (<= 1 passes); inf on a shape or dtype mismatch, or a non-finite value."""
    cands, refs = leaves(candidate), leaves(reference)
    if len(cands) != len(refs):
        return float("inf")
    worst = 0.0
    for c, r in zip(cands, refs):
        c, r = np.asarray(c), np.asarray(r)
        if c.shape != r.shape or c.dtype != r.dtype:
            return float("inf")
        if not np.issubdtype(r.dtype, np.inexact) and r.dtype.name != "bfloat16":
            worst = max(worst, 0.0 if np.array_equal(c, r) else float("inf"))
            continue
        c64, r64 = c.astype(np.float64), r.astype(np.float64)
        if not np.all(np.isfinite(c64)):
            return float("inf")
        err = np.abs(c64 - r64)
        bound = atol + rtol * np.abs(r64)
        # A zero bound (exact tasks) admits only a zero error.
        ratio = np.where(bound > 0, err / np.where(bound > 0, bound, 1), np.where(err > 0, np.inf, 0.0))
        worst = max(worst, float(ratio.max(initial=0.0)))
    return worst


def perturb(args: tuple, rng: np.random.Generator) -> tuple:
    """Every floating input moved by up to one unit of rounding of its dtype; others unchanged."""
    out = []
    for a in args:
        if jnp.issubdtype(a.dtype, jnp.floating):
            eps = float(jnp.finfo(a.dtype).eps)
            u = rng.uniform(-1, 1, a.shape)
            a = (a.astype(jnp.float32) * (1 + eps * u)).astype(a.dtype)
        out.append(a)
    return tuple(out)


def noise_ratio(task, shape, seed: int = 0, trials: int = 2) -> tuple[float, object]:
    """The pass-rule score of the reference against itself on inputs perturbed within rounding (worst
    trial), and the unperturbed output."""
    args = task.inputs(shape, seed)
    static = task.static(shape)
    ref = jax.jit(task.reference, static_argnames=task.static_keys)
    base = ref(*args, **static)
    atol, rtol = task.tolerance_for(shape)
    rng = np.random.default_rng(seed)
    return max(error_ratio(ref(*perturb(args, rng), **static), base, atol, rtol) for _ in range(trials)), base
