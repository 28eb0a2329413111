"""HistoTx inference: a loaded model, measured spots prepared on a slide, windowed prediction.

::

    model = load_histotx("default")                     # CheckpointError on a bad file
    meas = measured_from_anndata("spots.h5ad", model.genes)   # or an AnnData / None
    res = predict_with_measurements(slide, model, centres_xy_px, meas)
    res.expr      # (N, G) float32 log1p CP10k at the centres, panel order = model.genes
    res.n_context # (N,) measured spots each prediction saw (0 = image only)

Every query centre gets a window: its own image token, the image tokens of the nearest
measured spots (or, image-only, of the nearest other queries) and the transcript tokens of
the nearest measured spots within ``radius_um`` (``histotx_sites.predict_sites``). No torch
or napari at import.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_stgen.errors import CheckpointError, StgenError
from napari_stgen.inference.adapt import adapt_to_measured
from napari_stgen.inference.contract import (
    BATCH_SIZE,
    DEFAULT_ADAPT_STEPS,
    Kind,
    SpotRequest,
    SpotResult,
    TileRequest,
)
from napari_stgen.inference.engine import CancelToken, PartialResult
from napari_stgen.inference.features import FEATURES, N_FEATURES, PATCH_PX, PATCH_UM, image_features
from napari_stgen.inference.histotx_sites import predict_sites
from napari_stgen.inference.loaded import LoadedPredictor, open_model
from napari_stgen.inference.measured import (
    UNCERTAINTY_K,
    Measured,
    denoise_measured,
    measured_from_anndata,
    measured_from_layer,
    measured_spread,
)
from napari_stgen.inference.patches import read_patches
from napari_stgen.inference.predictor import Prediction
from napari_stgen.inference.tiles import slide_grid, tile_centres_um, tile_um_of
from napari_stgen.io.slide import Slide
from napari_stgen.models.checkpoint import check_panel, load_weights

if TYPE_CHECKING:  # torch at import: type names only
    from napari_stgen.models.histotx import HistoTx


# ----------------------------------------------------------------------------- loading
class HistoTxPredictor(LoadedPredictor):
    """A loaded HistoTx model: ``genes``, ``mpp``, ``patch_px``, ``patch_um``, ``card``, ...

    ``predict(patches)`` is the GenST-compatible call (image only, each patch alone, no
    gene codes: ``code`` is −1); the windowed, position-aware paths are
    ``predict_with_measurements`` and ``predict_histotx_tiles``.
    """

    kind = Kind.HISTOTX.value

    def __init__(self, model: HistoTx, card: dict, path: Path, checksum: str, device: str):
        super().__init__(model, card, path, checksum, device)
        self.patch_px = int(card.get("patch_px", PATCH_PX))
        self.patch_um = float(card.get("patch_um", PATCH_UM))
        self.mpp = self.patch_um / self.patch_px
        self.tile_um = float(card.get("tile_um", self.patch_um / 2))
        self.n_codes = 0
        self.confidence = None  # no novelty scorer: HistoTx's uncertainty needs measured spots
        w = card.get("window", {})
        self.max_img = int(w.get("max_img", 64))
        self.max_tx = int(w.get("max_tx", 64))
        self.radius_um = float(w.get("radius_um", 1500.0))

    def __repr__(self) -> str:
        return f"HistoTxPredictor({self.name!r}, genes={len(self.genes)}, device={self.device!r})"

    def features(self, patches: np.ndarray) -> np.ndarray:
        return image_features(patches)

    def predict(self, patches: np.ndarray, **_: Any) -> Prediction:
        """Image-only expression of uint8 (N, patch_px, patch_px, 3) patches, each alone."""
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

    def predict_tiles(self, slide: Slide, request: TileRequest) -> Iterator[PartialResult]:
        """The request's grid cells, conditioned on ``request.measured`` (``Measured``,
        AnnData, .h5ad path or a measured-spots Points layer; prepared once per slide by
        ``cached_context``) unless ``image_only``."""
        ctx = None
        if request.measured is not None and not request.image_only:
            meas = as_measured(request.measured, self.genes, slide_mpp(slide))
            ctx = cached_context(slide, self, meas, cancel=request.cancel)
        grid = request.grid or slide_grid(slide, tile_um_of(self))
        yield from predict_histotx_tiles(
            slide,
            self,
            request.tiles,
            grid=grid,
            context=ctx,
            image_only=request.image_only,
            cancel=request.cancel,
            batch_size=request.batch_size,
        )

    def predict_spots(self, slide: Slide, xy_px: np.ndarray, request: SpotRequest) -> SpotResult:
        """``predict_with_measurements`` at level-0 ``xy_px``; ``info['histotx']`` records the
        model, the measured spots and the adaptation."""
        m = request.measured
        res = predict_with_measurements(
            slide,
            self,
            xy_px,
            str(m) if isinstance(m, Path) else m,
            image_only=request.image_only,
            progress=request.progress,
            batch=request.batch_size,
            adapt_steps=request.adapt_steps,
        )
        return SpotResult(res.expr, None, None, {"histotx": res.info})


def as_measured(measured: Any, genes: list[str], mpp: float) -> Measured:
    """A ``Measured`` of ``genes`` from a ``Measured``, AnnData, .h5ad path or Points layer."""
    if isinstance(measured, Measured):
        return measured
    if isinstance(measured, str | Path) or hasattr(measured, "obsm"):
        return measured_from_anndata(measured, genes)
    return measured_from_layer(measured, genes, mpp)


def build_histotx(tensors: dict, card: dict, path: Path) -> HistoTx:
    """A HistoTx module from checkpoint tensors + card; CheckpointError on a mismatch."""
    from napari_stgen.models.histotx import HistoTx, HistoTxConfig  # torch at import

    try:
        cfg = HistoTxConfig.from_dict(card["architecture"])
        genes = card["genes"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: model card lacks a valid {e}") from e
    check_panel(path, genes, cfg.n_genes)
    if card.get("image_features", FEATURES) != FEATURES:
        raise CheckpointError(f"{path}: image features {card.get('image_features')!r} unknown")
    return load_weights(HistoTx(cfg), tensors, path)


def load_histotx(name_or_path: str | Path = "default", device: str = "auto") -> HistoTxPredictor:
    """Load a HistoTx checkpoint by name (``"default"``) or path."""
    ck = open_model(name_or_path, HistoTxPredictor.kind, build_histotx, device)
    return HistoTxPredictor(ck.model, ck.card, ck.path, ck.checksum, ck.device)


# ----------------------------------------------------------------------------- slides
@dataclass
class MeasuredContext:
    """Measured spots prepared for a slide: image features and µm positions computed once."""

    measured: Measured
    feats: np.ndarray  # (M, F)
    xy_um: np.ndarray  # (M, 2)
    mpp: float
    model: HistoTx | None = None  # a copy adapted to these spots (``adapt_steps`` > 0), else None
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


def slide_mpp(slide: Slide | np.ndarray, mpp: float | None = None) -> float:
    """µm/px of a Slide (or ``mpp``); StgenError when unknown. Arrays need ``mpp``."""
    m = mpp if mpp is not None else getattr(slide, "mpp", None)
    if m is None or float(m) <= 0:
        raise StgenError(f"{getattr(slide, 'path', 'image array')}: no µm/px; pass mpp= (µm/px)")
    return float(m)


def _as_predictor(model: HistoTxPredictor | str | Path) -> HistoTxPredictor:
    if isinstance(model, HistoTxPredictor):
        return model
    return load_histotx(model)


def slide_features(
    slide: Slide | np.ndarray,
    pred: HistoTxPredictor,
    xy_px: np.ndarray,
    mpp: float,
    cancel: CancelToken | None = None,
    chunk: int = 128,
) -> np.ndarray:
    """(N, F) image features of the patches centred on level-0 ``xy_px``, read ``chunk`` at
    a time (``cancel`` checked between chunks)."""
    xy = np.asarray(xy_px, np.float64).reshape(-1, 2)
    parts = []
    for s in range(0, len(xy), chunk):
        if cancel is not None:
            cancel.check()
        p = read_patches(slide, xy[s : s + chunk], pred.patch_um, pred.patch_px, mpp=mpp)
        parts.append(image_features(p))
    return np.concatenate(parts) if parts else np.zeros((0, N_FEATURES), np.float32)


def prepare_measured(
    slide: Slide | np.ndarray,
    model: HistoTxPredictor | str | Path,
    measured: Any,
    mpp: float | None = None,
    cancel: CancelToken | None = None,
    adapt_steps: int = 0,
) -> MeasuredContext:
    """Measured spots (AnnData, .h5ad path or ``Measured``) with image features on ``slide``.

    ``adapt_steps`` > 0 also fine-tunes a copy of the model by masking on these spots
    (test-time adaptation; about a second per 10 steps on one CPU core). Compute once per
    (slide, measured file) and pass to ``predict_with_measurements`` / ``predict_histotx_tiles``.
    """
    pred = _as_predictor(model)
    m = slide_mpp(slide, mpp)
    meas = (
        measured if isinstance(measured, Measured) else measured_from_anndata(measured, pred.genes)
    )
    feats = slide_features(slide, pred, meas.xy_px, m, cancel)
    ctx = MeasuredContext(meas, feats, meas.xy_px * m, m)
    if adapt_steps > 0 and len(feats) >= 4:
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


def cached_context(
    slide: Slide | np.ndarray,
    model: HistoTxPredictor,
    measured: Any,
    adapt_steps: int | None = None,
    cancel: CancelToken | None = None,
    max_items: int = 4,
) -> MeasuredContext:
    """``prepare_measured`` remembered per (slide, model, measured spots, adapt_steps), so a
    widget that predicts again (live view, new ROI) reuses the features and adapted model.
    ``measured``: a ``Measured``, AnnData or .h5ad path; ``adapt_steps`` defaults to
    ``DEFAULT_ADAPT_STEPS``."""
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
    slide: Slide | np.ndarray,
    model: HistoTxPredictor | str | Path,
    centres_xy_px: np.ndarray,
    context: MeasuredContext | None = None,
    *,
    mpp: float | None = None,
    image_only: bool = False,
    batch: int = BATCH_SIZE,
    cancel: CancelToken | None = None,
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
        query_feats = slide_features(slide, pred, c, m, cancel)
    for s in range(0, len(c), batch):
        if cancel is not None:
            cancel.check()
        sl = slice(s, min(s + batch, len(c)))
        qf = query_feats[sl] if query_feats is not None else slide_features(slide, pred, c[sl], m)
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
    slide: Slide | np.ndarray,
    model: HistoTxPredictor | str | Path,
    centres_xy_px: np.ndarray,
    measured: Any = None,
    *,
    mpp: float | None = None,
    image_only: bool = False,
    progress: Callable[[int, int], None] | None = None,
    batch: int = BATCH_SIZE,
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
            ctx = MeasuredContext(meas, np.zeros((0, N_FEATURES), np.float32), np.zeros((0, 2)), m)
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
    batch: int = BATCH_SIZE,
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


def predict_histotx_tiles(
    slide: Slide | np.ndarray,
    model: HistoTxPredictor | str | Path,
    tiles: np.ndarray,
    *,
    grid: Any,
    context: MeasuredContext | None = None,
    image_only: bool = False,
    cancel: CancelToken | None = None,
    batch_size: int = BATCH_SIZE,
) -> Iterator[Any]:
    """``engine.predict_tiles`` for HistoTx: yields ``engine.PartialResult`` per batch of the
    grid cells ``tiles`` (row, col), conditioned on ``context`` (``prepare_measured``) unless
    ``image_only``. ``code`` is −1 (HistoTx has no codebook). ``uncertainty``: with measured
    spots, their spread around each tile (``measured_spread``, as ``stgen predict``), else
    None. Not cached (results depend on the measured spots)."""
    t = np.asarray(tiles, np.int64).reshape(-1, 2)
    m = slide_mpp(slide)
    yx = tile_centres_um(grid, t)
    xy_px = yx[:, ::-1] / m
    unc = None
    if context is not None and not image_only and len(context.xy_um) > 0:
        pred = _as_predictor(model)
        y_std = pred.model.y_std.detach().cpu().numpy()
        meas = context.measured
        unc = measured_spread(context.xy_um, meas.expr, yx[:, ::-1], y_std, meas.present)
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
        yield PartialResult(
            grid, bt, yx[sl], e, np.full(len(bt), -1, np.int64), done, len(t),
            uncertainty=None if unc is None else unc[sl],
        )  # fmt: skip
