"""Tree attention over the paged KV cache as a Pallas kernel: token-tree verification, decode (T = 1)
and chunked prefill (a causal ``new_mask``) are one kernel with the signature and results of
``specjax.attention_reference.paged_attention``.

A program owns one sequence, one KV head and one block of query rows: row ``t * G + g`` is new token
``t`` seen through query head ``g`` of the KV head's group of G, so the whole tree and every query
head sharing the KV head go through one tile (up to ``block_rows`` rows; more rows are split into
row blocks, each of which reads the pages again) and each K/V page is read once per KV head.

Each row sees two sets of keys, both through one online softmax in fp32:

* The committed prefix, read page by page through the block table. Flash-decoding: the prefix's
  pages are split among ``num_splits`` programs, each returning a partial (unnormalised output,
  running max, running sum) that ``_combine`` merges in jnp, so a batch-1 decode still fills the GPU.
* The local segment, folded in by the last split: the draft's cached tree nodes that ``tree_mask``
  names (gathered from the cache by the wrapper) followed by the T new tokens' own K/V. Visibility
  is a bitmask packed in the wrapper (``pack_bits``): bit j of word w of a row says whether it sees
  local key ``32 w + j``, so the kernel reads a word per 32 keys instead of a [T, T] bool mask.

Limits (``unsupported_reason``): at most ``MAX_NEW_TOKENS`` new tokens and ``MAX_TREE_NODES``
cached tree nodes per call; head_dim a power of two of at least 16 and the page size a power of two
(Triton tiles). Longer prefill chunks, and any call past these limits, go to the XLA reference under
``auto`` dispatch (``specjax.attention.attention``); forcing ``pallas`` on them raises. A row that
sees no key at all (padding) gets zeros, where the reference averages keys it cannot see: neither
value is used.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend
from specjax.attention_reference import MASKED_SCORE, AttentionMetadata, paged_attention
from specjax.config import matmul_precision

MAX_NEW_TOKENS = 128
MAX_TREE_NODES = 128
WORD_BITS = 32
MIN_TILE = 16  # Triton's dots want at least 16 rows and 16 keys
TARGET_PROGRAMS = 264  # two waves on an H100's 132 SMs: num_splits grows until the grid has this many

reference = paged_attention  # the XLA ground truth this kernel is tested and benchmarked against


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def unsupported_reason(q: jax.Array, k_pool: jax.Array, meta: AttentionMetadata) -> str | None:
    """Why the kernel cannot take this call (None: it can); dispatch falls back to XLA on a reason."""
    t, hd = q.shape[1], q.shape[-1]
    if t > MAX_NEW_TOKENS:
        return f"{t} new tokens per sequence exceed the kernel's limit of {MAX_NEW_TOKENS}"
    if meta.tree_mask is not None and meta.tree_mask.shape[-1] > MAX_TREE_NODES:
        return f"{meta.tree_mask.shape[-1]} cached tree nodes exceed the kernel's limit of {MAX_TREE_NODES}"
    if hd < MIN_TILE or not _is_power_of_two(hd):
        return f"head_dim {hd} is not a power of two of at least {MIN_TILE}"
    if not _is_power_of_two(k_pool.shape[2]):
        return f"page size {k_pool.shape[2]} is not a power of two"
    return None


def _check_shapes(q, new_k, new_v, k_pool, v_pool, layer, meta: AttentionMetadata) -> None:
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, Hq, head_dim]; got shape {q.shape}")
    b, t, hq, hd = q.shape
    if new_k.ndim != 4 or new_k.shape[:2] != (b, t) or new_k.shape[3] != hd or new_v.shape != new_k.shape:
        raise ValueError(f"new_k and new_v must be [B, T, Hkv, head_dim] = [{b}, {t}, Hkv, {hd}] like q "
                         f"{q.shape}; got {new_k.shape} and {new_v.shape}")
    hkv = new_k.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads do not group onto {hkv} KV heads")
    if k_pool.ndim != 5 or k_pool.shape[3:] != (hkv, hd) or v_pool.shape != k_pool.shape:
        raise ValueError(f"k_pool and v_pool must be [L, N, page, Hkv, head_dim] with Hkv={hkv}, head_dim={hd}; "
                         f"got {k_pool.shape} and {v_pool.shape}")
    if jnp.ndim(layer) != 0:
        raise ValueError(f"layer must be a scalar; got shape {jnp.shape(layer)}")
    if meta.block_tables.ndim != 2 or meta.block_tables.shape[0] != b:
        raise ValueError(f"block_tables must be [B={b}, P]; got {meta.block_tables.shape}")
    if not jnp.issubdtype(meta.block_tables.dtype, jnp.integer):
        raise ValueError(f"block_tables must hold integer page ids; got {meta.block_tables.dtype}")
    if meta.context_lens.shape != (b,):
        raise ValueError(f"context_lens must be [B={b}]; got {meta.context_lens.shape}")
    if meta.new_mask.shape != (b, t, t) or meta.new_mask.dtype != jnp.bool_:
        raise ValueError(f"new_mask must be bool [B, T, T] = [{b}, {t}, {t}]; "
                         f"got {meta.new_mask.dtype} {meta.new_mask.shape}")
    tree = meta.tree_mask
    if tree is not None and (tree.ndim != 3 or tree.shape[:2] != (b, t) or tree.dtype != jnp.bool_):
        raise ValueError(f"tree_mask must be bool [B, T, M] = [{b}, {t}, M]; got {tree.dtype} {tree.shape}")


def pack_bits(mask: jax.Array) -> jax.Array:
    """[..., S] bool -> [..., ceil(S / 32)] int32 whose bit j of word w is ``mask[..., 32 w + j]``."""
    s = mask.shape[-1]
    words = pl.cdiv(s, WORD_BITS)
    padded = jnp.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, words * WORD_BITS - s)])
    bits = padded.reshape(*mask.shape[:-1], words, WORD_BITS).astype(jnp.uint32)
    packed = (bits << jnp.arange(WORD_BITS, dtype=jnp.uint32)).sum(axis=-1, dtype=jnp.uint32)
    return lax.bitcast_convert_type(packed, jnp.int32)


def _local_segment(new_k, new_v, k_pool, v_pool, layer, meta: AttentionMetadata):
    """Keys and values [B, S, Hkv, hd] a new token may see past the committed prefix, and which it sees.

    S: the draft's cached tree nodes (``tree_mask``), then the T new tokens, padded to a power of two
    of at least 32 keys so each visibility word covers a whole block of keys. Returns (k, v, [B, T, S]).
    """
    keys, values, visible = new_k, new_v, meta.new_mask
    p, page = meta.block_tables.shape[1], k_pool.shape[2]
    if meta.tree_mask is not None and p:  # with no pages the reference sees no cached node either
        m = meta.tree_mask.shape[-1]
        pos = meta.context_lens[:, None] + jnp.arange(m)  # [B, M] cache positions of the tree nodes
        in_table = pos < p * page  # the reference reads only the block table's pages
        pos = jnp.minimum(pos, p * page - 1)
        ids = jnp.take_along_axis(meta.block_tables, pos // page, axis=1)
        keys = jnp.concatenate([k_pool[layer, ids, pos % page].astype(new_k.dtype), new_k], axis=1)
        values = jnp.concatenate([v_pool[layer, ids, pos % page].astype(new_v.dtype), new_v], axis=1)
        visible = jnp.concatenate([meta.tree_mask & in_table[:, None, :], meta.new_mask], axis=2)
    s = keys.shape[1]
    pad = max(WORD_BITS, pl.next_power_of_2(s)) - s
    keys = jnp.pad(keys, ((0, 0), (0, pad), (0, 0), (0, 0)))
    values = jnp.pad(values, ((0, 0), (0, pad), (0, 0), (0, 0)))
    return keys, values, jnp.pad(visible, ((0, 0), (0, 0), (0, pad)))


def _kernel(ids_ref, context_ref, q_ref, k_pool_ref, v_pool_ref, local_k_ref, local_v_ref, words_ref,
            acc_ref, max_ref, sum_ref, *, page: int, pages_per_step: int, last_split: int):
    """One (sequence, KV head, row block, prefix split): a partial softmax over its keys.

    ids_ref [pages_per_split] flat page ids of this split; context_ref [1]; q_ref [rows, hd];
    *_pool_ref [L * N, page, hd] (this KV head); local_*_ref [S, hd]; words_ref [rows, S / 32].
    Writes acc [rows, hd] (unnormalised), max and sum [rows].
    """
    split = pl.program_id(3)
    pages_per_split = ids_ref.shape[0]
    q = q_ref[...]
    rows, hd = q.shape
    scale = hd**-0.5
    precision = matmul_precision(q.dtype)

    def attend(carry, k, v, visible):
        """The online-softmax update for a block of keys k, v [K, hd] that rows see per visible [rows, K]."""
        acc, row_max, row_sum = carry
        scores = lax.dot_general(q, k.astype(q.dtype), (((1,), (1,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32) * scale
        new_max = jnp.maximum(row_max, jnp.where(visible, scores, MASKED_SCORE).max(axis=1))
        # Zeroed, not just scored low: a row that has seen nothing yet must not count masked keys.
        probs = jnp.where(visible, jnp.exp(scores - new_max[:, None]), 0.0)
        correction = jnp.exp(row_max - new_max)
        out = lax.dot(probs.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32)
        return correction[:, None] * acc + out, new_max, correction * row_sum + probs.sum(axis=1)

    context = context_ref[0]
    first_page = split * pages_per_split
    block = pages_per_step * page
    # Only this split's pages that hold committed tokens are read; the rest of the table is never touched.
    pages = jnp.clip(pl.cdiv(context, page) - first_page, 0, pages_per_split)

    def prefix_step(i, carry):
        ids = ids_ref[pl.ds(i * pages_per_step, pages_per_step)]
        k = k_pool_ref[ids].reshape(block, hd)
        v = v_pool_ref[ids].reshape(block, hd)
        pos = (first_page + i * pages_per_step) * page + jnp.arange(block)
        return attend(carry, k, v, jnp.broadcast_to((pos < context)[None, :], (rows, block)))

    init = (jnp.zeros((rows, hd), jnp.float32), jnp.full((rows,), MASKED_SCORE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    carry = lax.fori_loop(0, pl.cdiv(pages, pages_per_step), prefix_step, init)

    def local(carry):
        lanes = jnp.arange(WORD_BITS, dtype=jnp.int32)
        for w in range(words_ref.shape[1]):
            keys = pl.ds(w * WORD_BITS, WORD_BITS)
            bits = (words_ref[:, w][:, None] >> lanes[None, :]) & 1
            carry = attend(carry, local_k_ref[keys, :], local_v_ref[keys, :], bits == 1)
        return carry

    # The last split folds in the local segment: it holds the fewest prefix pages when P is bucketed.
    acc, row_max, row_sum = lax.cond(split == last_split, local, lambda c: c, carry)
    acc_ref[...] = acc
    max_ref[...] = row_max
    sum_ref[...] = row_sum


def _combine(acc: jax.Array, row_max: jax.Array, row_sum: jax.Array) -> jax.Array:
    """Merge the splits' partial softmaxes: acc [S, ..., hd], max/sum [S, ...] -> [..., hd] fp32."""
    top = row_max.max(axis=0)
    weight = jnp.exp(row_max - top)
    total = (weight * row_sum).sum(axis=0)
    out = (weight[..., None] * acc).sum(axis=0)
    return out / jnp.where(total > 0, total, 1.0)[..., None]


def _default_num_splits(programs: int, steps: int) -> int:
    """Prefix splits so that ``programs`` (sequences x KV heads x row blocks) times splits fills the GPU."""
    return max(1, min(steps, pl.cdiv(TARGET_PROGRAMS, programs)))


@functools.partial(jax.jit, static_argnames=("num_splits", "block_k", "block_rows", "num_warps", "num_stages",
                                             "interpret"))
def tree_attention(q: jax.Array, new_k: jax.Array, new_v: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                   layer: jax.Array, meta: AttentionMetadata, *, num_splits: int | None = None, block_k: int = 64,
                   block_rows: int = 128, num_warps: int | None = None, num_stages: int | None = None,
                   interpret: bool | None = None) -> jax.Array:
    """``paged_attention`` as a Pallas kernel; same arguments, same [B, T, Hq, hd] result.

    num_splits: programs the prefix's pages are split among (None: enough to fill the GPU).
    block_k: prefix keys per inner step (whole pages; at least one page).
    block_rows: most query rows (tokens x grouped heads) per tile.
    num_warps, num_stages: the Triton lowering's warps per program and pipelining depth (None: 4 and
    2; on an H100, 8 warps were at most 1% faster at any measured shape, and 16% slower for a
    64-node tree over an 8K prefix: benchmarks/RESULTS.md).
    interpret: run in Pallas's interpreter (None: off GPUs, see ``backend.interpret``).
    Raises ValueError on malformed inputs and on calls past the kernel's limits (``unsupported_reason``).
    """
    _check_shapes(q, new_k, new_v, k_pool, v_pool, layer, meta)
    reason = unsupported_reason(q, k_pool, meta)
    if reason:
        raise ValueError(f"tree_attention: {reason}; the XLA reference (backend 'xla', or 'auto' which falls "
                         "back to it) takes any such call")
    for name, value in (("block_k", block_k), ("block_rows", block_rows)):
        if value < MIN_TILE or not _is_power_of_two(value):
            raise ValueError(f"{name} must be a power of two of at least {MIN_TILE}; got {value}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be at least 1; got {num_splits}")

    b, t, hq, hd = q.shape
    _, n_pages, page, hkv, _ = k_pool.shape
    group = hq // hkv
    p = meta.block_tables.shape[1]

    rows = t * group
    tile_rows = max(MIN_TILE, pl.next_power_of_2(rows)) if rows <= block_rows else block_rows
    row_blocks = pl.cdiv(rows, tile_rows)
    padded_rows = row_blocks * tile_rows
    pages_per_step = max(1, block_k // page)
    steps = pl.cdiv(max(p, 1), pages_per_step)
    splits = num_splits or _default_num_splits(b * hkv * row_blocks, steps)
    pages_per_split = pl.cdiv(steps, splits) * pages_per_step

    # Flat ids into the pool's [L * N] pages (a free reshape), so the kernel needs no layer index.
    # Entries past the prefix may be read (the last step's tail) but are never visible: clip them in.
    ids = layer * n_pages + jnp.clip(meta.block_tables, 0, n_pages - 1).astype(jnp.int32)
    ids = jnp.pad(ids, ((0, 0), (0, splits * pages_per_split - p))).reshape(b, splits, pages_per_split)
    context = jnp.minimum(meta.context_lens, p * page).astype(jnp.int32)  # the reference sees P pages at most
    k_pages = k_pool.reshape(-1, page, hkv, hd)
    v_pages = v_pool.reshape(-1, page, hkv, hd)

    local_k, local_v, visible = _local_segment(new_k, new_v, k_pool, v_pool, layer, meta)
    n_local = local_k.shape[1]
    words = jnp.repeat(pack_bits(visible), group, axis=1)  # [B, T * G, S / 32], rows as q's below
    words = jnp.pad(words, ((0, 0), (0, padded_rows - rows), (0, 0)))
    q_rows = q.reshape(b, t, hkv, group, hd).transpose(0, 2, 1, 3, 4).reshape(b, hkv, rows, hd)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, padded_rows - rows), (0, 0)))

    partial_shape = (splits, b, hkv, padded_rows)
    kernel = functools.partial(_kernel, page=page, pages_per_step=pages_per_step, last_split=splits - 1)
    acc, row_max, row_sum = pl.pallas_call(
        kernel,
        grid=(b, hkv, row_blocks, splits),
        in_specs=[
            pl.BlockSpec((None, None, pages_per_split), lambda i, h, r, s: (i, s, 0)),  # page ids
            pl.BlockSpec((1,), lambda i, h, r, s: (i,)),  # context length
            pl.BlockSpec((None, None, tile_rows, hd), lambda i, h, r, s: (i, h, r, 0)),  # q rows
            pl.BlockSpec((k_pages.shape[0], page, None, hd), lambda i, h, r, s: (0, 0, h, 0)),  # K pages
            pl.BlockSpec((v_pages.shape[0], page, None, hd), lambda i, h, r, s: (0, 0, h, 0)),  # V pages
            pl.BlockSpec((None, n_local, None, hd), lambda i, h, r, s: (i, 0, h, 0)),  # local K
            pl.BlockSpec((None, n_local, None, hd), lambda i, h, r, s: (i, 0, h, 0)),  # local V
            pl.BlockSpec((None, tile_rows, n_local // WORD_BITS), lambda i, h, r, s: (i, r, 0)),  # masks
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, tile_rows, hd), lambda i, h, r, s: (s, i, h, r, 0)),
            pl.BlockSpec((None, None, None, tile_rows), lambda i, h, r, s: (s, i, h, r)),
            pl.BlockSpec((None, None, None, tile_rows), lambda i, h, r, s: (s, i, h, r)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((*partial_shape, hd), jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
        ],
        interpret=backend.interpret() if interpret is None else interpret,
        compiler_params=backend.compiler_params(num_warps=num_warps or 4, num_stages=num_stages or 2),
        name="tree_attention",
    )(ids, context, q_rows, k_pages, v_pages, local_k, local_v, words)

    out = _combine(acc, row_max, row_sum)[:, :, :rows]  # [B, Hkv, T * G, hd]
    return out.reshape(b, hkv, t, group, hd).transpose(0, 2, 1, 3, 4).reshape(b, t, hq, hd).astype(q.dtype)
