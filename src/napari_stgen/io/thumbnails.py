"""Slide thumbnails for AnnData's ``uns['spatial']`` (the scanpy / Visium convention)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

HIRES_PX = 2000
LOWRES_PX = 600

__all__ = ["HIRES_PX", "LOWRES_PX", "thumbnails_from_levels", "images_from_slide"]


def _resize_rgb(img: np.ndarray, w: int, h: int) -> np.ndarray:

    img = np.ascontiguousarray(np.asarray(img)[..., :3], dtype=np.uint8)
    if img.shape[1] == w and img.shape[0] == h:
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BOX))


def _resample(level: np.ndarray, d_yx: tuple[float, float], s: float, w: int, h: int) -> np.ndarray:
    """(h, w) thumbnail whose pixel j is centred on level-0 pixel j / s (scanpy's convention).

    ``level`` is a pyramid level with downsample ``d_yx`` (level-0 px per level px); box
    filter, edges replicated so the half-pixel shift never reads outside.
    """

    a = np.ascontiguousarray(np.asarray(level)[..., :3], dtype=np.uint8)
    dy, dx = d_yx
    if s == 1.0 and dy == 1.0 and dx == 1.0 and a.shape[:2] == (h, w):
        return a
    pad = int(np.ceil(0.5 / (s * min(dx, dy)))) + 1
    a = np.pad(a, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    b = 0.5 - 0.5 / s  # level-0 continuous coordinate of the thumbnail's left/top edge
    box = (b / dx + pad, b / dy + pad, (b + w / s) / dx + pad, (b + h / s) / dy + pad)
    return np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.BOX, box=box))


def thumbnails_from_levels(
    levels: Sequence[Any], max_px: Sequence[int] = (HIRES_PX, LOWRES_PX)
) -> list[tuple[np.ndarray, float]]:
    """(image, scalefactor) per ``max_px`` from a pyramid (level 0 first, (H, W, 3) arrays).

    Reads the coarsest stored level that is at least as large as wanted (never level 0 of a
    pyramid unless it is the only one large enough), then resamples so that thumbnail pixel
    j is centred on level-0 pixel j / scalefactor (the Visium / scanpy convention).
    """
    h0, w0 = int(levels[0].shape[0]), int(levels[0].shape[1])
    out = []
    cache: dict[int, np.ndarray] = {}
    for m in max_px:
        s = min(1.0, float(m) / max(h0, w0))
        w, h = max(1, round(w0 * s)), max(1, round(h0 * s))
        k = 0
        for i, lev in enumerate(levels):
            if lev.shape[0] >= h and lev.shape[1] >= w:
                k = i
        if k not in cache:
            a = levels[k]
            a = a.compute(scheduler="threads") if hasattr(a, "compute") else np.asarray(a)
            if a.ndim == 2:
                a = np.repeat(a[..., None], 3, axis=2)
            cache[k] = a
        lev = cache[k]
        d = (h0 / lev.shape[0], w0 / lev.shape[1])
        out.append((_resample(lev, d, s, w, h), s))
    return out


def images_from_slide(slide: Any, lenient: bool = False) -> dict:
    """Thumbnails of a slide; ``lenient``: unreadable tiles are white (a run that skipped
    them), otherwise they raise like any other read."""
    if lenient and hasattr(slide, "display_levels"):
        levels = slide.display_levels()
    else:
        levels = list(getattr(slide, "levels", []) or [])
    if levels:
        (hi, sh), (lo, sl) = thumbnails_from_levels(levels)
    else:  # a slide-like object with thumbnail() only
        w0, h0 = float(slide.width), float(slide.height)
        hi = np.asarray(slide.thumbnail(max_px=HIRES_PX))[..., :3]
        sh = hi.shape[1] / w0
        lo_w, lo_h = max(1, round(w0 * sh * LOWRES_PX / max(hi.shape[:2]))), 0
        sl = lo_w / w0
        lo_h = max(1, round(h0 * sl))
        lo = _resize_rgb(hi, lo_w, lo_h)
    return {"hires": hi, "lowres": lo, "tissue_hires_scalef": sh, "tissue_lowres_scalef": sl}
