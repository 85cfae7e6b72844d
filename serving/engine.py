"""The serving engine: one background thread steps an LLM's Scheduler while requests come and go.

HTTP handlers (on the asyncio event loop) build requests and ``submit`` them; the engine thread
takes them in between steps, so prefill chunks and decode steps of different requests interleave,
and hands each step's text to the request's ``Stream`` through ``loop.call_soon_threadsafe``. Only
the engine thread touches the runner, the drafts and the page table: device steps never overlap.
Cancelling a stream (a client that went away) aborts its request before the next step, which frees
its KV pages at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time

from serving.metrics import Metrics
from specjax.engine.adapters import AdapterInUse
from specjax.llm import LLM, Request
from specjax.lora import AdapterError

log = logging.getLogger("specjax.serving")


class QueueFull(Exception):
    """The waiting queue is at ``max_queue``: the client should retry later."""


class EngineError(RuntimeError):
    """A step failed; the requests in it were dropped."""


class Stream:
    """One request's output as the engine produces it: ``async for text in stream`` yields its text
    in pieces until it finishes; then ``output`` holds the whole RequestOutput. While reading,
    ``tokens_read`` is how many of its tokens the pieces so far came from (their logprobs are
    ``output.logprobs[:tokens_read]``)."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop):
        self.request = request
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.finished = False  # set on the event loop, when the last piece has been read
        self.tokens_read = 0  # event loop: the output's tokens behind the pieces read so far
        self.tokens_counted = 0  # engine thread: tokens already counted in the metrics
        self.first_token_at: float | None = None  # engine thread: perf_counter time of the first token

    @property
    def output(self):
        return self.request.output

    def _put(self, item) -> None:
        """From the engine thread: a (text, finished, tokens so far) piece, or an exception to raise in the reader."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is reading any more
            pass

    async def __aiter__(self):
        while not self.finished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            text, self.finished, self.tokens_read = item
            if text:
                yield text


class Engine:
    """Runs ``llm``'s requests with continuous batching in one background thread.

    ``max_queue``: most requests waiting for a slot or for KV pages; ``submit`` raises QueueFull
    beyond it. Requests submitted during a step count as waiting only past the batch slots that
    were free after it: the next step admits them.
    """

    def __init__(self, llm: LLM, *, max_queue: int = 256):
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be a positive integer, got {max_queue!r}")
        self.llm = llm
        self.max_queue = max_queue
        self.scheduler = llm.scheduler(interleave=True)
        pages = llm.runner.pages
        self.metrics = Metrics(len(llm.methods) > 1, waiting=lambda: self.num_waiting,
                               running=lambda: len(self.scheduler.running), pages_used=lambda: pages.num_used,
                               pages_total=pages.num_pages, compile_seconds=lambda: llm.compile_time_s)
        self._cond = threading.Condition()
        self._inbox: list[tuple[str, Stream]] = []  # ("add" | "abort", stream), applied between steps
        self._waiting = 0  # the scheduler's waiting queue after the engine thread last looked
        self._free_slots = self.scheduler.max_running  # batch slots the next step can fill, as last seen
        self._streams: dict[int, Stream] = {}  # engine thread: unfinished requests by uid
        self._unfinished = 0  # submitted and not yet finished (guarded by _cond)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="specjax-engine", daemon=True)

    # -- any thread ---------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        with self._cond:
            return self._num_waiting()

    def _num_waiting(self) -> int:  # with _cond held
        submitted = sum(1 for op, _ in self._inbox if op == "add")
        return max(0, self._waiting + submitted - self._free_slots)

    @property
    def num_unfinished(self) -> int:
        with self._cond:
            return self._unfinished

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort everything and end the engine thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop) -> Stream:
        """Queue a request (from ``LLM.new_request``); its text arrives on the returned Stream."""
        stream = Stream(request, loop)
        with self._cond:
            if self._stopping:
                raise EngineError("the engine is stopped")
            if self._num_waiting() >= self.max_queue:
                self.metrics.rejected.inc()
                raise QueueFull(f"{self._num_waiting()} requests are already waiting for a batch slot or KV pages "
                                f"(max_queue {self.max_queue})")
            self._inbox.append(("add", stream))
            self._unfinished += 1
            self._cond.notify()
        return stream

    def abort(self, stream: Stream) -> None:
        """Cancel a request (waiting or running): its pages are freed before the next step."""
        with self._cond:
            self._inbox.append(("abort", stream))
            self._cond.notify()

    def abort_all(self) -> None:
        with self._cond:
            self._inbox.append(("abort_all", None))
            self._cond.notify()

    def unload_adapter(self, name: str) -> concurrent.futures.Future:
        """Stop serving LoRA adapter ``name``, between steps: the future fails with ``AdapterInUse``
        while a submitted request (waiting or running) uses it, so none is ever cut off; a request
        submitted after the unload fails alone."""
        return self._between_steps("unload", name)

    def call(self, fn) -> concurrent.futures.Future:
        """Run ``fn()`` on the engine thread between steps (what touches the runner: starting and
        cancelling finetuning jobs); the future holds its result or exception."""
        return self._between_steps("call", fn)

    def _between_steps(self, op: str, arg) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise EngineError("the engine is stopped")
            self._inbox.append((op, (arg, future)))
            self._cond.notify()
        return future

    def _unload(self, name: str, future: concurrent.futures.Future) -> None:
        scheduler = self.scheduler
        users = sum(req.adapter == name for req in (*scheduler.waiting, *scheduler.running))
        try:
            if users:
                raise AdapterInUse(f"adapter {name!r} is in use by {users} unfinished request(s); unload it "
                                   "once they finish")
            self.llm.remove_adapter(name)
        except AdapterError as e:
            future.set_exception(e)
        else:
            future.set_result(None)

    # -- the engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        scheduler = self.scheduler
        while True:
            with self._cond:
                while not (self._inbox or scheduler.has_work or scheduler.finetuning or self._stopping):
                    self._cond.wait()
                commands, self._inbox = self._inbox, []
                stopping = self._stopping
            for op, stream in commands:
                if op == "add":
                    self._streams[stream.request.uid] = stream
                    scheduler.add(stream.request)
                elif op == "abort":
                    self._abort(stream)
                elif op == "unload":
                    self._unload(*stream)
                elif op == "call":
                    fn, future = stream
                    try:
                        future.set_result(fn())
                    except Exception as e:  # the caller's to report
                        future.set_exception(e)
                else:
                    self._abort_all()
            if stopping:
                self._abort_all()
                if self.llm.engine.finetuner is not None:
                    self.llm.engine.finetuner.stop()
                return
            self._sync_waiting()
            if not (scheduler.has_work or scheduler.finetuning):
                continue
            preemptions = scheduler.preemptions
            try:
                events = scheduler.step()
            except Exception:  # the scheduler fails a step's culprit alone; this is anything else of ours
                log.exception("engine step failed")
                self._abort_all(EngineError("generation failed (an internal error, logged by the server)"))
                continue
            self.metrics.preemptions.inc(scheduler.preemptions - preemptions)
            # Before any client hears of a finished request (and sends its next): the step admitted some.
            self._sync_waiting()
            self._deliver(events)

    def _sync_waiting(self) -> None:
        scheduler = self.scheduler
        with self._cond:
            self._waiting = len(scheduler.waiting)
            # When pages, not slots, held requests back at the last step, free slots admit nobody.
            self._free_slots = 0 if scheduler.short_of_pages else scheduler.max_running - len(scheduler.running)

    def _deliver(self, events) -> None:
        now = time.perf_counter()
        pieces: dict[int, list] = {}  # uid -> [text, finished]: one piece per request and step
        for req, text, finished in events:
            piece = pieces.setdefault(req.uid, ["", False])
            piece[0] += text
            piece[1] = finished
        for stream in self._streams.values():
            self._count_tokens(stream, now)
        for uid, (text, finished) in pieces.items():
            stream = self._streams[uid]
            if stream.output.finish_reason == "error":  # the scheduler logged why; the client hears no internals
                stream._put(EngineError("generation failed for this request (an internal error, logged by the server)"))
            else:
                stream._put((text, finished, len(stream.output.token_ids)))
            if finished:
                self._done(stream, now)

    def _count_tokens(self, stream: Stream, now: float) -> None:
        out = stream.request.output
        new = len(out.token_ids) - stream.tokens_counted
        if new > 0:
            if stream.tokens_counted == 0:
                stream.first_token_at = now
                self.metrics.time_to_first_token.observe(out.stats.ttft_s)
            self.metrics.generated_tokens.inc(new)
            stream.tokens_counted += new

    def _done(self, stream: Stream, now: float) -> None:
        del self._streams[stream.request.uid]
        self.metrics.finished(stream.request.output, stream.first_token_at, now)
        with self._cond:
            self._unfinished -= 1

    def _abort(self, stream: Stream, error: Exception | None = None) -> None:
        if stream.request.uid not in self._streams:
            return  # finished already
        self.scheduler.abort(stream.request)
        stream._put(error if error is not None else ("", True, len(stream.output.token_ids)))
        self._done(stream, time.perf_counter())

    def _abort_all(self, error: Exception | None = None) -> None:
        for stream in list(self._streams.values()):
            self._abort(stream, error)
        self._sync_waiting()
