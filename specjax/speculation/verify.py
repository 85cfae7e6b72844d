"""Verification of token trees against the target's logits.

Greedy: the accepted path follows, from the root, the child whose token is the target's argmax at
its parent; the target's argmax at the last accepted node is the bonus token. The output is the
target's greedy decoding token for token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def greedy_accept(logits: jax.Array, tokens: jax.Array, parents: jax.Array, depths: jax.Array,
                  mask: jax.Array, num_nodes: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Longest accepted path of each tree.

    logits [B, N, V] (the target's, at every node); tokens, parents, depths [B, N] int32;
    mask [B, N, N] ancestor-or-self; num_nodes [B]. Returns (last [B] int32: deepest accepted node,
    path [B, N] bool: the root and accepted nodes, bonus [B] int32: the target's token after ``last``).
    """
    n = tokens.shape[1]
    index = jnp.arange(n)
    prediction = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, N]
    parent_prediction = jnp.take_along_axis(prediction, jnp.maximum(parents, 0), axis=1)
    ok = ((tokens == parent_prediction) | (index == 0)) & (index < num_nodes[:, None])
    accepted = ~jnp.any(mask & ~ok[:, None, :], axis=-1)  # every ancestor-or-self matched
    # Deepest accepted node; among equals (duplicate siblings) the lowest index.
    score = jnp.where(accepted, depths * (n + 1) + (n - index), -1)
    last = jnp.argmax(score, axis=-1).astype(jnp.int32)
    path = jnp.take_along_axis(mask, last[:, None, None], axis=1)[:, 0]
    bonus = jnp.take_along_axis(prediction, last[:, None], axis=1)[:, 0]
    return last, path, bonus
