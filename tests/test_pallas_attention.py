"""The Pallas tree-attention kernel (interpreted on CPU) against the XLA reference, and the dispatch.

Every comparison runs on fresh random inputs: random trees (random parents -> ancestor masks),
shuffled page tables with holes whose unused pages hold large garbage, prefixes that end mid-page
or are empty, GQA ratios 1, 3 and 8, and several prefix splits. Pallas's interpreter starts every
output buffer as NaN (``test_interpreter_poisons_unwritten_outputs`` guards that), and each tile's
partials feed the real rows' results, so a tile the kernel failed to write shows up as NaN.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import backend
from pallas_kernels.tree_attention import MAX_NEW_TOKENS, pack_bits, reference, tree_attention
from specjax.attention import AttentionMetadata, attention, causal_mask
from specjax.config import ModelConfig
from specjax.kv_cache import KVCache
from specjax.model import forward
from specjax.params import random_params
from specjax.speculation.tree import TokenTree

GARBAGE = 1e3  # unused pages: finite, but large enough that reading one visibly breaks the result


def _random_tree(rng, num_nodes: int, size: int) -> np.ndarray:
    """[size, size] ancestor mask of a tree of ``num_nodes`` nodes with random parents, padded to ``size``."""
    parents = [int(rng.integers(0, i)) for i in range(1, num_nodes)]
    return TokenTree.build(0, [0] * (num_nodes - 1), parents, size=size).ancestor_mask


def _inputs(rng, *, context_lens, t, hq, hkv, hd=16, page=4, extra_pages=1, masks="tree", tree_nodes=0,
            dtype=np.float32, layers=2, layer=1):
    """Random q/new K/V, a two-layer pool, shuffled page tables and metadata for one call."""
    b = len(context_lens)
    context_lens = np.asarray(context_lens)
    used = -(-(context_lens + tree_nodes) // page)  # pages each sequence's prefix and cached tree nodes need
    width = int(used.max()) + extra_pages
    n_pages = int(used.sum()) + 6  # holes: pages nobody uses
    order = rng.permutation(n_pages)
    tables = rng.integers(0, n_pages, (b, width))  # past the prefix: stale ids of any page
    start = 0
    for i, n in enumerate(used):
        tables[i, :n] = order[start:start + n]
        start += n
    pool_shape = (layers, n_pages, page, hkv, hd)
    unused = np.ones(n_pages, bool)
    unused[order[:start]] = False
    k_pool, v_pool = rng.standard_normal((2, *pool_shape))
    for pool in (k_pool, v_pool):
        pool[:, unused] *= GARBAGE
        pool[np.arange(layers) != layer] *= GARBAGE
    if masks == "tree":
        new_mask = np.stack([_random_tree(rng, int(rng.integers(1, t + 1)), t) for _ in range(b)])
    else:
        new_mask = np.asarray(causal_mask(b, t))
    tree_mask = rng.random((b, t, tree_nodes)) < 0.5 if tree_nodes else None
    meta = AttentionMetadata(block_tables=jnp.asarray(tables, jnp.int32),
                             context_lens=jnp.asarray(context_lens, jnp.int32), new_mask=jnp.asarray(new_mask),
                             tree_mask=None if tree_mask is None else jnp.asarray(tree_mask))
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    q = cast(rng.standard_normal((b, t, hq, hd)))
    new_k, new_v = (cast(x) for x in rng.standard_normal((2, b, t, hkv, hd)))
    return (q, new_k, new_v, cast(k_pool), cast(v_pool), jnp.int32(layer), meta)


def _assert_matches(args, **kernel_options):
    got = np.asarray(tree_attention(*args, interpret=True, **kernel_options).astype(jnp.float32))
    want = np.asarray(jax.jit(reference)(*args).astype(jnp.float32))
    assert np.isfinite(got).all()
    if args[0].dtype == jnp.bfloat16:
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


CASES = {
    # name: (input options, kernel options)
    "tree-gqa3-one-split": (dict(context_lens=[9, 0, 14], t=12, hq=6, hkv=2), dict(num_splits=1, block_k=16)),
    "tree-gqa3-two-splits": (dict(context_lens=[9, 0, 14], t=12, hq=6, hkv=2), dict(num_splits=2, block_k=16)),
    "tree-gqa3-more-splits-than-steps": (dict(context_lens=[30, 5, 0], t=12, hq=6, hkv=2),
                                         dict(num_splits=5, block_k=16)),
    "tree-gqa1": (dict(context_lens=[13, 22], t=7, hq=2, hkv=2, extra_pages=3), dict(num_splits=3, block_k=16)),
    "tree-gqa8-row-blocks": (dict(context_lens=[11, 26], t=20, hq=8, hkv=1), dict(num_splits=2, block_k=16,
                                                                               block_rows=64)),
    "single-node": (dict(context_lens=[5, 0], t=1, hq=6, hkv=2), dict(num_splits=2, block_k=16)),
    "decode-gqa8-default-splits": (dict(context_lens=[1, 16, 37], t=1, hq=8, hkv=1, masks="causal"), {}),
    "prefill-chunk": (dict(context_lens=[6, 0], t=40, hq=4, hkv=2, masks="causal"), dict(num_splits=2)),
    "prefill-chunk-at-limit": (dict(context_lens=[3], t=MAX_NEW_TOKENS, hq=2, hkv=2, masks="causal"),
                               dict(num_splits=1)),
    "bf16": (dict(context_lens=[9, 21], t=10, hq=6, hkv=2, dtype=jnp.bfloat16), dict(num_splits=2, block_k=16)),
    "draft-tree-nodes": (dict(context_lens=[6, 3, 0], t=3, hq=4, hkv=2, tree_nodes=5), dict(num_splits=2,
                                                                                         block_k=16)),
    "page-larger-than-block": (dict(context_lens=[19, 40], t=4, hq=4, hkv=2, page=32), dict(num_splits=2,
                                                                                           block_k=16)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name):
    inputs, options = CASES[name]
    _assert_matches(_inputs(np.random.default_rng(abs(hash(name)) % 2**32), **inputs), **options)


def test_interpreter_poisons_unwritten_outputs():
    """The premise of the coverage check above: an output the kernel never writes comes back NaN."""

    def writes_nothing(x_ref, o_ref):
        del x_ref, o_ref

    out = pl.pallas_call(writes_nothing, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32), interpret=True)(
        jnp.zeros(8))
    assert np.isnan(np.asarray(out)).all()


def test_pack_bits_round_trips():
    mask = np.random.default_rng(3).random((2, 5, 70)) < 0.5
    words = np.asarray(pack_bits(jnp.asarray(mask))).view(np.uint32)
    assert words.shape == (2, 5, 3)
    bits = (words[..., None] >> np.arange(32, dtype=np.uint32)) & 1
    np.testing.assert_array_equal(bits.reshape(2, 5, 96)[..., :70].astype(bool), mask)
    assert not bits.reshape(2, 5, 96)[..., 70:].any()


def _uses_pallas(fn, *args) -> bool:
    # A fresh function per trace: make_jaxpr caches traces by function, and the backend is chosen while tracing.
    return "pallas_call" in str(jax.make_jaxpr(lambda *a: fn(*a))(*args))


def test_dispatch_follows_argument_then_environment(monkeypatch):
    args = _inputs(np.random.default_rng(4), context_lens=[5], t=2, hq=2, hkv=1)
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert _uses_pallas(attention, *args) == backend.on_nvidia_gpu()  # auto: the kernel on NVIDIA GPUs only
    monkeypatch.setattr(backend, "on_nvidia_gpu", lambda: False)
    assert not _uses_pallas(attention, *args)
    assert _uses_pallas(lambda *a: attention(*a, backend="pallas"), *args)
    monkeypatch.setenv(backend.ENV_VAR, "pallas")
    assert _uses_pallas(attention, *args)
    assert not _uses_pallas(lambda *a: attention(*a, backend="xla"), *args)
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    with pytest.raises(ValueError, match="SPECJAX_ATTENTION must be one of auto, pallas, xla"):
        attention(*args)


def test_auto_falls_back_to_xla_past_the_kernel_limit(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    monkeypatch.setattr(backend, "on_nvidia_gpu", lambda: True)
    rng = np.random.default_rng(5)
    small = _inputs(rng, context_lens=[5], t=2, hq=2, hkv=1)
    assert _uses_pallas(attention, *small)
    long = _inputs(rng, context_lens=[5], t=MAX_NEW_TOKENS + 1, hq=2, hkv=1, masks="causal")
    assert not _uses_pallas(attention, *long)
    with pytest.raises(ValueError, match=f"exceed the kernel's limit of {MAX_NEW_TOKENS}"):
        attention(*long, backend="pallas")


def test_bad_inputs_raise_clear_errors():
    q, new_k, new_v, k_pool, v_pool, layer, meta = _inputs(np.random.default_rng(6), context_lens=[5, 2], t=3,
                                                           hq=4, hkv=2)
    with pytest.raises(ValueError, match="new_k and new_v must be"):
        tree_attention(q, new_k[:, :2], new_v[:, :2], k_pool, v_pool, layer, meta)
    with pytest.raises(ValueError, match="do not group onto"):
        tree_attention(q[:, :, :3], new_k, new_v, k_pool, v_pool, layer, meta)
    with pytest.raises(ValueError, match="k_pool and v_pool must be"):
        tree_attention(q, new_k, new_v, k_pool[..., :1, :], v_pool, layer, meta)
    with pytest.raises(ValueError, match="new_mask must be bool"):
        tree_attention(q, new_k, new_v, k_pool, v_pool, layer, dataclasses.replace(meta, new_mask=meta.new_mask[:1]))
    with pytest.raises(ValueError, match="context_lens must be"):
        tree_attention(q, new_k, new_v, k_pool, v_pool, layer,
                       dataclasses.replace(meta, context_lens=meta.context_lens[:1]))
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        tree_attention(q, new_k, new_v, k_pool, v_pool, layer, meta, block_k=24)
    with pytest.raises(ValueError, match="head_dim 8 is not a power of two of at least 16"):
        tree_attention(q[..., :8], new_k[..., :8], new_v[..., :8], k_pool[..., :8], v_pool[..., :8], layer, meta)


def test_model_forward_with_pallas_equals_xla(monkeypatch):
    """A tiny model's tree-verification step over a random paged cache, through each backend."""
    config = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16)
    params = random_params(config, jax.random.key(0), scale=0.3)
    rng = np.random.default_rng(7)
    *_, meta = _inputs(rng, context_lens=[7, 13], t=5, hq=4, hkv=2)
    pool_shape = (config.num_layers, meta.block_tables.size + 6, 4, 2, 16)
    cache = KVCache(*(jnp.asarray(x, jnp.float32) for x in rng.standard_normal((2, *pool_shape))))
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 5)), jnp.int32)
    positions = meta.context_lens[:, None] + jnp.arange(5)
    logits = {}
    for choice in ("pallas", "xla"):
        monkeypatch.setenv(backend.ENV_VAR, "xla" if choice == "pallas" else "pallas")  # the argument wins
        traced = jax.jit(lambda: forward(params, config, tokens, positions, cache, meta,
                                         attention_backend=choice).logits).trace()
        assert ("pallas_call" in str(traced.jaxpr)) == (choice == "pallas")
        logits[choice] = np.asarray(traced.lower().compile()())
    np.testing.assert_allclose(logits["pallas"], logits["xla"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [
    dict(t=16, tree_nodes=5, dtype=jnp.bfloat16),  # draft tree step
    dict(t=1, masks="causal", dtype=jnp.float32),  # fp32 decode
    dict(t=MAX_NEW_TOKENS, masks="causal", dtype=jnp.bfloat16),  # prefill chunk, several row blocks
])
def test_kernel_lowers_to_triton_for_cuda(shape):
    """Without a GPU, CI still checks that Pallas's Triton lowering accepts the kernel (every op it
    uses, power-of-two tiles) at Llama-3-8B's heads; compiling the Triton IR needs a GPU."""
    args = _inputs(np.random.default_rng(9), context_lens=[100, 37], hq=32, hkv=8, hd=128, page=16, **shape)
    kernel = jax.jit(lambda *a: tree_attention(*a, interpret=False))
    assert "__gpu$xla.gpu.triton" in kernel.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.gpu
def test_compiled_kernel_matches_reference_on_gpu():
    """The Triton-compiled kernel at Llama-3-8B's heads (32 q, 8 kv, dim 128), bf16, 16-token pages."""
    args = _inputs(np.random.default_rng(8), context_lens=[1000, 37, 0, 4096], t=16, hq=32, hkv=8, hd=128,
                   page=16, dtype=jnp.bfloat16)
    for splits in (1, 4, None):
        got = np.asarray(tree_attention(*args, num_splits=splits).astype(jnp.float32))
        want = np.asarray(jax.jit(reference)(*args).astype(jnp.float32))
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
