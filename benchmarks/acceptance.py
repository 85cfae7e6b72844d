"""How many tokens does each verification step yield? Hardware-independent speculation metrics.

    python benchmarks/acceptance.py --draft smollm2-135m-draft-a --workload chat --k 4
    python benchmarks/acceptance.py --draft target --workload code      # sanity: tau = 1 + k
    python benchmarks/acceptance.py --draft random --workload agentic   # sanity: tau near 1

For each request of a workload the target's greedy output is generated once; greedy speculation is
lossless, so verification accepts exactly the draft tokens that match that output, and replaying
the draft's proposals against it gives the same acceptance as running speculative decoding, with no
timing noise. Reported per workload: tau (mean tokens per verification step), acceptance rate,
acceptance per depth, and the share of proposed tokens wasted. Chains now; trees when the tree
verifier lands.

Results: a table on stdout and JSON in benchmarks/results/acceptance-<draft>-<workload>-<date>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(_REPO_ROOT))

try:
    from benchmarks import common
except ImportError:  # run as `python benchmarks/acceptance.py`
    import common

from specjax.params import inference_params, random_params  # noqa: E402
from specjax.runner import EngineConfig, ModelRunner, StepInput  # noqa: E402
from specjax.speculation.chain import ChainDrafter  # noqa: E402
from specjax.speculation.stats import SpeculationStats  # noqa: E402


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


# ---------------------------------------------------------------------------- command line
def _load_drafter(name: str, target_config, target_params, seed: int) -> tuple[ChainDrafter, dict]:
    engine = EngineConfig(kv_cache_bytes=256 << 20)
    if name == "target":
        return ChainDrafter(target_config, target_params, engine=engine), {"kind": "target itself"}
    if name == "random":
        config = target_config.replace(num_layers=2)
        params = random_params(config, jax.random.key(seed))
        return ChainDrafter(config, params, engine=engine), {"kind": "random 2-layer draft"}
    from specjax.checkpoints.registry import resolve_draft
    from specjax.draft import compute_ratio, load_draft

    draft = load_draft(resolve_draft(name))
    return (ChainDrafter(draft.config, inference_params(draft.params), draft.vocab.draft_to_target,
                         draft.vocab.target_to_draft, engine=engine),
            {"kind": "trained draft", "config": str(draft.config),
             "compute_ratio": compute_ratio(draft.config, target_config)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--draft", required=True, help="draft name or path, 'target' or 'random'")
    parser.add_argument("--workload", default="chat", help="chat, code or agentic (benchmarks/workloads)")
    parser.add_argument("--n", type=int, default=20, help="requests to measure (default 20)")
    parser.add_argument("--k", type=int, default=4, help="speculation length (default 4)")
    parser.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    from benchmarks.workloads import load_workload
    from specjax.checkpoints import load_model

    env = common.environment()
    target = load_model(args.target, dtype="float32")
    runner = ModelRunner(target.config, inference_params(target.params), EngineConfig(kv_cache_bytes=512 << 20))
    drafter, draft_info = _load_drafter(args.draft, target.config, target.params, args.seed)
    requests = load_workload(args.workload, n=args.n, seed=args.seed)
    tok = target.tokenizer
    prompts = [tok.encode(tok.apply_chat_template(r.messages), add_special_tokens=False) for r in requests]
    start = time.perf_counter()
    total, rows = measure(runner, drafter, prompts, args.k, args.max_tokens, tok.eos_token_ids)
    elapsed = time.perf_counter() - start

    depth = " ".join(f"{a:.2f}" for a in total.acceptance_by_depth)
    common.print_table(
        f"acceptance · {args.target} · draft {args.draft} · {args.workload} · greedy chain k={args.k}",
        ["requests", "steps", "tau", "acceptance", "by depth", "wasted"],
        [[len(rows), total.steps, f"{total.tau:.3f}", f"{total.acceptance_rate:.3f}", depth,
          f"{total.wasted_share:.3f}"]],
        [f"{args.max_tokens} greedy output tokens per request; measured in {elapsed:.0f} s"])
    payload = {"benchmark": "acceptance", "target": args.target, "draft": args.draft, "draft_info": draft_info,
               "workload": args.workload, "method": "greedy chain", "k": args.k, "max_tokens": args.max_tokens,
               "seed": args.seed, "environment": env, "total": total.as_dict(), "requests": rows}
    out = args.out or common.default_results_path("acceptance", f"{Path(str(args.draft)).name}-{args.workload}", env)
    common.write_json(out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
