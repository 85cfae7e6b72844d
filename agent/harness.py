"""Run a candidate kernel on a task in an isolated subprocess: correctness, then (on a GPU) timing.

A candidate is a directory holding ``kernel.py`` that defines ``kernel(*inputs, **static)`` with the
task's interface (see ``agent.tasks``). Pallas candidates should pass ``interpret=True`` off GPUs
(``jax.default_backend() != "gpu"``): that is how CPU runs check them.

Isolation: the static anti-cheat check runs first (``anticheat.static_check``); then the candidate's
files are copied into a fresh work directory and a worker process (``python -m agent.harness``) runs
there with a scrubbed environment (PATH, locale and JAX/CUDA device selection only; HOME and TMPDIR
point into the work directory), its own session (so every process it leaves is killed with it),
and resource limits it sets on itself before importing JAX: CPU seconds, file size, no core dumps, and on CPU an address-space cap (not on
GPUs, where CUDA reserves huge virtual ranges); the parent kills it at the wall-clock timeout.

Correctness: for each shape (the task's test shapes on CPU or benchmark shapes on GPU, plus one fresh
shape the candidate cannot have seen, ``Task.fresh_shape``) the worker draws ``input_sets`` input sets
from seeds the parent picks at random per run. The reference runs only after the candidate has
returned, and the previous call's outputs and expected values are overwritten with NaN before the
next call (poisoned), so nothing the candidate could find in memory holds an answer. Pass rule:
``agent.compare.error_ratio`` <= 1 on every set.

Timing (GPU, or ``timing=True``): baselines first, before the candidate is imported; warm-up calls,
then ``repeats`` samples, each one call per input set back to back (so no call reuses warm caches of
the last) timed by ``time.perf_counter`` around the calls and one ``jax.block_until_ready``; the
median per call is kept. Achieved bandwidth (inputs + outputs bytes / time) and FLOP/s are reported as fractions of
the device's measured peaks (``measure_peaks``: a large copy and a bf16 matmul, measured once per
machine and cached).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULT_TAG = "SPECJAX_BENCH_RESULT"
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH")
PEAKS_CACHE = Path.home() / ".cache" / "specjax" / "peaks.json"


@dataclasses.dataclass(frozen=True)
class Limits:
    wall_s: float = 600.0
    cpu_s: int = 1200
    memory_bytes: int | None = 24 << 30  # address space, CPU only
    file_bytes: int = 256 << 20


def _has_cuda_plugin() -> bool:
    return any(importlib.util.find_spec(m) for m in ("jax_cuda13_plugin", "jax_cuda12_plugin"))


def _set_limits(limits: Limits, gpu: bool) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if limits.memory_bytes and not gpu:
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))


def run_candidate(candidate: Path | str, task: str, *, input_sets: int = 3, shapes: str | None = None,
                  timing: bool | None = None, static_checks: bool = True, repeats: int = 50,
                  limits: Limits = Limits()) -> dict:
    """Check (and on GPUs time) the candidate in ``candidate/kernel.py`` on ``task``; returns a result dict.

    shapes: "test" or "bench" (None: bench on GPUs, test elsewhere); timing: None times on GPUs only.
    static_checks=False skips the static anti-cheat pass (the tests use it to reach the dynamic checks).
    """
    from agent import anticheat, tasks

    candidate = Path(candidate)
    source_file = candidate / "kernel.py"
    if not source_file.is_file():
        raise FileNotFoundError(f"{source_file} not found: a candidate is a directory with kernel.py defining kernel()")
    if input_sets < 2:
        raise ValueError(f"input_sets must be at least 2 (one set could be memorised); got {input_sets}")
    spec_task = tasks.get(task)
    result = {"task": task, "family": spec_task.family, "level": spec_task.level, "candidate": str(candidate),
              "correct": False, "violations": [], "error": None, "checks": [], "timing": None}
    if static_checks:
        result["violations"] = anticheat.static_check(source_file.read_text(), "kernel.py")
        if result["violations"]:
            result["error"] = "rejected by the static anti-cheat check"
            return result
    gpu = _has_cuda_plugin() and os.environ.get("JAX_PLATFORMS", "") in ("", "cuda", "gpu")
    nonce = secrets.token_hex(16)
    spec = {"task": task, "shapes": shapes or ("bench" if gpu else "test"), "timing": timing,
            "seeds": [secrets.randbelow(2**31) for _ in range(input_sets)], "fresh_seed": secrets.randbelow(2**31),
            "repeats": repeats, "nonce": nonce, "peaks_cache": str(PEAKS_CACHE),
            "limits": dataclasses.asdict(limits), "gpu": gpu}
    with tempfile.TemporaryDirectory(prefix="specjax-bench-") as tmp:
        workdir = Path(tmp)
        shutil.copytree(candidate, workdir / "candidate", ignore=shutil.ignore_patterns("__pycache__"))
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env.update(HOME=str(workdir), TMPDIR=str(workdir), PYTHONPATH=str(REPO), PYTHONNOUSERSITE="1",
                   PYTHONDONTWRITEBYTECODE="1", PYTHONHASHSEED=str(secrets.randbelow(2**31)))
        proc = subprocess.Popen([sys.executable, "-m", "agent.harness"], cwd=workdir, env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            out, err = proc.communicate(json.dumps(spec), timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            result["error"] = f"timed out after {limits.wall_s:.0f} s"
        if _session_alive(proc.pid):
            result["violations"].append("left a process running after the worker exited")
            os.killpg(proc.pid, signal.SIGKILL)
    lines = [line for line in out.splitlines() if line.startswith(f"{RESULT_TAG} {nonce} ")]
    if len(lines) == 1:
        worker = json.loads(lines[0].split(" ", 2)[2])
        result["violations"] += worker.pop("violations")
        result.update(worker)
    elif result["error"] is None:
        tail = err.strip().splitlines()[-5:]
        result["error"] = (f"worker exited with status {proc.returncode} and no result"
                           + (f": {' / '.join(tail)}" if tail else "") if len(lines) == 0
                           else "more than one result line: output forged")
    result["correct"] = bool(result["correct"]) and not result["violations"] and result["error"] is None
    return result


def _session_alive(sid: int) -> bool:
    try:
        os.killpg(sid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


# ---- the worker: runs in the subprocess, in the work directory ----

def median_time(fn, arg_sets, static, repeats: int, perf_counter, block) -> float:
    """Median seconds per call. Each sample runs one call per input set back to back and waits once:
    a wait per call would add the host's synchronisation (tens of µs on a GPU) to every short kernel,
    while consecutive calls on different inputs still keep caches from serving the next call."""
    for args in arg_sets[:3]:  # warm-up: compile and fill caches
        block(fn(*args, **static))
    times = []
    for _ in range(repeats):
        start = perf_counter()
        outs = [fn(*args, **static) for args in arg_sets]
        block(outs)
        times.append((perf_counter() - start) / len(arg_sets))
    return statistics.median(times)


def measure_peaks(cache: Path) -> dict:
    """This device's copy bandwidth (bytes/s) and bf16 matmul rate (FLOP/s), measured once and cached."""
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0].device_kind
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if device in known:
        return known[device]
    x = jnp.ones((1 << 28,), jnp.bfloat16)  # 512 MiB: far past any cache
    copy = jax.jit(lambda a: a + 1)
    seconds = median_time(copy, [(x,)], {}, 20, time.perf_counter, jax.block_until_ready)
    a = jnp.ones((8192, 8192), jnp.bfloat16)
    mm = jax.jit(lambda p, q: p @ q)
    mm_seconds = median_time(mm, [(a, a)], {}, 20, time.perf_counter, jax.block_until_ready)
    peaks = {"bandwidth": 2 * x.nbytes / seconds, "flops": 2 * 8192**3 / mm_seconds}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({**known, device: peaks}))
    return peaks


def _poison(outputs: list) -> None:
    for o in outputs:
        if o.dtype.kind == "f":
            o.fill(float("nan"))
        else:
            o.fill(-1)


def _worker() -> None:
    # Taken before the candidate can touch them: timing and checks use these objects, not module attributes.
    perf_counter = time.perf_counter
    spec = json.loads(sys.stdin.read())
    # Set here, before JAX starts (not in a preexec_fn: forking a parent that runs JAX's threads can deadlock).
    _set_limits(Limits(**spec.pop("limits")), spec.pop("gpu"))
    nonce = spec.pop("nonce")
    import jax
    import numpy as np

    from agent import anticheat, compare, tasks

    block = jax.block_until_ready
    task = tasks.get(spec["task"])
    declared = task.bench_shapes if spec["shapes"] == "bench" else task.test_shapes
    rng = np.random.default_rng(spec["fresh_seed"])
    shapes = [*declared, task.fresh_shape(declared[0], rng)]
    on_gpu = jax.default_backend() == "gpu"
    timing = on_gpu if spec["timing"] is None else spec["timing"]
    reference = jax.jit(task.reference, static_argnames=task.static_keys)
    out: dict = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend()}

    timed_shape = shapes[0]
    timed_sets = [task.inputs(timed_shape, s) for s in spec["seeds"]] if timing else []
    if timing:
        peaks = measure_peaks(Path(spec["peaks_cache"]))
        baselines = {name: median_time(fn, timed_sets, task.static(timed_shape), spec["repeats"], perf_counter, block)
                     for name, fn in task.all_baselines().items() if on_gpu or name not in task.gpu_baselines}

    workdir = Path.cwd()
    guard = anticheat.Guard(workdir, [REPO], anticheat.watched_objects())
    module = None
    try:
        with guard.active():
            loader = importlib.util.spec_from_file_location("candidate_kernel", workdir / "candidate" / "kernel.py")
            module = importlib.util.module_from_spec(loader)
            module.__builtins__ = guard.builtins()
            loader.loader.exec_module(module)
            kernel = module.kernel
        guard.after_call(module)
        worst, previous = 0.0, []
        for shape in shapes:
            static = task.static(shape)
            atol, rtol = task.tolerance_for(shape)
            for seed in spec["seeds"]:
                args = task.inputs(shape, seed)
                _poison(previous)
                with guard.active():
                    got = block(kernel(*args, **static))
                guard.after_call(module)
                expected = block(reference(*args, **static))
                ratio = compare.error_ratio(got, expected, atol, rtol)
                out.setdefault("checks", []).append({"shape": shape, "seed": seed, "ratio": ratio})
                worst = max(worst, ratio)
                previous = [np.array(x) for x in compare.leaves(got) + compare.leaves(expected)]
        out["max_ratio"] = worst
        out["correct"] = worst <= 1
        if timing and out["correct"]:
            with guard.active():
                seconds = median_time(kernel, timed_sets, task.static(timed_shape), spec["repeats"], perf_counter,
                                      block)
            guard.after_call(module)
            moved = sum(a.nbytes for a in timed_sets[0]) + sum(
                np.asarray(x).nbytes for x in compare.leaves(reference(*timed_sets[0], **task.static(timed_shape))))
            best = min(baselines.values())
            out["timing"] = {"shape": timed_shape, "candidate_s": seconds, "baselines_s": baselines,
                             "speedup": best / seconds, "bandwidth_fraction": moved / seconds / peaks["bandwidth"],
                             "flops_fraction": task.flops(timed_shape) / seconds / peaks["flops"], "peaks": peaks}
        elif not timing:
            out["timing_note"] = "timing needs a GPU (correctness only here; --timing forces it)"
    except anticheat.Violation:
        out["correct"] = False
    except Exception as e:  # the candidate's failure is a result, not a crash of the harness
        out["correct"] = False
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
    out["violations"] = list(dict.fromkeys(guard.violations))
    print(f"{RESULT_TAG} {nonce} {json.dumps(out)}", flush=True)


if __name__ == "__main__":
    _worker()
