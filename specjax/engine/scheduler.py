"""Continuous batching: the request lifecycle (admit, grow, preempt, finish) over a KV-page pool.

Each ``step`` first gives every decoding request the KV pages its next step writes (its new
token, or a verified tree's depth ahead), preempting the most recently admitted requests when the
pool runs dry: their pages are freed and they go back to the front of the waiting queue, their
output kept, to be recomputed (prefilled again, prompt and output so far) when re-admitted
(vLLM's recompute policy); greedy output and streams are the same as without preemption. Then,
unless it preempted, it admits waiting requests in order while slots and pages allow (a request
joins with pages for its prefill and one step), runs the prompt chunks still to prefill and, when
nothing is prefilling or with ``interleave``, one decode step: speculative for the requests that
speculate, whatever their methods, plain for the others.

With ``interleave`` a long prompt must not hold up the others. Prompt chunks run grouped by
their padded length, shortest first, so a short prompt is neither padded to a long one's chunk
nor queued behind it; and while requests decode, chunks are cut to
``interleaved_prefill_chunk`` tokens, since each decoding request's next token waits for them.

The scheduler knows requests, their kinds and their proposers only through the proposer
interface: it never looks inside a speculation method.

A failing step fails only the request that caused it. A step of one request that raises fails
that request (``finish_reason`` "error"). A step of several that raises names no culprit: its
requests are recomputed (their pages may hold part of the failed step) and run that kind of step
alone until one succeeds, so the culprit's next failure is its own. A failure that took the KV
caches with it (donated to a call that never returned them) leaves fresh caches, and every running
request is recomputed.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from typing import Callable, Protocol

from specjax.engine.core import EngineCore, StepOutcome
from specjax.engine.output import OutputProcessor
from specjax.engine.request import Request
from specjax.lora import AdapterError

Event = tuple[Request, str, bool]  # (request, new text, finished)

log = logging.getLogger("specjax.engine")


class PageManager(Protocol):
    """The KV-page pool as the scheduler uses it (``runner.ModelRunner`` is one)."""

    def can_admit(self, num_tokens: int) -> bool: ...
    def add_sequence(self, seq_id, num_tokens: int) -> None: ...
    def can_grow(self, seq_id, num_tokens: int) -> bool: ...
    def reserve(self, seq_id, num_tokens: int) -> None: ...
    def release(self, seq_id) -> None: ...


class Scheduler:
    """Continuous batching of one engine's requests, one step at a time. ``LLM.generate`` runs a
    Scheduler per call; the server runs one for its whole life. Not thread-safe: one thread adds,
    aborts and steps, so device steps never overlap."""

    def __init__(self, core: EngineCore, *, interleave: bool = False):
        self.core = core
        self.finetuner = core.finetuner  # co-served finetuning jobs (engine.coserving), if any
        self.kv: PageManager = core.runner
        self.output = OutputProcessor()
        self.interleave = interleave  # decode while others prefill, so long prompts do not stall streams
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is preempted first
        self.preemptions = 0
        self.short_of_pages = False  # whether the last step left requests waiting with batch slots free
        self._iterations = 0
        # (iteration, end) of the last decode step finetuning could join: the time from its end to
        # the next one's start, less that iteration's prompt steps, is the host's share of a token
        self._last_decode: tuple[int, float] | None = None

    @property
    def max_running(self) -> int:
        """The most requests a step runs (the batch's slots)."""
        return self.core.runner.engine.max_num_seqs

    @property
    def has_work(self) -> bool:
        """Whether requests wait or run (finetuning jobs alone keep a server's loop stepping, not
        ``LLM.generate``'s)."""
        return bool(self.waiting or self.running)

    @property
    def finetuning(self) -> bool:
        """Whether finetuning jobs have work to do."""
        return self.finetuner is not None and bool(self.finetuner.active)

    def add(self, request: Request) -> None:
        if request.kind != "generate":
            raise ValueError(f"this scheduler runs generation requests, not {request.kind!r}")
        self.waiting.append(request)

    def abort(self, request: Request) -> bool:
        """Drop a waiting or running request, freeing its pages now; False if it is not here."""
        if request in self.waiting:
            self.waiting.remove(request)
            if request.output.stats.preemptions:  # preempted: its proposers still follow it
                self._stop(request)
        elif request in self.running:
            self._finish(request)
        else:
            return False
        request.output.finish_reason = "abort"
        return True

    # -- pages -------------------------------------------------------------------------------
    def _kv_tokens(self, req: Request, length: int) -> int:
        """KV tokens ``req`` needs for a decode step on a sequence of ``length`` tokens: a
        verification may write its tree's depth ahead."""
        lookahead = req.proposer.lookahead if req.proposer is not None else 0
        return min(length + lookahead, req.kv_limit)

    def _can_admit(self, req: Request) -> bool:
        length = req.num_prefill + 1  # the prefill and the token it samples: the first decode step
        return self.kv.can_admit(self._kv_tokens(req, length)) and all(
            part.can_admit(length) for part in self.core.parts(req)) and (
            req.adapter is None or self.core.adapters.can_acquire(req.adapter))

    def _room_for(self, req: Request) -> bool:
        """Whether ``req`` can be admitted, once finetuning sequences have given back their pages if
        that is what it takes."""
        while not self._can_admit(req):
            if self.finetuner is None or not self.finetuner.evict():
                return False
        return True

    def _admit(self, req: Request) -> None:
        length = req.num_prefill + 1
        if req.adapter is not None:  # first: an adapter unloaded since the request arrived fails it alone
            req.lora_slot = self.core.adapters.acquire(req.adapter)
        self.kv.add_sequence(req.uid, self._kv_tokens(req, length))
        attached = []
        # A preempted request's proposers still follow it (host state only, and its sequence is unchanged).
        starting = self.core.followers_of(req) if not req.output.stats.preemptions else []
        try:
            for part in self.core.parts(req):
                part.attach(req.uid, length)
                attached.append(part)
            for follower in starting:
                follower.start(req.uid, req.output.prompt_token_ids, req.cache_scope)
        except Exception:
            self.kv.release(req.uid)
            for part in attached:
                part.detach(req.uid)
            self._release_adapter(req)
            raise
        self.running.append(req)

    def _grow(self, req: Request) -> bool:
        """Give ``req`` the pages of its next decode step, in the target and its proposers alike
        (all or nothing); False if the pool is short."""
        parts = self.core.parts(req)
        length = len(req.output.prompt_token_ids) + len(req.output.token_ids)
        tokens = self._kv_tokens(req, length)
        if not (self.kv.can_grow(req.uid, tokens) and all(part.can_grow(req.uid, length) for part in parts)):
            return False
        self.kv.reserve(req.uid, tokens)
        for part in parts:
            part.grow(req.uid, length)
        return True

    def _release(self, req: Request) -> None:
        self.kv.release(req.uid)
        for part in self.core.parts(req):
            part.detach(req.uid)
        self._release_adapter(req)
        self.running.remove(req)

    def _release_adapter(self, req: Request) -> None:
        if req.lora_slot:
            self.core.adapters.release(req.lora_slot)
            req.lora_slot = 0

    def _stop(self, req: Request) -> None:
        for follower in self.core.followers_of(req):  # the output joins the suffix cache for later requests
            follower.stop(req.uid, req.sequence)

    def _finish(self, req: Request) -> None:
        self._release(req)
        self._stop(req)

    def _preempt(self, req: Request) -> None:
        """Free ``req``'s pages and queue it first, to be recomputed from its prompt and output so far."""
        self._release(req)
        req.prefilled = 0
        req.num_prefill = len(req.output.prompt_token_ids) + len(req.output.token_ids)
        req.output.stats.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)  # preempted later means admitted earlier: it goes first

    def _grow_running(self) -> bool:
        """Pages for every decoding request's next step, oldest first, preempting from the newest
        while the pool is short; returns whether anything was preempted. A request alone always
        fits (``EngineCore.make_request`` refuses any that would not), so the oldest always makes
        progress."""
        preempted = False
        for req in list(self.running):
            if req not in self.running or req.prefilled < req.num_prefill:
                continue  # preempted already, or still prefilling into pages it was admitted with
            while not self._grow(req):
                if self.finetuner is not None and self.finetuner.evict():  # finetuning's pages go first
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
        return preempted

    # -- one step --------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """Grow or preempt, admit what fits and run one step; returns (request, new text, finished)
        for each token that gave a request text or finished it. Finished requests have left, their
        pages freed."""
        max_seqs = self.max_running
        self._iterations += 1
        # After a preemption the pool is known to be short: admitting now would only preempt again.
        events = []
        if not self._grow_running():
            while self.waiting and len(self.running) < max_seqs and self._room_for(self.waiting[0]):
                req = self.waiting.popleft()
                try:
                    self._admit(req)
                except AdapterError as error:  # its adapter was unloaded while it waited
                    events.append(self._fail(req, error))
        self.short_of_pages = bool(self.waiting) and len(self.running) < max_seqs
        prefilling = [r for r in self.running if r.prefilled < r.num_prefill]
        decoding = ([r for r in self.running if r not in prefilling]
                    if self.interleave or not prefilling else [])
        runner = self.core.runner
        chunk = runner.interleaved_prefill_chunk if decoding else runner.engine.prefill_chunk
        by_length: dict[int, list[Request]] = {}  # by the padded length the runner gives each chunk
        for req in prefilling:
            length = runner.step_tokens(self.core.next_chunk(req, chunk), after_prefix=req.prefilled > 0)
            by_length.setdefault(length, []).append(req)
        prefill = functools.partial(self.core.plain_step, chunk=chunk)
        started, finetuned = time.perf_counter(), False
        for kind, run, group in ([("prefill", prefill, by_length[n]) for n in sorted(by_length)] + [
                ("decode", self.core.plain_step, [r for r in decoding if r.proposer is None]),
                ("decode", self.core.speculative_step, [r for r in decoding if r.proposer is not None])]):
            group = [r for r in group if r in self.running]  # not finished, failed or recomputed since
            alone = [r for r in group if r.suspect == kind]
            for batch in [[r] for r in alone] + ([rest] if (rest := [r for r in group if r not in alone]) else []):
                if kind == "decode" and self.finetuner is not None and not finetuned:
                    events += self._decode_with_finetuning(run, batch, time.perf_counter() - started)
                    finetuned = True
                else:
                    events += self._guarded(kind, run, batch)
        if self.finetuner is not None and not self.running and not self.waiting:
            self.finetuner.run_alone()  # idle: finetuning takes the whole step
        return events

    def _decode_with_finetuning(self, run, batch: list[Request], spent: float) -> list[Event]:
        """A decode step with the finetuning slice the policy allows fused into it, timed for the
        policy's predictions. The slice runs alone right after the step instead when the engine
        time-shares (``finetune_fusion`` off) or the step had no target pass to fuse with
        (draft-model trees only)."""
        finetuner = self.finetuner
        pages = self.core.runner.prefix_page_bucket([r.uid for r in batch])
        now = time.perf_counter()
        waiting = [now - r.arrival for r in self.waiting] + [
            now - r.arrival for r in self.running if r.prefilled < r.num_prefill]
        if self._last_decode is not None and self._last_decode[0] == self._iterations - 1:
            finetuner.policy.observe_overhead(now - self._last_decode[1] - spent)
        piece = (finetuner.fused_slice(len(batch), 1, pages, spent, waiting, may_take_pages=not self.waiting)
                 if finetuner.active else None)
        start = time.perf_counter()
        fused = piece is not None and finetuner.fusion
        events = self._guarded("decode", functools.partial(run, finetune=piece) if fused else run, batch)
        elapsed = time.perf_counter() - start
        if fused and piece.ran:
            finetuner.fused_done(piece, len(batch), 1, pages, elapsed)
        else:
            if not fused and not self.core.runner.first_run:
                finetuner.policy.inference.observe(len(batch), 1, pages, elapsed)
            # Time-sharing, or the step failed or had no target pass to fuse with: a step of its own.
            if piece is not None and piece.job in finetuner.jobs:
                finetuner.run_slice(piece)
        self._last_decode = (self._iterations, time.perf_counter())
        return events

    def _guarded(self, kind: str, run: Callable[[list[Request]], list[StepOutcome]], batch: list[Request]
                 ) -> list[Event]:
        """Run one step over ``batch`` and emit its tokens; a failure fails the request that caused
        it, when known, and harms no other (see the module's docstring)."""
        try:
            outcomes = run(batch)
        except Exception as error:
            log.exception("a %s step of %d request(s) failed", kind, len(batch))
            return self._recover(kind, batch, error)
        events = []
        for outcome in outcomes:
            if outcome.request.suspect == kind:  # its kind of step succeeded alone: it was not the culprit
                outcome.request.suspect = None
            try:
                events += self._emit(outcome)
            except Exception as error:  # detokenising or a stop string: this request's own
                log.exception("request %s: its output failed", outcome.request.uid)
                events.append(self._fail(outcome.request, error))
        for req, _, finished in events:
            if finished and req in self.running:
                self._finish(req)
        return events

    def _recover(self, kind: str, batch: list[Request], error: Exception) -> list[Event]:
        if len(batch) == 1:
            events = [self._fail(batch[0], error)]
        else:
            events = []
            for req in batch:
                req.suspect = kind
        lost = self.core.device_state_lost()
        if lost:
            self.core.reset_device_state()
        for req in reversed(list(self.running)):  # the newest first: the oldest ends first in line
            if lost or req in batch:
                self._preempt(req)
        return events

    def _fail(self, req: Request, error: Exception) -> Event:
        """Finish ``req`` with ``finish_reason`` "error"."""
        req.output.finish_reason = "error"
        req.output.error = f"{type(error).__name__}: {error}"
        if req in self.running:
            self._finish(req)
        return req, "", True

    def _emit(self, outcome: StepOutcome) -> list[Event]:
        """The events of a step's tokens for one request, and its speculation statistics."""
        req, events, used = outcome.request, [], 0
        for token, logprob in zip(outcome.tokens, outcome.logprobs):
            delta = self.output.advance(req, token, outcome.elapsed if used == 0 else 0.0, logprob,
                                        outcome.prefilled if used == 0 else 0)
            used += 1
            if delta or req.output.finished:
                events.append((req, delta or "", req.output.finished))
            if req.output.finished:
                break
        if (v := outcome.verified) is not None:
            # A finishing request may not need every accepted token: tau counts what it received.
            req.output.stats.speculation.record(v.proposed, v.depth, v.accepted, tokens=used,
                                                source=outcome.source if req.proposer.reports_sources else None)
        return events
