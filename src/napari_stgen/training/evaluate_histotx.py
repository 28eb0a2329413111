"""Leave-one-section-out evaluation of HistoTx with half of the held-out spots hidden.

On the held-out section a seeded random half of the spots is hidden; the other half is
"measured". Every method predicts the hidden spots; the score is the per-gene Pearson over
the hidden spots, mean over the 50 benchmark genes (BENCHMARKS.md genes, log1p CP10k):

- ``histotx``: image tokens of the window's spots + transcript tokens of the visible spots;
- ``histotx_adapted``: the same, after ``adapt_steps`` of masked fine-tuning on the visible
  (measured) spots of the held-out section only (test-time adaptation);
- ``histotx_image_only``: the same model without transcript tokens;
- ``histotx_transcripts_only``: the same model with every image token's pixels withheld;
- ``genst``: a GenST checkpoint (image only) when one is given — the result records whether
  it saw the held-out section in training;
- ``nearest_neighbour``: the profile of the nearest visible spot;
- ``knn4`` / ``knn8``: plain mean of the 4 / 8 nearest visible spots;
- ``gaussian_process``: per-gene sklearn GaussianProcessRegressor (constant × RBF + white
  noise, hyper-parameters by marginal likelihood) on the visible spots' µm positions.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy.spatial import cKDTree
from scipy.stats import spearmanr

from napari_stgen.errors import StgenError
from napari_stgen.inference.adapt import adapt_to_measured
from napari_stgen.inference.histotx import HistoTxPredictor, load_histotx
from napari_stgen.inference.histotx_sites import predict_sites
from napari_stgen.inference.measured import denoise_measured, measured_spread
from napari_stgen.inference.patches import patches_from_array
from napari_stgen.inference.predictor import load_genst
from napari_stgen.io.her2st import read_her2st_section
from napari_stgen.training.data import split_holdout
from napari_stgen.training.histotx import (
    TrainConfig,
    histotx_card,
    load_expression_spotsets,
    load_spotsets,
    train_histotx,
)
from napari_stgen.training.histotx import save_model as _save
from napari_stgen.training.metrics import pearson_per_gene


def split_hidden(n: int, frac: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(hidden, visible) sorted index arrays: a seeded random ``frac`` of n spots hidden."""
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * frac))
    return np.sort(perm[:k]), np.sort(perm[k:])


def nearest_neighbour(xy_vis: np.ndarray, y_vis: np.ndarray, xy_q: np.ndarray) -> np.ndarray:
    """Profile of the nearest visible spot for each query."""
    _, i = cKDTree(xy_vis).query(xy_q, k=1)
    return y_vis[i]


def gaussian_process(
    xy_vis: np.ndarray, y_vis: np.ndarray, xy_q: np.ndarray, seed: int = 0
) -> np.ndarray:
    """Per-column GP regression (kriging) of ``y_vis`` at the queries; positions in µm."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

    x = np.asarray(xy_vis, np.float64) / 1000.0  # mm
    xq = np.asarray(xy_q, np.float64) / 1000.0
    out = np.empty((len(xq), y_vis.shape[1]), np.float32)
    for j in range(y_vis.shape[1]):
        k = ConstantKernel(1.0, (1e-3, 1e2)) * RBF(0.4, (0.05, 5.0)) + WhiteKernel(0.5, (1e-3, 1e1))
        gp = GaussianProcessRegressor(k, normalize_y=True, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gp.fit(x, y_vis[:, j])
        out[:, j] = gp.predict(xq)
    return out


def _score(pred: np.ndarray, true: np.ndarray) -> dict:
    r = pearson_per_gene(pred, true)
    return {"mean_pearson": round(float(r.mean()), 4), "per_gene": [round(float(v), 4) for v in r]}


def genst_holdout_predict(genst_model: str | Path, data_dir: str | Path, holdout: str, xy_px, mpp):
    """GenST predictions (panel = its genes) at the held-out section's spots, and its card."""
    pred = load_genst(genst_model, device="cpu")
    sec = read_her2st_section(data_dir, holdout)
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(sec.image_path) as im:
        img = np.asarray(im.convert("RGB"))
    patches = patches_from_array(img, xy_px, pred.patch_um / mpp, pred.patch_px)
    return pred.predict(patches).expr, pred


@dataclass(frozen=True)
class HiddenSplit:
    """Which spots of a held-out section are hidden: a ``frac`` of them, drawn with ``seed``."""

    frac: float = 0.5
    seed: int = 0


@dataclass(frozen=True)
class Comparators:
    """Methods scored beside HistoTx and kNN: a Gaussian process (``gp``) and, when
    ``genst_model`` is given, that GenST checkpoint's image-only prediction."""

    gp: bool = True
    genst_model: str | Path | None = None


def run_histotx_fold(
    data_dir: str | Path,
    holdout: str,
    tcfg: TrainConfig | None = None,
    model: str | Path | None = None,
    split: HiddenSplit = HiddenSplit(),
    compare: Comparators = Comparators(),
    cache_dir: str | Path | None = None,
    save_model: str | Path | None = None,
    adapt_steps: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Train HistoTx without ``holdout`` (or load ``model``) and score all methods on it."""
    import torch

    sets, panel, bench = load_spotsets(data_dir, cache_dir=cache_dir)
    hide_frac, split_seed = split.frac, split.seed
    gp, genst_model = compare.gp, compare.genst_model

    te, tr = split_holdout(sets, holdout, data_dir)
    hid, vis = split_hidden(len(te.xy_um), hide_frac, split_seed)
    res: dict = {
        "holdout": holdout,
        "train_sections": [s.name for s in tr],
        "n_spots": int(len(te.xy_um)),
        "n_hidden": int(len(hid)),
        "hide_fraction": hide_frac,
        "split_seed": split_seed,
        "genes": bench,
        "metric": "mean Pearson over the 50 benchmark genes on the hidden spots",
    }
    t0 = time.time()
    if model is None:
        tcfg = tcfg or TrainConfig()
        net, hist = train_histotx(tr, panel, None, tcfg, log=log)
        res["train_seconds"] = round(time.time() - t0, 1)
        res["train_config"] = {k: v for k, v in tcfg.__dict__.items() if k != "extra"}
        mpanel = panel
        if save_model is not None:
            card = histotx_card(
                net,
                panel,
                bench,
                tcfg,
                name=Path(save_model).stem,
                data={"dir": str(data_dir), "sections": res["train_sections"]},
            )
            _save(save_model, net, card)
        max_img = max_tx = tcfg.max_tokens
        radius = tcfg.radius_um
    else:
        p = load_histotx(model, device="cpu")
        net, mpanel = p.model, p.genes
        res["model"] = {"name": p.name, "path": str(p.path), "sha256": p.checksum}
        res["model_saw_holdout"] = holdout in p.card.get("data", {}).get("sections", [])
        max_img, max_tx, radius = p.max_img, p.max_tx, p.radius_um
        if mpanel != panel:
            raise StgenError(f"{p.path}: gene panel differs from the data's panel")
    torch.set_num_threads(1)
    ib = [panel.index(g) for g in bench]
    true = te.y[hid][:, ib]
    q_f, q_xy = te.feats[hid], te.xy_um[hid]
    t1 = time.time()
    # every mode predicts the hidden spots from all image tokens of the section
    window = dict(max_img=max_img, max_tx=max_tx, radius_um=radius, exclude_self=True)

    y_tok = denoise_measured(te.y[vis])  # transcript tokens as the library makes them
    measured = (y_tok, None, te.xy_um[vis])
    fused, nctx = predict_sites(net, q_f, q_xy, te.feats, te.xy_um, *measured, **window)
    img_only, _ = predict_sites(net, q_f, q_xy, te.feats, te.xy_um, **window)
    tx_only, _ = predict_sites(
        net, q_f, q_xy, te.feats, te.xy_um, *measured, **window, use_image=False
    )
    res["predict_seconds"] = round(time.time() - t1, 2)
    adapted = None
    if adapt_steps > 0:
        t2 = time.time()
        net_a = adapt_to_measured(
            net, te.feats[vis], te.xy_um[vis], te.y[vis], steps=adapt_steps, tcfg=tcfg
        )
        adapted, _ = predict_sites(
            net_a,
            q_f,
            q_xy,
            te.feats,
            te.xy_um,
            y_tok,
            None,
            te.xy_um[vis],
            max_img=max_img,
            max_tx=max_tx,
            radius_um=radius,
            exclude_self=True,
        )
        res["adapt_seconds"] = round(time.time() - t2, 1)
        res["adapt_steps"] = adapt_steps
    res["mean_transcript_tokens"] = round(float(nctx.mean()), 1)
    methods = {
        "histotx": _score(fused[:, ib], true),
        **({"histotx_adapted": _score(adapted[:, ib], true)} if adapted is not None else {}),
        "histotx_image_only": _score(img_only[:, ib], true),
        "histotx_transcripts_only": _score(tx_only[:, ib], true),
        "nearest_neighbour": _score(nearest_neighbour(te.xy_um[vis], te.y[vis][:, ib], q_xy), true),
        **{
            f"knn{k}": _score(knn_interpolate(te.xy_um[vis], te.y[vis][:, ib], q_xy, k), true)
            for k in KNN_K
        },
    }
    if gp:
        t2 = time.time()
        methods["gaussian_process"] = _score(
            gaussian_process(te.xy_um[vis], te.y[vis][:, ib], q_xy), true
        )
        res["gp_seconds"] = round(time.time() - t2, 1)
    if genst_model is not None:
        e, gp_ = genst_holdout_predict(genst_model, data_dir, holdout, te.xy_px[hid], te.mpp)
        missing = [g for g in bench if g not in gp_.genes]
        if missing:
            raise StgenError(f"{gp_.path}: GenST panel lacks benchmark genes {missing[:5]}")
        methods["genst"] = _score(e[:, [gp_.genes.index(g) for g in bench]], true)
        res["genst_model"] = {
            "path": str(gp_.path),
            "sha256": gp_.checksum,
            "saw_holdout": holdout in gp_.card.get("data", {}).get("sections", []),
        }
    res["methods"] = methods
    res["summary"] = {k: v["mean_pearson"] for k, v in methods.items()}
    return res


# ----------------------------------------------------------------- leave-one-patient-out
PATIENTS = ("A", "B", "C", "D", "E", "F")
KNN_K = (4, 8)


def knn_interpolate(
    xy_vis: np.ndarray,
    y_vis: np.ndarray,
    xy_q: np.ndarray,
    k: int = 8,
    idw: bool = False,
    bw_um: float = 0.0,
) -> np.ndarray:
    """k-nearest-visible-spot interpolation: plain mean of the k nearest rows of ``y_vis``
    (``idw``: weights 1 / distance; ``bw_um`` > 0: weights exp(-d² / 2 bw²)) at each query;
    positions in µm."""
    k = max(1, min(k, len(xy_vis)))
    d, i = cKDTree(xy_vis).query(xy_q, k=k)
    d, i = d.reshape(len(xy_q), k), i.reshape(len(xy_q), k)
    if bw_um > 0:
        w = np.exp(-0.5 * (d / bw_um) ** 2) + 1e-12
    else:
        w = 1.0 / np.maximum(d, 1.0) if idw else np.ones_like(d)
    w = w / w.sum(1, keepdims=True)
    return np.einsum("qk,qkg->qg", w, y_vis[i]).astype(np.float32)


def load_lopo_data(
    her2st_dir: str | Path,
    expression_dir: str | Path | None,
    imaged: list[str] | None = None,
    expression: list[str] | None = None,
    cache_dir: str | Path | None = None,
) -> LopoData:
    """Imaged (``her2st_dir``) + expression-only (``expression_dir``) SpotSets, the panel and
    the 50 benchmark genes, both from the imaged sections read (all five: BENCHMARKS.md's).
    ``imaged`` / ``expression`` restrict the sections (None: all)."""
    if imaged is not None and not imaged:
        raise StgenError("need at least one imaged section (the gene panel is chosen on them)")
    sets, panel, bench = load_spotsets(her2st_dir, imaged, cache_dir=cache_dir)
    if expression_dir is not None and expression != []:
        sets = sets + load_expression_spotsets(expression_dir, panel, expression)
    return LopoData(sets, panel, bench)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    r = spearmanr(a, b).statistic
    return float(r) if np.isfinite(r) else 0.0


def _spot_error(pred: np.ndarray, true: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Per-spot mean absolute error over genes, in units of each gene's SD."""
    return (np.abs(pred - true) / sd).mean(1)


def score_section(
    net,
    s,
    panel: list[str],
    bench: list[str],
    split_seed: int = 0,
    hide_frac: float = 0.5,
    window: dict | None = None,
    adapt_steps: tuple[int, ...] = (),
    tcfg=None,
) -> dict:
    """All methods on one held-out SpotSet ``s`` with a seeded ``hide_frac`` of spots hidden:
    kNN (k = 4, 8; plain mean, and inverse-distance k = 8; and k = 8 of the denoised visible
    profiles), HistoTx transcripts-only; for an imaged section also fused, image-only and
    fused after each of ``adapt_steps``. HistoTx's transcript tokens are the visible profiles
    after ``denoise_measured`` (as the library does); ``*_raw``: the raw profiles. Also the
    Spearman of candidate uncertainties with each spot's absolute error."""
    window = window or {}
    pres = s.gene_present()
    genes = [g for g in bench if pres[panel.index(g)]]
    ib = [panel.index(g) for g in genes]
    hid, vis = split_hidden(len(s.xy_um), hide_frac, split_seed)
    true = s.y[hid][:, ib]
    q_xy, v_xy, yv = s.xy_um[hid], s.xy_um[vis], s.y[vis]
    fdim = net.cfg.img_dim
    feats = s.feats if s.has_image else np.zeros((len(s.xy_um), fdim), np.float32)
    w = dict(exclude_self=True, **window)
    meas = (yv, pres, v_xy)
    preds: dict[str, np.ndarray] = {}
    for k in KNN_K:
        preds[f"knn{k}"] = knn_interpolate(v_xy, yv, q_xy, k)
    preds["knn8_idw"] = knn_interpolate(v_xy, yv, q_xy, 8, idw=True)
    yd = denoise_measured(yv, pres)  # within-section low-rank denoising of the visible half
    preds["knn8_denoised"] = knn_interpolate(v_xy, yd, q_xy, 8)
    # the model's own base without the transformer: its kNN residual on the denoised tokens
    kc = net.cfg
    if kc.knn_k > 0:
        preds["kernel_denoised"] = knn_interpolate(v_xy, yd, q_xy, kc.knn_k, bw_um=kc.knn_bw_um)
    dmeas = (yd, pres, v_xy)
    preds["histotx_transcripts_only_raw"] = predict_sites(
        net, feats[hid], q_xy, feats, s.xy_um, *meas, **w, use_image=False
    )[0]
    preds["histotx_transcripts_only"] = predict_sites(
        net, feats[hid], q_xy, feats, s.xy_um, *dmeas, **w, use_image=False
    )[0]
    if s.has_image:
        preds["histotx_raw"] = predict_sites(net, feats[hid], q_xy, feats, s.xy_um, *meas, **w)[0]
        preds["histotx"] = predict_sites(net, feats[hid], q_xy, feats, s.xy_um, *dmeas, **w)[0]
        preds["histotx_image_only"] = predict_sites(net, feats[hid], q_xy, feats, s.xy_um, **w)[0]
        for n in adapt_steps:
            if n <= 0:
                continue
            y = yv.copy()
            y[:, ~pres] = net.y_mean.numpy()[~pres]
            net_a = adapt_to_measured(net, feats[vis], v_xy, y, steps=n, tcfg=tcfg)
            preds[f"histotx_adapted_{n}"] = predict_sites(
                net_a, feats[hid], q_xy, feats, s.xy_um, *dmeas, **w
            )[0]
    out = {
        "section": s.name,
        "patient": s.patient,
        "has_image": s.has_image,
        "n_spots": int(len(s.xy_um)),
        "n_hidden": int(len(hid)),
        "split_seed": split_seed,
        "n_genes_scored": len(genes),
        "summary": {
            k: round(float(pearson_per_gene(p[:, ib], true).mean()), 4) for k, p in preds.items()
        },
    }
    # uncertainty candidates vs. per-spot absolute error (gene-SD units)

    sd = net.y_std.numpy()
    dist = cKDTree(v_xy).query(q_xy, k=1)[0]
    cands = {
        "distance_to_measured": dist,
        "knn8_spread": measured_spread(v_xy, yv, q_xy, sd, pres),  # the shipped one
    }
    sd = sd[ib]
    out["uncertainty_spearman"] = {
        m: {
            c: round(_spearman(u, _spot_error(preds[m][:, ib], true, sd)), 4)
            for c, u in cands.items()
        }
        for m in ("histotx_transcripts_only", "histotx")
        if m in preds
    }
    return out


def _mean_summary(rows: list[dict]) -> dict:
    keys = sorted({k for r in rows for k in r["summary"]})
    return {
        k: round(float(np.mean([r["summary"][k] for r in rows if k in r["summary"]])), 4)
        for k in keys
    }


class LopoData(NamedTuple):
    """SpotSets of every section, the gene panel and the 50 benchmark genes."""

    sets: list
    panel: list[str]
    bench: list[str]


def lopo_fold(
    data: LopoData,
    patient: str,
    tcfg: TrainConfig | None = None,
    model: HistoTxPredictor | None = None,
    split_seeds: tuple[int, ...] = (0,),
    hide_frac: float = 0.5,
    adapt_steps: tuple[int, ...] = (),
    save_model: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Leave-one-patient-out fold: train HistoTx on every section of the other patients of
    ``data`` (imaged + expression-only; or use ``model``), then ``score_section`` every
    section of ``patient`` for each split seed. Returns the fold JSON."""
    import torch

    sets, panel, bench = data

    test = [s for s in sets if s.patient == patient]
    train = [s for s in sets if s.patient != patient]
    if not test:
        raise StgenError(f"no section of patient {patient!r}; sections: {[s.name for s in sets]}")
    res: dict = {
        "split": "leave-one-patient-out",
        "test_patient": patient,
        "train_patients": sorted({s.patient for s in train}),
        "train_sections": [s.name for s in train],
        "test_sections": [s.name for s in test],
        "hide_fraction": hide_frac,
        "split_seeds": list(split_seeds),
        "genes": bench,
        "metric": "mean Pearson over the 50 benchmark genes on the hidden spots; mean over "
        "split seeds, then sections",
        "knn": "knn4 / knn8: plain mean of the 4 / 8 nearest visible spots; knn8_idw: "
        "inverse-distance weighted",
    }
    t0 = time.time()
    tcfg = tcfg or TrainConfig()
    if model is None:
        net, hist = train_histotx(train, panel, None, tcfg, log=log)
        res["train_seconds"] = round(time.time() - t0, 1)
        res["train_config"] = {k: v for k, v in tcfg.__dict__.items() if k != "extra"}
        window = dict(max_img=tcfg.max_tokens, max_tx=tcfg.max_tokens, radius_um=tcfg.radius_um)
        if save_model is not None:
            data = {"sections": res["train_sections"], "patients": res["train_patients"]}
            _save(
                save_model,
                net,
                histotx_card(net, panel, bench, tcfg, name=Path(save_model).stem, data=data),
            )
    else:
        net = model.model.cpu()
        seen = [str(n) for n in model.card.get("data", {}).get("sections", [])]
        res["model"] = {"path": str(model.path), "sha256": model.checksum}
        res["model_saw_test_patient"] = any(n[:1] == patient for n in seen)
        res["train_sections"] = seen  # what the checkpoint was trained on (its card)
        res["train_patients"] = sorted({n[:1] for n in seen})
        window = dict(max_img=model.max_img, max_tx=model.max_tx, radius_um=model.radius_um)
    torch.set_num_threads(max(1, tcfg.threads))
    rows = []
    t1 = time.time()
    for s in test:
        for seed in split_seeds:
            rows.append(
                score_section(net, s, panel, bench, seed, hide_frac, window, adapt_steps, tcfg)
            )
            log(f"{patient} {s.name} seed {seed}: {rows[-1]['summary']}")
    res["eval_seconds"] = round(time.time() - t1, 1)
    per_sec = {}
    for s in test:
        rs = [r for r in rows if r["section"] == s.name]
        per_sec[s.name] = _mean_summary(rs)
    res["sections"] = rows
    res["per_section"] = per_sec
    secs = [{"summary": v} for v in per_sec.values()]
    res["summary"] = _mean_summary(secs)
    unc = {}
    for m in ("histotx_transcripts_only", "histotx"):
        for c in ("distance_to_measured", "knn8_spread"):
            v = [r["uncertainty_spearman"][m][c] for r in rows if m in r["uncertainty_spearman"]]
            if v:
                unc[f"{m}:{c}"] = round(float(np.mean(v)), 4)
    res["uncertainty_spearman"] = unc
    return res


def lopo_summary(folds: list[dict]) -> dict:
    """Mean over held-out patients of each fold's section-mean figures (a method missing
    from a fold, e.g. fused on an expression-only patient, is averaged over the others)."""
    keys = sorted({k for f in folds for k in f["summary"]})
    out = {}
    for k in keys:
        v = [f["summary"][k] for f in folds if k in f["summary"]]
        out[k] = {"mean": round(float(np.mean(v)), 4), "n_patients": len(v)}
    return {
        "split": "leave-one-patient-out",
        "test_patients": [f["test_patient"] for f in folds],
        "per_patient": {f["test_patient"]: f["summary"] for f in folds},
        "mean": out,
    }
