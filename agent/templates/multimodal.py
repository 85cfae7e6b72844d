"""Vision-language glue kernels.

* mrope_qwen2vl: a (batch, ``block_t`` tokens, ``block_h`` heads) grid; each program derives its
  tokens' angles from the three position ids and the frequency sections in registers, so no [B, T, hd]
  cos/sin tables are written or read, and rotates q's (then k's) heads in one pass each.
* image_token_merge: one pass over the embeddings: each program copies its ``block_t`` rows of a
  ``block_d`` column slice, taking a placeholder row from the image features instead (the feature
  index is the placeholder's running count, computed once per call on the tiny [B, T] ids).
"""

from agent.templates.snippets import IMPORTS, PAD, PARAMS, POW2

MROPE = '''"""mrope_qwen2vl: block_t=${block_t}, block_h=${block_h}, num_warps=${num_warps}, num_stages=${num_stages}."""
''' + IMPORTS + '''
TASK = "mrope_qwen2vl"
BLOCK_T, BLOCK_H = ${block_t}, ${block_h}
''' + PARAMS + PAD + '''

def _rotate(pos_ref, freq_ref, x_ref, o_ref, *, sections: tuple):
    half = freq_ref.shape[0]
    # One row at a time: a [3, bt] tile is not a power of two.
    t, h, w = (pos_ref[axis, :].astype(jnp.float32)[:, None] for axis in range(3))
    i = jax.lax.broadcasted_iota(jnp.int32, (t.shape[0], half), 1)
    # Frequency i takes the temporal, height or width position by the section it falls in.
    chosen = jnp.where(i < sections[0], t, jnp.where(i < sections[0] + sections[1], h, w))
    angle = chosen * freq_ref[...][None, :]
    cos, sin = jnp.cos(angle)[:, None, :], jnp.sin(angle)[:, None, :]  # [bt, 1, half]
    lo_half, hi_half = pl.ds(0, half), pl.ds(half, half)
    lo = x_ref[:, :, lo_half].astype(jnp.float32)
    hi = x_ref[:, :, hi_half].astype(jnp.float32)
    o_ref[:, :, lo_half] = (lo * cos - hi * sin).astype(o_ref.dtype)
    o_ref[:, :, hi_half] = (hi * cos + lo * sin).astype(o_ref.dtype)


def _apply(x, pos, inv_freq, sections):
    b, t, h, hd = x.shape
    bh = BLOCK_H if h % BLOCK_H == 0 else 1
    spec = pl.BlockSpec((None, BLOCK_T, bh, hd), lambda i, j, k: (i, j, k, 0))
    out = pl.pallas_call(
        functools.partial(_rotate, sections=sections),
        grid=(b, pos.shape[2] // BLOCK_T, h // bh),
        in_specs=[pl.BlockSpec((3, None, BLOCK_T), lambda i, j, k: (0, i, j)),
                  pl.BlockSpec((hd // 2,), lambda i, j, k: (0,)), spec],
        out_specs=spec,
        out_shape=jax.ShapeDtypeStruct((b, pos.shape[2], h, hd), x.dtype),
        compiler_params=PARAMS, interpret=INTERPRET,
    )(pos, inv_freq, _pad(x, 1, BLOCK_T))
    return out[:, :t]


def kernel(q, k, position_ids, *, mrope_section, rope_theta):
    hd = q.shape[-1]
    # The reference's own frequencies (a pow and a divide on hd / 2 values), so angles agree to the ulp.
    inv_freq = 1.0 / rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
    pos = _pad(position_ids, 2, BLOCK_T)
    sections = tuple(mrope_section)
    return _apply(q, pos, inv_freq, sections), _apply(k, pos, inv_freq, sections)
'''

MERGE = '''"""image_token_merge: block_t=${block_t}, block_d=${block_d}, num_warps=${num_warps}, num_stages=${num_stages}."""
''' + IMPORTS + '''
TASK = "image_token_merge"
BLOCK_T, BLOCK_D = ${block_t}, ${block_d}
''' + PARAMS + PAD + POW2 + '''

def _merge(src_ref, e_ref, f_ref, o_ref):
    def row(r, carry):
        src = src_ref[r]
        text = e_ref[pl.ds(r, 1), :]
        image = f_ref[pl.ds(jnp.maximum(src, 0), 1), :].astype(o_ref.dtype)
        o_ref[pl.ds(r, 1), :] = jnp.where(src >= 0, image, text)
        return carry

    jax.lax.fori_loop(0, o_ref.shape[0], row, 0)


def kernel(embeds, input_ids, image_features, *, image_token_id):
    b, t, d = embeds.shape
    n = image_features.shape[0]
    mask = (input_ids == image_token_id).reshape(-1)
    # Each row's feature row, or -1 for a text row.
    source = jnp.where(mask, jnp.cumsum(mask, dtype=jnp.int32) - 1, -1)
    bd = min(BLOCK_D, _pow2(d))
    e = _pad(_pad(embeds.reshape(b * t, d), 0, BLOCK_T), 1, bd)
    f = _pad(image_features, 1, bd)
    out = pl.pallas_call(
        _merge,
        grid=(e.shape[0] // BLOCK_T, e.shape[1] // bd),
        in_specs=[pl.BlockSpec((BLOCK_T,), lambda i, j: (i,)), pl.BlockSpec((BLOCK_T, bd), lambda i, j: (i, j)),
                  pl.BlockSpec((n, bd), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((BLOCK_T, bd), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct(e.shape, embeds.dtype),
        compiler_params=PARAMS, interpret=INTERPRET,
    )(_pad(source, 0, BLOCK_T), e, f)
    return out[:b * t, :d].reshape(b, t, d)
'''

SPACES = {
    "mrope_qwen2vl": {"block_t": (16, 8, 32, 64), "block_h": (4, 1, 2, 8), "num_warps": (4, 2, 8), "num_stages": (1,)},
    "image_token_merge": {"block_t": (16, 8, 32), "block_d": (512, 256, 1024, 128), "num_warps": (4, 2, 8),
                          "num_stages": (1,)},
}
SOURCES = {"mrope_qwen2vl": MROPE, "image_token_merge": MERGE}
