"""Scores over harness results: per task correctness, speedup and fraction of peak; per family fast_p
and the geometric-mean speedup; JSON in, markdown out.

fast_p (KernelBench): the share of results both correct and faster than p times the best baseline;
an untimed result (CPU) is never fast. The geometric mean is over correct, timed results only, and
the report says how many that was.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from agent.tasks import FAMILIES


def speedup(result: dict) -> float | None:
    timing = result.get("timing")
    return timing["speedup"] if result.get("correct") and timing else None


def fast_p(results: list[dict], p: float) -> float:
    if not results:
        return 0.0
    return sum((speedup(r) or 0.0) > p for r in results) / len(results)


def geomean_speedup(results: list[dict]) -> float | None:
    speeds = [s for s in map(speedup, results) if s]
    return math.exp(sum(map(math.log, speeds)) / len(speeds)) if speeds else None


def summarise(results: list[dict]) -> dict:
    """Per family and overall: tasks, correct, timed, fast_0 (correct), fast_1, fast_1.5, geomean speedup."""
    groups = {f: [r for r in results if r["family"] == f] for f in FAMILIES}
    groups["all"] = results

    def line(rs):
        return {"results": len(rs), "correct": sum(bool(r.get("correct")) for r in rs),
                "timed": sum(speedup(r) is not None for r in rs), "fast_1": fast_p(rs, 1.0),
                "fast_1.5": fast_p(rs, 1.5), "geomean_speedup": geomean_speedup(rs)}

    return {name: line(rs) for name, rs in groups.items() if rs}


def load(path: Path | str) -> list[dict]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list) or not all(isinstance(r, dict) and "task" in r and "family" in r for r in data):
        raise ValueError(f"{path} is not a list of harness results (objects with 'task' and 'family')")
    return data


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def markdown(results: list[dict]) -> str:
    """A report: one row per result, then one per family."""
    rows = ["| task | family | level | correct | max err ratio | speedup | bandwidth / peak | FLOP/s / peak | note |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        t = r.get("timing") or {}
        note = "; ".join(r.get("violations", [])) or r.get("error") or r.get("timing_note") or ""
        rows.append(f"| {r['task']} | {r['family']} | L{r.get('level', '?')} | {'yes' if r.get('correct') else 'no'} | "
                    f"{_fmt(r.get('max_ratio'), '.3g')} | {_fmt(speedup(r), '.2f')} | "
                    f"{_fmt(t.get('bandwidth_fraction'), '.1%')} | {_fmt(t.get('flops_fraction'), '.1%')} | {note} |")
    rows += ["", "| family | results | correct | timed | fast_1 | fast_1.5 | geomean speedup |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in summarise(results).items():
        rows.append(f"| {name} | {s['results']} | {s['correct']} | {s['timed']} | {s['fast_1']:.0%} | "
                    f"{s['fast_1.5']:.0%} | {_fmt(s['geomean_speedup'], '.2f')} |")
    return "\n".join(rows) + "\n"
