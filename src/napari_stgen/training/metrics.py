"""Evaluation metrics (BENCHMARKS.md): per-gene Pearson on a held-out section."""

from __future__ import annotations

import numpy as np


def pearson_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r per column; a constant column (prediction or truth) gives 0."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    p = p - p.mean(0)
    t = t - t.mean(0)
    den = np.sqrt((p**2).sum(0) * (t**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * t).sum(0) / den
    return np.where(den > 1e-12, r, 0.0)


def mean_pearson(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean over genes of the per-gene Pearson r."""
    return float(np.mean(pearson_per_gene(pred, true)))
