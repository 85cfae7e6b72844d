"""``specjax-bench kernels list|show TASK|run CANDIDATE_DIR [--task T]|baselines|report RESULTS.json``."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

from agent import scores, tasks
from agent.harness import run_candidate


def _declared_task(candidate: Path) -> str | None:
    """A candidate may name its task with a module-level ``TASK = "name"``; read from the AST, never run."""
    source = candidate / "kernel.py"
    if not source.is_file():
        return None
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "TASK" for t in node.targets) \
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return node.value.value
    return None


def _list(_args) -> int:
    for task in tasks.all_tasks().values():
        print(f"{task.name:28} {task.family:17} L{task.level}  {task.summary}")
    return 0


def _show(args) -> int:
    task = tasks.get(args.task)
    print(f"{task.name} ({task.family}, level {task.level}: {tasks.LEVELS[task.level]})\n{task.summary}")
    print(f"reference: {task.reference.__module__}.{task.reference.__name__}\n{task.reference.__doc__ or ''}")
    print(f"static kwargs: {', '.join(task.static_keys) or 'none'}; baselines: {', '.join(task.all_baselines())}")
    if task.inputs_note:
        print(f"inputs: {task.inputs_note}")
    for label, shapes in (("test shapes (CPU)", task.test_shapes), ("benchmark shapes (GPU)", task.bench_shapes)):
        print(f"{label}:")
        for shape in shapes:
            print(f"  {json.dumps(shape)}  tolerance (atol, rtol) = {task.tolerance_for(shape)}")
    return 0


def _run(args) -> int:
    candidate = Path(args.candidate)
    name = args.task or _declared_task(candidate)
    if name is None:
        raise SystemExit(f"no task: pass --task, or define TASK = \"name\" in {candidate / 'kernel.py'}")
    result = run_candidate(candidate, name, input_sets=args.input_sets, shapes=args.shapes,
                           timing=True if args.timing else None)
    verdict = "PASS" if result["correct"] else "FAIL"
    print(f"{verdict} {name}: max error ratio {result.get('max_ratio', float('nan')):.3g} "
          f"over {len(result['checks'])} input sets on {result.get('device', '?')}")
    for why in result["violations"]:
        print(f"  violation: {why}")
    if result["error"]:
        print(f"  error: {result['error']}")
    if result["timing"]:
        t = result["timing"]
        print(f"  {t['candidate_s'] * 1e6:.1f} us, speedup {t['speedup']:.2f}x over the best baseline, "
              f"{t['bandwidth_fraction']:.1%} of peak bandwidth, {t['flops_fraction']:.1%} of peak FLOP/s")
    elif result.get("timing_note"):
        print(f"  {result['timing_note']}")
    if args.out:
        out = Path(args.out)
        previous = scores.load(out) if out.exists() else []
        out.write_text(json.dumps(previous + [result], indent=1))
    return 0 if result["correct"] else 1


def _report(args) -> int:
    print(scores.markdown(scores.load(args.results)), end="")
    return 0


def _baselines(args) -> int:
    from agent import baselines

    report = baselines.time_baselines(args.task or None, repeats=args.repeats, input_sets=args.input_sets)
    print(baselines.markdown(report), end="")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    failed = [r["task"] for r in report["tasks"]
              if "error" in r or any("error" in e or e["max_ratio"] > 1 for e in r["baselines"].values())]
    if failed:
        print(f"baselines failed on: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specjax-bench", description="Pallas kernel benchmark tasks and harness")
    sub = parser.add_subparsers(dest="group", required=True)
    kernels = sub.add_parser("kernels", help="kernel tasks").add_subparsers(dest="command", required=True)
    kernels.add_parser("list", help="every task").set_defaults(fn=_list)
    show = kernels.add_parser("show", help="one task's interface, shapes and tolerances")
    show.add_argument("task")
    show.set_defaults(fn=_show)
    run = kernels.add_parser("run", help="check (and on a GPU time) a candidate directory holding kernel.py")
    run.add_argument("candidate")
    run.add_argument("--task", help="task name (default: TASK in kernel.py)")
    run.add_argument("--input-sets", type=int, default=3)
    run.add_argument("--shapes", choices=("test", "bench"), help="default: bench on GPUs, test elsewhere")
    run.add_argument("--timing", action="store_true", help="time even off GPUs")
    run.add_argument("--out", help="append the result to this JSON file")
    run.set_defaults(fn=_run)
    base = kernels.add_parser("baselines", help="time every task's baselines (on GPUs: the benchmark shapes)")
    base.add_argument("--task", action="append", help="only this task (repeatable; default all)")
    base.add_argument("--repeats", type=int, default=50)
    base.add_argument("--input-sets", type=int, default=3)
    base.add_argument("--out", help="write the JSON report here")
    base.set_defaults(fn=_baselines)
    report = kernels.add_parser("report", help="markdown report of a results JSON")
    report.add_argument("results")
    report.set_defaults(fn=_report)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (KeyError, ValueError, FileNotFoundError) as e:
        print(f"specjax-bench: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
