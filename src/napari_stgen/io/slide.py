"""Whole-slide images as lazy pyramids of RGB uint8 dask arrays, in one µm world space.

``open_slide(path, mpp=None)`` picks a backend from the file's content (not only its name):

- TIFF family (SVS, OME-TIFF, generic tiled pyramids, single-level TIFF): tifffile's zarr store;
- OME-Zarr (and plain zarr arrays): zarr;
- vendor formats (NDPI, MRXS, SCN, BIF, VMS…): OpenSlide, an optional extra imported lazily;
- plain images (JPEG, PNG…): Pillow, decoded on first access (JPEG coarse levels by DCT scaling).

Every slide gets coarser levels down to about ``MIN_LEVEL_PX`` computed tile-wise and lazily from
the level above (never by striding level 0), so a zoomed-out view never touches level 0 of a
stored pyramid. A level-0 pixel (row, col) sits at world (row * mpp, col * mpp) µm.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from ..errors import SlideReadError
from .limits import MPP_RANGE, check_level_shape, check_mpp, check_pyramid

#: Coarser levels are added until the longest side is at most this many pixels.
MIN_LEVEL_PX = 1024
#: Chunk edge used for computed levels and in-memory images.
CHUNK_PX = 512

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: Extensions read with OpenSlide when it is installed (TIFF-based ones fall back to tifffile).
OPENSLIDE_EXTS = {".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide"}
OPENSLIDE_HINT = "install OpenSlide support: pip install '.[openslide]' in a napari-stgen checkout"


class Slide:
    """A whole-slide image: lazy RGB uint8 levels (level 0 first) and its µm per pixel.

    Attributes: ``path``, ``format`` ('svs' | 'tiff' | 'ome-tiff' | 'ome-zarr' | 'openslide' |
    'image'), ``levels`` (dask arrays (H, W, 3) uint8), ``downsamples``, ``mpp`` (µm/px of level
    0 or None when unknown), ``mpp_source`` (where mpp came from), ``vendor``, ``width``,
    ``height``, ``n_stored_levels`` (levels read from the file; the rest are computed).
    """

    def __init__(
        self,
        path: Path,
        format: str,
        levels: Sequence[da.Array],
        mpp: float | None,
        *,
        mpp_source: str | None = None,
        vendor: str | None = None,
        properties: dict[str, Any] | None = None,
        closers: Sequence[Callable[[], None]] = (),
    ) -> None:
        self.path = Path(path)
        self.format = format
        self.n_stored_levels = len(levels)
        for k, lv in enumerate(levels):  # backends check before building; this is the net
            check_level_shape(self.path, k, lv.shape)
        check_pyramid(self.path, sorted((lv.shape for lv in levels), key=lambda s: -s[0]))
        self.levels: list[da.Array] = extend_pyramid(list(levels))
        h0, w0 = self.levels[0].shape[:2]
        self.height, self.width = int(h0), int(w0)
        self._ds_yx = [(h0 / lv.shape[0], w0 / lv.shape[1]) for lv in self.levels]
        self.downsamples: list[float] = [float(dx) for _, dx in self._ds_yx]
        self.mpp = mpp
        self.mpp_source = mpp_source if mpp is not None else None
        self.vendor = vendor
        self.properties = dict(properties or {})
        self._closers = list(closers)
        self.closed = False
        self._display: list[da.Array] | None = None
        self._display_lock = threading.Lock()
        self.on_display_error: Callable[[BaseException], None] | None = None

    # -- geometry ---------------------------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self.levels)

    def level_mpp(self, k: int) -> float | None:
        """µm per pixel of level ``k`` (None when the slide's mpp is unknown)."""
        if self.mpp is None:
            return None
        return self.mpp * self.downsamples[k]

    def best_level(self, target_mpp: float) -> int:
        """Coarsest level whose µm/px is <= ``target_mpp`` (5 % tolerance), else 0."""
        if self.mpp is None or target_mpp is None:
            return 0
        best = 0
        for k in range(self.level_count):
            m = self.level_mpp(k)
            if m is not None and m <= target_mpp * 1.05:
                best = k
        return best

    # -- pixels -----------------------------------------------------------------------------
    def read_region(self, x0: float, y0: float, x1: float, y1: float, level: int = 0) -> np.ndarray:
        """Pixels of level ``level`` covering level-0 box [x0, x1) × [y0, y1).

        Returns uint8 (h, w, 3) with h = round((y1 - y0) / downsample) (at least 1), padded
        with white where the box leaves the slide.
        """
        if not 0 <= level < self.level_count:
            raise SlideReadError(
                f"{self.path}: level {level} does not exist (slide has {self.level_count})"
            )
        if not (x1 > x0 and y1 > y0):
            raise SlideReadError(f"{self.path}: empty region ({x0}, {y0}, {x1}, {y1})")
        dy, dx = self._ds_yx[level]
        arr = self.levels[level]
        lh, lw = arr.shape[:2]
        ly0 = int(math.floor(y0 / dy))
        lx0 = int(math.floor(x0 / dx))
        h = max(1, int(round((y1 - y0) / dy)))
        w = max(1, int(round((x1 - x0) / dx)))
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        cy0, cx0 = max(ly0, 0), max(lx0, 0)
        cy1, cx1 = min(ly0 + h, lh), min(lx0 + w, lw)
        if cy1 > cy0 and cx1 > cx0:
            sub = arr[cy0:cy1, cx0:cx1]
            big = (cy1 - cy0) * (cx1 - cx0) > 1024 * 1024
            data = sub.compute(scheduler="threads" if big else "synchronous")
            out[cy0 - ly0 : cy1 - ly0, cx0 - lx0 : cx1 - lx0] = data
        return out

    def thumbnail(self, max_px: int = 1024) -> np.ndarray:
        """RGB uint8 overview whose longest side is at most ``max_px``, from a coarse level."""
        k = 0
        for i, lv in enumerate(self.levels):
            if max(lv.shape[:2]) >= max_px:
                k = i
        arr = np.asarray(self.levels[k].compute(scheduler="threads"))
        h, w = arr.shape[:2]
        if max(h, w) > max_px:
            from PIL import Image

            f = max_px / max(h, w)
            size = (max(1, round(w * f)), max(1, round(h * f)))
            arr = np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.LANCZOS))
        return arr

    def info(self) -> dict[str, Any]:
        """JSON-able description (what ``stgen info`` prints)."""
        return {
            "path": str(self.path),
            "format": self.format,
            "vendor": self.vendor,
            "width": self.width,
            "height": self.height,
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "levels": [
                {
                    "level": k,
                    "shape": [int(s) for s in lv.shape],
                    "downsample": round(self.downsamples[k], 4),
                    "mpp": None if self.mpp is None else round(self.level_mpp(k), 6),
                    "stored": k < self.n_stored_levels,
                }
                for k, lv in enumerate(self.levels)
            ],
        }

    def display_levels(self) -> list[da.Array]:
        """Levels for a viewer: same pixels, but a chunk that cannot be read draws white and
        calls ``on_display_error(exc)`` once for this slide, instead of raising while drawing.

        ``levels`` stay strict (a failing tile raises SlideReadError): prediction and export
        read those, never these.
        """
        with self._display_lock:
            if self._display is None:
                state = {"told": False}

                def failed(e: BaseException) -> None:
                    with self._display_lock:
                        first, state["told"] = not state["told"], True
                    if first and self.on_display_error is not None:
                        self.on_display_error(e)

                self._display = [_blank_on_error(lv, failed) for lv in self.levels]
            return list(self._display)

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Release file handles (levels must not be computed afterwards)."""
        if self.closed:
            return
        self.closed = True
        for fn in self._closers:
            try:
                fn()
            except Exception:  # noqa: BLE001 - closing must not raise
                pass

    def __copy__(self) -> Slide:
        return self

    def __deepcopy__(self, memo: dict) -> Slide:
        return self  # a read-only handle: napari's "duplicate layer" deep-copies metadata

    def __reduce__(self) -> tuple:
        """Pickle as "open this path again" (e.g. to send a slide to dask workers)."""
        mpp = self.mpp if self.mpp_source == "argument" else None
        return (open_slide, (str(self.path), mpp))

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Slide({str(self.path)!r}, format={self.format!r}, {self.width}x{self.height}, "
            f"levels={self.level_count}, mpp={self.mpp})"
        )


# ------------------------------------------------------------------------------------------
def open_slide(path: str | os.PathLike, mpp: float | None = None) -> Slide:
    """Open a whole-slide image lazily; ``mpp`` (µm/px at level 0) overrides the file's.

    Raises ``SlideReadError`` naming the file and the problem.
    """
    p = Path(path).expanduser()
    if mpp is not None:
        try:
            mpp = float(mpp)
        except (TypeError, ValueError):
            raise SlideReadError(f"{p}: mpp must be a number, got {mpp!r}") from None
        if not (math.isfinite(mpp) and mpp > 0):
            raise SlideReadError(f"{p}: mpp must be a positive number of µm per pixel, got {mpp}")
        lo, hi = MPP_RANGE
        if not lo <= mpp <= hi:
            raise SlideReadError(
                f"{p}: mpp {mpp:g} µm/px is outside the plausible {lo:g}–{hi:g} µm/px"
            )
    if not p.exists():
        raise SlideReadError(f"{p}: no such file or directory")
    kind = sniff(p)
    try:
        if kind == "zarr":
            from .backends_zarr import open_zarr

            slide = open_zarr(p)
        elif kind == "openslide":
            from .backends_openslide import open_openslide

            slide = open_openslide(p)
        elif kind == "tiff":
            slide = _open_tiff_or_openslide(p)
        elif kind == "image":
            from .backends_image import open_image

            slide = open_image(p)
        else:  # pragma: no cover - sniff raises for unknown content
            raise SlideReadError(f"{p}: unsupported file")
    except SlideReadError:
        raise
    except MemoryError:
        raise SlideReadError(f"{p}: out of memory while opening (corrupt sizes?)") from None
    except RecursionError:
        raise SlideReadError(f"{p}: metadata nested too deeply to read") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure becomes a one-line reason
        why = f"{type(e).__name__}: {_first_line(e)}"
        raise SlideReadError(f"{p}: cannot read slide ({why})") from e
    if mpp is not None:
        slide.mpp = mpp
        slide.mpp_source = "argument"
    elif slide.mpp is not None:
        try:
            check_mpp(p, slide.mpp, slide.mpp_source)
        except SlideReadError:
            slide.close()
            raise
    return slide


def _first_line(e: BaseException) -> str:
    msg = str(e).strip()
    return (msg.splitlines()[0] if msg else type(e).__name__)[:300]


def _open_tiff_or_openslide(p: Path) -> Slide:
    from .backends_tiff import open_tiff

    if p.suffix.lower() in OPENSLIDE_EXTS and openslide_available():
        from .backends_openslide import open_openslide

        return open_openslide(p)
    return open_tiff(p)


def openslide_available() -> bool:
    """Whether ``openslide`` (and its library) can be imported."""
    try:
        import openslide  # noqa: F401
    except Exception:  # noqa: BLE001 - missing library raises OSError, not ImportError
        return False
    return True


def sniff(p: Path) -> str:
    """'tiff' | 'zarr' | 'openslide' | 'image' from content; raises SlideReadError otherwise."""
    if p.is_dir():
        if any((p / n).exists() for n in (".zattrs", ".zgroup", ".zarray", "zarr.json")):
            return "zarr"
        if p.suffix.lower() == ".zarr":
            raise SlideReadError(f"{p}: not a zarr store (no .zgroup/.zattrs/zarr.json inside)")
        raise SlideReadError(f"{p}: is a directory, not a slide (expected an OME-Zarr store)")
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(16)
    except OSError as e:
        raise SlideReadError(f"{p}: cannot read file ({e.strerror or e})") from None
    if size == 0:
        raise SlideReadError(f"{p}: file is empty")
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    ext = p.suffix.lower()
    if ext in (".mrxs", ".vms", ".vmu"):
        if not openslide_available():
            raise SlideReadError(f"{p}: {ext} slides need OpenSlide; {OPENSLIDE_HINT}")
        return "openslide"
    if head[:3] == b"\xff\xd8\xff" or head[:8] == b"\x89PNG\r\n\x1a\n":
        return "image"
    if head[:2] == b"BM" or head[:6] in (b"GIF87a", b"GIF89a") or head[:4] == b"RIFF":
        return "image"
    what = {".svs": "an SVS (TIFF) file", ".tif": "a TIFF file", ".tiff": "a TIFF file"}.get(
        ext, "a supported slide (TIFF/SVS/OME-TIFF, OME-Zarr, JPEG/PNG or an OpenSlide format)"
    )
    if ext in OPENSLIDE_EXTS:
        what = f"a {ext} slide"
    raise SlideReadError(f"{p}: not {what} (file starts with {head[:8]!r})")


# ------------------------------------------------------------------------------------------
# Lazy tiled arrays for backends


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
                f"({type(e).__name__}: {_first_line(e)})"
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
                except Exception as e:  # noqa: BLE001
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
