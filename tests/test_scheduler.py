"""The Scheduler under KV pressure and with logprobs, on the tiny random model of the serving tests.

Requests whose pages run out are preempted and recomputed without changing a token of greedy
output, plain or speculative (suffix drafts and draft-model trees), nor of seeded sampling, nor a
piece of a stream; the server counts the preemptions. Logprobs are the target's whether a token came from a plain step
or from a verification. One LLM serves every test: compiling its steps is what takes the time.
"""

import asyncio

import jax
import jax.numpy as jnp
import pytest

from serving.engine import Engine
from specjax.attention import AttentionMetadata, causal_mask
from specjax.kv_cache import init_kv_cache
from specjax.engine import warmup
from specjax.llm import LLM, RequestError
from specjax.model import forward
from specjax.runner import EngineConfig
from specjax.sampling import SamplingParams
from specjax.speculation.speculator import TreeSpeculation
from specjax.speculation.suffix import HybridSpeculation, SuffixSpeculation
from tests.test_serving import tiny_target

# 8 pages of 16 tokens (the tiny target's K/V take 384 bytes a token): all eight requests start
# with a page each, but cannot all grow to their 24 tokens. Prefill chunks of 4 tokens: recomputing
# a request takes several, one crossing from its prompt into its output.
TINY_POOL = EngineConfig(page_size=16, kv_cache_bytes=8 * 16 * 384, prefill_chunk=4, max_num_seqs=8,
                         min_batch_bucket=8)
PROMPTS = [f"t{i} t{i + 7} t{i + 3} t{2 * i + 1}" for i in range(1, 9)]


@pytest.fixture(scope="module")
def target():
    return tiny_target()


@pytest.fixture(scope="module")
def llm(target):
    """Suffix drafts where they score at least half a token, the target as its own draft model elsewhere."""
    return LLM(target, engine=TINY_POOL, seed=0, speculation=HybridSpeculation(
        suffix=SuffixSpeculation(max_spec_tokens=4), min_score=0.5,
        tree=TreeSpeculation(drafts=[target], expansion=(1, 1), max_nodes=3)))


def run(llm, requests) -> list[list[str]]:
    """Each request's text pieces, from a Scheduler that runs them all."""
    scheduler = llm.scheduler()
    for req in requests:
        scheduler.add(req)
    pieces = {req.uid: [] for req in requests}
    while scheduler.has_work:
        for req, delta, _ in scheduler.step():
            pieces[req.uid] += [delta] if delta else []
    return [pieces[req.uid] for req in requests]


async def serve(engine: Engine, requests) -> list[list[str]]:
    """Each request's text pieces, as the server's streams deliver them."""
    loop = asyncio.get_running_loop()
    streams = [engine.submit(req, loop) for req in requests]

    async def read(stream):
        return [text async for text in stream]

    return await asyncio.gather(*(read(s) for s in streams))


def assert_pages_free(llm):
    assert llm.runner.pages.num_used == 0 and all(r.pages.num_used == 0 for r in llm.engine.proposers["tree"].runners)


def test_preempted_requests_and_streams_read_as_if_they_ran_alone(llm):
    # Two plain requests sample with a seed: token i's key is the same however often it is recomputed.
    params = [SamplingParams(temperature=0.8 if i in (2, 6) else 0, seed=i, max_tokens=20, ignore_eos=True,
                             logprobs=1 if i == 0 else None) for i in range(len(PROMPTS))]
    alone = [llm.new_request(p, sp, speculation="none") for p, sp in zip(PROMPTS, params)]
    alone_pieces = [run(llm, [req])[0] for req in alone]
    assert not any(req.output.stats.preemptions for req in alone)
    # Half of them speculate. The first is submitted last: the newest, it is preempted first.
    requests = [llm.new_request(p, sp, speculation="default" if i % 2 else "none")
                for i, (p, sp) in enumerate(zip(PROMPTS, params))]
    engine = Engine(llm, max_queue=len(requests))
    engine.start()
    try:
        pieces = asyncio.run(serve(engine, requests[1:] + requests[:1]))
    finally:
        engine.stop()
    pieces = pieces[-1:] + pieces[:-1]
    preemptions = [req.output.stats.preemptions for req in requests]
    assert preemptions[0] > 0 and preemptions[2] + preemptions[6] > 0
    assert engine.scheduler.preemptions == sum(preemptions)
    assert f"specjax_preemptions_total {float(sum(preemptions))}" in engine.metrics.render().decode()
    for req, ref, got, want in zip(requests, alone, pieces, alone_pieces):
        assert req.output.token_ids == ref.output.token_ids and req.output.finish_reason == "length"
        assert "".join(got) == req.output.text == ref.output.text
    assert pieces[0] == alone_pieces[0]  # plain decoding: a piece per token, preempted or not
    first, ref = requests[0].output, alone[0].output
    assert [e.token_id for e in first.logprobs] == first.token_ids
    assert [e.logprob for e in first.logprobs] == pytest.approx([e.logprob for e in ref.logprobs], abs=1e-4)
    assert sum(req.output.stats.speculation.accepted for req in requests[1::2]) > 0
    assert_pages_free(llm)


def test_logprobs_are_the_same_from_plain_steps_and_verification(llm, target):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3)
    prompts = ["t1 t2 t3 t1 t2 t3 t1 t2", "t9 t8 t7"]  # the first repeats itself: the suffix cache drafts it
    plain = [llm.new_request(p, params, speculation="none") for p in prompts]
    run(llm, plain)
    speculated = [llm.new_request(p, params) for p in prompts]
    run(llm, speculated)
    sources = {}
    for req in speculated:
        for source, steps in req.output.stats.speculation.sources.items():
            sources[source] = sources.get(source, 0) + steps
    assert sources.get("suffix") and sources.get("draft")
    for req, ref in zip(speculated, plain):
        out, ref = req.output, ref.output
        assert out.token_ids == ref.token_ids == [e.token_id for e in out.logprobs]
        for got, want in zip(out.logprobs, ref.logprobs):
            assert got.logprob == pytest.approx(want.logprob, abs=1e-4) and len(got.top) == 3
            assert [i for i, _ in got.top] == [i for i, _ in want.top]
            assert [lp for _, lp in got.top] == pytest.approx([lp for _, lp in want.top], abs=1e-4)
            assert got.top[0] == (got.token_id, got.logprob)  # greedy: the likeliest token
    # The first token's: log-softmax of the raw logits of an uncached forward pass.
    ids = plain[0].output.prompt_token_ids
    meta = AttentionMetadata(block_tables=jnp.zeros((1, 1), jnp.int32), context_lens=jnp.zeros(1, jnp.int32),
                             new_mask=causal_mask(1, len(ids)))
    logits = forward(target.params, target.config, jnp.array([ids]), jnp.arange(len(ids))[None],
                           init_kv_cache(target.config, 1, 16), meta, logit_indices=jnp.array([[len(ids) - 1]])).logits
    first = plain[0].output.logprobs[0]
    assert first.logprob == pytest.approx(float(jax.nn.log_softmax(logits[0, 0])[first.token_id]), abs=1e-4)
    assert_pages_free(llm)


def test_a_request_that_cannot_fit_alone_is_refused_at_once(llm):
    with pytest.raises(RequestError, match="KV cache") as e:
        llm.new_request(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True))
    assert e.value.param == "max_tokens"




def test_requests_of_every_method_share_steps_and_decode_as_each_alone(llm, monkeypatch):
    """One batch of "none", "tree", "suffix", "hybrid" and "ngram" requests: each gives the tokens
    it gives run alone (plain decoding's), the host trees (suffix, n-gram) are verified in one pass
    and the draft-model trees in another, whichever method sent them there, and each request's
    stats are its method's."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = ["t1 t2 t3 t1 t2 t3 t1 t2", "t4 t5 t4 t5 t4"]  # they repeat themselves: suffix and n-gram draft them
    methods = ("none", "tree", "suffix", "hybrid", "ngram")
    alone = {}
    for prompt in prompts:
        for method in methods:
            req = llm.new_request(prompt, params, speculation=method)
            run(llm, [req])
            alone[prompt, method] = req.output.token_ids
        assert len({tuple(tokens) for (p, _), tokens in alone.items() if p == prompt}) == 1
    requests = [llm.new_request(prompt, params, speculation=m) for prompt in prompts for m in methods]
    passes = []  # (pass, the methods of the requests it verified)

    def spy(owner, name, ids_of):
        real = getattr(owner, name)

        def verify(*args, **kwargs):
            passes.append((name, {r.speculation for r in requests if r.uid in ids_of(*args)}))
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, verify)

    spy(llm.runner, "verify", lambda ids, *_: ids)
    spy(llm.engine.proposers["tree"], "step", lambda inputs: [x.seq_id for x in inputs])
    run(llm, requests)
    for req, (prompt, method) in zip(requests, [(p, m) for p in prompts for m in methods]):
        assert req.output.token_ids == alone[prompt, method] and req.output.stats.speculation_method == method
    assert all(req.output.stats.speculation is None for req in requests if req.speculation == "none")
    assert all(req.output.stats.speculation.steps for req in requests if req.speculation != "none")
    hybrid = [req for req in requests if req.speculation == "hybrid"]
    assert all(req.output.stats.speculation.sources for req in hybrid)
    assert not any(req.output.stats.speculation.sources for req in requests if req.speculation in ("tree", "ngram"))
    verified = [m for name, m in passes if name == "verify"]
    assert {"tree", "hybrid"} in [m for name, m in passes if name == "step"] or {"suffix", "hybrid"} <= set().union(*verified)
    assert any({"suffix", "ngram"} <= m for m in verified)  # host trees of two methods in one pass
    assert all("tree" not in m for m in verified)
    assert all(not {"suffix", "ngram"} & m for name, m in passes if name == "step")
    assert_pages_free(llm)


def test_a_request_asking_for_a_method_the_llm_lacks_is_refused(target):
    llm = LLM(target, engine=TINY_POOL, speculation=SuffixSpeculation(max_spec_tokens=4))
    assert (llm.method, llm.methods) == ("suffix", ("none", "suffix", "ngram"))
    with pytest.raises(RequestError, match='"default", "none", "suffix", "ngram"') as e:
        llm.new_request(PROMPTS[0], SamplingParams(max_tokens=4), speculation="tree")
    assert e.value.param == "speculation"


def test_a_warm_up_that_would_pass_the_memory_map_limit_stops_early_and_says_so(target, monkeypatch):
    """On a CPU every executable takes memory mappings, and past vm.max_map_count compiling
    aborts the process: the warm-up measures one shape of each kind, then refuses the rest."""
    if jax.default_backend() != "cpu":
        pytest.skip("the memory-map limit is a CPU matter")  # GPU executables live in device memory
    llm = LLM(target, engine=TINY_POOL, seed=0, speculation=SuffixSpeculation(max_spec_tokens=4))
    planned = llm.warm_up_jobs()
    # A process with room for 10 more mappings (the OS's limit, as read from /proc).
    room = warmup.maps_in_use() + 10
    monkeypatch.setattr(warmup, "max_map_count", lambda: room)
    progress = []
    with pytest.raises(ValueError, match="vm.max_map_count"):
        llm.warm_up(progress=lambda done, total: progress.append(done))
    assert progress == [1, 2]  # one plain step and one verification step, then the refusal
    assert sum(map(len, llm.warm_up_jobs().values())) == sum(map(len, planned.values())) - 2


def test_a_warmed_up_llm_compiles_nothing_while_serving(target):
    """After ``warm_up``, requests of every method, greedy and sampled, some asking for logprobs,
    batched together at several lengths, run on executables compiled ahead."""
    llm = LLM(target, engine=TINY_POOL, seed=0, speculation=HybridSpeculation(
        suffix=SuffixSpeculation(max_spec_tokens=4), min_score=0.5,
        tree=TreeSpeculation(drafts=[target], expansion=(1, 1), max_nodes=3)))
    progress, planned = [], llm.warm_up_jobs()
    assert set(planned) == {"step", "verify", "draft prompt", "tree step"} and all(planned.values())
    new = llm.warm_up(progress=lambda done, total: progress.append((done, total)))
    assert new == sum(map(len, planned.values())) and progress == [(i, new) for i in range(1, new + 1)]
    assert llm.warm_up() == 0 and not any(llm.warm_up_jobs().values())
    compiled = llm.compile_time_s
    requests = [llm.new_request(prompt, SamplingParams(temperature=0.8 * (i % 2), seed=i, max_tokens=6 + 3 * i,
                                                       ignore_eos=True, logprobs=1 if method == "none" else None),
                                speculation=method)
                for i, (prompt, method) in enumerate(zip(PROMPTS[:6], ("none", "tree", "suffix") * 2))]
    run(llm, requests)
    assert all(req.output.finish_reason == "length" for req in requests)
    assert llm.compile_time_s == compiled


def test_a_long_prompt_does_not_hold_up_short_requests(target):
    """Interleaved: a prompt arriving while a long one prefills is prefilled in its own short call
    in the next step (not padded to, nor queued behind, the long chunk); while anything decodes
    the long prompt advances by ``interleaved_prefill_chunk`` tokens a step; and every output is
    what it is alone."""
    engine = EngineConfig(page_size=16, kv_cache_bytes=1 << 20, prefill_chunk=64, interleaved_prefill_chunk=16)
    llm = LLM(target, engine=engine, seed=0)
    long_prompt = [(7 * i) % 97 + 1 for i in range(300)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = [o.token_ids for o in llm.generate([long_prompt, [5, 6, 7]], params)]

    scheduler = llm.scheduler(interleave=True)
    long_req = llm.new_request(long_prompt, params)
    scheduler.add(long_req)
    scheduler.step()
    assert long_req.prefilled == 64  # nothing decodes: a full chunk
    short = llm.new_request([5, 6, 7], params)
    scheduler.add(short)
    first = scheduler.step()
    assert [r for r, _, _ in first] == [short] and short.output.token_ids  # its first token, in one step
    assert long_req.prefilled == 128
    scheduler.step()  # the short request decodes: the long prompt's chunks shrink
    assert long_req.prefilled == 144 and len(short.output.token_ids) == 2
    while scheduler.has_work:
        scheduler.step()
    assert [long_req.output.token_ids, short.output.token_ids] == alone
