"""Vendor formats (NDPI, MRXS, SCN, BIF, …) through OpenSlide, an optional extra.

Each level is a dask array whose 512-px chunks call ``read_region`` on demand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from napari_stgen.errors import SlideReadError
from napari_stgen.io.dask_tiles import CHUNK_PX, TileSource, tiled_dask
from napari_stgen.io.slide_handle import OPENSLIDE_HINT, Slide


def _import_openslide() -> Any:
    try:
        import openslide
    except (ImportError, OSError) as e:
        raise ImportError(f"OpenSlide is not available ({e}); {OPENSLIDE_HINT}") from None
    return openslide


def open_openslide(path: Path) -> Slide:
    """Open a slide with OpenSlide; mpp from ``openslide.mpp-x``."""
    try:
        openslide = _import_openslide()
    except ImportError as e:
        raise SlideReadError(f"{path}: {e}") from None
    try:
        osr = openslide.OpenSlide(str(path))
    except Exception as e:  # noqa: BLE001 - OpenSlideError, UnidentifiedImageError, …
        raise SlideReadError(f"{path}: OpenSlide cannot read it ({e})") from None
    props = dict(osr.properties)
    levels = []
    for k in range(osr.level_count):
        w, h = osr.level_dimensions[k]
        ds = float(osr.level_downsamples[k])
        levels.append(_level_array(osr, k, ds, (h, w), f"stgen-os-{path.resolve()}-{k}"))
    mpp = None
    try:
        v = float(props.get("openslide.mpp-x", "nan"))
        if v > 0:
            mpp = v
    except ValueError:
        pass
    return Slide(
        path,
        "openslide",
        levels,
        mpp,
        mpp_source="openslide.mpp-x" if mpp else None,
        vendor=props.get("openslide.vendor"),
        properties=props,
        closers=[osr.close],
    )


def _level_array(osr: Any, level: int, ds: float, shape: tuple[int, int], name: str) -> da.Array:
    h, w = shape

    def read_tile(ty: int, tx: int) -> np.ndarray:
        y0, x0 = ty * CHUNK_PX, tx * CHUNK_PX
        size = (min(CHUNK_PX, w - x0), min(CHUNK_PX, h - y0))
        im = osr.read_region((int(round(x0 * ds)), int(round(y0 * ds))), level, size)
        rgba = np.asarray(im)
        rgb = rgba[..., :3].astype(np.uint16)
        a = rgba[..., 3:].astype(np.uint16)
        return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)

    return tiled_dask(TileSource((h, w, 3), (CHUNK_PX, CHUNK_PX), np.uint8, read_tile), name)
