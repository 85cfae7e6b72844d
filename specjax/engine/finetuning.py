"""Token-level LoRA finetuning inside engine steps: a sequence fed in chunks, any step taking a
chunk, with the exact gradient of the whole sequence's loss.

FlexLLM feeds a finetuning sequence forward in token chunks over iterations and then runs its
backward layer-sliced, keeping every layer's activations of the whole sequence until then. Here
the backward is token-chunked, with recomputation:

- **Forward phase**, chunk by chunk in order: the chunk's K/V are computed with the adapter as it
  stands for the whole accumulation window, and written to the sequence's own KV pages. Nothing
  else is kept.
- **Backward phase**, chunk by chunk in reverse: the chunk's forward is recomputed from its
  prefix's stored K/V and pulled back (``jax.vjp``) from two cotangents: its own loss, and what
  its K/V received from the later chunks. That gives the chunk's share of the adapter's gradient,
  and the cotangent of the prefix's K/V, which is added to the sequence's accumulator.

Each chunk reads its prefix only through the prefix's K/V, so by the chain rule over the chunks'
graph the shares sum to the gradient of the whole sequence's loss (tested against ``jax.grad``
of it). Why this decomposition rather than FlexLLM's:

- Memory: between steps a sequence holds its K/V and their cotangents (twice its KV cache), not
  every layer's activations (FlexLLM's own measurements put activations at most of its memory).
- Scheduling: a chunk's backward is a fixed amount of work, a forward and a backward over C
  tokens, which any step can take; a layer slice's backward grows with the sequence.
- Cost: one extra forward per chunk (rematerialisation). On a step bound by reading weights, as
  decode steps are, the extra chunk forward rides on weights the step reads anyway.

The functions here are pure and jit-friendly (the chunk size and the phase are the only static
choices besides the model's shapes). The co-serving step (``with_finetuning``) runs a chunk's
forward, or its recomputed forward and pull-back, in one joint forward with the step's inference
rows (``model.forward_groups``): each weight is read once for both, so a slice of a few tokens
adds little to a decode step, where it would cost a step's worth of weight reads on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from specjax.attention import AttentionMetadata, causal_mask
from specjax.config import ModelConfig
from specjax.engine.state import ModelState
from specjax.kv_cache import KVCache, init_kv_cache, slot_ids, write_kv
from specjax.lora import LoraAdapter, adapt
from specjax.model import ForwardOutput, RowGroup, forward_groups, joint_params
from specjax.params import Params
from specjax.pytree import pytree_dataclass, static_field


@pytree_dataclass
class Chunk:
    """C token positions of one sequence, from ``start``; the first ``length`` are real, the rest
    padding. tokens [C] int32; targets [C] int32, the token that follows each; weights [C] float32,
    1 where that next token is learnt (an assistant token), else 0 (and 0 on padding)."""

    tokens: jax.Array
    targets: jax.Array
    weights: jax.Array
    start: jax.Array
    length: jax.Array


def make_chunk(tokens: np.ndarray, learn: np.ndarray, start: int, size: int, end: int | None = None) -> Chunk:
    """The chunk of a sequence (tokens [S], learn [S]: which tokens are learnt) of ``size``
    positions from ``start``, real up to ``end`` (default: as far as the size and the sequence
    go), padded past it."""
    tokens, learn = np.asarray(tokens, np.int32), np.asarray(learn, bool)
    if not 0 <= start < len(tokens):
        raise ValueError(f"chunk start {start} is outside the sequence of {len(tokens)} tokens")
    end = min(start + size, len(tokens)) if end is None else end
    if not start < end <= min(start + size, len(tokens)):
        raise ValueError(f"chunk [{start}, {end}) does not fit {size} positions of a sequence of {len(tokens)} tokens")
    n = end - start
    chunk_tokens = np.zeros(size, np.int32)
    chunk_tokens[:n] = tokens[start:end]
    targets = np.zeros(size, np.int32)
    weights = np.zeros(size, np.float32)
    following = tokens[start + 1: end + 1]  # the last token of the sequence has none
    targets[: len(following)] = following
    weights[: len(following)] = learn[start + 1: end + 1]
    return Chunk(tokens=jnp.asarray(chunk_tokens), targets=jnp.asarray(targets), weights=jnp.asarray(weights),
                 start=jnp.int32(start), length=jnp.int32(n))


def _positions(chunk: Chunk) -> jax.Array:
    """[1, C] sequence positions of the chunk's tokens."""
    return (chunk.start + jnp.arange(chunk.tokens.shape[0], dtype=jnp.int32))[None]


def _block_table(kv: KVCache, pages: jax.Array | None) -> jax.Array:
    """[1, P]: the sequence's pages in ``kv`` (None: it owns every page of ``kv``, in order)."""
    return (jnp.arange(kv.num_pages, dtype=jnp.int32) if pages is None else pages)[None]


# A chunk's forward run jointly with other rows: (the chunk's params, its row group) -> (the
# chunk's output, what the other rows' forward gave). See ``with_finetuning``.
Joint = Callable[[Params, RowGroup], tuple[ForwardOutput, object]]


def _chunk_forward(adapter: LoraAdapter, base: Params, config: ModelConfig, kv: KVCache, chunk: Chunk,
                   pages: jax.Array | None = None, joint: Joint | None = None):
    """((summed loss of the chunk's learnt next tokens, (the chunk's new K and V [L, 1, C, Hkv, hd])),
    the other rows' output of ``joint``, or None without it) over the sequence's ``pages`` [P] of
    ``kv`` (None: all of them, in order), whose first ``chunk.start`` positions hold the prefix."""
    meta = AttentionMetadata(block_tables=_block_table(kv, pages), context_lens=chunk.start[None],
                             new_mask=causal_mask(1, chunk.tokens.shape[0]))
    group = RowGroup(chunk.tokens[None], _positions(chunk), kv, meta, attention_backend="reference")
    params = adapt(base, adapter, config)
    out, others = (forward_groups(params, config, [group])[0], None) if joint is None else joint(params, group)
    logp = jax.nn.log_softmax(out.logits[0].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, chunk.targets[:, None], axis=-1)[:, 0]
    return (jnp.sum(nll * chunk.weights), (out.new_k, out.new_v)), others


def _chunk_slots(kv: KVCache, chunk: Chunk, pages: jax.Array | None = None) -> jax.Array:
    """[1, C] flat slots of the chunk's real tokens in ``kv`` (``INVALID_SLOT`` on padding)."""
    valid = (jnp.arange(chunk.tokens.shape[0]) < chunk.length)[None]
    return slot_ids(_block_table(kv, pages), _positions(chunk), valid, kv.page_size)


def forward_chunk(adapter: LoraAdapter, base: Params, config: ModelConfig, kv: KVCache, chunk: Chunk,
                  pages: jax.Array | None = None) -> tuple[KVCache, jax.Array]:
    """The forward phase's step for one chunk: ``kv`` with the chunk's K/V written into the
    sequence's ``pages`` (None: every page of ``kv``, in order), and the chunk's summed loss (what
    the loss curve reports; the gradient comes from the backward phase)."""
    (loss, (new_k, new_v)), _ = _chunk_forward(adapter, base, config, kv, chunk, pages)
    return write_kv(kv, new_k, new_v, _chunk_slots(kv, chunk, pages)), loss


def backward_chunk(adapter: LoraAdapter, base: Params, config: ModelConfig, kv: KVCache, kv_grad: KVCache,
                   chunk: Chunk) -> tuple[LoraAdapter, KVCache]:
    """The backward phase's step for one chunk (after every later chunk's): the chunk's share of
    the gradient of the sequence's summed loss with respect to the adapter, and ``kv_grad`` (the
    cotangent of the sequence's K/V) with the prefix's share added. ``kv`` is as the forward phase
    left it (every chunk's K/V written)."""
    grads, kv_grad, _ = _backward_chunk(adapter, base, config, kv, kv_grad, chunk)
    return grads, kv_grad


def _backward_chunk(adapter: LoraAdapter, base: Params, config: ModelConfig, kv: KVCache, kv_grad: KVCache,
                    chunk: Chunk, joint: Joint | None = None) -> tuple[LoraAdapter, KVCache, object]:
    """``backward_chunk``, with the chunk's forward run by ``joint`` (whose other rows' output
    comes third; they are constant to the pull-back)."""
    slots = _chunk_slots(kv, chunk)

    def own(pool):  # the cotangent the chunk's K/V received from later chunks: [L, 1, C, Hkv, hd]
        n_layers, n_pages, page, hkv, hd = pool.shape
        flat = pool.reshape(n_layers, n_pages * page, hkv, hd)
        return jnp.take(flat, slots[0], axis=1, mode="fill", fill_value=0)[:, None]

    # Differentiated through the prefix only: the chunk's own slots are masked out of its attention
    # (context_lens = start), so the pull-back puts nothing there.
    _, pull_back, others = jax.vjp(lambda a, k, v: _chunk_forward(a, base, config, KVCache(k, v), chunk, joint=joint),
                                   adapter, kv.k, kv.v, has_aux=True)
    grads, dk, dv = pull_back((jnp.ones((), jnp.float32), (own(kv_grad.k), own(kv_grad.v))))
    return grads, KVCache(k=kv_grad.k + dk, v=kv_grad.v + dv), others


# ---------------------------------------------------------------------------- one job's optimizer state
@pytree_dataclass
class JobState:
    """A finetuning job's device state between steps: the adapter being trained, its optimizer
    state, and the current accumulation window's summed gradient, summed loss and learnt-token count."""

    adapter: LoraAdapter
    opt_state: object
    grads: LoraAdapter
    loss_sum: jax.Array
    tokens: jax.Array


def _empty_window(adapter: LoraAdapter, opt_state) -> JobState:
    return JobState(adapter=adapter, opt_state=opt_state, grads=jax.tree.map(jnp.zeros_like, adapter),
                    loss_sum=jnp.zeros((), jnp.float32), tokens=jnp.zeros((), jnp.float32))


def init_job(adapter: LoraAdapter, optimizer=None) -> JobState:
    """A job's state before its first step (no optimizer: its state left out, as fused steps take it)."""
    return _empty_window(adapter, None if optimizer is None else optimizer.init(adapter))


def accumulate(job: JobState, grads: LoraAdapter | None = None, loss: jax.Array | None = None,
               tokens: jax.Array | None = None) -> JobState:
    """``job`` with a chunk's gradient share, loss and learnt-token count added (each optional:
    the forward phase reports loss and tokens, the backward phase gradients)."""
    return job.replace(grads=job.grads if grads is None else jax.tree.map(jnp.add, job.grads, grads),
                       loss_sum=job.loss_sum if loss is None else job.loss_sum + loss,
                       tokens=job.tokens if tokens is None else job.tokens + tokens)


def apply_update(job: JobState, optimizer) -> tuple[JobState, jax.Array]:
    """At an accumulation boundary: the optimizer's step on the window's gradient of the mean loss
    per learnt token (as ``specjax finetune`` takes it), accumulators reset; and the window's mean loss."""
    total = jnp.maximum(job.tokens, 1.0)
    grads = jax.tree.map(lambda g: g / total, job.grads)
    updates, opt_state = optimizer.update(grads, job.opt_state, job.adapter)
    return _empty_window(optax.apply_updates(job.adapter, updates), opt_state), job.loss_sum / total


# ---------------------------------------------------------------------------- inside engine steps
@pytree_dataclass
class SequenceState:
    """What a job holds of the sequence it is feeding through, kept apart from its window until
    the sequence's backward phase ends (so a sequence dropped half-way leaves the window exact):
    its gradient share so far, the cotangent of its K/V (``kv_grad``, its pages in order:
    [L, P, page, Hkv, hd] each), and its summed loss and learnt tokens (forward phase)."""

    grads: LoraAdapter
    kv_grad: KVCache
    loss_sum: jax.Array
    tokens: jax.Array


def init_sequence(adapter: LoraAdapter, config: ModelConfig, pages: int, page_size: int, dtype) -> SequenceState:
    return SequenceState(grads=jax.tree.map(jnp.zeros_like, adapter),
                         kv_grad=init_kv_cache(config, pages, page_size, dtype),
                         loss_sum=jnp.zeros((), jnp.float32), tokens=jnp.zeros((), jnp.float32))


@pytree_dataclass
class FinetuneWork:
    """One step's finetuning slice: a chunk of a job's sequence, the sequence's pages in the
    engine's KV pool (pages [P] int32, its block table), and whether the chunk is the backward
    phase's (else the forward's; static: each phase compiles apart, as a branch on it would cost
    every slice a conditional over the whole step). A backward chunk from position 0 ends the
    sequence."""

    chunk: Chunk
    pages: jax.Array
    backward: bool = static_field()


@dataclass
class FinetuneSlice:
    """A finetuning slice as the runner takes it: the job whose state it runs over
    (``DeviceStateCell.jobs``), its ``FinetuneWork`` (host arrays), and the part of the
    executable's key it adds: (chunk size, pages, the job's state's structure and shapes, whether
    the chunk is the backward phase's)."""

    job: str
    work: FinetuneWork
    bucket: tuple
    ran: bool = False  # set by the runner once a step has run it


def _run_slice(base: Params, config: ModelConfig, cache: KVCache, job: JobState, sequence: SequenceState,
               work: FinetuneWork, joint: Joint | None = None):
    """``run_finetune`` but for the write of a forward chunk's K/V, which it returns instead
    (((new K, new V), slots), or None for a backward chunk), with the job, the sequence and the
    other rows' output of ``joint`` (None without it)."""
    chunk = work.chunk
    if not work.backward:
        (loss, new_kv), others = _chunk_forward(job.adapter, base, config, cache, chunk, work.pages, joint)
        sequence = sequence.replace(loss_sum=sequence.loss_sum + loss, tokens=sequence.tokens + jnp.sum(chunk.weights))
        return (new_kv, _chunk_slots(cache, chunk, work.pages)), job, sequence, others
    own = KVCache(k=jnp.take(cache.k, work.pages, axis=1), v=jnp.take(cache.v, work.pages, axis=1))
    grads, kv_grad, others = _backward_chunk(job.adapter, base, config, own, sequence.kv_grad, chunk, joint)
    grads = jax.tree.map(jnp.add, sequence.grads, grads)
    done = chunk.start == 0  # the sequence ends: its sums go to the window, and start from zero for the next

    def restart(new, old):
        return jax.tree.map(lambda n, o: jnp.where(done, n, o), new, old)

    merged = accumulate(job, grads=grads, loss=sequence.loss_sum, tokens=sequence.tokens)
    job = restart(merged, job)
    sequence = restart(jax.tree.map(jnp.zeros_like, sequence), sequence.replace(grads=grads, kv_grad=kv_grad))
    return None, job, sequence, others


def _write_chunk(cache: KVCache, writes) -> KVCache:
    return cache if writes is None else write_kv(cache, *writes[0], writes[1])


def run_finetune(base: Params, config: ModelConfig, cache: KVCache, job: JobState, sequence: SequenceState,
                 work: FinetuneWork) -> tuple[KVCache, JobState, SequenceState]:
    """One step's finetuning slice over the engine's KV pool ``cache``: a forward chunk writes
    its K/V into the sequence's pages and adds its loss; a backward chunk adds its gradient share
    and the prefix's K/V cotangent; the last one moves the sequence's sums into ``job``'s window."""
    writes, job, sequence, _ = _run_slice(base, config, cache, job, sequence, work)
    return _write_chunk(cache, writes), job, sequence


@pytree_dataclass
class CoservingState:
    """A fused step's state: the target's ``ModelState`` and one job's finetuning state (its
    ``JobState`` without the optimizer's, which only ``apply_update`` uses, and its sequence's).
    What the step rewrites (the KV cache, the job's sums and sequence) is donated."""

    model: ModelState
    job: JobState | None
    sequence: SequenceState | None

    def caches(self):
        return self.model.cache, self.job, self.sequence

    def without_caches(self) -> "CoservingState":
        return self.replace(model=self.model.without_caches(), job=None, sequence=None)

    def with_caches(self, caches) -> "CoservingState":
        cache, job, sequence = caches
        return self.replace(model=self.model.with_caches(cache), job=job, sequence=sequence)


def with_finetuning(step):
    """``step`` (``(ModelState, batch) -> (ModelState, outputs)``, an inference step of
    ``engine.step`` that runs its forward through its ``run_forward`` argument) fused with one
    finetuning slice over the same base weights: ``(CoservingState, (batch, FinetuneWork)) ->
    (CoservingState, outputs)``.

    The step's forward and the chunk's run as one (``model.forward_groups``): every weight is read
    once for the inference rows and the chunk's tokens together, which is what makes a slice
    cheap on a step bound by reading weights. A backward chunk's pull-back goes through that joint
    forward with the inference rows held constant. The inference rows see nothing of the slice:
    its K/V go to the job's own pages, its adapter to none of the rows."""

    def fused(state: CoservingState, batch, *, config: ModelConfig, attention_backend: str | None):
        inference, work = batch
        slices = []

        def run_forward(params, config, tokens, positions, cache, meta, logit_indices=None, *, attention_backend=None):
            rows = RowGroup(tokens, positions, cache, meta, logit_indices, attention_backend, constant=True)

            def joint(chunk_params: Params, chunk: RowGroup):
                out_rows, out_chunk = forward_groups(joint_params([params, chunk_params]), config, [rows, chunk])
                return out_chunk, out_rows

            writes, job, sequence, out = _run_slice(state.model.params, config, cache, state.job, state.sequence,
                                                    work, joint)
            slices.append((writes, job, sequence))
            return out

        model, outputs = step(state.model, inference, config=config, attention_backend=attention_backend,
                              run_forward=run_forward)
        (writes, job, sequence), = slices  # the step ran its forward once
        return CoservingState(model=model.with_caches(_write_chunk(model.cache, writes)), job=job,
                              sequence=sequence), outputs

    return fused


def finetune_step(state: CoservingState, work: FinetuneWork, *, config: ModelConfig, attention_backend: str | None):
    """A step of finetuning alone (no inference row to fuse with): ``(CoservingState, work) -> (state, ())``."""
    del attention_backend  # finetuning attends with the differentiable reference
    cache, job, sequence = run_finetune(state.model.params, config, state.model.cache, state.job, state.sequence, work)
    return CoservingState(model=state.model.with_caches(cache), job=job, sequence=sequence), ()
