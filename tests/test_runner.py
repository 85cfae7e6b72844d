"""ModelRunner: bucketed compilation, padding that changes nothing, and page accounting."""

import jax
import numpy as np
import pytest

from specjax.config import ModelConfig
from specjax.kv_cache import OutOfPagesError, kv_bytes_per_token
from specjax.params import random_params
from specjax.runner import EngineConfig, ModelRunner, StepInput

CONFIG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, max_position_embeddings=512)


@pytest.fixture(scope="module")
def params():
    return random_params(CONFIG, jax.random.key(0), scale=0.5)


def _greedy(runner, prompts, steps):
    """Greedy-decode each prompt ``steps`` tokens in one batch; returns the token lists."""
    for i, prompt in enumerate(prompts):
        runner.add_sequence(i, len(prompt) + steps)
    out = [[] for _ in prompts]
    next_tokens, _ = runner.step([StepInput(i, p) for i, p in enumerate(prompts)])
    for _ in range(steps - 1):
        for row, tok in enumerate(next_tokens):
            out[row].append(int(tok))
        next_tokens, _ = runner.step([StepInput(i, [out[i][-1]]) for i in range(len(prompts))])
    for row, tok in enumerate(next_tokens):
        out[row].append(int(tok))
    for i in range(len(prompts)):
        runner.release(i)
    return out


def test_long_generation_compiles_a_handful_of_times(params):
    runner = ModelRunner(CONFIG, params, EngineConfig(page_size=4, kv_cache_bytes=1 << 20))
    _greedy(runner, [[1, 2, 3]], steps=120)
    # One prefill bucket, and one decode bucket per power of two of prefix pages (1 .. 32).
    assert len(runner._compiled) <= 7
    assert runner.pages.num_used == 0


def test_batch_padding_and_page_size_change_no_token(params):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in (5, 11, 2)]
    base = _greedy(ModelRunner(CONFIG, params, EngineConfig(page_size=16, kv_cache_bytes=1 << 20)), prompts, 20)
    padded = _greedy(ModelRunner(CONFIG, params, EngineConfig(page_size=4, min_batch_bucket=8,
                                                              kv_cache_bytes=1 << 20)), prompts, 20)
    alone = [_greedy(ModelRunner(CONFIG, params, EngineConfig(kv_cache_bytes=1 << 20)), [p], 20)[0]
             for p in prompts]
    assert base == padded == alone


def test_admission_is_all_or_nothing(params):
    pool = 4 * 4 * kv_bytes_per_token(CONFIG, np.float32)  # four pages of four tokens
    runner = ModelRunner(CONFIG, params, EngineConfig(page_size=4, kv_cache_bytes=pool))
    assert runner.pages.num_pages == 4
    assert not runner.can_admit(17) and runner.can_admit(16)
    with pytest.raises(OutOfPagesError):
        runner.add_sequence("big", 17)
    assert runner.pages.num_free == 4 and "big" not in runner.pages
    with pytest.raises(ValueError, match="max_num_seqs"):
        runner.step([StepInput(i, [1]) for i in range(33)])
