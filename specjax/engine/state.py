"""An engine's device state as one pytree, and the cell on the host that holds its latest value.

``ModelState`` is one model's share: weights, paged KV cache, and room for LoRA adapters served
over the weights. ``DeviceState`` holds the target's and each draft model's; finetuning jobs'
states sit beside it in the cell. Step functions (``engine.step``) are pure,
``(state, batch) -> (state, outputs)``; they are compiled donating the KV caches only. Weights
pass through: donating them would free arrays a ``LoadedModel`` shares with every engine built
from it.

The host keeps one ``DeviceStateCell`` per engine. A runner reads its model's part of the state
from the cell, runs a step, and puts the returned state back; a draft model's runner is a view onto
its slot of the same cell, so one fused step can take and return every cache at once.
"""

from __future__ import annotations

from typing import Any

import jax

from specjax.kv_cache import KVCache
from specjax.params import Params
from specjax.pytree import pytree_dataclass


@pytree_dataclass
class ModelState:
    """One model's device state.

    vocab_maps: for a draft model, its (draft_to_target [N], target_to_draft [V]) int32 id maps to
    the target's vocabulary; None for the target. adapters: LoRA adapters over ``params`` (none yet).
    """

    params: Params
    cache: KVCache
    vocab_maps: tuple[jax.Array, jax.Array] | None = None
    adapters: Any = None

    def caches(self) -> KVCache:
        """What a step donates: the KV cache."""
        return self.cache

    def without_caches(self) -> "ModelState":
        """What a step keeps: everything but the KV cache."""
        return self.replace(cache=None)

    def with_caches(self, caches: KVCache) -> "ModelState":
        return self.replace(cache=caches)


@pytree_dataclass
class DeviceState:
    """The target's state and each draft model's (in the order a tree proposer drafts with them)."""

    target: ModelState
    drafts: tuple[ModelState, ...] = ()

    def caches(self) -> tuple[KVCache, tuple[KVCache, ...]]:
        """What a step donates: the target's KV cache and each draft's."""
        return self.target.cache, tuple(d.cache for d in self.drafts)

    def without_caches(self) -> "DeviceState":
        return self.replace(target=self.target.without_caches(), drafts=tuple(d.without_caches() for d in self.drafts))

    def with_caches(self, caches: tuple[KVCache, tuple[KVCache, ...]]) -> "DeviceState":
        target, drafts = caches
        if len(drafts) != len(self.drafts):
            raise ValueError(f"{len(drafts)} draft caches for {len(self.drafts)} drafts")
        return self.replace(target=self.target.with_caches(target),
                            drafts=tuple(d.with_caches(c) for d, c in zip(self.drafts, drafts)))


TARGET = None  # the target's slot in a DeviceStateCell; a draft's slot is its index


class DeviceStateCell:
    """Holds an engine's current ``DeviceState``; each step replaces it with the state it returns."""

    def __init__(self, state: DeviceState):
        self.state = state
        # Finetuning jobs' device states by job id: (``JobState``, ``SequenceState``) of
        # ``engine.finetuning``. Apart from ``state``: the fused draft steps take the whole
        # ``DeviceState``, and must not compile again whenever a job starts or ends.
        self.jobs: dict[str, tuple[Any, Any]] = {}

    def model(self, slot: int | None) -> ModelState:
        """The target's state (``slot`` ``TARGET``) or draft ``slot``'s."""
        return self.state.target if slot is TARGET else self.state.drafts[slot]

    def set_model(self, slot: int | None, model: ModelState) -> None:
        if slot is TARGET:
            self.state = self.state.replace(target=model)
        else:
            drafts = list(self.state.drafts)
            drafts[slot] = model
            self.state = self.state.replace(drafts=tuple(drafts))

    def add_draft(self, model: ModelState) -> int:
        """Give a draft model a slot; returns it. Drafts join before any step is compiled over
        them: a step over the whole state compiles for the drafts it was lowered with."""
        self.state = self.state.replace(drafts=self.state.drafts + (model,))
        return len(self.state.drafts) - 1
