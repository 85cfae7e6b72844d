"""Fuzzing the served API (issue 18): requests generated from the server's own OpenAPI schema by
schemathesis, valid and invalid, and valid requests with one field set to an extreme value (huge
and negative integers, infinities and NaN as JSON tokens, huge, empty and unpaired-surrogate
strings, wrong types). No answer may be a 5xx, and a client that sends the same greedy request
all along gets the same text every time: nothing the fuzzer sends touches another request.
"""

import json
import threading

import requests
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from specjax.llm import LLM
from specjax.runner import EngineConfig
from specjax.sampling import SamplingParams
from tests.test_serving import KEY, MODEL, serving, tiny_target

# A short context: whatever max_tokens the fuzzer picks, a generation ends within 64 tokens.
FUZZ_ENGINE = EngineConfig(page_size=16, kv_cache_bytes=1 << 20, prefill_chunk=32, max_num_seqs=8,
                           min_batch_bucket=8, max_model_len=64)
AUTH = {"Authorization": f"Bearer {KEY}"}
FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))

EXTREMES = [2**31, 2**32, 2**63, 2**64, -2**63, -1, 0, 1e308, -1e308, 5e-324, -0.0, float("inf"),
            float("-inf"), float("nan"), "", "\x00", "\ud800", "\U0001d54f" * 5000, "t1 " * 3000, [], [[]],
            [2**40], {}, None, True, "<|im_end|>"]
FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "logprobs", "top_logprobs",
          "stream", "speculation", "prompt", "messages", "max_completion_tokens", "stream_options", "ignore_eos"]


BYSTANDER_PROMPT = "t5 t6 t7"
BYSTANDER = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def fuzzed():
    """A served tiny model, its schema, and a bystander: a thread sending one greedy request over
    and over while the tests fuzz, recording every answer; ``stop()`` ends it and returns them."""
    llm = LLM(tiny_target(), engine=FUZZ_ENGINE, seed=0)
    body = {"model": MODEL, "prompt": BYSTANDER_PROMPT, "max_tokens": BYSTANDER.max_tokens, "temperature": 0,
            "ignore_eos": True}
    with serving(llm, MODEL) as (url, _):
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        answers, done = [], threading.Event()

        def bystand():
            with requests.Session() as session:
                while not done.is_set():
                    reply = session.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=60)
                    answers.append((reply.status_code, reply.json()["choices"][0]["text"]
                                    if reply.status_code == 200 else reply.text))

        thread = threading.Thread(target=bystand, daemon=True)
        thread.start()

        def stop():
            done.set()
            thread.join(60)
            return answers

        yield url, schema, stop
        done.set()


def _served_model(case):
    # Else nearly every valid request stops at "no such model". Only a string is replaced: a
    # model of another type may be the very field an invalid case was made invalid by.
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = MODEL
    return case


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_schema_driven_requests_never_get_a_5xx(fuzzed, path, mode):
    url, schema, _ = fuzzed
    operation = schema[path]["POST"]

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode).map(_served_model))
    def check(case):
        reply = case.call(base_url=url, headers=AUTH, timeout=60)
        assert reply.status_code < 500, (case.body, reply.status_code, reply.text[:500])
        if mode is GenerationMode.NEGATIVE:
            assert reply.status_code >= 400, (case.body, reply.text[:500])

    check()


@pytest.mark.parametrize("path, base", [
    ("/v1/completions", {"model": MODEL, "prompt": "t1 t2", "max_tokens": 4}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "t1 t2"}], "max_tokens": 4}),
])
def test_extreme_values_in_any_field_never_get_a_5xx(fuzzed, path, base):
    url, _, _ = fuzzed

    @FUZZ
    @given(field=st.sampled_from(FIELDS), value=st.sampled_from(EXTREMES), stream=st.booleans())
    def check(field, value, stream):
        body = {**base, "stream": stream, field: value}
        # json.dumps writes NaN and Infinity as bare tokens, which Python's parser (and so
        # FastAPI's) accepts; unpaired surrogates as \ud800 escapes.
        data = json.dumps(body).encode()
        reply = requests.post(f"{url}{path}", data=data, timeout=60,
                              headers={**AUTH, "Content-Type": "application/json"})
        assert reply.status_code < 500, (field, value, reply.status_code, reply.text[:500])

    check()


def test_the_bystander_got_its_own_text_every_time(fuzzed):
    """Runs last: every answer the bystander got while the fuzzer ran is what it gets alone."""
    answers = fuzzed[2]()
    alone = LLM(tiny_target(), engine=FUZZ_ENGINE, seed=0).generate([BYSTANDER_PROMPT], BYSTANDER)[0].text
    assert len(answers) >= 5 and all(status == 200 for status, _ in answers), answers[:3]
    assert {text for _, text in answers} == {alone}
