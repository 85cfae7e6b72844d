"""Draft models for speculative decoding: small Llama decoders over a reduced vocabulary.

A draft shares the target's tokenizer but predicts only N of its V tokens (the N most frequent in
the training data plus every special token): with V = 49,152 the LM head alone would cost the draft
more than its whole compute budget. The draft is an ordinary :class:`~specjax.config.ModelConfig`
decoder whose ``vocab_size`` is N; :class:`DraftVocab` translates at both ends so the speculation
code only ever sees target ids:

* inputs: ``target_to_draft [V]`` maps each target id to the draft id it is fed as; ids outside the
  draft vocabulary are fed as the in-vocabulary token whose target embedding is most similar;
* outputs: ``draft_to_target [N]`` maps draft ids back; :meth:`DraftVocab.target_logits` spreads
  draft logits [..., N] over the target vocabulary [..., V] with -inf elsewhere.

A draft checkpoint is a directory holding an orbax checkpoint (``save_checkpoint``, no tokenizer:
the target's is used) plus ``draft_vocab.npy`` (draft_to_target), ``draft_input_map.npy``
(target_to_draft) and ``draft.json`` (the target's name and training notes).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from specjax.checkpoints import LoadedModel
from specjax.checkpoints.registry import resolve_draft
from specjax.config import ModelConfig
from specjax.params import CheckpointError, Params, inference_params

DRAFT_VOCAB_FILE = "draft_vocab.npy"
DRAFT_INPUT_MAP_FILE = "draft_input_map.npy"
DRAFT_META_FILE = "draft.json"


# ---------------------------------------------------------------------------- vocabulary
@dataclass(frozen=True)
class DraftVocab:
    """The map between a draft's N ids and the target's V ids.

    draft_to_target: [N] int32, strictly increasing target ids (draft id i predicts target id
        ``draft_to_target[i]``).
    target_to_draft: [V] int32, the draft id each target id is fed to the draft as (itself when in
        the vocabulary, else a stand-in).
    """

    draft_to_target: np.ndarray
    target_to_draft: np.ndarray

    def __post_init__(self):
        d2t, t2d = np.asarray(self.draft_to_target), np.asarray(self.target_to_draft)
        if d2t.ndim != 1 or t2d.ndim != 1 or d2t.dtype != np.int32 or t2d.dtype != np.int32:
            raise ValueError("draft_to_target and target_to_draft must be 1-D int32 arrays")
        if d2t.size == 0 or np.any(np.diff(d2t) <= 0) or d2t[0] < 0 or d2t[-1] >= t2d.size:
            raise ValueError(f"draft_to_target must be strictly increasing ids in [0, {t2d.size})")
        if np.any(t2d < 0) or np.any(t2d >= d2t.size):
            raise ValueError(f"target_to_draft must hold draft ids in [0, {d2t.size})")
        if np.any(t2d[d2t] != np.arange(d2t.size)):
            raise ValueError("target_to_draft must map each in-vocabulary target id to its own draft id")

    @property
    def size(self) -> int:
        """N, the draft's vocabulary size."""
        return int(self.draft_to_target.size)

    @property
    def target_size(self) -> int:
        """V, the target's vocabulary size."""
        return int(self.target_to_draft.size)

    def in_vocab(self, target_ids):
        """Whether each target id is one the draft can predict (same shape as ``target_ids``)."""
        xp = jnp if isinstance(target_ids, jax.Array) else np
        d2t, t2d = xp.asarray(self.draft_to_target), xp.asarray(self.target_to_draft)
        return d2t[t2d[target_ids]] == target_ids

    def draft_inputs(self, target_ids):
        """Target token ids [...] -> the draft ids to feed the draft [...]."""
        xp = jnp if isinstance(target_ids, jax.Array) else np
        return xp.asarray(self.target_to_draft)[target_ids]

    def target_ids(self, draft_ids):
        """Draft ids [...] (e.g. a draft argmax or sample) -> target ids [...]."""
        xp = jnp if isinstance(draft_ids, jax.Array) else np
        return xp.asarray(self.draft_to_target)[draft_ids]

    def target_logits(self, draft_logits: jax.Array) -> jax.Array:
        """Draft logits [..., N] -> target-vocabulary logits [..., V], -inf outside the draft vocabulary.

        Softmax of the result equals the draft's distribution placed on target ids, so samplers and
        verifiers (including multi-step speculative sampling) work on target ids unchanged.
        """
        return spread_logits(jnp.asarray(draft_logits), jnp.asarray(self.draft_to_target), self.target_size)


def spread_logits(draft_logits: jax.Array, draft_to_target: jax.Array, target_size: int) -> jax.Array:
    """Draft logits [..., N] placed on the target's ids [..., V] (``draft_to_target`` [N]), -inf where
    the draft has no token; works inside jit (the device-side ``DraftModel`` uses it too)."""
    out = jnp.full(draft_logits.shape[:-1] + (target_size,), -jnp.inf, draft_logits.dtype)
    return out.at[..., draft_to_target].set(draft_logits)


def build_draft_vocab(token_counts: np.ndarray, size: int, special_ids: Sequence[int],
                      target_embed: np.ndarray | None = None) -> DraftVocab:
    """The ``size`` most frequent target ids (ties: lower id first), always including ``special_ids``.

    token_counts: [V] occurrences of each target id in the training data. target_embed: [V, D] the
    target's input embedding; when given, each out-of-vocabulary target id is fed to the draft as the
    in-vocabulary id with the most similar embedding (cosine), else as the most frequent token.
    """
    counts = np.asarray(token_counts, np.int64)
    vocab_size = counts.size
    special = sorted({int(i) for i in special_ids})
    if len(special) > size:
        raise ValueError(f"{len(special)} special tokens do not fit a draft vocabulary of {size}")
    if size > vocab_size:
        raise ValueError(f"draft vocabulary {size} is larger than the target's ({vocab_size})")
    chosen = set(special)
    for i in np.lexsort((np.arange(vocab_size), -counts)):  # by count descending, then id
        if len(chosen) == size:
            break
        chosen.add(int(i))
    d2t = np.array(sorted(chosen), np.int32)
    t2d = np.full(vocab_size, -1, np.int32)
    t2d[d2t] = np.arange(size, dtype=np.int32)
    missing = np.flatnonzero(t2d < 0)
    if missing.size:
        if target_embed is None:
            t2d[missing] = t2d[int(np.argmax(np.where(t2d >= 0, counts, -1)))]
        else:
            t2d[missing] = _nearest(np.asarray(target_embed, np.float32), missing, d2t)
    return DraftVocab(draft_to_target=d2t, target_to_draft=t2d)


def _nearest(embed: np.ndarray, queries: np.ndarray, keys: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """For each query row of ``embed``, the index into ``keys`` of the most cosine-similar key row."""
    unit = embed / np.maximum(np.linalg.norm(embed, axis=1, keepdims=True), 1e-12)
    key_vecs = unit[keys]
    out = np.empty(queries.size, np.int32)
    for start in range(0, queries.size, chunk):
        sims = unit[queries[start:start + chunk]] @ key_vecs.T
        out[start:start + chunk] = np.argmax(sims, axis=1)
    return out


# ---------------------------------------------------------------------------- configs and cost
def draft_config(target: ModelConfig, vocab: DraftVocab, num_layers: int = 3, *, hidden_size: int | None = None,
                 intermediate_size: int | None = None, num_heads: int | None = None,
                 num_kv_heads: int | None = None) -> ModelConfig:
    """A Llama draft for ``target``: its RoPE, norms and (by default) its layer shapes, fewer layers,
    ``vocab.size`` tokens, tied embeddings. bos/eos ids are translated into draft ids."""
    def to_draft(i):
        return int(vocab.target_to_draft[i])

    return ModelConfig(
        vocab_size=vocab.size,
        hidden_size=hidden_size or target.hidden_size,
        intermediate_size=intermediate_size or target.intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads or target.num_heads,
        num_kv_heads=num_kv_heads or target.num_kv_heads,
        head_dim=target.head_dim,
        max_position_embeddings=target.max_position_embeddings,
        rms_norm_eps=target.rms_norm_eps,
        rope_theta=target.rope_theta,
        rope_scaling=target.rope_scaling,
        tie_word_embeddings=True,
        architecture="llama",
        bos_token_id=None if target.bos_token_id is None else to_draft(target.bos_token_id),
        eos_token_ids=tuple(to_draft(i) for i in target.eos_token_ids),
    )


def flops_per_token(config: ModelConfig, context: int) -> dict[str, int]:
    """Forward FLOPs (2 per multiply-add) for one token attending to ``context`` positions.

    matmul: q/k/v/o projections, MLP and LM head (the embedding lookup is a gather: free);
    attention: scores and weighted values, 4 * context * Hq * hd per layer.
    """
    c = config
    per_layer = (c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size
                 + 3 * c.hidden_size * c.intermediate_size)
    matmul = 2 * (c.num_layers * per_layer + c.hidden_size * c.vocab_size)
    attention = 4 * context * c.q_size * c.num_layers
    return {"matmul": matmul, "attention": attention, "total": matmul + attention}


def compute_ratio(draft_config: ModelConfig, target_config: ModelConfig, context: int = 1024) -> float:
    """Draft / target forward FLOPs per token, LM heads included, attention at ``context`` tokens.

    With context=0 this is the matmul-only ratio. For drafts whose layers have the target's width,
    the ratio is largest at context 0 (attention scales with the layer count, a smaller share).
    """
    d, t = flops_per_token(draft_config, context), flops_per_token(target_config, context)
    return d["total"] / t["total"]


# ---------------------------------------------------------------------------- weights
def init_from_target(target_params: Params, target_config: ModelConfig, config: ModelConfig, vocab: DraftVocab,
                     layer_ids: Sequence[int]) -> Params:
    """Draft weights copied from the target: layers ``layer_ids`` and the embedding rows of the draft
    vocabulary (tied head). Needs a draft of the target's width (``draft_config`` defaults)."""
    if (config.hidden_size, config.intermediate_size, config.num_heads, config.num_kv_heads) != (
            target_config.hidden_size, target_config.intermediate_size, target_config.num_heads,
            target_config.num_kv_heads):
        raise ValueError("init_from_target needs a draft with the target's layer shapes")
    if len(layer_ids) != config.num_layers or not all(0 <= i < target_config.num_layers for i in layer_ids):
        raise ValueError(f"need {config.num_layers} layer ids in [0, {target_config.num_layers})")
    index = jnp.asarray(list(layer_ids))
    layers = jax.tree_util.tree_map(lambda w: jnp.asarray(w)[index], target_params.layers)
    head = target_params.embed if target_params.lm_head is None else target_params.lm_head.T
    return Params(embed=jnp.asarray(head)[jnp.asarray(vocab.draft_to_target)], layers=layers,
                  final_norm=target_params.final_norm, lm_head=None)


def cast_params(params: Params, dtype) -> Params:
    """Matrices to ``dtype``; norm scales stay fp32 (as every loader keeps them)."""
    def cast(path, x):
        return x if jax.tree_util.keystr(path).endswith("norm") else x.astype(dtype)
    return jax.tree_util.tree_map_with_path(cast, params)


# ---------------------------------------------------------------------------- checkpoints
class Draft(NamedTuple):
    """A loaded draft: ``config`` (draft-vocabulary ids), ``params``, ``vocab`` (the id maps)."""

    config: ModelConfig
    params: Params
    vocab: DraftVocab


def draft_forward(draft: Draft, tokens: jax.Array, positions: jax.Array, cache, meta, logit_indices=None):
    """:func:`specjax.model.forward` of ``draft`` on *target* token ids [B, T].

    Returns (draft logits [B, K, N] fp32, new_k, new_v); turn the logits into target ids with
    ``draft.vocab.target_ids(argmax)`` or into target-vocabulary logits with ``draft.vocab.target_logits``.
    """
    from specjax.model import forward

    return forward(draft.params, draft.config, draft.vocab.draft_inputs(tokens), positions, cache, meta,
                   logit_indices)


def save_draft(directory: str | os.PathLike, config: ModelConfig, params: Params, vocab: DraftVocab,
               meta: dict[str, Any] | None = None, *, overwrite: bool = False) -> None:
    """Write a draft checkpoint directory (see the module docstring for its files)."""
    from specjax.checkpoints import save_checkpoint

    if config.vocab_size != vocab.size:
        raise ValueError(f"config.vocab_size {config.vocab_size} != draft vocabulary size {vocab.size}")
    directory = Path(directory)
    save_checkpoint(directory, config, params, overwrite=overwrite)
    np.save(directory / DRAFT_VOCAB_FILE, vocab.draft_to_target)
    np.save(directory / DRAFT_INPUT_MAP_FILE, vocab.target_to_draft)
    (directory / DRAFT_META_FILE).write_text(json.dumps(meta or {}, indent=2, sort_keys=True), encoding="utf-8")


def load_draft(path: str | os.PathLike) -> Draft:
    """``(config, params, vocab)`` of a draft directory written by :func:`save_draft`."""
    from specjax.checkpoints import restore_checkpoint

    directory = Path(path)
    for name in (DRAFT_VOCAB_FILE, DRAFT_INPUT_MAP_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory} is not a draft checkpoint (no {name})")
    config, params = restore_checkpoint(directory)
    try:
        vocab = DraftVocab(draft_to_target=np.load(directory / DRAFT_VOCAB_FILE),
                           target_to_draft=np.load(directory / DRAFT_INPUT_MAP_FILE))
    except ValueError as e:
        raise CheckpointError(f"{directory}: bad draft vocabulary files: {e}") from None
    if vocab.size != config.vocab_size:
        raise CheckpointError(f"{directory}: draft vocabulary has {vocab.size} ids, the model {config.vocab_size}")
    return Draft(config, params, vocab)


def draft_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``draft.json`` notes of a draft directory ({} when absent)."""
    file = Path(path) / DRAFT_META_FILE
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


__all__ = ["DRAFT_INPUT_MAP_FILE", "DRAFT_META_FILE", "DRAFT_VOCAB_FILE", "Draft", "DraftVocab",
           "build_draft_vocab", "cast_params", "compute_ratio", "draft_config", "draft_forward", "draft_meta",
           "flops_per_token", "init_from_target", "load_draft", "save_draft", "spread_logits"]


def load_draft_for(draft, target: LoadedModel) -> tuple[ModelConfig, Params, np.ndarray | None, np.ndarray | None]:
    """(config, params, draft_to_target, target_to_draft) of a trained draft (name or directory) or
    of any model sharing the target's tokenizer; the maps are None for the target's own vocabulary."""
    if isinstance(draft, LoadedModel):
        config, params, vocab = draft.config, draft.params, None
        if (draft.tokenizer is not None and target.tokenizer is not None
                and draft.tokenizer.backend.get_vocab() != target.tokenizer.backend.get_vocab()):
            raise ValueError(f"the draft {draft.source} has another tokenizer than the target {target.source}")
    elif isinstance(draft, (str, os.PathLike)):
        config, params, vocab = load_draft(resolve_draft(draft))
    else:
        raise TypeError(f"a draft is a draft name, a draft directory or a LoadedModel, got {type(draft).__name__}")
    target_vocab = target.config.vocab_size
    if vocab is None and config.vocab_size != target_vocab:
        raise ValueError(f"the draft's vocabulary ({config.vocab_size}) differs from the target's "
                         f"({target_vocab}) and it carries no id map")
    if vocab is not None and vocab.target_size != target_vocab:
        raise ValueError(f"the draft's id map is for a vocabulary of {vocab.target_size} tokens; the target has "
                         f"{target_vocab}")
    return (config, inference_params(params), None if vocab is None else vocab.draft_to_target,
            None if vocab is None else vocab.target_to_draft)
