"""Compiling every step shape ahead, within what the operating system lets a process map."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax


def max_map_count() -> int | None:
    """Linux's limit on a process's memory mappings (None where unknown)."""
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return None


def maps_in_use() -> int:
    with open("/proc/self/maps", "rb") as maps:
        return sum(1 for _ in maps)


def run_warm_up(jobs: dict[str, list[Callable[[], None]]], longest: int,
                progress: Callable[[int, int], None] | None = None) -> int:
    """Run every job (a thunk compiling one step shape), grouped by kind; returns how many ran.

    On a CPU, XLA maps each kernel of an executable into the process's memory on its own (code,
    data and read-only mappings: about 280 for a SmolLM2-135M step, 800 for a tree step with a
    draft model), and past Linux's per-process ``vm.max_map_count`` compiling aborts the process.
    So there the first job of each kind runs first, and if the rest would pass the limit,
    ValueError says so before they run. ``longest``: the sequence length the jobs cover (for the
    message)."""
    jobs = {kind: list(todo) for kind, todo in jobs.items() if todo}
    total, done = sum(map(len, jobs.values())), 0

    def run(job) -> None:
        nonlocal done
        job()
        done += 1
        if progress is not None:
            progress(done, total)

    limit = max_map_count() if jax.default_backend() == "cpu" else None
    if limit is not None:
        need = 0
        for todo in jobs.values():
            before = maps_in_use()
            run(todo.pop(0))
            need += (maps_in_use() - before) * len(todo)
        need += maps_in_use()
        if need > limit:
            raise ValueError(
                f"compiling the {total} step shapes of sequences up to {longest} tokens would take about "
                f"{need} memory mappings, more than this process may hold (vm.max_map_count = {limit}): warm "
                "up shorter sequences or a smaller max batch, or raise vm.max_map_count")
    for todo in jobs.values():
        for job in todo:
            run(job)
    return total
