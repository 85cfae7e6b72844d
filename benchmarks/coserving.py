"""Co-serving (FlexLLM): chat inference at several request rates beside one LoRA finetuning job,
four ways, in one run.

    python benchmarks/coserving.py            # rates 0.1,0.2,0.4 req/s x 12 chat requests, 48 tokens
    python benchmarks/coserving.py --quick    # a smoke run: rates 0.2,0.5 x 4 requests of 16 tokens
    python benchmarks/coserving.py --slo-ttft 5 --slo-tpot 0.045 --rates 5,10,20 --n 200   # a GPU

The four ways, all on the same engine settings (the same page pool, compiled steps and SLOs):

  inference     the requests alone (no job)
  finetune      the job alone (no requests), for ``--finetune-window`` seconds
  time-sharing  the requests and the job, the job's slices in steps of their own between the
                decode steps, sized by the same SLO-aware policy (``finetune_fusion=False``)
  co-serving    the requests and the job, its slices fused into the decode steps (FlexLLM)

Two servers (``serving.server`` over its own ``LLM``, real uvicorn servers on 127.0.0.1, each in
a child process): one fuses (inference, finetune and co-serving run on it) and one time-shares.
Before taking traffic each compiles every step shape, the job's fused and alone slices
included (``LLM.warm_up(finetune_lora=)``), times its steps against the SLOs
(``Finetuner.check_slo``), then answers ``--warmup`` requests beside a job so the policy has
timed the slices it fuses. The job is created through the OpenAI fine-tuning API
(``training/examples/pirate.jsonl``, the default adapter settings, epochs enough never to end)
at the start of each run and cancelled at its end; a run's finetuning throughput is the tokens
the job trained (through its backward pass) over the run's time, from the job's start to the
last response.

Requests: the chat workload's held-out requests (ShareGPT) whose chat-templated prompts fit in
``--max-prompt`` tokens, sent open-loop at Poisson arrival times (the same for every way), each
streamed and greedy through OpenAI's async client. TTFT is the time to the first chunk with
text, TPOT the time after it per further token. A request meets the SLOs if its TTFT and its
TPOT are within ``--slo-ttft`` and ``--slo-tpot``; SLO attainment is the share that do. The rates
take turns, and at each rate the ways' order turns, so machine drift is spread over them.

Results: a table on stdout, the issue's three criteria checked below it, and JSON in
benchmarks/results/coserving-<target>-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(_REPO_ROOT))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.serving import (MODEL_NAME, ChildServers, latency_summary, poisson_offsets, positive_floats, send_all,  # noqa: E402
                                serving_engine)

WAYS = ("inference", "time-sharing", "co-serving")  # with requests; "finetune" runs without
DATA = _REPO_ROOT / "training" / "examples" / "pirate.jsonl"
QUICK = {"rates": [0.2, 0.5], "n": 4, "max_tokens": 16, "warmup": 2, "finetune_window": 20.0}


# ---------------------------------------------------------------------------- requests
def chat_requests(tokenizer, n: int, max_prompt: int, seed: int) -> list:
    """The first ``n`` held-out chat requests whose templated prompts hold at most ``max_prompt`` tokens."""
    from benchmarks.workloads import load_workload

    fitting = [r for r in load_workload("chat", n=4 * n + 16, seed=seed)
               if len(tokenizer.encode_chat(r.messages)[1]) <= max_prompt]
    if len(fitting) < n:
        raise ValueError(f"the chat workload holds {len(fitting)} requests of at most {max_prompt} prompt tokens "
                         f"among its first {4 * n + 16}, fewer than the {n} asked for: raise --max-prompt")
    return fitting[:n]


def slo_attainment(records: list[dict], ttft_s: float, tpot_s: float) -> float | None:
    """The share of requests (failed ones count as missing) within both targets."""
    if not records:
        return None
    met = [r for r in records if "error" not in r and r["ttft_s"] <= ttft_s
           and (r["tpot_s"] is None or r["tpot_s"] <= tpot_s)]
    return len(met) / len(records)


# ---------------------------------------------------------------------------- a server
class JobRunner:
    """The finetuning job of one run, through the server's fine-tuning API; its progress is read
    on the engine thread (``Engine.call``), where the job's state changes."""

    def __init__(self, url: str, engine, training_file: str):
        import openai

        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        self.engine, self.training_file = engine, training_file
        self.job_id: str | None = None

    def start(self) -> None:
        job = self.client.fine_tuning.jobs.create(model=MODEL_NAME, training_file=self.training_file, seed=0,
                                                  hyperparameters={"n_epochs": 1000, "batch_size": 4})
        if job.status != "running":
            raise RuntimeError(f"the finetuning job did not start: {job.status} {job.error}")
        self.job_id = job.id

    def progress(self) -> dict:
        """Tokens trained so far (through the backward pass, the current sequence's share too),
        optimizer steps, and the engine's slices run so far, fused and alone."""
        finetuner = self.engine.llm.engine.finetuner

        def read() -> dict:
            job = finetuner.jobs.get(self.job_id)
            partial = (len(job.tokens) - job.position if job is not None and job.backward and job.tokens is not None
                       else 0)
            return {"tokens": (job.tokens_done + partial) if job is not None else 0,
                    "steps": job.step if job is not None else 0, "evictions": finetuner.evictions,
                    **{f"slices_{k}": v for k, v in finetuner.slices.items()}}

        return self.engine.call(read).result()

    def policy(self) -> dict:
        """The co-serving policy's cost estimates now: what it sized the run's slices by."""
        policy = self.engine.llm.engine.finetuner.policy

        def read() -> dict:
            def named(table: dict) -> dict:
                return {f"{'backward' if backward else 'forward'} {chunk}": s for (backward, chunk), s in table.items()}

            return {"overhead_s": policy.overhead, "fused_added_s": named(policy.added), "alone_s": named(policy.alone)}

        return self.engine.call(read).result()

    def cancel(self) -> None:
        self.client.fine_tuning.jobs.cancel(self.job_id)
        self.job_id = None


def server_main(args: argparse.Namespace, fusion: bool, conn) -> None:
    """A child process: a server whose engine fuses slices (``fusion``) or time-shares, compiled
    ahead and warmed; then a run per command ("run", rate index, with a job, window seconds) the
    parent sends, until it sends None. Replies ("ready", info), ("run", result) or ("error", traceback)."""
    try:
        from serving.engine import Engine
        from serving.finetuning import default_lora
        from specjax.checkpoints import load_model
        from specjax.cli import use_compile_cache
        from specjax.engine.coserving import SLO
        from specjax.kv_cache import kv_bytes_per_token
        from specjax.llm import LLM
        from specjax.runner import EngineConfig, next_power_of_two

        if args.compile_cache:
            use_compile_cache(args.compile_cache)
        target = load_model(args.target, dtype="float32")
        warm, measured = requests_of(args, target.tokenizer)
        prompts = [target.tokenizer.encode_chat(r.messages)[1] for r in warm + measured]
        longest = max(len(p) for p in prompts) + args.max_tokens + 1
        # Pages for a full batch of the longest request and the job's sequence, and (set aside
        # before the pool is sized) the job's K/V gradients.
        sequence_pages = -(-args.max_finetune_len // args.page_size)
        pages = args.max_batch * (-(-longest // args.page_size) + 1) + sequence_pages + next_power_of_two(sequence_pages)
        engine = EngineConfig(page_size=args.page_size, max_num_seqs=args.max_batch, max_model_len=longest,
                              kv_cache_bytes=pages * args.page_size * kv_bytes_per_token(target.config, np.float32),
                              max_loras=1, max_lora_rank=8, max_finetune_jobs=1,
                              max_finetune_len=args.max_finetune_len, finetune_chunks=tuple(args.chunks),
                              finetune_fusion=fusion)
        llm = LLM(target, engine=engine, seed=args.seed, slo=SLO(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot))
        start = time.perf_counter()
        shapes = llm.warm_up(finetune_lora=default_lora(8))
        info = {"shapes_compiled": shapes, "warm_up_s": time.perf_counter() - start,
                "measured_alone_s": llm.engine.finetuner.check_slo(), "memory": memory_report(llm.runner)}
        serving = Engine(llm, max_queue=1024)
        with tempfile.TemporaryDirectory() as data_dir, serving_engine(
                serving, fine_tuning_dir=data_dir, checkpoint_every=10**9) as url:
            import openai

            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
            training = client.files.create(file=("pirate.jsonl", DATA.read_bytes()), purpose="fine-tune")
            job = JobRunner(url, serving, training.id)
            start = time.perf_counter()
            if warm:  # beside a job, in closed bursts, so the policy times the slices it fuses
                job.start()
                for first in range(0, len(warm), args.max_batch):
                    burst = warm[first: first + args.max_batch]
                    records = asyncio.run(send_all(url, burst, [0.0] * len(burst), args.max_tokens))
                    if errors := [r["error"] for r in records if "error" in r]:
                        raise RuntimeError(f"a warm-up request failed: {errors[0]}")
                job.cancel()
            info["warm_up_requests_s"] = time.perf_counter() - start
            conn.send(("ready", info))
            while (command := conn.recv()) is not None:
                conn.send(("run", run_once(args, llm, url, job, measured, *command)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


def memory_report(runner) -> list[dict]:
    """Per chunk and phase, at the largest decode bucket compiled: the bytes the fused step holds
    against the decode step's and the slice's alone (``ModelRunner.memory``: peak, and scratch)."""
    largest = {}  # (chunk, backward) -> the fused key of the largest decode bucket
    for key in sorted((k for k in runner.compiled_keys() if k[0] == "step" and "finetune" in k), key=lambda k: k[1:4]):
        largest[(key[5], key[-1])] = key
    return [{"chunk": chunk, "phase": "backward" if backward else "forward", "decode_bucket": list(key[1:4]),
             "fused": runner.memory(key), "decode": runner.memory(key[:4]),
             "alone": runner.memory(("finetune",) + key[5:])}
            for (chunk, backward), key in largest.items()]


def requests_of(args: argparse.Namespace, tokenizer) -> tuple[list, list]:
    """(warm-up requests, the measured requests: ``--n`` a rate, the rates' in turn)."""
    requests = chat_requests(tokenizer, args.warmup + args.n * len(args.rates), args.max_prompt, args.seed)
    return requests[: args.warmup], requests[args.warmup:]


def run_once(args, llm, url: str, job: JobRunner, measured: list, rate_index: int | None, with_job: bool,
             window_s: float | None) -> dict:
    """One run: the requests of rate ``rate_index`` at their arrival times (or none, for
    ``window_s`` seconds), beside a new job if ``with_job``."""
    compiled = llm.compile_time_s
    if with_job:
        job.start()
    before = job.progress() if with_job else None
    t0 = time.perf_counter()
    records = []
    if rate_index is not None:
        rate = args.rates[rate_index]
        requests = measured[rate_index * args.n: (rate_index + 1) * args.n]
        records = asyncio.run(send_all(url, requests, poisson_offsets(rate, args.n, args.seed), args.max_tokens))
    else:
        time.sleep(window_s)
    after = job.progress() if with_job else None
    seconds = time.perf_counter() - t0
    if with_job:
        job.cancel()
    done = [r for r in records if "error" not in r]
    result = {"seconds": seconds, "completed": len(done), "errors": len(records) - len(done),
              "output_tokens": sum(r["output_tokens"] for r in done), "compile_s": llm.compile_time_s - compiled,
              "slo_attainment": slo_attainment(records, args.slo_ttft, args.slo_tpot), "requests": records}
    if records:
        result.update(latency_summary(done))
    if with_job:
        delta = {k: after[k] - before[k] for k in after}
        result.update(policy=job.policy(), finetune_tokens=delta["tokens"], optimizer_steps=delta["steps"],
                      finetune_tokens_per_s=delta["tokens"] / seconds, slices_fused=delta["slices_fused"],
                      slices_alone=delta["slices_alone"], evictions=delta["evictions"])
    return result


def servers(args: argparse.Namespace) -> ChildServers:
    """The fusing and the time-sharing server; ``run(name, rate index or None, with a job, window seconds)``."""

    def ready(name: str, info: dict) -> None:
        alone = info["measured_alone_s"]
        log(f"{name} server: compiled {info['shapes_compiled']} step shapes in {info['warm_up_s']:.0f} s; alone, "
            f"a prompt chunk takes {alone['prefill'] * 1e3:.0f} ms and a decode step {alone['decode'] * 1e3:.0f} ms")

    return ChildServers([("fused", server_main, (args, True)), ("time-sharing", server_main, (args, False))], ready)


# ---------------------------------------------------------------------------- command line
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="smollm2-135m", help="model name or path (default %(default)s)")
    p.add_argument("--rates", type=positive_floats, default=[0.1, 0.2, 0.4],
                   help="Poisson arrival rates, requests per second (default 0.1,0.2,0.4)")
    p.add_argument("--n", type=int, default=12, help="requests per rate (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=48, help="output tokens per request at most (default %(default)s)")
    p.add_argument("--max-prompt", type=int, default=192,
                   help="chat requests with longer templated prompts are skipped (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=4, help="requests decoded together at most (default %(default)s)")
    p.add_argument("--slo-ttft", type=float, default=2.5, help="TTFT target, seconds (default %(default)s)")
    p.add_argument("--slo-tpot", type=float, default=0.15, help="TPOT target, seconds (default %(default)s)")
    p.add_argument("--chunks", type=common.int_list, default=[16, 64],
                   help="finetuning chunk sizes, tokens (default 16,64)")
    p.add_argument("--max-finetune-len", type=int, default=64,
                   help="finetuning sequences are cut to this many tokens (default %(default)s: pirate.jsonl's "
                        "conversations hold 38 to 65)")
    p.add_argument("--finetune-window", type=float, default=60.0,
                   help="seconds of each finetune-only run (one before the rates, one after; default %(default)s)")
    p.add_argument("--warmup", type=int, default=8,
                   help="requests each server answers beside a job before the runs (default %(default)s)")
    p.add_argument("--page-size", type=int, default=16, help="KV page size (default %(default)s)")
    p.add_argument("--compile-cache", default=os.environ.get("SPECJAX_COMPILE_CACHE"),
                   help="JAX's persistent compilation cache ('' or unset: none; default $SPECJAX_COMPILE_CACHE)")
    p.add_argument("--seed", type=int, default=0, help="workload sample and arrival times (default 0)")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: rates {','.join(map(str, QUICK['rates']))}, {QUICK['n']} requests of "
                        f"{QUICK['max_tokens']} tokens, {QUICK['warmup']} warm-up requests, finetune-only windows of "
                        f"{QUICK['finetune_window']:g} s (options given explicitly still win)")
    p.add_argument("--out", type=Path, help="JSON result path")
    args = p.parse_args(argv)
    if args.quick:
        common.apply_quick(args, QUICK, argv)
    for name in ("n", "max_tokens", "max_prompt", "max_batch", "page_size", "max_finetune_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("slo_ttft", "slo_tpot", "finetune_window"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be non-negative, got {args.warmup}")
    if not args.rates or len(set(args.rates)) != len(args.rates):
        p.error(f"--rates needs distinct rates, got {args.rates}")
    return args


def log(text: str) -> None:
    print(f"[coserving] {text}", flush=True)


def summary(runs: list[dict], finetune_only: float) -> list[dict]:
    """The runs with their finetuning throughput relative to finetune-only's."""
    return [{**r, "vs_finetune_only": (r["finetune_tokens_per_s"] / finetune_only
                                       if "finetune_tokens_per_s" in r and finetune_only else None)}
            for r in runs]


def criteria(results: list[dict], rates: list[float]) -> list[tuple[str, bool]]:
    """The issue's three done-when criteria, each with whether this run meets it."""
    by = {(r["way"], r["rate"]): r for r in results}
    held = [rate for rate in rates if by[("inference", rate)]["slo_attainment"] >= 0.9]
    keeps = all(by[("co-serving", rate)]["slo_attainment"] >= 0.9 for rate in held)
    low = by[("co-serving", min(rates))]["vs_finetune_only"] or 0.0
    above = all(by[("co-serving", rate)]["finetune_tokens_per_s"] > by[("time-sharing", rate)]["finetune_tokens_per_s"]
                for rate in rates)
    return [(f"co-serving keeps SLO attainment >= 90% at every rate where inference alone does "
             f"({', '.join(f'{r:g}' for r in held) or 'none'}/s)", keeps),
            (f"finetuning throughput at the lowest rate is >= 70% of finetune-only's ({low:.0%})", low >= 0.7),
            ("co-serving's finetuning throughput is above time-sharing's at every rate", above)]


def main(argv=None) -> int:
    args = parse_args(argv)
    env = common.environment()
    if warning := common.load_warning(env):
        log(warning)
    running = servers(args)
    runs = []

    def record(way: str, rate: float | None, run: dict) -> None:
        runs.append({"way": way, "rate": rate, "load_average_1m": os.getloadavg()[0], **run})
        finetune = (f", finetuning {run['finetune_tokens_per_s']:.1f} tok/s ({run['slices_fused']} slices fused, "
                    f"{run['slices_alone']} alone)" if "finetune_tokens_per_s" in run else "")
        slo = f", SLO attainment {run['slo_attainment']:.0%}" if run["slo_attainment"] is not None else ""
        log(f"{way} at {rate if rate is not None else 0:g}/s: {run['seconds']:.0f} s{slo}{finetune}, "
            f"compiling {run['compile_s']:.1f} s")

    try:
        record("finetune", None, running.run("fused", None, True, args.finetune_window))
        for index, rate in enumerate(args.rates):
            ways = WAYS[index % len(WAYS):] + WAYS[: index % len(WAYS)]
            for way in ways:
                server = "time-sharing" if way == "time-sharing" else "fused"
                record(way, rate, running.run(server, index, way != "inference", None))
        record("finetune", None, running.run("fused", None, True, args.finetune_window))
    finally:
        running.close()
    alone = [r for r in runs if r["way"] == "finetune"]
    finetune_only = sum(r["finetune_tokens"] for r in alone) / sum(r["seconds"] for r in alone)
    results = summary([r for r in runs if r["way"] != "finetune"], finetune_only)
    rows = [["-", "finetune", "-", "-", "-", "-", "-", "-", common.fmt(finetune_only, 1), "1.00", "-"]]
    for rate in args.rates:
        for way in WAYS:
            r = next(x for x in results if (x["way"], x["rate"]) == (way, rate))
            rows.append([f"{rate:g}/s", way, f"{r['completed']}/{args.n}",
                         common.fmt(r.get("ttft", {}).get("median_ms"), 0), common.fmt(r.get("ttft", {}).get("p99_ms"), 0),
                         common.fmt(r.get("tpot", {}).get("median_ms"), 0), common.fmt(r.get("tpot", {}).get("p99_ms"), 0),
                         f"{r['slo_attainment']:.0%}", common.fmt(r.get("finetune_tokens_per_s"), 1),
                         common.fmt(r["vs_finetune_only"], 2),
                         f"{r['slices_fused']}/{r['slices_alone']}" if "slices_fused" in r else "-"])
    common.print_table(
        f"co-serving · {args.target} · chat, {args.n} requests a rate, at most {args.max_tokens} tokens, greedy, max "
        f"batch {args.max_batch} · SLOs TTFT {args.slo_ttft:g} s, TPOT {args.slo_tpot * 1e3:g} ms · "
        f"{env['device_kind']} · jax {env['jax_version']} · {env['date_utc'][:10]}",
        ["rate", "way", "done", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "SLO met", "ft tok/s",
         "vs ft only", "slices fused/alone"], rows,
        [f"one LoRA job (rank 8, q/k/v/o_proj) on {DATA.name}, chunks {','.join(map(str, args.chunks))}; TTFT/TPOT "
         "in ms, client-side from the SSE stream; SLO met: requests within both targets; ft tok/s: tokens trained "
         "over the run's time; finetune: the job alone, two windows pooled"])
    memory = running.info["fused"]["memory"]
    mib = [(m, {part: {k: v / 2**20 for k, v in m[part].items()} for part in ("fused", "decode", "alone")})
           for m in memory]
    common.print_table(
        "compiled memory (MiB, XLA's memory_analysis) · the fused step against the decode step and the slice alone",
        ["chunk", "phase", "decode bucket (B, T, pages)", "scratch fused", "scratch decode", "scratch alone",
         "peak fused", "peak decode", "peak alone"],
        [[m["chunk"], m["phase"], str(tuple(m["decode_bucket"])),
          *(common.fmt(x[part]["temp"], 1) for part in ("fused", "decode", "alone")),
          *(common.fmt(x[part]["peak"], 0) for part in ("fused", "decode", "alone"))] for m, x in mib],
        ["peak: arguments (weights, KV pool, the job's state) + outputs not written in place + scratch"])
    checks = criteria(results, args.rates)
    for text, ok in checks:
        log(f"{'met    ' if ok else 'NOT met'}  {text}")
    payload = {"benchmark": "coserving", "target": args.target,
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "environment": env, "servers": running.info, "finetune_only_tokens_per_s": finetune_only,
               "arrivals": {str(rate): poisson_offsets(rate, args.n, args.seed) for rate in args.rates},
               "criteria": [{"criterion": text, "met": ok} for text, ok in checks],
               "results": results, "finetune_runs": alone}
    out = args.out or common.default_results_path("coserving", Path(args.target).name, env)
    log(f"wrote {common.write_json(out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
