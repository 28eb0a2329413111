"""Tile cache: LRU eviction bounded in bytes."""

from __future__ import annotations

import numpy as np
import pytest

from napari_stgen.inference.cache import TileCache


def test_evicts_least_recently_used_beyond_byte_budget():
    one = TileCache._size(np.zeros(100, np.float32))
    cache = TileCache(max_bytes=3 * one)
    for i in range(3):
        cache.put(("s", "m", 112.0, 0, i), np.full(100, i, np.float32), i)
    assert len(cache) == 3 and cache.nbytes == 3 * one
    assert cache.get(("s", "m", 112.0, 0, 0)) is not None  # 0 becomes most recently used
    cache.put(("s", "m", 112.0, 0, 3), np.full(100, 3, np.float32), 3)
    assert cache.nbytes <= cache.max_bytes and len(cache) == 3
    assert ("s", "m", 112.0, 0, 1) not in cache  # the LRU one went
    expr, code = cache.get(("s", "m", 112.0, 0, 0))
    assert code == 0 and (expr == 0).all()


def test_bigger_entries_evict_more_and_oversize_is_not_kept():
    small = TileCache._size(np.zeros(10, np.float32))
    cache = TileCache(max_bytes=10 * small)
    for i in range(10):
        cache.put(i, np.zeros(10, np.float32), 0)
    cache.put("big", np.zeros(60, np.float32), 1)  # ~3 small entries' worth
    assert cache.nbytes <= cache.max_bytes
    assert "big" in cache and len(cache) < 10
    cache.put("huge", np.zeros(10_000, np.float32), 1)
    assert "huge" not in cache and cache.nbytes <= cache.max_bytes


def test_get_many_put_many_and_copy_semantics():
    cache = TileCache(1 << 20)
    expr = np.arange(12, dtype=np.float32).reshape(3, 4)
    cache.put_many(["a", "b", "c"], expr, np.array([7, 8, 9]))
    expr[:] = -1  # the cache keeps its own copy
    hit, items = cache.get_many(["b", "x", "c"])
    assert hit.tolist() == [True, False, True]
    assert [c for _, c in items] == [8, 9]
    np.testing.assert_array_equal(items[0][0], [4, 5, 6, 7])
    assert cache.hits == 2 and cache.misses == 1
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_rejects_non_positive_budget():
    with pytest.raises(ValueError):
        TileCache(0)
