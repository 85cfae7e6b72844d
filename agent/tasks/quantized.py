"""Weight-only quantised matmuls: int8 and int4 group-wise weights dequantised inside the kernel.

Weights are real quantisations, not random integers: a normal fp weight (std 0.02, as in Llama
checkpoints) quantised per group of ``group_size`` input rows: int8 symmetric (scale = absmax / 127),
int4 asymmetric with a zero point (AWQ/GPTQ style: w = (q - zero) * scale, q in 0..15), two int4
values per byte along K (even k in the low nibble). Shapes: Llama-3-8B projections, decode batches
and a prefill chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from agent.tasks import Task, as64, normal

HIGHEST = lax.Precision.HIGHEST


def _group_scale(q, scales, group_size: int):
    """q [K, N] times its group's scale [K / g, N], in fp32."""
    return q.astype(jnp.float32) * jnp.repeat(scales.astype(jnp.float32), group_size, axis=0)


def _matmul(x, w):
    return jnp.dot(x.astype(jnp.float32), w, precision=HIGHEST).astype(x.dtype)


def int8_matmul(x, w_q, scales, *, group_size: int):
    """x [M, K]; w_q [K, N] int8; scales [K / group_size, N] -> x @ (w_q * scale) [M, N] in x's dtype."""
    return _matmul(x, _group_scale(w_q, scales, group_size))


def unpack_int4(w_packed):
    """[K / 2, N] uint8 -> [K, N] int32 in 0..15; even rows from the low nibbles."""
    low, high = w_packed & 0xF, w_packed >> 4
    return jnp.stack([low, high], axis=1).reshape(-1, w_packed.shape[1]).astype(jnp.int32)


def int4_matmul(x, w_packed, scales, zeros, *, group_size: int):
    """x [M, K]; w_packed [K / 2, N] uint8; scales, zeros [K / group_size, N] -> [M, N] in x's dtype."""
    q = unpack_int4(w_packed).astype(jnp.float32) - jnp.repeat(zeros.astype(jnp.float32), group_size, axis=0)
    return _matmul(x, _group_scale(q, scales, group_size))


def int8_gated_mlp(x, w_gate_up, s_gate_up, w_down, s_down, *, group_size: int):
    """Llama MLP with int8 weights: down(silu(gate) * up). w_gate_up [D, 2F] (gate then up); w_down [F, D]."""
    gate, up = jnp.split(int8_matmul(x, w_gate_up, s_gate_up, group_size=group_size).astype(jnp.float32), 2, -1)
    return int8_matmul((jax.nn.silu(gate) * up).astype(x.dtype), w_down, s_down, group_size=group_size)


def _dequant_oracle(q, scales, group_size, zeros=None):
    q, scales = as64(q, scales)
    w = np.empty(q.shape)
    for g in range(scales.shape[0]):
        rows = slice(g * group_size, (g + 1) * group_size)
        w[rows] = (q[rows] - (0 if zeros is None else np.float64(zeros[g]))) * scales[g]
    return w


def _int8_oracle(x, w_q, scales, *, group_size):
    return as64(x)[0] @ _dequant_oracle(w_q, scales, group_size)


def _int4_oracle(x, w_packed, scales, zeros, *, group_size):
    k2, n = w_packed.shape
    q = np.empty((2 * k2, n), np.int64)
    for r in range(k2):
        q[2 * r] = w_packed[r] % 16
        q[2 * r + 1] = w_packed[r] // 16
    return as64(x)[0] @ _dequant_oracle(q, scales, group_size, zeros)


def _mlp_oracle(x, w_gate_up, s_gate_up, w_down, s_down, *, group_size):
    h = _int8_oracle(x, w_gate_up, s_gate_up, group_size=group_size)
    f = h.shape[1] // 2
    return _int8_oracle(h[:, :f] / (1 + np.exp(-h[:, :f])) * h[:, f:], w_down, s_down, group_size=group_size)


def quantize_int8(rng, k, n, group_size):
    w = rng.standard_normal((k // group_size, group_size, n)) * 0.02
    scale = np.abs(w).max(axis=1) / 127
    q = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8).reshape(k, n)
    return q, scale.astype(np.float32)


def quantize_int4(rng, k, n, group_size):
    w = rng.standard_normal((k // group_size, group_size, n)) * 0.02
    lo, hi = w.min(axis=1), w.max(axis=1)
    scale = (hi - lo) / 15
    zero = np.round(-lo / scale)
    q = np.clip(np.round(w / scale[:, None]) + zero[:, None], 0, 15).astype(np.uint8).reshape(k, n)
    return (q[0::2] | (q[1::2] << 4)).astype(np.uint8), scale.astype(np.float32), zero.astype(np.float32)


def _int8_inputs(s, rng):
    return (normal(rng, (s["m"], s["k"]), s["dtype"]), *quantize_int8(rng, s["k"], s["n"], s["group_size"]))


def _int4_inputs(s, rng):
    return (normal(rng, (s["m"], s["k"]), s["dtype"]), *quantize_int4(rng, s["k"], s["n"], s["group_size"]))


def _mlp_inputs(s, rng):
    d, f, g = s["d"], s["f"], s["group_size"]
    return (normal(rng, (s["m"], d), s["dtype"]), *quantize_int8(rng, d, 2 * f, g), *quantize_int8(rng, f, d, g))


_BF16 = {"dtype": "bfloat16", "group_size": 128}
# Llama-3-8B: d 4096, qkv 6144 (32 + 2 x 8 heads of 128), ffn 14336.
_BENCH = ({"m": 1, "k": 4096, "n": 6144, **_BF16}, {"m": 16, "k": 4096, "n": 28672, **_BF16},
          {"m": 2048, "k": 14336, "n": 4096, **_BF16})
_SMALL = ({"m": 3, "k": 64, "n": 24, "group_size": 16, "dtype": "float32"},
          {"m": 5, "k": 32, "n": 8, "group_size": 32, "dtype": "float32"})
_TOL = {"float32": (1e-5, 1e-4), "bfloat16": (1e-2, 2e-2)}

TASKS = (
    Task("int8_weight_only_matmul", "quantized", 1, "x @ dequant(int8 W, per-group scales), dequantised in kernel",
         int8_matmul, _int8_inputs, _int8_oracle, _SMALL, _BENCH, lambda s: 2 * s["m"] * s["k"] * s["n"],
         static_keys=("group_size",), vary={"m": 1}, tolerance=_TOL),
    Task("int4_weight_only_matmul", "quantized", 1, "x @ dequant(packed int4 W, group scales and zero points)",
         int4_matmul, _int4_inputs, _int4_oracle, _SMALL, _BENCH, lambda s: 2 * s["m"] * s["k"] * s["n"],
         static_keys=("group_size",), vary={"m": 1}, tolerance=_TOL),
    Task("int8_gated_mlp", "quantized", 2, "Llama SwiGLU MLP with int8 group-wise weights",
         int8_gated_mlp, _mlp_inputs, _mlp_oracle,
         ({"m": 4, "d": 32, "f": 48, "group_size": 16, "dtype": "float32"},),
         ({"m": 16, "d": 4096, "f": 14336, **_BF16}, {"m": 2048, "d": 4096, "f": 14336, **_BF16}),
         lambda s: 6 * s["m"] * s["d"] * s["f"], static_keys=("group_size",), vary={"m": 1}, tolerance=_TOL),
)
