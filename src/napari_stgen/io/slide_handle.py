"""The opened whole slide: :class:`Slide`, lazy RGB uint8 levels and their µm per pixel.

Backends build it (``napari_stgen.io.backends_*``); :func:`napari_stgen.io.slide.open_slide`
chooses the backend. A level-0 pixel (row, col) sits at world (row * mpp, col * mpp) µm.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from PIL import Image

from napari_stgen.errors import SlideReadError
from napari_stgen.io.dask_tiles import _blank_on_error, extend_pyramid
from napari_stgen.io.limits import check_level_shape, check_pyramid

OPENSLIDE_HINT = "install OpenSlide support: pip install '.[openslide]' in a napari-stgen checkout"

__all__ = ["Slide", "OPENSLIDE_HINT"]


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
        return self  # a read-only handle (dask graphs of its levels may hold it)

    def __reduce__(self) -> tuple:
        """Pickle as "open this path again" (e.g. to send a slide to dask workers)."""
        mpp = self.mpp if self.mpp_source == "argument" else None
        return (_reopen, (str(self.path), mpp))

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Slide({str(self.path)!r}, format={self.format!r}, {self.width}x{self.height}, "
            f"levels={self.level_count}, mpp={self.mpp})"
        )


def _reopen(path: str, mpp: float | None) -> Slide:
    """Unpickle a :class:`Slide`: open its file again."""
    from napari_stgen.io.slide import open_slide  # local: slide.py imports this module

    return open_slide(path, mpp)
