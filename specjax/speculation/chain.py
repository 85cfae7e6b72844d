"""Greedy chain proposals from a small draft model with its own paged KV cache.

The drafter keeps, per sequence, the tokens whose K/V its cache holds. Asked to propose after a
context, it rolls its cache back to the longest prefix it shares with that context (rejected
proposals disappear), feeds the rest, and decodes k tokens greedily. Token ids in and out are
the target's; a draft with a reduced vocabulary is mapped both ways here, so callers never see
draft ids.
"""

from __future__ import annotations

import numpy as np

from specjax.config import ModelConfig
from specjax.engine.step import StepInput
from specjax.params import Params
from specjax.runner import EngineConfig, ModelRunner


class ChainDrafter:
    def __init__(self, config: ModelConfig, params: Params, draft_to_target: np.ndarray | None = None,
                 target_to_draft: np.ndarray | None = None, target_vocab_size: int | None = None,
                 engine: EngineConfig | None = None):
        """For reduced-vocabulary drafts: ``draft_to_target`` [draft vocab] gives each draft id's
        target id; ``target_to_draft`` [target vocab] the draft id each target id is fed as (by
        default its own id where it has one, else draft id 0).
        """
        self.runner = ModelRunner(config, params, engine or EngineConfig(kv_cache_bytes=256 << 20))
        self.draft_to_target = None if draft_to_target is None else np.asarray(draft_to_target, np.int64)
        self.target_to_draft = None if target_to_draft is None else np.asarray(target_to_draft, np.int64)
        if self.draft_to_target is not None and self.target_to_draft is None:
            size = target_vocab_size or int(self.draft_to_target.max()) + 1
            self.target_to_draft = np.zeros(size, np.int64)
            self.target_to_draft[self.draft_to_target] = np.arange(len(self.draft_to_target))
        self._cached: dict[object, list[int]] = {}  # target ids whose K/V the draft cache holds

    def _to_draft(self, ids) -> list[int]:
        return list(ids) if self.target_to_draft is None else self.target_to_draft[np.asarray(ids)].tolist()

    def _to_target(self, draft_id: int) -> int:
        return int(draft_id) if self.draft_to_target is None else int(self.draft_to_target[draft_id])

    def start(self, seq_id, max_tokens: int) -> None:
        """Reserve draft cache for a sequence of up to ``max_tokens`` tokens (context + proposals)."""
        self.runner.add_sequence(seq_id, max_tokens)
        self._cached[seq_id] = []

    def stop(self, seq_id) -> None:
        self.runner.release(seq_id)
        del self._cached[seq_id]

    def propose(self, seq_id, context: list[int], k: int) -> list[int]:
        """k greedy draft tokens (target ids) following ``context`` (target ids, non-empty)."""
        if not context or k < 1:
            raise ValueError("propose needs a non-empty context and k >= 1")
        cached = self._cached[seq_id]
        keep = 0
        limit = min(len(cached), len(context) - 1)  # at least one token must be fed to get logits
        while keep < limit and cached[keep] == context[keep]:
            keep += 1
        self.runner.pages.truncate(seq_id, keep)
        del cached[keep:]
        chunk = self.runner.engine.prefill_chunk
        pending = context[keep:]
        while pending:
            piece, pending = pending[:chunk], pending[chunk:]
            (token,), _ = self.runner.step([StepInput(seq_id, self._to_draft(piece))])
            cached.extend(piece)
        proposals = [self._to_target(token)]
        for _ in range(k - 1):
            (token,), _ = self.runner.step([StepInput(seq_id, self._to_draft(proposals[-1:]))])
            cached.append(proposals[-1])
            proposals.append(self._to_target(token))
        return proposals
