"""Time every task's production baselines on its benchmark shapes, in this process.

These are the numbers candidates are scored against (``harness`` times them again beside each
candidate): per task and baseline, the median seconds per call on the first benchmark shape, the
bytes the call must move (inputs read once, outputs written once) and its FLOPs, each as a fraction
of the device's measured peaks (``harness.measure_peaks``). Every baseline is first checked against
the task's reference on a fresh input set, so a broken baseline (a compiled Pallas kernel that
differs from its interpreted self, say) shows up as incorrect rather than as a fast time.

Baselines are this repository's own code, so unlike candidates they run here, unisolated. A task
whose baselines fail (out of memory, a lowering error) is recorded with its error and the sweep
goes on.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import numpy as np

from agent import compare, tasks
from agent.harness import PEAKS_CACHE, measure_peaks, median_time


def _moved_bytes(inputs, outputs) -> int:
    return sum(a.nbytes for a in inputs) + sum(np.asarray(x).nbytes for x in compare.leaves(outputs))


def time_task(task: tasks.Task, *, repeats: int, input_sets: int, peaks: dict, seed: int = 0) -> dict:
    """One task's baselines, timed on ``task.bench_shapes[0]`` (or ``test_shapes[0]`` off GPUs)."""
    on_gpu = jax.default_backend() == "gpu"
    shape = (task.bench_shapes if on_gpu else task.test_shapes)[0]
    static = task.static(shape)
    atol, rtol = task.tolerance_for(shape)
    row = {"task": task.name, "family": task.family, "level": task.level, "shape": shape, "baselines": {}}
    try:
        arg_sets = [task.inputs(shape, seed + i) for i in range(input_sets)]
        expected = jax.block_until_ready(jax.jit(task.reference, static_argnames=task.static_keys)(
            *arg_sets[0], **static))
        moved, flops = _moved_bytes(arg_sets[0], expected), task.flops(shape)
        row.update(bytes=moved, flops=flops)
        for name, fn in task.all_baselines().items():
            if name in task.gpu_baselines and not on_gpu:
                continue  # an interpreted Pallas kernel's time says nothing
            entry: dict = {}
            try:
                entry["max_ratio"] = compare.error_ratio(jax.block_until_ready(fn(*arg_sets[0], **static)),
                                                         expected, atol, rtol)
                seconds = median_time(fn, arg_sets, static, repeats, time.perf_counter, jax.block_until_ready)
                entry.update(seconds=seconds, bandwidth_fraction=moved / seconds / peaks["bandwidth"],
                             flops_fraction=flops / seconds / peaks["flops"])
            except Exception as e:  # noqa: BLE001: one baseline's failure is a result, not the sweep's end
                entry["error"] = f"{type(e).__name__}: {e}"[:500]
            row["baselines"][name] = entry
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"[:500]
    return row


def time_baselines(names: list[str] | None = None, *, repeats: int = 50, input_sets: int = 3,
                   peaks_cache: Path = PEAKS_CACHE) -> dict:
    """Every named task's baselines (all tasks when ``names`` is None), with the device and its peaks."""
    chosen = [tasks.get(n) for n in names] if names else list(tasks.all_tasks().values())
    peaks = measure_peaks(peaks_cache)
    return {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "peaks": peaks, "repeats": repeats,
            "input_sets": input_sets,
            "tasks": [_progress(time_task(t, repeats=repeats, input_sets=input_sets, peaks=peaks)) for t in chosen]}


def _progress(row: dict) -> dict:
    """Report each task as it finishes (on stderr): a sweep can take minutes, and may be cut short."""
    times = ", ".join(f"{name} {e['seconds'] * 1e6:.1f} µs" if "seconds" in e else f"{name} failed"
                      for name, e in row["baselines"].items())
    print(f"{row['task']}: {row.get('error') or times}", file=sys.stderr, flush=True)
    return row


def markdown(report: dict) -> str:
    """One row per task and baseline: time, fractions of peak bandwidth and FLOP/s, correctness."""
    peaks = report["peaks"]
    rows = [f"{report['device']} ({report['backend']}), jax {report['jax']}, {report['date_utc']}; peaks: "
            f"{peaks['bandwidth'] / 1e12:.2f} TB/s copy, {peaks['flops'] / 1e12:.0f} TFLOP/s bf16 matmul; "
            f"median of {report['repeats']} samples over {report['input_sets']} input sets.", "",
            "| task | family | baseline | µs | bandwidth / peak | FLOP/s / peak | correct | note |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in report["tasks"]:
        if "error" in row:
            rows.append(f"| {row['task']} | {row['family']} | — | — | — | — | — | {row['error']} |")
            continue
        for name, e in row["baselines"].items():
            if "seconds" not in e:
                rows.append(f"| {row['task']} | {row['family']} | {name} | — | — | — | — | "
                            f"{e.get('error', '')} |")
                continue
            rows.append(f"| {row['task']} | {row['family']} | {name} | {e['seconds'] * 1e6:.1f} | "
                        f"{e['bandwidth_fraction']:.1%} | {e['flops_fraction']:.1%} | "
                        f"{'yes' if e['max_ratio'] <= 1 else 'NO'} | |")
    return "\n".join(rows) + "\n"
