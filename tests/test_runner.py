"""ModelRunner: bucketed compilation, padding that changes nothing, and page accounting."""

import jax
import numpy as np
import pytest

from specjax.config import ModelConfig
from specjax.kv_cache import OutOfPagesError, kv_bytes_per_token
from specjax.params import random_params
from specjax.runner import EngineConfig, ModelRunner, StepInput
from specjax.speculation.tree import TokenTree

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
    # One prefill bucket, and one decode bucket per power of two of prefix pages from
    # min_page_bucket (8, 16, 32).
    assert runner.num_compiled == 4
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


def _traffic(runner, rng):
    """Mixed steps as a server meets them: prompts of several lengths (one chunked), batches of 1
    to 2, greedy and sampled rows, logprobs on and off, plain decoding and verification of
    4-node trees, until sequences near max_model_len. Returns every token produced."""
    prompts = [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in (3, 17, 40)]
    produced = []
    for i, prompt in enumerate(prompts):
        runner.add_sequence(i, runner.max_model_len)
        while runner.pages.length(i) < len(prompt):  # prefill in chunks, one sequence at a time
            done = runner.pages.length(i)
            token, _ = runner.step([StepInput(i, prompt[done: done + runner.engine.prefill_chunk])])
        produced.append(int(token[0]))
    last = list(produced)
    for step in range(40):
        live = [i for i in range(len(prompts)) if runner.pages.length(i) + 5 < runner.max_model_len][step % 3:][: 1 + step % 2]
        if not live:
            break
        if step % 3 == 2:
            trees = [TokenTree.chain(last[i], [int(t) for t in rng.integers(0, CONFIG.vocab_size, 3)]) for i in live]
            new, _ = runner.verify(live, trees, [StepInput(i, [], temperature=0.8 * (i % 2), base_key=np.array(
                [0, i], np.uint32), sample_index=step) for i in live], logprobs=step % 2 == 0)[:2]
            new = [tokens[-1] for tokens in new]
        else:
            new, *_ = runner.step([StepInput(i, [last[i]], temperature=0.8 * (i % 2), base_key=np.array(
                [0, i], np.uint32), sample_index=step) for i in live], logprobs=step % 2 == 0)
        for i, token in zip(live, new):
            last[i] = int(token)
            produced.append(int(token))
    for i in range(len(prompts)):
        runner.release(i)
    return produced


def test_warm_up_compiles_every_bucket_traffic_meets(params):
    # Pages of 2 tokens: the 40-token prompt's second chunk follows a 16-page prefix.
    engine = EngineConfig(page_size=2, kv_cache_bytes=1 << 20, max_model_len=64, max_num_seqs=2, prefill_chunk=32)
    warmed = ModelRunner(CONFIG, params, engine)
    new = warmed.warm_up(tree_sizes=(4,))
    assert new == warmed.num_compiled == len(warmed.step_keys()) + len(warmed.verify_keys((4,)))
    assert warmed.warm_up(tree_sizes=(4,)) == 0  # nothing left to compile
    compiled, seconds = warmed.num_compiled, warmed.compile_time_s
    produced = _traffic(warmed, np.random.default_rng(1))
    # Greedy and sampled rows, with and without logprobs, ran on the warmed executables.
    assert (warmed.num_compiled, warmed.compile_time_s) == (compiled, seconds)
    # Compiling ahead ran empty rows only: a cold runner produces the same tokens.
    assert _traffic(ModelRunner(CONFIG, params, engine), np.random.default_rng(1)) == produced


def test_short_prefixes_share_the_smallest_page_bucket(params):
    runner = ModelRunner(CONFIG, params, EngineConfig(page_size=4, kv_cache_bytes=1 << 20, min_page_bucket=6))
    assert runner.buckets(100)["pages"] == [8, 16, 32]  # min_page_bucket rounds up to a power of two
    tiny = ModelRunner(CONFIG, params, EngineConfig(page_size=4, kv_cache_bytes=1 << 20, max_model_len=12))
    assert tiny.buckets()["pages"] == [4]  # never past what max_model_len needs
