"""Pure step functions over the device state, the per-row batch metadata they take, and how they
are compiled.

Every step is ``(state, batch) -> (state, outputs)`` (``engine.state``): ``token_step`` appends T
tokens to each row (a prompt chunk, or one decoded token) and samples the next; ``verify_step``
scores a token tree per row and keeps the accepted path; the tree proposer's fused
draft-and-verify step (``speculation.speculator.tree_step``) takes the whole ``DeviceState``.
``donating_jit`` compiles any of them donating the state's KV caches, and nothing else.

Each batch carries one ``RowMeta``, the per-row metadata every kind of step reads (prefix pages,
committed lengths, sampling settings and key data), built on the host by ``row_meta`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specjax import sampling
from specjax.attention import AttentionMetadata
from specjax.config import ModelConfig
from specjax.engine.state import ModelState
from specjax.kv_cache import INVALID_SLOT, write_kv
from specjax.lora import with_row_adapters
from specjax.model import forward
from specjax.params import Params
from specjax.pytree import pytree_dataclass
from specjax.speculation.verify import VerifyTree, verify_and_commit


TOP_K_LIMIT = np.iinfo(np.int32).max
TEMPERATURE_LIMIT = float(np.finfo(np.float32).max)


@dataclass
class StepInput:
    """One sequence's share of a step: ``tokens`` appended after its committed prefix."""

    seq_id: object
    tokens: Sequence[int]
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    base_key: np.ndarray | None = None  # [2] uint32 raw key data of the request; None for greedy rows
    sample_index: int = 0  # which of the request's tokens this samples: the key is fold_in(base_key, index)
    # Sampled tokens must be plain sampling's own draws even where a draft model proposes (verified
    # by sampling and matching, not multi-step speculative sampling): set for seeded hybrid rows.
    plain_draws: bool = False
    lora_slot: int = 0  # the device slot of the request's LoRA adapter; 0: none


@pytree_dataclass
class RowMeta:
    """What a step knows of each of its B rows. Rows past the batch's sequences are empty: no
    prefix, greedy.

    block_tables [B, P] int32: the pages of each row's committed prefix; context_lens [B] int32:
    its committed tokens. Sampling: temperature, top_k, top_p [B]; base_keys [B, 2] uint32 raw key
    data of each row's request, sample_index [B] which of its tokens this step samples. lora_slot
    [B] int32: the row's adapter slot (0: the base model).
    """

    block_tables: jax.Array
    context_lens: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    base_keys: jax.Array
    sample_index: jax.Array
    lora_slot: jax.Array

    def keys(self, ahead: jax.Array | None = None) -> jax.Array:
        """[B] typed keys of this step's draw per row: fold_in(request key, token index); with
        ``ahead`` [B, N], [B, N] keys of the tokens that many positions further."""
        index = self.sample_index if ahead is None else self.sample_index[:, None] + ahead
        return sampling.row_keys(jax.random.wrap_key_data(self.base_keys), index)


def row_meta(b: int, p: int, block_table: np.ndarray | None = None, lengths: Sequence[int] = (),
             inputs: Sequence[StepInput] = ()) -> RowMeta:
    """Host arrays of a step's ``RowMeta`` for a [b]-row bucket reading [p] prefix pages: the
    first rows hold ``block_table`` [rows, p] and committed ``lengths``, and ``inputs``' sampling
    settings (none: greedy); the rest are empty."""
    rows = RowMeta(block_tables=np.zeros((b, p), np.int32), context_lens=np.zeros((b,), np.int32),
                   temperature=np.zeros((b,), np.float32), top_k=np.zeros((b,), np.int32),
                   top_p=np.ones((b,), np.float32), base_keys=np.zeros((b, 2), np.uint32),
                   sample_index=np.zeros((b,), np.int32), lora_slot=np.zeros((b,), np.int32))
    if block_table is not None:
        rows.block_tables[: len(block_table)] = block_table
    rows.context_lens[: len(lengths)] = lengths
    for row, x in enumerate(inputs):
        # Any top_k past the vocabulary keeps every token: clipped, it still fits the device's int32.
        # A temperature past float32's range samples uniformly, as it would as inf: clipped, it casts without overflow.
        rows.temperature[row] = min(x.temperature, TEMPERATURE_LIMIT)
        rows.top_k[row], rows.top_p[row] = min(x.top_k, TOP_K_LIMIT), x.top_p
        if x.base_key is not None:
            rows.base_keys[row] = x.base_key
        rows.sample_index[row] = x.sample_index
        rows.lora_slot[row] = x.lora_slot
    return rows


@pytree_dataclass
class TokenBatch:
    """T new tokens per row: tokens, positions, slots [B, T] (``INVALID_SLOT`` past a row's
    tokens: nothing written); last [B, 1] the index of each row's last real token, whose logits
    are sampled; logprobs [] bool: also score the sampled tokens."""

    rows: RowMeta
    tokens: jax.Array
    positions: jax.Array
    slots: jax.Array
    last: jax.Array
    logprobs: jax.Array

    @classmethod
    def empty(cls, rows: RowMeta, t: int) -> "TokenBatch":
        b = rows.context_lens.shape[0]
        return cls(rows=rows, tokens=np.zeros((b, t), np.int32), positions=np.zeros((b, t), np.int32),
                   slots=np.full((b, t), INVALID_SLOT, np.int32), last=np.zeros((b, 1), np.int32),
                   logprobs=np.zeros((), bool))


@pytree_dataclass
class TreeBatch:
    """An N-node token tree per row (node 0 the root): tokens, positions, parents, depths, live
    [B, N]; mask [B, N, N] (a node sees its ancestors and itself); position_slots [B, N] the slot
    of each depth's position (``INVALID_SLOT`` past the deepest); logprobs [] bool."""

    rows: RowMeta
    tokens: jax.Array
    positions: jax.Array
    mask: jax.Array
    parents: jax.Array
    depths: jax.Array
    live: jax.Array
    position_slots: jax.Array
    logprobs: jax.Array

    @classmethod
    def empty(cls, rows: RowMeta, n: int) -> "TreeBatch":
        """Every row a root-only tree (padding rows stay that way)."""
        b = rows.context_lens.shape[0]
        return cls(rows=rows, tokens=np.zeros((b, n), np.int32), positions=np.zeros((b, n), np.int32),
                   mask=np.broadcast_to(np.eye(n, dtype=bool), (b, n, n)).copy(),
                   parents=np.full((b, n), -1, np.int32), depths=np.zeros((b, n), np.int32),
                   live=np.zeros((b, n), bool), position_slots=np.full((b, n), INVALID_SLOT, np.int32),
                   logprobs=np.zeros((), bool))


def row_params(model: ModelState, rows: RowMeta, config: ModelConfig) -> Params:
    """The weights a step's rows run with: ``model.params``, each row with its LoRA adapter added
    when the model has adapter slots."""
    if model.adapters is None:
        return model.params
    return with_row_adapters(model.params, model.adapters, rows.lora_slot, config)


def token_step(state: ModelState, batch: TokenBatch, *, config: ModelConfig, attention_backend: str | None,
               run_forward: Callable = forward) -> tuple[ModelState, tuple]:
    """Append each row's tokens to its cache and sample its next token. Outputs: next tokens [B],
    then ``sampling.token_logprobs``' three arrays (zeros unless ``batch.logprobs``).
    ``run_forward``: ``model.forward``, or what runs other rows along with it
    (``engine.finetuning.with_finetuning``)."""
    b, t = batch.tokens.shape
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    meta = AttentionMetadata(block_tables=batch.rows.block_tables, context_lens=batch.rows.context_lens,
                             new_mask=causal)
    out = run_forward(row_params(state, batch.rows, config), config, batch.tokens, batch.positions, state.cache, meta,
                      logit_indices=batch.last, attention_backend=attention_backend)
    cache = write_kv(state.cache, out.new_k, out.new_v, batch.slots)
    rows = batch.rows
    next_tokens = sampling.sample(out.logits[:, 0], rows.keys(), rows.temperature, rows.top_k, rows.top_p)
    scores = jax.lax.cond(batch.logprobs, lambda: sampling.token_logprobs(out.logits[:, 0], next_tokens),
                          lambda: sampling.no_logprobs((b,)))
    return state.with_caches(cache), (next_tokens, *scores)


def verify_step(state: ModelState, batch: TreeBatch, *, config: ModelConfig, attention_backend: str | None,
                run_forward: Callable = forward) -> tuple[ModelState, tuple]:
    """Score each row's tree in one pass and commit the accepted path (``verify_and_commit``).
    Outputs: tokens [B, N] (accepted, then the bonus token), count [B] of them, and their
    logprob arrays (zeros unless ``batch.logprobs``). ``run_forward``: as ``token_step``'s."""
    rows = batch.rows
    meta = AttentionMetadata(block_tables=rows.block_tables, context_lens=rows.context_lens, new_mask=batch.mask)
    out = run_forward(row_params(state, rows, config), config, batch.tokens, batch.positions, state.cache, meta,
                      attention_backend=attention_backend)
    tree = VerifyTree.host(batch.tokens, batch.parents, batch.depths, batch.mask, batch.live)
    result, cache = verify_and_commit(out.logits, out.new_k, out.new_v, state.cache, tree, batch.position_slots,
                                      jnp.ones(batch.tokens.shape[:1], bool), rows.temperature, rows.top_k, rows.top_p,
                                      rows.keys(), all_greedy=False, logprobs=batch.logprobs,
                                      width=batch.tokens.shape[1], node_keys=rows.keys(batch.depths))
    return state.with_caches(cache), (result.tokens, result.count, *result.logprobs)


def donating_jit(step: Callable, *, static_argnames: Sequence[str] = (), **fixed) -> Callable:
    """``step(state, batch, **fixed, **static) -> (state, outputs)`` jitted as
    ``(state.without_caches(), state.caches(), batch, **static) -> (caches, outputs)``, the caches
    donated: a step writes them in place, and the weights it leaves alone are neither donated nor
    copied (``engine.state``)."""

    def split(kept, caches, batch, **static):
        state, outputs = step(kept.with_caches(caches), batch, **fixed, **static)
        return state.caches(), outputs

    return jax.jit(split, donate_argnums=(1,), static_argnames=tuple(static_argnames))


def step_args(state, batch) -> tuple:
    """The positional arguments of a ``donating_jit`` step over ``state`` (a ``ModelState`` or a
    ``DeviceState``): what it keeps, the caches it donates, and the batch."""
    return state.without_caches(), state.caches(), batch
