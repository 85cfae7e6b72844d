"""How fast is the suffix cache's host-side bookkeeping? Micro-benchmark of SuffixDecoding's tries.

    python benchmarks/suffix_cache.py
    python benchmarks/suffix_cache.py --responses 50 --requests 2      # a quick check

The text is synthetic and code-like: lines of 4 to 12 tokens drawn Zipf-like from a vocabulary
(``--vocab``, default 2000), grouped into 120 blocks ("functions") of 3 to 8 lines; a response is
blocks drawn Zipf-like too (some recur often, as an agent's outputs do), each line edited (one token
replaced) with probability 0.1. A global cache of ``--responses`` responses of ``--response-len``
tokens is built as requests would build it (start, one token per ``add_active_response``, stop),
then ``--requests`` more requests, each with a ``--prompt-len`` prompt of the same text, are decoded
against a known response: each step speculates from the whole sequence so far, then appends the
draft's tokens that the response continues with plus one more (greedy verification's accepted
tokens and bonus token). Tree and chain drafts run as separate requests, each evicted afterwards.

Reported: µs per token of ``add_active_response`` (the request's own tree and the global one): one
token per call while filling the cache and once it is full (each stop then evicts the oldest
response, FIFO, and appends reuse the nodes it freed; another ``--responses``/10 requests), the
accepted tokens per call while decoding; µs per token of FIFO eviction; µs per ``speculate`` call
(median, p90, mean) and per speculated token; the drafts' mean size and tokens accepted per step;
the global trie's nodes and bytes per cached token.

Results: a table on stdout and JSON in benchmarks/results/suffix_cache-<text>-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(_REPO_ROOT))

try:
    from benchmarks import common
except ImportError:  # run as `python benchmarks/suffix_cache.py`
    import common

from specjax.speculation.suffix_cache import SuffixCache, SuffixDraft  # noqa: E402


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class CodeLikeText:
    """Streams of synthetic code-like tokens (see the module docstring)."""

    def __init__(self, vocab: int, seed: int):
        self.rng = np.random.default_rng(seed)
        zipf = 1.0 / np.arange(1, vocab + 1)
        lines = [self.rng.choice(vocab, size=self.rng.integers(4, 13), p=zipf / zipf.sum()) for _ in range(500)]
        self.blocks = [[lines[i] for i in self.rng.choice(len(lines), size=self.rng.integers(3, 9))]
                       for _ in range(120)]
        block_zipf = 1.0 / np.arange(1, len(self.blocks) + 1)
        self.block_p = block_zipf / block_zipf.sum()
        self.vocab = vocab

    def stream(self, length: int) -> list[int]:
        out: list[int] = []
        while len(out) < length:
            for line in self.blocks[self.rng.choice(len(self.blocks), p=self.block_p)]:
                line = line.copy()
                if self.rng.random() < 0.1:
                    line[self.rng.integers(len(line))] = self.rng.integers(self.vocab)
                out += line.tolist()
        return out[:length]


def accepted_length(draft: SuffixDraft, actual: list[int]) -> int:
    """How many of ``actual``'s first tokens the draft holds as one path (greedy verification)."""
    node, n = 0, 0
    children: dict[int, dict[int, int]] = {}
    for i, (token, parent) in enumerate(zip(draft.tokens, draft.parents)):
        children.setdefault(parent, {})[token] = i + 1
    while n < len(actual) and actual[n] in children.get(node, {}):
        node = children[node][actual[n]]
        n += 1
    return n


def decode(cache: SuffixCache, request_id, prompt: list[int], response: list[int], tree: bool,
           max_spec_tokens: int) -> dict:
    """Speculates along ``response`` as a verifier would accept it; times speculate and appends."""
    cache.start_request(request_id, prompt)
    spec_s, add_s, drafted, accepted, added = [], 0.0, 0, [], 0
    i = 0
    while i < len(response):
        start = time.perf_counter()
        draft = cache.speculate(request_id, prompt + response[:i], max_spec_tokens, tree=tree)
        spec_s.append(time.perf_counter() - start)
        drafted += len(draft.tokens)
        accepted.append(accepted_length(draft, response[i:]))
        step = response[i:i + accepted[-1] + 1]
        start = time.perf_counter()
        cache.add_active_response(request_id, step)
        add_s += time.perf_counter() - start
        added += len(step)
        i += len(step)
    cache.evict(request_id)  # the next request must not find this one's response
    cache.stop_request(request_id)
    us = np.asarray(spec_s) * 1e6
    return {"mode": "tree" if tree else "chain", "steps": len(spec_s), "speculate_us_median": float(np.median(us)),
            "speculate_us_p90": float(np.percentile(us, 90)), "speculate_us_mean": float(us.mean()),
            "speculate_us_per_drafted_token": float(us.sum() / max(drafted, 1)),
            "drafted_per_step": drafted / len(spec_s), "accepted_per_step": float(np.mean(accepted)),
            "add_us_per_token": add_s * 1e6 / added}


def fill(cache: SuffixCache, text: CodeLikeText, first_id: int, n: int, args) -> tuple[float, float]:
    """Runs ``n`` requests whose responses get cached, appending one token per call; returns µs per
    appended token and µs per token of the responses ``stop_request`` evicted (FIFO)."""
    add_s = stop_s = 0.0
    evicted_tokens = 0
    for r in range(first_id, first_id + n):
        cache.start_request(r, text.stream(args.prompt_len // 4))
        response = text.stream(args.response_len)
        start = time.perf_counter()
        for token in response:
            cache.add_active_response(r, [token])
        add_s += time.perf_counter() - start
        before = cache.num_cached_tokens + len(response)
        start = time.perf_counter()
        cache.stop_request(r)
        stop_s += time.perf_counter() - start
        evicted_tokens += before - cache.num_cached_tokens
    return add_s * 1e6 / (n * args.response_len), stop_s * 1e6 / max(evicted_tokens, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--responses", type=int, default=200, help="cached responses (default %(default)s)")
    parser.add_argument("--response-len", type=int, default=300, help="tokens per response (default %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=500,
                        help="prompt tokens of decoded requests (default %(default)s)")
    parser.add_argument("--requests", type=int, default=5, help="decoded requests per mode (default %(default)s)")
    parser.add_argument("--vocab", type=int, default=2000, help="vocabulary size (default %(default)s)")
    parser.add_argument("--max-depth", type=int, default=64, help="trie depth (default %(default)s)")
    parser.add_argument("--max-spec-tokens", type=int, default=32, help="draft budget (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON result path")
    args = parser.parse_args(argv)
    for name in ("responses", "response_len", "prompt_len", "requests", "vocab", "max_depth", "max_spec_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")

    env = {**common.environment(), "cpu": cpu_name(), "processor": platform.processor()}
    text = CodeLikeText(args.vocab, args.seed)
    cache = SuffixCache(max_depth=args.max_depth, max_cached_requests=args.responses)
    build_us, _ = fill(cache, text, 0, args.responses, args)
    global_nodes = cache.num_nodes
    nodes_per_token = global_nodes / cache.num_cached_tokens
    print(f"[suffix_cache] cached {args.responses} responses: {build_us:.1f} µs per appended token, "
          f"{global_nodes:,} nodes", flush=True)
    # At capacity every stop evicts the oldest response, and appends reuse the nodes it freed.
    full_us, evict_us = fill(cache, text, args.responses, max(1, args.responses // 10), args)

    runs = []
    for n in range(args.requests):
        prompt, response = text.stream(args.prompt_len), text.stream(args.response_len)
        for tree in (True, False):
            runs.append(decode(cache, ("bench", n, tree), prompt, response, tree, args.max_spec_tokens))

    # Memory, measured apart: tracemalloc slows the appends.
    tracemalloc.start()
    measured = SuffixCache(max_depth=args.max_depth, max_cached_requests=None)
    for r in range(20):
        measured.start_request(r, [])
        measured.add_active_response(r, text.stream(args.response_len))
        measured.stop_request(r)
    bytes_per_token = tracemalloc.get_traced_memory()[0] / measured.num_cached_tokens
    tracemalloc.stop()

    rows = []
    for mode in ("tree", "chain"):
        mine = [r for r in runs if r["mode"] == mode]
        rows.append([mode, sum(r["steps"] for r in mine),
                     common.fmt(np.median([r["speculate_us_median"] for r in mine])),
                     common.fmt(np.median([r["speculate_us_p90"] for r in mine])),
                     common.fmt(np.mean([r["speculate_us_per_drafted_token"] for r in mine])),
                     common.fmt(np.mean([r["drafted_per_step"] for r in mine])),
                     common.fmt(np.mean([r["accepted_per_step"] for r in mine]), 2),
                     common.fmt(np.mean([r["add_us_per_token"] for r in mine]))])
    common.print_table(
        f"suffix cache · {args.responses} cached responses of {args.response_len} tokens · depth {args.max_depth} · "
        f"budget {args.max_spec_tokens} · {env['cpu']} ({env['cpu_cores']} cores) · python {env['python']} · "
        f"{env['date_utc'][:10]}",
        ["drafts", "steps", "speculate µs (median)", "p90", "µs / drafted token", "drafted / step",
         "accepted / step", "add µs / token"], rows,
        [f"add µs / token: while decoding, the accepted tokens per call; filling the cache, one token per call: "
         f"{build_us:.1f} µs, at capacity (reusing evicted nodes) {full_us:.1f} µs (its own tree + the global one)",
         f"FIFO eviction: {evict_us:.1f} µs per evicted token; global trie: {nodes_per_token:.1f} nodes and "
         f"{bytes_per_token:,.0f} bytes per cached token",
         *filter(None, [common.load_warning(env)])])
    payload = {"benchmark": "suffix_cache", "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                         for k, v in vars(args).items()},
               "environment": env, "fill_add_us_per_token": build_us, "at_capacity_add_us_per_token": full_us,
               "evict_us_per_token": evict_us,
               "global_nodes": global_nodes, "nodes_per_cached_token": nodes_per_token,
               "bytes_per_cached_token": bytes_per_token, "runs": runs}
    out = args.out or common.default_results_path("suffix_cache", "code-like", env)
    print(f"[suffix_cache] wrote {common.write_json(out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
