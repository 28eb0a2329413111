"""Hand-made colour/texture features of H&E tiles: the read-out of the independent ridge
oracle (``evaluate_stmdit``) and part of the realism two-sample test (``realism``)."""

from __future__ import annotations

import numpy as np

from napari_stgen.inference.features import channel_stats

__all__ = ["colour_texture_features"]


def colour_texture_features(tiles: np.ndarray) -> np.ndarray:
    """Hand-made colour/texture features per tile (RGB + HED statistics, gradients)."""
    from skimage.color import rgb2hed

    t = np.asarray(tiles, np.float32) / 255.0
    feats = []
    for x in t:
        hed = rgb2hed(x)
        f = []
        for img in (x, hed):
            f += channel_stats(img)
        g = x.mean(-1)
        for s in (1, 2):
            gs = g[::s, ::s]
            gy, gx = np.gradient(gs)
            mag = np.hypot(gx, gy)
            f += [mag.mean(), mag.std()]
        h = hed[..., 0]
        f += list(np.histogram(h, bins=8, range=(-0.1, 0.3))[0] / h.size)
        f += [float((g < 0.6).mean()), float((x.max(-1) - x.min(-1) > 0.08).mean())]
        feats.append(f)
    return np.asarray(feats, np.float32)
