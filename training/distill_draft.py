"""Distil a draft model from the target: ``python -m training.distill_draft --name a --out DIR``.

One command runs every stage, each resumable and each done once (outputs under ``--work-dir``,
``data/`` shared by all drafts, ``runs/NAME/`` per draft):

1. text windows: stdlib text and ShareGPT conversations (``specjax.datasets``) rendered with the target's
   chat template, packed into ``--seq-len`` token windows (``training.data``);
2. the draft vocabulary: the ``--vocab`` most frequent target ids of those windows plus every special
   token (``specjax.draft.build_draft_vocab``);
3. the teacher cache of the text windows: target top-k log-probs per position (``training.teacher``);
4. the target's own greedy answers to training prompts (code prompts from documented stdlib
   functions, first turns of ShareGPT training conversations), their windows and teacher cache;
5. for ``--name b`` with ``--boost-from A``: where draft A's argmax misses the target's (boost weights);
6. training: ``--text-steps`` on the text windows, then ``--gen-steps`` on the generations, AdamW with
   linear warmup and cosine decay over both, orbax checkpoints every ``--save-every`` steps;
7. export: the final draft to ``--out`` (``specjax.draft.save_draft``), matrices in ``--save-dtype``
   (bf16 by default: the committed drafts are half the size, and the runner computes in fp32 on CPU).

The loss at each position is KL(teacher || draft) over k + 1 buckets: the teacher's top-k tokens
that the draft vocabulary holds, and one bucket for everything else (the teacher's tail below the
top-k and its mass on tokens the draft cannot emit; the draft's remaining tokens). It is zero iff the
draft matches the teacher on every kept token and on the total of the rest; the log prints how much
teacher mass the top-k and the draft vocabulary keep.
Collective boost-tuning (SpecInfer): draft B's loss weighs positions where draft A's argmax differs
from the target's by ``--boost`` (default 4) instead of 1, so B learns what A gets wrong.

``--resume`` continues from the latest checkpoint with the same data order and optimizer state: the
batch of each step depends only on (seed, step), so an interrupted run and an uninterrupted one log
the same losses.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from specjax.config import ModelConfig
from specjax.draft import (
    DraftVocab,
    build_draft_vocab,
    cast_params,
    compute_ratio,
    draft_config,
    flops_per_token,
    init_from_target,
    load_draft,
    save_draft,
)
from specjax.params import Params, random_params
from training import data
from training.data import read_log  # noqa: F401  (a run's log, for callers of this module)
from training.teacher import TeacherCache, build_teacher_cache, full_forward

TARGET = "smollm2-135m"


# ---------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class DraftArch:
    """The draft's shape beyond the target's: layer count, FFN width, and how its layers start."""

    num_layers: int = 3
    intermediate_size: int | None = None  # None: the target's
    init_layers: tuple[int, ...] | None = None  # copy these target layers; None: random layers


# Both drafts have the target's width, so the embedding rows of the draft vocabulary are copied from
# the target, and start from its first three layers: no subset of the target's layers predicts
# anything by itself (argmax agreement < 5%), but after 40 steps of 8 x 256 tokens the copy reached
# KL 3.84 / agreement 18.6% against 4.58 / 6.4% from random layers. B differs from A by its
# boost-tuned loss.
DRAFT_ARCHS = {"a": DraftArch(num_layers=3, init_layers=(0, 1, 2)),
               "b": DraftArch(num_layers=3, init_layers=(0, 1, 2))}


@dataclass(frozen=True)
class TrainSettings:
    text_steps: int
    gen_steps: int = 0
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    save_every: int = 50
    seed: int = 0
    compute_dtype: str = "float32"

    @property
    def total_steps(self) -> int:
        return self.text_steps + self.gen_steps


# ---------------------------------------------------------------------------- corpora
@dataclass
class Corpus:
    """Token windows [R, T], their teacher cache, and per-position loss weights [R, T] (None: all 1)."""

    name: str
    windows: np.ndarray
    cache: TeacherCache
    weights: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return int(self.windows.shape[0])


def batch_arrays(corpus: Corpus, rows: np.ndarray) -> dict[str, np.ndarray]:
    """One training batch: tokens [B, T] int32, teacher ids [B, T, k] int32 and log-probs [B, T, k]
    float32, weights [B, T] float32."""
    rows = np.sort(rows)
    weights = (np.ones(corpus.windows[rows].shape, np.float32) if corpus.weights is None
               else np.asarray(corpus.weights[rows], np.float32))
    return {"tokens": np.asarray(corpus.windows[rows], np.int32),
            "teacher_ids": np.asarray(corpus.cache.ids[rows], np.int32),
            "teacher_logprobs": np.asarray(corpus.cache.logprobs[rows], np.float32),
            "weights": weights}


# ---------------------------------------------------------------------------- loss and step
def distill_loss(params: Params, config: ModelConfig, vocab: DraftVocab, batch: dict[str, jax.Array],
                 compute_dtype=jnp.float32) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean over positions of KL(teacher || draft) on the teacher's top-k buckets.

    The buckets are the teacher's top-k tokens that are in the draft vocabulary, plus one "rest"
    bucket holding all other mass (the teacher's tail and its tokens the draft cannot emit; the
    draft's other tokens). The KL is exact on this coarsening: zero iff the draft gives every kept
    token the teacher's probability and the rest its total, so the draft is not pushed to pile the
    tail's mass onto the top-k (which would distort multi-step speculative sampling).
    Returns (loss, metrics): ``kl`` (unweighted mean), ``agree`` (share of positions where the
    draft's argmax is the teacher's argmax, in target ids: a proxy for greedy acceptance).
    """
    d2t, t2d = jnp.asarray(vocab.draft_to_target), jnp.asarray(vocab.target_to_draft)
    if compute_dtype != jnp.float32:
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: x if jax.tree_util.keystr(p).endswith("norm") else x.astype(compute_dtype), params)
    logits = full_forward(params, config, t2d[batch["tokens"]])  # [B, T, N] fp32
    log_q = jax.nn.log_softmax(logits, axis=-1)
    teacher_ids = batch["teacher_ids"]
    draft_ids = t2d[teacher_ids]
    valid = d2t[draft_ids] == teacher_ids  # [B, T, k]
    log_p = jnp.where(valid, batch["teacher_logprobs"], 0.0)
    p = jnp.where(valid, jnp.exp(log_p), 0.0)
    log_q_at = jnp.where(valid, jnp.take_along_axis(log_q, draft_ids, axis=-1), 0.0)
    q_kept = jnp.sum(jnp.where(valid, jnp.exp(log_q_at), 0.0), axis=-1)
    p_rest = jnp.clip(1.0 - jnp.sum(p, axis=-1), 0.0, 1.0)
    log_q_rest = jnp.log(jnp.maximum(1.0 - q_kept, 1e-6))
    kl_rest = jnp.where(p_rest > 0, p_rest * (jnp.log(jnp.maximum(p_rest, 1e-30)) - log_q_rest), 0.0)
    kl = jnp.sum(p * (log_p - log_q_at), axis=-1) + kl_rest  # [B, T]
    weights = batch["weights"]
    loss = jnp.sum(weights * kl) / jnp.maximum(jnp.sum(weights), 1e-6)
    agree = d2t[jnp.argmax(logits, axis=-1)] == teacher_ids[..., 0]
    return loss, {"kl": jnp.mean(kl), "agree": jnp.mean(agree)}


def make_optimizer(settings: TrainSettings) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=settings.learning_rate, warmup_steps=min(settings.warmup_steps, settings.total_steps),
        decay_steps=max(settings.total_steps, 1), end_value=settings.learning_rate * 0.05)
    decay_mask = lambda params: jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=settings.weight_decay, mask=decay_mask))


def make_train_step(config: ModelConfig, vocab: DraftVocab, optimizer: optax.GradientTransformation,
                    compute_dtype=jnp.float32):
    """jit-compiled ``(params, opt_state, batch) -> (params, opt_state, loss, metrics)``."""
    def step(params, opt_state, batch):
        (loss, metrics), grads = jax.value_and_grad(distill_loss, has_aux=True)(
            params, config, vocab, batch, compute_dtype)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, metrics

    return jax.jit(step, donate_argnums=(0, 1))


def initial_params(arch: DraftArch, config: ModelConfig, vocab: DraftVocab, target_params: Params,
                   target_config: ModelConfig, seed: int) -> Params:
    """Embedding rows from the target always; layers copied (``arch.init_layers``) or random."""
    if arch.init_layers is not None and arch.intermediate_size in (None, target_config.intermediate_size):
        return init_from_target(target_params, target_config, config, vocab, arch.init_layers)
    params = random_params(config, jax.random.key(seed))
    head = target_params.embed if target_params.lm_head is None else target_params.lm_head.T
    return dataclasses.replace(params, embed=jnp.asarray(head)[jnp.asarray(vocab.draft_to_target)],
                               final_norm=target_params.final_norm)


# ---------------------------------------------------------------------------- training loop
def _schedule_corpus(step: int, settings: TrainSettings, text: Corpus, gen: Corpus | None) -> tuple[Corpus, np.ndarray]:
    """The corpus and rows of ``step``: text for the first ``text_steps``, generations after."""
    if step < settings.text_steps or gen is None:
        return text, data.batch_rows(text.rows, settings.batch_size, step, settings.seed)
    return gen, data.batch_rows(gen.rows, settings.batch_size, step - settings.text_steps, settings.seed + 1)


def train(run_dir: Path, config: ModelConfig, vocab: DraftVocab, init: Params, settings: TrainSettings,
          text: Corpus, gen: Corpus | None = None, *, resume: bool = False, stop_at: int | None = None,
          progress: bool = True) -> Params:
    """Train from ``init`` (or the latest checkpoint in ``run_dir/ckpt`` with ``resume``) to
    ``settings.total_steps``; ``stop_at`` ends early as a kill would (tests). Logs every step to
    ``run_dir/train_log.jsonl``; returns the final params."""
    run_dir.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(settings)
    compute_dtype = jnp.dtype(settings.compute_dtype).type
    step_fn = make_train_step(config, vocab, optimizer, compute_dtype)
    params = jax.tree_util.tree_map(jnp.copy, init)  # the step donates its inputs; leave the caller's intact
    opt_state = optimizer.init(params)
    manager = ocp.CheckpointManager(
        (run_dir / "ckpt").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False))
    start = 0
    latest = manager.latest_step()
    if latest is not None:
        if not resume:
            raise SystemExit(f"{run_dir / 'ckpt'} already has checkpoints (step {latest}); pass --resume to "
                             "continue, or use another --work-dir / --name")
        abstract = jax.eval_shape(lambda: {"params": params, "opt_state": opt_state})
        state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
        params, opt_state, start = state["params"], state["opt_state"], latest
    log_path = run_dir / "train_log.jsonl"
    end = settings.total_steps if stop_at is None else min(stop_at, settings.total_steps)
    tokens_per_step = settings.batch_size * text.windows.shape[1]
    bar = None
    if progress and start < end:
        from tqdm import tqdm
        bar = tqdm(total=settings.total_steps, initial=start, desc=f"distil {run_dir.name}", unit="step",
                   mininterval=2.0)
    tick, window_tokens = time.perf_counter(), 0
    try:
        with open(log_path, "a", encoding="utf-8") as log:
            for step in range(start, end):
                corpus, rows = _schedule_corpus(step, settings, text, gen)
                batch = {k: jnp.asarray(v) for k, v in batch_arrays(corpus, rows).items()}
                params, opt_state, loss, metrics = step_fn(params, opt_state, batch)
                loss, metrics = float(loss), {k: float(v) for k, v in metrics.items()}
                window_tokens += tokens_per_step
                now = time.perf_counter()
                tok_s = window_tokens / max(now - tick, 1e-9)
                if now - tick > 30:
                    tick, window_tokens = now, 0
                log.write(json.dumps({"step": step, "corpus": corpus.name, "loss": loss, **metrics,
                                      "tokens_per_s": round(tok_s, 1), "time": time.time()}) + "\n")
                log.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", agree=f"{metrics['agree']:.3f}", tok_s=f"{tok_s:.0f}",
                                    data=corpus.name, refresh=False)
                    bar.update(1)
                done = step + 1
                if done % settings.save_every == 0 or done == settings.total_steps:
                    manager.save(done, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
    finally:
        if bar is not None:
            bar.close()
        manager.wait_until_finished()
        manager.close()
    return params


# ---------------------------------------------------------------------------- data stages
def prepare_text(data_dir: Path, tokenizer, mix: data.TextMix) -> np.ndarray:
    path = data_dir / "text_windows.npy"
    if path.is_file():
        return np.load(path)
    windows, manifest = data.build_text_windows(tokenizer, mix)
    data_dir.mkdir(parents=True, exist_ok=True)
    np.save(data_dir / "text_windows.tmp.npy", windows)
    data.save_json(data_dir / "text_manifest.json", manifest)
    (data_dir / "text_windows.tmp.npy").replace(path)
    return windows


def prepare_vocab(data_dir: Path, windows: np.ndarray, size: int, tokenizer, target_embed) -> DraftVocab:
    path = data_dir / f"vocab_{size}.npz"
    if path.is_file():
        with np.load(path) as f:
            return DraftVocab(f["draft_to_target"], f["target_to_draft"])
    counts = np.bincount(windows.ravel(), minlength=target_embed.shape[0])
    special = sorted(tokenizer.backend.get_added_tokens_decoder())
    vocab = build_draft_vocab(counts, size, special, np.asarray(target_embed))
    np.savez(data_dir / f"vocab_{size}.tmp.npz", draft_to_target=vocab.draft_to_target,
             target_to_draft=vocab.target_to_draft)
    (data_dir / f"vocab_{size}.tmp.npz").replace(path)
    return vocab


def generation_prompts(limit: int, seed: int) -> list[list[dict]]:
    """Half code prompts, half ShareGPT first turns when ShareGPT is available (else all code)."""
    chats, _ = data.sharegpt_conversations()
    chat = data.chat_prompts(chats, limit // 2, seed) if chats else []
    code = data.code_prompts(limit - len(chat), seed)
    prompts = code + chat
    order = np.random.default_rng(seed).permutation(len(prompts))
    return [prompts[i] for i in order]


def prepare_generations(data_dir: Path, loaded, prompts: Sequence, seq_len: int, max_tokens: int,
                        max_num_seqs: int) -> np.ndarray:
    """Windows of the target's greedy answers (prompt + answer, one document each)."""
    gen_dir = data_dir / "generations"
    gen_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps([list(prompts), max_tokens]).encode()).hexdigest()
    manifest_path = gen_dir / "manifest.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text())["prompts_sha256"] != digest:
        raise SystemExit(f"{gen_dir} holds generations of other prompts; delete it or use another --work-dir")
    data.save_json(manifest_path, {"prompts_sha256": digest, "prompts": len(prompts), "max_tokens": max_tokens})

    def make_llm():
        from specjax import LLM
        from specjax.runner import EngineConfig

        return LLM(loaded, engine=EngineConfig(max_num_seqs=max_num_seqs, max_model_len=2048))

    from tqdm import tqdm
    bar = tqdm(total=len(prompts), desc="target generations", unit="prompt", mininterval=5.0)

    def progress(done, total):
        bar.n = done
        bar.refresh()

    seqs = data.generate_continuations(make_llm, prompts, gen_dir, max_tokens=max_tokens, chunk=max_num_seqs,
                                       progress=progress)
    bar.close()
    sep = loaded.tokenizer.token_to_id(data.DOC_SEPARATOR) or 0
    order = np.random.default_rng(7).permutation(len(seqs))
    return data.pack_windows([seqs[i] for i in order], seq_len, sep)


def boost_weights(path: Path, corpus: Corpus, boost_draft, boost: float, batch_size: int = 16) -> np.ndarray:
    """[R, T] loss weights: ``boost`` where draft A's argmax (in target ids) differs from the
    teacher's top-1, 1 elsewhere. Computed once per corpus and saved to ``path``."""
    if path.is_file():
        disagree = np.load(path)
    else:
        config, params, vocab = boost_draft
        t2d, d2t = jnp.asarray(vocab.target_to_draft), jnp.asarray(vocab.draft_to_target)
        fn = jax.jit(lambda p, t: d2t[jnp.argmax(full_forward(p, config, t2d[t]), axis=-1)])
        disagree = np.zeros(corpus.windows.shape, bool)
        for lo in range(0, corpus.rows, batch_size):
            block = np.asarray(corpus.windows[lo:lo + batch_size], np.int32)
            pad = batch_size - block.shape[0]
            full = np.concatenate([block, np.repeat(block[:1], pad, axis=0)]) if pad else block
            argmax = np.asarray(fn(params, jnp.asarray(full)))[: block.shape[0]]
            disagree[lo:lo + block.shape[0]] = argmax != corpus.cache.ids[lo:lo + batch_size, :, 0]
        np.save(path.with_suffix(".tmp.npy"), disagree)
        path.with_suffix(".tmp.npy").replace(path)
    return np.where(disagree, np.float32(boost), np.float32(1.0))


def cache_report(corpus: Corpus, vocab: DraftVocab, rows: int = 256) -> dict[str, float]:
    """How much teacher mass the top-k and the draft vocabulary keep (over the first ``rows``)."""
    ids = np.asarray(corpus.cache.ids[:rows], np.int64)
    p = np.exp(np.asarray(corpus.cache.logprobs[:rows], np.float32))
    in_vocab = vocab.in_vocab(ids)
    return {"topk_mass": float(p.sum(-1).mean()), "topk_in_vocab_mass": float((p * in_vocab).sum(-1).mean()),
            "top1_in_vocab": float(in_vocab[..., 0].mean())}


# ---------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.distill_draft", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--name", required=True, choices=sorted(DRAFT_ARCHS), help="which draft")
    parser.add_argument("--out", required=True, type=Path, help="where the finished draft is saved")
    parser.add_argument("--work-dir", type=Path, default=Path(".train/distill"),
                        help="data/ (shared by drafts) and runs/NAME/ (checkpoints, log)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--steps", type=int, default=None, help="text steps (default: 2 epochs of the text windows)")
    parser.add_argument("--gen-steps", type=int, default=None, help="steps on generations (default: 2 epochs)")
    parser.add_argument("--text-tokens", type=int, default=921_600, help="token budget of the text windows")
    parser.add_argument("--chat-fraction", type=float, default=0.5, help="share of text tokens from ShareGPT")
    parser.add_argument("--gen-prompts", type=int, default=256, help="training prompts the target answers")
    parser.add_argument("--gen-max-tokens", type=int, default=192)
    parser.add_argument("--gen-batch", type=int, default=16, help="concurrent sequences while generating")
    parser.add_argument("--seq-len", type=int, default=data.SEQ_LEN)
    parser.add_argument("--vocab", type=int, default=8192, help="draft vocabulary size")
    parser.add_argument("--top-k", type=int, default=32, help="teacher log-probs kept per position")
    parser.add_argument("--teacher-batch", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--boost-from", type=Path, default=None, help="draft A's directory (for --name b)")
    parser.add_argument("--boost", type=float, default=4.0, help="loss weight where draft A misses")
    parser.add_argument("--prepare-only", action="store_true", help="stop after the data stages")
    parser.add_argument("--export-only", action="store_true", help="save the latest checkpoint to --out and stop")
    parser.add_argument("--save-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                        help="dtype of the exported draft's matrices (bf16 halves the committed size)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.name == "b" and args.boost_from is None and not args.prepare_only:
        raise SystemExit("--name b is boost-tuned on draft A's mistakes: pass --boost-from <draft A directory>")
    from specjax.checkpoints import load_model

    print(f"[distill] {' '.join(shlex.quote(a) for a in sys.argv)}", flush=True)
    loaded = load_model(TARGET, dtype="float32")
    tconf, tparams, tokenizer = loaded.config, loaded.params, loaded.tokenizer
    data_dir = args.work_dir / "data"
    run_dir = args.work_dir / "runs" / args.name

    mix = data.TextMix(token_budget=args.text_tokens, chat_fraction=args.chat_fraction, seq_len=args.seq_len,
                       seed=args.seed)
    windows = prepare_text(data_dir, tokenizer, mix)
    print(f"[distill] text windows: {windows.shape} ({json.loads((data_dir / 'text_manifest.json').read_text())})",
          flush=True)
    vocab = prepare_vocab(data_dir, windows, args.vocab, tokenizer,
                          tparams.embed if tparams.lm_head is None else tparams.lm_head.T)
    arch = DRAFT_ARCHS[args.name]
    config = draft_config(tconf, vocab, arch.num_layers, intermediate_size=arch.intermediate_size)
    print(f"[distill] draft {args.name}: {config}\n[distill] compute ratio (matmul incl. LM head): "
          f"{compute_ratio(config, tconf, 0):.4f}; with attention at 1024 tokens: "
          f"{compute_ratio(config, tconf, 1024):.4f}", flush=True)

    text_cache = build_teacher_cache(tparams, tconf, windows, data_dir / "teacher_text", k=args.top_k,
                                     batch_size=args.teacher_batch)
    text = Corpus("text", windows, text_cache)
    print(f"[distill] teacher cache (text): {cache_report(text, vocab)}", flush=True)

    gen = None
    if args.gen_prompts > 0:
        prompts = generation_prompts(args.gen_prompts, args.seed)
        gen_windows = prepare_generations(data_dir, loaded, prompts, args.seq_len, args.gen_max_tokens,
                                          args.gen_batch)
        gen_cache = build_teacher_cache(tparams, tconf, gen_windows, data_dir / "teacher_gen", k=args.top_k,
                                        batch_size=args.teacher_batch)
        gen = Corpus("gen", gen_windows, gen_cache)
        print(f"[distill] generations: {gen_windows.shape}; teacher cache: {cache_report(gen, vocab)}", flush=True)
    if args.prepare_only:
        return

    if args.boost_from is not None:
        boost_draft = load_draft(args.boost_from)
        if not np.array_equal(boost_draft.vocab.draft_to_target, vocab.draft_to_target):
            raise SystemExit(f"{args.boost_from} has another draft vocabulary than {data_dir}")
        run_dir.mkdir(parents=True, exist_ok=True)
        for corpus in (text, gen):
            if corpus is not None:
                corpus.weights = boost_weights(run_dir / f"boost_{corpus.name}.npy", corpus, boost_draft, args.boost)
                print(f"[distill] boost: draft A misses {float(np.mean(corpus.weights > 1)):.3f} of "
                      f"{corpus.name} positions", flush=True)

    steps_per_epoch = text.rows // args.batch_size
    settings = TrainSettings(
        text_steps=args.steps if args.steps is not None else 2 * steps_per_epoch,
        gen_steps=0 if gen is None else (args.gen_steps if args.gen_steps is not None
                                         else 2 * (gen.rows // args.batch_size)),
        batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=args.warmup, save_every=args.save_every,
        seed=args.seed, compute_dtype=args.compute_dtype)
    init = initial_params(arch, config, vocab, tparams, tconf, args.seed)
    if args.export_only:
        params = train(run_dir, config, vocab, init, settings, text, gen, resume=True, stop_at=0)
    else:
        print(f"[distill] training: {settings}", flush=True)
        params = train(run_dir, config, vocab, init, settings, text, gen, resume=args.resume)
    log = data.read_log(run_dir)
    last = log[max(log)] if log else {}
    meta = {"target": TARGET, "name": args.name, "arch": dataclasses.asdict(arch), "settings": dataclasses.asdict(settings),
            "steps_done": (max(log) + 1) if log else 0, "last_log": last,
            "compute_ratio_matmul": compute_ratio(config, tconf, 0),
            "compute_ratio_ctx1024": compute_ratio(config, tconf, 1024),
            "flops_per_token": flops_per_token(config, 0),
            "text_manifest": json.loads((data_dir / "text_manifest.json").read_text()),
            "generations": None if gen is None else {"windows": gen.rows, "prompts": args.gen_prompts},
            "boost_from": None if args.boost_from is None else str(args.boost_from),
            "command": "python -m training.distill_draft " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))}
    meta["save_dtype"] = args.save_dtype
    save_draft(args.out, config, cast_params(params, jnp.dtype(args.save_dtype)), vocab, meta, overwrite=True)
    print(f"[distill] saved draft {args.name} to {args.out} ({meta['steps_done']} steps; last: {last})", flush=True)


if __name__ == "__main__":
    main()
