"""The LoRA adapters an engine serves: their names, their host copies and the device slots.

Adapters are added by name, from a PEFT directory or as a ``LoraAdapter``. Requests name the
adapter they run with; from admission until it leaves the batch (finished, preempted, aborted) a
request holds its adapter's device slot (``LoraSlots``: ``EngineConfig.max_loras`` of them, all
of rank ``max_lora_rank``), so a batch mixes any adapters that fit in the slots, and rows without
one use slot 0 (zeros). An adapter no running request holds keeps its slot until another adapter
needs it (least recently used first), so repeated requests do not copy it again. Host copies of
adapters read from files are kept up to ``max_cpu_loras`` (least recently used ones are read
again when needed); adapters handed over in Python stay in host memory.

All methods run on the engine's thread, except ``add``, which reads and checks the adapter on
the caller's thread (a slow disk does not stall a step) and registers it under a lock.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import jax

from specjax.config import ModelConfig
from specjax.engine.state import TARGET
from specjax.lora import AdapterError, LoraAdapter, check_adapter, load_peft, write_slot


class AdapterInUse(AdapterError):
    """The adapter cannot be removed: running requests use it."""


class AdapterManager:
    """Adapter names -> device slots of one engine's target (``runner.cell``'s adapter slots)."""

    def __init__(self, runner, model: ModelConfig):
        engine = runner.engine
        if not engine.max_loras:
            raise AdapterError("this engine has no adapter slots: set EngineConfig.max_loras (--max-loras)")
        self.runner, self.model = runner, model
        self.max_rank, self.max_cpu = engine.max_lora_rank, engine.max_cpu_loras
        self._lock = threading.Lock()
        self._sources: dict[str, Path | LoraAdapter] = {}
        self._host: OrderedDict[str, LoraAdapter] = OrderedDict()  # read from files, most recent last
        self._slot: dict[str, int] = {}
        self._owner: list[str | None] = [None] * (engine.max_loras + 1)  # slot 0: no adapter, never given
        self._users = [0] * (engine.max_loras + 1)
        self._free_order: OrderedDict[int, None] = OrderedDict((s, None) for s in range(1, engine.max_loras + 1))
        self._write = jax.jit(write_slot, static_argnames=("model",), donate_argnums=(0,))

    # -- names ----------------------------------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return list(self._sources)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._sources

    def check(self, adapter: LoraAdapter) -> None:
        """Refuse an adapter the slots cannot hold."""
        check_adapter(adapter, self.model)
        if adapter.config.r > self.max_rank:
            raise AdapterError(f"adapter rank {adapter.config.r} exceeds max_lora_rank {self.max_rank} "
                               "(--max-lora-rank)")

    def add(self, name: str, source: str | os.PathLike | LoraAdapter) -> None:
        """Serve ``source`` (a PEFT directory or a LoraAdapter) as ``name``."""
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise AdapterError(f"an adapter name must be a non-empty string without surrounding spaces, got {name!r}")
        adapter = source if isinstance(source, LoraAdapter) else load_peft(source, self.model)
        self.check(adapter)
        with self._lock:
            if name in self._sources:
                raise AdapterError(f"an adapter named {name!r} is already loaded")
            self._sources[name] = adapter if isinstance(source, LoraAdapter) else Path(source)
            if not isinstance(source, LoraAdapter):
                self._keep(name, adapter)

    def remove(self, name: str) -> None:
        """Stop serving ``name``; ``AdapterInUse`` while a running request holds it (the caller
        checks the waiting ones: they fail at admission if it is gone)."""
        with self._lock:
            if name not in self._sources:
                raise AdapterError(f"no adapter named {name!r} is loaded")
            slot = self._slot.get(name)
            if slot is not None and self._users[slot]:
                raise AdapterInUse(f"adapter {name!r} is in use by {self._users[slot]} running request(s)")
            del self._sources[name]
            self._host.pop(name, None)
            if slot is not None:  # stale factors stay in the slot until the next adapter overwrites them
                del self._slot[name]
                self._owner[slot] = None
                self._free_order.move_to_end(slot, last=False)

    def _keep(self, name: str, adapter: LoraAdapter) -> None:
        self._host[name] = adapter
        self._host.move_to_end(name)
        while self.max_cpu is not None and len(self._host) > self.max_cpu:
            self._host.popitem(last=False)

    def _host_copy(self, name: str) -> LoraAdapter:
        source = self._sources[name]
        if isinstance(source, LoraAdapter):
            return source
        if name in self._host:
            self._host.move_to_end(name)
            return self._host[name]
        adapter = load_peft(source, self.model)  # dropped from host memory: read again
        self.check(adapter)
        self._keep(name, adapter)
        return adapter

    # -- slots (the engine thread) -------------------------------------------------------------
    def can_acquire(self, name: str) -> bool:
        """Whether a request for ``name`` could take a slot now (an unknown name: yes, and
        ``acquire`` says why not)."""
        with self._lock:
            return name not in self._sources or name in self._slot or bool(self._free_order)

    def acquire(self, name: str) -> int:
        """The slot holding ``name`` for one more running request, copying it to the device first
        if it is not there."""
        with self._lock:
            if name not in self._sources:
                raise AdapterError(f"adapter {name!r} is not loaded (it was unloaded after the request arrived)")
            slot = self._slot.get(name)
            if slot is None:
                if not self._free_order:
                    raise AdapterError(f"all {len(self._owner) - 1} adapter slots are in use")
                slot = next(iter(self._free_order))
                adapter = self._host_copy(name)
                cell = self.runner.cell
                target = cell.model(TARGET)
                cell.set_model(TARGET, target.replace(adapters=self._write(target.adapters, slot, adapter,
                                                                            model=self.model)))
                if (old := self._owner[slot]) is not None:
                    del self._slot[old]
                self._owner[slot], self._slot[name] = name, slot
            if self._users[slot] == 0:
                self._free_order.pop(slot, None)
            self._users[slot] += 1
            return slot

    def release(self, slot: int) -> None:
        """A running request holding ``slot`` left the batch."""
        if slot == 0:
            return
        with self._lock:
            self._users[slot] -= 1
            if self._users[slot] == 0:
                self._free_order[slot] = None  # most recently used last: evicted last

