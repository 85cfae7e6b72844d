"""Co-serving: token-level finetuning (``engine.finetuning``) gets exactly ``jax.grad`` of a
sequence's whole loss, computed in one piece by ``training.finetune``; a job co-served with
inference (``engine.coserving``) follows ``specjax finetune``'s loss curve while inference output
stays what it is without it; the policy keeps predicted step times under the SLOs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax import LLM, SamplingParams
from specjax.config import ConfigError
from specjax.engine.coserving import SLO, CoservingPolicy, JobLimit
from specjax.engine.finetuning import backward_chunk, forward_chunk, make_chunk
from specjax.finetune import Examples
from specjax.kv_cache import init_kv_cache, kv_bytes_per_token
from specjax.lora import LoraAdapter, LoraConfig, init_adapter
from specjax.speculation.ngram import NgramSpeculation
from tests.test_serving import ENGINE, tiny_target
from specjax import finetune as sft
from specjax.finetune import FinetuneSettings
from training import finetune
from training.finetune import loss_sum


@pytest.fixture(scope="module")
def target():
    return tiny_target()


def random_adapter(config: LoraConfig, model, seed: int) -> LoraAdapter:
    """PEFT's initialisation has B = 0, which would hide any error in the A gradients' chain.
    (test_lora has its twin; importing it would skip these tests wherever PEFT is missing.)"""
    adapter = init_adapter(config, model, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(adapter.b)))
    return LoraAdapter(a=adapter.a, b={m: 0.3 * jax.random.normal(next(keys), x.shape) for m, x in adapter.b.items()},
                       config=config)


_forward = jax.jit(forward_chunk, static_argnums=2)
_backward = jax.jit(backward_chunk, static_argnums=2)


def chunked_grads(target, adapter, tokens, learn, chunk_size, page_size=4):
    """One sequence through the forward phase in order and the backward phase in reverse: its
    summed loss and the summed gradient shares."""
    config, base = target.config, target.params
    pages = -(-len(tokens) // page_size)
    kv = init_kv_cache(config, pages, page_size)
    kv_grad = init_kv_cache(config, pages, page_size)
    starts = list(range(0, len(tokens), chunk_size))
    losses = []
    for start in starts:
        kv, loss = _forward(adapter, base, config, kv, make_chunk(tokens, learn, start, chunk_size))
        losses.append(float(loss))
    total = jax.tree.map(jnp.zeros_like, adapter)
    for start in reversed(starts):
        grads, kv_grad = _backward(adapter, base, config, kv, kv_grad, make_chunk(tokens, learn, start, chunk_size))
        total = jax.tree.map(jnp.add, total, grads)
    return sum(losses), total


@pytest.mark.parametrize("chunk_size, modules", [(4, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj")),
                                                 (5, ("k_proj", "v_proj"))])
def test_chunked_gradients_equal_jax_grad_of_the_whole_sequence_loss(target, chunk_size, modules):
    """Chunks of 4 and 5 tokens (the last one padded) over 17 tokens; adapters on every projection,
    and on k/v only (whose gradient reaches the loss mostly through later chunks' attention)."""
    rng = np.random.default_rng(chunk_size)
    tokens = rng.integers(0, target.config.vocab_size, 17).astype(np.int32)
    learn = rng.random(17) < 0.6
    adapter = random_adapter(LoraConfig(r=4, lora_alpha=8.0, target_modules=modules), target.config, chunk_size)
    loss, grads = chunked_grads(target, adapter, tokens, learn, chunk_size)

    def whole(a):
        return loss_sum(a, target.params, target.config, jnp.asarray(tokens)[None], jnp.asarray(learn)[None])[0]

    want_loss, want = jax.value_and_grad(whole)(adapter)
    assert loss == pytest.approx(float(want_loss), rel=1e-5)
    for name in ("a", "b"):
        for m in modules:
            got, ref = np.asarray(getattr(grads, name)[m]), np.asarray(getattr(want, name)[m])
            assert np.abs(ref).max() > 0, (name, m)
            np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4 * np.abs(ref).max(), err_msg=f"{name} {m}")


def test_a_chunk_outside_the_sequence_is_refused():
    with pytest.raises(ValueError, match="outside the sequence of 3 tokens"):
        make_chunk(np.array([1, 2, 3]), np.array([0, 1, 1]), 3, 4)


# ---------------------------------------------------------------------------- co-served jobs
COSERVING = dataclasses.replace(ENGINE, page_size=8, max_finetune_jobs=2, max_finetune_len=24, finetune_chunks=(16,))
PROMPTS = ["t1 t2 t3 t4", "t9 t8 t7", "t20 t40 t60 t80", "t5 t50 t55"]


def job_data(config, seed: int = 3) -> Examples:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (6, 20)).astype(np.int32)
    learn = rng.random((6, 20)) < 0.5
    learn[:, 0] = False
    return Examples(tokens, learn)


JOB = FinetuneSettings(lora=LoraConfig(r=4, lora_alpha=8.0), learning_rate=1e-2, warmup_steps=1, total_steps=3,
                       batch_size=2, seed=5, max_len=20)


def whole_batch_run(target, settings: FinetuneSettings, data: Examples, on_step=None):
    """``specjax finetune``'s losses and adapter for the same settings and data; ``on_step(steps
    done, adapter)`` after each step."""
    optimizer = sft.make_optimizer(settings)
    adapter = init_adapter(settings.lora, target.config, jax.random.key(settings.seed))
    step_fn = finetune.make_train_step(target.config, optimizer)
    opt_state, losses = optimizer.init(adapter), []
    for step in range(settings.total_steps):
        rows = sft.step_rows(len(data), step, settings.batch_size * settings.grad_accum, settings.seed)
        adapter, opt_state, loss = step_fn(adapter, opt_state, target.params, jnp.asarray(data.tokens[rows])[None],
                                           jnp.asarray(data.learn[rows])[None])
        losses.append(float(loss))
        if on_step is not None:
            on_step(step + 1, adapter)
    return losses, adapter


def run_requests(llm: LLM, methods: list[str]) -> list:
    """Greedy generations with logprobs of ``PROMPTS``, each with its speculation method (the
    plain ones shorter, so the last steps verify n-gram trees only)."""
    scheduler = llm.scheduler()
    requests = [llm.engine.make_request(prompt, SamplingParams(max_tokens=14 if method != "none" else 6,
                                                               temperature=0.0, logprobs=2), speculation=method)
                for prompt, method in zip(PROMPTS, methods)]
    for req in requests:
        scheduler.add(req)
    while scheduler.has_work:
        scheduler.step()
    return [r.output for r in requests]


@pytest.fixture(scope="module")
def without_coserving(target):
    """``run_requests`` of ``METHODS`` on an engine without co-serving, its pool ``POOL`` pages."""
    per_page = COSERVING.page_size * kv_bytes_per_token(target.config, jnp.float32)
    alone = LLM(target, engine=dataclasses.replace(COSERVING, kv_cache_bytes=POOL * per_page, max_finetune_jobs=0),
                speculation=NgramSpeculation(num_speculative_tokens=1))
    return run_requests(alone, METHODS)


# A pool of 10 pages: the requests need 10 at their longest, the job's sequence 3. The engines
# with co-serving set two jobs' K/V gradients (4 pages each) aside besides it, so their steps are
# the same executables (the test run's compilation cache has them).
POOL = 10
METHODS = ["none", "ngram", "none", "ngram"]


def coserving_llm(target, **engine) -> LLM:
    per_page = COSERVING.page_size * kv_bytes_per_token(target.config, jnp.float32)
    # SLOs no step time comes near: which steps take slices depends on none of this machine's timings.
    return LLM(target, engine=dataclasses.replace(COSERVING, kv_cache_bytes=(POOL + 2 * 4) * per_page, **engine),
               speculation=NgramSpeculation(num_speculative_tokens=1), slo=SLO(ttft_s=1e3, tpot_s=1e3))


def assert_same_generations(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        for a, b in zip(g.logprobs, w.logprobs):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def finish_and_compare(target, llm: LLM, job, data) -> None:
    """Run ``job`` to its end on the idle engine; its losses and adapter must be ``specjax finetune``'s."""
    scheduler = llm.scheduler()
    while scheduler.finetuning:  # the engine is idle: the job runs alone
        scheduler.step()
    want_losses, want_adapter = whole_batch_run(target, JOB, data)
    assert job.status == "succeeded"
    assert [loss for _, loss in job.losses] == pytest.approx(want_losses, rel=1e-5)
    for g, w in zip(jax.tree.leaves(llm.engine.finetuner.state(job.id).adapter), jax.tree.leaves(want_adapter)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)


def test_inference_is_unchanged_by_a_job_and_the_job_follows_specjax_finetune(target, without_coserving):
    """Greedy generations with logprobs while a job is co-served (its slices fused into plain
    decode steps and into n-gram trees' verification, and run alone when the engine is idle)
    equal those of the same engine without co-serving; the job's losses and adapter are those of
    ``specjax finetune``'s whole-batch steps. The pool is small enough that requests take the
    job's pages back (it starts its sequence again), and still the job stays exact. The steps
    the slices run in were compiled ahead by the warm-up (none compiles on first use)."""
    coserving = coserving_llm(target)
    finetuner = coserving.engine.finetuner
    # The page bucket these requests and the job's sequence need (each executable compiled in a
    # test process keeps its code mapped, and the run's maps are limited).
    for compile_ahead in coserving.warm_up_jobs(max_len=48, finetune_lora=JOB.lora)["finetune"]:
        compile_ahead()
    runner = coserving.runner
    warmed = {key for key in runner._compiled._executables if "finetune" in key}
    data = job_data(target.config)
    job = finetuner.add("job", JOB, data)
    got = run_requests(coserving, METHODS)
    fused = {key[0] for key in runner._ran if "finetune" in key[1:]}
    assert fused == {"step", "verify"}, f"slices joined only {fused} steps"
    assert finetuner.evictions, "no request took the job's pages back"
    assert_same_generations(got, without_coserving)
    finish_and_compare(target, coserving, job, data)
    assert {key for key in runner._compiled._executables if "finetune" in key} == warmed


def test_a_job_with_validation_data_reports_the_validation_loss_of_the_steps_it_evaluates(target):
    """Every ``eval_every`` steps and after the last, a job runs its validation conversations
    forward (chunks of the same slices) with that step's adapter: their mean loss per learnt
    token is ``specjax finetune``'s evaluation of the adapter its whole-batch run has after the
    same step, and the training itself is unchanged by it."""
    llm = coserving_llm(target)
    data, held_out = job_data(target.config), job_data(target.config, seed=11)
    settings = dataclasses.replace(JOB, eval_every=2)
    job = llm.engine.finetuner.add("job", settings, data, validation=held_out)
    scheduler = llm.scheduler()
    while scheduler.finetuning:
        scheduler.step()
    adapters = {}
    losses, _ = whole_batch_run(target, settings, data,
                                on_step=lambda step, adapter: adapters.update({step: jax.tree.map(jnp.copy, adapter)}))
    assert job.status == "succeeded"
    assert [loss for _, loss in job.losses] == pytest.approx(losses, rel=1e-5)
    assert [step for step, _ in job.valid_losses] == [2, 3]
    for step, loss in job.valid_losses:
        assert loss == pytest.approx(finetune.evaluate(target.config, target.params, adapters[step], held_out, 4),
                                     rel=1e-5)


def test_time_sharing_runs_slices_in_steps_of_their_own_between_inference_steps(target, without_coserving):
    """The baseline co-serving is measured against: with ``finetune_fusion`` off, slices run alone
    between the decode steps (the engine is never idle while the requests run), no step fuses
    one, and inference and the job are as exact as with fusion."""
    sharing = coserving_llm(target, finetune_fusion=False)
    finetuner = sharing.engine.finetuner
    data = job_data(target.config)
    job = finetuner.add("job", JOB, data)
    got = run_requests(sharing, METHODS)
    assert finetuner.slices["alone"] > 0 and finetuner.slices["fused"] == 0
    assert not [key for key in sharing.runner._compiled._executables if key[0] != "finetune" and "finetune" in key]
    assert_same_generations(got, without_coserving)
    finish_and_compare(target, sharing, job, data)


# ---------------------------------------------------------------------------- the policy
def policy_with(slo: SLO, decode: float, alone: dict[int, float], added: dict[int, float] | None = None):
    """A policy whose predictions are synthetic: decode steps of ``decode`` seconds, and slices
    of each chunk costing ``alone`` seconds alone and ``added`` to a decode step."""
    policy = CoservingPolicy(slo, tuple(alone))
    policy.inference.observe(4, 1, 8, decode)
    for chunk, seconds in alone.items():
        policy.observe_alone(False, chunk, seconds)
        policy.observe_fused(False, chunk, 4, 1, 8, decode + (added or alone)[chunk])
    return policy


@pytest.mark.parametrize("seed", range(20))
def test_the_policy_keeps_predicted_step_times_under_the_tpot_slo(seed):
    """Random cost tables: the chunk chosen is the largest whose predicted time per token (decode,
    this iteration's other steps, the host's share, and the slice) stays under the SLO's margin,
    found by brute force."""
    rng = np.random.default_rng(seed)
    chunks = [4, 16, 64, 256]
    per_token = rng.uniform(1e-4, 1e-3)
    added = {c: per_token * c * rng.uniform(0.5, 1.0) for c in chunks}
    decode, spent = rng.uniform(0.01, 0.05), rng.uniform(0.0, 0.02)
    slo = SLO(tpot_s=rng.uniform(0.02, 0.3), margin=0.9)
    policy = policy_with(slo, decode, {c: 2 * added[c] for c in chunks}, added)
    host = rng.uniform(0.0, 0.02, 2)
    for seconds in host:
        policy.observe_overhead(seconds)
    overhead = host[0] + policy.alpha * (host[1] - host[0])
    chosen = policy.fused_chunk(False, 4, 1, 8, spent, ttft_at_risk=False)
    fits = [c for c in chunks if decode + spent + overhead + added[c] <= 0.9 * slo.tpot_s]
    assert chosen == (max(fits) if fits else None)
    if chosen is not None:
        assert (policy.inference.cost(4, 1, 8) + spent + policy.overhead
                + policy.slice_cost(False, chosen, fused=True)) <= 0.9 * slo.tpot_s
    # Time-sharing: the slice runs alone after the decode step, at its cost alone.
    alone = [c for c in chunks if decode + spent + overhead + 2 * added[c] <= 0.9 * slo.tpot_s]
    assert policy.fused_chunk(False, 4, 1, 8, spent, ttft_at_risk=False, fused=False) == (max(alone) if alone else None)


def test_finetuning_pauses_at_peak_and_while_time_to_first_token_is_at_risk():
    slo = SLO(ttft_s=1.0, tpot_s=0.05)
    cheap = {4: 0.001, 16: 0.004}
    assert policy_with(slo, 0.02, cheap).fused_chunk(False, 4, 1, 8, 0.0, ttft_at_risk=False) == 16
    peak = policy_with(slo, 0.05, cheap)  # decode steps alone take the whole TPOT target
    assert peak.fused_chunk(False, 4, 1, 8, 0.0, ttft_at_risk=False) is None
    policy = policy_with(slo, 0.02, cheap)
    assert policy.ttft_at_risk([0.1]) is False and policy.ttft_at_risk([0.6]) is True
    assert policy.fused_chunk(False, 4, 1, 8, 0.0, ttft_at_risk=True) is None
    assert CoservingPolicy(SLO(), (4,)).ttft_at_risk([0.0]) is True  # no target: any wait comes first


def test_an_untimed_chunk_is_priced_from_the_nearest_timed_one_and_tried_smallest_first():
    policy = policy_with(SLO(tpot_s=0.1), 0.02, {16: 0.008})
    assert policy.slice_cost(False, 64, fused=True) == pytest.approx(0.032)
    assert policy.slice_cost(True, 16, fused=True) is None  # no backward slice timed yet
    assert policy.fused_chunk(True, 4, 1, 8, 0.0, ttft_at_risk=False) == 16


def test_job_limits_are_refused_with_their_reason(target):
    llm = LLM(target, engine=dataclasses.replace(COSERVING, max_finetune_jobs=1))
    data = job_data(target.config)
    llm.engine.finetuner.add("a", JOB, data)
    with pytest.raises(JobLimit, match="at most 1 at once"):
        llm.engine.finetuner.add("b", JOB, data)
    llm.engine.finetuner.remove("a")
    with pytest.raises(ValueError, match="max_len 64 exceeds the longest finetuning sequence this engine holds, 24"):
        llm.engine.finetuner.add("c", dataclasses.replace(JOB, max_len=64), data)
    with pytest.raises(ConfigError, match="tpot_s must be a positive number"):
        SLO(tpot_s=0)


def test_slos_the_device_misses_without_finetuning_are_refused_at_start_up(target):
    strict = LLM(target, engine=COSERVING, slo=SLO(tpot_s=1e-7))
    with pytest.raises(ConfigError, match="the TPOT SLO of 0.0 ms cannot be kept: one request's decode step takes"):
        strict.engine.finetuner.check_slo()
    assert strict.runner.pages.num_used == 0
    loose = LLM(target, engine=COSERVING, slo=SLO(ttft_s=1e3, tpot_s=1e3))
    measured = loose.engine.finetuner.check_slo()
    assert loose.engine.finetuner.policy.inference.cost(1, 1, 8) == measured["decode"] > 0
