"""Suffix, hybrid and draft-model speculation against plain decoding on one workload, in one run.

    python benchmarks/suffix.py --workload agentic --n 16 --warm 16 --draft smollm2-135m-draft-a
    python benchmarks/suffix.py --workload code --n 16 --max-tokens 128
    python benchmarks/suffix.py --workload chat --temperature 0.8 --methods draft,hybrid-cold,hybrid-cold-unseeded

Methods, greedy unless ``--temperature``, on the same held-out requests run one at a time in session order (so a
session's earlier outputs can help its later turns). Each method keeps its own LLM (and cache);
request by request, every method runs it in an order rotated by one per request, so a machine
that slows down mid-run slows every method alike:

  plain        plain decoding (the reference: every other output is compared with it)
  draft        a chain of ``--k`` tokens from ``--draft`` (SpecInfer's verifier)
  suffix-cold  suffix speculation from an empty global cache (it fills as the requests run)
  suffix-warm  the same after warming the cache with ``--warm`` earlier requests of the workload
               (other held-out sessions, run first, as an agent's earlier work would be)
  hybrid-cold  suffix where its draft scores well, else the draft chain; empty cache
  hybrid-warm  the same, warmed
  hybrid-cold-unseeded, hybrid-warm-unseeded  (``--temperature`` only) the same without a seed

With ``--temperature`` every request samples, with seed = its index: plain, suffix and hybrid
then give plain sampling's tokens (``identical`` counts them), hybrid verifying its draft-model
steps by sampling and matching; the unseeded hybrid runs verify them by multi-step speculative
sampling instead, which accepts more of a drafted token: the pair measures what the seed costs.

Reported per method: tau (tokens per verification step), acceptance rate, tokens/s end to end and
its ratio to plain decoding (wall time of generate() less the compilation it triggered), the
target's mean step time and the host's suffix-cache time per step (µs), steps by source (hybrid)
and how many outputs equal plain decoding's (greedy, or sampled with the same seed).

Results: a table on stdout and JSON in benchmarks/results/suffix-<workload>-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(_REPO_ROOT))

from benchmarks import acceptance, common  # noqa: E402
from benchmarks.workloads import WORKLOADS  # noqa: E402

from specjax.llm import LLM  # noqa: E402
from specjax.sampling import SamplingParams  # noqa: E402
from specjax.speculation.speculator import TreeSpeculation  # noqa: E402
from specjax.speculation.suffix import HybridSpeculation, SuffixSpeculation  # noqa: E402

METHODS = ("plain", "draft", "suffix-cold", "suffix-warm", "hybrid-cold", "hybrid-warm")
UNSEEDED = ("hybrid-cold-unseeded", "hybrid-warm-unseeded")  # sampled runs only


def timed(llm: LLM, prompts, params) -> tuple[list, float]:
    """generate() and its seconds, less the compilation it triggered (timed apart by the engine)."""
    compiled, start = llm.compile_time_s, time.perf_counter()
    outputs = llm.generate([list(p) for p in prompts], params)
    return outputs, time.perf_counter() - start - (llm.compile_time_s - compiled)


def summarize(label: str, outputs, seconds: float, reference) -> dict:
    tokens = sum(len(o.token_ids) for o in outputs)
    record = {"method": label, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
              "identical": sum(o.token_ids == r for o, r in zip(outputs, reference))}
    if outputs[0].stats.speculation is not None:  # every output of one method speculated, or none did
        total, _, _ = acceptance.speculation_totals(outputs)
        speculation = total.as_dict()
        speculation["step_tokens"] = speculation.pop("tokens")  # after the prefill's: what tau divides
        record.update(speculation)
        device_s = sum(o.stats.decode_time_s for o in outputs)
        record["target_step_ms"] = 1e3 * device_s / total.steps if total.steps else 0.0
    return record


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_target_and_draft(p)
    p.add_argument("--methods", type=common.name_list,
                   help=f"comma-separated, from {', '.join(METHODS + UNSEEDED)} (default: all; plain always runs)")
    p.add_argument("--workload", default="agentic", choices=sorted(WORKLOADS), help="(default %(default)s)")
    p.add_argument("--n", type=int, default=16, help="measured requests (default %(default)s)")
    p.add_argument("--warm", type=int, default=16,
                   help="earlier requests of the workload run first to warm the cache (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=512, help="output tokens per request at most (default %(default)s)")
    p.add_argument("--max-spec-tokens", type=int, default=31, help="suffix draft size (default %(default)s)")
    p.add_argument("--spec-factor", type=float, default=1.0, help="suffix tokens per matched token (default 1)")
    p.add_argument("--min-token-prob", type=float, default=0.1, help="(default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sample at this temperature, request i with seed i (default 0: greedy)")
    p.add_argument("--seed", type=int, default=0, help="workload sample (default 0)")
    p.add_argument("--out", type=Path, help="JSON result path")
    args = p.parse_args(argv)
    known = METHODS + UNSEEDED if args.temperature > 0 else METHODS
    args.methods = args.methods or list(known)
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(known)}"
                + ("" if args.temperature > 0 else " (the unseeded ones need --temperature)"))
    if args.n < 1 or args.warm < 0 or args.max_tokens < 1 or args.k < 1 or args.temperature < 0:
        p.error("--n, --max-tokens and --k must be positive, --warm and --temperature non-negative")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from specjax.checkpoints import load_model

    env = common.environment()
    target = load_model(args.target, dtype="float32")
    prompts = acceptance.workload_prompts(target.tokenizer, args.workload, args.warm + args.n, args.seed)
    warmup, measured = prompts[: args.warm], prompts[args.warm:]
    # Room for the draft chain past the longest request; suffix trees stop at a request's own budget.
    engine = acceptance.engine_for(target.config, prompts, args.max_tokens + args.k, 1)
    params = acceptance.greedy_params(args.max_tokens)  # the warm-up's

    def request_params(method: str, index: int) -> SamplingParams:
        if args.temperature == 0:
            return params
        seed = None if method.endswith("unseeded") else index
        return SamplingParams(temperature=args.temperature, seed=seed, max_tokens=args.max_tokens)
    suffix = SuffixSpeculation(max_spec_tokens=args.max_spec_tokens, max_spec_factor=args.spec_factor,
                               min_token_prob=args.min_token_prob)
    draft = target if args.draft == "target" else args.draft
    chain = TreeSpeculation(drafts=(draft,), expansion=(1,) * args.k, max_nodes=args.k + 1)
    cache_file = Path(tempfile.mkdtemp(prefix="specjax-suffix-")) / "warm.npz"

    def speculation(method: str):
        warm = dataclasses.replace(suffix, cache_file=cache_file) if "-warm" in method else suffix
        return {"draft": chain, "suffix": warm, "hybrid": HybridSpeculation(suffix=warm, tree=chain)}[
            method.split("-")[0]]

    def log(text: str) -> None:
        print(f"[suffix] {text}", flush=True)

    methods = ["plain"] + [m for m in args.methods if m != "plain"]
    if any("-warm" in m for m in methods) and warmup:
        warmer = LLM(target, engine=engine, speculation=suffix)
        warmer.generate([list(p) for p in warmup], params)
        warmer.save_suffix_cache(cache_file)
        log(f"cache warmed with {len(warmup)} earlier requests: {warmer.suffix_cache.num_nodes} nodes")
    llms = {m: LLM(target, engine=engine, speculation=None if m == "plain" else speculation(m)) for m in methods}
    outputs = {m: [] for m in methods}
    seconds = dict.fromkeys(methods, 0.0)
    for i, prompt in enumerate(measured):
        shift = i % len(methods)
        for method in methods[shift:] + methods[:shift]:
            (output,), spent = timed(llms[method], [prompt], request_params(method, i))
            outputs[method].append(output)
            seconds[method] += spent
        log(f"request {i + 1}/{len(measured)}: " + ", ".join(f"{m} {seconds[m]:.0f} s" for m in methods))
    reference = [o.token_ids for o in outputs["plain"]]
    results = [summarize(m, outputs[m], seconds[m], reference) for m in methods]

    plain_rate = results[0]["tokens_per_s"]
    rows = []
    for r in results:
        speculative = "tau" in r
        rows.append([r["method"], common.fmt(r.get("tau"), 2) if speculative else "-",
                     common.fmt(r.get("acceptance_rate"), 2) if speculative else "-",
                     f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_s'] / plain_rate:.2f}x",
                     common.fmt(r.get("target_step_ms"), 1) if speculative else "-",
                     common.fmt(r.get("host_us_per_step"), 0) if speculative else "-",
                     " ".join(f"{k} {v}" for k, v in r.get("sources", {}).items()) or "-",
                     "-" if r["method"].endswith("unseeded") else f"{r['identical']}/{len(measured)}"])
    common.print_table(
        f"suffix speculation · {args.target} · {args.workload} · {len(measured)} requests (+{len(warmup)} to warm) · "
        f"{f'temperature {args.temperature}' if args.temperature else 'greedy'} · {env['device_kind']} · "
        f"jax {env['jax_version']} · {env['date_utc'][:10]}",
        ["method", "tau", "acceptance", "tok/s", "vs plain", "target step ms", "host µs/step", "steps by source",
         "identical"], rows,
        [f"draft: {args.draft}, chain of {args.k}; suffix: at most {args.max_spec_tokens} tokens, factor "
         f"{args.spec_factor}, min prob {args.min_token_prob}; at most {args.max_tokens} output tokens; requests "
         "one at a time in session order, methods interleaved per request; tok/s excludes compilation"])
    payload = {"benchmark": "suffix", "target": args.target, "workload": args.workload,
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "environment": env, "methods": results}
    out = args.out or common.default_results_path("suffix", args.workload, env)
    log(f"wrote {common.write_json(out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
