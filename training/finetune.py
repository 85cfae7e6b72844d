"""``specjax finetune``'s run: a whole batch per optimizer step, orbax checkpoints, ``--resume``
and PEFT export (``specjax.finetune`` describes the command, its data and its optimiser).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import specjax.finetune
from specjax.config import ModelConfig
from specjax.finetune import (DataError, Examples, FinetuneSettings, add_arguments, make_optimizer, read_jsonl,
                              settings_from_args, split, step_rows, tokenize)
from specjax.lora import LoraAdapter, adapt, init_adapter, save_peft
from specjax.params import Params
from training.data import read_log  # noqa: F401  (a run's log, for callers of this module)
from training.teacher import full_forward


# ---------------------------------------------------------------------------- the step
def loss_sum(adapter: LoraAdapter, base: Params, config: ModelConfig, tokens: jax.Array, learn: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
    """Summed negative log-likelihood of the learnt tokens of tokens [B, T] (learn [B, T]), and their count."""
    logits = full_forward(adapt(base, adapter, config), config, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    weight = learn[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * weight), jnp.sum(weight)


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
    doc = specjax.finetune.__doc__
    p = argparse.ArgumentParser(prog="python -m training.finetune", description=doc.split("\n\n")[0],
                                epilog=doc.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
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
