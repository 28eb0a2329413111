"""One batched HistoTx model call over windows of sites: a query's own image token, its
nearest context sites' image tokens and its nearest measured spots' transcript tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from napari_stgen.inference.contract import BATCH_SIZE
from napari_stgen.inference.neighbours import neighbour_order

if TYPE_CHECKING:  # torch at import: type names only
    from napari_stgen.models.histotx import HistoTx


def predict_sites(  # noqa: PLR0913 - positional (query, context, transcripts) every caller uses
    model: HistoTx,
    query_feat: np.ndarray,
    query_xy_um: np.ndarray,
    ctx_feat: np.ndarray,
    ctx_xy_um: np.ndarray,
    tx: np.ndarray | None = None,
    tx_present: np.ndarray | None = None,
    tx_xy_um: np.ndarray | None = None,
    max_img: int = 64,
    max_tx: int = 64,
    radius_um: float = 1500.0,
    batch: int = BATCH_SIZE,
    exclude_self: bool = False,
    progress: Callable[[int, int], None] | None = None,
    device: str = "cpu",
    use_image: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Profiles (Q, G) log1p CP10k at the queries and how many transcript tokens each saw.

    A query's window: its own image token first, then the image tokens of the nearest
    ``max_img - 1`` context sites and the transcript tokens (log1p CP10k, panel order,
    ``tx_present`` marks measured genes) of the nearest ``max_tx`` measured sites, all within
    ``radius_um``. ``exclude_self`` drops context sites at the query's own position.
    ``use_image=False`` withholds every image token's pixels (transcripts only).
    """
    import torch

    qf = np.asarray(query_feat, np.float32)
    qxy = np.asarray(query_xy_um, np.float64).reshape(-1, 2)
    nq, g = len(qxy), model.cfg.n_genes
    if nq == 0:
        return np.zeros((0, g), np.float32), np.zeros(0, np.int64)
    cxy = np.asarray(ctx_xy_um, np.float64).reshape(-1, 2)
    cf = np.asarray(ctx_feat, np.float32)
    ci = neighbour_order(qxy, cxy, max_img - 1 + (1 if exclude_self else 0), radius_um)
    if exclude_self and len(cxy):
        same = np.zeros_like(ci, bool)
        ok = ci >= 0
        d = np.linalg.norm(cxy[np.maximum(ci, 0)] - qxy[:, None], axis=-1)
        same[ok] = d[ok] < 1e-6
        ci = np.where(same, -1, ci)
    use_tx = tx is not None and tx_xy_um is not None and len(tx_xy_um) > 0
    if use_tx:
        txy = np.asarray(tx_xy_um, np.float64).reshape(-1, 2)
        ti = neighbour_order(qxy, txy, max_tx, radius_um)
        ty = model.standardize(torch.from_numpy(np.asarray(tx, np.float32))).numpy()
        pres = np.ones(g, np.float32) if tx_present is None else np.asarray(tx_present, np.float32)
        ty = ty * pres
    else:
        ti = np.full((nq, 0), -1, np.int64)
    out = np.empty((nq, g), np.float32)
    model.eval()
    with torch.inference_mode():
        for s in range(0, nq, batch):
            e = min(s + batch, nq)
            b = e - s
            ic = ci[s:e]
            n_img = 1 + ic.shape[1]
            feat = np.zeros((b, n_img, cf.shape[1] if cf.ndim == 2 else qf.shape[1]), np.float32)
            pos = np.zeros((b, n_img, 2), np.float32)
            valid = np.zeros((b, n_img), bool)
            feat[:, 0], valid[:, 0] = qf[s:e], True
            okc = ic >= 0
            if okc.any():
                feat[:, 1:][okc] = cf[ic[okc]]
                rel = cxy[np.maximum(ic, 0)] - qxy[s:e, None]
                pos[:, 1:][okc] = rel[okc]
                valid[:, 1:] = okc
            args = [torch.from_numpy(feat), torch.from_numpy(pos), torch.from_numpy(valid)]
            if use_tx and ti.shape[1]:
                it = ti[s:e]
                okt = it >= 0
                t = np.zeros((b, it.shape[1], g), np.float32)
                m = np.zeros((b, it.shape[1], g), np.float32)
                tp = np.zeros((b, it.shape[1], 2), np.float32)
                t[okt] = ty[it[okt]]
                m[okt] = pres
                tp[okt] = (txy[np.maximum(it, 0)] - qxy[s:e, None])[okt]
                args += [torch.from_numpy(x) for x in (t, m, tp, okt)]
            else:
                args += [None, None, None, None]
            if not use_image:
                args.append(torch.zeros(b, n_img, dtype=torch.bool))
            args = [a if a is None else a.to(device) for a in args]
            y = model(*args)[:, 0]
            out[s:e] = model.unstandardize(y).float().cpu().numpy()
            if progress is not None:
                progress(e, nq)
    n_ctx = (ti >= 0).sum(1) if use_tx else np.zeros(nq, np.int64)
    return out, n_ctx.astype(np.int64)
