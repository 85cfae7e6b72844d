"""Suffix and hybrid speculation through the LLM API and the CLI, on tiny random models: lossless
greedy output, a warm cache making repeated work nearly free, the cache saved and loaded, hybrid
choosing per request and step, and bad input caught early."""

import re

import numpy as np
import pytest

from specjax import cli
from specjax.checkpoints import save_checkpoint
from specjax.llm import LLM
from specjax.sampling import SamplingParams
from specjax.speculation.speculator import TreeSpeculation
from specjax.speculation.suffix import HybridSpeculation, SuffixSpeculation
from tests.test_tree_speculation import ENGINE, GREEDY, TARGET, VOCAB, tiny


@pytest.fixture(scope="module")
def target():
    return tiny(TARGET, 0, "tiny target")


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(0, VOCAB, n).tolist() for n in (7, 15, 30)]


@pytest.fixture(scope="module")
def plain(target, prompts):
    return [o.token_ids for o in LLM(target, engine=ENGINE).generate(prompts, GREEDY)]


def tau(outputs):
    steps = sum(o.stats.speculation.steps for o in outputs)
    return sum(o.stats.speculation.tokens for o in outputs) / steps


def test_suffix_greedy_equals_plain_and_repeated_work_is_nearly_free(target, prompts, plain):
    llm = LLM(target, engine=ENGINE, speculation=SuffixSpeculation(max_spec_tokens=15))
    cold = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in cold] == plain
    # The outputs are in the global cache now: the same requests again match them all the way.
    warm = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in warm] == plain
    assert tau(warm) > 2 * tau(cold) and tau(warm) >= 4
    assert llm.suffix_cache.cached_requests and len(llm.suffix_cache.cached_requests) == 2 * len(prompts)
    for out in warm:
        sp = out.stats.speculation
        assert sp.host_time_s > 0 and sp.acceptance_rate > 0.8


def test_sampled_suffix_requests_are_reproducible(target, prompts):
    params = SamplingParams(temperature=0.9, seed=3, max_tokens=20, ignore_eos=True)
    runs = []
    for _ in range(2):
        llm = LLM(target, engine=ENGINE, speculation=SuffixSpeculation(max_spec_tokens=7))
        llm.generate(prompts, GREEDY)  # warm the cache with greedy outputs the samples partly follow
        runs.append([o.token_ids for o in llm.generate(prompts, params)])
    assert runs[0] == runs[1]
    assert all(len(tokens) == 20 for tokens in runs[0])


def test_saved_cache_warms_a_new_llm_and_corrupt_files_are_refused(target, prompts, plain, tmp_path):
    first = LLM(target, engine=ENGINE, speculation=SuffixSpeculation())
    first.generate(prompts, GREEDY)
    path = tmp_path / "suffix.npz"
    first.save_suffix_cache(path)

    second = LLM(target, engine=ENGINE, speculation=SuffixSpeculation(cache_file=path))
    outs = second.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == plain
    assert tau(outs) >= 4  # warm from the first request on

    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a write cut short
    with pytest.raises(ValueError, match="suffix cache"):
        LLM(target, engine=ENGINE, speculation=SuffixSpeculation(cache_file=path))
    first.save_suffix_cache(tmp_path / "again.npz")
    with pytest.raises(ValueError, match="max_depth"):
        LLM(target, engine=ENGINE, speculation=SuffixSpeculation(cache_file=tmp_path / "again.npz", max_depth=8))
    with pytest.raises(ValueError, match="does not speculate from a suffix cache"):
        LLM(target, engine=ENGINE).save_suffix_cache(tmp_path / "none.npz")


def test_hybrid_uses_both_sources_and_stays_lossless(target, prompts, plain):
    # The target as its own draft: a draft model that is always right, 3 tokens a step, sets a high bar.
    llm = LLM(target, engine=ENGINE, speculation=HybridSpeculation(
        suffix=SuffixSpeculation(max_spec_tokens=15), tree=TreeSpeculation(drafts=[target], expansion=(1, 1, 1))))
    cold = llm.generate(prompts, GREEDY)
    warm = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in cold] == plain and [o.token_ids for o in warm] == plain
    cold_sources = [o.stats.speculation.sources for o in cold]
    warm_sources = [o.stats.speculation.sources for o in warm]
    # Random prompts hold few repeats: the draft model does the cold work; once matches grow long, the cache.
    assert sum(s.get("draft", 0) for s in cold_sources) > sum(s.get("suffix", 0) for s in cold_sources)
    assert all(s.get("suffix", 0) >= 1 for s in warm_sources)
    assert tau(warm) > tau(cold) >= 3.5  # the draft alone gives at most 4


def test_bad_suffix_settings_are_refused():
    for bad in (dict(max_spec_tokens=0), dict(max_spec_tokens=128), dict(max_spec_factor=0),
                dict(min_token_prob=1.5), dict(max_depth=0), dict(max_cached_requests=-1)):
        with pytest.raises(ValueError):
            SuffixSpeculation(**bad)
    with pytest.raises(TypeError):
        HybridSpeculation(suffix=SuffixSpeculation(), tree="smollm2-135m-draft-a")
    with pytest.raises(ValueError, match="min_score"):
        HybridSpeculation(suffix=SuffixSpeculation(), tree=TreeSpeculation(drafts=["x"], expansion=(1,)),
                          min_score=-1)


def test_cli_suffix_speculation_saves_and_reuses_its_cache(target, tmp_path, capsys):
    save_checkpoint(tmp_path / "target", target.config, target.params, target.tokenizer)
    cache = tmp_path / "cache.npz"
    command = ["generate", "--model", str(tmp_path / "target"), "--prompt", "t1 t2 t3 t4", "--max-tokens", "16",
               "--speculate", "suffix", "--suffix-cache", str(cache), "--no-stream"]
    taus = []
    for _ in range(2):
        code = cli.main(command)
        out = capsys.readouterr()
        assert code == 0, out.err
        assert len(out.out.split()) == 16 and "suffix cache saved" in out.err and "µs of host time" in out.err
        taus.append(float(re.search(r"([\d.]+) tokens per target step", out.err).group(1)))
    assert cache.exists() and taus[1] > taus[0] and taus[1] >= 3
    assert cli.main(["generate", "--prompt", "hi", "--speculate", "suffix", "--draft", "x"]) == 2
    assert "drop --draft" in capsys.readouterr().err
    assert cli.main(["generate", "--prompt", "hi", "--suffix-cache", str(cache)]) == 2
    assert "--suffix-cache needs" in capsys.readouterr().err
    assert cli.main(["generate", "--prompt", "hi", "--speculate", "hybrid"]) == 2
    assert "needs at least one --draft" in capsys.readouterr().err
