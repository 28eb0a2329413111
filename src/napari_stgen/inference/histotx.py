"""HistoTx inference: image features, measured spots from AnnData, windowed prediction.

::

    model = load_histotx("default")                     # CheckpointError on a bad file
    meas = measured_from_anndata("spots.h5ad", model.genes)   # or an AnnData / None
    res = predict_with_measurements(slide, model, centres_xy_px, meas)
    res.expr      # (N, G) float32 log1p CP10k at the centres, panel order = model.genes
    res.n_context # (N,) measured spots each prediction saw (0 = image only)

Every query centre gets a window: its own image token, the image tokens of the nearest
measured spots (or, image-only, of the nearest other queries) and the transcript tokens of
the nearest measured spots within ``radius_um``. No torch or napari at import.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, StgenError
from .features import colour_texture_features

KIND = "histotx"
PATCH_UM = 224.0  # image token = a 224 µm patch at 128 px; features of its centre and whole
PATCH_PX = 128
FEATURES = "colour-texture v1: centre 112 µm + whole 224 µm views at 64 px, 60 features each"


# ----------------------------------------------------------------------------- image features
def image_features(patches: np.ndarray) -> np.ndarray:
    """(N, 120) float32 features of uint8 (N, 128, 128, 3) patches of 224 µm."""
    from .patches import _resize

    p = np.asarray(patches)
    if p.ndim != 4 or p.shape[1:] != (PATCH_PX, PATCH_PX, 3) or p.dtype != np.uint8:
        raise StgenError(
            f"HistoTx needs uint8 (N, {PATCH_PX}, {PATCH_PX}, 3) patches, got {p.shape}"
        )
    if len(p) == 0:
        return np.zeros((0, 120), np.float32)
    o = PATCH_PX // 4
    centre = p[:, o : o + PATCH_PX // 2, o : o + PATCH_PX // 2]
    whole = np.stack([_resize(x, PATCH_PX // 2) for x in p])
    return np.concatenate([colour_texture_features(centre), colour_texture_features(whole)], 1)


# ----------------------------------------------------------------------------- measured spots
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
    import scipy.sparse as sp

    name = source or "measured spots"
    if isinstance(adata, (str, Path)):
        import anndata

        name = str(adata)
        if not Path(adata).is_file():
            raise StgenError(f"{adata}: measured-spots file not found")
        from ..io.validate import validate_h5ad

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

    A layer read from an .h5ad (``metadata['h5ad_path']``, as ``io.anndata.read_h5ad_layers``
    makes) is re-read from that file (raw counts, ``obsm['spatial']``). Otherwise positions
    come from the layer's world (y, x) µm data (divided by ``slide_mpp`` into level-0 px) and
    expression from its ``features`` columns named like panel genes.
    """
    import pandas as pd

    name = str(getattr(layer, "name", "layer"))
    meta = getattr(layer, "metadata", {}) or {}
    path = meta.get("h5ad_path")
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


# ----------------------------------------------------------------------------- windows
def neighbour_order(query_xy: np.ndarray, site_xy: np.ndarray, k: int, radius: float):
    """Indices (Q, k) of the k nearest sites to each query (−1 beyond ``radius`` / missing)."""
    q = np.asarray(query_xy, np.float64).reshape(-1, 2)
    s = np.asarray(site_xy, np.float64).reshape(-1, 2)
    out = np.full((len(q), k), -1, np.int64)
    if len(s) == 0 or k == 0:
        return out
    from scipy.spatial import cKDTree

    kk = min(k, len(s))
    d, idx = cKDTree(s).query(q, k=kk)
    d, idx = d.reshape(len(q), kk), idx.reshape(len(q), kk)
    idx = np.where(d <= radius, idx, -1)
    out[:, :kk] = idx
    return out


def predict_sites(
    model: Any,
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
    batch: int = 64,
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
    from scipy.spatial import cKDTree

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


# ----------------------------------------------------------------------------- loading
class HistoTxPredictor:
    """A loaded HistoTx model: ``genes``, ``mpp``, ``patch_px``, ``patch_um``, ``card``, ...

    ``predict(patches)`` is the GenST-compatible call (image only, each patch alone, no
    gene codes: ``code`` is −1); the windowed, position-aware paths are
    ``predict_with_measurements`` and ``predict_tiles``.
    """

    def __init__(self, model: Any, card: dict, path: Path, checksum: str, device: str):
        self.model = model
        self.card = card
        self.path = path
        self.checksum = checksum
        self.device = device
        self.kind = KIND
        self.genes: list[str] = list(card["genes"])
        self.patch_px = int(card.get("patch_px", PATCH_PX))
        self.patch_um = float(card.get("patch_um", PATCH_UM))
        self.mpp = self.patch_um / self.patch_px
        self.tile_um = float(card.get("tile_um", self.patch_um / 2))
        self.name = str(card.get("name", path.stem))
        self.n_codes = 0
        self.batch_size = 64
        w = card.get("window", {})
        self.max_img = int(w.get("max_img", 64))
        self.max_tx = int(w.get("max_tx", 64))
        self.radius_um = float(w.get("radius_um", 1500.0))

    def __repr__(self) -> str:
        return f"HistoTxPredictor({self.name!r}, genes={len(self.genes)}, device={self.device!r})"

    def features(self, patches: np.ndarray) -> np.ndarray:
        return image_features(patches)

    def predict(self, patches: np.ndarray, **_: Any):
        """Image-only expression of uint8 (N, patch_px, patch_px, 3) patches, each alone."""
        from .predictor import Prediction

        p = np.asarray(patches)
        if p.ndim == 3:
            p = p[None]
        f = image_features(p)
        xy = np.zeros((len(f), 2))
        expr, _ = predict_sites(self.model, f, xy, f[:0], xy[:0], max_img=1, device=self.device)
        return Prediction(expr=expr, code=np.full(len(f), -1, np.int64), image_codes=None)

    def code_profiles(self) -> np.ndarray:
        """HistoTx has no gene codebook: an empty (0, G) array."""
        return np.zeros((0, len(self.genes)), np.float32)


def build_model(tensors: dict, card: dict, path: Path):
    """A HistoTx module from checkpoint tensors + card; CheckpointError on a mismatch."""
    from ..models.histotx import HistoTx, HistoTxConfig

    try:
        cfg = HistoTxConfig.from_dict(card["architecture"])
        genes = card["genes"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: model card lacks a valid {e}") from e
    if len(genes) != cfg.n_genes:
        raise CheckpointError(
            f"{path}: gene panel has {len(genes)} genes but the model predicts {cfg.n_genes}"
        )
    if card.get("image_features", FEATURES) != FEATURES:
        raise CheckpointError(f"{path}: image features {card.get('image_features')!r} unknown")
    model = HistoTx(cfg)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: weights do not match the architecture: {str(e).splitlines()[:2]}"
        ) from e
    return model.eval()


def load_histotx(name_or_path: str | Path = "default", device: str = "auto") -> HistoTxPredictor:
    """Load a HistoTx checkpoint by name (``"default"``) or path."""
    from ..models.checkpoint import load_checkpoint, resolve_checkpoint, sha256_file
    from .predictor import pick_device

    path = resolve_checkpoint(name_or_path, KIND)
    tensors, card = load_checkpoint(path, KIND)
    model = build_model(tensors, card, path)
    dev = pick_device(device)
    model.to(dev)
    return HistoTxPredictor(model, card, path, sha256_file(path), dev)


def load_model(name_or_path: str | Path = "default", device: str = "auto") -> Any:
    """GenST or HistoTx predictor, by the checkpoint card's ``kind``.

    ``"default"`` is the default GenST; ``"histotx"`` the default HistoTx; a path or a name in
    ``weights/`` is loaded as whatever its card says.
    """
    from ..models.checkpoint import read_card, resolve_checkpoint
    from .predictor import load_genst

    if str(name_or_path) in ("default", "genst_default"):
        return load_genst("default", device=device)
    if str(name_or_path) in ("histotx", "histotx_default"):
        return load_histotx("default", device=device)
    try:
        path = resolve_checkpoint(name_or_path, KIND)
    except CheckpointError:
        return load_genst(name_or_path, device=device)
    if read_card(path).get("kind") == KIND:
        return load_histotx(path, device=device)
    return load_genst(path, device=device)


def is_histotx(predictor: Any) -> bool:
    return getattr(predictor, "kind", None) == KIND


# ----------------------------------------------------------------------------- slides
@dataclass
class MeasuredContext:
    """Measured spots prepared for a slide: image features and µm positions computed once."""

    measured: Measured
    feats: np.ndarray  # (M, F)
    xy_um: np.ndarray  # (M, 2)
    mpp: float
    model: Any = None  # a copy adapted to these spots (``adapt_steps`` > 0), else None
    adapt_steps: int = 0
    tokens: np.ndarray | None = None  # (M, G) transcript-token profiles (``denoise_measured``)

    def token_expr(self) -> np.ndarray:
        """The profiles the transcript tokens carry: the measured ones after within-slide
        low-rank denoising (computed once)."""
        if self.tokens is None:
            self.tokens = denoise_measured(self.measured.expr, self.measured.present)
        return self.tokens


@dataclass
class HistoTxResult:
    """Output of ``predict_with_measurements``."""

    expr: np.ndarray  # (N, G) float32 log1p CP10k, order = genes
    genes: list[str]
    n_context: np.ndarray  # (N,) measured spots (transcript tokens) each prediction used
    image_only: bool
    measured: Measured | None = None
    info: dict = field(default_factory=dict)
    # (N,) float32, larger = less sure (``measured_spread``); None for image-only predictions
    uncertainty: np.ndarray | None = None


def slide_mpp(slide: Any, mpp: float | None = None) -> float:
    """µm/px of a Slide (or ``mpp``); StgenError when unknown. Arrays need ``mpp``."""
    m = mpp if mpp is not None else getattr(slide, "mpp", None)
    if m is None or float(m) <= 0:
        raise StgenError(f"{getattr(slide, 'path', 'image array')}: no µm/px; pass --mpp / mpp=")
    return float(m)


def _as_predictor(model: Any) -> HistoTxPredictor:
    if isinstance(model, HistoTxPredictor):
        return model
    return load_histotx(model)


def slide_features(
    slide: Any,
    pred: HistoTxPredictor,
    xy_px: np.ndarray,
    mpp: float,
    cancel: Any = None,
    chunk: int = 128,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (start, features) chunks of the patches centred on level-0 ``xy_px``."""
    from .patches import read_patches

    xy = np.asarray(xy_px, np.float64).reshape(-1, 2)
    for s in range(0, len(xy), chunk):
        if cancel is not None:
            cancel.check()
        p = read_patches(slide, xy[s : s + chunk], pred.patch_um, pred.patch_px, mpp=mpp)
        yield s, image_features(p)


def _all_features(slide, pred, xy_px, mpp, cancel=None) -> np.ndarray:
    parts = [f for _, f in slide_features(slide, pred, xy_px, mpp, cancel)]
    return np.concatenate(parts) if parts else np.zeros((0, 120), np.float32)


def prepare_measured(
    slide: Any,
    model: Any,
    measured: Any,
    mpp: float | None = None,
    cancel: Any = None,
    adapt_steps: int = 0,
) -> MeasuredContext:
    """Measured spots (AnnData, .h5ad path or ``Measured``) with image features on ``slide``.

    ``adapt_steps`` > 0 also fine-tunes a copy of the model by masking on these spots
    (test-time adaptation; about a second per 10 steps on one CPU core). Compute once per
    (slide, measured file) and pass to ``predict_with_measurements`` / ``predict_tiles``.
    """
    pred = _as_predictor(model)
    m = slide_mpp(slide, mpp)
    meas = (
        measured if isinstance(measured, Measured) else measured_from_anndata(measured, pred.genes)
    )
    feats = _all_features(slide, pred, meas.xy_px, m, cancel)
    ctx = MeasuredContext(meas, feats, meas.xy_px * m, m)
    if adapt_steps > 0 and len(feats) >= 4:
        from ..training.histotx import adapt_to_measured

        if cancel is not None:
            cancel.check()
        y = meas.expr.copy()
        # genes the file lacks: the model's own mean, so they add no error signal
        y[:, ~meas.present] = pred.model.y_mean.cpu().numpy()[~meas.present]
        net = adapt_to_measured(pred.model.cpu(), feats, ctx.xy_um, y, steps=adapt_steps)
        pred.model.to(pred.device)
        ctx.model = net.to(pred.device)
        ctx.adapt_steps = adapt_steps
    return ctx


_CONTEXTS: dict[tuple, MeasuredContext] = {}
# test-time adaptation steps the CLI and widgets use (``prepare_measured``): chosen by the
# leave-one-patient-out measurement in docs/histotx.md ("Test-time adaptation")
DEFAULT_ADAPT_STEPS = 200


def cached_context(
    slide: Any,
    model: HistoTxPredictor,
    measured: Any,
    adapt_steps: int | None = None,
    cancel: Any = None,
    max_items: int = 4,
) -> MeasuredContext:
    """``prepare_measured`` remembered per (slide, model, measured spots, adapt_steps), so a
    widget that predicts again (live view, new ROI) reuses the features and adapted model.
    ``measured``: a ``Measured``, AnnData or .h5ad path; ``adapt_steps`` defaults to
    ``DEFAULT_ADAPT_STEPS``."""
    import hashlib

    if adapt_steps is None:
        adapt_steps = DEFAULT_ADAPT_STEPS
    meas = (
        measured if isinstance(measured, Measured) else measured_from_anndata(measured, model.genes)
    )
    h = hashlib.sha1(np.ascontiguousarray(meas.xy_px).tobytes())
    h.update(np.ascontiguousarray(meas.expr).tobytes())
    key = (str(getattr(slide, "path", id(slide))), model.checksum, h.hexdigest(), adapt_steps)
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        ctx = prepare_measured(slide, model, meas, cancel=cancel, adapt_steps=adapt_steps)
        while len(_CONTEXTS) >= max_items:
            _CONTEXTS.pop(next(iter(_CONTEXTS)))
        _CONTEXTS[key] = ctx
    return ctx


def iter_predict(
    slide: Any,
    model: Any,
    centres_xy_px: np.ndarray,
    context: MeasuredContext | None = None,
    *,
    mpp: float | None = None,
    image_only: bool = False,
    batch: int = 64,
    cancel: Any = None,
    query_feats: np.ndarray | None = None,
) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """Yields (slice of the centres, expr (n, G), transcript tokens used (n,)) batch by batch.

    With a ``context`` (and not ``image_only``) each centre sees the nearest measured spots'
    image and transcript tokens; otherwise the nearest other centres' image tokens (all
    centres' features are computed first). ``cancel`` needs a ``check()`` that raises.
    """
    pred = _as_predictor(model)
    m = slide_mpp(slide, mpp)
    c = np.asarray(centres_xy_px, np.float64).reshape(-1, 2)
    use = context is not None and not image_only and len(context.xy_um) > 0
    q_um = c * m
    if not use and query_feats is None:
        query_feats = _all_features(slide, pred, c, m, cancel)
    for s in range(0, len(c), batch):
        if cancel is not None:
            cancel.check()
        sl = slice(s, min(s + batch, len(c)))
        qf = query_feats[sl] if query_feats is not None else _all_features(slide, pred, c[sl], m)
        if use:
            args = (
                context.feats,
                context.xy_um,
                context.token_expr(),
                context.measured.present,
                context.xy_um,
            )
        else:
            args = (query_feats, q_um, None, None, None)
        net = context.model if use and context.model is not None else pred.model
        expr, nctx = predict_sites(
            net,
            qf,
            q_um[sl],
            *args,
            max_img=pred.max_img,
            max_tx=pred.max_tx,
            radius_um=pred.radius_um,
            batch=batch,
            exclude_self=not use,
            device=pred.device,
        )
        yield sl, expr, nctx


def predict_with_measurements(
    slide: Any,
    model: HistoTxPredictor | str | Path,
    centres_xy_px: np.ndarray,
    measured: Any = None,
    *,
    mpp: float | None = None,
    image_only: bool = False,
    progress: Callable[[int, int], None] | None = None,
    batch: int = 64,
    adapt_steps: int = 0,
) -> HistoTxResult:
    """Expression at level-0 pixel centres (x, y) of ``slide`` from the image and, when given,
    the measured spots (AnnData, .h5ad path, ``Measured`` or a prepared ``MeasuredContext``).

    ``slide``: a Slide or an (H, W, 3) array (then ``mpp`` is required). ``image_only``
    ignores the measurements (for comparison); ``adapt_steps``: see ``prepare_measured``.
    StgenError for measured spots without ``obsm['spatial']`` or whose genes do not overlap
    the panel.
    """
    pred = _as_predictor(model)
    m = slide_mpp(slide, mpp)
    c = np.asarray(centres_xy_px, np.float64).reshape(-1, 2)
    ctx = measured
    if measured is not None and not isinstance(measured, MeasuredContext):
        if image_only:
            meas = (
                measured
                if isinstance(measured, Measured)
                else measured_from_anndata(measured, pred.genes)
            )
            ctx = MeasuredContext(meas, np.zeros((0, 120), np.float32), np.zeros((0, 2)), m)
        else:
            ctx = prepare_measured(slide, pred, measured, m, adapt_steps=adapt_steps)
    expr = np.zeros((len(c), len(pred.genes)), np.float32)
    nctx = np.zeros(len(c), np.int64)
    for sl, e, n in iter_predict(slide, pred, c, ctx, mpp=m, image_only=image_only, batch=batch):
        expr[sl], nctx[sl] = e, n
        if progress is not None:
            progress(sl.stop, len(c))
    use = ctx is not None and not image_only and len(ctx.xy_um) > 0
    info = {"model": pred.name, "checksum": pred.checksum, "mpp": m, "image_only": not use}
    unc = None
    if use:
        y_std = pred.model.y_std.detach().cpu().numpy()
        unc = measured_spread(ctx.xy_um, ctx.measured.expr, c * m, y_std, ctx.measured.present)
        info["uncertainty"] = f"SD of the {UNCERTAINTY_K} nearest measured profiles (gene SDs)"
    meas = ctx.measured if ctx is not None else None
    if meas is not None:
        info.update(
            measured_source=meas.source,
            measured_spots=len(meas.xy_px),
            adapt_steps=int(getattr(ctx, "adapt_steps", 0)),
            genes_overlap=meas.n_overlap,
            notes=meas.notes,
        )
    return HistoTxResult(expr, list(pred.genes), nctx, not use, meas, info, unc)


def impute_measured(
    model: HistoTxPredictor | str | Path,
    measured: Any,
    query_xy: np.ndarray | None = None,
    *,
    mpp: float,
    batch: int = 64,
) -> HistoTxResult:
    """Fill in expression from measured spots alone (no image): HistoTx transcripts-only.

    ``measured``: AnnData, .h5ad path or ``Measured`` (``obsm['spatial']`` positions);
    ``query_xy``: (N, 2) positions in the same frame (default: the measured spots
    themselves, each predicted from the others: leave-one-out, e.g. to smooth or to check);
    ``mpp``: µm per unit of those positions (e.g. 200 / the array pitch in units for ST
    array coordinates). Returns a ``HistoTxResult`` with ``uncertainty``
    (``measured_spread``)."""
    pred = _as_predictor(model)
    meas = (
        measured if isinstance(measured, Measured) else measured_from_anndata(measured, pred.genes)
    )
    m = float(mpp)
    xy = meas.xy_px * m
    loo = query_xy is None
    q = xy if loo else np.asarray(query_xy, np.float64).reshape(-1, 2) * m
    tok = denoise_measured(meas.expr, meas.present)
    nq, g = len(q), len(pred.genes)
    expr = np.zeros((nq, g), np.float32)
    nctx = np.zeros(nq, np.int64)
    feat = np.zeros((nq, pred.model.cfg.img_dim), np.float32)
    window = dict(max_img=pred.max_img, max_tx=pred.max_tx, radius_um=pred.radius_um)
    if loo:  # each measured spot from the others
        for i in range(nq):
            keep = np.arange(len(xy)) != i
            e, n = predict_sites(
                pred.model, feat[i : i + 1], q[i : i + 1], feat[:0], q[:0],
                tok[keep], meas.present, xy[keep], **window, use_image=False,
                device=pred.device,
            )  # fmt: skip
            expr[i], nctx[i] = e[0], n[0]
    else:
        expr, nctx = predict_sites(
            pred.model, feat, q, feat[:0], q[:0], tok, meas.present, xy, **window,
            batch=batch, use_image=False, device=pred.device,
        )  # fmt: skip
    y_std = pred.model.y_std.detach().cpu().numpy()
    unc = measured_spread(xy, meas.expr, q, y_std, meas.present)
    info = {
        "model": pred.name,
        "checksum": pred.checksum,
        "mode": "transcripts only (no image)",
        "measured_spots": len(xy),
        "leave_one_out": loo,
    }
    return HistoTxResult(expr, list(pred.genes), nctx, False, meas, info, unc)


def predict_tiles(
    slide: Any,
    model: Any,
    tiles: np.ndarray,
    *,
    grid: Any,
    context: MeasuredContext | None = None,
    image_only: bool = False,
    cancel: Any = None,
    batch_size: int = 64,
) -> Iterator[Any]:
    """``engine.predict_tiles`` for HistoTx: yields ``engine.PartialResult`` per batch of the
    grid cells ``tiles`` (row, col), conditioned on ``context`` (``prepare_measured``) unless
    ``image_only``. ``code`` is −1 (HistoTx has no codebook). Not cached (results depend on the
    measured spots)."""
    from .engine import PartialResult
    from .tiles import tile_centres_um

    t = np.asarray(tiles, np.int64).reshape(-1, 2)
    m = slide_mpp(slide)
    yx = tile_centres_um(grid, t)
    xy_px = yx[:, ::-1] / m
    done = 0
    for sl, e, _ in iter_predict(
        slide,
        model,
        xy_px,
        context,
        mpp=m,
        image_only=image_only,
        batch=batch_size,
        cancel=cancel,
    ):
        bt = t[sl]
        done += len(bt)
        yield PartialResult(grid, bt, yx[sl], e, np.full(len(bt), -1, np.int64), done, len(t))
