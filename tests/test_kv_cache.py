"""Page allocation, slot arithmetic, and the KV scatter."""

import jax.numpy as jnp
import numpy as np
import pytest

from specjax.config import ModelConfig
from specjax.kv_cache import INVALID_SLOT, OutOfPagesError, PageTable, copy_kv, init_kv_cache, slot_ids, write_kv


def test_pages_are_freed_and_reused():
    table = PageTable(num_pages=6, page_size=4)
    table.add("a")
    table.reserve("a", 9)  # 3 pages
    table.add("b")
    table.reserve("b", 12)  # 3 pages: the pool is now full
    assert table.num_free == 0 and table.capacity("b") == 12
    assert (table.missing("b", 12), table.missing("b", 13), table.missing("b", 4)) == (0, 1, 0)
    with pytest.raises(OutOfPagesError, match="needs 1 more pages"):
        table.reserve("b", 13)
    a_pages = table.pages("a")
    table.release("a")
    assert table.num_free == 3
    table.add("c")
    table.reserve("c", 10)
    assert sorted(table.pages("c")) == sorted(a_pages)
    assert not set(table.pages("c")) & set(table.pages("b"))


def test_failed_reserve_takes_nothing():
    table = PageTable(num_pages=2, page_size=4)
    table.add("a")
    with pytest.raises(OutOfPagesError):
        table.reserve("a", 12)
    assert table.num_free == 2 and table.pages("a") == []


def test_slots_follow_pages_and_commit_is_bounded():
    table = PageTable(num_pages=8, page_size=4)
    table.add("x")
    table.add("y")
    table.reserve("x", 4)
    table.reserve("y", 4)
    table.reserve("x", 8)  # x's pages: 0 and 2
    assert table.pages("x") == [0, 2]
    np.testing.assert_array_equal(table.slots("x", 2, 4), [2, 3, 8, 9])
    with pytest.raises(OutOfPagesError):
        table.slots("x", 6, 3)
    table.commit("x", 8)
    with pytest.raises(OutOfPagesError):
        table.commit("x", 1)
    np.testing.assert_array_equal(table.block_table(["x", "y"], 2), [[0, 2], [1, 0]])
    with pytest.raises(ValueError, match="width"):
        table.block_table(["x"], 1)


def test_write_kv_scatters_into_slots_and_drops_invalid():
    config = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=4)
    cache = init_kv_cache(config, num_pages=3, page_size=2)
    rng = np.random.default_rng(0)
    new_k = rng.standard_normal((2, 1, 3, 1, 4)).astype(np.float32)
    new_v = rng.standard_normal((2, 1, 3, 1, 4)).astype(np.float32)
    slots = np.array([[5, 0, INVALID_SLOT]], np.int32)
    cache = write_kv(cache, jnp.asarray(new_k), jnp.asarray(new_v), jnp.asarray(slots))
    flat_k = np.asarray(cache.k).reshape(2, 6, 1, 4)
    np.testing.assert_array_equal(flat_k[:, 5], new_k[:, 0, 0])
    np.testing.assert_array_equal(flat_k[:, 0], new_k[:, 0, 1])
    untouched = [1, 2, 3, 4]
    assert not flat_k[:, untouched].any()
    np.testing.assert_array_equal(np.asarray(cache.v).reshape(2, 6, 1, 4)[:, 5], new_v[:, 0, 0])


def test_truncate_rolls_back_and_slots_are_reused():
    table = PageTable(num_pages=4, page_size=4)
    table.add("s")
    table.reserve("s", 12)
    table.commit("s", 10)
    slots_before = table.slots("s", 7, 3)
    table.truncate("s", 7)
    assert table.length("s") == 7 and table.num_free == 1
    np.testing.assert_array_equal(table.slots("s", table.length("s"), 3), slots_before)
    with pytest.raises(ValueError, match="truncate"):
        table.truncate("s", 8)


def test_device_slots_and_copies():
    """slot_ids is PageTable.slots on the device; copy_kv reads every source before writing, so
    overlapping moves (tree nodes sliding down to their final positions) are exact."""
    table = PageTable(num_pages=8, page_size=4)
    table.add("a")
    table.reserve("a", 20)
    blocks = jnp.asarray(table.block_table(["a"], 5))
    positions = jnp.arange(20)[None]
    np.testing.assert_array_equal(slot_ids(blocks, positions, positions < 17, 4)[0, :17], table.slots("a", 0, 17))
    assert np.all(np.asarray(slot_ids(blocks, positions, positions < 17, 4))[0, 17:] == INVALID_SLOT)
    assert slot_ids(blocks, jnp.array([[20]]), jnp.array([[True]]), 4)[0, 0] == INVALID_SLOT  # past the table

    config = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=2, num_kv_heads=1,
                         head_dim=4)
    cache = init_kv_cache(config, num_pages=2, page_size=4)
    values = jnp.arange(8, dtype=jnp.float32)[None, :, None, None] * jnp.ones((2, 8, 1, 4))
    cache = write_kv(cache, values[:, None], values[:, None], jnp.arange(8)[None])
    moved = copy_kv(cache, jnp.array([[3, 4, 6]]), jnp.array([[2, 3, INVALID_SLOT]]))  # 3 -> 2 and 4 -> 3
    flat = np.asarray(moved.k).reshape(2, 8, 4)[0, :, 0]
    np.testing.assert_array_equal(flat, [0, 1, 3, 4, 4, 5, 6, 7])
