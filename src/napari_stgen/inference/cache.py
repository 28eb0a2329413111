"""LRU cache of per-tile predictions, bounded in bytes.

Keys are ``(slide_key, model_checksum, tile_um, row, col)`` so a tile predicted once by a
model on a slide is never recomputed while it stays in the cache (panning back is instant).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path

import numpy as np

from napari_stgen.io.slide import Slide

_ENTRY_OVERHEAD = 200  # bytes: key tuple, OrderedDict node, array headers (approximate)


def slide_key(slide: Slide) -> str:
    """Stable identity of a slide: resolved path, level-0 size and file mtime."""
    path = Path(slide.path)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        mtime = 0
    return f"{path.resolve()}|{slide.width}x{slide.height}|{mtime}"


class TileCache:
    """Thread-safe LRU mapping tile keys to ``(expr (G,) float32, code int)``.

    ``max_bytes`` bounds the sum of the entries' sizes (array bytes + a fixed overhead);
    the least recently used entries are evicted first.
    """

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = int(max_bytes)
        self._data: OrderedDict[Hashable, tuple[np.ndarray, int]] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _size(expr: np.ndarray) -> int:
        return int(expr.nbytes) + 8 + _ENTRY_OVERHEAD

    @property
    def nbytes(self) -> int:
        """Current size of the cached entries in bytes."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def get(self, key: Hashable) -> tuple[np.ndarray, int] | None:
        """Entry for ``key`` (marked most recently used) or None."""
        with self._lock:
            item = self._data.get(key)
            if item is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: Hashable, expr: np.ndarray, code: int) -> None:
        """Insert or refresh an entry, evicting least recently used ones beyond ``max_bytes``."""
        expr = np.array(expr, dtype=np.float32, copy=True).reshape(-1)
        size = self._size(expr)
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._nbytes -= self._size(old[0])
            if size > self.max_bytes:
                return
            self._data[key] = (expr, int(code))
            self._nbytes += size
            while self._nbytes > self.max_bytes:
                _, (e, _c) = self._data.popitem(last=False)
                self._nbytes -= self._size(e)

    def get_many(self, keys: list[Hashable]) -> tuple[np.ndarray, list[tuple[np.ndarray, int]]]:
        """Look up many keys: (boolean mask of hits, list of hit entries in order)."""
        found = np.zeros(len(keys), dtype=bool)
        items: list[tuple[np.ndarray, int]] = []
        with self._lock:
            for i, k in enumerate(keys):
                item = self._data.get(k)
                if item is not None:
                    self._data.move_to_end(k)
                    found[i] = True
                    items.append(item)
            n = int(found.sum())
            self.hits += n
            self.misses += len(keys) - n
        return found, items

    def put_many(self, keys: list[Hashable], expr: np.ndarray, code: np.ndarray) -> None:
        """Insert rows ``expr[i]``, ``code[i]`` under ``keys[i]``."""
        for k, e, c in zip(keys, np.asarray(expr), np.asarray(code), strict=True):
            self.put(k, e, int(c))

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._data.clear()
            self._nbytes = 0


_default_cache: TileCache | None = None


def default_cache() -> TileCache:
    """Process-wide cache shared by widgets (256 MiB)."""
    global _default_cache
    if _default_cache is None:
        _default_cache = TileCache()
    return _default_cache
