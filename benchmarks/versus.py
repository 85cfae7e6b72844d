"""Two checkouts of specjax against each other: did a change make anything slower?

    git worktree add /tmp/before <commit>
    python benchmarks/versus.py --before /tmp/before --after . --rounds 2

Runs the same benchmarks (``decode.py`` plain decoding at batch 1 and 8; ``suffix.py`` plain,
draft-chain, suffix and hybrid speculation on the code and agentic workloads) from each checkout,
each with its own code, alternating which goes first round by round, so a machine that slows down
mid-run slows both alike. Each figure is the median over rounds; the ratio is after / before.

Results: a table on stdout and JSON in benchmarks/results/versus-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from benchmarks import common  # noqa: E402


def _decode_figures(result: dict) -> dict[str, float]:
    return {f"plain decode, batch {run['batch']}: tok/s": run["decode"]["tokens_per_s"] for run in result["runs"]}


def _suffix_figures(result: dict) -> dict[str, float]:
    figures = {}
    for m in result["methods"]:
        figures[f"{result['workload']}, {m['method']}: tok/s"] = m["tokens_per_s"]
        if "tau" in m:
            figures[f"{result['workload']}, {m['method']}: tau"] = m["tau"]
    return figures


def jobs(args) -> list[tuple[str, list[str], object]]:
    """(name, command after ``python``, figures from its JSON) of each benchmark run."""
    suffix = ["benchmarks/suffix.py", "--draft", args.draft, "--n", str(args.n), "--warm", str(args.n),
              "--max-tokens", str(args.max_tokens), "--methods", "plain,draft,suffix-warm,hybrid-warm"]
    return ([("decode", ["benchmarks/decode.py", "--batch-sizes", "1,8", "--decode-steps", str(args.decode_steps),
                         "--no-floor"], _decode_figures)]
            + [(f"suffix-{w}", suffix + ["--workload", w], _suffix_figures) for w in args.workloads])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, required=True, help="checkout of the baseline")
    p.add_argument("--after", type=Path, default=_REPO_ROOT, help="checkout of the change (default: this one)")
    p.add_argument("--rounds", type=int, default=2, help="(default %(default)s)")
    p.add_argument("--workloads", type=common.name_list, default=["code", "agentic"], help="suffix.py workloads")
    p.add_argument("--draft", default="smollm2-135m-draft-a")
    p.add_argument("--n", type=int, default=6, help="suffix.py requests, and as many to warm (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=128, help="(default %(default)s)")
    p.add_argument("--decode-steps", type=int, default=64, help="(default %(default)s)")
    p.add_argument("--out", type=Path, help="JSON result path")
    args = p.parse_args(argv)

    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    figures: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
            for name, command, extract in jobs(args):
                for side in order:
                    out = Path(tmp) / f"{side}-{name}-{round_}.json"
                    print(f"round {round_ + 1}: {name} on {side}", file=sys.stderr, flush=True)
                    subprocess.run([sys.executable, *command, "--out", str(out)], cwd=sides[side], check=True,
                                   stdout=subprocess.DEVNULL)
                    result = json.loads(out.read_text())
                    runs.append({"side": side, "round": round_, "benchmark": name,
                                 "commit": result.get("environment", {}).get("specjax"), "figures": extract(result)})
                    for key, value in extract(result).items():
                        figures[side].setdefault(key, []).append(value)
                    _write(args, figures, runs)  # after every run: an interrupted comparison keeps what it measured
    _write(args, figures, runs, show=True)
    return 0


def _write(args, figures: dict, runs: list, show: bool = False) -> None:
    """The medians so far of each figure measured on both sides, as a table (``show``) and JSON."""
    rows = []
    for key in figures["after"]:
        if key not in figures["before"]:
            continue
        before, after = statistics.median(figures["before"][key]), statistics.median(figures["after"][key])
        rows.append({"figure": key, "before": before, "after": after, "ratio": after / before if before else None,
                     "rounds": min(len(figures["before"][key]), len(figures["after"][key]))})
    env = common.environment()
    path = common.write_json(args.out or common.default_results_path("versus", "smollm2-135m", env),
                             {"benchmark": "versus", "settings": vars(args), "environment": env, "rows": rows,
                              "runs": runs})
    if show:
        common.print_table("after / before, medians over rounds", ["figure", "before", "after", "ratio", "rounds"],
                           [(r["figure"], f"{r['before']:.2f}", f"{r['after']:.2f}", f"{r['ratio']:.3f}", r["rounds"])
                            for r in rows])
        print(f"JSON: {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
