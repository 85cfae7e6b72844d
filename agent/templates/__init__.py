"""Parameterised Pallas kernels the offline ``search`` proposer renders and the harness judges.

A template is a kernel's source with ``${name}`` holes for its tuning knobs (block sizes, Triton's
``num_warps`` and ``num_stages``) and the values each knob may take; every rendered source is an
ordinary candidate, checked like any other (the templates get no trust the harness does not give).
"""

from __future__ import annotations

import dataclasses
import itertools
import string

from agent.templates import int8_matmul, rmsnorm_rope


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


TEMPLATES = {t.task: t for t in (KernelTemplate("rmsnorm_rope", rmsnorm_rope.SOURCE, rmsnorm_rope.SPACE),
                                 KernelTemplate("int8_weight_only_matmul", int8_matmul.SOURCE, int8_matmul.SPACE))}


def get(task: str) -> KernelTemplate:
    if task not in TEMPLATES:
        raise KeyError(f"no kernel template for task {task!r}; the search proposer knows: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[task]
