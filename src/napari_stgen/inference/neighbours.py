"""Nearest-neighbour lookups of sites within a radius (HistoTx windows, GenST context)."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def neighbour_order(query_xy: np.ndarray, site_xy: np.ndarray, k: int, radius: float) -> np.ndarray:
    """Indices (Q, k) of the k nearest sites to each query (−1 beyond ``radius`` / missing)."""
    q = np.asarray(query_xy, np.float64).reshape(-1, 2)
    s = np.asarray(site_xy, np.float64).reshape(-1, 2)
    out = np.full((len(q), k), -1, np.int64)
    if len(s) == 0 or k == 0:
        return out
    kk = min(k, len(s))
    d, idx = cKDTree(s).query(q, k=kk)
    d, idx = d.reshape(len(q), kk), idx.reshape(len(q), kk)
    idx = np.where(d <= radius, idx, -1)
    out[:, :kk] = idx
    return out
