"""Hand-made colour/texture features of H&E patches (no learning, no torch).

Used by the ridge baseline (``training.baselines``) and as HistoTx's image tokens.
"""

from __future__ import annotations

import numpy as np


def colour_texture_features(patches: np.ndarray) -> np.ndarray:
    """Per patch: RGB/HSV/HED means, stds and percentiles, gradient energy at two scales,
    grey-level histogram and tissue fraction. (N, F) float32."""
    from skimage.color import rgb2hed, rgb2hsv

    from .patches import tissue_fraction

    feats = []
    for p in patches:
        f = []
        x = p.astype(np.float32) / 255.0
        for img in (x, rgb2hsv(x), rgb2hed(x)):
            flat = img.reshape(-1, 3)
            f += list(flat.mean(0)) + list(flat.std(0))
            f += list(np.percentile(flat, [10, 50, 90], axis=0).ravel())
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
