"""Co-serving (FlexLLM): LoRA finetuning jobs share the engine's steps with inference, token by token.

A ``Finetuner`` holds an engine's finetuning jobs. Each job feeds its conversations one at a time
through ``engine.finetuning``'s chunked forward and backward phases (any chunk size, each chunk a
slice of one step), and steps its optimizer once every ``batch_size x grad_accum`` conversations,
in ``specjax finetune``'s data order, so its losses and adapter are that run's.

Memory: a job's sequence takes its KV pages from the engine's own pool (``PageTable``), only
while no request waits for pages, and gives them back first when inference needs them (the
sequence starts again later; its partial sums are dropped with it, so the job stays exact). Its
K/V cotangents are set aside before the pool is sized (``EngineConfig.max_finetune_jobs``).

Scheduling (``CoservingPolicy``): inference is placed first. A slice joins a decode step only
while the step's predicted time keeps the TPOT SLO, and none joins while a request's time to first
token is at risk; with no inference at all, slices of the largest chunk run alone. Predictions
come from the engine's own step times (seeded at start-up, refined as steps run). Several jobs
take turns, the one that has processed the fewest tokens first.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Callable

import jax
import numpy as np

from specjax.config import ConfigError
from specjax.engine.finetuning import (FinetuneSlice, FinetuneWork, JobState, SequenceState, apply_update, init_job,
                                       init_sequence, make_chunk)
from specjax.finetune import Examples, FinetuneSettings, make_optimizer, step_rows
from specjax.lora import LoraAdapter, LoraConfig, init_adapter
from specjax.speculation.budget import StepCostModel

log = logging.getLogger("specjax.coserving")


@dataclass(frozen=True)
class SLO:
    """Latency targets inference keeps while finetuning shares its steps, in seconds (None: no
    target). margin: the share of each target predicted times are kept under."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    margin: float = 0.9

    def __post_init__(self):
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        if not 0 < self.margin <= 1:
            raise ConfigError(f"margin must be in (0, 1], got {self.margin!r}")


class JobLimit(RuntimeError):
    """More finetuning jobs than the engine runs at once."""


# ---------------------------------------------------------------------------- one job
@dataclass
class CoservedJob:
    """A finetuning job's host state: where it is in its data, and in its current sequence."""

    id: str
    settings: FinetuneSettings
    examples: Examples
    optimizer: object
    step: int = 0  # optimizer steps done
    index: int = 0  # conversations of the current step done
    status: str = "running"  # running, succeeded or failed
    tokens_done: int = 0  # sequence tokens through both phases
    losses: list[tuple[int, float]] = field(default_factory=list)
    # Held-out conversations: every ``settings.eval_every`` steps and after the last, their mean
    # loss per learnt token with the adapter of that step (forward chunks only), before the step
    # is reported. ``evaluation``: the rows of the evaluation under way (None: training).
    validation: Examples | None = None
    evaluation: list[int] | None = None
    valid_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens_evaluated: int = 0
    _valid_sums: tuple[float, float] = (0.0, 0.0)
    # The sequence in flight: its tokens and learnt mask, phase, next position (forward: the next
    # chunk's start; backward: the next chunk's end) and whether it holds KV pages.
    tokens: np.ndarray | None = None
    learn: np.ndarray | None = None
    backward: bool = False
    position: int = 0
    has_pages: bool = False
    signature: tuple = ()
    error: str | None = None
    # Called on the engine thread after each optimizer step (with its mean loss), and once when
    # the job fails (with None): the server's events, checkpoints and metrics.
    on_update: Callable[["CoservedJob", float | None], None] | None = None

    @property
    def per_step(self) -> int:
        return self.settings.batch_size * self.settings.grad_accum

    @property
    def seq_id(self) -> tuple:
        return ("finetune", self.id)

    @property
    def finished(self) -> bool:
        return self.step >= self.settings.total_steps

    @property
    def evaluating(self) -> bool:
        return self.evaluation is not None

    def load_sequence(self) -> None:
        """The current step's next conversation (or the evaluation's), cut after its last learnt
        token: what follows it (its padding, a last turn's end) reaches neither the loss nor its
        gradient."""
        if self.evaluating:
            row, examples = self.evaluation[0], self.validation
        else:
            row, examples = step_rows(len(self.examples), self.step, self.per_step, self.settings.seed)[self.index], \
                self.examples
        tokens, learn = examples.tokens[row], examples.learn[row]
        length = int(np.nonzero(learn)[0].max()) + 1  # tokenize keeps only conversations with a learnt token
        self.tokens, self.learn = tokens[:length], learn[:length]
        self.backward, self.position = False, 0


# ---------------------------------------------------------------------------- costs and policy
class CoservingPolicy:
    """Sizes each step's finetuning slice from SLOs and predicted step times.

    inference: seconds of decode steps by (rows, tokens or tree nodes per row, prefix pages), from
    the engine's own steps; alone / added: seconds of a slice by (backward, chunk), run alone, and
    what it added to the decode steps it joined; overhead: the seconds between two decode steps
    that no device step takes (the host's sampling, streaming and scheduling, the other decode
    groups), which the TPOT a client sees includes (exponential moving averages)."""

    def __init__(self, slo: SLO, chunks: tuple[int, ...], alpha: float = 0.3):
        self.slo = slo
        self.chunks = tuple(sorted(set(chunks)))
        self.alpha = alpha
        self.inference = StepCostModel()
        self.alone: dict[tuple[bool, int], float] = {}
        self.added: dict[tuple[bool, int], float] = {}
        self.overhead: float | None = None

    def observe_overhead(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self.overhead = seconds if self.overhead is None else self.overhead + self.alpha * (seconds - self.overhead)

    def _ema(self, table: dict, key, seconds: float) -> None:
        old = table.get(key)
        table[key] = seconds if old is None else old + self.alpha * (seconds - old)

    def observe_alone(self, backward: bool, chunk: int, seconds: float) -> None:
        self._ema(self.alone, (backward, chunk), seconds)

    def observe_fused(self, backward: bool, chunk: int, rows: int, size: int, pages: int, seconds: float) -> None:
        base = self.inference.cost(rows, size, pages)
        if base is not None:
            self._ema(self.added, (backward, chunk), max(seconds - base, 0.0))

    def slice_cost(self, backward: bool, chunk: int, fused: bool) -> float | None:
        """Predicted seconds of a slice (added to a decode step when ``fused``); None if nothing
        of its kind has been timed: scaled from the nearest timed chunk otherwise."""
        for table in ((self.added, self.alone) if fused else (self.alone,)):
            if (backward, chunk) in table:
                return table[(backward, chunk)]
            timed = [c for (b, c) in table if b == backward]
            if timed:
                nearest = min(timed, key=lambda c: abs(np.log(c / chunk)))
                return table[(backward, nearest)] * chunk / nearest
        return None

    def fused_chunk(self, backward: bool, rows: int, size: int, pages: int, spent: float,
                    ttft_at_risk: bool, fused: bool = True) -> int | None:
        """The chunk of the slice to fuse into a decode step of ``rows`` rows (``size`` tokens or
        tree nodes each, ``pages`` prefix pages) after ``spent`` seconds of this iteration's
        other steps (``fused`` False: to run alone right after it); None: finetuning waits this
        step."""
        if ttft_at_risk:
            return None
        decode = self.inference.cost(rows, size, pages)
        if decode is None:
            return None  # nothing known yet: let inference steps be timed first
        if self.slo.tpot_s is None:
            limit = decode  # without a target, finetuning may at most double a decode step
        else:
            limit = self.slo.tpot_s * self.slo.margin - (self.overhead or 0.0) - spent - decode
        best = None
        for chunk in self.chunks:
            cost = self.slice_cost(backward, chunk, fused=fused)
            if cost is None:
                return self.chunks[0] if best is None and limit > 0 else best  # try the smallest, then learn
            if cost <= limit:
                best = chunk
        return best

    def ttft_at_risk(self, waiting_ages: list[float]) -> bool:
        """Whether requests not yet past their prefill have waited long enough that finetuning
        should not slow the steps they wait for: half the TTFT target; with no target, any wait."""
        if not waiting_ages:
            return False
        if self.slo.ttft_s is None:
            return True
        return max(waiting_ages) > 0.5 * self.slo.ttft_s * self.slo.margin


# ---------------------------------------------------------------------------- the jobs of an engine
class Finetuner:
    """An engine's co-served finetuning jobs over its runner (``ModelRunner``)."""

    def __init__(self, runner, slo: SLO = SLO()):
        engine = runner.engine
        if not engine.max_finetune_jobs:
            raise ConfigError("co-serving needs EngineConfig.max_finetune_jobs > 0 (--max-finetune-jobs)")
        self.runner = runner
        self.max_jobs = engine.max_finetune_jobs
        self.max_len = min(engine.max_finetune_len, runner.max_model_len)
        self.pages = runner.finetune_pages
        self.policy = CoservingPolicy(slo, tuple(c for c in engine.finetune_chunks if c <= self.max_len)
                                      or (min(engine.finetune_chunks),))
        self.fusion = engine.finetune_fusion
        self.jobs: dict[str, CoservedJob] = {}
        self.evictions = 0  # sequences whose pages went back to inference
        self.slices = {"fused": 0, "alone": 0}  # slices run in inference steps and in steps of their own
        self._update = jax.jit(apply_update, static_argnums=1, donate_argnums=0)

    # -- start-up ---------------------------------------------------------------------------------
    def check_slo(self, repeats: int = 3) -> dict[str, float]:
        """Time a prompt chunk and a decode step of one request, alone on the device; refuse SLOs
        they already miss without any finetuning (``ConfigError``), and seed the policy's decode
        costs. Returns the seconds measured ("prefill", "decode")."""
        runner, slo = self.runner, self.policy.slo
        chunk = min(runner.interleaved_prefill_chunk, runner.max_model_len - repeats - 1)
        probe = ("slo-probe",)
        rng = np.random.default_rng(0)
        runner.add_sequence(probe, chunk + repeats + 1)
        try:
            from specjax.engine.step import StepInput

            prefill = []
            for run in range(2):  # the first run of an executable is slow: time the second
                if run:  # the same prompt position again, on fresh pages
                    runner.release(probe)
                    runner.add_sequence(probe, chunk + repeats + 1)
                _, seconds = runner.step([StepInput(probe, rng.integers(0, runner.config.vocab_size, chunk).tolist())])
                prefill.append(seconds)
            decode = []
            for _ in range(repeats + 1):
                pages = runner.prefix_page_bucket([probe])
                _, seconds = runner.step([StepInput(probe, [int(rng.integers(runner.config.vocab_size))])])
                decode.append(seconds)
            self.policy.inference.observe(1, 1, pages, min(decode[1:]))
        finally:
            runner.release(probe)
        measured = {"prefill": prefill[-1], "decode": min(decode[1:])}
        if slo.tpot_s is not None and measured["decode"] >= slo.tpot_s * slo.margin:
            raise ConfigError(f"the TPOT SLO of {slo.tpot_s * 1e3:.1f} ms cannot be kept: one request's decode step "
                              f"takes {measured['decode'] * 1e3:.1f} ms on this device without any finetuning (and "
                              f"steps are kept under {slo.margin:.0%} of the target)")
        if slo.ttft_s is not None and measured["prefill"] >= slo.ttft_s * slo.margin:
            raise ConfigError(f"the TTFT SLO of {slo.ttft_s * 1e3:.1f} ms cannot be kept: one {chunk}-token prompt "
                              f"chunk takes {measured['prefill'] * 1e3:.1f} ms on this device without any finetuning")
        return measured

    def stop(self) -> None:
        """Every job gives its sequence's pages back (the server is stopping; jobs resume from
        their checkpoints when it starts again)."""
        while self.evict():
            pass

    # -- jobs -----------------------------------------------------------------------------------
    @property
    def active(self) -> list[CoservedJob]:
        return [j for j in self.jobs.values() if j.status == "running"]

    def add(self, job_id: str, settings: FinetuneSettings, examples: Examples, *, adapter: LoraAdapter | None = None,
            opt_state=None, step: int = 0, on_update=None, validation: Examples | None = None) -> CoservedJob:
        """Start a job (from ``step`` with ``adapter`` and ``opt_state`` when resuming), evaluated
        on ``validation`` if given."""
        if job_id in self.jobs:
            raise ValueError(f"a job {job_id!r} already runs")
        if len(self.jobs) >= self.max_jobs:
            raise JobLimit(f"{len(self.jobs)} finetuning jobs already run; the server runs at most {self.max_jobs} "
                           "at once (--max-finetune-jobs)")
        if settings.max_len > self.max_len:
            raise ValueError(f"max_len {settings.max_len} exceeds the longest finetuning sequence this engine "
                             f"holds, {self.max_len} (--max-finetune-len)")
        if not len(examples):
            raise ValueError("a finetuning job needs at least one conversation")
        config, runner = self.runner.config, self.runner
        settings.lora.check_fits(config)
        optimizer = make_optimizer(settings)
        if adapter is None:
            adapter = init_adapter(settings.lora, config, jax.random.key(settings.seed))
        state = init_job(adapter, optimizer)
        if opt_state is not None:
            state = state.replace(opt_state=opt_state)
        sequence = self._sequence(adapter)
        runner.cell.jobs[job_id] = (state, sequence)
        signature = self._signature(state, sequence)
        job = CoservedJob(id=job_id, settings=settings, examples=examples, optimizer=optimizer, step=step,
                          signature=signature, on_update=on_update,
                          validation=validation if validation is not None and len(validation) else None)
        if job.finished:
            job.status = "succeeded"
        self.jobs[job_id] = job
        return job

    def _sequence(self, adapter: LoraAdapter) -> SequenceState:
        runner = self.runner
        return init_sequence(adapter, runner.config, self.pages, runner.engine.page_size, runner.cache.k.dtype)

    @staticmethod
    def _signature(state: JobState, sequence: SequenceState) -> tuple:
        """What the compiled steps a job's slices run in depend on: the shapes of what a fused
        step takes of the job (its optimizer state stays out)."""
        stepped = (state.replace(opt_state=None), sequence)
        return jax.tree.structure(stepped), tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(stepped))

    def warm_up_jobs(self, lora: LoraConfig, tree_sizes: tuple[int, ...] = (), max_len: int | None = None
                     ) -> list[Callable[[], None]]:
        """A thunk per executable not yet compiled that slices of a job with adapter settings
        ``lora`` meet (each chunk fused into every decode and verification bucket, and alone):
        compiling one on first use would stall every request of its step."""
        adapter = init_adapter(lora, self.runner.config, jax.random.key(0))
        state, sequence = init_job(adapter), self._sequence(adapter)
        keys = self.runner.coserved_keys(self.policy.chunks, self._signature(state, sequence), tree_sizes, max_len)
        return [functools.partial(self.runner.compile_coserved, key, state, sequence) for key in keys
                if not self.runner.has_executable(key) and (self.fusion or key[0] == "finetune")]

    def state(self, job_id: str) -> JobState:
        """The job's device state (adapter, optimizer state) as of its last step."""
        return self.runner.cell.jobs[job_id][0]

    def remove(self, job_id: str) -> JobState | None:
        """Drop a job (finished or cancelled), freeing its pages and device state; returns its state."""
        job = self.jobs.pop(job_id, None)
        if job is None:
            return None
        self._drop_pages(job)
        state, _ = self.runner.cell.jobs.pop(job_id)
        return state

    # -- pages ----------------------------------------------------------------------------------
    def _drop_pages(self, job: CoservedJob) -> None:
        if job.has_pages:
            self.runner.release(job.seq_id)
            job.has_pages = False

    def holds_pages(self) -> bool:
        return any(j.has_pages for j in self.jobs.values())

    def evict(self) -> bool:
        """Give one job's sequence pages back to inference (the least advanced sequence first); the
        sequence starts again later. False if no job holds pages."""
        holders = [j for j in self.jobs.values() if j.has_pages]
        if not holders:
            return False
        job = min(holders, key=lambda j: (j.backward, j.position if not j.backward else -j.position))
        self._drop_pages(job)
        state, sequence = self.runner.cell.jobs[job.id]
        self.runner.cell.jobs[job.id] = (state, jax.tree.map(jax.numpy.zeros_like, sequence))
        job.backward, job.position = False, 0
        self.evictions += 1
        log.info("finetuning job %s gave its sequence's pages back to inference", job.id)
        return True

    def _ensure_pages(self, job: CoservedJob, may_take_pages: bool) -> bool:
        if job.tokens is None:
            job.load_sequence()
        if job.has_pages:
            return True
        if not may_take_pages or not self.runner.can_admit(len(job.tokens)):
            return False
        self.runner.add_sequence(job.seq_id, len(job.tokens))
        job.has_pages = True
        return True

    # -- slices ---------------------------------------------------------------------------------
    def next_job(self, may_take_pages: bool) -> CoservedJob | None:
        """The job whose slice runs next: of those with pages (or able to take them), the one that
        has processed the fewest tokens."""
        for job in sorted(self.active, key=lambda j: j.tokens_done + j.tokens_evaluated):
            try:
                if self._ensure_pages(job, may_take_pages):
                    return job
            except Exception as error:  # its data: this job's failure alone
                self.fail(job, error)
        return None

    def make_slice(self, job: CoservedJob, chunk: int) -> FinetuneSlice:
        length = len(job.tokens)
        if job.backward:
            end = job.position
            start = max(0, end - chunk)
        else:
            start = job.position
            end = min(start + chunk, length)
        pages = self.runner.pages.block_table([job.seq_id], self.pages)[0]
        work = FinetuneWork(chunk=make_chunk(job.tokens, job.learn, start, chunk, end), pages=pages,
                            backward=job.backward)
        return FinetuneSlice(job=job.id, work=work, bucket=(chunk, self.pages, job.signature, job.backward))

    def advance(self, job: CoservedJob, piece: FinetuneSlice) -> None:
        """Move ``job`` past a slice that ran."""
        n = int(piece.work.chunk.length)
        if not job.backward:
            job.position += n
            if job.position >= len(job.tokens):
                if job.evaluating:
                    self._evaluated(job)
                else:
                    job.backward = True
            return
        job.position -= n
        job.tokens_done += n
        if job.position > 0:
            return
        self._drop_pages(job)  # the sequence is through: its sums are in the window
        job.tokens, job.index = None, job.index + 1
        if job.index == job.per_step:
            self._optimizer_step(job)

    def _optimizer_step(self, job: CoservedJob) -> None:
        state, sequence = self.runner.cell.jobs[job.id]
        state, loss = self._update(state, job.optimizer)
        self.runner.cell.jobs[job.id] = (state, sequence)
        loss = float(loss)
        job.losses.append((job.step, loss))
        job.step, job.index = job.step + 1, 0
        if not np.isfinite(loss):
            raise FloatingPointError(f"the loss of step {job.step - 1} is {loss}: lower the learning rate, "
                                     "or check the data")
        if job.validation is not None and (job.step % job.settings.eval_every == 0 or job.finished):
            job.evaluation, job._valid_sums = list(range(len(job.validation))), (0.0, 0.0)
            return
        self._step_done(job, loss)

    def _evaluated(self, job: CoservedJob) -> None:
        """An evaluation sequence went through: its sums join the evaluation's (and leave the
        sequence state); after the last one, the step is reported with its validation loss."""
        state, sequence = self.runner.cell.jobs[job.id]
        loss, tokens = job._valid_sums
        job._valid_sums = (loss + float(sequence.loss_sum), tokens + float(sequence.tokens))
        self.runner.cell.jobs[job.id] = (state, jax.tree.map(jax.numpy.zeros_like, sequence))
        job.tokens_evaluated += len(job.tokens)
        self._drop_pages(job)
        job.tokens = None
        job.evaluation.pop(0)
        if job.evaluation:
            return
        loss, tokens = job._valid_sums
        job.valid_losses.append((job.step, loss / max(tokens, 1.0)))
        job.evaluation = None
        self._step_done(job, job.losses[-1][1])  # the training loss of the step evaluated

    def _step_done(self, job: CoservedJob, loss: float) -> None:
        if job.finished:
            job.status = "succeeded"
        if job.on_update is not None:
            job.on_update(job, loss)

    def fail(self, job: CoservedJob, error: Exception) -> None:
        """End ``job`` with ``error``: its pages and device state go; inference is not touched."""
        log.error("finetuning job %s failed: %s: %s", job.id, type(error).__name__, error)
        job.status, job.error = "failed", f"{type(error).__name__}: {error}"
        if job.id in self.jobs:
            self.remove(job.id)
        if job.on_update is not None:
            job.on_update(job, None)

    def _run_alone(self, job: CoservedJob, piece: FinetuneSlice) -> float:
        """Run ``piece`` in a step of its own; a failure fails its job alone."""
        try:
            elapsed = self.runner.finetune(piece)
            if not self.runner.first_run:
                self.policy.observe_alone(job.backward, piece.bucket[0], elapsed)
            self.slices["alone"] += 1
            self.advance(job, piece)
        except Exception as error:
            self.fail(job, error)
            return 0.0
        return elapsed

    def run_alone(self, may_take_pages: bool = True) -> float:
        """A step of finetuning alone, the largest chunk (the engine has no inference to run);
        returns its seconds (0 if no job could run)."""
        job = self.next_job(may_take_pages)
        if job is None:
            return 0.0
        return self._run_alone(job, self.make_slice(job, self.policy.chunks[-1]))

    def run_slice(self, piece: FinetuneSlice) -> None:
        """Run alone a slice meant to join a step that ran without it (it had no target pass to
        fuse with, or it failed: run alone, the slice fails its job if it was the culprit)."""
        self._run_alone(self.jobs[piece.job], piece)

    def fused_slice(self, rows: int, size: int, pages: int, spent: float, waiting_ages: list[float],
                    may_take_pages: bool) -> FinetuneSlice | None:
        """The slice to fuse into a decode step of ``rows`` rows (``size`` tokens or tree nodes
        each, ``pages`` prefix pages), if the policy allows one."""
        job = self.next_job(may_take_pages)
        if job is None:
            return None
        chunk = self.policy.fused_chunk(job.backward, rows, size, pages, spent,
                                        self.policy.ttft_at_risk(waiting_ages), fused=self.fusion)
        return None if chunk is None else self.make_slice(job, chunk)

    def fused_done(self, piece: FinetuneSlice, rows: int, size: int, pages: int, elapsed: float) -> None:
        job = self.jobs[piece.job]
        if not self.runner.first_run:
            self.policy.observe_fused(job.backward, piece.bucket[0], rows, size, pages, elapsed)
        self.slices["fused"] += 1
        try:
            self.advance(job, piece)
        except Exception as error:
            self.fail(job, error)

