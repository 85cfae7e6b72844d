"""Token trees from one draft model, grown one depth per draft forward.

A step starts where the draft's cache ends: the draft first runs the sequence's tokens it has not
seen yet (``pending``; the last of them is the tree's root, the token the target will run next),
which gives the distribution of depth 1. At each further depth it runs the frontier, the nodes of
the previous depth that get children, in one forward batched over the frontier. Their K/V go to
the draft's own paged cache just past its committed prefix, node after node (the "scratch"), and
each frontier node attends to the prefix, its cached ancestors (``AttentionMetadata.tree_mask``)
and itself. Nodes of the last depth are never run. After verification the accepted nodes' K/V are
moved to their final positions (``kv_cache.copy_kv``); everything else in the scratch is past the
committed length, never read, and overwritten by the next step.

How children are chosen, per request:

* greedy requests: the draft's top-k tokens (raw logits).
* sampled requests, ``TreeShape.budget`` unset: k children drawn *without replacement* from the
  draft's distribution with the request's temperature / top-k / top-p (the Gumbel top-k trick:
  the order of the perturbed scores is the order of sequential draws). Each child's draw is
  conditional on its earlier siblings; the verifier knows this (see ``verify.mss_accept``).
* sampled requests with a budget: the top-k tokens of that distribution, deterministically. A
  budget keeps nodes by their own probability, so a sampled child could be dropped for its value,
  which would bias the verifier; deterministic proposals (a point-mass draft distribution) stay
  lossless whatever is dropped.
* sampled rows in ``top_k_rows`` (verified by sampling and matching): the same top-k tokens.

Shapes are static: a ``TreeShape`` fixes every depth's frontier width and the node count.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from specjax.attention import AttentionMetadata, causal_mask
from specjax.config import ModelConfig
from specjax.draft import spread_logits
from specjax.kv_cache import KVCache, slot_ids, write_kv
from specjax.model import forward
from specjax.params import Params
from specjax.pytree import pytree_dataclass
from specjax.sampling import process_node_logits


@dataclass(frozen=True)
class TreeShape:
    """How one draft grows its tree each step (static: it fixes every array shape).

    expansion: (k_1, ..., k_D), the children each expanded node gets at depth d (SpecInfer's
        <1,1,3,1,1,1,1,1> is ``(1, 1, 3, 1, 1, 1, 1, 1)``; ``()`` is a root-only tree).
    beam: expand only the ``beam`` nodes of each depth with the highest cumulative draft
        probability (None: every node).
    budget: keep only the ``budget`` nodes (root included) with the highest cumulative draft
        probability (None: every node drafted). Sampled requests then get deterministic proposals.
    """

    expansion: tuple[int, ...]
    beam: int | None = None
    budget: int | None = None

    def __post_init__(self):
        expansion = tuple(self.expansion)
        if not all(isinstance(k, int) and k >= 1 for k in expansion):
            raise ValueError(f"expansion must be positive integers (children per node per depth), got {self.expansion!r}")
        object.__setattr__(self, "expansion", expansion)
        for name in ("beam", "budget"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.budget is not None and self.budget > self.num_candidates:
            raise ValueError(f"budget {self.budget} exceeds the {self.num_candidates} nodes the expansion drafts")

    @property
    def depth(self) -> int:
        return len(self.expansion)

    def frontier(self, depth: int) -> int:
        """How many nodes of ``depth`` get children."""
        size = self.level_sizes[depth]
        return size if self.beam is None else min(self.beam, size)

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """Nodes drafted at depths 0 (the root) .. D."""
        sizes = [1]
        for k in self.expansion:
            prev = sizes[-1] if self.beam is None else min(self.beam, sizes[-1])
            sizes.append(prev * k)
        return tuple(sizes)

    @property
    def num_candidates(self) -> int:
        return sum(self.level_sizes)

    @property
    def num_nodes(self) -> int:
        """Nodes of the tree (root included) after the budget."""
        return self.num_candidates if self.budget is None else self.budget

    @property
    def num_fed(self) -> int:
        """Tree nodes run through the draft each step: the scratch slots its cache needs."""
        return sum(self.frontier(d) for d in range(1, self.depth))

    @property
    def samples(self) -> bool:
        """Whether sampled requests draw children (True) or get deterministic top-k proposals."""
        return self.budget is None


@pytree_dataclass
class DraftModel:
    """A draft's weights and its id maps to the target's vocabulary (device side).

    draft_to_target: [N] int32, the target id of each draft id; target_to_draft: [V] int32, the
    draft id each target id is fed as. ``DraftModel.same_vocab`` builds identity maps.
    """

    params: Params
    draft_to_target: jax.Array
    target_to_draft: jax.Array

    @classmethod
    def same_vocab(cls, params: Params, vocab_size: int) -> "DraftModel":
        ids = jnp.arange(vocab_size, dtype=jnp.int32)
        return cls(params=params, draft_to_target=ids, target_to_draft=ids)

    def on_target_ids(self, logits: jax.Array) -> jax.Array:
        """Draft logits [..., N] on the target's ids [..., V], -inf where the draft has no token."""
        return spread_logits(logits.astype(jnp.float32), self.draft_to_target, self.target_to_draft.shape[0])


@pytree_dataclass
class DraftTree:
    """One draft's trees for a batch, B rows of n nodes (node 0 the root; parents before children).

    tokens, parents (-1: none), depths [B, n] int32; live [B, n] bool; scratch [B, n] int32, the
    node's offset in the draft cache's scratch (-1: not run); logq [B, n] f32, its cumulative draft
    log-probability; q_logits [B, n, Vd] f32, the draft's processed logits *at* the node, on the
    draft's own ids (``DraftModel.on_target_ids`` widens them): the distribution its children were
    drawn from, or None for trees drafted ``all_greedy`` (no one needs it); length [B] int32, the
    draft cache's committed tokens (root included).
    """

    tokens: jax.Array
    parents: jax.Array
    depths: jax.Array
    live: jax.Array
    scratch: jax.Array
    logq: jax.Array
    q_logits: jax.Array | None
    length: jax.Array


@dataclass(frozen=True)
class _Layout:
    """Where a shape's nodes sit while drafting: every depth past the first gets a block of
    ``width * children`` slots (the widest frontier times the most children), so one scanned body
    serves all depths; ``real`` lists, in order, the slots a ``TreeShape`` actually drafts."""

    width: int  # frontier slots run per depth
    children: int  # child slots per frontier slot
    size: int  # all slots
    real: tuple[int, ...]

    @classmethod
    def of(cls, shape: TreeShape) -> "_Layout":
        d, ks = shape.depth, shape.expansion
        width = max((shape.frontier(i) for i in range(1, d)), default=1)
        children = max(ks[1:], default=1)
        first = 1 + (ks[0] if d else 0)  # the root and its children
        real = list(range(first))
        for depth in range(2, d + 1):
            start = first + (depth - 2) * width * children
            real += [start + i * children + r for i in range(shape.frontier(depth - 1)) for r in range(ks[depth - 1])]
        return cls(width, children, first + max(d - 1, 0) * width * children, tuple(real))


def draft_tree(config: ModelConfig, shape: TreeShape, draft: DraftModel, cache: KVCache, *, block_tables: jax.Array,
               lengths: jax.Array, pending: jax.Array, pending_len: jax.Array, active: jax.Array,
               temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, key: jax.Array, all_greedy: bool = False,
               top_k_rows: jax.Array | None = None, attention_backend: str | None = None
               ) -> tuple[DraftTree, KVCache]:
    """Draft a tree per row.

    block_tables [B, P] (covering positions up to ``lengths + pending_len + shape.num_fed``);
    lengths [B] committed draft tokens; pending [B, Tp] target ids the draft has not run yet, the
    last valid one (``pending_len`` [B] >= 1) the root; active [B] bool (padding rows write
    nothing); temperature, top_k, top_p [B] the requests' sampling settings; key [B] typed keys.
    ``all_greedy`` (static): every row is greedy, so the sampling settings and keys are ignored and
    no distribution is kept (``q_logits`` None). top_k_rows [B] bool: sampled rows that get the
    draft's most probable children rather than drawn ones (rows verified by sampling and matching,
    which accepts a child with the target's probability of it, so the likeliest pay best).

    Everything runs on the draft's own ids: only the tokens are mapped to the target's.
    """
    b, tp = pending.shape
    vocab = draft.draft_to_target.shape[0]
    page = cache.page_size
    if max(shape.expansion, default=0) > vocab:
        raise ValueError(f"expansion {shape.expansion} asks for more children than the draft's {vocab} tokens")
    layout = _Layout.of(shape)
    w, kmax, n = layout.width, layout.children, layout.size
    greedy = temperature == 0
    draws = ~greedy if top_k_rows is None else ~greedy & ~top_k_rows
    draws = (draws if shape.samples else jnp.zeros_like(greedy))[:, None, None]

    positions = lengths[:, None] + jnp.arange(tp)
    valid = active[:, None] & (jnp.arange(tp) < pending_len[:, None])
    meta = AttentionMetadata(block_tables=block_tables, context_lens=lengths, new_mask=causal_mask(b, tp))
    out = forward(draft.params, config, draft.target_to_draft[pending], positions, cache, meta,
                  logit_indices=(pending_len - 1)[:, None], attention_backend=attention_backend)
    logits, new_k, new_v = out.logits, out.new_k, out.new_v
    cache = write_kv(cache, new_k, new_v, slot_ids(block_tables, positions, valid, page))
    length = lengths + pending_len

    rows = jnp.arange(b)[:, None]
    tree = DraftTree(
        tokens=jnp.zeros((b, n), jnp.int32).at[:, 0].set(
            jnp.take_along_axis(pending, (pending_len - 1)[:, None], 1)[:, 0]),
        parents=jnp.full((b, n), -1, jnp.int32), depths=jnp.zeros((b, n), jnp.int32),
        live=jnp.zeros((b, n), bool).at[:, 0].set(True), scratch=jnp.full((b, n), -1, jnp.int32),
        logq=jnp.zeros((b, n), jnp.float32),
        q_logits=None if all_greedy else jnp.full((b, n, vocab), -jnp.inf, jnp.float32), length=length)
    ancestors = jnp.zeros((b, n, max(shape.num_fed, 1)), bool)  # scratch offsets of each node's run ancestors

    def grow(tree, ancestors, frontier, frontier_ok, logits, depth, slots, k, start):
        """Children of the frontier [B, fw] (its draft logits [B, fw, N]): ``slots`` per frontier
        node from slot ``start`` on, of which the first ``k`` are drafted."""
        fw = frontier.shape[1]
        frontier_live = jnp.take_along_axis(tree.live, frontier, 1) & frontier_ok
        logits = logits.astype(jnp.float32)
        ranking = scores = logits
        if not all_greedy:
            processed = process_node_logits(logits, temperature, top_k, top_p)
            ranking = scores = jnp.where(greedy[:, None, None], logits, processed)
            if shape.samples:  # Gumbel noise only where a row samples; a batch without one skips drawing it
                noise = jax.lax.cond(jnp.any(draws), lambda: jax.vmap(lambda row_key: jax.random.gumbel(
                    jax.random.fold_in(row_key, depth), (fw, vocab)))(key), lambda: jnp.zeros((b, fw, vocab)))
                scores = jnp.where(draws, processed + noise, ranking)
        top, children = jax.lax.top_k(scores, slots)  # [B, fw, slots] draft ids, in draw order
        live = frontier_live[:, :, None] & jnp.isfinite(top) & (jnp.arange(slots) < k)
        logq = (jnp.take_along_axis(tree.logq, frontier, 1)[:, :, None]
                + jnp.take_along_axis(jax.nn.log_softmax(ranking, axis=-1), children, 2))
        count = fw * slots

        def put(x, value):
            return jax.lax.dynamic_update_slice_in_dim(x, value.astype(x.dtype), start, axis=1)

        q_logits = tree.q_logits
        if not all_greedy:
            q_logits = q_logits.at[rows, frontier].set(
                jnp.where(frontier_ok[:, :, None], processed, jnp.take_along_axis(q_logits, frontier[:, :, None], 1)))
        tree = DraftTree(
            tokens=put(tree.tokens, draft.draft_to_target[children].reshape(b, count)),
            parents=put(tree.parents, jnp.repeat(frontier, slots, axis=1)),
            depths=put(tree.depths, jnp.full((b, count), depth)),
            live=put(tree.live, live.reshape(b, count)), scratch=tree.scratch,
            logq=put(tree.logq, logq.reshape(b, count)), q_logits=q_logits, length=tree.length)
        ancestors = put(ancestors, jnp.repeat(jnp.take_along_axis(ancestors, frontier[:, :, None], 1), slots, 1))
        return tree, ancestors, start + jnp.arange(count), live.reshape(b, count), logq.reshape(b, count)

    def next_frontier(index, live, logq, frontier_count):
        """The ``frontier_count`` nodes of a depth that get children, in ``w`` slots in node order:
        the most probable (a beam) or all of them; unused slots are flagged off."""
        score = jnp.where(live, logq if shape.beam is not None else 0.0, -jnp.inf)
        take = min(w, index.shape[0])
        _, best = jax.lax.top_k(score, take)
        ok = jnp.arange(take) < frontier_count
        order = jnp.argsort(jnp.where(ok, best, n + best), axis=1)  # node order, flagged-off slots last
        frontier = jnp.take_along_axis(index[best], order, 1).astype(jnp.int32)
        ok = jnp.take_along_axis(jnp.broadcast_to(ok, best.shape), order, 1)
        pad = w - take
        return (jnp.pad(frontier, ((0, 0), (0, pad))), jnp.pad(ok, ((0, 0), (0, pad))))

    if shape.depth:
        root = jnp.zeros((b, 1), jnp.int32)
        k = shape.expansion[0]
        tree, ancestors, index, live, logq = grow(tree, ancestors, root, jnp.ones((b, 1), bool), logits, 1, k, k, 1)
    if shape.depth > 1:
        frontier, frontier_ok = next_frontier(index, live, logq, shape.frontier(1))

        def depth_step(carry, xs):
            tree, ancestors, cache, frontier, frontier_ok = carry
            depth, k, start, fed, count = xs
            # Run the frontier (depth - 1): its K/V go to the scratch, after the frontiers run before.
            offsets = fed + jnp.arange(w)
            meta = AttentionMetadata(block_tables=block_tables, context_lens=length,
                                     new_mask=jnp.broadcast_to(jnp.eye(w, dtype=bool), (b, w, w)),
                                     tree_mask=jnp.take_along_axis(ancestors, frontier[:, :, None], 1))
            positions = jnp.broadcast_to((length + depth - 2)[:, None], (b, w))
            out = forward(draft.params, config, draft.target_to_draft[jnp.take_along_axis(tree.tokens, frontier, 1)],
                          positions, cache, meta, attention_backend=attention_backend)
            logits, new_k, new_v = out.logits, out.new_k, out.new_v
            run = jnp.take_along_axis(tree.live, frontier, 1) & frontier_ok
            cache = write_kv(cache, new_k, new_v, slot_ids(block_tables, length[:, None] + offsets,
                                                           active[:, None] & run, page))
            tree = dataclasses.replace(tree, scratch=tree.scratch.at[rows, frontier].set(
                jnp.where(run, offsets, jnp.take_along_axis(tree.scratch, frontier, 1))))
            ancestors = ancestors.at[rows, frontier, offsets[None, :]].max(run, mode="drop")
            tree, ancestors, index, live, logq = grow(tree, ancestors, frontier, frontier_ok, logits, depth, kmax, k,
                                                      start)
            frontier, frontier_ok = next_frontier(index, live, logq, count)
            return (tree, ancestors, cache, frontier, frontier_ok), None

        depths = np.arange(2, shape.depth + 1)
        starts = 1 + shape.expansion[0] + (depths - 2) * w * kmax
        fed = np.cumsum([0] + [shape.frontier(d) for d in range(1, shape.depth - 1)])
        counts = [shape.frontier(d) if d < shape.depth else 0 for d in depths]
        xs = tuple(jnp.asarray(x, jnp.int32) for x in (depths, shape.expansion[1:], starts, fed, counts))
        (tree, ancestors, cache, _, _), _ = jax.lax.scan(depth_step, (tree, ancestors, cache, frontier, frontier_ok), xs)

    tree = _compact(tree, layout)
    tree = dataclasses.replace(tree, length=jnp.where(active, length, lengths))
    if shape.budget is not None and shape.budget < shape.num_candidates:
        tree = _keep_most_probable(tree, shape.budget)
    return tree, cache


def _compact(tree: DraftTree, layout: _Layout) -> DraftTree:
    """The drafted slots only, in order, parents renumbered (a static gather)."""
    real = np.asarray(layout.real)
    if real.size == layout.size:
        return tree
    new_index = np.full(layout.size + 1, -1, np.int32)  # the extra entry maps parent -1 to -1
    new_index[real] = np.arange(real.size)
    pick = jnp.asarray(real)
    parents = jnp.asarray(new_index)[tree.parents[:, pick]]
    return DraftTree(tokens=tree.tokens[:, pick], parents=parents, depths=tree.depths[:, pick],
                     live=tree.live[:, pick], scratch=tree.scratch[:, pick], logq=tree.logq[:, pick],
                     q_logits=None if tree.q_logits is None else tree.q_logits[:, pick], length=tree.length)


def _keep_most_probable(tree: DraftTree, budget: int) -> DraftTree:
    """The ``budget`` nodes of highest cumulative probability, in node order. A child is never more
    probable than its parent and ties go to the lower index, so the kept set holds every kept
    node's ancestors; dead nodes kept as filler lose their parent and stay dead."""
    b, n = tree.tokens.shape
    score = jnp.where(tree.live, tree.logq, -jnp.inf).at[:, 0].set(jnp.inf)
    kept = jnp.sort(jax.lax.top_k(score, budget)[1], axis=1)
    rows = jnp.arange(b)[:, None]
    new_index = jnp.full((b, n), -1, jnp.int32).at[rows, kept].set(jnp.arange(budget, dtype=jnp.int32))

    def take(x):
        return None if x is None else jnp.take_along_axis(x, kept.reshape(kept.shape + (1,) * (x.ndim - 2)), 1)

    old_parents = take(tree.parents)
    parents = jnp.where(old_parents >= 0, jnp.take_along_axis(new_index, jnp.maximum(old_parents, 0), 1), -1)
    live = take(tree.live) & ((parents >= 0) | (jnp.arange(budget) == 0))
    return DraftTree(tokens=take(tree.tokens), parents=jnp.where(live, parents, -1), depths=take(tree.depths),
                     live=live, scratch=take(tree.scratch), logq=take(tree.logq), q_logits=take(tree.q_logits),
                     length=tree.length)
