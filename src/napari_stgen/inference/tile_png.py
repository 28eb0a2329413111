"""Generated tiles as PNG files with their µm/px (text metadata, pHYs and a JSON sidecar)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from napari_stgen.errors import StgenError
from napari_stgen.io.atomic import atomic_path, write_text_atomic


def save_tile_png(path: str | Path, tile: np.ndarray, mpp: float, meta: dict | None = None) -> Path:
    """Write an RGB PNG with µm/px in its text metadata (``stgen:mpp``, ``stgen``) and pHYs,
    plus a JSON sidecar ``<path>.json``; both written atomically."""
    from PIL import Image, PngImagePlugin

    path = Path(path)
    tile = np.asarray(tile)
    if tile.ndim != 3 or tile.shape[2] != 3 or tile.dtype != np.uint8:
        raise StgenError(f"{path}: tile must be uint8 (H, W, 3), got {tile.dtype} {tile.shape}")
    info = dict(meta or {})
    info.update({"mpp": float(mpp), "unit": "um", "tile_um": float(mpp) * tile.shape[0]})
    pi = PngImagePlugin.PngInfo()
    pi.add_text("stgen:mpp", f"{float(mpp):.6g}")
    pi.add_text("stgen", json.dumps(info))
    ppm = 1e6 / float(mpp)  # pixels per metre
    with atomic_path(path) as tmp:
        Image.fromarray(tile).save(tmp, format="PNG", pnginfo=pi, dpi=(ppm * 0.0254, ppm * 0.0254))
    write_text_atomic(path.with_name(path.name + ".json"), json.dumps(info, indent=1))
    return path


def read_tile_mpp(path: str | Path) -> float:
    """µm/px recorded in a tile PNG written by ``save_tile_png``."""
    from PIL import Image

    with Image.open(path) as im:
        v = im.text.get("stgen:mpp") if hasattr(im, "text") else None
    if v is None:
        raise StgenError(f"{path}: no stgen:mpp metadata")
    return float(v)
