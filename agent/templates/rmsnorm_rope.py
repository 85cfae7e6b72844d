"""RMSNorm + RoPE in one pass: a (``block_rows`` token rows, ``block_h`` heads) grid; each program
normalises its heads' vectors and rotates the two halves, loaded and stored separately (Triton cannot
slice a tile in registers), so x is read once and written once."""

from agent.templates.snippets import IMPORTS, PAD, PARAMS

SPACE = {"block_rows": (16, 1, 2, 4, 8, 32), "block_h": (8, 1, 2, 4), "num_warps": (4, 2, 8), "num_stages": (1, 2)}

SOURCE = '''"""rmsnorm_rope: block_rows=${block_rows}, block_h=${block_h}, num_warps=${num_warps}, num_stages=${num_stages}."""
''' + IMPORTS + '''
TASK = "rmsnorm_rope"
BLOCK_ROWS, BLOCK_H = ${block_rows}, ${block_h}
''' + PARAMS + PAD + '''

def _norm_rope(x_ref, w_ref, cos_ref, sin_ref, o_ref, *, eps: float):
    half = cos_ref.shape[1]
    lo_half, hi_half = pl.ds(0, half), pl.ds(half, half)
    lo = x_ref[:, :, lo_half].astype(jnp.float32)  # [rows, heads, hd / 2]
    hi = x_ref[:, :, hi_half].astype(jnp.float32)
    mean_square = (jnp.sum(lo * lo, axis=-1, keepdims=True) + jnp.sum(hi * hi, axis=-1, keepdims=True)) / (2 * half)
    inv_rms = jax.lax.rsqrt(mean_square + eps)
    lo = lo * inv_rms * w_ref[lo_half].astype(jnp.float32)
    hi = hi * inv_rms * w_ref[hi_half].astype(jnp.float32)
    cos = cos_ref[...].astype(jnp.float32)[:, None, :]
    sin = sin_ref[...].astype(jnp.float32)[:, None, :]
    o_ref[:, :, lo_half] = (lo * cos - hi * sin).astype(o_ref.dtype)
    o_ref[:, :, hi_half] = (hi * cos + lo * sin).astype(o_ref.dtype)


def kernel(x, weight, cos, sin, *, eps):
    batch, seq, heads, head_dim = x.shape
    rows = batch * seq
    bh = BLOCK_H if heads % BLOCK_H == 0 else 1
    rows_spec = pl.BlockSpec((BLOCK_ROWS, bh, head_dim), lambda r, h: (r, h, 0))
    angle_spec = pl.BlockSpec((BLOCK_ROWS, head_dim // 2), lambda r, h: (r, 0))
    xs = _pad(x.reshape(rows, heads, head_dim), 0, BLOCK_ROWS)
    out = pl.pallas_call(
        functools.partial(_norm_rope, eps=eps),
        grid=(xs.shape[0] // BLOCK_ROWS, heads // bh),
        in_specs=[rows_spec, pl.BlockSpec((head_dim,), lambda r, h: (0,)), angle_spec, angle_spec],
        out_specs=rows_spec,
        out_shape=jax.ShapeDtypeStruct(xs.shape, x.dtype),
        compiler_params=PARAMS, interpret=INTERPRET,
    )(xs, weight, *(_pad(a.reshape(rows, -1), 0, BLOCK_ROWS) for a in (cos, sin)))
    return out[:rows].reshape(batch, seq, heads, head_dim)
'''

SPACES = {"rmsnorm_rope": SPACE}
SOURCES = {"rmsnorm_rope": SOURCE}
