"""Weight-only quantised matmuls that dequantise in the kernel: only the int8 (or packed int4) weights
and their group scales cross HBM, never a dequantised copy. Grid: (``block_m`` row tiles, ``block_n``
column tiles); each program walks K one quantisation group at a time, dequantises that weight tile to
the activations' dtype (bf16 tensor cores on a GPU) and accumulates in fp32.

* int8_weight_only_matmul: symmetric groups, w = q * scale.
* int4_weight_only_matmul: w = (q - zero) * scale, two values a byte along K. Rather than interleave
  nibbles in the kernel, the activations are split into even and odd columns (a cheap pass over x),
  so the low nibbles meet the even columns and the high nibbles the odd ones.
* int8_gated_mlp: gate and up tiles of the same columns in one program, SwiGLU applied before the
  tile is stored, so the [M, 2F] gate/up activations never reach HBM; then the int8 down matmul.
"""

from agent.templates.snippets import IMPORTS, PAD, PARAMS

SPACE = {"block_m": (16, 32, 64, 128), "block_n": (64, 32, 128, 256), "num_warps": (4, 8), "num_stages": (2, 3, 4)}


# One program's [bm, bn] tile of x @ dequant(w): the fp32 sum over K's quantisation groups.
_INT8_TILE = '''

def _int8_tile(x_ref, w_ref, s_ref, group_size: int):
    def add_group(g, acc):
        ks = pl.ds(g * group_size, group_size)
        tile = w_ref[ks, :].astype(jnp.float32) * s_ref[pl.ds(g, 1), :].astype(jnp.float32)
        return acc + jnp.dot(x_ref[:, ks], tile.astype(x_ref.dtype), preferred_element_type=jnp.float32)

    zero = jnp.zeros((x_ref.shape[0], w_ref.shape[1]), jnp.float32)
    return jax.lax.fori_loop(0, w_ref.shape[0] // group_size, add_group, zero)


def _int8_kernel(x_ref, w_ref, s_ref, o_ref, *, group_size: int):
    o_ref[...] = _int8_tile(x_ref, w_ref, s_ref, group_size).astype(o_ref.dtype)


def _int8_matmul(x, w_q, scales, group_size):
    m, k = x.shape
    n = w_q.shape[1]
    xp, bm, bn = _tiles(x, n)
    w_q, scales = _pad(w_q, 1, bn), _pad(scales, 1, bn)
    out = pl.pallas_call(
        functools.partial(_int8_kernel, group_size=group_size),
        grid=(xp.shape[0] // bm, w_q.shape[1] // bn),
        in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)), pl.BlockSpec((k, bn), lambda i, j: (0, j)),
                  pl.BlockSpec((k // group_size, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((xp.shape[0], w_q.shape[1]), x.dtype),
        compiler_params=PARAMS, interpret=INTERPRET,
    )(xp, w_q, scales)
    return out[:m, :n]
'''

_HEADER = '''"""${task}: block_m=${block_m}, block_n=${block_n}, num_warps=${num_warps}, num_stages=${num_stages}."""
''' + IMPORTS + '''
TASK = "${task}"
BLOCK_M, BLOCK_N = ${block_m}, ${block_n}
''' + PARAMS + PAD + '''

def _tiles(x, n):
    """Row and column tiles for an [M, N] output (a column tile no wider than N's power of two),
    and x padded to whole row tiles (Triton's dot needs at least 16 rows)."""
    bn = min(BLOCK_N, 1 << (n - 1).bit_length())
    return _pad(x, 0, BLOCK_M), BLOCK_M, bn
'''

INT8 = _HEADER + _INT8_TILE + '''

def kernel(x, w_q, scales, *, group_size):
    return _int8_matmul(x, w_q, scales, group_size)
'''

INT4 = _HEADER + '''

def _int4_kernel(xe_ref, xo_ref, w_ref, s_ref, z_ref, o_ref, *, group_size: int):
    half = group_size // 2

    def add_group(g, acc):
        rows = pl.ds(g * half, half)
        packed = w_ref[rows, :]
        scale = s_ref[pl.ds(g, 1), :].astype(jnp.float32)
        zero = z_ref[pl.ds(g, 1), :].astype(jnp.float32)
        low = ((packed & 0xF).astype(jnp.float32) - zero) * scale
        high = ((packed >> 4).astype(jnp.float32) - zero) * scale
        dt = xe_ref.dtype
        acc += jnp.dot(xe_ref[:, rows], low.astype(dt), preferred_element_type=jnp.float32)
        return acc + jnp.dot(xo_ref[:, rows], high.astype(dt), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, s_ref.shape[0], add_group, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def kernel(x, w_packed, scales, zeros, *, group_size):
    m, k = x.shape
    n = w_packed.shape[1]
    xp, bm, bn = _tiles(x, n)
    pairs = xp.reshape(xp.shape[0], k // 2, 2)
    w_packed, scales, zeros = (_pad(a, 1, bn) for a in (w_packed, scales, zeros))
    groups = scales.shape[0]
    x_spec = pl.BlockSpec((bm, k // 2), lambda i, j: (i, 0))
    group_spec = pl.BlockSpec((groups, bn), lambda i, j: (0, j))
    out = pl.pallas_call(
        functools.partial(_int4_kernel, group_size=group_size),
        grid=(xp.shape[0] // bm, w_packed.shape[1] // bn),
        in_specs=[x_spec, x_spec, pl.BlockSpec((k // 2, bn), lambda i, j: (0, j)), group_spec, group_spec],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((xp.shape[0], w_packed.shape[1]), x.dtype),
        compiler_params=PARAMS, interpret=INTERPRET,
    )(pairs[..., 0], pairs[..., 1], w_packed, scales, zeros)
    return out[:m, :n]
'''

MLP = _HEADER + _INT8_TILE + '''

def _gate_up_kernel(x_ref, wg_ref, sg_ref, wu_ref, su_ref, o_ref, *, group_size: int):
    # The reference rounds gate and up to x's dtype before SwiGLU; so does this.
    gate = _int8_tile(x_ref, wg_ref, sg_ref, group_size).astype(x_ref.dtype).astype(jnp.float32)
    up = _int8_tile(x_ref, wu_ref, su_ref, group_size).astype(x_ref.dtype).astype(jnp.float32)
    o_ref[...] = (jax.nn.silu(gate) * up).astype(o_ref.dtype)


def kernel(x, w_gate_up, s_gate_up, w_down, s_down, *, group_size):
    m, d = x.shape
    f = w_down.shape[0]
    xp, bm, bn = _tiles(x, f)
    # Gate column j and up column f + j sit in the same program, so a tile must divide F: at most the
    # largest power of two that divides F (f & -f).
    bn = min(bn, f & -f)
    up = f // bn
    w_spec = lambda shift: pl.BlockSpec((d, bn), lambda i, j: (0, j + shift))
    s_spec = lambda shift: pl.BlockSpec((d // group_size, bn), lambda i, j: (0, j + shift))
    h = pl.pallas_call(
        functools.partial(_gate_up_kernel, group_size=group_size),
        grid=(xp.shape[0] // bm, f // bn),
        in_specs=[pl.BlockSpec((bm, d), lambda i, j: (i, 0)), w_spec(0), s_spec(0), w_spec(up), s_spec(up)],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((xp.shape[0], f), x.dtype),
        compiler_params=PARAMS, interpret=INTERPRET,
    )(xp, w_gate_up, s_gate_up, w_gate_up, s_gate_up)
    return _int8_matmul(h, w_down, s_down, group_size)[:m]
'''

SOURCES = {task: source.replace("${task}", task) for task, source in (
    ("int8_weight_only_matmul", INT8), ("int4_weight_only_matmul", INT4), ("int8_gated_mlp", MLP))}
SPACES = dict.fromkeys(SOURCES, SPACE)
