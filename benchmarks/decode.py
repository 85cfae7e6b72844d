"""How fast does specjax prefill and decode, per batch size, and how close is a decode step to the
memory-bandwidth floor?

    python benchmarks/decode.py                          # built-in model, real weights, batch sweep
    python benchmarks/decode.py --compare-transformers   # + transformers' eager CPU greedy decode, batch 1
    python benchmarks/decode.py --shape llama3-8b        # random weights of a named shape, batch x context

Every measured step goes through ``ModelRunner.step`` (bucketed, jit-compiled: forward + KV write +
sampling). The runner compiles a new executable whenever a step's (batch, tokens, prefix pages)
bucket is new and reports that time in ``compile_time_s``, outside the seconds a step returns. Any
step that compiled, and the first step of every run, is a warm-up: it is recorded but not timed, and
the run keeps stepping until ``--decode-steps`` steps have been timed.

Model mode (``--model``, default the built-in smollm2-135m): each sequence is a ``--prompt-len``
prompt of random token ids, prefilled through the runner in one batched step per prefill chunk
(one warm-up prefill, then ``--prefill-repeats`` timed ones), then decoded greedily.

Shape mode (``--shape``): random weights (``random_params``) of a named shape, for each context
length C. The prefix is committed without running a prefill (``--fill direct``: pages are reserved
and marked used, KV values stay zero, which changes no work XLA does) or prefilled through the
runner (``--fill prefill``). Decoding starts at C - steps - 1 tokens so that the timed steps attend
to at most C tokens and, for C a power-of-two number of pages, all read the same page bucket.

Bandwidth floor (both modes, off with ``--no-floor``): a jitted ``x + 1`` over a large array
measures the device's copy bandwidth (read + write bytes / median time); a decode step must read
every layer weight, the final norm and the LM head (embedding rows are negligible) plus each
sequence's cached K/V, so floor = (weight bytes + batch x context x kv_bytes_per_token) / bandwidth.
The table shows measured median / floor.

Results: a table on stdout and JSON in benchmarks/results/decode-<subject>-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(_REPO_ROOT))

try:
    from benchmarks import common
except ImportError:  # run as `python benchmarks/decode.py`: this file's folder is on sys.path
    import common

from specjax.config import ModelConfig, RopeScaling, resolve_dtype  # noqa: E402 (after the sys.path fix)
from specjax.kv_cache import kv_bytes_per_token  # noqa: E402
from specjax.params import Params, inference_params, param_bytes, param_count, random_params  # noqa: E402
from specjax.runner import EngineConfig, ModelRunner, StepInput, default_cache_bytes, next_power_of_two  # noqa: E402

SHAPES: dict[str, ModelConfig] = {
    "llama3-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        tie_word_embeddings=False,
    ),
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
        head_dim=64, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
    ),
}

DEFAULT_MODEL = "smollm2-135m"
MODEL_BATCH_SIZES = [1, 2, 4, 8, 16, 32]
SHAPE_BATCH_SIZES = [1, 8, 32]
SHAPE_CONTEXT_LENS = [1024, 4096]
# Extra tokens reserved per sequence beyond the timed window, for warm-up steps (one per new bucket).
WARMUP_SLACK = 16


# ---------------------------------------------------------------------------- setup
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--model", help=f"model name or path (default {DEFAULT_MODEL}); real weights")
    what.add_argument("--shape", choices=sorted(SHAPES), help="random weights of a named shape instead of a model")
    p.add_argument("--dtype", default="auto",
                   help="weight/KV dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    p.add_argument("--batch-sizes", type=common.int_list,
                   help="comma-separated (default 1,2,4,8,16,32 for a model, 1,8,32 for a shape)")
    p.add_argument("--prompt-len", type=int, default=None, help="model mode: prompt tokens per sequence (default 128)")
    p.add_argument("--context-lens", type=common.int_list,
                   help="shape mode: context lengths the timed steps end at (default 1024,4096)")
    p.add_argument("--decode-steps", type=int, default=64, help="timed decode steps per run (default 64)")
    p.add_argument("--prefill-repeats", type=int, default=3,
                   help="timed prefills per batch size after one warm-up (default 3; model mode and --fill prefill)")
    p.add_argument("--fill", choices=("direct", "prefill"), default=None,
                   help="shape mode: commit the prefix without computing it (direct, default) or prefill it")
    p.add_argument("--layers", type=int, help="shape mode: override the number of layers")
    p.add_argument("--vocab", type=int, help="shape mode: override the vocabulary size")
    p.add_argument("--page-size", type=int, default=EngineConfig.page_size, help="KV page size (default 16)")
    p.add_argument("--prefill-chunk", type=int, default=EngineConfig.prefill_chunk,
                   help="longest prompt slice per step (default 512)")
    p.add_argument("--kv-cache-mib", type=int, default=None,
                   help="KV page pool size; default the engine's own (1 GiB on CPU, 85%% of free GPU memory), "
                        "grown if the runs need more")
    p.add_argument("--no-floor", action="store_true", help="skip the bandwidth measurement and floor analysis")
    p.add_argument("--bandwidth-mib", type=int, default=None,
                   help="array size of the copy-bandwidth test (default 1024 on accelerators, 256 on CPU)")
    p.add_argument("--compare-transformers", action="store_true",
                   help="model mode: also time transformers' eager CPU greedy decode (batch 1, same prompt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--xla-option", action="append", default=None, metavar="KEY=VALUE",
                   help="XLA compiler option for the runner's steps (repeatable; replaces the backend defaults; "
                        "'none' alone means no options)")
    p.add_argument("--min-batch-bucket", type=int, help="smallest padded batch (default: the backend's)")
    p.add_argument("--out", type=Path, help="JSON result path (default benchmarks/results/decode-...json)")
    args = p.parse_args(argv)

    if args.shape is None:
        args.model = args.model or DEFAULT_MODEL
        for flag, value in (("--context-lens", args.context_lens), ("--fill", args.fill),
                            ("--layers", args.layers), ("--vocab", args.vocab)):
            if value is not None:
                p.error(f"{flag} applies to --shape runs; a model run uses --prompt-len")
        args.prompt_len = 128 if args.prompt_len is None else args.prompt_len
        args.batch_sizes = args.batch_sizes or MODEL_BATCH_SIZES
        args.fill = "prefill"
        if args.prompt_len < 1:
            p.error("--prompt-len must be positive")
        if args.compare_transformers and args.decode_steps < 2:
            p.error("--compare-transformers needs --decode-steps of at least 2")
        if args.compare_transformers and 1 not in args.batch_sizes:
            args.batch_sizes = [1] + args.batch_sizes  # the comparison is against specjax's batch-1 run
    else:
        if args.prompt_len is not None:
            p.error("--prompt-len applies to model runs; a --shape run uses --context-lens")
        if args.compare_transformers:
            p.error("--compare-transformers needs real weights: use --model, not --shape")
        args.batch_sizes = args.batch_sizes or SHAPE_BATCH_SIZES
        args.context_lens = args.context_lens or SHAPE_CONTEXT_LENS
        args.fill = args.fill or "direct"
        for flag in ("layers", "vocab"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                p.error(f"--{flag} must be positive")
        too_short = [c for c in args.context_lens if c < args.decode_steps + 2]
        if too_short:
            p.error(f"context lengths {too_short} leave no prefix before {args.decode_steps} decode steps")
    if args.decode_steps < 1 or args.prefill_repeats < 1:
        p.error("--decode-steps and --prefill-repeats must be positive")
    return args


def shape_config(args: argparse.Namespace) -> ModelConfig:
    config = SHAPES[args.shape]
    if args.layers is not None:
        config = config.replace(num_layers=args.layers)
    if args.vocab is not None:
        config = config.replace(vocab_size=args.vocab)
    return config


def make_random_params(config: ModelConfig, dtype, seed: int) -> Params:
    """random_params under jit, so large shapes never hold an fp32 copy of a weight beside the result."""
    make = jax.jit(random_params, static_argnums=(0,), static_argnames=("dtype",))
    params = make(config, jax.random.key(seed), dtype=dtype)
    return jax.block_until_ready(params)


def weight_bytes_per_step(params: Params) -> int:
    """Bytes a decode step must read: every layer weight, the final norm and the LM head.

    With tied embeddings the LM head is the embedding table; otherwise the embedding contributes
    only the batch's rows, which are negligible.
    """
    layers = sum(x.nbytes for x in jax.tree_util.tree_leaves(params.layers))
    head = params.embed.nbytes if params.lm_head is None else params.lm_head.nbytes
    return int(layers + params.final_norm.nbytes + head)


def engine_config(args, config: ModelConfig, kv_per_token: int) -> EngineConfig:
    """Page pool: the engine's default size (what users get), grown to fit the largest run."""
    tokens = max(_run_lengths(args, c)[1] for c in _contexts(args))
    pages_per_seq = -(-tokens // args.page_size)
    # + max batch: the warm-up prefill's sequences are released before the timed ones are added,
    # but leave room anyway so allocation order never matters.
    needed = (max(args.batch_sizes) * pages_per_seq + max(args.batch_sizes)) * args.page_size * kv_per_token
    size = None if args.kv_cache_mib is None else args.kv_cache_mib << 20
    default = size or default_cache_bytes()
    if default < needed:
        size = needed
    return EngineConfig(page_size=args.page_size, kv_cache_bytes=size, max_num_seqs=max(args.batch_sizes),
                        compiler_options=_xla_options(args.xla_option), min_batch_bucket=args.min_batch_bucket,
                        prefill_chunk=args.prefill_chunk, max_model_len=max(tokens, 2))


def _xla_options(items: list[str] | None) -> tuple | None:
    if items is None:
        return None
    if items == ["none"]:
        return ()
    options = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--xla-option needs KEY=VALUE, got {item!r}")
        parsed = {"true": True, "false": False}.get(value.lower(), value)
        options.append((key, int(value) if isinstance(parsed, str) and value.lstrip("-").isdigit() else parsed))
    return tuple(options)


def _contexts(args) -> list[int]:
    return [args.prompt_len] if args.shape is None else args.context_lens


def _run_lengths(args, context: int) -> tuple[int, int]:
    """(prefix tokens committed before decoding, tokens reserved per sequence) for one run."""
    prefix = context if args.shape is None else context - args.decode_steps - 1
    return prefix, prefix + args.decode_steps + WARMUP_SLACK


# ---------------------------------------------------------------------------- measurement
@dataclasses.dataclass
class Step:
    seconds: float  # what runner.step returned: the executable's run, compilation excluded
    wall: float  # around the whole runner.step call: host-side batching, compilation if any
    compiled: bool
    committed: list[int]  # each sequence's cached tokens before the step (what its attention reads)
    pages_bucket: int  # prefix pages the compiled step reads per row


def timed_step(runner: ModelRunner, inputs: list[StepInput]) -> tuple[np.ndarray, Step]:
    committed = [runner.pages.length(x.seq_id) for x in inputs]
    pages_bucket = next_power_of_two(max(runner.pages.pages_for(n) for n in committed))
    compile_before = runner.compile_time_s
    start = time.perf_counter()
    tokens, seconds = runner.step(inputs)
    wall = time.perf_counter() - start
    return tokens, Step(seconds, wall, runner.compile_time_s > compile_before, committed, pages_bucket)


def prefill(runner: ModelRunner, seq_ids: list, prompts: np.ndarray) -> tuple[np.ndarray, list[Step]]:
    """Prefill every sequence's prompt, one batched step per chunk; returns each sequence's first token."""
    chunk = runner.engine.prefill_chunk
    steps = []
    for start in range(0, prompts.shape[1], chunk):
        inputs = [StepInput(s, prompts[i, start:start + chunk].tolist()) for i, s in enumerate(seq_ids)]
        tokens, step = timed_step(runner, inputs)
        steps.append(step)
    return tokens, steps


def add_sequences(runner: ModelRunner, tag: str, batch: int, max_tokens: int) -> list:
    ids = [(tag, i) for i in range(batch)]
    for s in ids:
        runner.add_sequence(s, max_tokens)
    return ids


def release(runner: ModelRunner, seq_ids: list) -> None:
    for s in seq_ids:
        runner.release(s)


def measure_prefill(runner, batch, prompts, max_tokens, repeats) -> tuple[list, np.ndarray, dict]:
    """One warm-up prefill, then ``repeats`` timed ones; the last timed batch stays for decoding."""
    records = []
    ids = None
    for rep in range(repeats + 1):
        if ids is not None:
            release(runner, ids)
        ids = add_sequences(runner, f"b{batch}-prefill{rep}", batch, max_tokens)
        tokens, steps = prefill(runner, ids, prompts)
        records.append(steps)
    warm, timed = records[0], records[1:]
    if any(step.compiled for steps in timed for step in steps):
        raise RuntimeError("a timed prefill compiled; the warm-up prefill should have covered its buckets")
    seconds = [sum(step.seconds for step in steps) for steps in timed]
    median = statistics.median(seconds)
    stats = {
        "tokens": batch * prompts.shape[1],
        "steps_per_prefill": len(warm),
        "median_s": median,
        "all_s": seconds,
        "tokens_per_s": batch * prompts.shape[1] / median,
        "warmup_s": sum(step.seconds for step in warm),
        "warmup_wall_s": sum(step.wall for step in warm),
    }
    return ids, tokens, stats


def measure_decode(runner, seq_ids, tokens, steps: int, max_tokens: int) -> tuple[list[Step], list[Step], list[int]]:
    """Greedy decode until ``steps`` non-warm-up steps are timed. Returns (warm-up, timed, row 0's tokens)."""
    warmups, timed = [], []
    row0 = [int(tokens[0])]
    while len(timed) < steps:
        if runner.pages.length(seq_ids[0]) + 1 > max_tokens:
            raise RuntimeError(f"decode ran past the {max_tokens} tokens reserved per sequence "
                               f"({len(warmups)} warm-up steps); raise WARMUP_SLACK")
        inputs = [StepInput(s, [int(t)]) for s, t in zip(seq_ids, tokens, strict=True)]
        tokens, step = timed_step(runner, inputs)
        row0.append(int(tokens[0]))
        (warmups if step.compiled or not warmups else timed).append(step)
    return warmups, timed, row0


def run(runner: ModelRunner, args, batch: int, context: int, prompts: np.ndarray, floor: dict | None) -> dict:
    """One (batch, context) measurement: prefill (or direct fill), then decode."""
    prefix, max_tokens = _run_lengths(args, context)
    compile_start = runner.compile_time_s
    result: dict[str, Any] = {"batch": batch, "context": context, "prefix_tokens": prefix, "fill": args.fill}
    if args.fill == "prefill":
        ids, tokens, result["prefill"] = measure_prefill(runner, batch, prompts[:batch, :prefix], max_tokens,
                                                         args.prefill_repeats)
    else:
        ids = add_sequences(runner, f"b{batch}-c{context}", batch, max_tokens)
        for s in ids:
            runner.pages.commit(s, prefix)  # pages reserved by add_sequence; the KV values are irrelevant here
        tokens = prompts[:batch, -1]
        result["prefill"] = None
    result["prefill_compile_s"] = runner.compile_time_s - compile_start

    compile_start = runner.compile_time_s
    warmups, timed, row0 = measure_decode(runner, ids, tokens, args.decode_steps, max_tokens)
    release(runner, ids)
    result["decode_compile_s"] = runner.compile_time_s - compile_start

    latency = common.latency_stats([s.seconds for s in timed])
    wall = common.latency_stats([s.wall for s in timed])
    committed = [sum(s.committed) / batch for s in timed]
    result["decode"] = {
        **latency,
        "tokens_per_s": batch / (latency["median_ms"] / 1e3),
        "wall": wall,
        "wall_tokens_per_s": batch / (wall["median_ms"] / 1e3),
        "mean_wall_tokens_per_s": batch / (wall["mean_ms"] / 1e3),
        "context_first": min(s.committed[0] for s in timed) + 1,
        "context_last": max(s.committed[0] for s in timed) + 1,
        "mean_cached_tokens": float(np.mean(committed)),
        "pages_buckets": sorted({s.pages_bucket for s in timed}),
        "warmup_steps": [{"step_ms": s.seconds * 1e3, "wall_ms": s.wall * 1e3, "compiled": s.compiled,
                          "pages_bucket": s.pages_bucket} for s in warmups],
    }
    result["generated_row0"] = row0
    if floor is not None:
        result["floor"] = floor_analysis(runner, batch, timed, latency["median_ms"] / 1e3, floor)
    return result


def floor_analysis(runner: ModelRunner, batch: int, timed: list[Step], median_s: float, floor: dict) -> dict:
    """Bandwidth floor of the timed steps, from the actual cached tokens and from the pages the step reads."""
    per_token = floor["kv_bytes_per_token"]
    kv_actual = float(np.mean([sum(s.committed) for s in timed])) * per_token
    # The compiled step gathers its page bucket for every row of its (power-of-two) batch bucket.
    rows = next_power_of_two(batch)
    kv_bucketed = float(np.mean([rows * s.pages_bucket * runner.engine.page_size for s in timed])) * per_token
    bandwidth = floor["bandwidth_bytes_per_s"]
    floor_s = (floor["weight_bytes"] + kv_actual) / bandwidth
    return {
        "weight_bytes": floor["weight_bytes"],
        "kv_bytes": kv_actual,
        "kv_bytes_bucketed": kv_bucketed,
        "floor_ms": floor_s * 1e3,
        "floor_bucketed_ms": (floor["weight_bytes"] + kv_bucketed) / bandwidth * 1e3,
        "measured_over_floor": median_s / floor_s,
    }


# ---------------------------------------------------------------------------- transformers
def compare_transformers(args, runner: ModelRunner, prompt: Sequence[int], block: int = 8) -> dict:
    """Batch-1 greedy decode, specjax against transformers' eager CPU model from the same GGUF.

    Both decode the same prompt one token per step; blocks of ``block`` steps alternate between the
    two so that other processes slow both alike, and the ratio of median step wall times is the
    result (wall time includes each side's host overhead). Steps in which specjax compiled a new
    bucket, and one warm-up step each, are not timed.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from specjax.checkpoints import resolve_model

    resolved = resolve_model(args.model)
    if resolved.kind != "gguf":
        raise SystemExit(f"--compare-transformers loads the model from a GGUF file; {args.model} is {resolved.kind}")
    torch.set_num_threads(common.cpu_cores())
    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(str(resolved.path.parent), gguf_file=resolved.path.name,
                                                 **{dtype_kw: torch.float32}).eval()

    seq = "compare-transformers"
    runner.add_sequence(seq, len(prompt) + args.decode_steps + 2 * block + 2)
    ours = [int(runner.step([StepInput(seq, list(prompt))])[0][0])]
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([list(prompt)]), use_cache=True)
    past, theirs = out.past_key_values, [int(out.logits[0, -1].argmax())]

    def our_step() -> float | None:
        compiled_before = runner.compile_time_s
        begin = time.perf_counter()
        tokens, _ = runner.step([StepInput(seq, [ours[-1]])])
        wall = time.perf_counter() - begin
        ours.append(int(tokens[0]))
        return None if runner.compile_time_s > compiled_before else wall

    def their_step() -> float:
        nonlocal past
        begin = time.perf_counter()
        with torch.inference_mode():
            step = model(input_ids=torch.tensor([[theirs[-1]]]), past_key_values=past, use_cache=True)
        past = step.past_key_values
        theirs.append(int(step.logits[0, -1].argmax()))
        return time.perf_counter() - begin

    our_step(), their_step()  # warm-up
    our_times: list[float] = []
    their_times: list[float] = []
    while len(our_times) < args.decode_steps or len(their_times) < args.decode_steps:
        for _ in range(block):
            wall = our_step()
            if wall is not None:
                our_times.append(wall)
        their_times.extend(their_step() for _ in range(block))
    runner.release(seq)
    ours_ms, theirs_ms = statistics.median(our_times) * 1e3, statistics.median(their_times) * 1e3
    compared = min(len(ours), len(theirs))
    agree = next((i for i in range(compared) if ours[i] != theirs[i]), compared)
    return {
        "gguf": str(resolved.path),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "method": f"median wall time per greedy decode step, batch 1, alternating blocks of {block} steps",
        "prompt_tokens": len(prompt),
        "steps_timed": [len(our_times), len(their_times)],
        "specjax_step_ms": ours_ms,
        "transformers_step_ms": theirs_ms,
        "specjax_tokens_per_s": 1e3 / ours_ms,
        "transformers_tokens_per_s": 1e3 / theirs_ms,
        "ratio": theirs_ms / ours_ms,
        "greedy_tokens_agreeing": agree,
        "greedy_tokens_compared": compared,
    }


# ---------------------------------------------------------------------------- main
def load_subject(args, dtype) -> tuple[ModelConfig, Params, str, str]:
    """(config, params, where the weights came from, name for the results file)."""
    if args.shape is None:
        from specjax.checkpoints import load_model

        loaded = load_model(args.model, dtype=dtype)
        subject = Path(args.model).stem if args.model.endswith(".gguf") else Path(args.model).name
        return loaded.config, loaded.params, loaded.source, subject
    config = shape_config(args)
    params = make_random_params(config, dtype, args.seed)
    overrides = "".join(f"-{tag}{value}" for tag, value in (("L", args.layers), ("V", args.vocab)) if value is not None)
    return config, params, f"random_params(seed={args.seed})", args.shape + overrides


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    env = common.environment()
    dtype = resolve_dtype(args.dtype)
    dtype_name = jnp.dtype(dtype).name
    notes: list[str] = []
    warning = common.load_warning(env)
    if warning:
        notes.append(warning)
        print(f"[decode] warning: {warning}", flush=True)

    start = time.perf_counter()
    config, params, source, subject = load_subject(args, dtype)
    params = inference_params(params)  # bf16 on a CPU: bf16 storage, fp32 arithmetic, as LLM does
    load_s = time.perf_counter() - start
    weight_bytes = weight_bytes_per_step(params)
    kv_per_token = kv_bytes_per_token(config, params.embed.dtype)
    print(f"[decode] {subject}: {param_count(params) / 1e6:,.1f} M params, {param_bytes(params) / 2**20:,.1f} MiB "
          f"({dtype_name}, loaded in {load_s:.1f} s); {weight_bytes / 2**20:,.1f} MiB read per decode step + "
          f"{kv_per_token / 1024:,.1f} KiB per cached token; {env['device_kind']} ({env['platform']})", flush=True)

    floor = None
    if not args.no_floor:  # before the runner allocates its page pool, which may take most of the memory
        mib = args.bandwidth_mib or (256 if env["platform"] == "cpu" else 1024)
        bandwidth = common.measure_copy_bandwidth(mib << 20)
        floor = {**bandwidth, "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_per_token}
        print(f"[decode] copy bandwidth: {bandwidth['bandwidth_bytes_per_s'] / 1e9:,.1f} GB/s median "
              f"({bandwidth['best_bandwidth_bytes_per_s'] / 1e9:,.1f} best; {mib} MiB x + 1)", flush=True)

    engine = engine_config(args, config, kv_per_token)
    runner = ModelRunner(config, params, engine)
    rng = np.random.default_rng(args.seed)
    low = 100 if config.vocab_size > 1000 else 0  # skip the special tokens at the start of real vocabularies
    longest_prefix = max(_run_lengths(args, c)[0] for c in _contexts(args))
    # One prompt matrix: batch B uses its first B rows, so row 0 (the batch-1 prompt) is shared.
    prompts = rng.integers(low, config.vocab_size, size=(max(args.batch_sizes), longest_prefix), dtype=np.int32)

    runs = []
    for context in _contexts(args):
        for batch in args.batch_sizes:
            result = run(runner, args, batch, context, prompts, floor)
            runs.append(result)
            d = result["decode"]
            compile_s = result["prefill_compile_s"] + result["decode_compile_s"]
            print(f"[decode] batch {batch:3d} context {context:6d}: {d['median_ms']:8.2f} ms/step median, "
                  f"{d['tokens_per_s']:10,.1f} tokens/s; compile {compile_s:.1f} s", flush=True)

    prompt_row0 = prompts[0, :args.prompt_len].tolist() if args.shape is None else None
    comparison = None
    if args.compare_transformers:
        comparison = compare_transformers(args, runner, prompt_row0)
        if env["platform"] != "cpu":
            notes.append(f"specjax ran on {env['device_kind']}, transformers on this host's CPU")

    report(args, subject, env, runs, comparison, runner.compile_time_s, notes)
    payload = {
        "benchmark": "decode",
        "subject": subject,
        "mode": "model" if args.shape is None else "shape",
        "model": args.model,
        "shape": args.shape,
        "source": source,
        "environment": env,
        "config": dataclasses.asdict(config),
        "dtype": dtype_name,
        "engine": dataclasses.asdict(engine),
        "compiler_options": runner.compiler_options,
        "min_batch_bucket": runner.min_batch_bucket,
        "param_count": param_count(params),
        "param_bytes": param_bytes(params),
        "weight_bytes_per_step": weight_bytes,
        "kv_bytes_per_token": kv_per_token,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "bandwidth": None if floor is None else {k: floor[k] for k in
                                                  ("kernel", "array_bytes", "bytes_moved", "repeats", "median_s",
                                                   "bandwidth_bytes_per_s", "best_bandwidth_bytes_per_s")},
        "total_compile_s": runner.compile_time_s,
        "prompt_row0": prompt_row0,
        "runs": runs,
        "transformers_comparison": comparison,
        "notes": notes,
    }
    path = common.write_json(args.out or common.default_results_path("decode", subject, env), payload)
    print(f"[decode] wrote {path}")
    return 0


def report(args, subject: str, env: dict, runs: list[dict], comparison: dict | None, compile_s: float,
           warnings: Sequence[str]) -> None:
    floor = runs and "floor" in runs[0]
    columns = ["batch", "context", "prefill tok/s", "median ms", "p90 ms", "decode tok/s", "compile s"]
    if floor:
        columns += ["floor ms", "x floor"]
    rows = []
    for r in runs:
        d = r["decode"]
        row = [r["batch"], f"{d['context_first']}-{d['context_last']}",
               common.fmt(r["prefill"]["tokens_per_s"]) if r["prefill"] else None,
               common.fmt(d["median_ms"], 2), common.fmt(d["p90_ms"], 2), common.fmt(d["tokens_per_s"]),
               common.fmt(r["prefill_compile_s"] + r["decode_compile_s"])]
        if floor:
            row += [common.fmt(r["floor"]["floor_ms"], 2), common.fmt(r["floor"]["measured_over_floor"], 2)]
        rows.append(row)
    notes = [f"context: tokens attended by the first-last timed step; {args.decode_steps} timed decode steps "
             f"after warm-ups; compile time is excluded from every timing (total {compile_s:.1f} s)."]
    if floor:
        bw = runs[0]["floor"]
        notes.append("floor: (weights read per step + cached K/V) / measured copy bandwidth; "
                     f"weights {bw['weight_bytes'] / 2**20:,.1f} MiB.")
    notes += [f"warning: {w}" for w in warnings]
    title = f"decode · {subject} · {env['device_kind']} · jax {env['jax_version']}"
    common.print_table(title, columns, rows, notes)
    if comparison:
        c = comparison
        print(f"\nbatch-1 greedy decode, {c['method']}, prompt {c['prompt_tokens']} tokens:\n"
              f"  specjax {c['specjax_step_ms']:.2f} ms/step ({c['specjax_tokens_per_s']:.1f} tokens/s)\n"
              f"  transformers {c['transformers_version']} eager CPU fp32, {c['torch_threads']} threads: "
              f"{c['transformers_step_ms']:.2f} ms/step ({c['transformers_tokens_per_s']:.1f} tokens/s)\n"
              f"  ratio specjax/transformers: {c['ratio']:.2f}x; greedy tokens agree for "
              f"{c['greedy_tokens_agreeing']}/{c['greedy_tokens_compared']}")


if __name__ == "__main__":
    sys.exit(main())
