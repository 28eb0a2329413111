"""Stain normalisation of H&E patches towards a reference (the training sections' statistics).

Two methods, both moment matching over tissue pixels only (glass would pull the statistics):

- ``"reinhard"``: per-channel mean/SD in CIE L*a*b* (Reinhard et al. 2001), applied to every
  pixel;
- ``"hed"``: each stain's optical density (haematoxylin / eosin / DAB of skimage's colour
  deconvolution, Ruifrok & Johnston; the space GenST's stain augmentation jitters in) scaled
  so its tissue 90th percentile matches the reference's: glass (density 0) stays glass.

``stain_stats`` summarises a set of patches (e.g. a section, or a model's training data),
``normalise`` maps patches from their own statistics to the reference's.
"""

from __future__ import annotations

import numpy as np
from skimage.color import hed2rgb, lab2rgb, rgb2hed, rgb2lab

METHODS = ("reinhard", "hed")


def _to_space(rgb01: np.ndarray, method: str) -> np.ndarray:
    if method == "reinhard":
        return rgb2lab(rgb01)
    if method == "hed":
        return rgb2hed(rgb01)
    raise ValueError(f"stain normalisation method {method!r}: expected one of {METHODS}")


def _from_space(x: np.ndarray, method: str) -> np.ndarray:
    return lab2rgb(x) if method == "reinhard" else hed2rgb(x)


def _tissue(rgb01: np.ndarray) -> np.ndarray:
    """Tissue pixels: mean optical density above 0.2 (glass is near 0), not black debris."""
    od = -np.log(np.clip(rgb01, 1 / 255, 1)).mean(-1)
    return (od > 0.2) & (od < 2.5)


def stain_stats(patches: np.ndarray, method: str = "reinhard", max_px: int = 400_000) -> dict:
    """Mean and SD per channel of ``patches`` ((N, H, W, 3) uint8) in the method's space,
    over tissue pixels (a seeded subsample of at most ``max_px``)."""
    rgb = np.asarray(patches, np.float32).reshape(-1, 3) / 255.0
    keep = _tissue(rgb)
    px = rgb[keep] if keep.sum() >= 1000 else rgb
    if len(px) > max_px:
        px = px[np.random.default_rng(0).choice(len(px), max_px, replace=False)]
    x = _to_space(px[None], method)[0]
    return {
        "method": method,
        "mean": [float(v) for v in x.mean(0)],
        "std": [float(v) for v in x.std(0) + 1e-6],
        "p90": [float(v) for v in np.percentile(x, 90, axis=0) + 1e-6],
    }


def normalise(patches: np.ndarray, src: dict, ref: dict) -> np.ndarray:
    """``patches`` ((N, H, W, 3) uint8) moved from statistics ``src`` to ``ref`` (same
    method). Returns uint8 of the same shape."""
    method = ref["method"]
    if src["method"] != method:
        raise ValueError(f"statistics of {src['method']!r} and {method!r} cannot be mixed")
    rgb = np.asarray(patches, np.float32) / 255.0
    x = _to_space(rgb, method)
    if method == "hed":
        y = x * (np.asarray(ref["p90"]) / np.asarray(src["p90"]))
    else:
        m_s, s_s = np.asarray(src["mean"]), np.asarray(src["std"])
        m_r, s_r = np.asarray(ref["mean"]), np.asarray(ref["std"])
        y = (x - m_s) / s_s * s_r + m_r
    out = np.clip(_from_space(y, method), 0, 1)
    return np.round(out * 255).astype(np.uint8)
