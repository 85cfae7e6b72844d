"""The acceptance harness: a draft equal to the target accepts everything, a random one almost nothing."""


import jax
import numpy as np
import pytest

from benchmarks.acceptance import greedy_continuation, measure, replay_chain
from specjax.config import ModelConfig
from specjax.params import random_params
from specjax.runner import EngineConfig, ModelRunner
from specjax.speculation.chain import ChainDrafter
from specjax.speculation.stats import SpeculationStats

TARGET = ModelConfig(vocab_size=101, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=12, max_position_embeddings=512)
ENGINE = EngineConfig(page_size=4, kv_cache_bytes=1 << 20, prefill_chunk=8)


@pytest.fixture(scope="module")
def target():
    return ModelRunner(TARGET, random_params(TARGET, jax.random.key(0), scale=0.3), ENGINE)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, TARGET.vocab_size, n).tolist() for n in (5, 13, 21)]


@pytest.mark.parametrize("k", [1, 4])
def test_draft_equal_to_target_gives_tau_one_plus_k(target, prompts, k):
    drafter = ChainDrafter(TARGET, target.params, engine=ENGINE)
    total, rows = measure(target, drafter, prompts, k=k, max_tokens=20)
    assert total.tau == pytest.approx(1 + k)
    assert total.acceptance_rate == 1.0 and total.wasted_share == 0.0
    assert all(a == 1.0 for a in total.acceptance_by_depth) and len(total.acceptance_by_depth) == k
    assert len(rows) == len(prompts) and drafter.runner.pages.num_used == 0


def test_random_draft_gives_tau_near_one(target, prompts):
    other = TARGET.replace(num_layers=1)
    drafter = ChainDrafter(other, random_params(other, jax.random.key(7), scale=0.3), engine=ENGINE)
    total, _ = measure(target, drafter, prompts, k=4, max_tokens=20)
    assert 1.0 <= total.tau < 1.3
    assert total.wasted_share > 0.8


def test_reduced_vocabulary_draft_maps_ids_both_ways(target, prompts):
    """A draft over a subset of the target's vocabulary proposes target ids; here the subset is the
    whole vocabulary in shuffled order, so it must behave exactly like the target itself."""
    perm = np.random.default_rng(3).permutation(TARGET.vocab_size)
    p = target.params
    shuffled = p.__class__(embed=p.embed[perm], layers=p.layers, final_norm=p.final_norm,
                           lm_head=p.lm_head[:, perm])
    drafter = ChainDrafter(TARGET, shuffled, draft_to_target=perm, target_vocab_size=TARGET.vocab_size,
                           engine=ENGINE)
    total, _ = measure(target, drafter, prompts, k=3, max_tokens=12)
    assert total.tau == pytest.approx(4)


def test_replay_counts_partial_acceptance_and_stop_at_the_end():
    output = [5, 6, 7, 8, 9, 2]  # ends with a stop token
    script = {0: [5, 6, 0], 3: [8, 1, 1]}  # proposals by position: 2 accepted, then 1 accepted

    def propose(context, depth):
        return script.get(len(context) - 1, [0] * depth)[:depth]

    stats = replay_chain([1], output, counted=len(output), propose=propose, k=3)
    # step 1 at 0: accepts 5, 6 (+7 bonus); step 2 at 3: accepts 8 (+9); then one plain step for 2.
    assert stats.steps == 3 and stats.tokens == 6
    assert stats.accepted == 3 and stats.proposed == 5  # the second step could only verify 2
    assert stats.acceptance_by_depth == [1.0, 0.5, 0.0]


def test_greedy_continuation_stops_at_stop_ids(target):
    free = greedy_continuation(target, "g", [3, 4, 5], 10)
    stopped = greedy_continuation(target, "g", [3, 4, 5], 10, stop_ids=[free[2]])
    assert stopped == free[: free.index(free[2]) + 1]


def test_stats_reject_inconsistent_steps():
    with pytest.raises(ValueError):
        SpeculationStats().record(proposed=2, depth=3, accepted=1)
    with pytest.raises(ValueError):
        SpeculationStats().record(proposed=3, depth=3, accepted=1, tokens=3)


def test_a_finishing_step_counts_only_the_tokens_delivered():
    stats = SpeculationStats()
    stats.record(proposed=6, depth=3, accepted=3)
    stats.record(proposed=6, depth=3, accepted=3, tokens=2)  # the request needed two more tokens
    assert stats.tokens == 6 and stats.tau == 3.0 and stats.acceptance_rate == 0.5
