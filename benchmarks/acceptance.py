"""How many tokens does each verification step yield? Hardware-independent speculation metrics.

    python benchmarks/acceptance.py --draft smollm2-135m-draft-a --draft smollm2-135m-draft-b --workload chat
    python benchmarks/acceptance.py --draft smollm2-135m-draft-a --methods chain --k 2,4,8 --workload code
    python benchmarks/acceptance.py --draft target --workload code      # sanity: every proposal accepted
    python benchmarks/acceptance.py --draft random --workload agentic   # sanity: tau near 1

Methods (``--methods``, comma-separated; default chain,tree,dynamic, plus merged and merged-dynamic
with two or more ``--draft``), all on the same greedy requests and within one node budget
(``--max-nodes``, root included, default 64):

  chain           a chain of k tokens from each draft (``--k``, default the depth of ``--expansion``;
                  a list gives a row per k), as SpecInfer compares trees against chains of equal depth
  tree            each draft's expansion tree (``--expansion``, default SpecInfer's 1,1,3,1,1,1,1,1)
  dynamic         each draft's tree grown best-first from ``--dynamic-expansion`` (``--beam`` nodes
                  expanded per depth) and cut to the ``--max-nodes`` most probable nodes
  merged          every draft's expansion tree, merged (shared prefixes share nodes)
  merged-dynamic  every draft's dynamic tree, the node budget split between the drafts
  chain-replay    each draft's greedy chains replayed against the target's greedy output without
                  running verification (this harness before the tree step existed; it also counts
                  the token after the prompt as a speculated one)

The dynamic methods fill the budget exactly, so they compare one draft with several at equal node
counts; static trees have the nodes their expansion gives (the ``nodes`` column).

How: every method but chain-replay runs the real speculative step (``LLM`` with ``TreeSpeculation``,
temperature 0) and reads each request's ``SpeculationStats``. Greedy speculation is lossless, so
each output is also compared with plain greedy decoding of the same prompts (``identical``; a tree
pass and a decode step round differently, which could flip a near-tie of a real model). The first
output token comes from the prefill, so tau counts the tokens after it. Reported per method: tau
(mean tokens per verification step), acceptance rate, acceptance per depth, the share of proposed
tokens wasted, and proposed nodes per step.

Results: a table on stdout and JSON in benchmarks/results/acceptance-<drafts>-<workload>-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(_REPO_ROOT))

try:
    from benchmarks import common
except ImportError:  # run as `python benchmarks/acceptance.py`
    import common

from benchmarks.workloads import WORKLOADS, load_workload  # noqa: E402

from specjax.checkpoints import LoadedModel  # noqa: E402
from specjax.config import ModelConfig  # noqa: E402
from specjax.kv_cache import kv_bytes_per_token  # noqa: E402
from specjax.llm import LLM  # noqa: E402
from specjax.params import Params, inference_params, random_params  # noqa: E402
from specjax.runner import EngineConfig, ModelRunner, StepInput  # noqa: E402
from specjax.sampling import SamplingParams  # noqa: E402
from specjax.speculation.chain import ChainDrafter  # noqa: E402
from specjax.speculation.speculator import SPECINFER_EXPANSION, TreeSpeculation  # noqa: E402
from specjax.speculation.stats import SpeculationStats  # noqa: E402

PER_DRAFT = ("chain", "tree", "dynamic", "chain-replay")  # one row per draft
ALL_DRAFTS = ("merged", "merged-dynamic")  # one row over every draft
METHODS = PER_DRAFT + ALL_DRAFTS
DEFAULT_MAX_NODES = 64
DEFAULT_DYNAMIC_EXPANSION = (4,) * 8  # 117 candidates with beam 4: enough to fill 64 nodes from one draft


# ---------------------------------------------------------------------------- chain replay
def greedy_continuation(runner: ModelRunner, seq_id, prompt: Sequence[int], max_tokens: int,
                        stop_ids: Sequence[int] = ()) -> list[int]:
    """The target's greedy output for ``prompt``: up to ``max_tokens`` tokens, ending at a stop id."""
    runner.add_sequence(seq_id, len(prompt) + max_tokens)
    try:
        chunk = runner.engine.prefill_chunk
        for start in range(0, len(prompt), chunk):
            (token,), _ = runner.step([StepInput(seq_id, list(prompt[start:start + chunk]))])
        out = [int(token)]
        while len(out) < max_tokens and out[-1] not in stop_ids:
            (token,), _ = runner.step([StepInput(seq_id, out[-1:])])
            out.append(int(token))
        return out
    finally:
        runner.release(seq_id)


def replay_chain(prompt: Sequence[int], target_output: Sequence[int], counted: int,
                 propose: Callable[[list[int], int], list[int]], k: int) -> SpeculationStats:
    """Greedy chain speculation of length k replayed against the target's greedy output.

    Steps run until ``counted`` output tokens are produced; ``target_output`` may run past that
    (so the last steps can still be verified) or end early at a stop token, where proposals are
    cut to the tokens that exist.
    """
    stats = SpeculationStats()
    i = 0
    while i < counted:
        depth = min(k, len(target_output) - 1 - i)
        if depth <= 0:  # the final token: a plain decode step
            stats.record(0, 0, 0)
            i += 1
            continue
        proposals = propose(list(prompt) + list(target_output[:i]), depth)
        accepted = 0
        while accepted < depth and proposals[accepted] == target_output[i + accepted]:
            accepted += 1
        stats.record(depth, depth, accepted)
        i += accepted + 1
    return stats


def measure(target: ModelRunner, drafter: ChainDrafter, prompts: Sequence[Sequence[int]], k: int,
            max_tokens: int, stop_ids: Sequence[int] = ()) -> tuple[SpeculationStats, list[dict]]:
    """Acceptance of greedy chains of length k over many prompts; returns totals and per-prompt rows."""
    total = SpeculationStats()
    rows = []
    for n, prompt in enumerate(prompts):
        output = greedy_continuation(target, ("target", n), prompt, max_tokens + k, stop_ids)
        counted = min(len(output), max_tokens)
        seq = ("draft", n)
        drafter.start(seq, len(prompt) + len(output) + k)
        try:
            stats = replay_chain(prompt, output, counted, lambda ctx, d: drafter.propose(seq, ctx, d), k)
        finally:
            drafter.stop(seq)
        total = total.merge(stats)
        rows.append({"prompt_tokens": len(prompt), "output_tokens": counted, **stats.as_dict()})
    return total, rows


# ---------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """One speculation setup to measure: ``kind`` (one of METHODS) over ``drafts`` (names as given).

    ``speculation`` names its drafts; ``for_drafts`` swaps in the loaded ones. For chain-replay it
    only describes the chain (its expansion is ``(1,) * k``).
    """

    kind: str
    drafts: tuple[str, ...]
    speculation: TreeSpeculation

    @property
    def shape(self) -> str:
        s = self.speculation
        if self.kind in ("chain", "chain-replay"):
            return f"k={len(s.expansion)}"
        expansion = ",".join(map(str, s.expansion))
        return f"<{expansion}> beam {s.beam}" if s.dynamic else f"<{expansion}>"

    @property
    def draft_names(self) -> str:
        return "+".join(Path(d).name for d in self.drafts)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.shape} · {self.draft_names}"

    @property
    def nodes(self) -> int:
        """Nodes per step, root included, before merging finds shared prefixes."""
        return 1 + sum(shape.num_nodes - 1 for shape in self.speculation.tree_shapes())

    def for_drafts(self, loaded: dict) -> TreeSpeculation:
        return dataclasses.replace(self.speculation, drafts=tuple(loaded[d] for d in self.drafts))

    def describe(self) -> dict:
        s = self.speculation
        return {"kind": self.kind, "label": self.label, "shape": self.shape, "drafts": list(self.drafts),
                "draft_names": self.draft_names, "expansion": list(s.expansion),
                "dynamic": s.dynamic, "beam": s.beam if s.dynamic else None, "max_nodes": s.max_nodes,
                "nodes": self.nodes}


def plan_methods(kinds: Sequence[str], drafts: Sequence[str], *, max_nodes: int = DEFAULT_MAX_NODES,
                 ks: Sequence[int] | None = None, expansion: Sequence[int] = SPECINFER_EXPANSION,
                 dynamic_expansion: Sequence[int] = DEFAULT_DYNAMIC_EXPANSION, beam: int = 4) -> list[Method]:
    """The methods to run, every shape checked against the node budget (ValueError) before any model loads.

    ks: chain lengths (default: the depth of ``expansion``).
    """
    unknown = [k for k in kinds if k not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    drafts = list(dict.fromkeys(drafts))
    if not drafts:
        raise ValueError("at least one draft is needed")
    ks = list(ks or [len(expansion)])
    methods = []
    for kind in kinds:
        if kind in ALL_DRAFTS and len(drafts) < 2:
            raise ValueError(f"{kind} merges the trees of several drafts: give at least two drafts")
        for group in ([(d,) for d in drafts] if kind in PER_DRAFT else [tuple(drafts)]):
            if kind in ("chain", "chain-replay"):
                shapes = [TreeSpeculation(group, expansion=(1,) * k, max_nodes=max_nodes) for k in ks]
            else:
                dynamic = kind.endswith("dynamic")
                shapes = [TreeSpeculation(group, expansion=dynamic_expansion if dynamic else expansion,
                                          max_nodes=max_nodes, dynamic=dynamic, beam=beam)]
            methods += [Method(kind, group, s) for s in shapes]
    return methods


def default_methods(drafts: Sequence[str]) -> list[str]:
    return ["chain", "tree", "dynamic"] + (list(ALL_DRAFTS) if len(set(drafts)) > 1 else [])


# ---------------------------------------------------------------------------- loading
@dataclass
class DraftSource:
    """A draft as TreeSpeculation takes it (a LoadedModel, or a draft directory LLM loads itself),
    the chain drafter's weights and id maps, and what the results record about it."""

    model: LoadedModel | str
    config: ModelConfig
    params: Params
    draft_to_target: np.ndarray | None
    target_to_draft: np.ndarray | None
    info: dict

    def chain_drafter(self, engine: EngineConfig) -> ChainDrafter:
        return ChainDrafter(self.config, inference_params(self.params), self.draft_to_target, self.target_to_draft,
                            engine=engine)


def load_drafts(names: Sequence[str], target: LoadedModel, seed: int = 0) -> dict[str, DraftSource]:
    """Each distinct draft: ``target`` (the target itself), ``random`` (a random 2-layer model with
    the target's vocabulary), a built-in draft name or a draft directory."""
    sources = {}
    for name in dict.fromkeys(names):
        if name == "target":
            sources[name] = DraftSource(target, target.config, target.params, None, None, {"kind": "target itself"})
        elif name == "random":
            config = target.config.replace(num_layers=2)
            params = random_params(config, jax.random.key(seed))
            model = LoadedModel(config, params, target.tokenizer, "random 2-layer draft")
            sources[name] = DraftSource(model, config, params, None, None, {"kind": "random 2-layer draft"})
        else:
            from specjax.checkpoints.registry import resolve_draft
            from specjax.draft import compute_ratio, load_draft

            path = resolve_draft(name)
            draft = load_draft(path)
            sources[name] = DraftSource(str(path), draft.config, draft.params, draft.vocab.draft_to_target,
                                        draft.vocab.target_to_draft,
                                        {"kind": "trained draft", "path": str(path), "config": str(draft.config),
                                         "compute_ratio": compute_ratio(draft.config, target.config)})
    return sources


def workload_prompts(tokenizer, workload: str, n: int, seed: int) -> list[list[int]]:
    """The chat-templated token ids of a workload's first ``n`` requests."""
    return [tokenizer.encode_chat(r.messages)[1] for r in load_workload(workload, n=n, seed=seed)]


def engine_for(config: ModelConfig, prompts: Sequence[Sequence[int]], max_tokens: int, batch: int,
               methods: Sequence[Method] = (), page_size: int = EngineConfig.page_size) -> EngineConfig:
    """A page pool that holds ``batch`` of the longest requests, with room for the deepest tree
    (sized for fp32 K/V, the widest the runner uses)."""
    depth = max((len(m.speculation.expansion) for m in methods), default=0)
    longest = max(len(p) for p in prompts) + max_tokens + depth + 1
    pages = batch * (-(-longest // page_size) + 1)
    per_token = kv_bytes_per_token(config, jnp.float32)
    return EngineConfig(page_size=page_size, kv_cache_bytes=pages * page_size * per_token, max_num_seqs=batch)


# ---------------------------------------------------------------------------- measurement
def greedy_params(max_tokens: int, ignore_eos: bool = False) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos)


def speculation_totals(outputs, reference: Sequence[Sequence[int]] | None = None
                       ) -> tuple[SpeculationStats, list[dict], int | None]:
    """Merged speculation statistics of requests, a row per request, and how many outputs equal
    ``reference`` (plain greedy decoding's tokens; None: not compared)."""
    total = SpeculationStats()
    rows = []
    for i, out in enumerate(outputs):
        stats = out.stats.speculation
        total = total.merge(stats)
        row = {"prompt_tokens": len(out.prompt_token_ids), "output_tokens": len(out.token_ids), **stats.as_dict()}
        if reference is not None:
            row["identical"] = out.token_ids == list(reference[i])
        rows.append(row)
    identical = None if reference is None else sum(r["identical"] for r in rows)
    return total, rows, identical


def build_llm(method: Method, target: LoadedModel, sources: dict[str, DraftSource], engine: EngineConfig) -> LLM:
    """The target speculating as ``method`` says (not chain-replay, which runs no verification)."""
    return LLM(target, engine=engine, speculation=method.for_drafts({d: sources[d].model for d in method.drafts}))


def measure_method(method: Method, llm: LLM, prompts: Sequence[Sequence[int]], params: SamplingParams,
                   reference: Sequence[Sequence[int]]) -> dict:
    """Generate with ``llm`` (``build_llm(method)``); the result is the method's JSON record, its
    merged SpeculationStats under ``stats``."""
    start, compile_before = time.perf_counter(), llm.compile_time_s
    total, rows, identical = speculation_totals(llm.generate(list(prompts), params), reference)
    return {**method.describe(), "stats": total, "identical": identical, "requests": rows,
            "seconds": time.perf_counter() - start, "compile_s": llm.compile_time_s - compile_before}


def replay_method(method: Method, target: LoadedModel, source: DraftSource, engine: EngineConfig,
                  prompts: Sequence[Sequence[int]], params: SamplingParams) -> dict:
    """chain-replay's record, like ``measure_method``'s (outputs are not compared: it makes none)."""
    start = time.perf_counter()
    runner = ModelRunner(target.config, inference_params(target.params), engine)
    drafter = source.chain_drafter(engine)
    stop_ids = () if params.ignore_eos else target.tokenizer.eos_token_ids
    total, rows = measure(runner, drafter, prompts, len(method.speculation.expansion), params.max_tokens, stop_ids)
    return {**method.describe(), "stats": total, "identical": None, "requests": rows,
            "seconds": time.perf_counter() - start,
            "compile_s": runner.compile_time_s + drafter.runner.compile_time_s}


def depth_summary(values: Sequence[float], shown: int = 8) -> str:
    text = " ".join(f"{a:.2f}" for a in values[:shown])
    return text + (" …" if len(values) > shown else "")


# ---------------------------------------------------------------------------- command line
def add_method_args(p: argparse.ArgumentParser, draft_required: bool = True) -> None:
    """The options acceptance.py and speculative.py share: models, methods, shapes and the workload."""
    p.add_argument("--target", default="smollm2-135m", help="target model name or path (default %(default)s)")
    p.add_argument("--draft", action="append", required=draft_required, default=[],
                   help="draft name or directory, 'target' or 'random'; repeat for several drafts")
    p.add_argument("--methods", type=common.name_list,
                   help=f"comma-separated, from {', '.join(METHODS)} (default: see below)")
    p.add_argument("--max-nodes", type=int, default=DEFAULT_MAX_NODES,
                   help="node budget per step, root included, at most 128 (default %(default)s)")
    p.add_argument("--k", type=common.int_list, help="chain lengths, comma-separated (default: the expansion's depth)")
    p.add_argument("--expansion", type=common.int_list, default=list(SPECINFER_EXPANSION),
                   help="children per node at each depth for tree and merged (default 1,1,3,1,1,1,1,1)")
    p.add_argument("--dynamic-expansion", type=common.int_list, default=list(DEFAULT_DYNAMIC_EXPANSION),
                   help="candidate expansion of dynamic trees (default 4,4,4,4,4,4,4,4)")
    p.add_argument("--beam", type=int, default=4, help="dynamic trees: nodes expanded per depth (default 4)")
    p.add_argument("--workload", default="chat", choices=sorted(WORKLOADS), help="benchmarks/workloads (default chat)")
    p.add_argument("--n", type=int, default=20, help="requests (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=128,
                   help="output tokens per request at most (default %(default)s)")
    p.add_argument("--ignore-eos", action="store_true", help="generate max-tokens tokens even past end-of-sequence")
    p.add_argument("--seed", type=int, default=0, help="workload sample and random draft (default 0)")
    p.add_argument("--page-size", type=int, default=EngineConfig.page_size, help="KV page size (default %(default)s)")
    p.add_argument("--out", type=Path, help="JSON result path")


def methods_from_args(p: argparse.ArgumentParser, args: argparse.Namespace,
                      defaults: Callable[[Sequence[str]], list[str]] = default_methods) -> list[Method]:
    """The methods the arguments ask for (``defaults(drafts)`` without --methods); errors exit via ``p``."""
    if args.n < 1 or args.max_tokens < 1 or args.page_size < 1:
        p.error("--n, --max-tokens and --page-size must be positive")
    try:
        return plan_methods(args.methods or defaults(args.draft), args.draft, max_nodes=args.max_nodes,
                            ks=args.k, expansion=tuple(args.expansion),
                            dynamic_expansion=tuple(args.dynamic_expansion), beam=args.beam)
    except ValueError as e:
        p.error(str(e))


def results_subject(args: argparse.Namespace) -> str:
    return f"{'+'.join(Path(d).name for d in dict.fromkeys(args.draft))}-{args.workload}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_method_args(parser)
    parser.add_argument("--batch", type=int, default=1,
                        help="requests decoded together (padded to this many rows; default 1)")
    args = parser.parse_args(argv)
    methods = methods_from_args(parser, args)
    if args.batch < 1:
        parser.error("--batch must be positive")

    from specjax.checkpoints import load_model

    env = common.environment()
    target = load_model(args.target, dtype="float32")
    sources = load_drafts(args.draft, target, args.seed)
    prompts = workload_prompts(target.tokenizer, args.workload, args.n, args.seed)
    # Padding every step to the batch keeps the compiled shapes few; acceptance does not depend on it.
    engine = dataclasses.replace(engine_for(target.config, prompts, args.max_tokens, args.batch, methods,
                                            args.page_size), min_batch_bucket=args.batch)
    params = greedy_params(args.max_tokens, args.ignore_eos)
    start = time.perf_counter()
    reference = [o.token_ids for o in LLM(target, engine=engine).generate(prompts, params)]
    print(f"[acceptance] plain greedy reference: {sum(map(len, reference))} tokens in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    results = []
    for method in methods:
        if method.kind == "chain-replay":
            result = replay_method(method, target, sources[method.drafts[0]], engine, prompts, params)
        else:
            result = measure_method(method, build_llm(method, target, sources, engine), prompts, params, reference)
        results.append(result)
        print(f"[acceptance] {method.label}: tau {result['stats'].tau:.3f} in {result['seconds']:.0f} s "
              f"(compile {result['compile_s']:.0f} s)", flush=True)

    rows = []
    for r in results:
        s = r["stats"]
        rows.append([r["kind"], r["draft_names"], r["shape"], r["nodes"], f"{s.tau:.3f}", f"{s.acceptance_rate:.3f}",
                     depth_summary(s.acceptance_by_depth),
                     f"{s.wasted_share:.3f}", f"{s.proposed / max(s.steps, 1):.1f}",
                     "-" if r["identical"] is None else f"{r['identical']}/{len(prompts)}"])
    common.print_table(
        f"acceptance · {args.target} · {args.workload} · {len(prompts)} requests · greedy · "
        f"budget {args.max_nodes} nodes · {env['device_kind']} · jax {env['jax_version']} · {env['date_utc'][:10]}",
        ["method", "drafts", "shape", "nodes", "tau", "acceptance", "by depth", "wasted", "proposed/step",
         "identical"], rows,
        [f"at most {args.max_tokens} output tokens per request; tau counts the tokens after the prefill's "
         "(chain-replay speculates that one too); identical: outputs equal to plain greedy decoding"])
    payload = {"benchmark": "acceptance", "target": args.target, "drafts": args.draft,
               "draft_info": {name: s.info for name, s in sources.items()}, "workload": args.workload,
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "environment": env, "reference_tokens": sum(map(len, reference)),
               "methods": [{**{k: v for k, v in r.items() if k != "stats"}, "total": r["stats"].as_dict()}
                           for r in results]}
    out = args.out or common.default_results_path("acceptance", results_subject(args), env)
    print(f"[acceptance] wrote {common.write_json(out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
