"""Logical axis names of every parameter and cache leaf, and the rules that place them on a mesh.

One table (``LOGICAL_AXES``) names each leaf's axes by what they mean (``embed``, ``q_heads``,
``mlp``, ``kv_heads``); a ``ShardingRules`` maps those names to mesh axes. The model code is the
same on one device or many: only the mesh and the rules change. The fused q/k/v and gate/up
matrices are laid out so that equal column blocks are whole KV-head groups and whole gate/up
pairs (``params.fuse_qkv``, ``params.fuse_gate_up``), so they shard as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Each leaf by its path (pytree field names joined by "/"); weight types (``linear.Bf16Bits``)
# carry their matrix's axes down to their own arrays.
LOGICAL_AXES: dict[str, tuple[str | None, ...]] = {
    # Params
    "embed": ("vocab", "embed"),
    "final_norm": ("embed",),
    "lm_head": ("embed", "vocab"),
    "layers/attn_norm": ("layers", "embed"),
    "layers/wqkv": ("layers", "embed", "qkv_groups"),  # columns: per KV head, its q heads, k and v
    "layers/bqkv": ("layers", "qkv_groups"),
    "layers/wo": ("layers", "q_heads", "embed"),
    "layers/bo": ("layers", "embed"),
    "layers/mlp_norm": ("layers", "embed"),
    "layers/w_gate_up": ("layers", "embed", "mlp_pairs"),  # columns: gate and up of each MLP column
    "layers/w_down": ("layers", "mlp", "embed"),
    # KVCache: [L, pages, page_size, Hkv, hd]
    "k": ("layers", "pages", "page", "kv_heads", "head_dim"),
    "v": ("layers", "pages", "page", "kv_heads", "head_dim"),
}


@dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis (absent: replicated), e.g. ``ShardingRules({"q_heads": "model"})``."""

    mapping: tuple[tuple[str, str | None], ...] = ()

    def __init__(self, mapping: dict[str, str | None] | tuple = ()):
        object.__setattr__(self, "mapping", tuple(sorted(dict(mapping).items())))

    def spec(self, axes: tuple[str | None, ...]) -> PartitionSpec:
        rules = dict(self.mapping)
        return PartitionSpec(*(rules.get(a) if a is not None else None for a in axes))


#: Megatron-style tensor parallelism over a mesh axis "model": attention heads (q/k/v by KV-head
#: group, o_proj's rows) and MLP columns (gate/up pairs, down_proj's rows) split, the KV cache by
#: KV head; everything else replicated.
TENSOR_PARALLEL = ShardingRules({"qkv_groups": "model", "q_heads": "model", "mlp_pairs": "model", "mlp": "model",
                                 "kv_heads": "model"})


def leaf_axes(path: tuple) -> tuple[str | None, ...]:
    """The logical axes of the leaf at a key path (``jax.tree_util`` keys)."""
    names = [getattr(k, "name", getattr(k, "key", None)) for k in path]
    for end in range(len(names), 0, -1):  # a weight type's arrays sit below their matrix's entry
        key = "/".join(str(n) for n in names[:end])
        if key in LOGICAL_AXES:
            return LOGICAL_AXES[key]
    raise KeyError(f"no logical axes for leaf {'/'.join(map(str, names))}: add it to sharding.LOGICAL_AXES")


def logical_axes(tree: Any) -> Any:
    """The tree (Params, KVCache) with each leaf replaced by its logical axes."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: leaf_axes(path), tree)


def shardings(tree: Any, mesh: Mesh, rules: ShardingRules) -> Any:
    """A ``NamedSharding`` per leaf of ``tree`` (arrays or ``ShapeDtypeStruct``s)."""
    def place(path, leaf):
        axes = leaf_axes(path)
        if len(axes) != len(leaf.shape):
            raise ValueError(f"leaf {jax.tree_util.keystr(path)} has {len(leaf.shape)} axes, the table names "
                             f"{len(axes)}: {axes}")
        return NamedSharding(mesh, rules.spec(axes))
    return jax.tree_util.tree_map_with_path(place, tree)


def place(tree: Any, mesh: Mesh, rules: ShardingRules) -> Any:
    """``tree``'s arrays on ``mesh`` as ``rules`` say."""
    return jax.device_put(tree, shardings(tree, mesh, rules))
