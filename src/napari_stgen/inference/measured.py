"""Measured spots on a model's gene panel: read from AnnData / napari layers, denoised
within the slide, and the spread of measured neighbours as an uncertainty (no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from napari_stgen.errors import StgenError
from napari_stgen.io.layer_meta import layer_info
from napari_stgen.io.validate import validate_h5ad


@dataclass
class Measured:
    """Measured spots mapped onto a model panel."""

    xy_px: np.ndarray  # (M, 2) level-0 pixel (x, y)
    expr: np.ndarray  # (M, G) log1p CP10k on the panel (0 where absent)
    present: np.ndarray  # (G,) bool: panel genes the measurement has
    obs_names: list[str]
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def n_overlap(self) -> int:
        return int(self.present.sum())


def _is_counts(x: np.ndarray) -> bool:
    sample = x[: min(len(x), 200)]
    return bool(np.all(sample >= 0) and np.allclose(sample, np.round(sample)) and sample.max() > 20)


def measured_from_anndata(adata: Any, genes: list[str], source: str | None = None) -> Measured:
    """Measured spots of an AnnData (or a path to .h5ad) on the panel ``genes``.

    Coordinates: ``obsm['spatial']`` (level-0 px x, y). Expression: ``layers['counts']``,
    ``raw`` or integer-valued ``X`` are normalized to log1p CP10k over *all* the file's genes
    (or over ``obs['total_counts']`` when present, for files holding a subset of genes);
    a non-integer ``X`` is taken as already log1p-normalized. Raises StgenError naming the file
    when there are no coordinates or no gene overlaps the panel.
    """
    name = source or "measured spots"
    if isinstance(adata, (str, Path)):
        import anndata

        name = str(adata)
        if not Path(adata).is_file():
            raise StgenError(f"{adata}: measured-spots file not found")
        validate_h5ad(adata, need_x=True)  # before native code: a bad sparse X would crash it
        try:
            adata = anndata.read_h5ad(adata)
        except Exception as e:  # noqa: BLE001 - h5py raises several types
            raise StgenError(f"{name}: cannot read AnnData ({e})") from e
    if "spatial" not in adata.obsm:
        raise StgenError(f"{name}: no obsm['spatial'] spot coordinates (level-0 px x, y)")
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    var = [str(g) for g in adata.var_names]
    if "counts" in adata.layers:
        x, counts = adata.layers["counts"], True
    elif adata.raw is not None and adata.raw.shape[1] == adata.shape[1]:
        x, counts = adata.raw.X, True
    else:
        x, counts = adata.X, None
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    x = np.asarray(x, dtype=np.float64)
    notes = []
    if counts is None:
        counts = _is_counts(x)
        notes.append("X read as raw counts" if counts else "X read as log1p-normalized")
    if counts:
        tot = x.sum(1, keepdims=True)
        if "total_counts" in adata.obs:  # library size over the whole transcriptome
            tot = np.asarray(adata.obs["total_counts"], np.float64).reshape(-1, 1)
            notes.append("CP10k over obs['total_counts']")
        tot[tot == 0] = 1.0
        x = np.log1p(x / tot * 1e4)
    pos = {g: i for i, g in enumerate(var)}
    present = np.array([g in pos for g in genes], bool)
    if not present.any():
        raise StgenError(
            f"{name}: none of its {len(var)} genes is in the model's {len(genes)}-gene panel "
            f"(e.g. file: {var[:3]}, panel: {genes[:3]})"
        )
    expr = np.zeros((len(xy), len(genes)), np.float32)
    cols = [pos[g] for g, p in zip(genes, present, strict=True) if p]
    expr[:, present] = x[:, cols]
    if not np.isfinite(expr).all() or not np.isfinite(xy).all():
        raise StgenError(f"{name}: non-finite expression or coordinates")
    return Measured(xy, expr, present, [str(o) for o in adata.obs_names], name, notes)


def measured_from_layer(layer: Any, genes: list[str], slide_mpp: float) -> Measured:
    """Measured spots from a napari Points layer (no napari import needed).

    A layer read from an .h5ad (``metadata['stgen']['h5ad_path']``, as
    ``io.anndata.read_h5ad_layers`` makes) is re-read from that file (raw counts,
    ``obsm['spatial']``). Otherwise positions come from the layer's world (y, x) µm data
    (divided by ``slide_mpp`` into level-0 px) and expression from its ``features`` columns
    named like panel genes.
    """
    name = str(getattr(layer, "name", "layer"))
    path = layer_info(getattr(layer, "metadata", None)).get("h5ad_path")
    if path and Path(path).is_file():
        return measured_from_anndata(path, genes)
    feats = getattr(layer, "features", None)
    if feats is None or not isinstance(feats, pd.DataFrame):
        raise StgenError(f"layer {name!r}: no features table with gene columns")
    import anndata

    cols = [c for c in feats.columns if str(c) in set(genes)]
    if not cols:
        raise StgenError(
            f"layer {name!r}: none of its feature columns is in the model's {len(genes)}-gene panel"
        )
    yx = np.asarray(layer.data, np.float64)[:, -2:]
    a = anndata.AnnData(X=feats[cols].to_numpy(np.float32))
    a.var_names = [str(c) for c in cols]
    a.obsm["spatial"] = yx[:, ::-1] / float(slide_mpp)
    return measured_from_anndata(a, genes, source=f"layer {name!r}")


DENOISE_RANK = 5  # within-slide low-rank denoising of measured profiles (``denoise_measured``)
DENOISE_BLEND = 0.5
UNCERTAINTY_K = 8  # measured neighbours whose spread is the uncertainty


def denoise_measured(
    expr: np.ndarray,
    present: np.ndarray | None = None,
    rank: int = DENOISE_RANK,
    blend: float = DENOISE_BLEND,
) -> np.ndarray:
    """Measured log1p CP10k profiles (M, G) pulled toward their rank-``rank`` PCA
    reconstruction over the slide's own spots: ``blend · low-rank + (1 − blend) · measured``
    (per gene standardized over the spots; absent genes untouched). One spot's counts are
    noisy; the slide's main co-expression programmes are not, so this removes count noise
    before measurements are interpolated. Nothing is learnt across slides or patients."""
    y = np.asarray(expr, np.float32)
    cols = np.ones(y.shape[1], bool) if present is None else np.asarray(present, bool)
    r = min(rank, len(y) - 1, int(cols.sum()))
    if r < 1 or blend <= 0:
        return y.copy()
    x = y[:, cols].astype(np.float64)
    mu, sd = x.mean(0), x.std(0) + 1e-3
    z = (x - mu) / sd
    u, sv, vt = np.linalg.svd(z, full_matrices=False)
    zr = (u[:, :r] * sv[:r]) @ vt[:r]
    out = y.copy()
    out[:, cols] = ((blend * zr + (1 - blend) * z) * sd + mu).astype(np.float32)
    return out


def measured_spread(
    meas_xy_um: np.ndarray,
    meas_expr: np.ndarray,
    query_xy_um: np.ndarray,
    y_std: np.ndarray,
    present: np.ndarray | None = None,
    k: int = UNCERTAINTY_K,
) -> np.ndarray:
    """Uncertainty (Q,) of predictions made with measured spots: the spread (SD) of the
    ``k`` nearest measured profiles around each query, in units of each gene's SD
    (``y_std``), mean over the measured genes. Larger = less sure: the neighbourhood
    disagrees, so interpolating it is unreliable (held-out calibration: docs/histotx.md)."""
    q = np.asarray(query_xy_um, np.float64).reshape(-1, 2)
    xy = np.asarray(meas_xy_um, np.float64).reshape(-1, 2)
    if len(q) == 0 or len(xy) < 2:
        return np.full(len(q), np.nan, np.float32)
    e = np.asarray(meas_expr, np.float32)
    cols = np.ones(e.shape[1], bool) if present is None else np.asarray(present, bool)
    _, nb = cKDTree(xy).query(q, k=min(k, len(xy)))
    nb = nb.reshape(len(q), -1)
    sd = np.asarray(y_std, np.float32)[cols]
    return (e[:, cols][nb].std(1) / sd).mean(1).astype(np.float32)
