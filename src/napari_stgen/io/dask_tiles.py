"""Lazy tiled dask arrays for the slide backends: tile sources, guarded reads, RGB conversion
and the computed coarser pyramid levels (tile-wise from the level above, never by striding
level 0)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from napari_stgen.errors import SlideReadError

#: coarser levels are computed down to about this many pixels on the long side
MIN_LEVEL_PX = 1024
#: chunk edge (px) of computed levels and of images without tiles
CHUNK_PX = 512

# ------------------------------------------------------------------------------------------
# Lazy tiled arrays for backends


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters)."""
    msg = str(e).strip()
    return (msg.splitlines()[0] if msg else type(e).__name__)[:300]


class TileSource:
    """Array-like over a tiled image, for ``dask.array.from_array``.

    ``read_tile(ty, tx)`` returns tile (ty, tx) clipped to the image, shape (h, w, *rest).
    ``__getitem__`` reads only the tiles a slice covers; dask chunks equal to tiles make that
    exactly one tile per chunk, and the graph stays a lazy blockwise layer however many tiles.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        tile: tuple[int, int],
        dtype: Any,
        read_tile: Callable[[int, int], np.ndarray],
    ) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(dtype)
        self.tile = (int(tile[0]), int(tile[1]))
        self._read = read_tile

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        (y0, y1, sy), (x0, x1, sx) = (key[i].indices(self.shape[i]) for i in (0, 1))
        y1, x1 = max(y0, y1), max(x0, x1)
        th, tw = self.tile
        out = np.empty((y1 - y0, x1 - x0, *self.shape[2:]), self.dtype)
        for ty in range(y0 // th, -(-y1 // th)):
            for tx in range(x0 // tw, -(-x1 // tw)):
                t = self._read(ty, tx)
                ty0, tx0 = ty * th, tx * tw
                a0, a1 = max(y0, ty0), min(y1, ty0 + t.shape[0])
                b0, b1 = max(x0, tx0), min(x1, tx0 + t.shape[1])
                part = t[a0 - ty0 : a1 - ty0, b0 - tx0 : b1 - tx0]
                out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = part
        return out[(slice(None, None, sy), slice(None, None, sx), *key[2:])]


def tiled_dask(source: TileSource, name: str) -> da.Array:
    """Dask array whose chunks are the source's tiles (nothing is read until computed)."""
    chunks = (
        _regular_chunks(source.shape[0], source.tile[0]),
        _regular_chunks(source.shape[1], source.tile[1]),
    ) + tuple((n,) for n in source.shape[2:])
    return _over(source, chunks, name)


class _Guarded:
    """Array-like over a backend array (zarr…) whose read errors become SlideReadError
    naming the file, the level and the pixel rows/columns of the chunk."""

    def __init__(self, arr: Any, path: Path, level: int) -> None:
        self._a, self._path, self._level = arr, path, level
        self.shape = tuple(int(n) for n in arr.shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(arr.dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return np.asarray(self._a[key])
        except SlideReadError:
            raise
        except Exception as e:  # noqa: BLE001 - codecs and stores raise their own types
            raise SlideReadError(
                f"{self._path}: level {self._level} chunk at {_describe(key)} cannot be read "
                f"({type(e).__name__}: {first_line(e)})"
            ) from None


def _describe(key: Any) -> str:
    key = key if isinstance(key, tuple) else (key,)
    parts = []
    for ax, k in zip(("rows", "cols"), key, strict=False):
        if isinstance(k, slice):
            parts.append(f"{ax} {k.start or 0}:{k.stop}")
    return ", ".join(parts) or repr(key)


def guarded_dask(arr: Any, name: str, path: Path, level: int) -> da.Array:
    """Dask array over a chunked backend array (same chunks) whose read errors are
    SlideReadErrors naming the file, the level and the chunk."""
    return _over(_Guarded(arr, path, level), arr.chunks, name)


def _over(src: Any, chunks: tuple, name: str) -> da.Array:
    """A lazy dask array reading ``src[key]`` per chunk (one blockwise layer, no copies)."""
    return da.from_array(
        src,
        chunks=chunks,
        name=name,
        inline_array=True,
        asarray=False,
        fancy=False,
        meta=np.empty((0,) * src.ndim, src.dtype),
    )


class _BlankOnError:
    """Array-like over a lazy level for drawing: a chunk whose read fails is white.

    One compute per request; only when it fails are the level's own chunks inside the request
    read one by one, so exactly the unreadable ones are blank.
    """

    def __init__(self, arr: da.Array, failed: Callable[[BaseException], None]) -> None:
        self._a, self._failed = arr, failed
        self.shape, self.ndim, self.dtype = arr.shape, arr.ndim, arr.dtype
        self._bounds = [np.cumsum((0,) + c) for c in arr.chunks[:2]]

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return np.asarray(self._a[key].compute(scheduler="synchronous"))
        except Exception:  # noqa: BLE001 - whatever the reader raises: find the bad chunks
            pass
        (y0, y1, _), (x0, x1, _) = (key[i].indices(self.shape[i]) for i in (0, 1))
        out = np.full((y1 - y0, x1 - x0, *self.shape[2:]), 255, self.dtype)
        by, bx = self._bounds
        for i in range(int(np.searchsorted(by, y0, "right")) - 1, len(by) - 1):
            a0, a1 = max(y0, int(by[i])), min(y1, int(by[i + 1]))
            if a0 >= y1:
                break
            for j in range(int(np.searchsorted(bx, x0, "right")) - 1, len(bx) - 1):
                b0, b1 = max(x0, int(bx[j])), min(x1, int(bx[j + 1]))
                if b0 >= x1:
                    break
                if a1 <= a0 or b1 <= b0:
                    continue
                try:
                    part = self._a[a0:a1, b0:b1].compute(scheduler="synchronous")
                except Exception as e:  # noqa: BLE001 - a bad chunk is drawn blank, reported once
                    self._failed(e)
                    continue
                out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = part
        return out


def _blank_on_error(arr: da.Array, failed: Callable[[BaseException], None]) -> da.Array:
    """The level regrouped into ~2 × CHUNK_PX chunks (aligned to its own) over _BlankOnError."""
    chunks = tuple(_merge_chunks(c, 2 * CHUNK_PX) for c in arr.chunks[:2]) + arr.chunks[2:]
    return _over(_BlankOnError(arr, failed), chunks, f"{arr.name}-display")


# ------------------------------------------------------------------------------------------
# Pixel conversion and lazy pyramid construction (shared by all backends)


def to_rgb_uint8(arr: da.Array, axes: str, where: Path) -> da.Array:
    """Bring a level with ``axes`` (e.g. 'YXS', 'CYX', 'ZYXS', 'YX') to (H, W, 3) uint8.

    Singleton non-spatial axes are dropped; grayscale is replicated; alpha is composited on
    white; 16-bit is scaled to 8 bit. Other layouts raise SlideReadError.
    """
    axes = axes.upper()
    if len(axes) != arr.ndim:
        raise SlideReadError(f"{where}: axes {axes!r} do not match data shape {arr.shape}")
    # drop singleton axes that are not Y/X/channel
    idx: list[Any] = []
    kept = ""
    for a, n in zip(axes, arr.shape, strict=True):
        if a in "YX" or (a in "CS" and n > 1):
            idx.append(slice(None))
            kept += a
        elif n == 1:
            idx.append(0)
        else:
            raise SlideReadError(
                f"{where}: has {n} planes along axis {a!r}; napari-stgen reads 2-D "
                "brightfield (RGB or grayscale) slides"
            )
    if any(i == 0 for i in idx):
        arr = arr[tuple(idx)]
    if "Y" not in kept or "X" not in kept:
        raise SlideReadError(f"{where}: no Y/X image axes in {axes!r}")
    chan = [a for a in kept if a in "CS"]
    if len(chan) > 1:
        raise SlideReadError(f"{where}: more than one channel axis in {axes!r}")
    order = [kept.index("Y"), kept.index("X")] + ([kept.index(chan[0])] if chan else [])
    if order != sorted(order):
        arr = arr.transpose(order)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    c = arr.shape[2]
    if c not in (1, 2, 3, 4):
        raise SlideReadError(
            f"{where}: has {c} channels; napari-stgen reads brightfield RGB(A) or grayscale "
            "slides, not multiplexed fluorescence"
        )
    dt = np.dtype(arr.dtype)
    if dt not in (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(bool)):
        raise SlideReadError(
            f"{where}: pixels are {dt}; napari-stgen reads 8- or 16-bit brightfield images"
        )
    if c > 1 and arr.chunks[2] != (c,):
        arr = arr.rechunk({2: c})
    if dt == np.uint8 and c == 3:
        return arr
    return arr.map_blocks(
        _convert_block,
        dtype=np.uint8,
        chunks=arr.chunks[:2] + ((3,),),
        meta=np.empty((0, 0, 3), np.uint8),
    )


def _convert_block(b: np.ndarray) -> np.ndarray:
    if b.dtype == bool:
        b = b.astype(np.uint8) * 255
    elif b.dtype == np.uint16:
        b = (b >> 8).astype(np.uint8)
    c = b.shape[2]
    if c in (2, 4):
        color, alpha = b[..., :-1].astype(np.uint16), b[..., -1:].astype(np.uint16)
        b = ((color * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
        c -= 1
    if c == 1:
        b = np.repeat(b, 3, axis=2)
    return np.ascontiguousarray(b)


def extend_pyramid(levels: list[da.Array], min_px: int = MIN_LEVEL_PX) -> list[da.Array]:
    """Sort levels (largest first) and append 2× coarser levels, each built from the level above."""
    levels = sorted(levels, key=lambda a: -int(a.shape[0]) * int(a.shape[1]))
    while max(levels[-1].shape[:2]) > min_px:
        levels.append(downsample2(levels[-1]))
    return levels


def downsample2(arr: da.Array) -> da.Array:
    """Half-size (ceil) RGB level: mean of 2×2 blocks, computed chunk by chunk (lazy)."""
    # make every chunk even along Y and X (except the last), so blocks reduce independently
    new = []
    for ax in (0, 1):
        ch = arr.chunks[ax]
        if all(c % 2 == 0 for c in ch[:-1]):
            new.append(ch)
        else:
            target = max(2, (max(ch) // 2) * 2)
            new.append(_regular_chunks(arr.shape[ax], target))
    if tuple(new) != arr.chunks[:2]:
        arr = arr.rechunk({0: new[0], 1: new[1]})
    out_chunks = tuple(tuple((c + 1) // 2 for c in ch) for ch in arr.chunks[:2])
    out = arr.map_blocks(
        _reduce2_block,
        dtype=np.uint8,
        chunks=out_chunks + (arr.chunks[2],),
        meta=np.empty((0, 0, 3), np.uint8),
    )
    if max(out.chunks[0]) < CHUNK_PX // 2 or max(out.chunks[1]) < CHUNK_PX // 2:
        # merge neighbouring blocks so coarse levels keep ~CHUNK_PX chunks (block-aligned)
        out = out.rechunk({0: _merge_chunks(out.chunks[0]), 1: _merge_chunks(out.chunks[1])})
    return out


def _regular_chunks(n: int, c: int) -> tuple[int, ...]:
    full, rest = divmod(n, c)
    return (c,) * full + ((rest,) if rest else ())


def _merge_chunks(ch: tuple[int, ...], target: int = CHUNK_PX) -> tuple[int, ...]:
    """Group consecutive chunks so merged chunks reach about ``target`` (aligned to old ones)."""
    merged: list[int] = []
    acc = 0
    for c in ch:
        acc += c
        if acc >= target:
            merged.append(acc)
            acc = 0
    if acc:
        merged.append(acc)
    return tuple(merged)


def _reduce2_block(b: np.ndarray) -> np.ndarray:
    h, w = b.shape[:2]
    if h % 2 or w % 2:
        b = np.pad(b, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    s = b.astype(np.uint16)
    s = s[0::2, 0::2] + s[1::2, 0::2] + s[0::2, 1::2] + s[1::2, 1::2]
    return ((s + 2) >> 2).astype(np.uint8)
