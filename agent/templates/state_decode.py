"""One-token state updates (GLA decode, Mamba-2 ``selective_state_update``) in one pass over the state.

XLA writes the updated state and then reads it again for the output contraction; these kernels read
each state tile once, write it once and contract it while it is in registers. Grid: (batch x head,
value blocks of ``block_v``); the knobs are the value tile and Triton's warps and stages.
"""

from agent.templates.snippets import IMPORTS, PARAMS

SPACE = {"block_v": (64, 32, 128, 256), "num_warps": (4, 2, 8), "num_stages": (1, 2)}

GLA = '''"""gla_decode_step: block_v=${block_v}, num_warps=${num_warps}, num_stages=${num_stages}."""
''' + IMPORTS + '''
TASK = "gla_decode_step"
BLOCK_V = ${block_v}
''' + PARAMS + '''

def _step(q_ref, k_ref, v_ref, g_ref, s_ref, o_ref, new_ref, *, scale: float):
    decay = jnp.exp(g_ref[...].astype(jnp.float32))  # [1]
    k = k_ref[...].astype(jnp.float32)  # [dk]
    new = decay[:, None] * s_ref[...] + k[:, None] * v_ref[...].astype(jnp.float32)[None, :]  # [dk, bv]
    new_ref[...] = new
    o = jnp.sum(q_ref[...].astype(jnp.float32)[:, None] * new, axis=0) * scale
    o_ref[...] = o.astype(o_ref.dtype)


def kernel(q, k, v, g, state):
    b, h, dk = q.shape
    dv = v.shape[-1]
    rows = b * h
    # A value width the tile does not divide is one tile: still correct, just untuned.
    bv = BLOCK_V if dv % BLOCK_V == 0 else dv
    head = lambda r, j: (r, 0)
    o, new = pl.pallas_call(
        functools.partial(_step, scale=dk ** -0.5),
        grid=(rows, dv // bv),
        in_specs=[pl.BlockSpec((None, dk), head), pl.BlockSpec((None, dk), head),
                  pl.BlockSpec((None, bv), lambda r, j: (r, j)), pl.BlockSpec((1,), lambda r, j: (r,)),
                  pl.BlockSpec((None, dk, bv), lambda r, j: (r, 0, j))],
        out_specs=[pl.BlockSpec((None, bv), lambda r, j: (r, j)), pl.BlockSpec((None, dk, bv), lambda r, j: (r, 0, j))],
        out_shape=[jax.ShapeDtypeStruct((rows, dv), q.dtype), jax.ShapeDtypeStruct((rows, dk, dv), jnp.float32)],
        compiler_params=PARAMS, interpret=INTERPRET,
    )(q.reshape(rows, dk), k.reshape(rows, dk), v.reshape(rows, dv), g.reshape(rows), state.reshape(rows, dk, dv))
    return o.reshape(b, h, dv), new.reshape(b, h, dk, dv)
'''

MAMBA2 = '''"""mamba2_decode_step: block_v=${block_v} (head-dim rows), num_warps=${num_warps}, num_stages=${num_stages}."""
''' + IMPORTS + '''
TASK = "mamba2_decode_step"
BLOCK_P = ${block_v}
''' + PARAMS + '''

def _step(s_ref, x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, bias_ref, y_ref, new_ref):
    step = jax.nn.softplus(dt_ref[...].astype(jnp.float32) + bias_ref[...])  # [1]
    x = x_ref[...].astype(jnp.float32)  # [bp]
    decay = jnp.exp(step * a_ref[...])
    new = (decay[:, None] * s_ref[...]
           + (step * x)[:, None] * b_ref[...].astype(jnp.float32)[None, :])  # [bp, N]
    new_ref[...] = new
    y = jnp.sum(new * c_ref[...].astype(jnp.float32)[None, :], axis=1) + d_ref[...] * x
    y_ref[...] = y.astype(y_ref.dtype)


def kernel(state, x, dt, a, b, c, d, dt_bias):
    batch, heads, p, n = state.shape
    per_group = heads // b.shape[1]
    # A head dim the tile does not divide is one tile: still correct, just untuned.
    bp = BLOCK_P if p % BLOCK_P == 0 else p
    head = lambda i, h, j: (h,)
    group = pl.BlockSpec((None, None, n), lambda i, h, j: (i, h // per_group, 0))
    rows = pl.BlockSpec((None, None, bp), lambda i, h, j: (i, h, j))
    tile = pl.BlockSpec((None, None, bp, n), lambda i, h, j: (i, h, j, 0))
    return pl.pallas_call(
        _step,
        grid=(batch, heads, p // bp),
        in_specs=[tile, rows, pl.BlockSpec((None, 1), lambda i, h, j: (i, h)), pl.BlockSpec((1,), head),
                  group, group, pl.BlockSpec((1,), head), pl.BlockSpec((1,), head)],
        out_specs=[rows, tile],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(state.shape, jnp.float32)],
        compiler_params=PARAMS, interpret=INTERPRET,
    )(state, x, dt, a.astype(jnp.float32), b, c, d.astype(jnp.float32), dt_bias.astype(jnp.float32))
'''

SOURCES = {"gla_decode_step": GLA, "mamba2_decode_step": MAMBA2}
SPACES = dict.fromkeys(SOURCES, SPACE)
