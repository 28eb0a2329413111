"""What GenST's gene codes mean on a slide: code map, usage, decoded profiles, exemplars.

No Qt and no model calls beyond ``predictor.code_profiles()``: everything is computed from
predictions already made (the Predict widget's store, or an engine result), so the
codebook view never runs the model twice over the same tiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from napari_stgen.coords import Grid

__all__ = [
    "code_map",
    "usage_counts",
    "codebook_health",
    "profile_contrast",
    "top_genes",
    "exemplar_rows",
    "CodeSummary",
    "summarize_code",
    "code_colors",
]


def code_map(grid: Grid, tiles: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Labels image (rows, cols) int32 over ``grid``: ``code + 1`` at predicted tiles, 0 elsewhere.

    Place it in napari with ``scale=grid.scale, translate=grid.translate``; label ``k + 1``
    is gene code ``k``.
    """
    out = np.zeros(grid.shape, dtype=np.int32)
    tiles = np.asarray(tiles, dtype=np.int64).reshape(-1, 2)
    out[tiles[:, 0], tiles[:, 1]] = np.asarray(code, dtype=np.int64) + 1
    return out


def usage_counts(code: np.ndarray, n_codes: int) -> np.ndarray:
    """(n_codes,) number of tiles assigned to each code."""
    return np.bincount(np.asarray(code, dtype=np.int64), minlength=n_codes)[:n_codes]


def codebook_health(code: np.ndarray, n_codes: int) -> dict[str, float | int]:
    """Codes used, dead codes, and perplexity (exp of the usage entropy) of ``code``."""
    counts = usage_counts(code, n_codes).astype(np.float64)
    p = counts / max(counts.sum(), 1.0)
    nz = p[p > 0]
    return {
        "n_codes": int(n_codes),
        "used": int((counts > 0).sum()),
        "dead": int((counts == 0).sum()),
        "perplexity": float(np.exp(-(nz * np.log(nz)).sum())) if nz.size else 0.0,
        "tiles": int(counts.sum()),
    }


def profile_contrast(profiles: np.ndarray, expr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slide mean (G,), contrast (K, G)): each code's decoded profile minus the slide mean.

    Both are in the model's log1p(CP10k) space, so a contrast of +1 is about e× the mean.
    """
    expr = np.asarray(expr, dtype=np.float64)
    mean = expr.mean(axis=0) if len(expr) else np.zeros(np.asarray(profiles).shape[1])
    return mean.astype(np.float32), (np.asarray(profiles, np.float64) - mean).astype(np.float32)


def top_genes(
    contrast_row: np.ndarray, genes: Sequence[str], k: int = 10
) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The ``k`` most up- and down-regulated genes of one code against the slide mean."""
    c = np.asarray(contrast_row, dtype=np.float64)
    order = np.argsort(-c, kind="stable")
    up = [(genes[i], float(c[i])) for i in order[:k] if c[i] > 0]
    down = [(genes[i], float(c[i])) for i in order[::-1][:k] if c[i] < 0]
    return up, down


def exemplar_rows(
    expr: np.ndarray, code: np.ndarray, profiles: np.ndarray, k: int, n: int = 8
) -> np.ndarray:
    """Rows of up to ``n`` typical tiles of code ``k``: nearest to the code's decoded profile.

    Ties (tiles whose prediction is the profile itself) are spread evenly over the code's
    tiles in store order, so exemplars come from across the slide. Deterministic.
    """
    rows = np.flatnonzero(np.asarray(code) == k)
    if len(rows) <= n:
        return rows
    d = ((np.asarray(expr)[rows] - np.asarray(profiles)[k]) ** 2).sum(axis=1)
    if np.ptp(d) < 1e-9:
        return rows[np.linspace(0, len(rows) - 1, n).round().astype(int)]
    return rows[np.argsort(d, kind="stable")[:n]]


@dataclass
class CodeSummary:
    """One code on one slide: usage, decoded profile, contrast, top genes, exemplar rows."""

    code: int
    count: int
    fraction: float
    profile: np.ndarray
    contrast: np.ndarray
    up: list[tuple[str, float]]
    down: list[tuple[str, float]]
    exemplars: np.ndarray


def summarize_code(
    k: int,
    expr: np.ndarray,
    code: np.ndarray,
    profiles: np.ndarray,
    genes: Sequence[str],
    n_top: int = 10,
    n_exemplars: int = 8,
) -> CodeSummary:
    """Everything the codebook view shows about code ``k`` from stored predictions."""
    counts = usage_counts(code, len(profiles))
    _, contrast = profile_contrast(profiles, expr)
    up, down = top_genes(contrast[k], genes, n_top)
    return CodeSummary(
        code=int(k),
        count=int(counts[k]),
        fraction=float(counts[k] / max(counts.sum(), 1)),
        profile=np.asarray(profiles[k], dtype=np.float32),
        contrast=contrast[k],
        up=up,
        down=down,
        exemplars=exemplar_rows(expr, code, profiles, k, n_exemplars),
    )


def code_colors(n_codes: int) -> dict[int, np.ndarray]:
    """Stable RGBA colour per label (``code + 1``); label 0 is transparent.

    Hues step by the golden ratio (neighbouring codes get far-apart hues) with alternating
    saturation/brightness, so the same code has the same colour on every slide and in
    every session, matching the histogram bars.
    """
    import colorsys

    out: dict[int, np.ndarray] = {0: np.zeros(4, np.float32)}
    for k in range(n_codes):
        h = (0.11 + k * 0.618033988749895) % 1.0
        s = (0.85, 0.55, 0.95)[k % 3]
        v = (0.95, 0.80, 0.65)[(k // 3) % 3]
        out[k + 1] = np.array([*colorsys.hsv_to_rgb(h, s, v), 1.0], dtype=np.float32)
    return out
