"""The request every workload yields, and the helpers the generators share.

A workload is a deterministic function ``(n, seed) -> list[Request]``: the same seed gives the same
list byte for byte (on the same Python: the ``code`` and ``agentic-edit`` workloads read the running
interpreter's standard library), a different seed a different sample, and a smaller ``n`` a prefix
of a larger one. Randomness comes only from ``random.Random`` seeded with strings (hashed with
SHA-512 by Python, so independent of ``PYTHONHASHSEED``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Request:
    """One request for the instruct model.

    ``messages``: the chat (``[{"role": "system"|"user"|"assistant", "content": str}, ...]``) to send
    through the model's chat template. Requests of one ``session`` are related (the same file edited
    again, the same user calling tools again) and are meant to be run in order of ``turn`` (0, 1, ...);
    single-turn requests are their own session. ``reference``: the expected answer where one exists
    (the edited file, the JSON tool call, the stdlib implementation, the original assistant reply).
    ``max_tokens``: a suggested output budget. ``meta``: facts about how the request was built (its
    source record, the edit applied, the tool expected); treat it as read-only.
    """

    id: str
    workload: str
    messages: list[dict[str, str]]
    session: str
    turn: int = 0
    reference: str | None = None
    max_tokens: int = 256
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The last user message (what this turn asks)."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


def rng_for(*parts: object) -> random.Random:
    """A generator seeded by ``parts`` joined into one string: stable across runs and processes."""
    return random.Random(":".join(str(p) for p in parts))


def take(requests, n: int | None) -> list[Request]:
    """The first ``n`` requests (all when ``n`` is None); a session cut at the end keeps its first turns."""
    out = []
    for request in requests:
        if n is not None and len(out) >= n:
            break
        out.append(request)
    return out


def token_budget(text: str, chars_per_token: float, slack: int) -> int:
    """A ``max_tokens`` suggestion that fits ``text``: SmolLM2's tokenizer gives about 4 characters per
    token on Python source (down to 2.2 on dense lines) and 2.3-2.6 on our JSON tool calls."""
    return int(len(text) / chars_per_token) + slack
