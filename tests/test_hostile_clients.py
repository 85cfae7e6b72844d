"""What a careless or hostile client may send, and what it must never do: hurt another request,
or get a 500. Each test is a defect found by trying (issue 18), kept from coming back.

Failures are injected through a real speculation method registered the way any plugin would be:
it proposes like n-gram lookup, and raises for requests whose sequence holds a poisoned token.
"""

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

import openai
import pytest

from serving.engine import Engine, QueueFull
from serving.server import create_app
from specjax import cli
from specjax.llm import LLM, GenerationError
from specjax.sampling import SamplingParams
from specjax.speculation import proposer
from specjax.speculation.ngram import NgramProposer, NgramSpeculation
from tests.test_serving import ENGINE, KEY, MODEL, request, serving, tiny_target

POISON = 77  # token t77


@dataclass(frozen=True)
class FaultySpeculation:
    method: ClassVar[str] = "faulty"


class FaultyProposer(NgramProposer):
    def propose(self, rows):
        for row in rows:
            if POISON in row.sequence:
                raise RuntimeError("poisoned sequence")
        return super().propose(rows)


@pytest.fixture(scope="module")
def target():
    return tiny_target()


@pytest.fixture(scope="module")
def faulty(target):
    proposer.register("faulty", FaultySpeculation, lambda settings, context: FaultyProposer(NgramSpeculation()))
    try:
        yield LLM(target, engine=ENGINE, seed=0, speculation=FaultySpeculation())
    finally:
        proposer.unregister("faulty")


@pytest.fixture(scope="module")
def plain(target):
    return LLM(target, engine=ENGINE, seed=0)


# Prompts of 3 or 4 tokens (one prefill shape); the third holds the poison.
PROMPTS = [[1, 2, 3, 1], [9, 8, 7], [5, POISON, 6], [20, 40, 20, 40]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=12, ignore_eos=True)


def test_a_step_failing_on_one_row_fails_that_request_alone(faulty, plain):
    innocent = [p for p in PROMPTS if POISON not in p]
    params = [GREEDY, SEEDED, GREEDY]
    clean = [o.token_ids for o in faulty.generate(innocent, params)]  # a run without the culprit
    assert clean[0] == plain.generate([innocent[0]], GREEDY)[0].token_ids  # speculation is lossless
    with pytest.raises(GenerationError, match="poisoned sequence") as failed:
        faulty.generate(PROMPTS, [GREEDY, SEEDED, GREEDY, GREEDY])
    outputs = failed.value.outputs
    assert outputs[2].finish_reason == "error" and "RuntimeError: poisoned sequence" in outputs[2].error
    assert [o.token_ids for i, o in enumerate(outputs) if i != 2] == clean
    assert all(o.finish_reason == "length" for i, o in enumerate(outputs) if i != 2)
    assert faulty.runner.pages.num_used == 0


def test_a_failure_that_takes_the_kv_cache_with_it_recomputes_everyone(plain):
    want = [o.token_ids for o in plain.generate(PROMPTS, GREEDY)]
    scheduler = plain.scheduler()
    requests = [plain.new_request(p, GREEDY) for p in PROMPTS]
    for req in requests:
        scheduler.add(req)
    for _ in range(3):
        scheduler.step()
    plain.runner.cache.k.delete()  # as a donated cache is gone after a call that failed mid-way
    while scheduler.has_work:
        scheduler.step()
    assert [r.output.token_ids for r in requests] == want
    assert all(r.output.stats.preemptions >= 1 for r in requests)  # each was recomputed in fresh caches
    assert not plain.runner.cache.k.is_deleted() and plain.runner.pages.num_used == 0


def test_top_k_past_int32_samples_like_no_top_k_and_harms_no_one(plain):
    huge = SamplingParams(temperature=0.9, top_k=2**40, seed=5, max_tokens=10, ignore_eos=True)
    unbounded = SamplingParams(temperature=0.9, top_k=0, seed=5, max_tokens=10, ignore_eos=True)
    outs = plain.generate(PROMPTS[:2], [huge, GREEDY])
    assert outs[0].token_ids == plain.generate(PROMPTS[:1], unbounded)[0].token_ids  # any k >= vocab keeps all
    assert outs[1].token_ids == plain.generate(PROMPTS[1:2], GREEDY)[0].token_ids


def test_over_http_the_culprit_gets_a_500_without_internals_and_the_others_their_text(faulty, plain):
    want = plain.generate([PROMPTS[0]], GREEDY)[0].text
    with serving(faulty, MODEL) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)

        def complete(prompt):
            try:
                out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                                extra_body={"ignore_eos": True})
                return out.choices[0].text
            except openai.InternalServerError as e:
                return e

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(complete, [PROMPTS[0], PROMPTS[2], PROMPTS[0], PROMPTS[2]]))
        for culprit in results[1::2]:
            assert isinstance(culprit, openai.InternalServerError)
            assert "poison" not in str(culprit) and "RuntimeError" not in str(culprit)
        assert results[0::2] == [want, want]
        stream = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in stream if c.choices) == want  # the server is still whole


def test_an_empty_api_key_is_refused_at_start_up(plain, capsys):
    with pytest.raises(ValueError, match="empty"):
        create_app(Engine(plain), model_name=MODEL, api_key=" ")
    assert cli.main(["serve", "--api-key", "", "--port", "0"]) == 2
    assert "--api-key (or $SPECJAX_API_KEY) is set but empty" in capsys.readouterr().err


def test_lone_surrogates_are_a_400_naming_the_field(plain):
    engine = Engine(plain)
    with serving(plain, MODEL) as (url, _):
        status, _, reply = request(url, "POST", "/v1/completions",
                                   b'{"model": "tiny", "prompt": "t1 \\ud800 t2", "max_tokens": 2}')
        assert status == 400 and reply["error"]["param"] == "prompt" and "surrogate" in reply["error"]["message"]
        status, _, reply = request(url, "POST", "/v1/chat/completions",
                                   b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}')
        assert status == 400 and reply["error"]["param"] == "messages"
    engine.stop()


def test_requests_that_free_batch_slots_take_are_not_counted_as_waiting(plain):
    engine = Engine(plain, max_queue=2)  # not started: nothing leaves the queue
    loop = _loop()
    slots = plain.runner.engine.max_num_seqs
    for _ in range(slots + 2):  # a full batch, then two waiting
        engine.submit(plain.new_request(PROMPTS[0], GREEDY), loop)
    assert engine.num_waiting == 2
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        engine.submit(plain.new_request(PROMPTS[0], GREEDY), loop)


def _loop():
    import asyncio

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return loop


def test_a_seed_reproduces_sampled_output_under_suffix_speculation(target, plain):
    from specjax.speculation.suffix import SuffixSpeculation

    suffix = LLM(target, engine=ENGINE, seed=0, speculation=SuffixSpeculation(max_spec_tokens=4))
    want = plain.generate([PROMPTS[0]], SEEDED)[0].token_ids  # plain sampling with the same seed
    alone = [suffix.generate([PROMPTS[0]], SEEDED)[0].token_ids for _ in range(3)]  # the cache learns each time
    batched = suffix.generate([PROMPTS[1], PROMPTS[0], PROMPTS[3]], SEEDED)[1].token_ids
    assert alone == [want] * 3 and batched == want
    assert suffix.generate([PROMPTS[0]], SEEDED)[0].stats.speculation.accepted > 0  # it did speculate
