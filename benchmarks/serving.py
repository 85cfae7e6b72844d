"""Load against the OpenAI-compatible server: plain decoding, each speculation method and the
batch-aware policy, at several load levels (closed-loop clients and open-loop Poisson arrival
rates), in one run.

    python benchmarks/serving.py                     # 1 client, rates 0.2,0.5,2 req/s; 2 rounds of 14 requests
    python benchmarks/serving.py --quick             # a smoke run: 1 client and 2 rates x 4 requests of 16 tokens
    python benchmarks/serving.py --rates 0.5,4 --clients 1,4 --n 32 --methods plain,suffix,batch-aware --workloads code

Each method gets its own server (``serving.server`` over its own ``LLM``, a real uvicorn server on
a free port of 127.0.0.1, in a thread of a child process that also runs the client; XLA's CPU
executables keep their code memory for a process's life, and several servers' worth in one
process exhausted a small VM's). All of them see the same requests at the same times:

  plain        no speculation (the reference)
  draft        a chain of ``--k`` tokens from ``--draft``
  suffix       suffix speculation (SuffixDecoding's suffix cache)
  hybrid       suffix where its draft scores well, else the draft chain
  batch-aware  suffix speculation sized per step for the whole batch
               (``SuffixSpeculation(batch_aware=True)``, specjax/speculation/budget.py)

Every server first compiles every step shape its requests can meet (``LLM.warm_up``, as
``specjax serve --warmup`` does; ``--compile-cache`` keeps them for the next run), then answers
``--warmup`` requests in closed bursts of 1, 2, 4, ... (up to ``--max-batch``), so its suffix cache
holds some earlier responses. Requests: the chat-templated held-out requests of ``--workloads``,
taken in turn from each workload. The runs go in ``--rounds`` rounds; in each round every load
level gets the next ``--n`` requests, served by every method in turn (the order turns each round,
so machine drift is spread over the methods rather than landing on one). Load levels:

  --clients c  closed loop: c clients, each sending its next request when its last one ends (as
               vLLM's benchmark with --max-concurrency); 1 client is the lightest load a server
               meets with no idle time, where throughput is the speed of one request
  --rates r    open loop: Poisson arrivals at r requests per second (exponential gaps, seeded by
               ``--seed``, the round and the rate, the same for every method), whatever the
               earlier requests are doing; at a low rate the server is mostly idle and throughput
               follows the arrivals

Each run records the 1-minute load average at its start.

The client streams every request (OpenAI's async client, ``stream=True``, greedy) and times it
from the SSE stream: TTFT is the time to the first chunk carrying text, TPOT the time after it
per further output token (usage's ``completion_tokens``), throughput the output tokens over the
time from the first request to the last response. tau (tokens per verification step) and
acceptance come from the server's Prometheus counters, read before and after each run; the
seconds the server spent compiling during a run (none, once every step shape is compiled ahead)
are read from its LLM. A method's rounds at a load level are then pooled: latency percentiles over all
their requests, throughput as all output tokens over the runs' summed time.

Results: a table on stdout and JSON in benchmarks/results/serving-<subject>-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import math
import multiprocessing
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(_REPO_ROOT))

import numpy as np  # noqa: E402

from benchmarks import acceptance, common  # noqa: E402
from benchmarks.workloads import WORKLOADS, load_workload  # noqa: E402

METHODS = ("plain", "draft", "suffix", "hybrid", "batch-aware")
MODEL_NAME = "bench"  # the name the servers serve under
# The counters of serving/metrics.py that tau and acceptance are computed from (prometheus suffixes _total).
SPEC_COUNTERS = ("steps", "tokens", "proposed_tokens", "accepted_tokens")
QUICK = {"clients": [1], "rates": [0.5, 2.0], "n": 4, "rounds": 1, "max_tokens": 16, "warmup": 3,
         "workloads": ["chat", "code"]}


# ---------------------------------------------------------------------------- requests and arrivals
def interleaved_requests(workloads: list[str], n: int, seed: int) -> list:
    """The first ``n`` requests of the workloads taken in turn (a, b, c, a, b, c, ...)."""
    per = -(-n // len(workloads))
    each = [load_workload(w, n=per, seed=seed) for w in workloads]
    if short := [w for w, rs in zip(workloads, each) if len(rs) < per]:
        raise ValueError(f"the workload(s) {', '.join(short)} hold fewer than the {per} requests asked for")
    return [r for group in zip(*each) for r in group][:n]


@dataclasses.dataclass(frozen=True)
class Load:
    """A load level: ``clients`` closed-loop clients, or Poisson arrivals at ``rate`` per second."""

    clients: int | None = None
    rate: float | None = None

    @property
    def label(self) -> str:
        return f"{self.clients} client{'s' * (self.clients > 1)}" if self.clients else f"{self.rate:g}/s"


def poisson_offsets(rate: float, n: int, seed: int) -> list[float]:
    """Seconds from the first arrival to each of ``n`` Poisson arrivals at ``rate`` per second."""
    rng = np.random.default_rng([seed, round(rate * 1000)])
    return np.concatenate([[0.0], np.cumsum(rng.exponential(1 / rate, n - 1))]).tolist()


# ---------------------------------------------------------------------------- servers
def speculations(methods: list[str], draft, k: int, max_spec_tokens: int) -> dict:
    """Each method's ``speculation=`` for its LLM (None: plain decoding)."""
    from specjax.speculation.speculator import TreeSpeculation
    from specjax.speculation.suffix import HybridSpeculation, SuffixSpeculation

    chain = TreeSpeculation(drafts=(draft,), expansion=(1,) * k, max_nodes=k + 1)
    suffix = SuffixSpeculation(max_spec_tokens=max_spec_tokens)
    return {m: {"plain": None, "draft": chain, "suffix": suffix, "hybrid": HybridSpeculation(suffix=suffix, tree=chain),
                "batch-aware": SuffixSpeculation(max_spec_tokens=max_spec_tokens, batch_aware=True)}[m]
            for m in methods}


@contextlib.contextmanager
def running_server(llm):
    """A real uvicorn server for ``llm`` in a thread, on a free port of 127.0.0.1; yields its URL."""
    from serving.engine import Engine

    # Nothing waits in this benchmark's queue for long, but a saturating rate may queue every request.
    with serving_engine(Engine(llm, max_queue=1024)) as url:
        yield url


@contextlib.contextmanager
def serving_engine(engine, **app_options):
    """A real uvicorn server for a ``serving.engine.Engine`` in a thread, on a free port of
    127.0.0.1 (``app_options`` go to ``create_app``); yields its URL."""
    from serving.server import Server, create_app

    server = Server(create_app(engine, model_name=MODEL_NAME, expose_speculation_stats=True, **app_options), engine,
                    log_level="warning")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def speculation_counters(url: str) -> dict[str, float]:
    """The server's speculation counters (summed over labels); zeros for a server that does not speculate."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    totals = dict.fromkeys(SPEC_COUNTERS, 0.0)
    for family in text_string_to_metric_families(text):
        name = family.name.removeprefix("specjax_speculation_")
        if name in totals:
            totals[name] = sum(s.value for s in family.samples if s.name.endswith("_total"))
    return totals


def speculation_delta(before: dict[str, float], after: dict[str, float]) -> dict | None:
    """tau and acceptance of the verification steps between two reads of the counters; None without any."""
    d = {k: after[k] - before[k] for k in SPEC_COUNTERS}
    if not d["steps"]:
        return None
    return {"steps": int(d["steps"]), "step_tokens": int(d["tokens"]), "proposed": int(d["proposed_tokens"]),
            "accepted": int(d["accepted_tokens"]), "tau": d["tokens"] / d["steps"],
            "acceptance_rate": d["accepted_tokens"] / d["proposed_tokens"] if d["proposed_tokens"] else 0.0}


# ---------------------------------------------------------------------------- the client
async def stream_one(client, request, max_tokens: int, start_at: float) -> dict:
    """Send ``request`` at perf_counter time ``start_at``, streamed and greedy; its timings and text."""
    import openai

    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    sent = time.perf_counter()
    record = {"id": request.id, "workload": request.workload, "late_s": sent - start_at}
    first, pieces, usage, finish = None, [], None, None
    try:
        stream = await client.chat.completions.create(
            model=MODEL_NAME, messages=request.messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                pieces.append(chunk.choices[0].delta.content)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            usage = chunk.usage or usage
    except openai.APIError as e:
        return {**record, "error": f"{type(e).__name__}: {e}"}
    done = time.perf_counter()
    if usage is None or first is None:
        return {**record, "error": "the stream ended without text or usage"}
    tokens = usage.completion_tokens
    return {**record, "prompt_tokens": usage.prompt_tokens, "output_tokens": tokens, "finish_reason": finish,
            "ttft_s": first - sent, "latency_s": done - sent,
            "tpot_s": (done - first) / (tokens - 1) if tokens > 1 else None,
            "start_s": sent, "end_s": done, "text": "".join(pieces)}


async def send_all(url: str, requests: list, offsets: list[float], max_tokens: int) -> list[dict]:
    """Open loop: every request at its offset from now, whatever the earlier ones are doing."""
    import openai

    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600) as client:
        t0 = time.perf_counter() + 0.05
        return await asyncio.gather(*(stream_one(client, r, max_tokens, t0 + o) for r, o in zip(requests, offsets,
                                                                                                 strict=True)))


async def send_closed(url: str, requests: list, clients: int, max_tokens: int) -> list[dict]:
    """Closed loop: ``clients`` clients, each sending the next unsent request as soon as its last one ends."""
    import openai

    records: list[dict] = [{}] * len(requests)
    unsent = iter(enumerate(requests))  # shared: each next() hands one request to one client

    async def client_loop(client) -> None:
        for i, request in unsent:
            records[i] = await stream_one(client, request, max_tokens, time.perf_counter())

    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return records


def warm_up(url: str, requests: list, max_tokens: int, max_batch: int) -> None:
    """Closed bursts of 1, 2, 4, ... requests at once (at most ``max_batch``), each awaited before the next."""
    size = 1
    while requests:
        burst, requests = requests[:size], requests[size:]
        records = asyncio.run(send_all(url, burst, [0.0] * len(burst), max_tokens))
        if errors := [r["error"] for r in records if "error" in r]:
            raise RuntimeError(f"a warm-up request failed: {errors[0]}")
        size = min(2 * size, max_batch)


# ---------------------------------------------------------------------------- one run
def percentile_stats(seconds: list[float]) -> dict:
    """common.latency_stats (median, p90, mean, ...) plus the p99, in milliseconds."""
    stats = common.latency_stats(seconds)
    if seconds:
        stats["p99_ms"] = float(np.percentile(np.asarray(seconds) * 1e3, 99))
    return stats


def latency_summary(done: list[dict]) -> dict:
    """TTFT, TPOT and latency percentiles of finished request records."""
    return {"ttft": percentile_stats([r["ttft_s"] for r in done]),
            "tpot": percentile_stats([r["tpot_s"] for r in done if r["tpot_s"] is not None]),
            "latency": percentile_stats([r["latency_s"] for r in done])}


def measure(url: str, llm, requests: list, offsets: list[float] | None, clients: int | None, max_tokens: int) -> dict:
    """One method at one load level: the requests sent open-loop at ``offsets`` or by ``clients``
    closed-loop clients; their latencies, throughput and tau."""
    before, compiled = speculation_counters(url), llm.compile_time_s
    records = asyncio.run(send_all(url, requests, offsets, max_tokens) if offsets is not None
                          else send_closed(url, requests, clients, max_tokens))
    after = speculation_counters(url)
    done = [r for r in records if "error" not in r]
    span = max((r["end_s"] for r in done), default=0.0) - min((r["start_s"] for r in records), default=0.0)
    tokens = sum(r["output_tokens"] for r in done)
    t0 = min(r["start_s"] for r in records)
    for r in done:  # times relative to the run's first request
        r["start_s"], r["end_s"] = r["start_s"] - t0, r["end_s"] - t0
    return {"completed": len(done), "errors": len(records) - len(done), "output_tokens": tokens,
            "seconds": span, "tokens_per_s": tokens / span if span > 0 else 0.0, **latency_summary(done),
            "max_late_ms": 1e3 * max(r["late_s"] for r in records),
            "speculation": speculation_delta(before, after), "compile_s": llm.compile_time_s - compiled,
            "requests": records}


# ---------------------------------------------------------------------------- command line
def positive_floats(text: str) -> list[float]:
    """``"0.5,2"`` -> [0.5, 2.0] (argparse ``type=``); ``""`` -> []; every entry must be a positive number."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_target_and_draft(p)
    p.add_argument("--max-spec-tokens", type=int, default=31, help="suffix draft size at most (default %(default)s)")
    p.add_argument("--methods", type=common.name_list, default=list(METHODS),
                   help=f"comma-separated, from {', '.join(METHODS)} (default: all; plain always runs)")
    p.add_argument("--workloads", type=common.name_list, default=["chat", "code", "agentic"],
                   help="comma-separated workloads, their requests taken in turn (default chat,code,agentic)")
    p.add_argument("--clients", type=functools.partial(common.int_list, allow_empty=True), default=[1],
                   help="closed-loop load levels: clients each sending a request when its last one ends "
                        "('': none; default 1)")
    p.add_argument("--rates", type=positive_floats, default=[0.2, 0.5, 2.0],
                   help="open-loop load levels: Poisson arrival rates, requests per second ('': none; "
                        "default 0.2,0.5,2)")
    p.add_argument("--n", type=int, default=14, help="requests per load level (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request at most (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most (default %(default)s)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds of --n requests a load level; each round runs every method in turn (default %(default)s)")
    p.add_argument("--warmup", type=int, default=6,
                   help="requests each server answers after compiling, in bursts of 1, 2, 4, ... (default %(default)s)")
    p.add_argument("--compile-cache", default=os.environ.get("SPECJAX_COMPILE_CACHE"),
                   help="JAX's persistent compilation cache for the servers' warm-ups ('' or unset: none; "
                        "default $SPECJAX_COMPILE_CACHE)")
    p.add_argument("--page-size", type=int, default=16, help="KV page size (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="workload sample and arrival times (default 0)")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: {','.join(map(str, QUICK['clients']))} client, rates "
                        f"{','.join(map(str, QUICK['rates']))}, {QUICK['n']} requests each in "
                        f"{QUICK['rounds']} round, "
                        f"{QUICK['max_tokens']} tokens, {QUICK['warmup']} warm-up requests, workloads "
                        f"{','.join(QUICK['workloads'])} (options given explicitly still win)")
    p.add_argument("--out", type=Path, help="JSON result path")
    args = p.parse_args(argv)
    if args.quick:
        common.apply_quick(args, QUICK, argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    bad = [w for w in args.workloads if w not in WORKLOADS]
    if bad or not args.workloads:
        p.error(f"unknown workload(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(WORKLOADS)}")
    for name in ("n", "rounds", "max_tokens", "max_batch", "k", "max_spec_tokens", "page_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be non-negative, got {args.warmup}")
    if len(set(args.rates)) != len(args.rates):
        p.error(f"--rates has a rate twice: {args.rates}")
    if len(set(args.clients)) != len(args.clients):
        p.error(f"--clients has a level twice: {args.clients}")
    if not args.rates and not args.clients:
        p.error("no load level: give --clients or --rates")
    args.loads = [Load(clients=c) for c in args.clients] + [Load(rate=r) for r in args.rates]
    return args


def log(text: str) -> None:
    print(f"[serving] {text}", flush=True)


def run_blocks(args: argparse.Namespace) -> list[tuple[int, Load, int]]:
    """(round, load level, first request index) of each run in the order every server serves them:
    each round goes through every load level, each run taking the next ``--n`` requests."""
    return [(r, load, (r * len(args.loads) + i) * args.n) for r in range(args.rounds) for i, load in enumerate(args.loads)]


def method_server(args: argparse.Namespace, method: str, conn) -> None:
    """A child process: one server speculating as ``method``, compiled ahead (``LLM.warm_up``) and
    warmed with ``--warmup`` requests, then a run per (start index, arrival offsets or None,
    closed-loop clients or None) the parent sends, until it sends None. Replies ("ready", info), ("run", run) or ("error", traceback)."""
    import traceback

    try:
        from specjax.checkpoints import load_model
        from specjax.cli import use_compile_cache
        from specjax.llm import LLM

        if args.compile_cache:
            use_compile_cache(args.compile_cache)
        target = load_model(args.target, dtype="float32")
        requests = interleaved_requests(args.workloads, args.warmup + args.n * args.rounds * len(args.loads), args.seed)
        warm, measured = requests[: args.warmup], requests[args.warmup:]
        prompts = [target.tokenizer.encode_chat(r.messages)[1] for r in requests]
        # Pages for a full batch of the longest request, with room for the draft chain past its
        # end; no sequence longer than that, so the prefix buckets stop there.
        longest = max(len(p) for p in prompts) + args.max_tokens + args.k + 1
        engine = dataclasses.replace(acceptance.engine_for(target.config, prompts, args.max_tokens + args.k,
                                                           args.max_batch, page_size=args.page_size),
                                     max_model_len=longest)
        draft = target if args.draft == "target" else args.draft
        llm = LLM(target, engine=engine, seed=args.seed,
                  speculation=speculations([method], draft, args.k, args.max_spec_tokens)[method])
        start = time.perf_counter()
        shapes = llm.warm_up()
        info = {"shapes_compiled": shapes, "warm_up_s": time.perf_counter() - start}
        with running_server(llm) as url:
            start = time.perf_counter()
            warm_up(url, warm, args.max_tokens, args.max_batch)
            info.update(warm_up_requests=len(warm), warm_up_requests_s=time.perf_counter() - start)
            conn.send(("ready", info))
            while (command := conn.recv()) is not None:
                first, offsets, clients = command
                conn.send(("run", measure(url, llm, measured[first: first + args.n], offsets, clients, args.max_tokens)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


class ChildServers:
    """Servers in child processes, one per name, all alive at once so their runs can interleave
    (only the one being measured does any work). ``servers``: (name, target, args) of each; the
    target runs ``target(*args, conn)`` and answers over ``conn``: ("ready", info) once, then
    ("run", result) per command, or ("error", traceback). They start one after another:
    compiling two at once only shares the cores. ``on_ready(name, info)`` as each is ready."""

    def __init__(self, servers: list[tuple[str, Callable, tuple]], on_ready: Callable[[str, dict], None]):
        context = multiprocessing.get_context("spawn")
        self.conns, self.processes, self.info = {}, {}, {}
        try:
            for name, target, args in servers:
                parent, child = context.Pipe()
                process = context.Process(target=target, args=(*args, child), name=f"serve-{name}", daemon=True)
                process.start()
                self.conns[name], self.processes[name] = parent, process
                self.info[name] = self._reply(name, "ready")
                on_ready(name, self.info[name])
        except BaseException:
            self.close()
            raise

    def _reply(self, name: str, expected: str):
        conn, process = self.conns[name], self.processes[name]
        while not conn.poll(1.0):
            if not process.is_alive():  # killed without a word (e.g. out of memory)
                raise RuntimeError(f"the {name} server's process died (exit code {process.exitcode})")
        kind, value = conn.recv()
        if kind == "error":
            raise RuntimeError(f"the {name} server failed:\n{value}")
        assert kind == expected, (kind, expected)
        return value

    def run(self, name: str, *command) -> dict:
        self.conns[name].send(command)
        return self._reply(name, "run")

    def close(self) -> None:
        for conn in self.conns.values():
            with contextlib.suppress(OSError):
                conn.send(None)
        for process in self.processes.values():
            process.join(120)
            if process.is_alive():
                process.kill()


def method_servers(args: argparse.Namespace, methods: list[str]) -> ChildServers:
    """One ``method_server`` per method; ``run(method, first, offsets, clients)``."""

    def ready(method: str, info: dict) -> None:
        log(f"{method}: compiled {info['shapes_compiled']} step shapes in {info['warm_up_s']:.0f} s, then answered "
            f"{info['warm_up_requests']} warm-up requests in {info['warm_up_requests_s']:.0f} s")

    return ChildServers([(m, method_server, (args, m)) for m in methods], ready)


def combined(runs: list[dict]) -> dict:
    """One method's runs at one load level (a run per round) as one: their requests pooled for the
    latency percentiles, throughput as all output tokens over all the runs' seconds, speculation
    counts summed."""
    requests = [q for r in runs for q in r["requests"]]
    done = [q for q in requests if "error" not in q]
    tokens, seconds = sum(r["output_tokens"] for r in runs), sum(r["seconds"] for r in runs)
    spec = None
    if all(r["speculation"] for r in runs):
        counts = {k: sum(r["speculation"][k] for r in runs) for k in ("steps", "step_tokens", "proposed", "accepted")}
        spec = {**counts, "tau": counts["step_tokens"] / counts["steps"],
                "acceptance_rate": counts["accepted"] / counts["proposed"] if counts["proposed"] else 0.0}
    return {**{k: runs[0][k] for k in ("load", "clients", "rate", "method")}, "rounds": len(runs),
            "completed": len(done), "errors": len(requests) - len(done), "output_tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "tokens_per_s_by_round": [r["tokens_per_s"] for r in runs],
            **latency_summary(done),
            "max_late_ms": max(r["max_late_ms"] for r in runs), "speculation": spec,
            "compile_s": sum(r["compile_s"] for r in runs),
            "load_average_1m": [r["load_average_1m"] for r in runs], "requests": requests}


def main(argv=None) -> int:
    args = parse_args(argv)
    env = common.environment()
    if warning := common.load_warning(env):
        log(warning)
    methods = ["plain"] + [m for m in args.methods if m != "plain"]
    rounds = []
    servers = method_servers(args, methods)
    try:
        for round_index, level, first in run_blocks(args):
            offsets = poisson_offsets(level.rate, args.n, args.seed + round_index) if level.rate else None
            # The order turns each round, so a drift of the machine's speed is spread over the methods.
            for method in methods[round_index % len(methods):] + methods[: round_index % len(methods)]:
                load = os.getloadavg()[0]
                run = servers.run(method, first, offsets, level.clients)
                rounds.append({"round": round_index, "load": level.label, "clients": level.clients, "rate": level.rate,
                               "method": method, "load_average_1m": load, **run})
                log(f"round {round_index}, {method} at {level.label}: {run['completed']}/{args.n} done in "
                    f"{run['seconds']:.1f} s, {run['tokens_per_s']:.1f} tok/s, compiling {run['compile_s']:.1f} s, "
                    f"load average {load:.1f} at the start")
    finally:
        servers.close()
    labels = [level.label for level in args.loads]
    results = compared_with_plain([combined([r for r in rounds if (r["load"], r["method"]) == (label, method)])
                                   for label in labels for method in methods])
    rows = table_rows(results, methods, labels)
    common.print_table(
        f"serving · {args.target} · {','.join(args.workloads)} · {args.rounds} x {args.n} requests a load level, at "
        f"most {args.max_tokens} tokens, greedy, max batch {args.max_batch} · {env['device_kind']} · "
        f"jax {env['jax_version']} · {env['date_utc'][:10]}",
        ["load", "method", "done", "tok/s", "vs plain", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "tau",
         "acceptance", "same text", "compile s"], rows,
        [f"draft: {args.draft}, chain of {args.k}; suffix: at most {args.max_spec_tokens} tokens; TTFT/TPOT in ms, "
         "client-side from the SSE stream; tok/s: output tokens over the runs' time, each run from its first request "
         "to its last response; load: closed-loop clients, or open-loop Poisson arrivals per second; same text: outputs equal to plain's; compile s: compilation during the runs "
         "(0: every step shape was compiled ahead)"])
    payload = {"benchmark": "serving", "target": args.target, "workloads": args.workloads,
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "environment": env, "methods": methods, "servers": servers.info,
               "arrivals": {str(rate): [poisson_offsets(rate, args.n, args.seed + r) for r in range(args.rounds)]
                            for rate in args.rates},
               "results": results, "runs": rounds}
    subject = f"{Path(args.target).name}-{'-'.join(args.workloads)}"
    out = args.out or common.default_results_path("serving", subject, env)
    log(f"wrote {common.write_json(out, payload)}")
    return 0


def compared_with_plain(runs: list[dict]) -> list[dict]:
    """The runs with their throughput relative to plain decoding's at the same load level (``vs_plain``)
    and how many of their outputs equal plain's (``same_text_as_plain``: greedy, so lossless methods match)."""
    plain = {r["load"]: r for r in runs if r["method"] == "plain"}

    def compared(run: dict) -> dict:
        reference, text = plain[run["load"]], {q["id"]: q.get("text") for q in plain[run["load"]]["requests"]}
        return {**run, "vs_plain": run["tokens_per_s"] / reference["tokens_per_s"] if reference["tokens_per_s"] else None,
                "same_text_as_plain": sum(q.get("text") is not None and q.get("text") == text[q["id"]]
                                          for q in run["requests"])}

    return [compared(r) for r in runs]


def table_rows(runs: list[dict], methods: list[str], labels: list[str]) -> list[list]:
    """One row per load level and method (from ``compared_with_plain``), methods in their listed order."""
    by_key = {(r["load"], r["method"]): r for r in runs}
    rows = []
    for label in labels:
        for method in methods:
            run = by_key[(label, method)]
            spec = run["speculation"] or {}
            rows.append([label, method, f"{run['completed']}/{len(run['requests'])}",
                         common.fmt(run["tokens_per_s"], 1), common.fmt(run["vs_plain"], 2),
                         common.fmt(run["ttft"].get("median_ms"), 0), common.fmt(run["ttft"].get("p99_ms"), 0),
                         common.fmt(run["tpot"].get("median_ms"), 1), common.fmt(run["tpot"].get("p99_ms"), 1),
                         common.fmt(spec.get("tau"), 2), common.fmt(spec.get("acceptance_rate"), 2),
                         f"{run['same_text_as_plain']}/{len(run['requests'])}", common.fmt(run["compile_s"], 1)])
    return rows


if __name__ == "__main__":
    sys.exit(main())
