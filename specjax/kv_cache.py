"""Paged KV cache: the device page pool, and host-side page allocation and block tables.

Device side: one pool of fixed-size pages per layer, stacked on the layer axis. Host side: a free
list of page ids and, per sequence, the ordered pages that hold its committed tokens. A token at
position ``p`` of a sequence lives in slot ``pages[p // page_size] * page_size + p % page_size``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from specjax.config import ModelConfig
from specjax.pytree import pytree_dataclass

# Scatter index for tokens that must not be written (batch padding, rejected tree nodes). Any index
# past the pool is dropped by the scatter; negative ones would wrap around, so use a large positive.
INVALID_SLOT = np.iinfo(np.int32).max


@pytree_dataclass
class KVCache:
    """k, v: [L, N, page_size, Hkv, hd], N pages per layer."""

    k: jax.Array
    v: jax.Array

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]


def init_kv_cache(config: ModelConfig, num_pages: int, page_size: int = 16, dtype=jnp.float32) -> KVCache:
    if num_pages < 1 or page_size < 1:
        raise ValueError(f"KV cache needs num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}")
    shape = (config.num_layers, num_pages, page_size, config.num_kv_heads, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def kv_bytes_per_token(config: ModelConfig, dtype) -> int:
    return 2 * config.num_layers * config.kv_size * jnp.dtype(dtype).itemsize


def write_kv(cache: KVCache, new_k: jax.Array, new_v: jax.Array, slots: jax.Array) -> KVCache:
    """Scatter new tokens' K/V into their slots.

    new_k/new_v: [L, B, T, Hkv, hd]; slots: [B, T] int32 flat slot ids, INVALID_SLOT to skip.
    Under jit with the cache donated this updates the pool in place.
    """
    n_layers, n_pages, page, hkv, hd = cache.k.shape
    flat = slots.reshape(-1)

    def scatter(pool, new):
        pool = pool.reshape(n_layers, n_pages * page, hkv, hd)
        pool = pool.at[:, flat].set(new.reshape(n_layers, -1, hkv, hd).astype(pool.dtype), mode="drop")
        return pool.reshape(n_layers, n_pages, page, hkv, hd)

    return KVCache(k=scatter(cache.k, new_k), v=scatter(cache.v, new_v))


def slot_ids(block_tables: jax.Array, positions: jax.Array, valid: jax.Array, page_size: int) -> jax.Array:
    """Flat slots of sequence positions, computed on the device: [B, T] int32, INVALID_SLOT where
    ``valid`` is false or the position lies past the block table.

    block_tables: [B, P] int32 page ids; positions: [B, T] int32; valid: [B, T] bool.
    """
    page = positions // page_size
    ok = valid & (positions >= 0) & (page < block_tables.shape[1])
    pages = jnp.take_along_axis(block_tables, jnp.clip(page, 0, block_tables.shape[1] - 1), axis=1)
    return jnp.where(ok, pages * page_size + positions % page_size, INVALID_SLOT).astype(jnp.int32)


def copy_kv(cache: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
    """Copy every layer's K/V from slots ``src`` to slots ``dst`` ([B, T] int32; INVALID_SLOT in
    ``dst`` skips). All sources are read before any destination is written, so the two may overlap."""
    n_layers, n_pages, page, hkv, hd = cache.k.shape
    src = jnp.clip(src.reshape(-1), 0, n_pages * page - 1)
    dst = dst.reshape(-1)

    def move(pool):
        flat = pool.reshape(n_layers, n_pages * page, hkv, hd)
        return flat.at[:, dst].set(flat[:, src], mode="drop").reshape(pool.shape)

    return KVCache(k=move(cache.k), v=move(cache.v))


class OutOfPagesError(RuntimeError):
    """The page pool cannot hold what was asked of it."""


class PageTable:
    """Host-side bookkeeping: a free list of pages and each sequence's pages and length."""

    def __init__(self, num_pages: int, page_size: int):
        self.num_pages = num_pages
        self.page_size = page_size
        # Pop from the end: low page ids are handed out first, which keeps tests readable.
        self._free = list(range(num_pages - 1, -1, -1))
        self._pages: dict[object, list[int]] = {}
        self._lengths: dict[object, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_size)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._pages

    def add(self, seq_id) -> None:
        if seq_id in self._pages:
            raise KeyError(f"sequence {seq_id!r} already has pages")
        self._pages[seq_id] = []
        self._lengths[seq_id] = 0

    def length(self, seq_id) -> int:
        return self._lengths[seq_id]

    def pages(self, seq_id) -> list[int]:
        return list(self._pages[seq_id])

    def capacity(self, seq_id) -> int:
        """Tokens the sequence's pages hold."""
        return len(self._pages[seq_id]) * self.page_size

    def missing(self, seq_id, num_tokens: int) -> int:
        """Pages the sequence still needs to hold ``num_tokens`` tokens in total."""
        return max(self.pages_for(num_tokens) - len(self._pages[seq_id]), 0)

    def reserve(self, seq_id, num_tokens: int) -> None:
        """Make sure the sequence has pages for ``num_tokens`` tokens in total (all-or-nothing)."""
        pages = self._pages[seq_id]
        missing = self.missing(seq_id, num_tokens)
        if missing > len(self._free):
            raise OutOfPagesError(
                f"sequence {seq_id!r} needs {missing} more pages for {num_tokens} tokens; {len(self._free)} free"
            )
        for _ in range(missing):
            pages.append(self._free.pop())

    def slots(self, seq_id, start: int, count: int) -> np.ndarray:
        """Flat slot ids of positions start .. start + count - 1 (pages must be reserved)."""
        pages = self._pages[seq_id]
        pos = np.arange(start, start + count)
        if count and pos[-1] >= len(pages) * self.page_size:
            raise OutOfPagesError(f"sequence {seq_id!r} has no page reserved for position {pos[-1]}")
        return np.asarray(pages, np.int64)[pos // self.page_size] * self.page_size + pos % self.page_size

    def commit(self, seq_id, num_tokens: int) -> None:
        """Record that ``num_tokens`` more tokens of the sequence are now in the cache."""
        new_len = self._lengths[seq_id] + num_tokens
        if new_len > len(self._pages[seq_id]) * self.page_size:
            raise OutOfPagesError(f"sequence {seq_id!r} committed past its reserved pages")
        self._lengths[seq_id] = new_len

    def truncate(self, seq_id, num_tokens: int) -> None:
        """Forget committed tokens past ``num_tokens`` (speculation rollback); pages stay reserved.

        Their K/V stay in the slots but are never read (reads stop at the length) and are
        overwritten by the next tokens written there.
        """
        if not 0 <= num_tokens <= self._lengths[seq_id]:
            raise ValueError(f"cannot truncate sequence {seq_id!r} of {self._lengths[seq_id]} tokens to {num_tokens}")
        self._lengths[seq_id] = num_tokens

    def block_table(self, seq_ids, width: int) -> np.ndarray:
        """[len(seq_ids), width] int32 ids of the pages holding each sequence's committed tokens.

        Padded with page 0 (masked by length when read); pages reserved past the committed length
        may be left out, which is why ``width`` only has to cover the committed tokens.
        """
        table = np.zeros((len(seq_ids), width), np.int32)
        for row, seq_id in enumerate(seq_ids):
            if self.pages_for(self._lengths[seq_id]) > width:
                raise ValueError(f"block table width {width} cannot hold sequence {seq_id!r}'s committed pages")
            pages = self._pages[seq_id][:width]
            table[row, : len(pages)] = pages
        return table

    def release(self, seq_id) -> None:
        """Return the sequence's pages to the free list."""
        self._free.extend(reversed(self._pages.pop(seq_id)))
        del self._lengths[seq_id]
