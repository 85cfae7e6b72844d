"""Prompt-lookup speculation (vLLM's "ngram" method): no model and no cache beyond the request.

The request's last n tokens are looked up earlier in its own prompt and output; the tokens that
followed their latest earlier occurrence are proposed as a chain. Longer n-grams are tried first.
It costs nothing on the device and pays where outputs copy their input (edits, extraction, code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from specjax.speculation.proposer import DraftBatch, DraftTree, ProposalRow, Proposer, register
from specjax.speculation.tree import TREE_SIZES, tree_bucket


@dataclass(frozen=True)
class NgramSpeculation:
    """num_speculative_tokens: the chain's length at most; n-grams of ``max_ngram`` down to
    ``min_ngram`` tokens are looked up. ``match_prob``: the estimated chance that each proposed
    token is accepted given its predecessors were (what a batch-aware budget weighs a chain by,
    before the request's own record corrects it)."""

    method: ClassVar[str] = "ngram"

    num_speculative_tokens: int = 8
    min_ngram: int = 1
    max_ngram: int = 4
    match_prob: float = 0.5

    def __post_init__(self):
        if not isinstance(self.num_speculative_tokens, int) or not 1 <= self.num_speculative_tokens < TREE_SIZES[-1]:
            raise ValueError(f"num_speculative_tokens must be an integer in [1, {TREE_SIZES[-1] - 1}], "
                             f"got {self.num_speculative_tokens!r}")
        if not (isinstance(self.min_ngram, int) and isinstance(self.max_ngram, int) and 1 <= self.min_ngram <= self.max_ngram):
            raise ValueError(f"need integers 1 <= min_ngram <= max_ngram, got {self.min_ngram!r}, {self.max_ngram!r}")
        if not 0 < self.match_prob <= 1:
            raise ValueError(f"match_prob must be in (0, 1], got {self.match_prob!r}")


def lookup(sequence: np.ndarray, n: int, k: int) -> np.ndarray:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the sequence's last ``n``."""
    if len(sequence) <= n:
        return sequence[:0]
    windows = np.lib.stride_tricks.sliding_window_view(sequence[:-1], n)  # starts 0 .. len - n - 1
    hits = np.flatnonzero((windows == sequence[-n:]).all(axis=1))
    if not len(hits):
        return sequence[:0]
    start = hits[-1] + n
    return sequence[start: start + k]


class NgramProposer(Proposer):
    def __init__(self, settings: NgramSpeculation):
        self.settings = settings
        self.lookahead = settings.num_speculative_tokens

    def propose(self, rows: list[ProposalRow]) -> list[DraftBatch]:
        s, drafts = self.settings, []
        for row in rows:
            sequence, k = np.asarray(row.sequence, np.int64), min(s.num_speculative_tokens, row.room)
            found = next((c for n in range(s.max_ngram, s.min_ngram - 1, -1) if k >= 1
                          and len(c := lookup(sequence, n, k))), None)
            # A chain: token i is accepted only if every token before it was.
            drafts.append(None if found is None else DraftTree(found.tolist(), list(range(len(found))),
                                                               (s.match_prob ** np.arange(1, len(found) + 1)).tolist(),
                                                               "ngram"))
        return [DraftBatch(rows, drafts, source="ngram")]

    def tree_sizes(self) -> tuple[int, ...]:
        return tuple(size for size in TREE_SIZES if size <= tree_bucket(1 + self.settings.num_speculative_tokens))


register("ngram", NgramSpeculation, lambda settings, context: NgramProposer(settings), always_offered=True)
