"""Helpers shared by the benchmark scripts: the run's environment, timing statistics, the device's
copy bandwidth, result tables and JSON result files.

Nothing here imports the engine, so a script can record its environment before loading a model.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------- parsing
def int_list(text: str, allow_empty: bool = False) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4] (argparse ``type=``); every entry must be a positive integer, and
    there must be one unless ``allow_empty`` (``""`` -> [])."""
    import argparse

    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not (values or allow_empty) or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def apply_quick(args, quick: dict, argv=None) -> None:
    """A smoke run's settings (``quick``, by argument name) on ``args``, but for the options the
    command line (``argv``, default ``sys.argv[1:]``) gives explicitly."""
    import sys

    given = {a.split("=")[0].removeprefix("--").replace("-", "_") for a in (argv or sys.argv[1:])}
    for name, value in quick.items():
        if name not in given:
            setattr(args, name, value)


def name_list(text: str) -> list[str]:
    """``"chat, code"`` -> ["chat", "code"] (argparse ``type=``): comma-separated, blanks dropped."""
    return [part.strip() for part in text.split(",") if part.strip()]


def add_target_and_draft(parser) -> None:
    """``--target``, ``--draft`` (one draft, or ``target``) and ``--k``, as the scripts that compare
    one draft chain against other methods take them."""
    parser.add_argument("--target", default="smollm2-135m", help="target model name or path (default %(default)s)")
    parser.add_argument("--draft", default="smollm2-135m-draft-a",
                        help="draft of the draft and hybrid methods: a draft name or directory, or 'target' (the "
                             "target itself: every proposal accepted, a sanity check) (default %(default)s)")
    parser.add_argument("--k", type=int, default=4, help="draft chain length (default %(default)s)")


# ---------------------------------------------------------------------------- environment
def cpu_cores() -> int:
    """CPUs this process may run on (the affinity mask, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def git_commit() -> dict[str, Any]:
    """{"commit": HEAD or None, "dirty": uncommitted changes or None} of the repository holding this file."""

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], check=False, cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if commit is None or status is None else bool(status)}


def environment() -> dict[str, Any]:
    """What a result depends on besides the code: device, versions, commit, date."""
    device = jax.devices()[0]
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "jaxlib_version": _jaxlib_version(),
        "python": platform.python_version(),
        "cpu_cores": cpu_cores(),
        # Other processes compete for a CPU backend; a load near the core count makes CPU timings noisy.
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "specjax": git_commit(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def load_warning(env: dict[str, Any]) -> str | None:
    """A note when other processes were sharing the CPU backend at the start (load above half the cores)."""
    load = env["load_average_1m"]
    if env["platform"] != "cpu" or load is None or load <= 0.5 * env["cpu_cores"]:
        return None
    return (f"CPU load average was {load:.1f} on {env['cpu_cores']} cores at the start: other processes shared "
            "the CPU, so timings are pessimistic and noisy")


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return None


def slug(text: str) -> str:
    """A lowercase file-name-safe form: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "unknown"


def default_results_path(script: str, subject: str, env: dict[str, Any]) -> Path:
    """benchmarks/results/<script>-<subject>-<device>-<date>.json"""
    date = env["date_utc"][:10]
    return RESULTS_DIR / f"{script}-{slug(subject)}-{slug(env['device_kind'])}-{date}.json"


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=_json_default)
        f.write("\n")
    return path


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return str(x)


# ---------------------------------------------------------------------------- statistics
def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    """Median, p90, mean, min and max of step times, in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        return {"n": 0}
    return {
        "n": int(ms.size),
        "median_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
    }


# ---------------------------------------------------------------------------- device bandwidth
def measure_copy_bandwidth(nbytes: int, repeats: int = 10) -> dict[str, float]:
    """The default device's achievable memory bandwidth, from a jitted ``x + 1`` over a large array.

    The fp32 array of ``nbytes`` is read once and written once, so each run moves 2 * nbytes. The
    input is donated, so the result lands in the same buffer: a fresh output buffer every run would
    time the allocator too (on CPU, first-touch page faults on the new pages halve the figure).
    Returns the median and best bandwidth (bytes/s) over ``repeats`` timed runs after a compiling
    warm-up, each synchronised with ``block_until_ready``.
    """
    n = max(1, nbytes // 4)
    add_one = jax.jit(lambda a: a + 1, donate_argnums=0)
    x = add_one(jnp.ones((n,), jnp.float32)).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x = add_one(x)
        x.block_until_ready()
        times.append(time.perf_counter() - start)
    del x
    moved = 2 * n * 4
    median = float(np.median(times))
    return {
        "kernel": "jit(x + 1), fp32, input donated",
        "array_bytes": n * 4,
        "bytes_moved": moved,
        "repeats": repeats,
        "median_s": median,
        "bandwidth_bytes_per_s": moved / median,
        "best_bandwidth_bytes_per_s": moved / float(np.min(times)),
    }


# ---------------------------------------------------------------------------- tables
def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], notes: Sequence[str] = ()) -> None:
    """A results table: rich's if it is installed, plain aligned text otherwise. Cells print with str()."""
    rows = [[("-" if cell is None else str(cell)) for cell in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
        print(f"\n{title}")
        print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
        print("  ".join("-" * w for w in widths))
        for row in rows:
            print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
        for note in notes:
            print(note)
        return
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # piped: rich would squeeze the table into 80 columns
        console = Console(width=200)
    console.print(table)
    for note in notes:
        console.print(note, highlight=False, markup=False)


def fmt(value: float | None, digits: int = 1) -> str | None:
    """A number with ``digits`` decimals and thousands separators, or None (printed as "-")."""
    if value is None or not np.isfinite(value):
        return None
    return f"{value:,.{digits}f}"
