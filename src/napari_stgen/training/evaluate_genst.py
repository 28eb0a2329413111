"""Leave-one-section-out evaluation of GenST and its baselines (BENCHMARKS.md protocol).

Genes: the 50 benchmark genes (highest log1p CP10k variance over all spots of all sections,
present in every section). Metric: per-gene Pearson on the held-out section, averaged.
GenST is reported decoded from the continuous aligned latent ("soft") and from its nearest
gene code ("quantized"), with and without test-time spatial smoothing over neighbouring spots
(which uses only the held-out section's images, not its expression). With a spatial context
head the headline uses it (each spot's window: its own and its neighbouring spots' image
tokens, never their expression); ``genst_tile`` is the same model tile by tile.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from napari_stgen.errors import StgenError
from napari_stgen.inference.predictor import load_genst
from napari_stgen.inference.stain import normalise, stain_stats
from napari_stgen.io.her2st import smooth_over_neighbours
from napari_stgen.training.baselines import cnn_baseline, mean_baseline, ridge_baseline
from napari_stgen.training.data import SectionData, load_dataset, split_holdout
from napari_stgen.training.genst import TrainConfig, train_genst
from napari_stgen.training.genst_context import context_latent, section_tokens
from napari_stgen.training.metrics import pearson_per_gene


def _score(pred: np.ndarray, te: SectionData, idx: list[int]) -> dict:
    r = pearson_per_gene(pred[:, idx], te.y[:, idx])
    return {"mean_pearson": round(float(r.mean()), 4), "per_gene": [round(float(v), 4) for v in r]}


def evaluate_predictions(
    pred: np.ndarray, te: SectionData, idx: list[int], smooth: bool = True
) -> dict:
    """Scores of a prediction (panel columns) without and with neighbour smoothing."""
    out = {"raw": _score(pred, te, idx)}
    if smooth:
        out["smoothed"] = _score(smooth_over_neighbours(pred, te.neighbours(), 0.5), te, idx)
    return out


def split_kind(holdout: str, train_sections: list[str]) -> dict:
    """Which patients a fold trains and tests on (HER2ST: patient = first letter of the
    section) and whether the held-out section is a new patient (``out-of-patient``)."""
    train_patients = sorted({s[:1] for s in train_sections})
    new = holdout[:1] not in train_patients
    return {
        "split": "out-of-patient" if new else "within-patient",
        "test_patient": holdout[:1],
        "train_patients": train_patients,
    }


def run_genst_fold(
    data_dir: str | Path,
    holdout: str,
    model: str | Path | None = None,
    tcfg=None,
    baselines: bool = True,
    cnn_epochs: int = 30,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    log=print,
    stain_norm: str | None = None,
) -> dict:
    """Train (or load) GenST without ``holdout``, score it and the baselines on ``holdout``.

    ``stain_norm`` ("reinhard" or "hed", inference/stain.py) normalises the held-out patches
    to the training sections' stain statistics before anything scores them.
    Returns a JSON-ready dict with mean Pearson over the 50 benchmark genes per method.
    """
    import torch

    sections, panel, bench = load_dataset(data_dir, cache_dir=cache_dir)
    te, tr = split_holdout(sections, holdout, data_dir)
    if stain_norm:
        ref = stain_stats(np.concatenate([s.patches for s in tr], 0), stain_norm)
        te = dataclasses.replace(
            te, patches=normalise(te.patches, stain_stats(te.patches, stain_norm), ref)
        )
    res: dict = {
        "holdout": holdout,
        "stain_norm": stain_norm,
        "train_sections": [s.name for s in tr],
        **split_kind(holdout, [s.name for s in tr]),
        "n_test_spots": int(len(te.y)),
        "genes": bench,
        "metric": "mean Pearson over the 50 benchmark genes (held-out section)",
    }
    t0 = time.time()
    if model is None:
        tcfg = tcfg or TrainConfig()
        net, hist = train_genst(
            tr, panel, None, tcfg, progress=progress, log=log, exclude_patients={holdout[:1]}
        )
        res["genst_train_seconds"] = round(time.time() - t0, 1)
        res["train_config"] = dict(tcfg.__dict__)
        mpanel = panel
        res["image_codes"] = hist["image_codes"]
    else:
        pred = load_genst(model, device="cpu")
        net, mpanel = pred.model, pred.genes
        res["model"] = {"name": pred.name, "path": str(pred.path), "sha256": pred.checksum}
        res["train_config"] = dict(pred.card.get("train") or {})
        res["trained_on_cpu"] = {
            k: v
            for k, v in (pred.card.get("training") or {}).items()
            if k in ("cpu", "torch_cpu_capability", "mkl_cbwr")
        }
        trained_on = pred.card.get("data", {}).get("sections", [])
        res["model_saw_holdout"] = holdout in trained_on
        if pred.patch_px != te.patches.shape[1]:
            raise StgenError(f"{pred.path}: patch size {pred.patch_px} differs from the cache")
    missing = [g for g in bench if g not in mpanel]
    if missing:
        raise StgenError(f"model panel lacks benchmark genes {missing[:5]}")
    idx_model = [mpanel.index(g) for g in bench]
    idx_panel = [panel.index(g) for g in bench]
    # te.y is in `panel` order; bring model predictions into panel order for the 50 genes.
    # One encoder pass: the tokens of the 4 rotations give TTA 1 (rotation 0), TTA 4 (mean)
    # and, with a context head, the windows.

    t0 = time.time()
    feat, zhat = section_tokens(net, te.patches, 4)
    latents = {"tta1": zhat[0], "tta4": zhat.mean(0)}
    if net.context is not None:
        latents["context"] = context_latent(net, feat, zhat, te.xy_px * te.mpp)
    res["tokens_seconds"] = round(time.time() - t0, 1)
    genst: dict = {}
    for mode in ("soft", "quantized", "expected"):
        for key, z in latents.items():
            with torch.inference_mode():
                e, codes = net.decode_latent(torch.from_numpy(np.asarray(z, np.float32)), mode)
                e, codes = net.unstandardize(e.float()).numpy(), codes.numpy()
            full = np.zeros((len(e), len(panel)), np.float32)
            full[:, idx_panel] = e[:, idx_model]
            genst[f"{mode}_{key}"] = evaluate_predictions(full, te, idx_panel)
            headline = "context" if net.context is not None else "tta4"
            if mode == net.cfg.decode and key == headline:
                res["spot_predictions"] = {
                    "decode": mode,
                    "context": key == "context",
                    "barcodes": list(te.barcodes),
                    "xy_px": np.round(te.xy_px, 1).tolist(),
                    "genes": bench,
                    "measured": np.round(te.y[:, idx_panel], 4).tolist(),
                    "predicted": np.round(full[:, idx_panel], 4).tolist(),
                    "gene_code": codes.tolist(),
                }
            if mode == "soft" and key == "tta4":
                counts = np.bincount(codes, minlength=net.cfg.gene_codes)
                p = counts / counts.sum()
                ent = -(p[p > 0] * np.log(p[p > 0])).sum()
                res["test_gene_codes"] = {
                    "codes_used": int((counts > 0).sum()),
                    "perplexity": round(float(np.exp(ent)), 2),
                }
    res["genst"] = genst
    ctx = "context" if net.context is not None else "tta4"
    head = genst[f"{net.cfg.decode}_{ctx}"]
    res["decode"] = net.cfg.decode
    res["spatial_context"] = net.context is not None
    res["summary"] = {
        "genst_tile": genst[f"{net.cfg.decode}_tta4"]["raw"]["mean_pearson"],
        "genst_tile_smoothed": genst[f"{net.cfg.decode}_tta4"]["smoothed"]["mean_pearson"],
        "genst": head["raw"]["mean_pearson"],
        "genst_smoothed": head["smoothed"]["mean_pearson"],
    }
    for mode in ("quantized", "soft", "expected"):
        g = genst[f"{mode}_{ctx}"]
        res["summary"][f"genst_{mode}"] = g["raw"]["mean_pearson"]
        res["summary"][f"genst_{mode}_smoothed"] = g["smoothed"]["mean_pearson"]
    if baselines:
        torch.manual_seed(0)
        t1 = time.time()
        res["baselines"] = {
            "train_mean": evaluate_predictions(mean_baseline(tr, len(te.y)), te, idx_panel),
            "ridge": evaluate_predictions(ridge_baseline(tr, te.patches), te, idx_panel),
        }
        t2 = time.time()
        cnn = cnn_baseline(tr, te.patches, epochs=cnn_epochs, progress=progress)
        res["baselines"]["cnn"] = evaluate_predictions(cnn, te, idx_panel)
        res["baseline_seconds"] = {"ridge": round(t2 - t1, 1), "cnn": round(time.time() - t2, 1)}
        for k, v in res["baselines"].items():
            res["summary"][k] = v["raw"]["mean_pearson"]
            res["summary"][k + "_smoothed"] = v["smoothed"]["mean_pearson"]
    return res
