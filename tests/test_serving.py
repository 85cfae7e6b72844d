"""The OpenAI-compatible server on a tiny random model with the word tokenizer, through the official
``openai`` client and plain HTTP against a real uvicorn server on 127.0.0.1: completions and chat,
streamed and not, stop strings, seeds, speculation per request, many concurrent clients, cancelled
streams, bad requests and a schema-driven fuzz pass; and ``specjax serve`` as a process: API key,
429 under overload and a draining SIGTERM."""

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import openai
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from serving.engine import Engine
from serving.server import Server, create_app
from specjax import cli
from specjax.checkpoints import LoadedModel, save_checkpoint
from specjax.llm import LLM
from specjax.params import random_params
from specjax.runner import EngineConfig
from specjax.speculation.speculator import TreeSpeculation
from specjax.speculation.suffix import HybridSpeculation, SuffixSpeculation
from specjax.tokenizer import Tokenizer
from tests.test_tree_speculation import TARGET, word_tokenizer

MODEL = "tiny"
KEY = "test-key"
# Every batch is padded to 8 rows and every sequence fits one page, so few step shapes compile.
ENGINE = EngineConfig(page_size=128, kv_cache_bytes=4 << 20, prefill_chunk=32, max_num_seqs=8, min_batch_bucket=8)
# The prompt's contents, then t100 as the assistant's cue.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}t100{% endif %}"
# Prompts of 3 or 4 tokens: their prefill steps share one compiled shape.
PROMPTS = ["t1 t2 t3 t4", "t9 t8 t7", "t20 t40 t60 t80", "t5 t50 t55"]


def tiny_target() -> LoadedModel:
    tokenizer = Tokenizer(word_tokenizer().backend, chat_template=CHAT_TEMPLATE)
    return LoadedModel(TARGET, random_params(TARGET, jax.random.key(0), scale=0.3), tokenizer, "tiny target")


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def serving(llm: LLM, model_name: str, app_options: dict | None = None, **server_options):
    """A real server for ``llm`` in a thread, on a free port of 127.0.0.1; yields its URL and the
    uvicorn server."""
    engine = Engine(llm, max_queue=32)
    uvicorn_server = Server(create_app(engine, model_name=model_name, **{"api_key": KEY, **(app_options or {})}), engine,
                            log_level="warning", **server_options)
    sock = free_socket()
    thread = threading.Thread(target=uvicorn_server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uvicorn_server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", uvicorn_server
    finally:
        uvicorn_server.should_exit = True
        thread.join(30)
    assert llm.runner.pages.num_used == 0


@pytest.fixture(scope="module")
def server():
    """The server in a thread, hybrid: suffix drafts that score at least half a token, else the
    target as its own draft model, so every greedy draft-model proposal is accepted."""
    target = tiny_target()
    llm = LLM(target, engine=ENGINE, seed=0, speculation=HybridSpeculation(
        suffix=SuffixSpeculation(max_spec_tokens=4), min_score=0.5,
        tree=TreeSpeculation(drafts=[target], expansion=(1, 1), max_nodes=3)))
    with serving(llm, MODEL, app_options=dict(expose_speculation_stats=True)) as (url, _):
        yield url, llm


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def request(url: str, method: str, path: str, body=None, headers=None) -> tuple[int, dict, object]:
    """(status, headers, JSON body or text) of one plain HTTP request; ``body`` bytes go as they are."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Authorization": f"Bearer {KEY}",
                                                   "Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    try:
        return response.status, dict(response.getheaders()), json.loads(text)
    except json.JSONDecodeError:
        return response.status, dict(response.getheaders()), text


def metric(url: str, name: str) -> float:
    _, _, text = request(url, "GET", "/metrics")
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def greedy(client, prompt, max_tokens, **extra):
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                    extra_body=extra or None)
    return out.choices[0].text


def test_completions_and_chat_streamed_and_not(client, server):
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert len(choice.text.split()) == 12 and choice.finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (4, 12, 16)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices

    messages = [{"role": "system", "content": "t7 t8"}, {"role": "user", "content": [{"type": "text", "text": "t9"}]}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens == 4  # t7 t8 t9 t100
    assert chat.choices[0].message.content == greedy(client, "t7 t8 t9 t100", 8)
    pieces = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == chat.choices[0].message.content
    assert pieces[-1].choices[0].finish_reason == "length"
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_stop_strings(client):
    words = greedy(client, PROMPTS[1], 16).split()
    stop = " " + words[6]
    cut = " ".join(words[: words.index(words[6])])
    out = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop, "zz"])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0,
                                              stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut and streamed[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    def sample(seed, **extra):
        return client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0.9, seed=seed,
                                         extra_body=extra or None).choices[0].text

    # Draft-model trees, not suffix drafts: those change as the cache learns, and a sampled token
    # depends on the tree that verified it (it follows the target's distribution all the same).
    assert sample(7, speculation="tree") == sample(7, speculation="tree")
    assert sample(7, speculation="none") == sample(7, speculation="none") and sample(8) != sample(7)


def test_every_speculation_method_gives_the_same_greedy_text_in_one_batch(client, server):
    """Requests asking for each method the hybrid server offers, all in flight at once: plain
    decoding's text, each reply and metric under the request's own method."""
    url, _ = server
    methods = ("none", "tree", "suffix", "hybrid", "default")
    prompt = "t1 t2 t3 t1 t2 t3 t1 t2"  # repeats itself: the suffix cache drafts it
    steps = {m: metric(url, f'specjax_speculation_steps_total{{method="{m}"}}') for m in methods[1:4]}
    with ThreadPoolExecutor(len(methods) * 2) as pool:
        replies = list(pool.map(lambda m: client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=20, temperature=0, extra_body={"speculation": m}), methods * 2))
    assert len({r.choices[0].text for r in replies}) == 1 and len(replies[0].choices[0].text.split()) == 20
    spec = [r.model_extra["speculation"] for r in replies]
    assert spec[0] is None and [s["method"] for s in spec[1:5]] == ["tree", "suffix", "hybrid", "hybrid"]
    assert spec[1]["tau"] > 2.5 and spec[1]["acceptance_rate"] == 1.0  # the target drafts for itself
    for m in methods[1:4]:
        assert metric(url, f'specjax_speculation_steps_total{{method="{m}"}}') > steps[m]
    assert metric(url, 'specjax_speculation_tau{method="suffix"}') > 1


@pytest.mark.parametrize("choice", ["chain", "Tree", ""])
def test_an_unknown_speculation_method_gets_400_listing_the_methods(client, choice):
    with pytest.raises(openai.BadRequestError) as e:
        greedy(client, PROMPTS[3], 4, speculation=choice)
    message = e.value.body["message"]
    assert e.value.body["param"] == "speculation" and '"default", "none", "tree", "suffix", "hybrid"' in message


def test_logprobs_are_the_targets_with_and_without_speculation_streamed_or_not(client):
    def completion(stream=False, **extra):
        return client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=12, temperature=0, logprobs=2,
                                         stream=stream, extra_body=extra or None)

    on, off = completion().choices[0], completion(speculation="none").choices[0]
    assert on.text == off.text and on.logprobs.tokens == off.logprobs.tokens and len(on.logprobs.tokens) == 12
    assert on.logprobs.token_logprobs == pytest.approx(off.logprobs.token_logprobs, abs=1e-4)
    assert on.logprobs.tokens[0] == on.text.split()[0] and on.logprobs.text_offset[:2] == [0, len(on.text.split()[0])]
    for token, logprob, top in zip(on.logprobs.tokens, on.logprobs.token_logprobs, on.logprobs.top_logprobs):
        # Greedy: the chosen token is the likeliest, so it is among the two alternatives.
        assert len(top) == 2 and top[token] == logprob == max(top.values()) and logprob < 0
    streamed = [c.choices[0].logprobs for c in completion(stream=True) if c.choices and c.choices[0].logprobs]
    assert sum((lp.tokens for lp in streamed), []) == on.logprobs.tokens
    assert sum((lp.token_logprobs for lp in streamed), []) == pytest.approx(on.logprobs.token_logprobs, abs=1e-4)
    assert sum((lp.text_offset for lp in streamed), []) == on.logprobs.text_offset
    assert client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=2).choices[0].logprobs is None

    messages = [{"role": "user", "content": PROMPTS[0]}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 6
    assert [c.token for c in content] == chat.choices[0].message.content.split()  # the word tokenizer's tokens
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token and c.bytes == list(c.token.encode())
               for c in content)
    pieces = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                            logprobs=True, stream=True)
    streamed = sum((p.choices[0].logprobs.content for p in pieces if p.choices[0].logprobs), [])
    assert [c.token for c in streamed] == [c.token for c in content] and all(not c.top_logprobs for c in streamed)
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-4)


def test_concurrent_clients_all_complete_once_and_correctly(client, server):
    """32 clients, 3 requests each, of mixed lengths, streamed or not, of every speculation method, greedy or
    sampled, all in flight together: every one completes with its own text and the pages come back."""
    url, llm = server
    full = {p: greedy(client, p, 24).split() for p in PROMPTS}

    def run(worker: int) -> list[tuple]:
        results = []
        for i in range(3):
            prompt, max_tokens = PROMPTS[(worker + i) % 4], 4 + (worker * 3 + i * 5) % 21
            extra = {"speculation": ("none", "default", "tree", "suffix")[(worker // 2 + i) % 4]}
            sampled = worker % 8 == 7
            kwargs = dict(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0.8 if sampled else 0,
                          seed=worker if sampled else None, extra_body=extra)
            if (worker + i) % 2:
                text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
                rid = None
            else:
                out = client.completions.create(**kwargs)
                text, rid = out.choices[0].text, out.id
            results.append((prompt, max_tokens, sampled, text, rid))
        return results

    start = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        results = [r for rs in pool.map(run, range(32), timeout=240) for r in rs]
    assert time.monotonic() - start < 240
    assert len(results) == 96
    ids = [r[4] for r in results if r[4]]
    assert len(ids) == len(set(ids))
    for prompt, max_tokens, sampled, text, _ in results:
        assert len(text.split()) == max_tokens
        if not sampled:
            assert text.split() == full[prompt][:max_tokens]
    assert metric(url, "specjax_kv_pages_used") == 0 and metric(url, "specjax_requests_running") == 0
    assert metric(url, "specjax_requests_waiting") == 0


def test_clients_that_leave_cancel_their_requests_and_free_the_pages_at_once(client, server):
    url, _ = server
    aborts = 'specjax_requests_total{finish_reason="abort"}'

    def wait_for_abort(before):
        deadline = time.monotonic() + 10
        while metric(url, aborts) == before:
            assert time.monotonic() < deadline, "the server did not notice the client leave"
            time.sleep(0.01)
        assert metric(url, "specjax_kv_pages_used") == 0 and metric(url, "specjax_requests_running") == 0

    before = metric(url, aborts)
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=120, temperature=0, stream=True,
                                       extra_body={"speculation": "none"})
    next(iter(stream))
    stream.close()
    wait_for_abort(before)

    before = metric(url, aborts)
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 120, "speculation": "none"})
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        deadline = time.monotonic() + 10
        while metric(url, "specjax_requests_running") == 0:
            assert time.monotonic() < deadline, "the request never ran"
            time.sleep(0.005)
    wait_for_abort(before)


def test_metrics_health_and_schema(client, server):
    url, _ = server
    assert request(url, "GET", "/health")[:1] == (200,)
    client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0)
    status, headers, text = request(url, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("specjax_requests_waiting", "specjax_requests_running", "specjax_kv_pages_total",
                 "specjax_generation_tokens_total", "specjax_preemptions_total",
                 "specjax_time_to_first_token_seconds_bucket", "specjax_time_per_output_token_seconds_count",
                 'specjax_speculation_tau{method="hybrid"}', 'specjax_speculation_acceptance_rate{method="hybrid"}'):
        assert name in text
    assert metric(url, "specjax_kv_pages_total") > 0 and metric(url, "specjax_generation_tokens_total") >= 3
    assert metric(url, "specjax_compile_seconds") > 0  # the server compiled its steps on first use
    status, _, schema = request(url, "GET", "/openapi.json")
    assert status == 200 and {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(schema["paths"])


@pytest.mark.parametrize("body, status, param", [
    (b'{"model": "tiny", "prompt": "t1", ', 400, None),  # malformed JSON
    (b'[1, 2]', 400, None),
    ({"prompt": "t1"}, 400, "model"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "prompt": "t1", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "t1", "max_tokens": True}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "t1", "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "prompt": "t1", "stop": 5}, 400, "stop"),
    ({"model": "tiny", "prompt": "t1", "stop": [""]}, 400, "stop"),
    ({"model": "tiny", "prompt": "t1", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "prompt": "t1", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "t1", "seed": -1}, 400, "seed"),
    ({"model": "tiny", "prompt": "t1", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "t1", "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "t1", "n": 2}, 400, "n"),
    ({"model": "tiny", "prompt": "t1", "logprobs": 6}, 400, "logprobs"),
    ({"model": "tiny", "prompt": "t1", "logprobs": True}, 400, "logprobs"),
    ({"model": "tiny", "prompt": "t1", "speculation": "bogus"}, 400, "speculation"),
    ({"model": "tiny", "prompt": ["t1", "t2"]}, 400, "prompt"),
    ({"model": "tiny", "prompt": [5, 1000]}, 400, "prompt"),
    ({"model": "tiny", "prompt": "   "}, 400, "prompt"),
    ({"model": "tiny", "prompt": "t1 " * 600}, 400, "prompt"),
    ({"model": "other", "prompt": "t1"}, 404, "model"),
])
def test_bad_completion_requests_get_4xx_naming_the_field(server, body, status, param):
    got, _, reply = request(server[0], "POST", "/v1/completions", body)
    assert got == status, reply
    assert isinstance(reply["error"]["message"], str) and reply["error"]["param"] == param


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny", "messages": "t1"}, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "t1"}]}, "messages[0].role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "t1"}], "tools": []}, "tools"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "t1"}], "max_tokens": 4,
      "max_completion_tokens": 4}, "max_completion_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "t1"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "t1"}], "max_completion_tokens": 600},
     "max_completion_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "t1"}], "top_logprobs": 2}, "top_logprobs"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "t1"}], "logprobs": True, "top_logprobs": 6},
     "top_logprobs"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "t1"}], "logprobs": 1}, "logprobs"),
])
def test_bad_chat_requests_get_400_naming_the_field(server, body, param):
    got, _, reply = request(server[0], "POST", "/v1/chat/completions", body)
    assert got == 400 and reply["error"]["param"] == param, reply


def test_wrong_or_missing_api_key_gets_401(server):
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    status, _, reply = request(server[0], "GET", "/v1/models", headers={"Authorization": ""})
    assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    assert request(server[0], "GET", "/v1/nowhere")[0] == 404


def _fuzz_bodies(schema: dict, name: str):
    """Request bodies for the properties of ``name`` in the served OpenAPI schema: plausible values
    (some out of range), with at most one field (or an unknown one) replaced by junk. Outputs stay
    a few tokens long so the pass is fast."""
    junk = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                     st.text(max_size=6), st.lists(st.integers(-3, 120), max_size=3),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
    short = st.one_of(st.integers(1, 3), st.sampled_from([0, -1, 10**6]))
    words = st.lists(st.integers(0, 110).map(lambda i: f"t{i}"), max_size=4).map(" ".join)
    plausible = {
        "model": st.just(MODEL), "prompt": st.one_of(words, st.lists(st.integers(-1, 105), max_size=4)),
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool"]),
                                                    "content": words}), max_size=2),
        "max_tokens": short, "max_completion_tokens": short, "temperature": st.floats(-0.5, 2),
        "top_p": st.floats(-0.5, 1.5), "top_k": st.integers(-1, 200), "seed": st.integers(-1, 2**33),
        "stop": st.one_of(words, st.lists(st.text(max_size=3), max_size=2)), "n": st.integers(0, 2),
        "stream": st.booleans(), "speculation": st.sampled_from(["none", "default", "tree", "x"]),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    }
    fields = list(schema["components"]["schemas"][name]["properties"])
    required = {f: plausible[f] for f in ("model", "prompt", "messages") if f in fields}
    if "messages" in fields:  # chat's default output is the rest of the context: always cap it here
        required["max_tokens"] = short
    optional = {f: plausible.get(f, junk) for f in fields if f not in required}
    spoiled = st.sampled_from([None, "surprise"] + fields)
    return st.tuples(st.fixed_dictionaries(required, optional=optional), spoiled, junk).map(
        lambda t: t[0] if t[1] is None else {**t[0], t[1]: t[2]})


def test_schema_fuzz_finds_no_server_errors(server):
    url, _ = server
    _, _, schema = request(url, "GET", "/openapi.json")
    for path, name in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):

        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(body=_fuzz_bodies(schema, name))
        def post(body):
            status, _, reply = request(url, "POST", path, body)
            assert status < 500, (body, reply)
            assert status == 200 or isinstance(reply["error"]["message"], str), (body, reply)

        post()
    assert metric(url, "specjax_kv_pages_used") == 0


def test_a_drain_past_its_deadline_cancels_what_still_runs():
    llm = LLM(tiny_target(), engine=ENGINE)
    with serving(llm, MODEL, drain_timeout=0) as (url, uvicorn_server):
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        with pytest.raises(openai.BadRequestError) as e:  # a server without speculation offers n-gram lookup only
            greedy(client, PROMPTS[0], 2, speculation="tree")
        assert e.value.body["param"] == "speculation"
        assert '"default", "none", "ngram" (no speculation' in e.value.body["message"]
        stream = iter(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=120, temperature=0,
                                                stream=True))
        next(stream)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.completions.create, model=MODEL, prompt=PROMPTS[1], max_tokens=120)
            deadline = time.monotonic() + 10
            while metric(url, "specjax_requests_running") < 2:
                assert time.monotonic() < deadline, "the second request never ran"
                time.sleep(0.005)
            uvicorn_server.handle_exit(signal.SIGTERM, None)  # as the signal handler would
            last = list(stream)[-1].choices[0]  # OpenAI's clients know no "abort": an extension field says it
            assert last.finish_reason == "stop" and last.model_extra["finish_detail"] == "abort"
            with pytest.raises(openai.InternalServerError) as e:
                waiting.result(timeout=30)
            assert e.value.status_code == 503 and "shutting down" in e.value.message


@pytest.mark.slow
def test_the_built_in_model_answers_a_chat(smollm2):
    """SmolLM2-135M with its own chat template: the reply ends at its end-of-turn token."""
    llm = LLM(smollm2, engine=EngineConfig(kv_cache_bytes=32 << 20, max_num_seqs=2))
    with serving(llm, "smollm2-135m") as (url, _):
        chat = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120).chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0)
    assert "Paris" in chat.choices[0].message.content and chat.choices[0].finish_reason == "stop"


# -- specjax serve as a process ----------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--max-batch", "0"], "--max-batch must be positive"),
    (["--max-queue", "-1"], "--max-queue must be positive"),
    (["--port", "70000"], "--port must be in"),
    (["--speculate", "tree"], "needs at least one --draft"),
])
def test_serve_refuses_bad_flags_before_loading_anything(flags, message, capsys):
    assert cli.main(["serve", "--model", "no-such-model", *flags]) == 2
    assert message in capsys.readouterr().err


def start_serve(model_dir, *flags) -> tuple[subprocess.Popen, str]:
    """``specjax serve`` of ``model_dir`` in a child process on a free port, once /health answers;
    returns the process and its URL."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "specjax.cli", "serve", "--model", str(model_dir), "--served-model-name", MODEL,
         "--port", str(port), *flags],
        env={**os.environ, "SPECJAX_API_KEY": KEY}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise AssertionError(process.stdout.read())
        try:
            if request(url, "GET", "/health")[0] == 200:
                return process, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the server did not come up")
        time.sleep(0.2)


def test_serve_process_api_key_overload_and_draining_sigterm(tmp_path):
    """``specjax serve`` with one slot and a one-request queue: the key from the environment, 429
    for a third request, then SIGTERM: 503 for new requests while the running and the waiting one
    (of --default-max-tokens tokens) finish, and exit status 0.

    Without a warm-up or a compilation cache, the running request stops to compile each larger
    prefix bucket (1 s or so each): that is the window the other requests arrive in (warmed up, the
    tiny model's 200 tokens take under 0.2 s)."""
    target = tiny_target()
    save_checkpoint(tmp_path / "tiny", target.config, target.params, target.tokenizer)
    process, url = start_serve(tmp_path / "tiny", "--max-batch", "1", "--max-queue", "1", "--kv-cache-mb", "4",
                               "--default-max-tokens", "5", "--compile-cache", "")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()

        running = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=200, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
        first = next(iter(running))
        with ThreadPoolExecutor(2) as pool:
            waiting = pool.submit(client.completions.create, model=MODEL, prompt=PROMPTS[1], temperature=0)
            while metric(url, "specjax_requests_waiting") < 1:
                time.sleep(0.01)
            status, headers, reply = request(url, "POST", "/v1/completions",
                                             {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 2})
            assert status == 429 and headers["retry-after"] == "1" and reply["error"]["code"] == "rate_limit_exceeded"

            process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            status, _, reply = request(url, "POST", "/v1/completions", {"model": MODEL, "prompt": "t1", "max_tokens": 2})
            assert status == 503 and reply["error"]["type"] == "server_error"
            rest = list(running)
            assert len((first.choices[0].text + "".join(c.choices[0].text for c in rest)).split()) == 200
            assert rest[-1].choices[0].finish_reason == "length"
            assert len(waiting.result(timeout=60).choices[0].text.split()) == 5  # --default-max-tokens
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_warmup_compiles_ahead_into_its_cache_and_a_restart_reuses_it(tmp_path):
    """``--warmup``: the server compiles before /health answers, and requests then compile nothing;
    ``--compile-cache``: a second server over the same cache loads those executables instead."""
    target = tiny_target()
    save_checkpoint(tmp_path / "tiny", target.config, target.params, target.tokenizer)
    flags = ("--max-batch", "1", "--max-model-len", "256", "--warmup", "--compile-cache", str(tmp_path / "xla"))
    warm_up_seconds = []
    for _ in range(2):
        process, url = start_serve(tmp_path / "tiny", *flags)
        try:
            warm_up_seconds.append(metric(url, "specjax_compile_seconds"))
            client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
            with ThreadPoolExecutor(2) as pool:
                texts = list(pool.map(lambda p: greedy(client, p, 200, ignore_eos=True), PROMPTS[:2]))
            assert all(len(text.split()) == 200 for text in texts)
            assert metric(url, "specjax_compile_seconds") == warm_up_seconds[-1]
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert any((tmp_path / "xla").iterdir())
    assert 0 < warm_up_seconds[1] < warm_up_seconds[0] / 2
