"""Plain images (JPEG, PNG…) as lazy pyramids.

Images larger than ``io.limits.MAX_IMAGE_PIXELS`` (10⁸ px by default, ``STGEN_MAX_IMAGE_PIXELS``)
are refused from their header, before anything is decoded: a plain image is decoded whole, so a
whole-slide scan should be a tiled pyramidal TIFF or OME-Zarr. The file is decoded at open (PNG;
JPEG at its coarsest DCT scale), so a corrupt file fails there, and each level once on first
access, kept while the slide is open. JPEG
coarse levels (1/2, 1/4, 1/8) are decoded directly at reduced size with libjpeg's DCT scaling,
so a zoomed-out view never decodes the full-resolution image; coarser levels are computed
tile-wise from the level above.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import dask.array as da
import numpy as np
from dask.base import tokenize
from PIL import Image, UnidentifiedImageError

from napari_stgen.errors import SlideReadError
from napari_stgen.io.dask_tiles import CHUNK_PX, TileSource, _convert_block, tiled_dask
from napari_stgen.io.limits import check_level_shape, limit
from napari_stgen.io.slide_handle import Slide

_UNIT_UM_PER_INCH = 25400.0


def _open_pil(path: Path):  # -> PIL.Image.Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # slides are legitimately huge
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _to_rgb(im) -> np.ndarray:  # PIL image -> (H, W, 3) uint8
    mode = im.mode
    if mode in ("RGB", "L", "RGBA", "LA"):
        a = np.asarray(im)
    elif mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im)
        a = (a.astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
    elif mode == "P" and "transparency" in im.info:
        a = np.asarray(im.convert("RGBA"))
    else:  # P, CMYK, YCbCr, 1, …
        a = np.asarray(im.convert("RGB"))
    if a.ndim == 2:
        a = a[:, :, None]
    return _convert_block(a)


class _Decoded:
    """Decode a (possibly reduced) image once, on demand, thread-safely."""

    def __init__(self, path: Path, draft_size: tuple[int, int] | None) -> None:
        self.path, self.draft_size = path, draft_size
        self._arr: np.ndarray | None = None
        self._lock = threading.Lock()

    def get(self) -> np.ndarray:
        with self._lock:
            if self._arr is None:
                try:
                    with _open_pil(self.path) as im:
                        if self.draft_size is not None:
                            im.draft("RGB", self.draft_size)
                        im.load()
                        self._arr = _to_rgb(im)
                except (OSError, ValueError, SyntaxError, MemoryError) as e:
                    raise SlideReadError(f"{self.path}: cannot decode image ({e})") from None
            return self._arr

    def release(self) -> None:
        self._arr = None


def _level(dec: _Decoded, shape: tuple[int, int], name: str) -> da.Array:
    def read_tile(ty: int, tx: int) -> np.ndarray:
        a = dec.get()
        return a[ty * CHUNK_PX : (ty + 1) * CHUNK_PX, tx * CHUNK_PX : (tx + 1) * CHUNK_PX]

    return tiled_dask(TileSource((*shape, 3), (CHUNK_PX, CHUNK_PX), np.uint8, read_tile), name)


def open_image(path: Path) -> Slide:
    """Open a JPEG/PNG/… image as a lazy slide (mpp from its DPI when plausible)."""
    try:
        im = _open_pil(path)
    except UnidentifiedImageError:
        raise SlideReadError(f"{path}: not a readable image") from None
    except OSError as e:
        raise SlideReadError(f"{path}: cannot read image ({e})") from None
    with im:
        w, h = im.size
        fmt = im.format
        mode = im.mode
        dpi = im.info.get("dpi")
        check_level_shape(path, 0, (h, w))
        cap = limit("MAX_IMAGE_PIXELS")
        if w * h > cap:
            raise SlideReadError(
                f"{path}: {fmt} image of {w} × {h} px is past the {cap:.0e}-pixel limit for plain "
                "images (decoded whole); convert it to a tiled pyramidal TIFF (e.g. `vips "
                "tiffsave in.jpg out.tif --tile --pyramid --compression jpeg`) or raise "
                "STGEN_MAX_IMAGE_PIXELS"
            )
        if mode not in ("RGB", "L", "RGBA", "LA", "P", "CMYK", "YCbCr", "1") and not (
            mode.startswith("I;16") or mode == "I"
        ):
            raise SlideReadError(
                f"{path}: pixel mode {mode!r} is not a brightfield RGB or grayscale image"
            )
    st = path.stat()
    token = tokenize(str(path.resolve()), st.st_size, st.st_mtime_ns)
    decoders = [_Decoded(path, None)]
    levels = [_level(decoders[0], (h, w), f"stgen-img-{token}-0")]
    if fmt == "JPEG":
        for k, s in enumerate((2, 4, 8), start=1):
            if max(w, h) / s < 256:
                break
            want = (math.ceil(w / s), math.ceil(h / s))
            with _open_pil(path) as im2:
                im2.draft("RGB", want)
                got = im2.size
            if got != want:
                break
            dec = _Decoded(path, want)
            decoders.append(dec)
            levels.append(_level(dec, (got[1], got[0]), f"stgen-img-{token}-{k}"))
    # validate now: decode the coarsest JPEG level (it reads the whole stream), or the image
    try:
        got = decoders[-1].get()
    except SlideReadError as e:
        raise SlideReadError(f"{path}: corrupt or truncated image ({e})") from None
    except Exception as e:  # noqa: BLE001 - PIL and its decoders raise many types
        raise SlideReadError(f"{path}: corrupt or truncated image ({e})") from None
    want = levels[-1].shape[:2]
    if got.shape[:2] != want:
        raise SlideReadError(
            f"{path}: decodes to {got.shape[1]} × {got.shape[0]} px, header says "
            f"{want[1]} × {want[0]}"
        )
    mpp = None
    try:
        d = float(dpi[0]) if dpi else 0.0
    except (TypeError, ValueError, IndexError):
        d = 0.0
    if math.isfinite(d) and d > 0:
        m = _UNIT_UM_PER_INCH / d
        if m < 20.0:  # coarser: a page-layout default (72 dpi…), not a microscope's
            mpp = m
    closers: list[Callable[[], None]] = [d.release for d in decoders]
    return Slide(
        path,
        "image",
        levels,
        mpp,
        mpp_source="image DPI" if mpp else None,
        vendor=None,
        properties={"image.format": fmt, "image.mode": mode},
        closers=closers,
    )
