"""What do LoRA adapters cost a decode step, per way of batching them, and how fast does
finetuning one run?

    python benchmarks/lora.py                                 # built-in model, batch 8, rank 16, every projection
    python benchmarks/lora.py --rank 8 --target-modules q_proj,v_proj --kernels gather,onehot

One runner of the base model without adapter slots (the baseline) and one per grouped-LoRA kernel
(``lora.GROUPED_LORA``: "gather", each row gathering its slot's factors, BGMV's form; "onehot",
every slot's product for every row, masked; "ragged", rows sorted by slot through
``lax.ragged_dot``, SGMV's form; "auto", the engine's default, onehot or gather by the step's shape), each with ``--max-loras`` slots of rank ``--rank`` holding
random adapters on ``--target-modules``. Every runner prefills the same ``--batch`` random prompts
of ``--prompt-len`` tokens, then decodes greedily; the rows use no adapter, all one adapter, or
four distinct adapters (row i the (i mod 4)-th). Rounds interleave every (runner, mix) with
``--steps`` timed decode steps each, so a machine that slows down slows them alike; each row of
the table has the median step time over all rounds and the median, over rounds, of the round's
median step against the base model's in the same round (and those ratios' range).

Finetuning: ``specjax finetune``'s own train step (``training.finetune.make_train_step``: forward,
backward through the frozen fp32 base weights, AdamW) on ``--finetune-batch`` random sequences of
``--finetune-len`` tokens, every token learnt, against the forward pass alone over the same
tokens (the eval loss); tokens/s is tokens processed per second, the median over
``--finetune-steps`` timed steps after one compiling step.

Results: a table on stdout and JSON in benchmarks/results/lora-<model>-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import jax
import numpy as np

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(_REPO_ROOT))

from benchmarks import common  # noqa: E402
from benchmarks.decode import add_sequences, prefill, timed_step  # noqa: E402
from specjax.engine.adapters import AdapterManager  # noqa: E402
from specjax.kv_cache import kv_bytes_per_token  # noqa: E402
from specjax.lora import GROUPED_LORA, MODULES, LoraAdapter, LoraConfig, init_adapter  # noqa: E402
from specjax.params import inference_params  # noqa: E402
from specjax.runner import EngineConfig, ModelRunner, StepInput  # noqa: E402

MIXES = {"no adapter": lambda row: 0, "1 adapter": lambda row: 1, "4 adapters": lambda row: 1 + row % 4}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model name or path (default %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="decoding rows (default %(default)s)")
    p.add_argument("--prompt-len", type=int, default=64, help="tokens prefilled per row (default %(default)s)")
    p.add_argument("--rank", type=int, default=16, help="adapters' rank, and the slots' (default %(default)s)")
    p.add_argument("--target-modules", type=common.name_list, default=list(MODULES),
                   help="adapted projections, comma-separated (default: all seven)")
    p.add_argument("--max-loras", type=int, default=4, help="adapter slots (default %(default)s)")
    p.add_argument("--kernels", type=common.name_list, default=list(GROUPED_LORA),
                   help=f"from {', '.join(GROUPED_LORA)} (default: all)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default %(default)s)")
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per (runner, mix) a round")
    p.add_argument("--finetune-batch", type=int, default=4, help="sequences per finetuning step (default %(default)s)")
    p.add_argument("--finetune-len", type=int, default=256, help="tokens per sequence (default %(default)s)")
    p.add_argument("--finetune-steps", type=int, default=5, help="timed finetuning steps; 0 skips (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON result path")
    args = p.parse_args(argv)
    if unknown := [k for k in args.kernels if k not in GROUPED_LORA]:
        p.error(f"unknown kernel(s) {', '.join(unknown)}; choose from {', '.join(GROUPED_LORA)}")
    if args.max_loras < 4:
        p.error("--max-loras must be at least 4 (the four-adapter mix)")
    if args.finetune_steps < 0:
        p.error("--finetune-steps must be 0 or more")
    for name in ("batch", "prompt_len", "rank", "rounds", "steps", "finetune_batch", "finetune_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def random_adapter(config: LoraConfig, model, seed: int) -> LoraAdapter:
    """Random A and B (a fresh adapter's B is zero; the work is the same, but keep it honest)."""
    adapter = init_adapter(config, model, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(adapter.b)))
    return LoraAdapter(a=adapter.a, b={m: 0.01 * jax.random.normal(next(keys), x.shape) for m, x in adapter.b.items()},
                       config=config)


def finetune_throughput(loaded, lora: LoraConfig, args) -> list[dict]:
    """Tokens/s of the finetuning step and of the forward pass alone, same tokens, same run."""
    import time

    from training.finetune import FinetuneSettings, loss_sum, make_optimizer, make_train_step

    config, base = loaded.config, loaded.params
    rng = np.random.default_rng(args.seed)
    tokens = jax.numpy.asarray(rng.integers(0, config.vocab_size, (args.finetune_batch, args.finetune_len)))
    learn = jax.numpy.ones(tokens.shape, bool)
    optimizer = make_optimizer(FinetuneSettings(lora=lora, total_steps=args.finetune_steps + 1))
    step_fn = make_train_step(config, optimizer)
    adapter = init_adapter(lora, config, jax.random.key(args.seed))
    state = [adapter, optimizer.init(adapter)]
    forward = jax.jit(loss_sum, static_argnums=2)

    def train_step():
        state[0], state[1], loss = step_fn(state[0], state[1], base, tokens[None], learn[None])
        return loss

    def forward_only():
        return forward(state[0], base, config, tokens, learn)[0]

    results = []
    for name, run in (("finetune step (forward + backward + AdamW)", train_step), ("forward only", forward_only)):
        run().block_until_ready()  # compiles
        seconds = []
        for _ in range(args.finetune_steps):
            start = time.perf_counter()
            run().block_until_ready()
            seconds.append(time.perf_counter() - start)
        median = statistics.median(seconds)
        results.append({"pass": name, "median_s": median, "tokens_per_s": tokens.size / median,
                        "all_s": seconds})
        print(f"[lora] {name}: {tokens.size / median:.0f} tokens/s", flush=True)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    from specjax.checkpoints import load_model

    env = common.environment()
    loaded = load_model(args.model, dtype="auto")
    config, params = loaded.config, inference_params(loaded.params)
    max_tokens = args.prompt_len + 2 * args.rounds * args.steps * len(MIXES) + 8
    pool = 2 * args.batch * max_tokens * kv_bytes_per_token(config, params.embed.dtype)
    lora = LoraConfig(r=args.rank, lora_alpha=2.0 * args.rank, target_modules=tuple(args.target_modules))
    adapters = [random_adapter(lora, config, 100 + i) for i in range(4)]
    prompts = np.random.default_rng(args.seed).integers(0, config.vocab_size, (args.batch, args.prompt_len))

    def build(kernel: str | None):
        engine = EngineConfig(kv_cache_bytes=pool, max_num_seqs=args.batch, max_model_len=max_tokens + 16,
                              max_loras=args.max_loras if kernel else 0, max_lora_rank=args.rank,
                              lora_kernel=kernel or "auto")
        runner = ModelRunner(config, params, engine)
        slots = [0]
        if kernel:
            manager = AdapterManager(runner, config)
            for i, adapter in enumerate(adapters):
                manager.add(f"a{i}", adapter)
                slots.append(manager.acquire(f"a{i}"))
        ids = add_sequences(runner, "lora", args.batch, max_tokens)
        tokens, _ = prefill(runner, ids, prompts)
        return {"runner": runner, "ids": ids, "tokens": tokens, "slots": slots}

    subjects = {"base": build(None)} | {k: build(k) for k in args.kernels}
    # Per (kernel, mix), each round's step times: a round's ratio to the base's in the same round
    # pairs them, so a machine that slows down for a while does not tilt the comparison.
    times: dict[tuple[str, str], list[list[float]]] = {}

    def decode(subject: dict, mix: str, steps: int) -> list[float]:
        runner, ids = subject["runner"], subject["ids"]
        seconds = []
        for _ in range(steps):
            inputs = [StepInput(s, [int(t)], lora_slot=subject["slots"][MIXES[mix](row)])
                      for row, (s, t) in enumerate(zip(ids, subject["tokens"]))]
            subject["tokens"], step = timed_step(runner, inputs)
            if not step.compiled:
                seconds.append(step.seconds)
        return seconds

    runs = [("base", "no adapter")] + [(k, mix) for k in args.kernels for mix in MIXES]
    for name, mix in runs:  # warm-up: compile every step shape
        decode(subjects[name], mix, 2)
    for r in range(args.rounds):
        for name, mix in runs[r % len(runs):] + runs[: r % len(runs)]:
            times.setdefault((name, mix), []).append(decode(subjects[name], mix, args.steps))
        print(f"[lora] round {r + 1}/{args.rounds}", flush=True)

    base_rounds = [statistics.median(r) for r in times["base", "no adapter"]]
    results, rows = [], []
    for name, mix in runs:
        ms = 1e3 * statistics.median([s for r in times[name, mix] for s in r])
        ratios = sorted(statistics.median(r) / base for r, base in zip(times[name, mix], base_rounds))
        vs_base = statistics.median(ratios)
        results.append({"kernel": name, "mix": mix, "median_ms": ms, "vs_base": vs_base, "round_ratios": ratios,
                        "steps": sum(map(len, times[name, mix])),
                        "all_ms": [[1e3 * s for s in r] for r in times[name, mix]]})
        rows.append([name, mix, f"{ms:.1f}", f"{vs_base:.2f}x", f"{ratios[0]:.2f}-{ratios[-1]:.2f}"])
    common.print_table(
        f"LoRA decode step · {args.model} · batch {args.batch} · rank {args.rank} on {','.join(args.target_modules)} · "
        f"{env['device_kind']} · jax {env['jax_version']} · {env['date_utc'][:10]}",
        ["kernel", "rows use", "median step ms", "vs base", "rounds' range"], rows,
        [f"{args.max_loras} slots; prompts of {args.prompt_len} tokens; {args.rounds} interleaved rounds of "
         f"{args.steps} steps per kernel and mix; base: the same model with no adapter slots; vs base: the median "
         "over rounds of each round's median step against the base's in that round"])
    finetune = []
    if args.finetune_steps:
        subjects.clear()  # the decode runners' KV pools, freed before the finetuning activations
        finetune = finetune_throughput(load_model(args.model, dtype="float32"), lora, args)
        forward_tps = finetune[1]["tokens_per_s"]
        common.print_table(
            f"LoRA finetuning · {args.model} (fp32) · {args.finetune_batch} x {args.finetune_len} tokens a step · "
            f"rank {args.rank} on {','.join(args.target_modules)} · {env['device_kind']} · {env['date_utc'][:10]}",
            ["pass", "median step s", "tokens/s", "vs forward only"],
            [[f["pass"], f"{f['median_s']:.2f}", f"{f['tokens_per_s']:.0f}", f"{f['tokens_per_s'] / forward_tps:.2f}x"]
             for f in finetune],
            [f"median of {args.finetune_steps} steps after one compiling step; every token learnt"])
    payload = {"benchmark": "lora", "model": args.model, "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                                      for k, v in vars(args).items()},
               "environment": env, "decode": results, "finetune": finetune}
    out = args.out or common.default_results_path("lora", args.model, env)
    print(f"[lora] wrote {common.write_json(out, payload)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
