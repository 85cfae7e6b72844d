"""Suffix speculation in the LLM engine: trees from the suffix cache, verified by the target alone.

``SuffixSpeculation`` is what a user asks for (SuffixDecoding, no draft model): each step a
request's tree comes from ``suffix_cache.SuffixCache`` (its prompt and output so far, and every
earlier response of the same ``LLM``) and is verified in one target pass with every other host
tree of the step. ``HybridSpeculation`` adds draft models: a request whose suffix draft scores
low this step speculates with the draft-model tree instead.

``SuffixSpeculator`` is the "suffix" proposer: it keeps the cache in step with each request's
tokens and asks it for drafts. It follows every speculating request, whatever its method, so
every speculated output joins the cache for later requests. Its seconds are counted apart
(``host_time_s``) so the host's cost per step can be set against the device's.
"""

from __future__ import annotations

import dataclasses

import os
import secrets
import time
from dataclasses import dataclass
from typing import ClassVar, Sequence

from specjax.speculation.proposer import BuildContext, DraftBatch, DraftTree, ProposalRow, Proposer, register
from specjax.speculation.speculator import TreeSpeculation, TreeSpeculator
from specjax.speculation.suffix_cache import SuffixCache
from specjax.speculation.tree import TREE_SIZES, tree_bucket

HYBRID_PRIOR_STEPS = 4  # pseudo draft-model steps of one accepted token each, in hybrid's bar


@dataclass(frozen=True)
class SuffixSpeculation:
    """Speculate from a suffix cache of the prompt and earlier outputs (SuffixDecoding).

    max_spec_tokens: speculated tokens per step at most (tree nodes besides the root; 31 fills a
        32-node bucket). The budget also grows with the match: at most
        ``max_spec_factor * match_len + max_spec_offset`` tokens after a match of ``match_len``.
    min_token_prob: drop continuations whose estimated probability (count ratios multiplied
        along the path) is below this.
    tree: speculate trees (the most probable continuations, branching) or a single chain.
    max_depth: longest context suffix matched plus continuation, in tokens; contexts longer than
        this are matched on their last ``max_depth`` tokens.
    max_cached_requests: earlier responses kept, every scope's together; the oldest leave first. The
        trie holds up to ``max_depth`` nodes per cached token (about 20 bytes each; repetitive
        text shares most), so 1000 responses of 1000 tokens take up to about 1 GB of host memory.
    cache_file: start from the global cache saved there (``LLM.save_suffix_cache``), if it exists.
    batch_aware: cut each step's drafts to the sizes that maximise expected tokens per second for
        the whole batch (``budget.SpeculationBudget``: the drafts' own scores against timings of
        this device's steps), so a large batch or a doubtful draft speculates less, down to none.
    """

    method: ClassVar[str] = "suffix"

    max_spec_tokens: int = 31
    max_spec_factor: float = 1.0
    max_spec_offset: float = 0.0
    min_token_prob: float = 0.1
    tree: bool = True
    max_depth: int = 64
    max_cached_requests: int | None = 1000
    cache_file: str | os.PathLike | None = None
    batch_aware: bool = False

    def __post_init__(self):
        if not isinstance(self.max_spec_tokens, int) or not 1 <= self.max_spec_tokens < TREE_SIZES[-1]:
            raise ValueError(f"max_spec_tokens must be an integer in [1, {TREE_SIZES[-1] - 1}], "
                             f"got {self.max_spec_tokens!r}")
        if not self.max_spec_factor > 0:
            raise ValueError(f"max_spec_factor must be > 0, got {self.max_spec_factor!r}")
        if not self.max_spec_offset >= 0:
            raise ValueError(f"max_spec_offset must be >= 0, got {self.max_spec_offset!r}")
        if not 0 <= self.min_token_prob <= 1:
            raise ValueError(f"min_token_prob must be in [0, 1], got {self.min_token_prob!r}")
        if not isinstance(self.max_depth, int) or self.max_depth < 1:
            raise ValueError(f"max_depth must be a positive integer, got {self.max_depth!r}")
        if self.max_cached_requests is not None and (not isinstance(self.max_cached_requests, int)
                                                     or self.max_cached_requests < 0):
            raise ValueError(f"max_cached_requests must be a non-negative integer or None, "
                             f"got {self.max_cached_requests!r}")


@dataclass(frozen=True)
class HybridSpeculation:
    """Suffix speculation where it is confident, draft-model trees elsewhere.

    Each step, a request whose suffix draft scores at least ``min_score`` (the draft's expected
    accepted tokens: the sum of its nodes' estimated probabilities) is verified with that draft;
    the others speculate with ``tree``'s drafts. ``min_score`` None compares against the draft
    models' own record instead: the mean tokens they got accepted per step so far in this ``LLM``,
    smoothed with four pseudo-steps of one token each, so the suffix draft wins whenever it
    promises more than the draft models have been delivering.
    """

    method: ClassVar[str] = "hybrid"

    suffix: SuffixSpeculation
    tree: TreeSpeculation
    min_score: float | None = None

    def __post_init__(self):
        if not isinstance(self.suffix, SuffixSpeculation):
            raise TypeError(f"suffix must be a SuffixSpeculation, got {type(self.suffix).__name__}")
        if not isinstance(self.tree, TreeSpeculation):
            raise TypeError(f"tree must be a TreeSpeculation, got {type(self.tree).__name__}")
        if self.min_score is not None and not self.min_score >= 0:
            raise ValueError(f"min_score must be >= 0 or None, got {self.min_score!r}")
        if self.suffix.batch_aware:
            raise ValueError("batch_aware suffix speculation does not combine with draft models yet")


class SuffixSpeculator(Proposer):
    """The suffix cache of one LLM, kept in step with its requests.

    Callers name requests by ids unique within their LLM; the cache knows them by that id under
    this speculator's own random prefix, since a loaded cache holds other LLMs' requests. The
    cache learns a request's tokens lazily: each ``propose`` or ``stop`` first adds the tokens
    generated since the last call.
    """

    name = "suffix"
    follows_every_request = True

    def __init__(self, settings: SuffixSpeculation):
        self.settings = settings
        self.lookahead = settings.max_spec_tokens
        self.batch_aware = settings.batch_aware
        path = settings.cache_file
        if path is not None and os.path.exists(path):
            self.cache = SuffixCache.load(path)
            if self.cache.max_depth != settings.max_depth:
                raise ValueError(f"the suffix cache in {path} has max_depth {self.cache.max_depth}; the "
                                 f"speculation asks for {settings.max_depth}")
        else:
            self.cache = SuffixCache(max_depth=settings.max_depth, max_cached_requests=settings.max_cached_requests)
        self._known: dict = {}  # cache id -> tokens of its sequence the cache holds
        self._prefix = secrets.token_hex(6)
        self.host_time_s = 0.0

    def _id(self, request_id) -> str:
        return f"{self._prefix}-{request_id}"

    def start(self, request_id, prompt: Sequence[int], scope: str = "") -> None:
        start = time.perf_counter()
        request_id = self._id(request_id)
        self.cache.start_request(request_id, prompt, scope)
        self._known[request_id] = len(prompt)
        self.host_time_s += time.perf_counter() - start

    def _sync(self, request_id, sequence: Sequence[int]) -> None:
        known = self._known[request_id]
        if len(sequence) > known:
            self.cache.add_active_response(request_id, sequence[known:])
            self._known[request_id] = len(sequence)

    def stop(self, request_id, sequence: Sequence[int]) -> None:
        """The request is done: its whole output joins the global cache."""
        start = time.perf_counter()
        request_id = self._id(request_id)
        try:
            self._sync(request_id, sequence)
        finally:
            self.cache.stop_request(request_id)
            del self._known[request_id]
            self.host_time_s += time.perf_counter() - start

    def draft(self, request_id, sequence: Sequence[int], max_tokens: int) -> tuple[DraftTree | None, float]:
        """The cache's draft after ``sequence`` (prompt and output; its last token is the root) with
        at most ``max_tokens`` tokens (None when it may not speculate), and the host seconds spent."""
        start = time.perf_counter()
        request_id = self._id(request_id)
        self._sync(request_id, sequence)
        draft = None
        budget = min(self.settings.max_spec_tokens, max_tokens)
        if budget >= 1:
            s = self.settings
            found = self.cache.speculate(request_id, sequence, max_spec_tokens=budget,
                                         max_spec_factor=s.max_spec_factor, max_spec_offset=s.max_spec_offset,
                                         min_token_prob=s.min_token_prob, tree=s.tree)
            draft = DraftTree(found.tokens, found.parents, found.probs, "suffix")
        seconds = time.perf_counter() - start
        self.host_time_s += seconds
        return draft, seconds

    def propose(self, rows: list[ProposalRow]) -> list[DraftBatch]:
        drafts, seconds = zip(*(self.draft(row.uid, row.sequence, row.room) for row in rows))
        return [DraftBatch(rows, list(drafts), source="suffix", host_time_s=list(seconds))]

    def tree_sizes(self) -> tuple[int, ...]:
        largest = tree_bucket(1 + self.settings.max_spec_tokens)
        return tuple(s for s in TREE_SIZES if s <= largest)


class HybridSpeculator(Proposer):
    """Suffix drafts where they promise at least the bar, draft-model trees for the other rows."""

    reports_sources = True

    def __init__(self, suffix: SuffixSpeculator, tree: TreeSpeculator, min_score: float | None):
        self.suffix, self.tree = suffix, tree
        self.min_score = min_score
        self.lookahead = max(suffix.lookahead, tree.lookahead)
        self.overrun = tree.overrun

    def parts(self) -> tuple[Proposer, ...]:
        return (self.suffix, self.tree)

    def bar(self) -> float:
        """The score a suffix draft needs to be taken over the draft models."""
        if self.min_score is not None:
            return self.min_score
        # The draft models' record over every request they served, smoothed towards one token a
        # step, so one unlucky draft step cannot drop the bar to zero (the suffix cache would then
        # win every later step and the record never recover).
        accepted, steps = self.tree.record
        return (accepted + HYBRID_PRIOR_STEPS) / (steps + HYBRID_PRIOR_STEPS)

    def propose(self, rows: list[ProposalRow]) -> list[DraftBatch]:
        (suffix,) = self.suffix.propose(rows)
        bar = self.bar()
        seconds = {id(row): t for row, t in zip(rows, suffix.host_time_s)}
        keep = [i for i, draft in enumerate(suffix.trees) if draft is None or draft.score >= bar]
        batches = [DraftBatch([rows[i] for i in keep], [suffix.trees[i] for i in keep], source="suffix",
                              host_time_s=[suffix.host_time_s[i] for i in keep])] if keep else []
        kept = set(keep)
        if rest := [row for i, row in enumerate(rows) if i not in kept]:
            for row in rest:
                # Which source serves a row changes from step to step with the cache's contents:
                # a seed reproduces its tokens only if both give plain sampling's own draws.
                row.sampling = dataclasses.replace(row.sampling, plain_draws=row.seeded)
            for batch in self.tree.propose(rest):
                batch.host_time_s = [seconds[id(row)] for row in batch.rows]  # the cache was asked all the same
                batches.append(batch)
        return batches


def _build_hybrid(settings: HybridSpeculation, context: BuildContext) -> HybridSpeculator:
    return HybridSpeculator(context.build(settings.suffix), context.build(settings.tree), settings.min_score)


register("suffix", SuffixSpeculation, lambda settings, context: SuffixSpeculator(settings))
register("hybrid", HybridSpeculation, _build_hybrid)
