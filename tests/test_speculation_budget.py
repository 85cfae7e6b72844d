"""The batch-aware speculation budget: the step cost model's averages and monotone estimates, the
policy against synthetic costs (full speculation when verification is nearly free, less as each
token costs more, none when a token costs a step; never below plain decoding; each row as much as
its draft offers), suffix drafts' expected gains, and batch-aware suffix speculation on a tiny
random model: lossless, and cutting drafts to what the cost model says pays."""

import itertools

import numpy as np
import pytest

from specjax.llm import LLM
from specjax.sampling import SamplingParams
from specjax.speculation.budget import SpeculationBudget, StepCostModel, draft_gains
from specjax.speculation.speculator import TreeSpeculation
from specjax.speculation.suffix import HybridSpeculation, SuffixSpeculation
from specjax.speculation.suffix_cache import SuffixCache
from tests.test_suffix_speculation import plain, prompts, target  # noqa: F401 (fixtures)
from tests.test_tree_speculation import DRAFT, ENGINE, GREEDY, tiny

BATCHES = (1, 2, 4, 8, 16, 32)
TREES = (1, 2, 4, 8, 16, 32)


PAGES = 8  # the prefix-page bucket of the synthetic steps


def chain(acceptance: float, tokens: int = 31) -> list[float]:
    """The gains of a chain of ``tokens`` whose every depth is accepted with ``acceptance`` given the one before."""
    return draft_gains(np.cumprod([acceptance] * tokens))


def synthetic(step: float, per_token: float, pages=(PAGES,), alpha: float = 0.2) -> StepCostModel:
    """Every (batch, tree, page) key timed: a fixed step cost plus ``per_token`` for each row's tree node."""
    cost = StepCostModel(alpha)
    for b, t, p in itertools.product(BATCHES, TREES, pages):
        cost.observe(b, t, p, step + per_token * b * t)
    return cost


def test_cost_model_averages_each_key_and_estimates_others_monotonically():
    cost = StepCostModel(alpha=0.5)
    assert cost.cost(4, 4, PAGES) is None
    cost.observe(3, 5, 8, 1.0)  # keyed by its buckets, (4, 8, 8)
    cost.observe(4, 8, 8, 2.0)
    assert cost.seconds == {(4, 8, 8): 1.5}

    cost = StepCostModel()
    for (b, t), s in {(1, 1): 1.0, (1, 2): 5.0, (1, 4): 3.0, (1, 16): 4.0, (8, 1): 2.0, (8, 16): 10.0}.items():
        cost.observe(b, t, PAGES, s)  # (1, 2) above (1, 4): timing noise the estimate must not follow down
    assert cost.cost(8, 16, PAGES) == 10.0
    assert 2.0 < cost.cost(8, 4, PAGES) < 10.0 and 5.0 <= cost.cost(4, 16, PAGES) <= 10.0
    assert cost.cost(32, 64, PAGES) > cost.cost(8, 16, PAGES)  # extrapolated upwards
    grid = np.array([[cost.cost(b, t, PAGES) for t in (1, 2, 4, 8, 16, 32, 64)] for b in (1, 2, 4, 8, 16, 32)])
    assert np.all(np.diff(grid, axis=0) >= 0) and np.all(np.diff(grid, axis=1) >= 0)


def test_cost_model_keeps_contexts_apart_and_interpolates_between_them():
    cost = StepCostModel()
    for t, short, long in ((1, 1.0, 3.0), (16, 1.5, 9.0)):
        cost.observe(1, t, 8, short)
        cost.observe(1, t, 64, long)
    assert cost.cost(1, 16, 8) == 1.5 and cost.cost(1, 16, 64) == 9.0  # neither context prices the other
    assert cost.cost(1, 16, 1) == 1.5  # flat below the shortest timed context
    assert 1.5 < cost.cost(1, 16, 32) < 9.0 and cost.cost(1, 16, 128) > 9.0
    grid = np.array([[cost.cost(1, t, p) for t in (1, 2, 4, 8, 16, 32)] for p in (1, 8, 16, 32, 64, 128, 256)])
    assert np.all(np.diff(grid, axis=0) >= 0) and np.all(np.diff(grid, axis=1) >= 0)


def test_trees_dear_at_long_context_do_not_stop_speculation_at_short_context():
    """What batch-aware serving met on a CPU: suffix trees were mostly speculated for long agentic
    contexts, root-only steps mostly ran for short prompts; keyed without the context, the trees'
    cost looked 2-5x a plain step's and short requests stopped speculating altogether."""
    cost = StepCostModel()
    for t, short, long in ((1, 0.020, 0.060), (16, 0.027, 0.200)):
        cost.observe(1, t, 8, short)
        cost.observe(1, t, 256, long)
    budget = SpeculationBudget(cost, max_tree=16)
    likely = [chain(0.9, tokens=15)]  # a request whose suffix drafts are mostly accepted
    assert budget.plan(likely, 8).tree_size == 16
    assert budget.plan([chain(0.1, tokens=15)], 256).tree_size == 1  # dear trees, poor acceptance: none


def test_a_drafts_gains_sum_its_best_tokens_scaled_by_how_its_requests_drafts_did():
    assert draft_gains([]) == [0.0]
    assert draft_gains([0.8, 0.5, 0.4]) == pytest.approx([0.0, 0.8, 1.3, 1.7])
    # 10 tokens predicted and 4 accepted (prior: 2 tokens of perfect calibration) scale by (4 + 2) / (10 + 2).
    assert draft_gains([0.8, 0.5], predicted=10.0, accepted=4) == pytest.approx([0.0, 0.4, 0.65])

    cache = SuffixCache(max_depth=16)
    for i, response in enumerate(([1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 7])):
        cache.start_request(i, [0])
        cache.add_active_response(i, response)
        cache.stop_request(i)
    cache.start_request("q", [0])
    draft = cache.speculate("q", [1], max_spec_tokens=6, min_token_prob=0.0)
    assert draft.probs == sorted(draft.probs, reverse=True)  # best first, so any cut is the best subtree
    cut = draft.truncated(3)
    assert cut.tokens == draft.tokens[:3] and cut.parents == draft.parents[:3]
    assert all(p <= i for i, p in enumerate(cut.parents)) and cut.score == pytest.approx(sum(draft.probs[:3]))
    assert draft.truncated(0).tokens == [] and draft.truncated(99) is draft


def test_flat_cost_speculates_fully_and_steeper_costs_less_down_to_none():
    rows = [chain(0.8)] * 16
    flat = SpeculationBudget(synthetic(1.0, 1e-5), max_tree=32).plan(rows, PAGES)
    assert flat.tree_size == 32 and flat.sizes == [31] * 16

    chosen = [SpeculationBudget(synthetic(1.0, slope), max_tree=32).plan(rows, PAGES).tree_size
              for slope in (1e-5, 1e-3, 1e-2, 3e-2, 1e-1)]
    assert chosen == sorted(chosen, reverse=True) and 1 < chosen[1] < 32
    # Each extra token costs as much as a one-token step: even perfect acceptance only ties.
    for acceptance in (0.8, 1.0):
        plan = SpeculationBudget(synthetic(0.0, 1.0), max_tree=32).plan([chain(acceptance)] * 4, PAGES)
        assert plan.tree_size == 1 and plan.sizes == [0] * 4
    # The same per-token slope halts speculation at a large batch but not at a small one.
    cost = synthetic(1.0, 3e-2)
    assert SpeculationBudget(cost).plan([chain(0.8)], PAGES).tree_size > SpeculationBudget(cost).plan(rows * 2, PAGES).tree_size


def test_plans_never_expect_less_than_plain_decoding_under_their_model():
    rng = np.random.default_rng(0)
    for _ in range(50):
        cost = StepCostModel()
        base = np.sort(rng.uniform(0.1, 2.0, size=(len(BATCHES), len(TREES))), axis=1)
        for (i, b), (j, t) in itertools.product(enumerate(BATCHES), enumerate(TREES)):
            cost.observe(b, t, PAGES, base[: i + 1, j].sum())  # monotone in both
        rows = [draft_gains(np.sort(rng.uniform(0, 1, size=rng.integers(0, 40)))[::-1], rng.uniform(0, 9),
                            rng.integers(0, 9)) for _ in range(rng.integers(1, 33))]
        plan = SpeculationBudget(cost).plan(rows, PAGES)
        tokens = sum(1 + g[k] for g, k in zip(rows, plan.sizes))
        assert plan.tokens_per_s == pytest.approx(tokens / cost.cost(len(rows), plan.tree_size, PAGES))
        assert plan.plain_tokens_per_s == pytest.approx(len(rows) / cost.cost(len(rows), 1, PAGES))
        assert plan.tokens_per_s >= plan.plain_tokens_per_s
        assert all(0 <= k < min(plan.tree_size, len(g)) for g, k in zip(rows, plan.sizes))


def test_each_row_speculates_what_its_draft_offers_and_one_that_expects_nothing_none():
    rows = [chain(0.0), chain(0.9), chain(0.7, tokens=3), draft_gains([])]
    plan = SpeculationBudget(synthetic(1.0, 1e-4), max_tree=16).plan(rows, PAGES)
    assert plan.tree_size == 16 and plan.sizes == [0, 15, 3, 0]


def test_batch_aware_suffix_speculation_is_lossless(target, prompts, plain):  # noqa: F811
    llm = LLM(target, engine=ENGINE, speculation=SuffixSpeculation(max_spec_tokens=15, batch_aware=True))
    assert llm.runner.pages.num_free == llm.runner.pages.num_pages  # calibration gave its pages back
    calibrated = dict(llm.engine.budget.cost.seconds)
    assert {(b, t) for b, t, _ in calibrated} >= {(1, 1), (1, 16), (32, 1), (32, 16)}
    assert {p for _, _, p in calibrated} == {llm.runner.page_bucket(1)}  # short scratch sequences
    for _ in range(2):  # cold, then warm from the cache
        outs = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == plain
    assert llm.engine.budget.cost.seconds != calibrated  # the steps' own timings went in
    with pytest.raises(ValueError, match="batch_aware"):
        LLM(target, engine=ENGINE, speculation=HybridSpeculation(
            suffix=SuffixSpeculation(batch_aware=True),
            tree=TreeSpeculation(drafts=[tiny(DRAFT, 1, "tiny draft")], expansion=(1,))))


def test_batch_aware_cuts_suffix_drafts_to_what_the_cost_model_says_pays(target, prompts, plain):  # noqa: F811
    llm = LLM(target, engine=ENGINE, speculation=SuffixSpeculation(max_spec_tokens=15, batch_aware=True))
    llm.generate(prompts[:1], GREEDY)  # its response is now in the suffix cache: the next drafts are exact
    # Costs fixed for every bucket the steps can meet (alpha ~0: their own timings change nothing).
    pages = llm.runner.buckets()["pages"]
    for per_token, speculates in ((1e-6, True), (10.0, False)):
        llm.engine.budget.cost = synthetic(1.0, per_token, pages, alpha=1e-9)
        out = llm.generate(prompts[:1], GREEDY)[0]
        assert out.token_ids == plain[0]
        spec = out.stats.speculation
        if speculates:  # nearly free trees: the cached response goes in long chains
            assert spec.tau > 4 and spec.acceptance_rate > 0.9
        else:  # a tree token costs ten steps: the drafts are cut to nothing
            assert spec.proposed == 0 and spec.tau == 1
