"""Token trees in static-shaped arrays.

A tree for one sequence holds up to N nodes (N bucketed to a power of two up to 128: on a CPU
each padded node costs verification time, so small trees get small buckets). Node 0 is the root:
the sequence's last token, already chosen but not yet run through the target, so the target's
logits at the root score the first speculated level. Every other node is a speculated token whose
parent has a smaller index (nodes are in topological order, e.g. by depth). Padding nodes past
``num_nodes`` have parent -1 and are invisible.

Arrays per tree: tokens [N] int32, parents [N] int32 (-1 for the root and padding), depths [N]
int32 (root 0). The visibility mask ``ancestor_mask`` [N, N] says which nodes each node sees (its
ancestors and itself); together with the committed prefix it is the attention mask of verification.

On the device, trees drafted inside a jitted step keep their static size and mark nodes with a
``live`` [B, N] flag instead (a node whose parent is dead is dead; dead nodes are padding wherever
they sit); ``device_ancestor_mask`` builds their masks, ``TokenTree.from_arrays`` reads one back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

TREE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


def tree_bucket(num_nodes: int) -> int:
    """The smallest static tree size that holds ``num_nodes`` nodes."""
    for size in TREE_SIZES:
        if num_nodes <= size:
            return size
    raise ValueError(f"a token tree holds at most {TREE_SIZES[-1]} nodes, got {num_nodes}")


class TreeError(ValueError):
    """A malformed token tree."""


@dataclass(frozen=True)
class TokenTree:
    """One sequence's token tree (host-side numpy; stacked into [B, N] arrays for a step)."""

    tokens: np.ndarray  # [N] int32
    parents: np.ndarray  # [N] int32
    num_nodes: int

    @classmethod
    def build(cls, root_token: int, tokens: Sequence[int], parents: Sequence[int], size: int | None = None
              ) -> "TokenTree":
        """A tree from speculated ``tokens`` whose ``parents`` index into the full node list
        (0 = the root, i + 1 = the i-th speculated token)."""
        if len(tokens) != len(parents):
            raise TreeError(f"{len(tokens)} tokens but {len(parents)} parents")
        n = len(tokens) + 1
        size = size or tree_bucket(n)
        if n > size:
            raise TreeError(f"{n} nodes do not fit a tree of size {size}")
        all_tokens = np.zeros(size, np.int32)
        all_parents = np.full(size, -1, np.int32)
        all_tokens[0] = root_token
        all_tokens[1:n] = tokens
        all_parents[1:n] = parents
        tree = cls(tokens=all_tokens, parents=all_parents, num_nodes=n)
        tree.validate()
        return tree

    @classmethod
    def from_arrays(cls, tokens, parents, live) -> "TokenTree":
        """One device tree ([N] tokens, parents, live; dead nodes anywhere) as a compact TokenTree."""
        tokens, parents, live = np.asarray(tokens), np.asarray(parents), np.asarray(live, bool)
        kept = np.flatnonzero(live)
        if kept.size == 0 or kept[0] != 0:
            raise TreeError("a device tree needs a live root at node 0")
        index = np.full(len(tokens), -1)
        index[kept] = np.arange(kept.size)
        new_parents = index[parents[kept[1:]]]
        if np.any(parents[kept[1:]] < 0) or np.any(new_parents < 0):
            raise TreeError("a live node has a dead or missing parent")
        return cls.build(int(tokens[0]), tokens[kept[1:]].tolist(), new_parents.tolist())

    @classmethod
    def chain(cls, root_token: int, tokens: Sequence[int], size: int | None = None) -> "TokenTree":
        """A chain: each speculated token the child of the one before."""
        return cls.build(root_token, tokens, list(range(len(tokens))), size)

    @property
    def size(self) -> int:
        return len(self.tokens)

    def validate(self) -> None:
        n, parents = self.num_nodes, self.parents
        if not 1 <= n <= self.size:
            raise TreeError(f"num_nodes {n} outside [1, {self.size}]")
        if parents[0] != -1:
            raise TreeError("node 0 is the root and has no parent")
        body = parents[1:n]
        if np.any(body < 0) or np.any(body >= np.arange(1, n)):
            bad = int(np.nonzero((body < 0) | (body >= np.arange(1, n)))[0][0]) + 1
            raise TreeError(f"node {bad} has parent {parents[bad]}: parents must come before their children")
        if np.any(parents[n:] != -1):
            raise TreeError("padding nodes must have parent -1")

    @property
    def depths(self) -> np.ndarray:
        """[N] int32: root 0, speculated nodes >= 1, padding 0."""
        depths = np.zeros(self.size, np.int32)
        for i in range(1, self.num_nodes):
            depths[i] = depths[self.parents[i]] + 1
        return depths

    @property
    def ancestor_mask(self) -> np.ndarray:
        """[N, N] bool: mask[i, j] iff node j is node i or one of its ancestors (padding rows see
        only themselves, so their attention stays finite)."""
        mask = np.eye(self.size, dtype=bool)
        for i in range(1, self.num_nodes):
            mask[i] |= mask[self.parents[i]]
        return mask

    def children(self, node: int) -> list[int]:
        return [i for i in range(1, self.num_nodes) if self.parents[i] == node]

    def paths(self) -> list[list[int]]:
        """Every root-to-leaf token sequence (speculated tokens only), in node order."""
        leaves = [i for i in range(self.num_nodes) if not self.children(i)]
        out = []
        for leaf in leaves:
            path, node = [], leaf
            while node > 0:
                path.append(int(self.tokens[node]))
                node = int(self.parents[node])
            out.append(path[::-1])
        return out

    def pretty(self, decode=None) -> str:
        """An indented rendering, one node per line: ``[index] token``."""
        show = (lambda t: repr(decode([t]))) if decode else str
        lines = []

        def walk(node: int, indent: int) -> None:
            lines.append(f"{'  ' * indent}[{node}] {show(int(self.tokens[node]))}")
            for child in self.children(node):
                walk(child, indent + 1)

        walk(0, 0)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"TokenTree(nodes={self.num_nodes}/{self.size}, depth={int(self.depths.max())}, "
                f"paths={len(self.paths())})")


def device_ancestor_mask(parents: jax.Array, live: jax.Array, max_depth: int) -> jax.Array:
    """[B, N, N] bool ancestor-or-self masks of device trees (parents, live [B, N]; no node deeper
    than ``max_depth``). Dead rows see only themselves, like padding."""
    n = parents.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(n, dtype=bool), parents.shape + (n,))
    has_parent = (live & (parents >= 0))[..., None]
    parent_rows = jnp.clip(parents, 0, n - 1)[..., None]

    def extend(_, mask):  # each pass adds one more generation of ancestors
        return eye | (has_parent & jnp.take_along_axis(mask, parent_rows, axis=-2))

    return jax.lax.fori_loop(0, max_depth, extend, eye)


def stack_trees(trees: Sequence[TokenTree]) -> dict[str, np.ndarray]:
    """[B, N] tokens, parents, depths, live flags and [B, N, N] masks of same-size trees, for a
    verification step."""
    sizes = {t.size for t in trees}
    if len(sizes) != 1:
        raise TreeError(f"trees in one step must share a size, got {sorted(sizes)}")
    return {
        "tokens": np.stack([t.tokens for t in trees]),
        "parents": np.stack([t.parents for t in trees]),
        "depths": np.stack([t.depths for t in trees]),
        "mask": np.stack([t.ancestor_mask for t in trees]),
        "live": np.stack([np.arange(t.size) < t.num_nodes for t in trees]),
    }
