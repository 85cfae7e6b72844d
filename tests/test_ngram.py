"""Prompt-lookup (n-gram) speculation: the lookup against brute force, lossless greedy output on
the built-in SmolLM2-135M, more than two tokens per target step where the output copies its
prompt, and the method offered to requests and on the command line."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specjax import cli
from specjax.llm import LLM
from specjax.runner import EngineConfig
from specjax.sampling import SamplingParams
from specjax.speculation.ngram import NgramSpeculation, lookup

# The model copies a list it was given: the tokens ahead are all in the prompt.
COPY_PROMPT = [{"role": "user", "content": "Repeat this list exactly, one item per line, and nothing else:\n"
                + "\n".join(f"- {fruit}" for fruit in ("apple", "banana", "cherry", "damson", "elderberry", "fig",
                                                        "grape", "huckleberry", "kiwi", "lemon", "mango", "nectarine"))}]


def brute_force_lookup(sequence: list[int], n: int, k: int) -> list[int]:
    """The tokens after the latest earlier occurrence of the last n tokens, by scanning back."""
    if len(sequence) <= n:
        return []
    tail = sequence[-n:]
    for start in range(len(sequence) - n - 1, -1, -1):
        if sequence[start: start + n] == tail:
            return sequence[start + n: start + n + k]
    return []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=40), st.integers(1, 4), st.integers(1, 6))
def test_lookup_equals_brute_force(sequence, n, k):
    assert lookup(np.asarray(sequence, np.int64), n, k).tolist() == brute_force_lookup(sequence, n, k)


def test_bad_ngram_settings_are_refused():
    for kwargs, field in (({"num_speculative_tokens": 0}, "num_speculative_tokens"),
                          ({"min_ngram": 3, "max_ngram": 2}, "min_ngram"),
                          ({"match_prob": 0.0}, "match_prob")):
        with pytest.raises(ValueError, match=field):
            NgramSpeculation(**kwargs)


@pytest.fixture(scope="module")
def ngram_llm(smollm2):
    return LLM(smollm2, engine=EngineConfig(kv_cache_bytes=64 << 20, max_model_len=512), seed=0,
               speculation=NgramSpeculation(num_speculative_tokens=8))


def test_ngram_is_lossless_and_pays_where_the_output_copies_the_prompt(ngram_llm):
    params = SamplingParams(temperature=0, max_tokens=48)
    plain = ngram_llm.new_request(COPY_PROMPT, params, speculation="none")
    copied = ngram_llm.new_request(COPY_PROMPT, params)
    for req in (plain, copied):
        scheduler = ngram_llm.scheduler()
        scheduler.add(req)
        while scheduler.has_work:
            scheduler.step()
    assert copied.output.token_ids == plain.output.token_ids and "cherry" in copied.output.text
    spec = copied.output.stats.speculation
    assert copied.output.stats.speculation_method == "ngram" and spec.tau > 2, spec.as_dict()
    assert ngram_llm.runner.pages.num_used == 0


def test_every_llm_offers_ngram_to_its_requests(smollm2):
    llm = LLM(smollm2, engine=EngineConfig(kv_cache_bytes=64 << 20, max_model_len=512))
    assert llm.method == "none" and "ngram" in llm.methods
    params = SamplingParams(temperature=0, max_tokens=24)
    plain, ngram = (llm.generate([COPY_PROMPT], params)[0],
                    llm.engine.make_request(COPY_PROMPT, params, "ngram"))
    scheduler = llm.scheduler()
    scheduler.add(ngram)
    while scheduler.has_work:
        scheduler.step()
    assert ngram.output.token_ids == plain.token_ids and ngram.output.stats.speculation.steps > 0


def test_cli_speculates_with_ngram(capsys):
    code = cli.main(["generate", "--chat", "--prompt", COPY_PROMPT[0]["content"], "--max-tokens", "32",
                     "--speculate", "ngram", "--speculative-tokens", "8", "--no-stream"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "n-gram lookup" in out.err and "apple" in out.out
    assert float(re.search(r"([\d.]+) tokens per target step", out.err).group(1)) > 2
    assert cli.main(["generate", "--prompt", "hi", "--speculate", "ngram", "--draft", "x"]) == 2
    assert "drop --draft" in capsys.readouterr().err
