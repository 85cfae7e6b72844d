"""Token-level finetuning (``engine.finetuning``): a sequence fed forward and backward in chunks
gets exactly ``jax.grad`` of its whole loss, computed in one piece by ``training.finetune``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax.engine.finetuning import (accumulate, apply_update, backward_chunk, forward_chunk, init_job,
                                      make_chunk)
from specjax.kv_cache import init_kv_cache
from specjax.lora import LoraAdapter, LoraConfig, init_adapter
from tests.test_serving import tiny_target
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


def test_a_job_fed_in_chunks_follows_specjax_finetunes_loss_curve(target):
    """Three optimizer steps of two sequences each, in ``specjax finetune``'s data order, fed to
    the job as chunks of 5: the same losses and the same adapter as its whole-batch train step."""
    config, base = target.config, target.params
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, config.vocab_size, (6, 12)).astype(np.int32)
    learn = rng.random((6, 12)) < 0.5
    settings = FinetuneSettings(lora=LoraConfig(r=4, lora_alpha=8.0), learning_rate=1e-2, warmup_steps=1,
                                total_steps=3, batch_size=2, seed=5)
    optimizer = sft.make_optimizer(settings)
    adapter = random_adapter(settings.lora, config, 9)

    whole_step = finetune.make_train_step(config, optimizer)
    ref_adapter, ref_opt = jax.tree.map(jnp.copy, adapter), optimizer.init(adapter)
    job = init_job(adapter, optimizer)
    for step in range(settings.total_steps):
        rows = sft.step_rows(len(tokens), step, settings.batch_size, settings.seed)
        ref_adapter, ref_opt, ref_loss = whole_step(ref_adapter, ref_opt, base, jnp.asarray(tokens[rows])[None],
                                                    jnp.asarray(learn[rows])[None])
        for row in rows:
            loss, grads = chunked_grads(target, job.adapter, tokens[row], learn[row], 5)
            job = accumulate(job, grads=grads, loss=loss, tokens=np.count_nonzero(learn[row][1:]))
        job, loss = apply_update(job, optimizer)
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5), step
    for got, want in zip(jax.tree.leaves(job.adapter), jax.tree.leaves(ref_adapter)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
