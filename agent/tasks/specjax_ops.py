"""specjax's own hot ops: attention over the paged KV cache (decode, and token-tree verification),
per-head RMSNorm fused with RoPE (Qwen3-style QK-norm), and grouped LoRA for mixed-adapter batches.

The references are specjax's production code paths (``specjax.attention.paged_attention``,
``specjax.model.rms_norm``/``apply_rope``); the attention tasks also take specjax's Pallas
``tree_attention`` kernel as a production baseline. Metadata is passed as plain arrays (block
tables, context lengths, the new tokens' mask), the fields of ``AttentionMetadata``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from agent.tasks import Task, as64, normal
from pallas_kernels.tree_attention import tree_attention as pallas_tree_attention
from specjax.attention import AttentionMetadata, causal_mask, paged_attention
from specjax.model import apply_rope, rms_norm

HIGHEST = lax.Precision.HIGHEST


def tree_attention(q, new_k, new_v, k_pool, v_pool, layer, block_tables, context_lens, new_mask):
    """``paged_attention`` with the metadata as arrays. q [B, T, Hq, hd]; new_k/new_v [B, T, Hkv, hd];
    k_pool/v_pool [L, N, page, Hkv, hd]; layer int32 []; block_tables [B, P]; context_lens [B];
    new_mask [B, T, T] bool -> [B, T, Hq, hd].
    """
    return paged_attention(q, new_k, new_v, k_pool, v_pool, layer,
                           AttentionMetadata(block_tables, context_lens, new_mask))


def decode_attention(q, new_k, new_v, k_pool, v_pool, layer, block_tables, context_lens):
    """One new token per sequence (T = 1): ``tree_attention`` with a one-entry mask."""
    return tree_attention(q, new_k, new_v, k_pool, v_pool, layer, block_tables, context_lens,
                          causal_mask(q.shape[0], 1))


def _pallas_tree(q, new_k, new_v, k_pool, v_pool, layer, block_tables, context_lens, new_mask):
    return pallas_tree_attention(q, new_k, new_v, k_pool, v_pool, layer,
                                 AttentionMetadata(block_tables, context_lens, new_mask))


def _pallas_decode(q, new_k, new_v, k_pool, v_pool, layer, block_tables, context_lens):
    return _pallas_tree(q, new_k, new_v, k_pool, v_pool, layer, block_tables, context_lens,
                        causal_mask(q.shape[0], 1))


def rmsnorm_rope(x, weight, cos, sin, *, eps: float):
    """Per-head RMSNorm then RoPE (Qwen3's q/k norm). x [B, T, H, hd]; weight [hd]; cos, sin [B, T, hd / 2]."""
    return apply_rope(rms_norm(x, weight, eps), cos, sin)


def grouped_lora(y, x, lora_a, lora_b, adapter_ids, *, scaling: float):
    """y + scaling * (x A[id]) B[id] per row, rows without an adapter (id -1) unchanged (Punica's SGMV).

    y [M, N]; x [M, D]; lora_a [A, D, r]; lora_b [A, r, N]; adapter_ids [M] int32 -> [M, N] in y's dtype.
    """
    f32 = jnp.float32

    def add_adapter(acc, a):
        rows = (adapter_ids == a)[:, None]
        shrunk = jnp.dot(jnp.where(rows, x, 0), lora_a[a], preferred_element_type=f32, precision=HIGHEST)
        return acc + jnp.dot(shrunk.astype(x.dtype), lora_b[a], preferred_element_type=f32, precision=HIGHEST), None

    delta, _ = lax.scan(add_adapter, jnp.zeros(y.shape, f32), jnp.arange(lora_a.shape[0]))
    return (y.astype(f32) + scaling * delta).astype(y.dtype)


def _attention_oracle(q, new_k, new_v, k_pool, v_pool, layer, block_tables, context_lens, new_mask=None):
    q, new_k, new_v, k_pool, v_pool = as64(q, new_k, new_v, k_pool, v_pool)
    b, t, hq, hd = q.shape
    page, hkv = k_pool.shape[2], k_pool.shape[3]
    if new_mask is None:
        new_mask = np.ones((b, 1, 1), bool)
    out = np.zeros_like(q)
    for i in range(b):
        n = int(context_lens[i])
        pos = np.arange(n)
        ids = block_tables[i, pos // page]
        keys = np.concatenate([k_pool[int(layer), ids, pos % page], new_k[i]])  # [n + T, Hkv, hd]
        vals = np.concatenate([v_pool[int(layer), ids, pos % page], new_v[i]])
        for j in range(t):
            seen = np.concatenate([np.ones(n, bool), new_mask[i, j]])
            for h in range(hq):
                kv = h // (hq // hkv)
                s = keys[seen, kv] @ q[i, j, h] / np.sqrt(hd)
                p = np.exp(s - s.max())
                out[i, j, h] = p @ vals[seen, kv] / p.sum()
    return out


def _rmsnorm_rope_oracle(x, weight, cos, sin, *, eps):
    x, weight, cos, sin = as64(x, weight, cos, sin)
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight
    half = x.shape[-1] // 2
    c, s = cos[:, :, None], sin[:, :, None]
    return np.concatenate([y[..., :half] * c - y[..., half:] * s, y[..., half:] * c + y[..., :half] * s], -1)


def _lora_oracle(y, x, lora_a, lora_b, adapter_ids, *, scaling):
    y, x, lora_a, lora_b = as64(y, x, lora_a, lora_b)
    out = y.copy()
    for m, a in enumerate(np.asarray(adapter_ids)):
        if a >= 0:
            out[m] += scaling * (x[m] @ lora_a[a] @ lora_b[a])
    return out


def _tree_mask(rng, t):
    """[t, t] ancestor mask of a random tree (node 0 the root, each node's parent an earlier node)."""
    mask = np.eye(t, dtype=bool)
    for i in range(1, t):
        mask[i] |= mask[int(rng.integers(0, i))]
    return mask


def _paged_inputs(s, rng, t):
    b, hq, hkv, hd, page, layers = s["b"], s["hq"], s["hkv"], s["hd"], s["page"], 2
    lens = rng.integers(1, s["max_context"] + 1, b)
    lens[0] = s["max_context"]  # the longest sequence fills the table
    per_seq = -(-lens // page)
    width = int(per_seq.max())
    n_pages = int(per_seq.sum()) + 4  # some pages belong to nobody
    order = rng.permutation(n_pages)
    tables = rng.integers(0, n_pages, (b, width)).astype(np.int32)  # past a prefix: stale ids
    start = 0
    for i, n in enumerate(per_seq):
        tables[i, :n] = order[start:start + n]
        start += n
    dt = s["dtype"]
    pools = [normal(rng, (layers, n_pages, page, hkv, hd), dt) for _ in range(2)]
    new = [normal(rng, (b, t, h, hd), dt) for h in (hq, hkv, hkv)]
    return (*new, *pools, np.int32(1), tables, lens.astype(np.int32))


def _decode_inputs(s, rng):
    return _paged_inputs(s, rng, 1)


def _tree_inputs(s, rng):
    return (*_paged_inputs(s, rng, s["t"]), np.stack([_tree_mask(rng, s["t"]) for _ in range(s["b"])]))


def _rmsnorm_rope_inputs(s, rng):
    b, t, h, hd = s["b"], s["t"], s["h"], s["hd"]
    pos = rng.integers(0, 8192, (b, t))
    angles = pos[..., None] * 5e5 ** (-np.arange(0, hd, 2) / hd)
    # Projection outputs carry a few large channels, which RMSNorm exists to tame.
    x = rng.standard_normal((b, t, h, hd)) * np.where(rng.uniform(size=hd) < 0.05, 20.0, 1.0)
    weight = 1 + 0.1 * rng.standard_normal(hd)
    dt = jnp.dtype(s["dtype"])
    return x.astype(dt), weight.astype(dt), np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _lora_inputs(s, rng):
    m, d, n, a, r, dt = s["m"], s["d"], s["n"], s["adapters"], s["rank"], s["dtype"]
    # Mixed batch: a skewed share per adapter, a fifth of the rows on the base model only.
    weights = np.append(1.0 / np.arange(1, a + 1), a * 0.25 / (1.0 / np.arange(1, a + 1)).sum())
    ids = rng.choice(np.append(np.arange(a), -1), m, p=weights / weights.sum()).astype(np.int32)
    return (normal(rng, (m, n), dt), normal(rng, (m, d), dt), normal(rng, (a, d, r), dt, d**-0.5),
            normal(rng, (a, r, n), dt, r**-0.5), ids)


_ATTN_TOL = {"float32": (1e-5, 1e-4), "bfloat16": (1e-2, 2e-2)}
_SMALL_ATTN = {"hd": 16, "page": 4, "dtype": "float32"}
# Llama-3-8B: 32 query heads, 8 KV heads of 128; SmolLM2-135M: 9 and 3 of 64. Pages of 16 tokens.
_LLAMA = {"hq": 32, "hkv": 8, "hd": 128, "page": 16, "dtype": "bfloat16"}
_SMOL = {"hq": 9, "hkv": 3, "hd": 64, "page": 16, "dtype": "bfloat16"}

TASKS = (
    Task("paged_decode_attention", "specjax", 1, "decode attention (one new token) over the paged KV cache, GQA",
         decode_attention, _decode_inputs, _attention_oracle,
         ({"b": 3, "hq": 4, "hkv": 2, "max_context": 13, **_SMALL_ATTN},),
         ({"b": 64, "max_context": 4096, **_LLAMA}, {"b": 1, "max_context": 32768, **_LLAMA},
          {"b": 128, "max_context": 2048, **_SMOL}),
         lambda s: 4 * s["b"] * s["hq"] * s["hd"] * s["max_context"], vary={"max_context": 5}, tolerance=_ATTN_TOL,
         baselines={"pallas_tree_attention": _pallas_decode}, gpu_baselines=("pallas_tree_attention",)),
    Task("tree_attention_paged", "specjax", 2, "token-tree verification attention over the paged cache (tree mask)",
         tree_attention, _tree_inputs, _attention_oracle,
         ({"b": 2, "t": 6, "hq": 4, "hkv": 1, "max_context": 9, **_SMALL_ATTN},),
         ({"b": 16, "t": 64, "max_context": 4096, **_LLAMA}, {"b": 1, "t": 128, "max_context": 16384, **_LLAMA},
          {"b": 64, "t": 16, "max_context": 2048, **_SMOL}),
         lambda s: 4 * s["b"] * s["t"] * s["hq"] * s["hd"] * s["max_context"], vary={"max_context": 5},
         tolerance=_ATTN_TOL, baselines={"pallas_tree_attention": _pallas_tree}, gpu_baselines=("pallas_tree_attention",),
         inputs_note="random token trees (random parents); shuffled page tables with unused pages"),
    Task("rmsnorm_rope", "specjax", 2, "per-head RMSNorm fused with RoPE (Qwen3 q/k norm, specjax's norm and rope)",
         rmsnorm_rope, _rmsnorm_rope_inputs, _rmsnorm_rope_oracle,
         ({"b": 2, "t": 5, "h": 3, "hd": 16, "eps": 1e-6, "dtype": "float32"},),
         ({"b": 1, "t": 8192, "h": 32, "hd": 128, "eps": 1e-6, "dtype": "bfloat16"},
          {"b": 256, "t": 1, "h": 40, "hd": 128, "eps": 1e-6, "dtype": "bfloat16"}),
         lambda s: 10 * s["b"] * s["t"] * s["h"] * s["hd"], static_keys=("eps",), vary={"t": 1},
         tolerance={"float32": (1e-5, 1e-4), "bfloat16": (2e-2, 2e-2)}),
    Task("grouped_lora", "specjax", 2, "mixed-adapter LoRA (shrink then expand per row's adapter) added to y",
         grouped_lora, _lora_inputs, _lora_oracle,
         ({"m": 12, "d": 16, "n": 8, "adapters": 3, "rank": 4, "scaling": 2.0, "dtype": "float32"},),
         ({"m": 256, "d": 4096, "n": 4096, "adapters": 8, "rank": 16, "scaling": 2.0, "dtype": "bfloat16"},
          {"m": 4096, "d": 4096, "n": 14336, "adapters": 4, "rank": 16, "scaling": 2.0, "dtype": "bfloat16"}),
         lambda s: 2 * s["m"] * s["rank"] * (s["d"] + s["n"]), static_keys=("scaling",), vary={"m": 4},
         tolerance={"float32": (1e-5, 1e-4), "bfloat16": (2e-2, 2e-2)}),
)
