"""The ``chat`` workload: first user turns of held-out ShareGPT conversations (``specjax.datasets.sharegpt``)."""

from __future__ import annotations

import functools
import hashlib
import os

from benchmarks.workloads.base import Request, rng_for, take
from specjax.datasets.sharegpt import SOURCE, conversation_key, looks_english, sharegpt_records
from specjax.datasets.splits import is_heldout


def _fingerprint(text: str) -> bytes:
    """Text compared up to case and whitespace."""
    return hashlib.sha1(" ".join(text.split()).lower().encode()).digest()


@functools.lru_cache(maxsize=4)
def chat_pool(path: str | None = None) -> tuple[tuple[str, str, str | None], ...]:
    """Every candidate chat prompt, in file order: ``(conversation_id, prompt, first reply or None)``.

    A candidate is the first user turn of a held-out conversation's first chunk (``…_0``), 20-2000
    characters, English-looking, not seen before, and not also a user turn of any training
    conversation (ShareGPT repeats popular prompts under different ids).
    """
    training_turns: set[bytes] = set()
    candidates = []
    for conversation_id, messages in sharegpt_records(None, path):
        if not is_heldout(SOURCE, conversation_key(conversation_id)):
            training_turns.update(_fingerprint(m["content"]) for m in messages if m["role"] == "user")
            continue
        if not conversation_id.endswith("_0"):
            continue
        first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first is None:
            continue
        prompt = messages[first]["content"].strip()
        if not 20 <= len(prompt) <= 2000 or not looks_english(prompt):
            continue
        after = messages[first + 1] if first + 1 < len(messages) else None
        reply = after["content"] if after is not None and after["role"] == "assistant" else None
        candidates.append((conversation_id, prompt, reply))
    pool, seen = [], set()
    for conversation_id, prompt, reply in candidates:
        key = _fingerprint(prompt)
        if key in seen or key in training_turns:
            continue
        seen.add(key)
        pool.append((conversation_id, prompt, reply))
    return tuple(pool)


def chat_workload(n: int | None = 200, seed: int = 0, path: str | os.PathLike | None = None) -> list[Request]:
    """``n`` single-turn prompts drawn from :func:`chat_pool` in an order shuffled by ``seed``."""
    pool = list(chat_pool(os.fspath(path) if path is not None else None))
    rng_for("chat", seed).shuffle(pool)
    requests = (
        Request(id=f"chat/{conversation_id}", workload="chat", messages=[{"role": "user", "content": prompt}],
                session=f"chat/{conversation_id}", turn=0, reference=reply, max_tokens=256,
                meta={"source": SOURCE, "conversation_id": conversation_id})
        for conversation_id, prompt, reply in pool)
    return take(requests, n)
