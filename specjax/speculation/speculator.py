"""Draft-model trees in the LLM engine: the "tree" proposer, around ``specinfer.speculative_step``.

``TreeSpeculation`` is what a user asks for (drafts, expansion vector, node budget).
``TreeSpeculator`` is its proposer, and a device drafter: its trees are drafted inside the
compiled step that verifies them. It owns the drafts' runners (their page pools; their weights
and caches are draft slots of the engine's ``DeviceState``), keeps each draft's cache in step with
the sequence, turns a batch of requests into a ``DraftTreeBatch`` from the page tables (rows,
pending tokens and pages bucketed to powers of two) and runs ``tree_step`` over the whole device
state, compiled per bucket, timing compilation apart like the runner does.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specjax.config import ModelConfig
from specjax.draft import load_draft_for
from specjax.engine.state import DeviceState
from specjax.engine.step import RowMeta, StepInput, donating_jit, row_meta, row_params, step_args
from specjax.kv_cache import kv_bytes_per_token
from specjax.params import Params
from specjax.pytree import pytree_dataclass
from specjax.runner import CompiledBuckets, ModelRunner, next_power_of_two
from specjax.sampling import logprob_entries
from specjax.speculation.proposer import BuildContext, DraftBatch, ProposalRow, Proposer, Verified, register
from specjax.speculation.specinfer import SpecInfer, StepBatch, StepResult, speculative_step
from specjax.speculation.tree import TREE_SIZES
from specjax.speculation.tree_draft import DraftModel, TreeShape

log = logging.getLogger("specjax.speculation")

SPECINFER_EXPANSION = (1, 1, 3, 1, 1, 1, 1, 1)  # the expansion vector SpecInfer evaluates


@pytree_dataclass
class DraftTreeBatch:
    """A tree step's B rows (padding rows have ``active`` false).

    rows: the target's rows (``context_lens`` each root's position: the tokens in the target's
    cache; ``block_tables`` covering positions up to ``root + depth``). Per draft (tuples): blocks
    [B, Pd] covering its pending tokens and scratch, lengths [B] its committed tokens, pending
    [B, Tp] the tokens it has not run (root last), pending_len [B]. plain_draws [B] bool: sampled
    rows whose tokens must be plain sampling's own (``StepInput.plain_draws``).
    """

    rows: RowMeta
    active: jax.Array
    draft_blocks: tuple
    draft_lengths: tuple
    pending: tuple
    pending_len: tuple
    plain_draws: jax.Array


def tree_step(state: DeviceState, batch: DraftTreeBatch, *, spec: SpecInfer, all_greedy: bool, logprobs: bool
              ) -> tuple[DeviceState, StepResult]:
    """Draft with every draft of ``state``, verify in one target pass, commit: ``speculative_step``
    over the engine's device state (pure; ``spec``, ``all_greedy`` and ``logprobs`` static)."""
    rows = batch.rows
    drafts = tuple(DraftModel(d.params, *d.vocab_maps) for d in state.drafts)
    depths = jnp.broadcast_to(jnp.arange(spec.depth + 1), (batch.active.shape[0], spec.depth + 1))
    step_batch = StepBatch(active=batch.active, root_pos=rows.context_lens, target_blocks=rows.block_tables,
                           draft_blocks=batch.draft_blocks, draft_lengths=batch.draft_lengths, pending=batch.pending,
                           pending_len=batch.pending_len, temperature=rows.temperature, top_k=rows.top_k,
                           top_p=rows.top_p, keys=rows.keys(), plain_draws=batch.plain_draws,
                           depth_keys=rows.keys(depths))
    target_cache, draft_caches = state.caches()
    result, target_cache, draft_caches = speculative_step(spec, row_params(state.target, rows, spec.target), drafts, target_cache,
                                                          draft_caches, step_batch, all_greedy, logprobs)
    return state.with_caches((target_cache, draft_caches)), result


@dataclass(frozen=True)
class TreeSpeculation:
    """Speculate with token trees from one or more draft models (SpecInfer).

    drafts: draft models (built-in draft names, draft directories, or LoadedModels sharing the
        target's tokenizer); their trees are merged, shared prefixes sharing nodes.
    expansion: children per node at each depth (SpecInfer's <1,1,3,1,1,1,1,1> by default; a chain
        of k tokens is ``(1,) * k``).
    max_nodes: the most nodes (root included) the merged tree may hold, at most 128. An expansion
        needing more is an error; with ``dynamic`` it is the budget the most probable nodes fill.
    dynamic: grow each draft's tree best-first: expand the ``beam`` most probable nodes of each
        depth by ``expansion`` children, then keep the ``(max_nodes - 1) / len(drafts)`` most
        probable nodes by cumulative draft probability.
    """

    method: ClassVar[str] = "tree"

    drafts: tuple
    expansion: tuple[int, ...] = SPECINFER_EXPANSION
    max_nodes: int = 64
    dynamic: bool = False
    beam: int = 4

    def __post_init__(self):
        drafts = (self.drafts,) if isinstance(self.drafts, str) else tuple(self.drafts)
        if not drafts:
            raise ValueError("TreeSpeculation needs at least one draft")
        object.__setattr__(self, "drafts", drafts)
        object.__setattr__(self, "expansion", tuple(self.expansion))
        if not isinstance(self.max_nodes, int) or not 1 <= self.max_nodes <= TREE_SIZES[-1]:
            raise ValueError(f"max_nodes must be an integer in [1, {TREE_SIZES[-1]}], got {self.max_nodes!r}")
        self.tree_shapes()  # every other mistake shows here, before any model is loaded

    def tree_shapes(self) -> tuple[TreeShape, ...]:
        """Each draft's static tree shape."""
        count = len(self.drafts)
        if self.dynamic:
            shape = TreeShape(self.expansion, beam=self.beam)
            per_draft = 1 + (self.max_nodes - 1) // count
            if per_draft < 2 and shape.depth:
                raise ValueError(f"max_nodes {self.max_nodes} leaves no node per draft for {count} drafts")
            return (TreeShape(self.expansion, beam=self.beam, budget=min(per_draft, shape.num_candidates)),) * count
        shape = TreeShape(self.expansion)
        total = 1 + count * (shape.num_nodes - 1)
        if total > self.max_nodes:
            raise ValueError(f"expansion {self.expansion} drafts {shape.num_nodes} nodes per draft, {total} merged "
                             f"for {count} draft(s): more than max_nodes={self.max_nodes}")
        return (shape,) * count


class TreeSpeculator(Proposer):
    """Drafts, verifies and commits token trees for batches of sequences of ``target``.

    drafts: (config, params, draft_to_target or None, target_to_draft or None) per draft; None
    maps are the identity (a draft with the target's vocabulary). Each draft's page pool has the
    target's page size and holds as many tokens as the target's, plus every sequence's scratch.
    The drafts join the target's device state; an engine holds one tree proposer's drafts.
    """

    name = "tree"

    def __init__(self, target: ModelRunner, drafts: Sequence[tuple[ModelConfig, Params, np.ndarray | None,
                                                                    np.ndarray | None]],
                 shapes: Sequence[TreeShape]):
        if target.cell.state.drafts:
            raise ValueError("this engine's device state already holds draft models: one tree proposer per engine")
        self.target = target
        self.spec = SpecInfer(target.config, tuple(d[0] for d in drafts), tuple(shapes),
                              attention_backend=target.engine.attention_backend)
        engine = target.engine
        identity = np.arange(target.config.vocab_size, dtype=np.int32)
        self._input_maps = [identity if t2d is None else np.asarray(t2d, np.int32) for *_, t2d in drafts]
        self.runners = []
        for (config, params, d2t, _), input_map, shape in zip(drafts, self._input_maps, shapes):
            pages = target.pages.num_pages + engine.max_num_seqs * target.pages.pages_for(shape.num_fed)
            pool = pages * engine.page_size * kv_bytes_per_token(config, params.embed.dtype)
            maps = (jnp.asarray(identity if d2t is None else d2t, np.int32), jnp.asarray(input_map))
            self.runners.append(ModelRunner(config, params, dataclasses.replace(engine, kv_cache_bytes=pool),
                                            state=target.cell, vocab_maps=maps))
        self._step = donating_jit(tree_step, spec=self.spec, static_argnames=("all_greedy", "logprobs"))
        self._compiled = CompiledBuckets(target.compiler_options)
        self.record = [0, 0]  # tokens accepted over all its steps' rows, and those rows (hybrid's bar)

    @property
    def depth(self) -> int:
        return self.spec.depth

    @property
    def lookahead(self) -> int:
        return self.spec.depth

    @property
    def overrun(self) -> int:  # a tree drafted on the device cannot be cut to the tokens still allowed
        return self.spec.depth

    @property
    def compile_time_s(self) -> float:
        """Seconds spent compiling the speculative step and the drafts' prompt steps."""
        return self._compiled.compile_time_s + sum(r.compile_time_s for r in self.runners)

    # -- sequence lifecycle: the target's pages are the caller's; it must reserve ``depth`` extra tokens
    def _draft_tokens(self, max_tokens: int, shape: TreeShape) -> int:
        return max_tokens + shape.num_fed  # the tree nodes a draft runs sit past the sequence

    def can_admit(self, max_tokens: int) -> bool:
        return all(r.can_admit(self._draft_tokens(max_tokens, s)) for r, s in zip(self.runners, self.spec.shapes))

    def fits(self, max_total: int) -> bool:
        """Whether the draft pools could ever hold a sequence of ``max_total`` tokens."""
        return all(r.pages.pages_for(self._draft_tokens(max_total, s)) <= r.pages.num_pages
                   for r, s in zip(self.runners, self.spec.shapes))

    def can_grow(self, seq_id, num_tokens: int) -> bool:
        """Whether every draft's free pages let the sequence grow to ``num_tokens`` (``grow``)."""
        return all(r.can_grow(seq_id, self._draft_tokens(num_tokens, s))
                   for r, s in zip(self.runners, self.spec.shapes))

    def grow(self, seq_id, num_tokens: int) -> None:
        """Give each draft pages for ``num_tokens`` tokens of the sequence and a tree's scratch
        (check ``can_grow`` first: a draft short of pages raises ``OutOfPagesError``)."""
        for runner, shape in zip(self.runners, self.spec.shapes):
            runner.pages.reserve(seq_id, self._draft_tokens(num_tokens, shape))

    def attach(self, seq_id, num_tokens: int) -> None:
        """Register a sequence in every draft with pages for ``num_tokens`` of its tokens (``grow`` adds more)."""
        started = []
        try:
            for runner, shape in zip(self.runners, self.spec.shapes):
                runner.add_sequence(seq_id, self._draft_tokens(num_tokens, shape))
                started.append(runner)
        except Exception:
            for runner in started:
                runner.release(seq_id)
            raise

    def detach(self, seq_id) -> None:
        for runner in self.runners:
            runner.release(seq_id)

    def prefill(self, inputs: Sequence[StepInput]) -> None:
        """Run prompt chunks (target ids, as the target's prefill runs them) through every draft."""
        for runner, input_map in zip(self.runners, self._input_maps):
            runner.step([StepInput(x.seq_id, input_map[np.asarray(x.tokens)].tolist()) for x in inputs])

    # -- shape buckets ---------------------------------------------------------------------------
    def _batch(self, b: int, tp: int, pt: int, pds: tuple[int, ...], rows: RowMeta | None = None) -> DraftTreeBatch:
        """The step's batch for bucket (b rows, tp pending tokens, pt target pages, pds draft
        pages), every row inactive (``rows``: the target's rows, default empty): what a step fills
        in, and what compiling ahead lowers for."""
        drafts = range(len(self.runners))
        return DraftTreeBatch(
            rows=row_meta(b, pt) if rows is None else rows, active=np.zeros((b,), bool),
            draft_blocks=tuple(np.zeros((b, p), np.int32) for p in pds),
            draft_lengths=tuple(np.zeros((b,), np.int32) for _ in drafts),
            pending=tuple(np.zeros((b, tp), np.int32) for _ in drafts),
            pending_len=tuple(np.ones((b,), np.int32) for _ in drafts), plain_draws=np.zeros((b,), bool))

    def _compile(self, key: tuple, args: tuple):
        """The executable of bucket ``key`` = (b, tp, pt, pds, all_greedy, logprobs) for ``args`` (``step_args``)."""
        *_, all_greedy, logprobs = key
        return self._compiled.get(key, self._step, *args, all_greedy=all_greedy, logprobs=logprobs)

    def _compile_ahead(self, key: tuple) -> None:
        self._compile(key, step_args(self.target.cell.state, self._batch(*key[:4])))

    def step_keys(self, max_len: int | None = None) -> list[tuple]:
        """The buckets of tree steps over sequences of up to ``max_len`` tokens (default the
        target's ``max_model_len``), greedy and sampled, without logprobs: every batch bucket, and
        every (target pages, draft pages) pair a sequence length leads to. The drafts' pending
        tokens are the root and the accepted nodes (hybrid steps the suffix cache verified leave
        more, a wider bucket compiled when met)."""
        target = self.target
        max_len = target.longest(max_len)
        tp = next_power_of_two(self.spec.depth + 1)
        pages = {(target.page_bucket(target.pages.pages_for(n + self.spec.depth)),
                  tuple(r.page_bucket(r.pages.pages_for(n + s.num_fed)) for r, s in zip(self.runners, self.spec.shapes)))
                 for n in range(1, max_len - self.spec.depth + 1)}
        return [(b, tp, pt, pds, all_greedy, False) for b in target.buckets(max_len)["batch"]
                for pt, pds in sorted(pages) for all_greedy in (True, False)]

    def warm_up_jobs(self, max_len: int | None = None) -> dict[str, list]:
        """One thunk per bucket not yet compiled, by kind: "draft prompt", the drafts' prompt
        steps (``ModelRunner.compile``), and "tree step", the tree steps (``step_keys``, compiled
        without running)."""
        prompts = [functools.partial(runner.compile, key) for runner in self.runners for key in runner.step_keys(max_len)
                   if key[2] > 1 and not runner.has_executable(key)]  # drafts only run prompt chunks
        trees = [functools.partial(self._compile_ahead, key) for key in self.step_keys(max_len)
                 if key not in self._compiled]
        return {"draft prompt": prompts, "tree step": trees}

    # -- one speculative step ------------------------------------------------------------------
    def propose(self, rows: list[ProposalRow]) -> list[DraftBatch]:
        """Every row's tree is drafted on the device, in the step that verifies it (``step``)."""
        return [DraftBatch(rows, [None] * len(rows), drafter=self, source="draft")]

    def step(self, inputs: Sequence[StepInput], *, logprobs: bool = False) -> tuple[list[Verified], float]:
        """One tree step for each sequence; ``inputs[i].tokens`` is its whole sequence (prompt and
        output so far; the last token is the root). Returns per sequence what verification gave
        (new tokens: accepted, then the bonus token; with ``logprobs``, each one's ``TokenLogprob``
        from the target's verification logits), and the step's seconds (compilation not counted)."""
        target, spec = self.target, self.spec
        ids = [x.seq_id for x in inputs]
        b, _, _ = target._check_batch(ids)
        rows = len(inputs)
        sizes = [len(x.tokens) for x in inputs]
        for seq_id, size in zip(ids, sizes):
            if target.pages.length(seq_id) != size - 1:
                raise ValueError(f"sequence {seq_id!r}: the target caches {target.pages.length(seq_id)} tokens, "
                                 f"the sequence has {size} (all but the root must be cached)")
        pt = target.page_bucket(max(target.pages.pages_for(n + spec.depth) for n in sizes))
        draft_lengths = [[r.pages.length(i) for i in ids] for r in self.runners]
        # Pending tokens are at most the accepted nodes a draft did not run and the root: one width serves.
        tp = next_power_of_two(max([spec.depth + 1] + [n - length for lengths in draft_lengths
                                                      for n, length in zip(sizes, lengths)]))
        pds = tuple(r.page_bucket(max(r.pages.pages_for(n + s.num_fed) for n in sizes))
                    for r, s in zip(self.runners, spec.shapes))
        batch = self._batch(b, tp, pt, pds, row_meta(b, pt, target.pages.block_table(ids, pt),
                                                     np.array(sizes) - 1, inputs))
        batch.active[:rows] = True
        batch.plain_draws[:rows] = [x.plain_draws for x in inputs]
        for d, (runner, p, lengths) in enumerate(zip(self.runners, pds, draft_lengths)):
            batch.draft_blocks[d][:rows] = runner.pages.block_table(ids, p)
            batch.draft_lengths[d][:rows] = lengths
            for row, (x, length) in enumerate(zip(inputs, lengths)):
                batch.pending[d][row, : len(x.tokens) - length] = x.tokens[length:]
            batch.pending_len[d][:rows] = np.array(sizes) - np.array(lengths)
        # An all-greedy batch (the common case) compiles its own step without any sampling work.
        all_greedy = all(x.temperature == 0 for x in inputs)
        key = (b, tp, pt, pds, all_greedy, logprobs)
        if key not in self._compiled:
            log.info("compiling tree step shape %s on first use (LLM.warm_up compiles ahead)", key)
        state = target.cell.state
        args = step_args(state, batch)
        compiled = self._compile(key, args)
        start = time.perf_counter()
        caches, result = compiled(*args)
        target.cell.state = state.with_caches(caches)
        tokens, count, accepted = np.asarray(result.tokens), np.asarray(result.count), np.asarray(result.accepted)
        proposed, depth = np.asarray(result.proposed), np.asarray(result.depth)
        new_lengths = [np.asarray(x) for x in result.draft_lengths]
        elapsed = time.perf_counter() - start

        target.commit(ids, count[:rows])  # the root and the accepted nodes
        for runner, lengths, new in zip(self.runners, draft_lengths, new_lengths):
            for row, seq_id in enumerate(ids):  # the drafts' own caches: their bookkeeping, not the target's
                runner.pages.commit(seq_id, int(new[row]) - lengths[row])
        self.record[0] += int(np.sum(accepted[:rows]))
        self.record[1] += rows
        scores = [np.asarray(x) for x in result.logprobs] if logprobs else None
        verified = []
        for row in range(rows):
            new_tokens = tokens[row, : count[row]].tolist()
            verified.append(Verified(tokens=new_tokens, proposed=int(proposed[row]), depth=int(depth[row]),
                                     accepted=int(accepted[row]),
                                     logprobs=logprob_entries(new_tokens, *(x[row] for x in scores)) if logprobs else None))
        return verified, elapsed


def _build(settings: TreeSpeculation, context: BuildContext) -> TreeSpeculator:
    speculator = TreeSpeculator(context.runner, [load_draft_for(d, context.target) for d in settings.drafts],
                                settings.tree_shapes())
    runner = context.runner
    if not (runner.pages.pages_for(speculator.depth + 2) <= runner.pages.num_pages and speculator.fits(2)):
        raise ValueError(f"a tree of depth {speculator.depth} with {settings.max_nodes} nodes does "
                         "not fit the KV cache: lower max_nodes or the expansion, or raise kv_cache_bytes")
    return speculator


register("tree", TreeSpeculation, _build)
