"""Merging several drafts' token trees into one (SpecInfer, Definition 3.2).

The merged tree holds every token sequence of every draft's tree, and sequences with a common
prefix share that prefix's nodes. On the device it is the drafts' trees laid end to end under one
root (draft 0's nodes, then draft 1's, ...), padded to the size asked for; a node whose root path
already appears earlier is marked dead and its children are hung on that earlier node. Nothing
moves, so each draft's nodes keep their index and the verifier still sees every proposal: which
draft made it, under which of that draft's nodes, from which distribution (see
``verify.mss_accept``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from specjax.pytree import pytree_dataclass
from specjax.speculation.tree import device_ancestor_mask
from specjax.speculation.tree_draft import DraftModel, DraftTree


@pytree_dataclass
class MergedTree:
    """B merged trees of N nodes, and the proposals behind them.

    As a tree: tokens, parents (-1: none), depths [B, N] int32; live [B, N] bool; mask [B, N, N]
    ancestor-or-self. Per proposal (every node of every draft's tree, at the same index): canon
    [B, N] the merged node it became; under [B, N] the merged node it is a child of; group [B, N]
    int32, equal for siblings of one draft; proposed [B, N] bool; q_logits [B, N, V] the
    processed draft logits it was drawn from, on the target's ids (None when the drafts kept no
    distributions: all-greedy trees); draft [B, N] int32 which draft; scratch [B, N] its offset in
    that draft's scratch (-1: not run).
    """

    tokens: jax.Array
    parents: jax.Array
    depths: jax.Array
    live: jax.Array
    mask: jax.Array
    canon: jax.Array
    under: jax.Array
    group: jax.Array
    proposed: jax.Array
    q_logits: jax.Array | None
    draft: jax.Array
    scratch: jax.Array


def segments(sizes: Sequence[int]) -> list[int]:
    """Where each draft's non-root nodes start in the merged array, for trees of ``sizes`` nodes."""
    starts, start = [], 1
    for n in sizes:
        starts.append(start)
        start += n - 1
    return starts


def merge_trees(trees: Sequence[DraftTree], size: int, max_depth: int, drafts: Sequence[DraftModel] = ()
                ) -> MergedTree:
    """Merge the drafts' trees (same batch and root) into arrays of ``size`` nodes; ``drafts`` (the
    models that drafted them) put their distributions on the target's ids, when they kept any."""
    b = trees[0].tokens.shape[0]
    starts = segments([t.tokens.shape[1] for t in trees])
    total = starts[-1] + trees[-1].tokens.shape[1] - 1
    if total > size:
        raise ValueError(f"{total} merged nodes do not fit a tree of {size}")
    pad = size - total

    def cat(name, root, fill):
        parts = [root] + [getattr(t, name)[:, 1:] for t in trees] + [jnp.full((b, pad) + root.shape[2:], fill, root.dtype)]
        return jnp.concatenate(parts, axis=1)

    first = trees[0]
    tokens = cat("tokens", first.tokens[:, :1], 0)
    depths = cat("depths", first.depths[:, :1], 0)
    own_live = cat("live", first.live[:, :1], False)
    scratch = cat("scratch", first.scratch[:, :1], -1)
    # Parents in merged indices: a draft's node i >= 1 sits at start + i - 1; its root is node 0.
    own_parent = jnp.concatenate(
        [jnp.full((b, 1), -1, jnp.int32)]
        + [jnp.where(t.parents[:, 1:] > 0, t.parents[:, 1:] + s - 1, t.parents[:, 1:]) for t, s in zip(trees, starts)]
        + [jnp.full((b, pad), -1, jnp.int32)], axis=1)
    draft = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32)]
                            + [jnp.full((b, t.tokens.shape[1] - 1), s, jnp.int32) for s, t in enumerate(trees)]
                            + [jnp.full((b, pad), -1, jnp.int32)], axis=1)
    q_logits = None
    if trees[0].q_logits is not None:
        # Each proposal carries the distribution at its own parent (drafts differ at the shared root),
        # widened to the target's ids only here, for the proposals: the root and padding see none.
        vocab = drafts[0].target_to_draft.shape[0]
        q_logits = jnp.concatenate(
            [jnp.full((b, 1, vocab), -jnp.inf, jnp.float32)]
            + [d.on_target_ids(jnp.take_along_axis(t.q_logits, jnp.maximum(t.parents[:, 1:], 0)[:, :, None], 1))
               for t, d in zip(trees, drafts, strict=True)]
            + [jnp.full((b, pad, vocab), -jnp.inf, jnp.float32)], axis=1)

    index = jnp.arange(size)
    canon = jnp.broadcast_to(index, (b, size))
    if len(trees) > 1:
        canon = jnp.where(own_live, _first_equal_path(tokens, own_parent, depths, own_live, max_depth), canon)
    live = own_live & (canon == index)
    under = jnp.where(own_parent >= 0, jnp.take_along_axis(canon, jnp.maximum(own_parent, 0), 1), -1)
    parents = jnp.where(live, under, -1)
    return MergedTree(
        tokens=tokens, parents=parents, depths=depths, live=live,
        mask=device_ancestor_mask(parents, live, max_depth), canon=canon, under=under,
        group=jnp.where(own_parent >= 0, own_parent + size * draft, -1), proposed=own_live & (index > 0),
        q_logits=q_logits, draft=draft, scratch=scratch)


def _first_equal_path(tokens, parents, depths, live, max_depth: int) -> jax.Array:
    """[B, N]: for each live node, the lowest-index live node with the same token sequence from the root.

    same[i, j] (nodes i and j spell the same path) is the fixed point of "same token, same depth,
    and same-path parents", reached after ``max_depth`` rounds.
    """
    n = tokens.shape[1]
    alike = ((tokens[:, :, None] == tokens[:, None, :]) & (depths[:, :, None] == depths[:, None, :])
             & live[:, :, None] & live[:, None, :])
    roots = jnp.zeros((n, n), bool).at[0, 0].set(True)
    par = jnp.maximum(parents, 0)

    def refine(_, same):
        by_parent = jnp.take_along_axis(jnp.take_along_axis(same, par[:, :, None], 1), par[:, None, :], 2)
        return roots | (alike & by_parent & (parents[:, :, None] >= 0) & (parents[:, None, :] >= 0))

    same = jax.lax.fori_loop(0, max_depth, refine, jnp.broadcast_to(roots, alike.shape))
    return jnp.argmax(same, axis=-1).astype(jnp.int32)
