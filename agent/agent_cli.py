"""``specjax-agent run --task T --provider openai|search --budget N [--job ID] [--db PATH]`` and
``specjax-agent report [--job ID] [--db PATH] [--export DIR]``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from agent import tasks
from agent.loop import Budget, population, run_job
from agent.proposers import OpenAIProposer, SearchProposer
from agent.store import Job, Store

DEFAULT_DB = Path(os.environ.get("SPECJAX_AGENT_DB", Path.home() / ".cache" / "specjax" / "agent.sqlite"))


def _run(args) -> int:
    tasks.get(args.task)  # an unknown task is the first thing to report, whatever the provider
    if args.provider == "search":
        proposer = SearchProposer(args.task, configs=args.configs, seed=args.seed)
    else:
        proposer = OpenAIProposer.from_env(args.base_url, args.model, max_tokens=args.max_tokens)
    job_id = args.job or f"{args.task}-{args.provider}-{time.strftime('%Y%m%d-%H%M%S')}"
    # Successive halving ends itself; cutting it at a plateau would drop its later rungs.
    plateau = args.plateau if args.plateau is not None else (0 if args.provider == "search" else 3)
    budget = Budget(args.budget, args.wall_s, args.tokens, plateau or None)
    store = Store(args.db)
    try:
        result = run_job(store, job_id, args.task, proposer, budget,
                         k=args.k or (4 if args.provider == "search" else 1), workers=args.workers)
    finally:
        store.close()
    correct = sum(a.correct for a in result.attempts)
    print(f"job {job_id}: {result.status}; {len(result.attempts)} attempts, {correct} correct")
    if result.best:
        print(f"best: attempt {result.best.id}: {result.best.feedback}")
    return 0 if result.best else 1


def _line(text: str, width: int = 100) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width - 3] + "..."


def job_markdown(job: Job, store: Store) -> str:
    attempts = store.attempts(job.id)
    best = population(attempts, 1)
    lines = [f"## Job `{job.id}`: {job.task} with {job.provider}", "",
             f"Status: {job.status}. {len(attempts)} attempts, {sum(a.correct for a in attempts)} correct, "
             f"{sum(a.tokens for a in attempts)} tokens.", "",
             f"Config: `{json.dumps(job.config)}`", "",
             "| # | round | source | correct | max error / tol | speedup | feedback |",
             "|---|---|---|---|---|---|---|"]
    for a in attempts:
        source = json.dumps(a.params["config"]) if "config" in a.params else a.params.get("model", "")
        ratio = a.result.get("max_ratio")
        lines.append(f"| {a.id} | {a.round} | {_line(source, 60)} | {'yes' if a.correct else 'no'} | "
                     f"{'' if ratio is None else f'{ratio:.3g}'} | "
                     f"{'' if a.speedup is None else f'{a.speedup:.2f}x'} | {_line(a.feedback)} |")
    lines += ["", f"Best: attempt {best[0].id}: {best[0].feedback}" if best else "No correct kernel yet.", ""]
    return "\n".join(lines)


def _report(args) -> int:
    store = Store(args.db)
    try:
        jobs = [store.job(args.job)] if args.job else store.jobs()
        if jobs == [None]:
            raise KeyError(f"no job {args.job!r} in {args.db}")
        print("# Kernel agent report\n")
        for job in jobs:
            print(job_markdown(job, store))
        if args.export:
            if len(jobs) != 1:
                raise ValueError("--export needs one job: pass --job")
            best = population(store.attempts(jobs[0].id), 1)
            if not best:
                raise ValueError(f"job {jobs[0].id!r} has no correct kernel to export")
            out = Path(args.export)
            out.mkdir(parents=True, exist_ok=True)
            (out / "kernel.py").write_text(best[0].code)
            print(f"Exported attempt {best[0].id} to {out / 'kernel.py'} (check it with "
                  f"`specjax-bench kernels run {out} --task {jobs[0].task}`).")
    finally:
        store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specjax-agent", description="search for Pallas kernels that pass the "
                                                                       "kernel benchmark's harness")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run or resume a job")
    run.add_argument("--task", required=True)
    run.add_argument("--provider", choices=("openai", "search"), required=True)
    run.add_argument("--budget", type=int, default=20, help="attempts in all, resumed ones included")
    run.add_argument("--wall-s", type=float, help="wall-time budget of this run, seconds")
    run.add_argument("--tokens", type=int, help="token budget, resumed attempts included")
    run.add_argument("--plateau", type=int, help="stop after this many rounds without a better kernel (0: never; "
                                                 "default 3 for openai, 0 for search)")
    run.add_argument("-k", type=int, help="proposals per round, best-of-k (default 1 for openai, 4 for search)")
    run.add_argument("--workers", type=int, default=1,
                     help="judge up to this many of a round's proposals at once, each in its own harness process "
                          "(on one GPU, more than 1 lets concurrent runs disturb each other's timings)")
    run.add_argument("--job", help="job id; an existing one resumes (default: task-provider-time)")
    run.add_argument("--db", type=Path, default=DEFAULT_DB)
    run.add_argument("--base-url", help="openai: endpoint (default SPECJAX_AGENT_BASE_URL or OPENAI_BASE_URL)")
    run.add_argument("--model", help="openai: model (default SPECJAX_AGENT_MODEL or OPENAI_MODEL)")
    run.add_argument("--max-tokens", type=int, help="openai: longest reply, tokens (default: the endpoint's)")
    run.add_argument("--configs", type=int, help="search: sample this many configurations of the grid")
    run.add_argument("--seed", type=int, default=0, help="search: grid sampling seed")
    run.set_defaults(fn=_run)
    report = sub.add_parser("report", help="markdown summary of stored jobs")
    report.add_argument("--job")
    report.add_argument("--db", type=Path, default=DEFAULT_DB)
    report.add_argument("--export", help="write the job's best kernel to DIR/kernel.py")
    report.set_defaults(fn=_report)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (KeyError, ValueError) as e:
        print(f"specjax-agent: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
