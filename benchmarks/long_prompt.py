"""What does a long prompt cost, and what does it cost everyone else?

    python benchmarks/long_prompt.py                       # this checkout
    git worktree add /tmp/before <commit>                  # a baseline: the same script on older code
    PYTHONPATH=/tmp/before python benchmarks/long_prompt.py --label before

Two measurements on the built-in model (fp32, default EngineConfig: 512-token prefill chunks):

* **Prefill**: a prompt of each ``--lengths`` random token ids, generated with ``max_tokens=1``;
  the device seconds of its prefill steps (compilation excluded: the runner times it apart), its
  FLOPs (2 per weight per token, plus causal attention's 4 * head_dim * q_heads per query-key
  pair per layer) and the rate they ran at. On a CPU, a prefill at the matmul rate of a decode
  step's weights is the floor.
* **Head-of-line**: an interleaving scheduler (as ``specjax serve`` runs) prefills a
  ``--long``-token prompt; one step in, a short request arrives (``--short-prompt`` tokens,
  ``--short-tokens`` greedy tokens). Its wall time from arrival to its last token, against the
  same request alone. Each scenario runs twice and the second is timed, so compiling is not in it.

Results: a table on stdout and JSON in benchmarks/results/long-prompt-<label>-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.append(str(_REPO_ROOT))  # appended: PYTHONPATH may name another checkout's specjax

try:
    from benchmarks import common
except ImportError:  # run as `python benchmarks/long_prompt.py`
    import common

import specjax  # noqa: E402
from specjax.llm import LLM  # noqa: E402
from specjax.runner import EngineConfig  # noqa: E402
from specjax.sampling import SamplingParams  # noqa: E402


def prompt_flops(config, num_tokens: int, weights: int) -> float:
    attention = 4 * config.head_dim * config.num_heads * config.num_layers * num_tokens * (num_tokens + 1) / 2
    return 2 * weights * num_tokens + attention


def random_prompt(rng, vocab: int, n: int) -> list[int]:
    return rng.integers(100, vocab - 100, n).tolist()


def head_of_line(llm: LLM, long_prompt: list[int], short_prompt: list[int], short_tokens: int) -> dict:
    """The short request's wall seconds from arrival to last token, arriving one step into the long prefill."""
    greedy = SamplingParams(temperature=0, max_tokens=short_tokens, ignore_eos=True)
    scheduler = llm.scheduler(interleave=True)
    long_req = llm.new_request(long_prompt, SamplingParams(temperature=0, max_tokens=1))
    scheduler.add(long_req)
    scheduler.step()
    short = llm.new_request(short_prompt, greedy)
    start = time.perf_counter()
    scheduler.add(short)
    steps = 0
    while not short.output.finished:
        scheduler.step()
        steps += 1
    waited = time.perf_counter() - start
    while scheduler.has_work:
        scheduler.step()
    first = short.output.stats.ttft_s
    return {"short_s": waited, "short_ttft_s": first, "steps": steps,
            "long_prefill_s": long_req.output.stats.prefill_time_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", type=common.int_list, default=[2048, 8191])
    parser.add_argument("--long", type=int, default=4000, help="the long prompt of the head-of-line run")
    parser.add_argument("--short-prompt", type=int, default=8)
    parser.add_argument("--short-tokens", type=int, default=8)
    parser.add_argument("--interleaved-prefill-chunk", type=int,
                        help="EngineConfig.interleaved_prefill_chunk (default: the engine's)")
    parser.add_argument("--label", default="this", help="names the checkout in the table and the file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/...)")
    args = parser.parse_args(argv)

    env = common.environment()
    rng = np.random.default_rng(args.seed)
    max_len = max(args.lengths + [args.long]) + args.short_tokens + 16
    options = {} if args.interleaved_prefill_chunk is None else {"interleaved_prefill_chunk": args.interleaved_prefill_chunk}
    llm = LLM(args.model, dtype="float32", engine=EngineConfig(max_model_len=max_len, **options), seed=0)
    config = llm.runner.config
    # The layers' weights: the embedding is a lookup, and the LM head scores the last token alone.
    weights = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(llm.runner.params.layers) if x.ndim >= 3)

    prefill = []
    for n in args.lengths:
        out = llm.generate([random_prompt(rng, config.vocab_size, n)], SamplingParams(temperature=0, max_tokens=1))[0]
        seconds = out.stats.prefill_time_s
        flops = prompt_flops(config, n, weights)
        prefill.append({"tokens": n, "prefill_s": seconds, "tokens_per_s": n / seconds, "tflops": flops / 1e12,
                        "gflop_per_s": flops / seconds / 1e9})

    long_prompt = random_prompt(rng, config.vocab_size, args.long)
    short_prompt = random_prompt(rng, config.vocab_size, args.short_prompt)
    alone_params = SamplingParams(temperature=0, max_tokens=args.short_tokens, ignore_eos=True)
    for _ in range(2):  # the first compiles
        start = time.perf_counter()
        llm.generate([short_prompt], alone_params)
        alone = time.perf_counter() - start
    runs = [head_of_line(llm, long_prompt, short_prompt, args.short_tokens) for _ in range(2)]
    blocking = dict(runs[-1], alone_s=alone, long_tokens=args.long)
    blocking["slowdown"] = blocking["short_s"] / alone

    common.print_table(
        f"long prompts, {args.label} ({specjax.__file__.rsplit('/specjax/', 1)[0]}), {args.model} fp32, "
        f"{env['device_kind']}, {env['date_utc'][:10]}",
        ["prompt tokens", "prefill s", "tokens/s", "TFLOP", "GFLOP/s"],
        [[p["tokens"], common.fmt(p["prefill_s"], 2), common.fmt(p["tokens_per_s"]), common.fmt(p["tflops"], 2),
          common.fmt(p["gflop_per_s"])] for p in prefill])
    common.print_table(
        f"head-of-line: a {args.short_prompt}-token prompt, {args.short_tokens} tokens, one step into a "
        f"{args.long}-token prefill",
        ["short alone s", "short during s", "its first token s", "slowdown", "steps", "long prefill s"],
        [[common.fmt(alone, 2), common.fmt(blocking["short_s"], 2), common.fmt(blocking["short_ttft_s"], 2),
          common.fmt(blocking["slowdown"], 1), blocking["steps"], common.fmt(blocking["long_prefill_s"], 2)]])
    path = args.out or common.default_results_path("long-prompt", args.label, env)
    common.write_json(path, {"label": args.label, "specjax": specjax.__file__, "model": args.model, "env": env,
                             "prefill": prefill, "head_of_line": blocking, "args": vars(args)})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
