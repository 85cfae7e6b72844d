"""State-space models: Mamba-2's SSD (chunked, and its decode step) and Mamba-1's selective scan.

Interfaces follow mamba_ssm: ``mamba_chunk_scan_combined`` (x, dt, A, B, C, chunk_size, D, dt_bias,
dt_softplus=True), ``selective_state_update`` and ``selective_scan_fn`` (u, delta, A, B, C, D, z,
delta_bias, delta_softplus=True). Value ranges follow the models' initialisation: dt_bias is the
inverse softplus of a step log-uniform in [1e-3, 1e-1]; Mamba-2's A = -U[1, 16] per head; Mamba-1's
A = -(1..N) per channel (S4D-real).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from agent.tasks import Task, as64, normal
from agent.tasks.linear_attention import chunked_decay_scan

HIGHEST = lax.Precision.HIGHEST


def _heads_to_groups(x, heads: int):
    """[B, T, G, N] -> [B, H, T, N]: head h reads group h // (H / G)."""
    return jnp.repeat(jnp.moveaxis(x, 2, 1), heads // x.shape[2], axis=1)


def mamba_chunk_scan(x, dt, a, b, c, d, dt_bias, *, chunk: int):
    """SSD. x [B, T, H, P]; dt [B, T, H] (before softplus); a, d, dt_bias [H]; b, c [B, T, G, N] -> y [B, T, H, P].

    h_t = exp(dt_t a) h_{t-1} + dt_t x_t b_t^T; y_t = h_t c_t + d x_t, dt = softplus(dt + dt_bias).
    """
    h = x.shape[2]
    f32 = jnp.float32
    step = jax.nn.softplus(dt.astype(f32) + dt_bias.astype(f32))  # [B, T, H]
    v = jnp.moveaxis(x.astype(f32) * step[..., None], 2, 1)  # [B, H, T, P]
    g = jnp.moveaxis(step * a.astype(f32), 2, 1)
    y = chunked_decay_scan(_heads_to_groups(c.astype(f32), h), _heads_to_groups(b.astype(f32), h), v, g, chunk=chunk)
    return (jnp.moveaxis(y, 1, 2) + d.astype(f32)[:, None] * x.astype(f32)).astype(x.dtype)


def selective_state_update(state, x, dt, a, b, c, d, dt_bias):
    """Mamba-2 decode. state [B, H, P, N] fp32; x [B, H, P]; dt [B, H]; a, d, dt_bias [H]; b, c [B, G, N].

    Returns (y [B, H, P] in x's dtype, new state).
    """
    h = x.shape[1]
    f32 = jnp.float32
    step = jax.nn.softplus(dt.astype(f32) + dt_bias.astype(f32))
    bh = jnp.repeat(b.astype(f32), h // b.shape[1], axis=1)  # [B, H, N]
    ch = jnp.repeat(c.astype(f32), h // c.shape[1], axis=1)
    xs = x.astype(f32)
    new = (jnp.exp(step * a.astype(f32))[..., None, None] * state
           + (step[..., None] * xs)[..., :, None] * bh[..., None, :])
    y = jnp.einsum("bhpn,bhn->bhp", new, ch, precision=HIGHEST) + d.astype(f32)[:, None] * xs
    return y.astype(x.dtype), new


def selective_scan(u, delta, a, b, c, d, z, delta_bias):
    """Mamba-1. u, delta, z [B, D, L]; a [D, N]; b, c [B, N, L]; d, delta_bias [D] -> y [B, D, L].

    h_t = exp(delta_t a) h_{t-1} + delta_t u_t b_t; y_t = (h_t . c_t + d u_t) * silu(z_t), delta softplus'd.
    An associative scan over L (the XLA way to parallelise a linear recurrence).
    """
    f32 = jnp.float32
    step = jax.nn.softplus(delta.astype(f32) + delta_bias.astype(f32)[:, None])  # [B, D, L]
    decay = jnp.exp(step[..., None] * a.astype(f32)[:, None, :])  # [B, D, L, N]
    drive = (step * u.astype(f32))[..., None] * jnp.moveaxis(b.astype(f32), 1, 2)[:, None]

    def combine(left, right):
        return left[0] * right[0], right[0] * left[1] + right[1]

    _, states = lax.associative_scan(combine, (decay, drive), axis=2)
    y = jnp.einsum("bdln,bln->bdl", states, jnp.moveaxis(c.astype(f32), 1, 2), precision=HIGHEST)
    y = (y + d.astype(f32)[:, None] * u.astype(f32)) * jax.nn.silu(z.astype(f32))
    return y.astype(u.dtype)


def _softplus(x):
    return np.logaddexp(0.0, x)


def _ssd_oracle(x, dt, a, b, c, d, dt_bias, *, chunk):
    x, dt, a, b, c, d, dt_bias = as64(x, dt, a, b, c, d, dt_bias)
    bsz, t, h, p = x.shape
    group = h // b.shape[2]
    state = np.zeros((bsz, h, p, b.shape[-1]))
    y = np.zeros_like(x)
    for i in range(t):
        for head in range(h):
            g = head // group
            step = _softplus(dt[:, i, head] + dt_bias[head])  # [B]
            state[:, head] = (np.exp(step * a[head])[:, None, None] * state[:, head]
                              + (step[:, None] * x[:, i, head])[:, :, None] * b[:, i, g][:, None, :])
            y[:, i, head] = np.einsum("bpn,bn->bp", state[:, head], c[:, i, g]) + d[head] * x[:, i, head]
    return y


def _update_oracle(state, x, dt, a, b, c, d, dt_bias):
    state, x, dt, a, b, c, d, dt_bias = as64(state, x, dt, a, b, c, d, dt_bias)
    h = x.shape[1]
    group = h // b.shape[1]
    new = np.empty_like(state)
    y = np.empty_like(x)
    for head in range(h):
        step = _softplus(dt[:, head] + dt_bias[head])
        new[:, head] = (np.exp(step * a[head])[:, None, None] * state[:, head]
                        + np.einsum("bp,bn->bpn", step[:, None] * x[:, head], b[:, head // group]))
        y[:, head] = np.einsum("bpn,bn->bp", new[:, head], c[:, head // group]) + d[head] * x[:, head]
    return y, new


def _scan_oracle(u, delta, a, b, c, d, z, delta_bias):
    u, delta, a, b, c, d, z, delta_bias = as64(u, delta, a, b, c, d, z, delta_bias)
    bsz, dim, length = u.shape
    state = np.zeros((bsz, dim, a.shape[1]))
    y = np.zeros_like(u)
    for t in range(length):
        step = _softplus(delta[:, :, t] + delta_bias)  # [B, D]
        state = np.exp(step[..., None] * a) * state + (step * u[:, :, t])[..., None] * b[:, None, :, t]
        out = np.einsum("bdn,bn->bd", state, c[:, :, t]) + d * u[:, :, t]
        y[:, :, t] = out * z[:, :, t] / (1 + np.exp(-z[:, :, t]))
    return y


def _dt_bias(rng, n):
    step = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), n))
    return np.log(np.expm1(step)).astype(np.float32)  # inverse softplus


def _ssd_inputs(s, rng):
    bsz, t, h, p, g, n, dt_ = s["b"], s["t"], s["h"], s["p"], s["g"], s["n"], s["dtype"]
    return (normal(rng, (bsz, t, h, p), dt_), normal(rng, (bsz, t, h), dt_, 0.5),
            -rng.uniform(1, 16, h).astype(np.float32), normal(rng, (bsz, t, g, n), dt_),
            normal(rng, (bsz, t, g, n), dt_), np.ones(h, np.float32), _dt_bias(rng, h))


def _update_inputs(s, rng):
    bsz, h, p, g, n, dt_ = s["b"], s["h"], s["p"], s["g"], s["n"], s["dtype"]
    state = rng.standard_normal((bsz, h, p, n)).astype(np.float32)
    return (state, normal(rng, (bsz, h, p), dt_), normal(rng, (bsz, h), dt_, 0.5),
            -rng.uniform(1, 16, h).astype(np.float32), normal(rng, (bsz, g, n), dt_),
            normal(rng, (bsz, g, n), dt_), np.ones(h, np.float32), _dt_bias(rng, h))


def _scan_inputs(s, rng):
    bsz, dim, length, n, dt_ = s["b"], s["d"], s["l"], s["n"], s["dtype"]
    a = -np.broadcast_to(np.arange(1, n + 1, dtype=np.float32), (dim, n)).copy()
    return (normal(rng, (bsz, dim, length), dt_), normal(rng, (bsz, dim, length), dt_, 0.5), a,
            normal(rng, (bsz, n, length), dt_), normal(rng, (bsz, n, length), dt_),
            np.ones(dim, np.float32), normal(rng, (bsz, dim, length), dt_), _dt_bias(rng, dim))


_TOL = {"float32": (1e-4, 1e-4), "bfloat16": (5e-2, 2e-2)}

TASKS = (
    # Mamba-2 130M: d_inner 1536 = 24 heads x 64, N 128, one group; 2.7B: 80 heads x 64; chunk 256.
    Task("mamba2_ssd_chunked", "ssm", 2, "Mamba-2 SSD chunked scan (mamba_chunk_scan_combined, dt softplus)",
         mamba_chunk_scan, _ssd_inputs, _ssd_oracle,
         ({"b": 2, "t": 24, "h": 4, "p": 8, "g": 2, "n": 8, "chunk": 8, "dtype": "float32"},),
         ({"b": 8, "t": 2048, "h": 24, "p": 64, "g": 1, "n": 128, "chunk": 256, "dtype": "bfloat16"},
          {"b": 2, "t": 4096, "h": 80, "p": 64, "g": 1, "n": 128, "chunk": 256, "dtype": "bfloat16"}),
         lambda s: 2 * s["b"] * s["h"] * s["t"] * (s["chunk"] * (s["n"] + s["p"]) + 2 * s["n"] * s["p"]),
         static_keys=("chunk",), vary={"t": "chunk"}, tolerance=_TOL),
    Task("mamba2_decode_step", "ssm", 1, "Mamba-2 selective_state_update: one token through the SSD state",
         selective_state_update, _update_inputs, _update_oracle,
         ({"b": 3, "h": 4, "p": 8, "g": 2, "n": 8, "dtype": "float32"},),
         ({"b": 64, "h": 80, "p": 64, "g": 1, "n": 128, "dtype": "bfloat16"},
          {"b": 256, "h": 24, "p": 64, "g": 1, "n": 128, "dtype": "bfloat16"}),
         lambda s: 6 * s["b"] * s["h"] * s["p"] * s["n"], vary={"b": 1}, tolerance=_TOL),
    # Mamba-1 130M: d_inner 1536, N 16; 2.8B: d_inner 5120.
    Task("mamba1_selective_scan", "ssm", 2, "Mamba-1 selective_scan_fn with z gating and delta softplus",
         selective_scan, _scan_inputs, _scan_oracle,
         ({"b": 2, "d": 6, "l": 20, "n": 4, "dtype": "float32"},),
         ({"b": 8, "d": 1536, "l": 2048, "n": 16, "dtype": "bfloat16"},
          {"b": 2, "d": 5120, "l": 2048, "n": 16, "dtype": "bfloat16"}),
         lambda s: 9 * s["b"] * s["d"] * s["l"] * s["n"], vary={"l": 4}, tolerance=_TOL),
)
