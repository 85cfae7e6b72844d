"""Verification of token trees against the target's logits.

Greedy: the accepted path follows, from the root, the child whose token is the target's argmax at
its parent; the target's argmax at the last accepted node is the bonus token. The output is the
target's greedy decoding token for token.

Stochastic: SpecInfer's multi-step speculative sampling (MSS). At the current node, with p the
target's distribution there (the request's temperature / top-k / top-p applied), the proposals
under it are tried in turn; proposal x drawn from q is accepted with probability
min(1, p(x) / q(x)), and on rejection p becomes normalize(max(0, p - q)). When every proposal is
rejected the bonus token is drawn from what is left of p. Each trial is one step of ordinary
speculative sampling, which emits a token distributed as its p *provided x was drawn from q
given everything tried before it*; chained, the emitted token follows the target's p exactly.

That proviso decides what q is. A draft's k children of a node are drawn without replacement,
so the i-th child's q is the draft's distribution with its earlier siblings' tokens removed and
renormalised, and siblings are tried in draw order (itself random). Deterministic proposals
(greedy drafts, budgeted trees) have a point mass q: accepted with probability p(x), and a
rejection zeroes p(x). Children of different drafts are independent, so each draft's siblings
start again from that draft's distribution. A duplicate of an already rejected token has
p(x) = 0 by then and is rejected, but its residual step still counts.

Trees of point-mass proposals (host trees: suffix, n-gram) are verified by sampling and matching
instead: each node's next token is drawn from the target's p there with the key of that token's
own position in the request, exactly as plain decoding draws it, and a child is accepted when it
equals its parent's draw. A proposal x is then accepted with probability p(x), as MSS accepts a
point mass, siblings included; and the emitted tokens are plain sampling's own, so a seed
reproduces them whatever the batch, the suffix cache or the proposals were. Drafted trees are
verified this way too for rows that ask for it (``plain_draws``: seeded requests under hybrid
speculation, whose source changes from step to step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specjax.kv_cache import INVALID_SLOT, KVCache, write_kv
from specjax.pytree import pytree_dataclass
from specjax.sampling import argmax, no_logprobs, process_node_logits, sample, token_logprobs


def greedy_accept(logits: jax.Array, tokens: jax.Array, parents: jax.Array, depths: jax.Array,
                  mask: jax.Array, live: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Longest accepted path of each tree: ``match_accept`` of the target's argmax at every node.

    logits [B, N, V] (the target's, at every node); tokens, parents, depths [B, N] int32;
    mask [B, N, N] ancestor-or-self; live [B, N] bool (false for padding).
    """
    return match_accept(argmax(logits), tokens, parents, depths, mask, live)


def node_samples(logits: jax.Array, node_keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                 top_p: jax.Array) -> jax.Array:
    """[B, N] the token the target draws after each node, each with its own key ``node_keys`` [B, N]
    (greedy rows: the argmax), by ``sampling.sample``, as plain decoding draws a token."""
    b, n, vocab = logits.shape
    rows = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731
    return sample(logits.reshape(b * n, vocab), node_keys.reshape(b * n), rows(temperature), rows(top_k),
                  rows(top_p)).reshape(b, n)


def match_accept(prediction: jax.Array, tokens: jax.Array, parents: jax.Array, depths: jax.Array,
                 mask: jax.Array, live: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Longest path of each tree whose every node is the token ``prediction`` [B, N] chose after its parent.

    Returns (last [B] int32: deepest accepted node, path [B, N] bool: the root and accepted nodes,
    bonus [B] int32: the prediction after ``last``).
    """
    n = tokens.shape[1]
    index = jnp.arange(n)
    parent_prediction = jnp.take_along_axis(prediction, jnp.maximum(parents, 0), axis=1)
    ok = ((tokens == parent_prediction) | (index == 0)) & live
    accepted = ~jnp.any(mask & ~ok[:, None, :], axis=-1)  # every ancestor-or-self matched
    # Deepest accepted node; among equals (duplicate siblings) the lowest index.
    score = jnp.where(accepted, depths * (n + 1) + (n - index), -1)
    last = jnp.argmax(score, axis=-1).astype(jnp.int32)
    path = jnp.take_along_axis(mask, last[:, None, None], axis=1)[:, 0]
    bonus = jnp.take_along_axis(prediction, last[:, None], axis=1)[:, 0]
    return last, path, bonus


def emitted_logprobs(logits: jax.Array, tokens: jax.Array, path: jax.Array, depths: jax.Array, last: jax.Array,
                     bonus: jax.Array, width: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``sampling.token_logprobs`` of the tokens a verification emits, from the target's logits at
    the node each was chosen at: the accepted nodes' tokens in depth order, then the bonus token.

    logits [B, N, V]; tokens, depths [B, N]; path [B, N], last, bonus [B] from an ``*_accept``;
    width (static): emitted tokens to cover, at least the deepest path + 1. Returns logprobs
    [B, width], top ids and top logprobs [B, width, K]; a row's entries past its accepted count
    (+ 1 for the bonus) are meaningless. Plain decoding scores each of these tokens from the same
    prefix, so greedy rows get the same values with or without speculation.
    """
    # The path's node at each depth (the root at 0).
    by_depth = jnp.maximum(path_by_depth(path, depths, width + 1), 0)
    accepted = jnp.take_along_axis(depths, last[:, None], axis=1)
    level = jnp.arange(width)
    # Emitted token j is the path's node at depth j + 1, chosen at depth j; the bonus is chosen at ``last``.
    source = jnp.where(level <= accepted, by_depth[:, :width], last[:, None])
    emitted = jnp.where(level < accepted, jnp.take_along_axis(tokens, by_depth[:, 1:], axis=1), bonus[:, None])
    return token_logprobs(jnp.take_along_axis(logits, source[:, :, None], axis=1), emitted)


def mss_accept(target_probs: jax.Array, tokens: jax.Array, mask: jax.Array, canon: jax.Array, parents: jax.Array,
               group: jax.Array, proposed: jax.Array, draft_probs: jax.Array, deterministic: jax.Array,
               keys: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Multi-step speculative sampling over each row's proposals.

    target_probs [B, N, V]: the target's processed distribution at every tree node; tokens [B, N];
    mask [B, N, N] ancestor-or-self of the tree; per proposal (indexed like the nodes, see
    ``merge.MergedTree``): canon [B, N] the node accepting it moves to, parents [B, N] the tree
    node it is a child of, group [B, N] equal for one draft's siblings (tried in index order),
    proposed [B, N] bool, draft_probs [B, N, V] the draft distribution it was drawn from (before
    removing earlier siblings), deterministic [B, N] bool (point-mass proposals, such as a greedy
    draft's); keys [B] typed. (Trees of point masses only are verified by ``match_accept``.)
    Returns (last [B], path [B, N] bool, bonus [B]) like ``greedy_accept``.
    """
    return jax.vmap(_mss_row)(target_probs, tokens, mask, canon, parents, group, proposed, draft_probs,
                              deterministic, keys)


def _normalized(x: jax.Array, fallback: jax.Array) -> jax.Array:
    total = jnp.sum(x)
    return jnp.where(total > 0, x / jnp.where(total > 0, total, 1.0), fallback)


def _mss_row(target_probs, tokens, mask, canon, parents, group, proposed, draft_probs, deterministic, key):
    n, v = target_probs.shape
    index = jnp.arange(n)
    # Children of one node are contiguous in this order, and every node's come after its parent's.
    order = jnp.argsort(jnp.where(proposed, parents * n + index, n * n + index))
    uniforms = jax.random.uniform(jax.random.fold_in(key, 0), (n,))
    vocab = jnp.arange(v)

    def trial(carry, j):
        node, p, q, current_group = carry
        active = proposed[j] & (parents[j] == node)
        # First sibling of its draft here: its distribution afresh.
        q_j = jnp.where(group[j] != current_group, draft_probs[j], q)
        x = tokens[j]
        point = vocab == x
        q_x = jnp.where(deterministic[j], 1.0, q_j[x])
        accept = active & (uniforms[j] * q_x < p[x])
        reject = active & ~accept
        residual = _normalized(jnp.maximum(p - jnp.where(deterministic[j], point, q_j), 0.0), p)
        without_x = _normalized(jnp.where(point, 0.0, q_j), q_j)
        p = jnp.where(accept, target_probs[canon[j]], jnp.where(reject, residual, p))
        q = jnp.where(reject, without_x, q)
        current_group = jnp.where(reject, group[j], jnp.where(accept, -1, current_group))
        return (jnp.where(accept, canon[j], node), p, q, current_group), None

    init = (jnp.int32(0), target_probs[0], jnp.zeros(v, target_probs.dtype), jnp.int32(-1))
    (last, p, _, _), _ = jax.lax.scan(trial, init, order)
    bonus = jax.random.categorical(jax.random.fold_in(key, 1), jnp.log(p)).astype(jnp.int32)
    return last, mask[last], bonus


# ------------------------------------------------------------------ the one verify-and-commit
@pytree_dataclass
class VerifyTree:
    """B token trees of N nodes to verify, and what multi-step speculative sampling needs of the
    proposals behind them (see ``mss_accept``; ``merge.MergedTree`` for draft-model trees).

    tokens, parents, depths [B, N] int32; mask [B, N, N] ancestor-or-self; live [B, N] bool.
    canon, under, group [B, N] int32 and proposed [B, N] bool: the proposals. q_logits
    [B, N, V] the processed draft logits each proposal was drawn from, and samples [B, N] bool
    whether its draft sampled it; both None for host trees, whose proposals are point masses.
    """

    tokens: jax.Array
    parents: jax.Array
    depths: jax.Array
    mask: jax.Array
    live: jax.Array
    canon: jax.Array
    under: jax.Array
    group: jax.Array
    proposed: jax.Array
    q_logits: jax.Array | None = None
    samples: jax.Array | None = None

    @classmethod
    def host(cls, tokens, parents, depths, mask, live) -> "VerifyTree":
        """Trees proposed on the host: each node its own proposal, siblings share their parent's group."""
        b, n = tokens.shape
        index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
        return cls(tokens=tokens, parents=parents, depths=depths, mask=mask, live=live, canon=index,
                   under=parents, group=parents, proposed=live & (index > 0))


@pytree_dataclass
class VerifyResult:
    """tokens [B, W]: the accepted tokens then the bonus token, ``count`` [B] of them valid;
    accepted [B]; last [B] the deepest accepted node; path [B, N] the root and accepted nodes;
    path_nodes [B, W] the accepted node at depth 1, 2, ... (-1 past the path's end); logprobs
    None or ``emitted_logprobs`` of ``tokens``."""

    tokens: jax.Array
    count: jax.Array
    accepted: jax.Array
    last: jax.Array
    path: jax.Array
    path_nodes: jax.Array
    logprobs: tuple | None = None


def verify_and_commit(logits: jax.Array, new_k: jax.Array, new_v: jax.Array, cache: KVCache, tree: VerifyTree,
                      slots_by_depth: jax.Array, active: jax.Array, temperature: jax.Array, top_k: jax.Array,
                      top_p: jax.Array, keys: jax.Array, *, all_greedy: bool, logprobs, width: int,
                      node_keys: jax.Array | None = None, plain_draws: jax.Array | None = None
                      ) -> tuple[VerifyResult, KVCache]:
    """Accept the longest path each row's target agrees with, and write its K/V to the cache.

    Every token tree goes through here, host-proposed or drafted on the device, greedy or sampled.
    logits [B, N, V] and new_k/new_v [L, B, N, Hkv, hd]: the target's pass over the trees;
    slots_by_depth [B, W]: the cache slot of each depth's position (root first); active [B]: rows
    to verify (others write nothing); sampling settings [B] and this step's keys [B] (typed), for
    multi-step speculative sampling. Trees of point-mass proposals (``q_logits`` None) are sampled
    and matched instead, and need ``node_keys`` [B, N]: the key of the token drawn after each
    node (of position root + depth + 1 in the request). plain_draws [B] bool (with ``node_keys``):
    rows of a drafted tree verified by sampling and matching all the same, so that their tokens are
    plain sampling's own for their seed (the rest by multi-step speculative sampling, which accepts
    more of a sampled draft). all_greedy (static): every row is greedy,
    so no sampling work is compiled. logprobs: a static
    bool, or a traced one (one executable with and without scoring). width (static): emitted
    tokens to cover, at least the deepest path + 1.
    """
    b, n = tree.tokens.shape
    sampled = active & (temperature > 0)

    def greedy():
        return greedy_accept(logits, tree.tokens, tree.parents, tree.depths, tree.mask, tree.live)

    def matched():
        if node_keys is None:
            raise ValueError("rows verified by sampling and matching (point-mass trees, plain_draws) need node_keys")
        return match_accept(node_samples(logits, node_keys, temperature, top_k, top_p), tree.tokens,
                            tree.parents, tree.depths, tree.mask, tree.live)

    def stochastic():
        if tree.q_logits is None:
            return matched()
        target_probs = jax.nn.softmax(process_node_logits(logits, temperature, top_k, top_p), axis=-1)
        draft_probs = jax.nn.softmax(jnp.where(tree.proposed[:, :, None], tree.q_logits, 0.0), axis=-1)
        deterministic = ~(sampled[:, None] & tree.samples)
        mss = mss_accept(target_probs, tree.tokens, tree.mask, tree.canon, tree.under, tree.group, tree.proposed,
                         draft_probs, deterministic, jax.vmap(jax.random.fold_in, (0, None))(keys, 1))
        if plain_draws is None:
            return mss
        plain = plain_draws & sampled

        def per_row():
            return tuple(jnp.where(plain.reshape((b,) + (1,) * (m.ndim - 1)), m, x) for m, x in zip(matched(), mss))

        return jax.lax.cond(jnp.any(plain), per_row, lambda: mss)

    def scored(accept):
        last, path, bonus = accept()
        return last, path, bonus, *emitted_logprobs(logits, tree.tokens, path, tree.depths, last, bonus, width)

    if isinstance(logprobs, bool):
        last, path, bonus = greedy() if all_greedy else jax.lax.cond(jnp.any(sampled), stochastic, greedy)
        scores = emitted_logprobs(logits, tree.tokens, path, tree.depths, last, bonus, width) if logprobs else None
    else:
        # One switch (a GPU conditional waits on the host once): accept greedily unless a row
        # samples, and score the emitted tokens only when a row asked for logprobs.
        branches = [lambda: (*greedy(), *no_logprobs((b, width))), lambda: (*stochastic(), *no_logprobs((b, width))),
                    lambda: scored(greedy), lambda: scored(stochastic)]
        sampling_branch = jnp.int32(0) if all_greedy else jnp.any(sampled).astype(jnp.int32)
        last, path, bonus, *scores = jax.lax.switch(2 * logprobs.astype(jnp.int32) + sampling_branch, branches)
        scores = tuple(scores)

    accepted = jnp.take_along_axis(tree.depths, last[:, None], 1)[:, 0]
    path_nodes = path_by_depth(path, tree.depths, width + 1)[:, 1:]
    tokens = jnp.where(jnp.arange(width) < accepted[:, None],
                       jnp.take_along_axis(tree.tokens, jnp.maximum(path_nodes, 0), 1), 0)
    tokens = tokens.at[jnp.arange(b), accepted].set(bonus)
    # The accepted node at depth d lands at position root + d; everything else is dropped.
    slots = jnp.where(path & active[:, None], jnp.take_along_axis(slots_by_depth, tree.depths, axis=1), INVALID_SLOT)
    cache = write_kv(cache, new_k, new_v, slots)
    return VerifyResult(tokens=tokens, count=accepted + 1, accepted=accepted, last=last, path=path,
                        path_nodes=path_nodes, logprobs=scores), cache


def path_by_depth(path: jax.Array, depths: jax.Array, width: int) -> jax.Array:
    """[B, width] int32: the accepted path's node at each depth (the root at 0), -1 past its end
    (or past ``width``)."""
    b, n = path.shape
    return jnp.full((b, width), -1, jnp.int32).at[jnp.arange(b)[:, None], jnp.where(path, depths, width)].set(
        jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)), mode="drop")
