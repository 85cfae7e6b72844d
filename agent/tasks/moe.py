"""Mixture of experts: routing, token permutation, grouped matmul over experts, the fused layer.

Interfaces follow the production MoE path (vLLM's ``fused_moe(hidden, w1, w2, gating_output, topk,
renormalize)``, megablocks/``lax.ragged_dot`` for the grouped matmul). Shapes: Mixtral-8x7B (d 4096,
ffn 14336, 8 experts, top 2, softmax then renormalise) and DeepSeek-V2-Lite (d 2048, expert ffn
1408, 64 routed experts, top 6, no renormalisation).

Router logits are data-dependent, so they are golden-style, not i.i.d. noise: generated
deterministically from the seed with a skewed expert popularity (Zipf, exponent 1.1, as real
routers are unbalanced) and a gap of at least 0.05 between each token's consecutive logits, so the
top-k choice is never a near-tie that rounding could flip between a candidate and the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from agent.tasks import Task, as64, normal

HIGHEST = lax.Precision.HIGHEST
MIN_GAP = 0.05


def golden_router_logits(rng: np.random.Generator, tokens: int, experts: int) -> np.ndarray:
    """[tokens, experts] fp32 logits: experts ordered per token by popularity-weighted Gumbel draws."""
    popularity = np.log(1.0 / np.arange(1, experts + 1) ** 1.1)[rng.permutation(experts)]
    order = np.argsort(-(popularity + rng.gumbel(size=(tokens, experts))), axis=1)
    levels = 2.0 - np.cumsum(rng.uniform(MIN_GAP, 1.0, (tokens, experts)), axis=1)
    logits = np.empty((tokens, experts), np.float32)
    np.put_along_axis(logits, order, levels.astype(np.float32), axis=1)
    return logits


def route(logits, *, top_k: int, renormalize: bool):
    """logits [M, E] -> (weights [M, k] fp32, expert ids [M, k] int32), by descending weight.

    Softmax over all experts, then the top k (Mixtral and DeepSeek-V2's order); ``renormalize``
    rescales the k weights to sum to one (Mixtral), off for DeepSeek-V2-Lite.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, ids = lax.top_k(probs, top_k)
    if renormalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights, ids.astype(jnp.int32)


def permute(x, expert_ids, *, num_experts: int):
    """Group token copies by expert. x [M, D]; expert_ids [M, k] ->
    (x_sorted [M * k, D], group_sizes [E] int32, order [M * k] int32).

    Row r of x_sorted is token ``order[r] // k``'s copy for slot ``order[r] % k``; rows are sorted by
    expert, ties kept in (token, slot) order (a stable sort).
    """
    flat = expert_ids.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    sizes = jnp.zeros(num_experts, jnp.int32).at[flat].add(1)
    return x[order // expert_ids.shape[1]], sizes, order


def grouped_matmul(lhs, rhs, group_sizes):
    """lhs [M, K] rows grouped by expert (group_sizes [E], summing to M); rhs [E, K, N] -> [M, N].

    Rows of group e are multiplied by rhs[e]. Plain JAX: every expert's product masked to its rows.
    """
    ends = jnp.cumsum(group_sizes)
    group = jnp.searchsorted(ends, jnp.arange(lhs.shape[0]), side="right")  # each row's expert

    def add_expert(acc, e):
        rows = (group == e)[:, None]
        part = jnp.dot(jnp.where(rows, lhs, 0), rhs[e], preferred_element_type=jnp.float32, precision=HIGHEST)
        return acc + part, None

    out, _ = lax.scan(add_expert, jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32), jnp.arange(rhs.shape[0]))
    return out.astype(lhs.dtype)


def ragged_dot_baseline(lhs, rhs, group_sizes):
    """XLA's grouped matmul, the production path in JAX MoE layers."""
    return lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32,
                          precision=HIGHEST).astype(lhs.dtype)


def unpermute(y_sorted, order, weights):
    """Weighted sum of each token's expert outputs. y_sorted [M * k, D]; order [M * k]; weights [M, k] -> [M, D]."""
    m, k = weights.shape
    back = jnp.zeros((m * k, y_sorted.shape[1]), jnp.float32).at[order].set(y_sorted.astype(jnp.float32))
    return jnp.einsum("mkd,mk->md", back.reshape(m, k, -1), weights.astype(jnp.float32),
                      precision=HIGHEST).astype(y_sorted.dtype)


def fused_moe(x, w_gate_up, w_down, gating_output, *, top_k: int, renormalize: bool, matmul=grouped_matmul):
    """A SwiGLU MoE layer. x [M, D]; w_gate_up [E, D, 2F] (gate then up); w_down [E, F, D];
    gating_output [M, E] router logits -> [M, D].
    """
    weights, ids = route(gating_output, top_k=top_k, renormalize=renormalize)
    xs, sizes, order = permute(x, ids, num_experts=w_gate_up.shape[0])
    gate, up = jnp.split(matmul(xs, w_gate_up, sizes), 2, axis=-1)
    h = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(x.dtype)
    return unpermute(matmul(h, w_down, sizes), order, weights)


def fused_moe_ragged(x, w_gate_up, w_down, gating_output, *, top_k: int, renormalize: bool):
    return fused_moe(x, w_gate_up, w_down, gating_output, top_k=top_k, renormalize=renormalize,
                     matmul=ragged_dot_baseline)


def _route_oracle(logits, *, top_k, renormalize):
    (logits,) = as64(logits)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ids = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]
    w = np.take_along_axis(p, ids, axis=-1)
    return (w / w.sum(-1, keepdims=True) if renormalize else w), ids.astype(np.int32)


def _permute_oracle(x, expert_ids, *, num_experts):
    (x,) = as64(x)
    m, k = expert_ids.shape
    order = [t * k + s for e in range(num_experts) for t in range(m) for s in range(k) if expert_ids[t, s] == e]
    sizes = np.bincount(expert_ids.reshape(-1), minlength=num_experts).astype(np.int32)
    return x[[o // k for o in order]], sizes, np.asarray(order, np.int32)


def _grouped_oracle(lhs, rhs, group_sizes):
    lhs, rhs = as64(lhs, rhs)
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    start = 0
    for e, size in enumerate(np.asarray(group_sizes)):
        out[start:start + size] = lhs[start:start + size] @ rhs[e]
        start += size
    return out


def _unpermute_oracle(y_sorted, order, weights):
    y_sorted, weights = as64(y_sorted, weights)
    m, k = weights.shape
    out = np.zeros((m, y_sorted.shape[1]))
    for r, o in enumerate(np.asarray(order)):
        out[o // k] += weights[o // k, o % k] * y_sorted[r]
    return out


def _fused_oracle(x, w_gate_up, w_down, gating_output, *, top_k, renormalize):
    weights, ids = _route_oracle(gating_output, top_k=top_k, renormalize=renormalize)
    x, w_gate_up, w_down = as64(x, w_gate_up, w_down)
    f = w_down.shape[1]
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for s in range(top_k):
            e = ids[t, s]
            h = x[t] @ w_gate_up[e]
            out[t] += weights[t, s] * ((h[:f] / (1 + np.exp(-h[:f])) * h[f:]) @ w_down[e])
    return out


def _router_inputs(s, rng):
    return (golden_router_logits(rng, s["m"], s["e"]),)


def _golden_ids(s, rng):
    logits = golden_router_logits(rng, s["m"], s["num_experts"])
    return np.argsort(-logits, axis=1)[:, :s["top_k"]].astype(np.int32)


def _permute_inputs(s, rng):
    return normal(rng, (s["m"], s["d"]), s["dtype"]), _golden_ids(s, rng)


def _grouped_inputs(s, rng):
    m, k, n, e, dt = s["m"], s["k"], s["n"], s["e"], s["dtype"]
    popularity = 1.0 / np.arange(1, e + 1) ** 1.1
    sizes = rng.multinomial(m, rng.permutation(popularity / popularity.sum())).astype(np.int32)
    return normal(rng, (m, k), dt), normal(rng, (e, k, n), dt, k**-0.5), sizes


def _unpermute_inputs(s, rng):
    ids = _golden_ids(s, rng)
    order = np.argsort(ids.reshape(-1), kind="stable").astype(np.int32)
    weights = rng.dirichlet(np.ones(s["top_k"]), s["m"]).astype(np.float32)
    return normal(rng, (s["m"] * s["top_k"], s["d"]), s["dtype"]), order, weights


def _fused_inputs(s, rng):
    m, d, f, e, dt = s["m"], s["d"], s["f"], s["e"], s["dtype"]
    return (normal(rng, (m, d), dt), normal(rng, (e, d, 2 * f), dt, d**-0.5), normal(rng, (e, f, d), dt, f**-0.5),
            golden_router_logits(rng, m, e))


_MIXTRAL = {"d": 4096, "f": 14336, "e": 8, "top_k": 2, "renormalize": True}
_DEEPSEEK = {"d": 2048, "f": 1408, "e": 64, "top_k": 6, "renormalize": False}
_TOL = {"float32": (1e-4, 1e-4), "bfloat16": (2e-2, 2e-2)}
_BF16 = {"dtype": "bfloat16"}
_PERMUTE_SMALL = ({"m": 10, "d": 8, "num_experts": 8, "top_k": 2, "dtype": "float32"},)
_PERMUTE_BENCH = ({"m": 8192, "d": 4096, "num_experts": 8, "top_k": 2, **_BF16},
                  {"m": 8192, "d": 2048, "num_experts": 64, "top_k": 6, **_BF16})

TASKS = (
    Task("moe_topk_router", "moe", 1, "softmax over expert logits, top-k experts and weights (golden logits)",
         route, _router_inputs, _route_oracle,
         ({"m": 16, "e": 8, "top_k": 2, "renormalize": True, "dtype": "float32"},
          {"m": 12, "e": 16, "top_k": 6, "renormalize": False, "dtype": "float32"}),
         ({"m": 8192, "e": 8, "top_k": 2, "renormalize": True, "dtype": "float32"},
          {"m": 8192, "e": 64, "top_k": 6, "renormalize": False, "dtype": "float32"}),
         lambda s: 5 * s["m"] * s["e"], static_keys=("top_k", "renormalize"), vary={"m": 4},
         inputs_note="golden router logits: skewed (Zipf) expert popularity, top-k gaps >= 0.05"),
    Task("moe_permute", "moe", 1, "group token copies by expert (stable), with group sizes and the order",
         permute, _permute_inputs, _permute_oracle,
         _PERMUTE_SMALL, _PERMUTE_BENCH,
         lambda s: 0.0, static_keys=("num_experts",), vary={"m": 3},
         inputs_note="expert ids from golden router logits"),
    Task("moe_grouped_matmul", "moe", 1, "grouped matmul over experts (ragged_dot): rows of group e times W[e]",
         grouped_matmul, _grouped_inputs, _grouped_oracle,
         ({"m": 24, "k": 16, "n": 8, "e": 4, "dtype": "float32"}, {"m": 20, "k": 8, "n": 12, "e": 6, "dtype": "float32"}),
         ({"m": 16384, "k": 4096, "n": 28672, "e": 8, **_BF16},   # Mixtral gate_up, 8192 tokens x top 2
          {"m": 16384, "k": 14336, "n": 4096, "e": 8, **_BF16},   # Mixtral down
          {"m": 24576, "k": 2048, "n": 2816, "e": 64, **_BF16}),  # DeepSeek-V2-Lite gate_up, 4096 x top 6
         lambda s: 2 * s["m"] * s["k"] * s["n"], vary={"m": 8}, tolerance=_TOL,
         baselines={"ragged_dot": jax.jit(ragged_dot_baseline)},
         inputs_note="group sizes drawn from a skewed (Zipf) expert popularity; some groups may be empty"),
    Task("moe_unpermute", "moe", 1, "scatter expert outputs back to tokens, weighted by the router",
         unpermute, _unpermute_inputs, _unpermute_oracle,
         _PERMUTE_SMALL, _PERMUTE_BENCH,
         lambda s: 2 * s["m"] * s["top_k"] * s["d"], vary={"m": 3},
         inputs_note="order from golden expert ids"),
    Task("moe_fused_layer", "moe", 3, "fused SwiGLU MoE layer from router logits (vLLM fused_moe interface)",
         fused_moe, _fused_inputs, _fused_oracle,
         ({"m": 12, "d": 16, "f": 8, "e": 4, "top_k": 2, "renormalize": True, "dtype": "float32"},
          {"m": 9, "d": 8, "f": 8, "e": 8, "top_k": 3, "renormalize": False, "dtype": "float32"}),
         ({"m": 4096, **_MIXTRAL, **_BF16}, {"m": 64, **_MIXTRAL, **_BF16},
          {"m": 4096, **_DEEPSEEK, **_BF16}),
         lambda s: 6 * s["m"] * s["top_k"] * s["d"] * s["f"], static_keys=("top_k", "renormalize"), vary={"m": 5},
         tolerance=_TOL, baselines={"ragged_dot": jax.jit(fused_moe_ragged, static_argnames=("top_k", "renormalize"))},
         inputs_note="golden router logits: skewed (Zipf) expert popularity, top-k gaps >= 0.05"),
)
