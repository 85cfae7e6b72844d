"""Chunked linear recurrences with decay: GLA/RetNet chunked attention, Mamba-2's SSD and Mamba-1's
selective scan.

* gla_chunked_forward, retnet_chunked_retention, mamba2_ssd_chunked: one program per (batch x head,
  ``block_v`` value columns) walks the sequence ``block_t`` steps at a time with the [dk, block_v]
  state in registers: the chunk's causal decayed attention, plus the state's contribution, then the
  state carried past the chunk. XLA's reference materialises per-chunk scores, decays and states in
  HBM between its einsums and scans; here q, k, v are read once and o written once. The in-chunk
  cumulative log decays (a [B, H, T] array) are taken once outside the kernel; SSD's heads share
  their group's B and C through the index map, not a copy per head.
* mamba1_selective_scan: one program per (batch, ``block_d`` channels) steps through time with the
  [block_d, N] state in registers; XLA's associative scan materialises [B, D, L, N] states.
"""

from agent.templates.snippets import IMPORTS, PAD, PARAMS

_CHUNKED = '''"""${task}: block_t=${block_t}, block_v=${block_v}, num_warps=${num_warps}, num_stages=${num_stages}."""
''' + IMPORTS + '''
TASK = "${task}"
BLOCK_T, BLOCK_V = ${block_t}, ${block_v}
''' + PARAMS + '''

def _chunks(q_ref, k_ref, v_ref, b_ref, o_ref, *, chunk: int, scale: float):
    dt = q_ref.dtype
    causal = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0) >= jax.lax.broadcasted_iota(
        jnp.int32, (chunk, chunk), 1)
    is_last = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1

    def step(c, state):
        rows = pl.ds(c * chunk, chunk)
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        b = b_ref[rows]  # running log decay within the chunk, [C]
        last = jnp.sum(jnp.where(is_last, b, 0.0))
        # exp(b_t - b_s) for s <= t only: masked before exp so the upper triangle cannot overflow.
        decay = jnp.exp(jnp.where(causal, b[:, None] - b[None, :], -jnp.inf))
        scores = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * decay
        out = jnp.dot(scores.astype(dt), v, preferred_element_type=jnp.float32)
        q_in = (q.astype(jnp.float32) * jnp.exp(b)[:, None]).astype(dt)
        out += jnp.dot(q_in, state.astype(dt), preferred_element_type=jnp.float32)
        o_ref[rows, :] = (out * scale).astype(o_ref.dtype)
        k_out = (k.astype(jnp.float32) * jnp.exp(last - b)[:, None]).astype(dt)
        return jnp.exp(last) * state + jnp.dot(k_out.T, v, preferred_element_type=jnp.float32)

    state = jnp.zeros((q_ref.shape[1], o_ref.shape[1]), jnp.float32)
    jax.lax.fori_loop(0, q_ref.shape[0] // chunk, step, state)


def _chunked(q, k, v, g, chunk, scale):
    """sum_{s<=t} exp(b_t - b_s) (q_t . k_s) v_s * scale, b the running sum of g.

    q, k [B, G, T, dk] (head h reads group h // (H / G)); v [B, H, T, dv]; g [B, H, T] -> [B, H, T, dv].
    """
    b, h, t, dv = v.shape
    groups, dk = q.shape[1], q.shape[3]
    if t % chunk:
        raise ValueError(f"sequence length {t} is not a multiple of chunk {chunk}")
    # The result does not depend on how the sequence is chunked, so the kernel picks its own chunk: a
    # power of two dividing the task's (its decay matrix must fit in registers).
    bt = min(BLOCK_T, chunk & -chunk)
    rows = b * h
    running = jnp.cumsum(g.astype(jnp.float32).reshape(rows, t // bt, bt), axis=-1).reshape(rows, t)
    # A value width the tile does not divide is one tile: still correct, just untuned.
    bv = BLOCK_V if dv % BLOCK_V == 0 else dv
    per_group = h // groups
    qk_spec = pl.BlockSpec((None, t, dk), lambda r, j: ((r // h) * groups + (r % h) // per_group, 0, 0))
    v_spec = pl.BlockSpec((None, t, bv), lambda r, j: (r, 0, j))
    out = pl.pallas_call(
        functools.partial(_chunks, chunk=bt, scale=scale),
        grid=(rows, dv // bv),
        in_specs=[qk_spec, qk_spec, v_spec, pl.BlockSpec((None, t), lambda r, j: (r, 0))],
        out_specs=v_spec,
        out_shape=jax.ShapeDtypeStruct((rows, t, dv), v.dtype),
        compiler_params=PARAMS, interpret=INTERPRET,
    )(q.reshape(b * groups, t, dk), k.reshape(b * groups, t, dk), v.reshape(rows, t, dv), running)
    return out.reshape(b, h, t, dv)
'''

GLA = _CHUNKED + '''

def kernel(q, k, v, g, *, chunk):
    return _chunked(q, k, v, g, chunk, q.shape[-1] ** -0.5)
'''

RETNET = _CHUNKED + '''

def kernel(q, k, v, log_decay, *, chunk):
    b, h, t, _ = q.shape
    return _chunked(q, k, v, jnp.broadcast_to(log_decay[None, :, None], (b, h, t)), chunk, q.shape[-1] ** -0.5)
'''

# SSD is the same recurrence with q = C, k = B (shared by a group of heads), v = dt x and g = dt A.
SSD = _CHUNKED + '''

def kernel(x, dt, a, b, c, d, dt_bias, *, chunk):
    f32 = jnp.float32
    step = jax.nn.softplus(dt.astype(f32) + dt_bias.astype(f32))  # [B, T, H]
    v = jnp.moveaxis(x.astype(f32) * step[..., None], 2, 1).astype(x.dtype)  # [B, H, T, P]
    g = jnp.moveaxis(step * a.astype(f32), 2, 1)
    y = _chunked(jnp.moveaxis(c, 2, 1), jnp.moveaxis(b, 2, 1), v, g, chunk, 1.0)
    return (jnp.moveaxis(y, 1, 2).astype(f32) + d.astype(f32)[:, None] * x.astype(f32)).astype(x.dtype)
'''

MAMBA1 = '''"""mamba1_selective_scan: block_d=${block_d}, num_warps=${num_warps}, num_stages=${num_stages}."""
''' + IMPORTS + '''
TASK = "mamba1_selective_scan"
BLOCK_D = ${block_d}
''' + PARAMS + PAD + '''

def _scan(u_ref, delta_ref, z_ref, a_ref, b_ref, c_ref, d_ref, bias_ref, y_ref):
    a = a_ref[...]  # [bd, N] fp32
    d, bias = d_ref[...][:, None], bias_ref[...][:, None]

    def step(t, state):
        col = pl.ds(t, 1)
        u = u_ref[:, col].astype(jnp.float32)  # [bd, 1]
        dt = jax.nn.softplus(delta_ref[:, col].astype(jnp.float32) + bias)
        state = jnp.exp(dt * a) * state + (dt * u) * b_ref[col, :].astype(jnp.float32)
        y = jnp.sum(state * c_ref[col, :].astype(jnp.float32), axis=1, keepdims=True) + d * u
        y_ref[:, col] = (y * jax.nn.silu(z_ref[:, col].astype(jnp.float32))).astype(y_ref.dtype)
        return state

    jax.lax.fori_loop(0, u_ref.shape[1], step, jnp.zeros(a.shape, jnp.float32))


def kernel(u, delta, a, b, c, d, z, delta_bias):
    batch, dim, length = u.shape
    n = a.shape[1]
    # Padded channels have zero inputs and a zero decay rate: they stay zero and are sliced off.
    u_, delta_, z_ = (_pad(x, 1, BLOCK_D) for x in (u, delta, z))
    a_, d_, bias_ = (_pad(x.astype(jnp.float32), 0, BLOCK_D) for x in (a, d, delta_bias))
    rows = pl.BlockSpec((None, BLOCK_D, length), lambda i, j: (i, j, 0))
    per_step = pl.BlockSpec((None, length, n), lambda i, j: (i, 0, 0))
    channel = pl.BlockSpec((BLOCK_D,), lambda i, j: (j,))
    y = pl.pallas_call(
        _scan,
        grid=(batch, u_.shape[1] // BLOCK_D),
        in_specs=[rows, rows, rows, pl.BlockSpec((BLOCK_D, n), lambda i, j: (j, 0)), per_step, per_step,
                  channel, channel],
        out_specs=rows,
        out_shape=jax.ShapeDtypeStruct(u_.shape, u.dtype),
        compiler_params=PARAMS, interpret=INTERPRET,
    )(u_, delta_, z_, a_, jnp.swapaxes(b, 1, 2), jnp.swapaxes(c, 1, 2), d_, bias_)
    return y[:, :dim]
'''

_CHUNKED_SPACE = {"block_t": (64, 16, 32, 128), "block_v": (64, 32, 128, 256), "num_warps": (4, 8),
                  "num_stages": (1, 2, 3)}
SPACES = {"gla_chunked_forward": _CHUNKED_SPACE, "retnet_chunked_retention": _CHUNKED_SPACE,
          "mamba2_ssd_chunked": _CHUNKED_SPACE,
          "mamba1_selective_scan": {"block_d": (32, 16, 64, 128), "num_warps": (4, 2, 8), "num_stages": (1, 2)}}
SOURCES = {task: source.replace("${task}", task) for task, source in (
    ("gla_chunked_forward", GLA), ("retnet_chunked_retention", RETNET), ("mamba2_ssd_chunked", SSD),
    ("mamba1_selective_scan", MAMBA1))}
