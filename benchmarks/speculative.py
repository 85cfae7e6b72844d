"""Is speculative generation faster than plain decoding, end to end? And what does verifying a tree cost?

    python benchmarks/speculative.py --draft smollm2-135m-draft-a --draft smollm2-135m-draft-b --workload code
    python benchmarks/speculative.py --draft smollm2-135m-draft-a --methods chain,tree --k 4 \\
        --expansion 1,2,1,1 --max-nodes 16 --workload chat               # trees small enough for a CPU
    python benchmarks/speculative.py --verify-cost                        # built-in model, batch 1 and 8
    python benchmarks/speculative.py --verify-cost --shape llama3-8b      # random weights of a shape (GPU)

Generation mode: plain greedy decoding and each speculation method (``--methods``, with the shapes
and node budget of benchmarks/acceptance.py; default chain,tree, plus merged with two or more
``--draft``) generate the same workload requests with the same model in one process. Requests go in
groups of ``--batch`` (one generate() call per group). For every group the methods run one after
another, in an order rotated from group to group, so drifts in the machine's speed fall on all of
them alike. Each method first runs the first group untimed (compilation, warm-up); a timed run that
still compiles (a new shape bucket) is run again and only the rerun counts, so no timing includes
compilation. ``--rounds`` repeats the whole schedule.

Reported per method: tokens/s end to end (generated tokens / wall time of generate(): prefill,
drafting, verification and host work) and its ratio to plain decoding's, the speedup; decode
tokens/s (tokens after the first / the time of the steps that produced them, as RequestStats counts
it) and its ratio; tau and acceptance; and how many outputs equal plain greedy decoding's.

Verification cost mode (``--verify-cost``): the target's one-pass verification step
(``ModelRunner.verify``: score every node of a token tree, accept, commit) for trees of
``--tree-sizes`` nodes, against one decode step (``ModelRunner.step``, one token) at the same batch
(``--batch-sizes``) and prefix (``--prefix-lens``), interleaved in one run. Trees are heap-ordered
binary trees of random tokens and prefixes are committed without computing them: neither the shape
nor the K/V values change the work. Every step is rolled back, so all see the same prefix. The first
run of each step is a warm-up; the table shows the median of ``--repeats`` runs, its ratio to the
decode step's median and the nodes verified per decode step's time. ``ModelRunner.verify`` pads
trees to a power of two; the speculative step verifies its trees unpadded.

Results: a table on stdout and JSON in benchmarks/results/speculative-<subject>-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(_REPO_ROOT))

from benchmarks import acceptance, common, decode  # noqa: E402
from specjax.config import ModelConfig, resolve_dtype  # noqa: E402
from specjax.kv_cache import kv_bytes_per_token  # noqa: E402
from specjax.llm import LLM, RequestOutput  # noqa: E402
from specjax.params import inference_params  # noqa: E402
from specjax.runner import EngineConfig, ModelRunner, StepInput  # noqa: E402
from specjax.sampling import SamplingParams  # noqa: E402
from specjax.speculation.stats import SpeculationStats  # noqa: E402
from specjax.speculation.tree import TREE_SIZES, TokenTree  # noqa: E402

PLAIN = "plain"
DEFAULT_TREE_SIZES = [1, 2, 4, 8, 16, 32, 64, 128]
MAX_RERUNS = 2  # greedy requests rerun hit the buckets they compiled; more reruns means something else compiles


# ---------------------------------------------------------------------------- generation: plain vs speculative
def schedule(labels: Sequence[str], groups: int, rounds: int) -> list[tuple[int, int, str]]:
    """(round, group, label) in run order: each group runs every label, the order rotated by one from
    one group to the next."""
    labels = list(labels)
    order = []
    for r in range(rounds):
        for g in range(groups):
            shift = (r * groups + g) % len(labels)
            order += [(r, g, label) for label in labels[shift:] + labels[:shift]]
    return order


def timed_generate(llm: LLM, prompts: Sequence[Sequence[int]], params: SamplingParams
                   ) -> tuple[list[RequestOutput], float, int]:
    """generate() timed by the wall clock, run again while a run compiles; (outputs, seconds, reruns)."""
    for reruns in range(MAX_RERUNS + 1):
        compiled = llm.compile_time_s
        start = time.perf_counter()
        outputs = llm.generate([list(p) for p in prompts], params)
        seconds = time.perf_counter() - start
        if llm.compile_time_s == compiled:
            return outputs, seconds, reruns
    raise RuntimeError(f"generate() compiled in each of {MAX_RERUNS + 1} runs of the same requests")


@dataclass
class Run:
    """One timed generate() of one group by one method."""

    label: str
    round: int
    group: int
    seconds: float
    reruns: int
    outputs: list[RequestOutput]

    @property
    def tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)

    @property
    def decode_tokens(self) -> int:
        return sum(max(len(o.token_ids) - 1, 0) for o in self.outputs)

    @property
    def decode_s(self) -> float:
        return sum(o.stats.decode_time_s for o in self.outputs)

    def record(self) -> dict:
        return {"label": self.label, "round": self.round, "group": self.group, "seconds": self.seconds,
                "reruns": self.reruns, "tokens": self.tokens, "decode_tokens": self.decode_tokens,
                "decode_s": self.decode_s, "prefill_s": sum(o.stats.prefill_time_s for o in self.outputs),
                "output_tokens": [len(o.token_ids) for o in self.outputs]}


def compare(llms: dict[str, LLM], groups: Sequence[Sequence[Sequence[int]]], params: SamplingParams,
            rounds: int = 1) -> list[Run]:
    """Time every LLM on every group of prompts, interleaved (``schedule``), after a warm-up run each."""
    for llm in llms.values():
        llm.generate([list(p) for p in groups[0]], params)
    runs = []
    for r, g, label in schedule(list(llms), len(groups), rounds):
        outputs, seconds, reruns = timed_generate(llms[label], groups[g], params)
        runs.append(Run(label, r, g, seconds, reruns, outputs))
    return runs


def summarize(runs: Sequence[Run], plain: str = PLAIN) -> dict[str, dict]:
    """Per label: tokens/s end to end and in decoding, their ratios to ``plain``'s, speculation
    statistics (None for plain), outputs equal to plain's, and the speedup of each run over plain's
    run of the same group and round (its spread shows the timing noise)."""
    base_runs = {(run.round, run.group): run for run in runs if run.label == plain}
    out = {}
    for label in dict.fromkeys(run.label for run in runs):
        mine = [run for run in runs if run.label == label]
        seconds, tokens = sum(r.seconds for r in mine), sum(r.tokens for r in mine)
        decode_s, decode_tokens = sum(r.decode_s for r in mine), sum(r.decode_tokens for r in mine)
        outputs = [o for r in mine for o in r.outputs]
        stats = None
        if outputs[0].stats.speculation is not None:
            stats = SpeculationStats()
            for o in outputs:
                stats = stats.merge(o.stats.speculation)
        out[label] = {
            "runs": len(mine), "requests": len(outputs), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "decode_tokens": decode_tokens, "decode_s": decode_s,
            "decode_tokens_per_s": decode_tokens / decode_s if decode_s else None,
            "reruns": sum(r.reruns for r in mine),
            "identical": sum(o.token_ids == want.token_ids for r in mine
                             for o, want in zip(r.outputs, base_runs[(r.round, r.group)].outputs)),
            "run_speedups": [base_runs[(r.round, r.group)].seconds / r.seconds for r in mine],
            "speculation": None if stats is None else stats.as_dict(),
        }
    base = out[plain]
    for s in out.values():
        s["speedup"] = s["tokens_per_s"] / base["tokens_per_s"]
        s["decode_speedup"] = (s["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                               if s["decode_tokens_per_s"] and base["decode_tokens_per_s"] else None)
    return out


def generation_table(title: str, methods: Sequence[acceptance.Method], summary: dict[str, dict],
                     notes: Sequence[str]) -> None:
    rows = []
    described = [(PLAIN, "-", PLAIN, None)]
    described += [(m.label, m.draft_names, f"{m.kind} {m.shape}", m.nodes) for m in methods]
    for label, drafts, shape, nodes in described:
        s = summary[label]
        spec = s["speculation"]
        rows.append([shape, drafts, nodes, None if spec is None else f"{spec['tau']:.2f}",
                     None if spec is None else f"{spec['acceptance_rate']:.3f}", common.fmt(s["tokens_per_s"]),
                     f"{s['speedup']:.2f}x", common.fmt(s["decode_tokens_per_s"]),
                     None if s["decode_speedup"] is None else f"{s['decode_speedup']:.2f}x",
                     f"{s['identical']}/{s['requests']}"])
    common.print_table(title, ["method", "drafts", "nodes", "tau", "acceptance", "tok/s", "speedup", "decode tok/s",
                               "decode speedup", "identical"], rows, notes)


def default_methods(drafts: Sequence[str]) -> list[str]:
    return ["chain", "tree"] + (["merged"] if len(set(drafts)) > 1 else [])


def run_generation(args, methods: Sequence[acceptance.Method], env: dict) -> tuple[dict, str]:
    from specjax.checkpoints import load_model

    dtype = resolve_dtype(args.dtype)
    dtype_name = jnp.dtype(dtype).name
    target = load_model(args.target, dtype=dtype)
    sources = acceptance.load_drafts(args.draft, target, args.seed)
    prompts = acceptance.workload_prompts(target.tokenizer, args.workload, args.n, args.seed)
    engine = acceptance.engine_for(target.config, prompts, args.max_tokens, args.batch, methods, args.page_size)
    llms = {PLAIN: LLM(target, engine=engine)}
    llms.update({m.label: acceptance.build_llm(m, target, sources, engine) for m in methods})
    groups = [prompts[i:i + args.batch] for i in range(0, len(prompts), args.batch)]
    params = acceptance.greedy_params(args.max_tokens, args.ignore_eos)
    print(f"[speculative] {len(prompts)} {args.workload} requests in {len(groups)} group(s) of {args.batch}, "
          f"{len(llms)} methods, {args.rounds} round(s)", flush=True)
    start = time.perf_counter()
    runs = compare(llms, groups, params, args.rounds)
    summary = summarize(runs)
    compile_s = sum(llm.compile_time_s for llm in llms.values())
    notes = [f"{len(prompts)} requests, at most {args.max_tokens} tokens each, in groups of {args.batch}, "
             f"{args.rounds} round(s), methods interleaved; greedy; {dtype_name} weights; compilation "
             f"({compile_s:.0f} s) and warm-ups excluded, {sum(s['reruns'] for s in summary.values())} run(s) "
             f"repeated because they compiled; measured in {time.perf_counter() - start:.0f} s",
             "speedup: tokens/s over plain decoding's, end to end (generate() wall time) and in decode steps"]
    warning = common.load_warning(env)
    if warning:
        notes.append(f"warning: {warning}")
    generation_table(f"speculative · {args.target} · {args.workload} · {env['device_kind']} · jax "
                     f"{env['jax_version']} · {env['date_utc'][:10]}", methods, summary, notes)
    payload = {
        "benchmark": "speculative", "mode": "generate", "target": args.target, "drafts": args.draft,
        "draft_info": {name: s.info for name, s in sources.items()}, "workload": args.workload,
        "environment": env, "settings": _settings(args), "dtype": dtype_name, "engine": dataclasses.asdict(engine),
        "compile_s": compile_s, "notes": notes,
        "methods": [{"label": PLAIN, "kind": PLAIN, **summary[PLAIN]}]
                   + [{**m.describe(), **summary[m.label]} for m in methods],
        "runs": [run.record() for run in runs],
    }
    return payload, acceptance.results_subject(args)


# ---------------------------------------------------------------------------- verification cost
def cost_tree(size: int, vocab_size: int, rng: np.random.Generator) -> TokenTree:
    """A heap-ordered binary tree (node i's parent is (i - 1) // 2) of ``size`` random tokens, in
    arrays of exactly ``size`` nodes."""
    tokens = rng.integers(0, vocab_size, size).tolist()
    return TokenTree.build(tokens[0], tokens[1:], [(i - 1) // 2 for i in range(1, size)], size=size)


def verify_cost(runner: ModelRunner, batch: int, prefix: int, sizes: Sequence[int], repeats: int,
                seed: int = 0) -> dict:
    """Step times of one decode step and of verifying a tree of each size, for ``batch`` sequences of
    ``prefix`` cached tokens, interleaved; the first pass is a warm-up. Returns medians and ratios."""
    rng = np.random.default_rng(seed)
    vocab = runner.config.vocab_size
    ids = [("verify-cost", batch, prefix, row) for row in range(batch)]
    trees = {n: [cost_tree(n, vocab, rng) for _ in ids] for n in sizes}
    tokens = rng.integers(0, vocab, batch).tolist()
    steps = {"decode": lambda: runner.step([StepInput(s, [t]) for s, t in zip(ids, tokens)])[1]}
    steps.update({n: (lambda n=n: runner.verify(ids, trees[n])[1]) for n in sizes})
    times = {key: [] for key in steps}
    try:
        for s in ids:
            runner.add_sequence(s, prefix + max(sizes) + 1)
            runner.pages.commit(s, prefix)  # pages reserved, K/V left as they are: the work is the same
        for rep in range(repeats + 1):
            keys = list(steps)
            shift = rep % len(keys)
            for key in keys[shift:] + keys[:shift]:
                seconds = steps[key]()
                for s in ids:
                    runner.pages.truncate(s, prefix)
                if rep:
                    times[key].append(seconds)
    finally:
        for s in ids:
            if s in runner.pages:
                runner.release(s)
    decode_stats = common.latency_stats(times["decode"])
    trees_out = []
    for n in sizes:
        stats = common.latency_stats(times[n])
        ratio = stats["median_ms"] / decode_stats["median_ms"]
        trees_out.append({"nodes": n, **stats, "x_decode": ratio, "nodes_per_decode_step": n / ratio})
    return {"batch": batch, "prefix": prefix, "decode": decode_stats, "trees": trees_out}


def verify_cost_runner(args) -> tuple[ModelRunner, str, str]:
    """(runner, subject, weights' source) for the verification cost mode."""
    dtype = resolve_dtype(args.dtype)
    if args.shape:
        config = decode.shape_config(args)
        params = decode.make_random_params(config, dtype, args.seed)
        subject = args.shape + "".join(f"-{tag}{v}" for tag, v in (("L", args.layers), ("V", args.vocab)) if v)
        source = f"random_params(seed={args.seed})"
    else:
        from specjax.checkpoints import load_model

        loaded = load_model(args.target, dtype=dtype)
        config, params, subject, source = loaded.config, loaded.params, Path(args.target).name, loaded.source
    return ModelRunner(config, inference_params(params), cost_engine(config, args)), subject, source


def cost_engine(config: ModelConfig, args) -> EngineConfig:
    tokens = max(args.prefix_lens) + max(args.tree_sizes) + 1
    pages = max(args.batch_sizes) * (-(-tokens // args.page_size))
    return EngineConfig(page_size=args.page_size, max_num_seqs=max(args.batch_sizes), max_model_len=tokens,
                        kv_cache_bytes=pages * args.page_size * kv_bytes_per_token(config, np.float32))


def run_verify_cost(args, env: dict) -> tuple[dict, str]:
    runner, subject, source = verify_cost_runner(args)
    start = time.perf_counter()
    results = []
    for batch in args.batch_sizes:
        for prefix in args.prefix_lens:
            result = verify_cost(runner, batch, prefix, args.tree_sizes, args.repeats, args.seed)
            results.append(result)
            print(f"[speculative] batch {batch} prefix {prefix}: decode {result['decode']['median_ms']:.2f} ms, "
                  + ", ".join(f"{t['nodes']} nodes {t['x_decode']:.2f}x" for t in result["trees"]), flush=True)
    rows = [[r["batch"], r["prefix"], t["nodes"], common.fmt(t["median_ms"], 2), common.fmt(t["p90_ms"], 2),
             f"{t['x_decode']:.2f}", f"{t['nodes_per_decode_step']:.1f}", common.fmt(r["decode"]["median_ms"], 2)]
            for r in results for t in r["trees"]]
    notes = [f"median of {args.repeats} runs after a warm-up, interleaved with the decode step; compilation "
             f"({runner.compile_time_s:.0f} s) excluded; measured in {time.perf_counter() - start:.0f} s",
             f"x decode: verification / decode step at the same batch and prefix; trees of exactly their size "
             f"(ModelRunner.verify pads trees to {', '.join(map(str, TREE_SIZES))} nodes)"]
    warning = common.load_warning(env)
    if warning:
        notes.append(f"warning: {warning}")
    common.print_table(f"verification cost · {subject} · {env['device_kind']} · jax {env['jax_version']} · "
                       f"{env['date_utc'][:10]}",
                       ["batch", "prefix", "nodes", "median ms", "p90 ms", "x decode", "nodes per decode step",
                        "decode ms"], rows, notes)
    payload = {"benchmark": "speculative", "mode": "verify-cost", "subject": subject, "source": source,
               "environment": env, "settings": _settings(args), "dtype": str(runner.dtype),
               "compile_s": runner.compile_time_s, "notes": notes, "results": results}
    return payload, f"verify-cost-{subject}"


# ---------------------------------------------------------------------------- command line
def _settings(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "planned"}


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, every method planned (``planned``) and checked before any model loads."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    acceptance.add_method_args(p, draft_required=False)
    p.add_argument("--dtype", default="auto", help="weights: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    p.add_argument("--batch", type=int, default=1, help="requests per generate() call (default 1)")
    p.add_argument("--rounds", type=int, default=1, help="times the whole interleaved schedule runs (default 1)")
    cost = p.add_argument_group("verification cost mode")
    cost.add_argument("--verify-cost", action="store_true", help="time verification against a decode step instead")
    cost.add_argument("--shape", choices=sorted(decode.SHAPES), help="random weights of a named shape, not --target")
    cost.add_argument("--layers", type=int, help="--shape: override the number of layers")
    cost.add_argument("--vocab", type=int, help="--shape: override the vocabulary size")
    cost.add_argument("--tree-sizes", type=common.int_list, default=DEFAULT_TREE_SIZES,
                      help="tree nodes, root included (default 1,2,4,...,128)")
    cost.add_argument("--batch-sizes", type=common.int_list, default=[1, 8], help="default 1,8")
    cost.add_argument("--prefix-lens", type=common.int_list, default=[128, 1024],
                      help="cached tokens before the tree (default 128,1024)")
    cost.add_argument("--repeats", type=int, default=10, help="timed runs of each step (default 10)")
    args = p.parse_args(argv)
    if args.verify_cost:
        if args.draft or args.methods:
            p.error("--verify-cost times the target alone: drop --draft and --methods")
        if max(args.tree_sizes) > TREE_SIZES[-1]:
            p.error(f"a tree holds at most {TREE_SIZES[-1]} nodes")
        if args.repeats < 1:
            p.error("--repeats must be positive")
    else:
        if not args.draft:
            p.error("give at least one --draft (or --verify-cost)")
        if args.shape:
            p.error("--shape applies to --verify-cost; generation needs a model with a tokenizer (--target)")
        if args.batch < 1 or args.rounds < 1:
            p.error("--batch and --rounds must be positive")
        if "chain-replay" in (args.methods or ()):
            p.error("chain-replay runs no verification, so it has no speed to measure")
        args.planned = acceptance.methods_from_args(p, args, default_methods)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    env = common.environment()
    if args.verify_cost:
        payload, subject = run_verify_cost(args, env)
    else:
        payload, subject = run_generation(args, args.planned, env)
    out = args.out or common.default_results_path("speculative", subject, env)
    print(f"[speculative] wrote {common.write_json(out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
