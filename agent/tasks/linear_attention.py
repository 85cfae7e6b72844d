"""Linear attention with data-dependent scalar decay (GLA-style "simple GLA", RetNet's retention).

The recurrence, per batch and head: S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t with
state S [dk, dv]. Production kernels (flash-linear-attention's chunk_simple_gla, RetNet's chunkwise
retention) compute it chunk by chunk: quadratic attention inside a chunk, the state between chunks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from agent.tasks import Task, as64, normal

HIGHEST = lax.Precision.HIGHEST


def chunked_decay_scan(q, k, v, g, *, chunk: int):
    """sum_{s<=t} exp(b_t - b_s) (q_t . k_s) v_s with b the running sum of g, chunk by chunk; fp32.

    q, k [B, H, T, dk]; v [B, H, T, dv]; g [B, H, T] log decay (<= 0) -> [B, H, T, dv] fp32.
    Also Mamba-2's SSD (q = C, k = B, v = dt x, g = dt A). T must be a multiple of ``chunk``.
    """
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    if t % chunk:
        raise ValueError(f"sequence length {t} is not a multiple of chunk {chunk}")
    n = t // chunk
    f32 = jnp.float32
    qc, kc = (x.astype(f32).reshape(b, h, n, chunk, dk) for x in (q, k))
    vc = v.astype(f32).reshape(b, h, n, chunk, dv)
    cum = jnp.cumsum(g.astype(f32).reshape(b, h, n, chunk), axis=-1)  # b_t within each chunk
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    # exp(b_t - b_s) for s <= t only: masked before exp so the upper triangle cannot overflow.
    decay = jnp.exp(jnp.where(causal, cum[..., :, None] - cum[..., None, :], -jnp.inf))
    scores = jnp.einsum("bhntd,bhnsd->bhnts", qc, kc, precision=HIGHEST) * decay
    intra = jnp.einsum("bhnts,bhnsv->bhntv", scores, vc, precision=HIGHEST)
    to_end = jnp.exp(cum[..., -1:] - cum)  # decay from each step to its chunk's end
    chunk_states = jnp.einsum("bhnsd,bhnsv->bhndv", kc * to_end[..., None], vc, precision=HIGHEST)

    def carry_state(state, xs):
        chunk_state, total = xs  # total: the chunk's whole decay
        return jnp.exp(total)[..., None, None] * state + chunk_state, state

    _, before = lax.scan(carry_state, jnp.zeros((b, h, dk, dv), f32),
                         (jnp.moveaxis(chunk_states, 2, 0), jnp.moveaxis(cum[..., -1], 2, 0)))
    before = jnp.moveaxis(before, 0, 2)  # state entering each chunk [B, H, n, dk, dv]
    inter = jnp.einsum("bhntd,bhndv->bhntv", qc * jnp.exp(cum)[..., None], before, precision=HIGHEST)
    return (intra + inter).reshape(b, h, t, dv)


def chunk_simple_gla(q, k, v, g, *, chunk: int):
    """q, k [B, H, T, dk]; v [B, H, T, dv]; g [B, H, T] log decay (<= 0) -> o [B, H, T, dv] in q's dtype.

    Scale dk^-0.5; T a multiple of ``chunk``.
    """
    return (chunked_decay_scan(q, k, v, g, chunk=chunk) * q.shape[-1] ** -0.5).astype(q.dtype)


def chunk_retention(q, k, v, log_decay, *, chunk: int):
    """RetNet's retention: a fixed decay per head. log_decay [H] (log gamma_h); others as chunk_simple_gla."""
    b, h, t, _ = q.shape
    return chunk_simple_gla(q, k, v, jnp.broadcast_to(log_decay[None, :, None], (b, h, t)), chunk=chunk)


def simple_gla_decode(q, k, v, g, state):
    """One step. q, k [B, H, dk]; v [B, H, dv]; g [B, H]; state [B, H, dk, dv] fp32 -> (o [B, H, dv], state)."""
    f32 = jnp.float32
    kv = k.astype(f32)[..., :, None] * v.astype(f32)[..., None, :]
    new = jnp.exp(g.astype(f32))[..., None, None] * state + kv
    o = jnp.einsum("bhd,bhdv->bhv", q.astype(f32), new, precision=HIGHEST) * q.shape[-1] ** -0.5
    return o.astype(q.dtype), new


def _recurrent_oracle(q, k, v, g):
    q, k, v, g = as64(q, k, v, g)
    b, h, t, dk = q.shape
    out = np.zeros((b, h, t, v.shape[-1]))
    state = np.zeros((b, h, dk, v.shape[-1]))
    for i in range(t):
        state = np.exp(g[..., i])[..., None, None] * state + k[..., i, :, None] * v[..., i, None, :]
        out[..., i, :] = np.einsum("bhd,bhdv->bhv", q[..., i, :], state) / np.sqrt(dk)
    return out


def _gla_oracle(q, k, v, g, *, chunk):
    return _recurrent_oracle(q, k, v, g)


def _retention_oracle(q, k, v, log_decay, *, chunk):
    g = np.broadcast_to(np.asarray(log_decay, np.float64)[None, :, None], q.shape[:3])
    return _recurrent_oracle(q, k, v, g)


def _decode_oracle(q, k, v, g, state):
    q, k, v, g, state = as64(q, k, v, g, state)
    new = np.exp(g)[..., None, None] * state + k[..., :, None] * v[..., None, :]
    return np.einsum("bhd,bhdv->bhv", q, new) / np.sqrt(q.shape[-1]), new


def _qkv(s, rng):
    b, h, t, dk, dv, dt = s["b"], s["h"], s["t"], s["dk"], s["dv"], s["dtype"]
    # q, k as after a feature map / L2-ish norm in GLA layers: unit scale; v like a projection output.
    return normal(rng, (b, h, t, dk), dt), normal(rng, (b, h, t, dk), dt), normal(rng, (b, h, t, dv), dt)


def _log_sigmoid_decay(rng, shape):
    """GLA's gate: log-sigmoid of a projection over a normaliser of 16 (so decays sit near, below, 1)."""
    return (-np.logaddexp(0.0, -rng.standard_normal(shape)) / 16).astype(np.float32)


def _gla_inputs(s, rng):
    return (*_qkv(s, rng), _log_sigmoid_decay(rng, (s["b"], s["h"], s["t"])))


def _retention_inputs(s, rng):
    # RetNet: gamma_h = 1 - 2^(-5 - h * 3 / H) spread over the heads.
    gammas = 1 - 2.0 ** (-5 - np.arange(s["h"]) * 3 / s["h"])
    return (*_qkv(s, rng), np.log(gammas).astype(np.float32))


def _decode_inputs(s, rng):
    q, k, v = (x[:, :, 0] for x in _qkv({**s, "t": 1}, rng))
    # A state as left by a long prefill: a sum of many outer products, so larger than one step's.
    state = rng.standard_normal((s["b"], s["h"], s["dk"], s["dv"])).astype(np.float32) * 4
    return q, k, v, _log_sigmoid_decay(rng, (s["b"], s["h"])), state


def _chunked_flops(s):
    b, h, t, dk, dv, c = s["b"], s["h"], s["t"], s["dk"], s["dv"], s["chunk"]
    return 2 * b * h * t * (c * (dk + dv) + 2 * dk * dv)


_SMALL = ({"b": 2, "h": 2, "t": 32, "dk": 8, "dv": 16, "chunk": 8, "dtype": "float32"},
          {"b": 1, "h": 3, "t": 24, "dk": 16, "dv": 8, "chunk": 8, "dtype": "float32"})
# GLA-1.3B / RetNet-1.3B: d_model 2048 -> 4 heads (GLA, dk 256, dv 512) or 8 heads (RetNet, dk 256, dv 512).
_GLA_BENCH = ({"b": 8, "h": 4, "t": 2048, "dk": 256, "dv": 512, "chunk": 64, "dtype": "bfloat16"},
              {"b": 2, "h": 4, "t": 8192, "dk": 256, "dv": 512, "chunk": 64, "dtype": "bfloat16"})
_RET_BENCH = ({"b": 8, "h": 8, "t": 2048, "dk": 256, "dv": 512, "chunk": 64, "dtype": "bfloat16"},
              {"b": 1, "h": 8, "t": 16384, "dk": 256, "dv": 512, "chunk": 128, "dtype": "bfloat16"})
_TOL = {"float32": (1e-4, 1e-4), "bfloat16": (5e-2, 2e-2)}

TASKS = (
    Task("gla_chunked_forward", "linear_attention", 2,
         "simple GLA forward (scalar data-dependent decay), chunked: intra-chunk attention + carried state",
         chunk_simple_gla, _gla_inputs, _gla_oracle, _SMALL, _GLA_BENCH, _chunked_flops,
         static_keys=("chunk",), vary={"t": "chunk"}, tolerance=_TOL),
    Task("retnet_chunked_retention", "linear_attention", 2,
         "RetNet multi-scale retention core: fixed per-head decay, chunked",
         chunk_retention, _retention_inputs, _retention_oracle, _SMALL, _RET_BENCH, _chunked_flops,
         static_keys=("chunk",), vary={"t": "chunk"}, tolerance=_TOL),
    Task("gla_decode_step", "linear_attention", 1,
         "one decode step of simple GLA: decay the state, add k^T v, read it with q",
         simple_gla_decode, _decode_inputs, _decode_oracle,
         ({"b": 3, "h": 2, "dk": 8, "dv": 16, "dtype": "float32"},),
         ({"b": 64, "h": 4, "dk": 256, "dv": 512, "dtype": "bfloat16"},
          {"b": 256, "h": 8, "dk": 256, "dv": 512, "dtype": "bfloat16"}),
         lambda s: 6 * s["b"] * s["h"] * s["dk"] * s["dv"], vary={"b": 1}, tolerance=_TOL),
)
