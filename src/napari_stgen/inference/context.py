"""Spatial context for GenST: windows of tile tokens around each site → ẑ_ctx → profiles.

A *token* is one tile's pooled image features and aligned latent ẑ under each test-time
transform (``GenST.tile_tokens``). A site's window is itself plus its nearest sites within
the model's ``ctx_radius_um``; on a tile grid finer than the ``ctx_pitch_um`` the model was
trained at (the 200 µm spot array), only cells on the site-centred sub-lattice of about that
pitch join the window, so a 112 µm grid sees windows like the training spots. No napari.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from napari_stgen.inference.engine import CancelToken
from napari_stgen.inference.neighbours import neighbour_order

if TYPE_CHECKING:  # torch at import: type names only
    from napari_stgen.models.genst import GenST


def transform_offsets(pos: np.ndarray, k: int) -> np.ndarray:
    """µm offsets (…, 2) as (x, y) → offsets in the patch transformed like ``GenST.tile_tokens``
    transform ``k`` (k % 4 quarter turns of ``torch.rot90`` over (H, W), then a flip of x for
    k ≥ 4)."""
    x, y = pos[..., 0], pos[..., 1]
    for _ in range(k % 4):
        x, y = y, -x
    if k >= 4:
        x = -x
    return np.stack([x, y], -1)


def windows(
    xy_um: np.ndarray,
    k: int,
    radius_um: float,
    query: np.ndarray | None = None,
    cells: np.ndarray | None = None,
    step: int = 1,
) -> np.ndarray:
    """(Q, k) token indices of each query's window: itself first, then its nearest other sites
    within ``radius_um`` (−1 pads). ``query`` indexes the sites (default: all). With grid
    ``cells`` (N, 2) (row, col) and ``step`` > 1, only sites whose row and column differ from
    the query's by multiples of ``step`` join."""
    xy = np.asarray(xy_um, np.float64).reshape(-1, 2)
    q = np.arange(len(xy)) if query is None else np.asarray(query, np.int64)
    sub = cells is not None and step > 1
    kk = k * step * step if sub else k
    nb = neighbour_order(xy[q], xy, kk, radius_um)  # includes the query itself (distance 0)
    ok = (nb >= 0) & (nb != q[:, None])
    if sub:
        c = np.asarray(cells, np.int64).reshape(-1, 2)
        d = c[np.maximum(nb, 0)] - c[q][:, None]
        ok &= ((d % step) == 0).all(-1)
    out = np.full((len(q), k), -1, np.int64)
    out[:, 0] = q
    for i in range(len(q)):
        row = nb[i][ok[i]][: k - 1]
        out[i, 1 : 1 + len(row)] = row
    return out


def context_latent(
    model: GenST,
    feat: np.ndarray,
    zhat: np.ndarray,
    xy_um: np.ndarray,
    query: np.ndarray | None = None,
    batch: int = 256,
    device: str = "cpu",
    cancel: CancelToken | None = None,
    cells: np.ndarray | None = None,
    step: int = 1,
) -> np.ndarray:
    """ẑ_ctx (Q, D) of the query sites, averaged over the R transforms of the tokens.

    ``feat`` (R, N, F) and ``zhat`` (R, N, D) from ``section_tokens``/``tile_tokens``;
    ``xy_um`` (N, 2) the sites' centres; a window is the query plus its nearest sites (see
    ``windows`` for ``cells``/``step``).
    """
    import torch

    cfg = model.cfg
    xy = np.asarray(xy_um, np.float64).reshape(-1, 2)
    win = windows(xy, cfg.ctx_tokens, cfg.ctx_radius_um, query, cells, step)
    nr = feat.shape[0]
    out = np.zeros((len(win), cfg.gene_latent), np.float32)
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(win), batch):
            if cancel is not None:
                cancel.check()
            w = win[s : s + batch]
            valid = w >= 0
            wi = np.maximum(w, 0)
            rel = (xy[wi] - xy[w[:, :1]]).astype(np.float32)
            acc: Any = 0.0
            for r in range(nr):
                pos = transform_offsets(rel, r).astype(np.float32)
                args = [
                    torch.from_numpy(np.asarray(feat[r][wi], np.float32)),
                    torch.from_numpy(np.asarray(zhat[r][wi], np.float32)),
                    torch.from_numpy(pos),
                    torch.from_numpy(valid),
                ]
                acc = acc + model.context(*[a.to(device) for a in args]).float().cpu()
            out[s : s + len(w)] = (acc / nr).numpy()
    return out


def lattice_step(tile_um: float, pitch_um: float) -> int:
    """Sub-lattice step of a ``tile_um`` grid closest to the training pitch (≥ 1)."""
    return max(1, int(round(pitch_um / max(tile_um, 1e-9))))
