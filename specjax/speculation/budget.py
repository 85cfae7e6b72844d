"""A batch-aware speculation budget: how many tokens each request speculates this step.

Speculating pays when verification is nearly free (a memory-bound accelerator at small batch) and
costs throughput when every extra token costs real compute (large batch, or a CPU). The
``StepCostModel`` learns what a verification step of (batch rows, tree bucket, prefix pages) costs
on this device, from the runner's own step timings; ``SpeculationBudget`` then picks, per step, the one
tree bucket the batch shares and each row's size within it, to maximise expected tokens per second
for the whole batch. Size 0 is a root-only tree: the row decodes one token, as a plain step would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from specjax.runner import ModelRunner, next_power_of_two
from specjax.speculation.tree import TREE_SIZES, TokenTree, tree_bucket


def _monotone_interp(x: float, xs: Sequence[float], ys: Sequence[float], proportional: bool) -> float:
    """Piecewise-linear through (xs, running max of ys), so the estimate never falls as ``x`` grows:
    flat below the first point; above the last, along the last segment or, ``proportional``, in
    proportion to ``x`` (which keeps the ratios between the curves of another axis)."""
    ys = np.maximum.accumulate(np.asarray(ys, float))
    if x <= xs[-1] or len(xs) == 1 and not proportional:
        return float(np.interp(x, xs, ys))
    if proportional:
        return float(ys[-1] * x / xs[-1])
    return float(ys[-1] + (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) * (x - xs[-1]))


class StepCostModel:
    """Seconds of one verification step by (batch bucket, tree bucket, prefix-page bucket): an
    exponential moving average per key of the steps seen, estimated elsewhere by interpolating the
    keys seen, monotone in all three. Within a page bucket: linear in tree nodes, and in rows
    between timed batch buckets; past the largest timed batch, in proportion to rows, so the costs
    of tree sizes keep their ratios there. Across page buckets: linear between timed ones, flat
    below the smallest and along the last segment past the largest.

    The context is part of the key because attention over it is much of a step's cost on some
    devices (a CPU, or any device at long context): keyed by rows and tree only, trees speculated
    for long-context requests would price every tree of a short one.

    alpha: weight of each new timing in its key's average.
    """

    def __init__(self, alpha: float = 0.2):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.alpha = alpha
        self.seconds: dict[tuple[int, int, int], float] = {}

    @staticmethod
    def key(rows: int, tree_size: int, pages: int) -> tuple[int, int, int]:
        """``pages``: the prefix-page bucket the step reads (``ModelRunner.prefix_page_bucket``)."""
        return next_power_of_two(rows), tree_bucket(tree_size), next_power_of_two(pages)

    def observe(self, rows: int, tree_size: int, pages: int, seconds: float) -> None:
        key = self.key(rows, tree_size, pages)
        old = self.seconds.get(key)
        self.seconds[key] = seconds if old is None else old + self.alpha * (seconds - old)

    def cost(self, rows: int, tree_size: int, pages: int) -> float | None:
        """Estimated seconds of a step of ``rows`` trees of ``tree_size`` nodes over ``pages``
        prefix pages; None before any timing."""
        if not self.seconds:
            return None
        b, t, p = self.key(rows, tree_size, pages)
        page_buckets = sorted({kp for _, _, kp in self.seconds})
        per_pages = [self._cost_within(b, t, kp) for kp in page_buckets]
        return _monotone_interp(p, page_buckets, per_pages, False)

    def _cost_within(self, b: int, t: int, p: int) -> float:
        """The estimate at (b, t) from the timings of page bucket ``p`` alone."""
        timed = {(kb, kt): s for (kb, kt, kp), s in self.seconds.items() if kp == p}
        batches = sorted({kb for kb, _ in timed})
        # Each timed batch bucket's cost at this tree size, then across batch buckets.
        per_batch = []
        for kb in batches:
            sizes = sorted(kt for kbb, kt in timed if kbb == kb)
            per_batch.append(_monotone_interp(t, sizes, [timed[(kb, kt)] for kt in sizes], False))
        return _monotone_interp(b, batches, per_batch, True)


def calibrate(runner: ModelRunner, cost: StepCostModel, batch_buckets: Sequence[int] = (1, 8),
              tree_sizes: Sequence[int] = (1, 16), repeats: int = 3) -> None:
    """Seed ``cost`` with timings of verification steps of each batch and tree size on short
    scratch sequences, after one untimed run (a fresh executable's first run is slow). Sizes that
    do not fit the free pages are skipped; batches are capped at ``max_num_seqs``."""
    rng = np.random.default_rng(0)
    vocab = runner.config.vocab_size
    for rows in batch_buckets:
        rows = min(rows, runner.engine.max_num_seqs)
        for size in tree_sizes:
            need = (repeats + 1) * size + 1  # every call may commit the whole chain
            if runner.pages.pages_for(need) * rows > runner.pages.num_free or need > runner.max_model_len:
                continue
            ids = [("calibrate", rows, size, i) for i in range(rows)]
            for seq_id in ids:
                runner.add_sequence(seq_id, need)
            try:
                for run in range(repeats + 1):
                    trees = [TokenTree.chain(int(rng.integers(vocab)), rng.integers(0, vocab, size - 1).tolist())
                             for _ in ids]
                    pages = runner.prefix_page_bucket(ids)
                    _, seconds = runner.verify(ids, trees)
                    if run:
                        cost.observe(rows, size, pages, seconds)
            finally:
                for seq_id in ids:
                    runner.release(seq_id)


def draft_gains(probs: Sequence[float], predicted: float = 0.0, accepted: float = 0.0,
                prior: float = 2.0) -> list[float]:
    """Expected accepted tokens of a suffix draft cut to its first k tokens, k = 0 .. len(probs).

    A draft's tokens come most probable first (``SuffixDraft``), so its first k are its best
    k-token subtree and their summed probabilities its expected accepted tokens. Those frequencies
    misjudge some requests (a chat reply that only resembles cached ones accepts about half what
    they predict), so they are scaled by how the request's own verified drafts did: ``accepted``
    tokens of ``predicted`` by their scores, smoothed by ``prior`` tokens of perfect calibration.
    """
    scale = (accepted + prior) / (predicted + prior)
    return [0.0, *(scale * np.cumsum(probs)).tolist()]


@dataclass(frozen=True)
class BudgetPlan:
    sizes: list[int]  # speculated tokens per row (0: root only)
    tree_size: int  # the tree bucket the rows share
    tokens_per_s: float  # expected, under the cost model
    plain_tokens_per_s: float  # of root-only trees for every row, under the same model


class SpeculationBudget:
    """Each step's speculation sizes for a batch, by expected tokens per second.

    Each row comes with its expected accepted tokens for each number of speculated tokens (for a
    suffix draft, ``draft_gains``). Rows share one tree bucket per step, so extra tokens within it
    cost nothing more: for each candidate bucket (1, 2, 4, ... up to ``max_tree``) every row takes
    as much of the bucket as it has tokens for, unless it expects nothing from them, and the bucket
    with the most expected tokens (one per row plus the expected accepted) per estimated second
    wins, ties to the smaller. Bucket 1 is plain decoding, so a plan never expects fewer tokens per
    second than plain decoding under the model. Without timings it speculates fully, as
    speculation without a budget does.
    """

    def __init__(self, cost: StepCostModel, max_tree: int = 32):
        if max_tree not in TREE_SIZES:
            raise ValueError(f"max_tree must be one of {TREE_SIZES}, got {max_tree!r}")
        self.cost = cost
        self.max_tree = max_tree

    def plan(self, gains: Sequence[Sequence[float]], pages: int) -> BudgetPlan:
        """``gains``: per row, its expected accepted tokens with 0, 1, 2, ... speculated tokens
        (non-decreasing, from 0.0; as many as the row has tokens to speculate); ``pages``: the
        prefix-page bucket the step will read."""
        rows = len(gains)
        best = None
        for size in (s for s in TREE_SIZES if s <= self.max_tree):
            sizes = [min(size - 1, len(g) - 1) for g in gains]
            sizes = [k if g[k] > 0 else 0 for g, k in zip(gains, sizes)]
            tokens = sum(1 + g[k] for g, k in zip(gains, sizes))
            seconds = self.cost.cost(rows, size, pages)
            rate = tokens / seconds if seconds else float(tokens)  # no timings: tokens alone decide
            if size == 1:
                plain = rate
            if best is None or rate > best.tokens_per_s:
                best = BudgetPlan(sizes, size, rate, plain)
        return BudgetPlan(best.sizes, best.tree_size, best.tokens_per_s, plain)
