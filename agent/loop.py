"""The kernel agent's loop: prompt -> proposals -> anti-cheat + harness -> feedback -> next prompt.

Each round asks the proposer for ``k`` kernels (best-of-k), judges every one in a harness worker
process, up to ``workers`` of them at once (the agent never imports candidate code), stores each
attempt as soon as it and those before it in the round are judged, and builds the next prompt from
the task, the device, the best distinct correct kernels so far (the population) and the latest
failures with their feedback. A job stops on its budget (attempts, wall time, tokens), on a plateau
(no better kernel for ``plateau`` rounds) or when the proposer has nothing left. Re-running a job id
resumes it: stored attempts and tokens count against the budget, wall time counts per run.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agent import tasks
from agent.anticheat import ALLOWED_IMPORTS, BANNED_PREFIXES
from agent.harness import Limits, run_candidate
from agent.proposers import Context, Proposal, Proposer
from agent.store import Attempt, Store, quality, rank_key


@dataclasses.dataclass(frozen=True)
class Budget:
    attempts: int = 20
    wall_s: float | None = None
    tokens: int | None = None
    plateau: int | None = 3  # rounds without a better kernel; None never stops for it


@dataclasses.dataclass(frozen=True)
class JobResult:
    job: str
    status: str
    attempts: list[Attempt]
    best: Attempt | None  # the best correct attempt


def device_facts() -> dict:
    import jax

    backend = jax.default_backend()
    return {"backend": backend, "device": jax.devices()[0].device_kind,
            "timed": backend == "gpu", "pallas_interpret": backend != "gpu"}


def population(attempts: list[Attempt], size: int) -> list[Attempt]:
    """The best ``size`` correct attempts with distinct source, best first."""
    seen, best = set(), []
    for a in sorted((a for a in attempts if a.correct), key=rank_key, reverse=True):
        if a.code.strip() not in seen:
            seen.add(a.code.strip())
            best.append(a)
    return best[:size]


def build_prompt(task: tasks.Task, device: dict, attempts: list[Attempt], *, population_size: int = 3,
                 failures: int = 3, failed_lines: int = 80) -> str:
    shapes = "\n".join(f"  {json.dumps(s)}  (atol, rtol) = {task.tolerance_for(s)}" for s in task.test_shapes)
    bench = "\n".join(f"  {json.dumps(s)}" for s in task.bench_shapes)
    where = (f"{device['device']} ({device['backend']}): kernels are timed against the baselines"
             if device["timed"] else
             f"{device['device']} ({device['backend']}): no GPU, so correctness only; run Pallas with "
             "interpret=jax.default_backend() != \"gpu\"")
    parts = [
        f"# Task {task.name} ({task.family}, level {task.level}): {task.summary}",
        f"Write kernel.py defining kernel(*inputs, **static) that computes what this reference computes "
        f"(static keyword arguments: {', '.join(task.static_keys) or 'none'}):\n"
        f"```python\n{inspect.getsource(task.reference)}```",
        f"Checked on these shapes plus one fresh shape (entries {', '.join(task.vary) or 'none'} redrawn), "
        f"each with new random inputs:\n{shapes}\nTimed (on a GPU) on:\n{bench}",
        f"Device: {where}.",
        f"Rules: import only {', '.join(ALLOWED_IMPORTS)} (not {', '.join(BANNED_PREFIXES)}); no files, "
        "processes, threads, state kept between calls or special-cased benchmark shapes.",
    ]
    for i, a in enumerate(population(attempts, population_size), 1):
        parts.append(f"## Best kernel so far #{i} (attempt {a.id})\nFeedback: {a.feedback}\n```python\n{a.code}```")
    failed = [a for a in attempts if not a.correct][-failures:]
    for a in failed:
        parts.append(f"## Failed attempt {a.id}\nFeedback: {a.feedback}")
    if failed and failed[-1].code:
        # The latest failure's code, so the fix can start from it (long sources cut: the feedback matters more).
        lines = failed[-1].code.splitlines()
        shown = "\n".join(lines[:failed_lines])
        cut = f"\n({len(lines) - failed_lines} more lines)" if len(lines) > failed_lines else ""
        parts.append(f"Its code (attempt {failed[-1].id}):\n```python\n{shown}\n```{cut}")
    if attempts:
        parts.append("Improve on these: fix what failed, and make the best kernel faster.")
    return "\n\n".join(parts) + "\n"


def feedback(result: dict) -> str:
    """What the next prompt should know about one harness result, in a few lines."""
    if result["violations"]:
        return "rejected by the anti-cheat checks: " + "; ".join(result["violations"])
    if result["error"]:
        return f"error: {result['error']}"
    checks = result.get("checks", [])
    bad = [c for c in checks if c["ratio"] > 1]
    if bad:
        c = max(bad, key=lambda c: c["ratio"])
        return (f"wrong output: error {c['ratio']:.3g}x the tolerance on shape {json.dumps(c['shape'])} "
                f"(seed {c['seed']}); {len(bad)} of {len(checks)} checks failed")
    note = f"correct on {len(checks)} checks (max error {result.get('max_ratio', 0):.3g}x the tolerance)"
    if result.get("timing"):
        t = result["timing"]
        return (f"{note}; {t['candidate_s'] * 1e6:.1f} us on {json.dumps(t['shape'])}, {t['speedup']:.2f}x the best "
                f"baseline, {t['bandwidth_fraction']:.1%} of peak bandwidth, {t['flops_fraction']:.1%} of peak FLOP/s")
    return f"{note}; {result.get('timing_note', 'not timed')}"


@dataclasses.dataclass(frozen=True)
class Verdict:
    correct: bool
    feedback: str
    result: dict  # the harness's result ({} when it never ran)
    seconds: float  # judging time, harness start-up included


def evaluate(task: str, proposal: Proposal, limits: Limits) -> Verdict:
    """The harness's verdict on one proposal; a proposer's or the harness's failure is a verdict too."""
    start = time.monotonic()
    if proposal.code is None:
        return Verdict(False, proposal.error or "no code", {}, 0.0)
    with tempfile.TemporaryDirectory(prefix="specjax-agent-") as tmp:
        (Path(tmp) / "kernel.py").write_text(proposal.code)
        try:
            result = run_candidate(tmp, task, limits=limits, **proposal.fidelity)
        except Exception as e:  # the harness refusing odd arguments must not end the job
            return Verdict(False, f"harness error: {type(e).__name__}: {e}", {}, time.monotonic() - start)
    return Verdict(result["correct"], feedback(result), result, time.monotonic() - start)


def evaluate_all(jobs: list[tuple[str, Proposal]], limits: Limits, workers: int = 1) -> Iterator[Verdict]:
    """``evaluate`` for each (task, proposal), up to ``workers`` harness subprocesses at once; results are
    yielded in the order of ``jobs``, each as soon as it and those before it are done."""
    if workers <= 1 or len(jobs) <= 1:
        yield from (evaluate(task, p, limits) for task, p in jobs)
        return
    # Threads suffice: each one only waits on its harness subprocess.
    with ThreadPoolExecutor(min(workers, len(jobs)), thread_name_prefix="specjax-agent-eval") as pool:
        futures = [pool.submit(evaluate, task, p, limits) for task, p in jobs]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:  # an interrupted round starts nothing new
                future.cancel()


def _spent(budget: Budget, attempts: list[Attempt], started: float) -> str | None:
    if len(attempts) >= budget.attempts:
        return f"budget: {len(attempts)} attempts"
    if budget.tokens is not None and sum(a.tokens for a in attempts) >= budget.tokens:
        return f"budget: {sum(a.tokens for a in attempts)} tokens"
    if budget.wall_s is not None and time.monotonic() - started >= budget.wall_s:
        return f"budget: {budget.wall_s:.0f} s of wall time"
    return None


def run_job(store: Store, job_id: str, task_name: str, proposer: Proposer, budget: Budget = Budget(), *,
            k: int = 1, population_size: int = 3, limits: Limits = Limits(wall_s=300), workers: int = 1) -> JobResult:
    """Run (or resume) job ``job_id`` until its budget, a plateau, or the proposer runs dry.

    workers: how many of a round's proposals are judged at once (each in its own harness subprocess).
    """
    task = tasks.get(task_name)  # an unknown task fails here, before a job is stored
    store.open_job(job_id, task_name, proposer.name, proposer.config())
    device = device_facts()
    attempts = store.attempts(job_id)
    started = time.monotonic()
    round_ = max((a.round for a in attempts), default=-1) + 1
    stale = 0
    try:
        while (status := _spent(budget, attempts, started)) is None:
            before = max(map(quality, attempts), default=None)
            context = Context(task, build_prompt(task, device, attempts, population_size=population_size),
                              attempts, min(k, budget.attempts - len(attempts)))
            proposals = proposer.propose(context)
            if not proposals:
                status = "done: the proposer has nothing left to try"
                break
            proposals = proposals[:context.k]
            for p, v in zip(proposals, evaluate_all([(task_name, p) for p in proposals], limits, workers)):
                attempts.append(store.add_attempt(job_id, round_, p.code, p.params, v.correct, v.feedback, v.result,
                                                  p.tokens, v.seconds))
            round_ += 1
            stale = stale + 1 if before is not None and max(map(quality, attempts)) <= before else 0
            if budget.plateau is not None and stale >= budget.plateau:
                status = f"plateau: no better kernel in {stale} rounds"
                break
    except BaseException:
        store.set_status(job_id, "interrupted")
        raise
    store.set_status(job_id, status)
    best = population(attempts, 1)
    return JobResult(job_id, status, attempts, best[0] if best else None)
