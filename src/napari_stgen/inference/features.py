"""Hand-made colour/texture features of H&E patches (no learning, no torch).

``he_patch_features`` is used by the ridge baseline (``training.baselines``);
``image_features`` (two views of a 224 µm patch) are HistoTx's image tokens.
"""

from __future__ import annotations

import numpy as np

from napari_stgen.errors import StgenError
from napari_stgen.inference.patches import _resize, tissue_fraction

PATCH_UM = 224.0  # image token = a 224 µm patch at 128 px; features of its centre and whole
PATCH_PX = 128
FEATURES = "colour-texture v1: centre 112 µm + whole 224 µm views at 64 px, 60 features each"
N_FEATURES = 120


def channel_stats(img: np.ndarray) -> list[float]:
    """Per channel of an (H, W, 3) image: mean, SD, then the 10th/50th/90th percentiles."""
    flat = img.reshape(-1, 3)
    return [*flat.mean(0), *flat.std(0), *np.percentile(flat, [10, 50, 90], axis=0).ravel()]


def he_patch_features(patches: np.ndarray) -> np.ndarray:
    """Per patch: RGB/HSV/HED means, stds and percentiles, gradient energy at two scales,
    grey-level histogram and tissue fraction. (N, F) float32."""
    from skimage.color import rgb2hed, rgb2hsv

    feats = []
    for p in patches:
        f = []
        x = p.astype(np.float32) / 255.0
        for img in (x, rgb2hsv(x), rgb2hed(x)):
            f += channel_stats(img)
        g = x.mean(-1)
        for s in (1, 2):
            gs = g[::s, ::s]
            gy, gx = np.gradient(gs)
            mag = np.sqrt(gx**2 + gy**2)
            f += [mag.mean(), mag.std(), np.percentile(mag, 90)]
        f += list(np.histogram(g, bins=8, range=(0, 1))[0] / g.size)
        feats.append(f)
    out = np.asarray(feats, dtype=np.float32)
    return np.concatenate([out, tissue_fraction(patches)[:, None]], 1)


def image_features(patches: np.ndarray) -> np.ndarray:
    """(N, 120) float32 HistoTx image tokens of uint8 (N, 128, 128, 3) patches of 224 µm."""
    p = np.asarray(patches)
    if p.ndim != 4 or p.shape[1:] != (PATCH_PX, PATCH_PX, 3) or p.dtype != np.uint8:
        raise StgenError(
            f"HistoTx needs uint8 (N, {PATCH_PX}, {PATCH_PX}, 3) patches, got {p.shape}"
        )
    if len(p) == 0:
        return np.zeros((0, N_FEATURES), np.float32)
    o = PATCH_PX // 4
    centre = p[:, o : o + PATCH_PX // 2, o : o + PATCH_PX // 2]
    whole = np.stack([_resize(x, PATCH_PX // 2) for x in p])
    return np.concatenate([he_patch_features(centre), he_patch_features(whole)], 1)
