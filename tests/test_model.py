"""Logit parity with Hugging Face transformers, full forward and through the paged cache."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from specjax.attention import AttentionMetadata, causal_mask
from specjax.checkpoints.hf import load_hf
from specjax.kv_cache import INVALID_SLOT, PageTable, init_kv_cache, write_kv
from specjax.model import forward

TOL = 1e-4

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def _save_tiny(tmp_path_factory, name, config_cls, model_cls, **extra):
    torch.manual_seed(hash(name) % 1000)
    model = model_cls(config_cls(**TINY, **extra)).eval()
    with torch.no_grad():  # random norms and biases, so a dropped or misplaced one shows up
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in n else 0.0))
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path, max_shard_size="100KB")  # sharded: exercises the index file
    return model, path


@pytest.fixture(scope="module", params=["llama", "llama3-rope-tied", "qwen2"])
def tiny_pair(request, tmp_path_factory):
    """(transformers model, specjax config, specjax params) for random tiny checkpoints."""
    if request.param == "llama":
        torch_model, path = _save_tiny(tmp_path_factory, request.param, transformers.LlamaConfig,
                                       transformers.LlamaForCausalLM, tie_word_embeddings=False, rope_theta=500.0)
    elif request.param == "llama3-rope-tied":
        torch_model, path = _save_tiny(
            tmp_path_factory, request.param, transformers.LlamaConfig, transformers.LlamaForCausalLM,
            tie_word_embeddings=True, attention_bias=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32})
    else:
        torch_model, path = _save_tiny(tmp_path_factory, request.param, transformers.Qwen2Config,
                                       transformers.Qwen2ForCausalLM, tie_word_embeddings=False)
    loaded = load_hf(path, dtype=jnp.float32)
    return torch_model, loaded.config, loaded.params


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.numpy()


def test_full_forward_matches_transformers(tiny_pair):
    torch_model, config, params = tiny_pair
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (3, 37))
    b, t = tokens.shape
    meta = AttentionMetadata(block_tables=jnp.zeros((b, 0), jnp.int32), context_lens=jnp.zeros((b,), jnp.int32),
                             new_mask=causal_mask(b, t))
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    logits = forward(params, config, jnp.asarray(tokens), positions, None, meta).logits
    np.testing.assert_allclose(np.asarray(logits), _torch_logits(torch_model, tokens), atol=TOL, rtol=0)


def _paged_step(params, config, cache, pages, seq_ids, chunks):
    """Append ``chunks[i]`` to sequence ``seq_ids[i]`` through the paged cache; returns logits per chunk."""
    b, t = len(seq_ids), max(len(c) for c in chunks)
    width = max(1, max(pages.pages_for(pages.length(s)) for s in seq_ids))
    tokens = np.zeros((b, t), np.int32)
    positions = np.zeros((b, t), np.int32)
    slots = np.full((b, t), INVALID_SLOT, np.int32)
    for row, (s, chunk) in enumerate(zip(seq_ids, chunks)):
        start = pages.length(s)
        tokens[row, : len(chunk)] = chunk
        positions[row] = start + np.arange(t)
        slots[row, : len(chunk)] = pages.slots(s, start, len(chunk))
    meta = AttentionMetadata(block_tables=jnp.asarray(pages.block_table(seq_ids, width)),
                             context_lens=jnp.asarray([pages.length(s) for s in seq_ids], jnp.int32),
                             new_mask=causal_mask(b, t))
    out = forward(params, config, jnp.asarray(tokens), jnp.asarray(positions), cache, meta)
    logits, new_k, new_v = out.logits, out.new_k, out.new_v
    cache = write_kv(cache, new_k, new_v, jnp.asarray(slots))
    for s, chunk in zip(seq_ids, chunks):
        pages.commit(s, len(chunk))
    return cache, [np.asarray(logits[row, : len(c)]) for row, c in enumerate(chunks)]


def test_prefill_then_incremental_decode_matches_transformers(tiny_pair):
    """Two sequences of different lengths share a batch and a fragmented page pool."""
    torch_model, config, params = tiny_pair
    rng = np.random.default_rng(1)
    seqs = {"a": rng.integers(0, config.vocab_size, 29), "b": rng.integers(0, config.vocab_size, 18)}
    prefix = {"a": 11, "b": 5}
    pages = PageTable(num_pages=32, page_size=4)
    cache = init_kv_cache(config, 32, 4, jnp.float32)
    for s in seqs:
        pages.add(s)
    for n in range(1, 9):  # interleave page allocation so neither sequence's pages are contiguous
        for s in seqs:
            pages.reserve(s, 4 * n)

    got = {s: [] for s in seqs}
    cache, out = _paged_step(params, config, cache, pages, list(seqs), [seqs[s][: prefix[s]] for s in seqs])
    for s, logits in zip(seqs, out):
        got[s].append(logits)
    for i in range(max(len(v) - prefix[s] for s, v in seqs.items())):
        live = [s for s in seqs if prefix[s] + i < len(seqs[s])]
        cache, out = _paged_step(params, config, cache, pages, live, [seqs[s][prefix[s] + i: prefix[s] + i + 1]
                                                                       for s in live])
        for s, logits in zip(live, out):
            got[s].append(logits)

    for s, tokens in seqs.items():
        expected = _torch_logits(torch_model, tokens[None])[0]
        np.testing.assert_allclose(np.concatenate(got[s]), expected, atol=TOL, rtol=0)


def test_bf16_stored_weights_compute_like_rounded_fp32_weights(tiny_pair):
    """store_bf16 halves the weight bytes; the arithmetic is the fp32 model's on bf16-rounded weights."""
    import dataclasses

    import jax

    from specjax.linear import Bf16Bits
    from specjax.params import store_bf16

    _, config, params = tiny_pair
    lw = params.layers
    rounded = dataclasses.replace(params, layers=dataclasses.replace(
        lw, **{name: getattr(lw, name).astype(jnp.bfloat16).astype(jnp.float32)
               for name in ("wqkv", "wo", "w_gate_up", "w_down")}))
    packed = store_bf16(params)
    assert isinstance(packed.layers.wqkv, Bf16Bits) and packed.layers.wqkv.bits.dtype == jnp.uint16
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (2, 19))
    b, t = tokens.shape
    meta = AttentionMetadata(block_tables=jnp.zeros((b, 0), jnp.int32), context_lens=jnp.zeros((b,), jnp.int32),
                             new_mask=causal_mask(b, t))
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    run = jax.jit(lambda p: forward(p, config, jnp.asarray(tokens), positions, None, meta).logits)
    want, got, full = run(rounded), run(packed), run(params)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    assert np.abs(np.asarray(full) - np.asarray(got)).max() > 1e-5  # the rounding is real, not skipped


def test_forward_hidden_states_equal_transformers_on_smollm2(smollm2, smollm2_transformers):
    """``ForwardOutput.hidden`` of the requested layers equals transformers' ``output_hidden_states``
    (0: the embeddings, i: layer i's output, the last after the final norm), and so do the logits."""
    import torch

    ids = smollm2.tokenizer.encode("Draft heads read the target's own hidden states, layer by layer.")
    layers = (0, 1, smollm2.config.num_layers // 2, smollm2.config.num_layers - 1, smollm2.config.num_layers)
    b, t = 1, len(ids)
    meta = AttentionMetadata(block_tables=jnp.zeros((b, 0), jnp.int32), context_lens=jnp.zeros((b,), jnp.int32),
                             new_mask=causal_mask(b, t))
    out = forward(smollm2.params, smollm2.config, jnp.asarray([ids]), jnp.arange(t)[None], None, meta,
                  hidden_layers=layers)
    with torch.no_grad():
        want = smollm2_transformers(torch.tensor([ids]), output_hidden_states=True)
    assert out.hidden.shape == (len(layers), b, t, smollm2.config.hidden_size)
    for got, layer in zip(np.asarray(out.hidden), layers):
        reference = want.hidden_states[layer].numpy()
        np.testing.assert_allclose(got, reference, atol=2e-4 * max(1.0, float(np.abs(reference).max())), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(out.logits), want.logits.numpy(), atol=2e-3, rtol=1e-4)


def test_a_joint_forward_of_row_groups_equals_each_group_run_alone(tiny_pair):
    """``forward_groups`` shares every projection among groups of rows with their own shapes,
    caches and adapters (the base model; adapter slots per row; a ``LoraLinear`` adapter): each
    group's logits and K/V equal its forward alone (the base group's, transformers' logits), and
    the gradient of one group's loss with the others held constant equals its gradient alone."""
    import jax

    from specjax.lora import LoraAdapter, LoraConfig, adapt, init_adapter, init_slots, with_row_adapters, write_slot
    from specjax.model import RowGroup, forward_groups, joint_params

    torch_model, config, params = tiny_pair
    lora = LoraConfig(r=4, lora_alpha=8.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"))

    def random_adapter(seed):  # B random: a fresh adapter's zero B would hide a misplaced one
        fresh = init_adapter(lora, config, jax.random.key(seed))
        keys = iter(jax.random.split(jax.random.key(seed + 1), len(fresh.b)))
        return LoraAdapter(a=fresh.a, b={m: 0.2 * jax.random.normal(next(keys), x.shape) for m, x in fresh.b.items()},
                           config=lora)

    slots = write_slot(init_slots(config, 2, 4), 2, random_adapter(7), config)
    per_row = with_row_adapters(params, slots, jnp.asarray([2, 0, 2]), config)
    adapter = random_adapter(3)
    rng = np.random.default_rng(4)

    def group(b, t, constant, last=None):
        meta = AttentionMetadata(block_tables=jnp.zeros((b, 0), jnp.int32), context_lens=jnp.zeros((b,), jnp.int32),
                                 new_mask=causal_mask(b, t))
        return RowGroup(jnp.asarray(rng.integers(0, config.vocab_size, (b, t)), jnp.int32),
                        jnp.broadcast_to(jnp.arange(t), (b, t)), None, meta,
                        None if last is None else jnp.asarray(last, jnp.int32), constant=constant)

    groups = [group(2, 5, True), group(3, 4, True, last=[[3], [1], [0]]), group(1, 9, False)]

    def loss(out):
        return jnp.sum(jax.nn.log_softmax(out.logits)[..., 0] * jnp.arange(9.0))

    @jax.jit  # one executable: every one a test process compiles keeps its code mapped
    def run(a):
        def joint(a):
            return forward_groups(joint_params([params, per_row, adapt(params, a, config)]), config, groups)

        def alone(a):
            return [forward_groups(p, config, [g])[0]
                    for g, p in zip(groups, [params, per_row, adapt(params, a, config)])]

        return (joint(a), alone(a), jax.grad(lambda a: loss(joint(a)[2]))(a), jax.grad(lambda a: loss(alone(a)[2]))(a))

    together, alone, got, want = run(adapter)
    for x, y in zip(jax.tree.leaves(together), jax.tree.leaves(alone)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(together[0].logits), _torch_logits(torch_model, groups[0].tokens),
                               atol=TOL, rtol=0)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-4)
