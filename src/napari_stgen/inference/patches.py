"""Spot- or tile-centred patches of a fixed physical size, resampled to the model's µm/px.

``read_patches`` reads from a Slide (``napari_stgen.io.slide``: ``best_level``,
``read_region``, ``level_mpp``/``downsamples``) or from an in-memory RGB array with a given
µm/px. Either way a patch covers ``patch_um`` µm centred on the given level-0 pixel and is
resized (antialiased) to ``out_px``. Outside the image is white. No torch here.
"""

from __future__ import annotations

import numpy as np

from napari_stgen.errors import StgenError
from napari_stgen.io.slide import Slide


def _resize(img: np.ndarray, out_px: int) -> np.ndarray:
    from PIL import Image

    if img.shape[0] == out_px and img.shape[1] == out_px:
        return np.ascontiguousarray(img, dtype=np.uint8)
    im = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8))
    return np.asarray(im.resize((out_px, out_px), Image.Resampling.BOX, reducing_gap=None))


def crop_padded(img: np.ndarray, x0: int, y0: int, x1: int, y1: int, fill: int = 255) -> np.ndarray:
    """``img[y0:y1, x0:x1]`` of an (H, W, 3) array, padded with ``fill`` outside."""
    h, w = img.shape[:2]
    out = np.full((y1 - y0, x1 - x0, 3), fill, dtype=np.uint8)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = np.asarray(img[sy0:sy1, sx0:sx1, :3])
    return out


def patches_from_array(
    img: np.ndarray, centres_xy_px: np.ndarray, size_px: float, out_px: int
) -> np.ndarray:
    """Square crops of edge ``size_px`` (image pixels) centred on (x, y), resized to ``out_px``."""
    c = np.asarray(centres_xy_px, dtype=np.float64).reshape(-1, 2)
    out = np.empty((len(c), out_px, out_px, 3), dtype=np.uint8)
    half = size_px / 2.0
    for i, (x, y) in enumerate(c):
        x0, y0 = int(round(x - half)), int(round(y - half))
        s = max(int(round(size_px)), 1)
        out[i] = _resize(crop_padded(img, x0, y0, x0 + s, y0 + s), out_px)
    return out


def read_patches(
    slide: Slide | np.ndarray,
    centres_xy_px: np.ndarray,
    patch_um: float,
    out_px: int,
    mpp: float | None = None,
) -> np.ndarray:
    """uint8 (N, out_px, out_px, 3) patches of ``patch_um`` µm centred on level-0 (x, y) px.

    ``slide``: a Slide (reads from ``slide.best_level(patch_um / out_px)``) or an (H, W, 3)
    array (level 0). ``mpp`` overrides the slide's µm/px (required for arrays and for slides
    without resolution metadata).
    """
    c = np.asarray(centres_xy_px, dtype=np.float64).reshape(-1, 2)
    if isinstance(slide, np.ndarray):
        if mpp is None:
            raise StgenError("read_patches: an image array needs mpp= (µm per pixel)")
        return patches_from_array(slide, c, patch_um / mpp, out_px)
    mpp = float(mpp if mpp is not None else (slide.mpp or 0.0))
    if mpp <= 0:
        raise StgenError(f"{getattr(slide, 'path', 'slide')}: no µm/px; pass mpp= (µm/px)")
    target = patch_um / out_px
    # best level for the wanted resolution, with the slide's own mpp possibly overridden
    ds = list(getattr(slide, "downsamples", [1.0]))
    level = 0
    for k, d in enumerate(ds):
        if mpp * d <= target * 1.05:
            level = k
    size0 = patch_um / mpp  # level-0 px
    out = np.empty((len(c), out_px, out_px, 3), dtype=np.uint8)
    for i, (x, y) in enumerate(c):
        x0, y0 = int(round(x - size0 / 2)), int(round(y - size0 / 2))
        x1, y1 = x0 + int(round(size0)), y0 + int(round(size0))
        reg = np.asarray(slide.read_region(x0, y0, x1, y1, level=level))
        if reg.ndim != 3 or reg.shape[0] == 0 or reg.shape[1] == 0:
            raise StgenError(f"{getattr(slide, 'path', 'slide')}: empty region at ({x}, {y})")
        out[i] = _resize(reg[..., :3], out_px)
    return out


def stained_pixels(rgb: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of RGB pixels: saturated (max−min > 32) or dark (mean < 195).

    H&E glass is bright and only faintly tinted (max−min ≈ 20), stained tissue is not.
    """
    p16 = np.asarray(rgb)[..., :3].astype(np.int16)
    return ((p16.max(-1) - p16.min(-1)) > 32) | (p16.mean(-1) < 195)


def tissue_fraction(patches: np.ndarray) -> np.ndarray:
    """Fraction of tissue pixels (``stained_pixels``) per patch; float32 (N,)."""
    p = np.asarray(patches)
    if p.ndim == 3:
        p = p[None]
    return stained_pixels(p).reshape(len(p), -1).mean(1).astype(np.float32)
