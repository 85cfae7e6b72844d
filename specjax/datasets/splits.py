"""The one train / held-out split that training data and benchmark workloads both obey.

A record is held out by a stable hash of (source, key), never by position, so the split does not
move when a corpus grows or is read in another order. Benchmark workloads draw only from held-out
records; training text only from the rest; tests check the two never meet.
"""

from __future__ import annotations

import hashlib

HELDOUT_FRACTION = 0.1


def is_heldout(source: str, key: str) -> bool:
    """Whether record ``key`` of corpus ``source`` ("sharegpt", "stdlib", ...) is reserved for evaluation."""
    digest = hashlib.sha256(f"{source}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < HELDOUT_FRACTION
