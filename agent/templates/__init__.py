"""Parameterised Pallas kernels the offline ``search`` proposer renders and the harness judges.

A template is a kernel's source with ``${name}`` holes for its tuning knobs (tile sizes, Triton's
``num_warps`` and ``num_stages``) and the values each knob may take, the first of each being the
default; every rendered source is an ordinary candidate, checked like any other (the templates get no
trust the harness does not give). A template module holds ``SOURCES`` and ``SPACES`` (task -> source, knobs):
one kernel family can serve several tasks with the same knobs.
"""

from __future__ import annotations

import dataclasses
import itertools
import string

from agent.templates import grouped_lora, linear_scan, moe, multimodal, quantized, rmsnorm_rope, state_decode


@dataclasses.dataclass(frozen=True)
class KernelTemplate:
    task: str
    source: str
    space: dict[str, tuple]

    def render(self, params: dict) -> str:
        return string.Template(self.source).substitute(params)

    def grid(self, space: dict[str, tuple] | None = None) -> list[dict]:
        """Every combination of knob values in ``space`` (default: the template's own), in a fixed order."""
        space = space or self.space
        return [dict(zip(space, values)) for values in itertools.product(*space.values())]

    @property
    def default(self) -> dict:
        """The first value of every knob: a configuration meant to work everywhere, if not the fastest."""
        return {name: values[0] for name, values in self.space.items()}


TEMPLATES = {task: KernelTemplate(task, source, module.SPACES[task])
             for module in (rmsnorm_rope, quantized, state_decode, grouped_lora, moe, multimodal, linear_scan)
             for task, source in module.SOURCES.items()}


def get(task: str) -> KernelTemplate:
    if task not in TEMPLATES:
        raise KeyError(f"no kernel template for task {task!r}; the search proposer knows: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[task]
