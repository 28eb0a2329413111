"""Handler of ``stgen demo`` (what it does and its arguments: ``cli/demo.py``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from napari_stgen.errors import StgenError
from napari_stgen.inference.batch import predict_slide
from napari_stgen.inference.patches import read_patches
from napari_stgen.inference.predictor import load_genst
from napari_stgen.inference.synthesis import gene_vector, load_stmdit, save_tile_png, synthesize
from napari_stgen.io.anndata import h5ad_mpp
from napari_stgen.io.sample import read_spots, sample_slide_path, sample_spots_path
from napari_stgen.io.slide import open_slide
from napari_stgen.models.checkpoint import resolve_checkpoint

SAMPLE_SECTION = "C3"  # the bundled sample is HER2ST section C3


def _pearson(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def run(args: argparse.Namespace) -> int:
    from anndata import read_h5ad

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slide_path, spots_path = sample_slide_path(), sample_spots_path()
    pred = load_genst("default")
    if args.gene not in pred.genes:
        raise StgenError(f"gene {args.gene!r} is not in the default model's panel")
    print(
        f"model: {pred.name} ({len(pred.genes)} genes, {pred.mpp} µm/px, device {pred.device})",
        file=sys.stderr,
    )
    spots_h5 = predict_slide(
        slide_path,
        out / "sample_spots.h5ad",
        spots=spots_path,
        overwrite=args.overwrite,
        predictor=pred,
    )
    ad = read_h5ad(spots_h5)
    grid_h5 = predict_slide(
        slide_path,
        out / "sample_grid.h5ad",
        grid=True,
        overwrite=args.overwrite,
        predictor=pred,
        region_um=_tissue_box_um(ad),
    )
    measured = read_spots(spots_path).set_index("barcode").loc[ad.obs_names]
    counts_genes = [g for g in measured.columns if g not in ("x", "y") and g in pred.genes]
    # measured counts are raw; compare with the model's normalization (log1p CP10k of the panel
    # columns present in the CSV is not the whole library, so use the CSV's total column if any)
    total = measured["total_counts"] if "total_counts" in measured.columns else None
    r = {}
    for g in counts_genes:
        m = measured[g].to_numpy(float)
        m = np.log1p(m / total.to_numpy(float) * 1e4) if total is not None else np.log1p(m)
        r[g] = _pearson(ad[:, g].X.ravel(), m)
    summary = {
        "slide": str(slide_path),
        "spots_h5ad": str(spots_h5),
        "grid_h5ad": str(grid_h5),
        "n_spots": int(ad.n_obs),
        **_role(pred.card, SAMPLE_SECTION),
        "pearson_vs_measured": {
            "mean": float(np.nanmean(list(r.values()))) if r else None,
            "n_genes": len(r),
            args.gene: r.get(args.gene),
            "note": "in-sample when the sample is a training section (see sample_role)",
        },
        "held_out_pearson_from_card": _held_out(pred.card, SAMPLE_SECTION),
    }
    fig_path = out / f"sample_{args.gene}.png"
    summary["figure"] = str(_figure(ad, measured, total, args.gene, fig_path))
    if not args.no_synthesis:
        summary["synthesis"] = _synthesize(ad, slide_path, args.gene, out)
    text = json.dumps(summary, indent=2)
    (out / "summary.json").write_text(text)
    print(text)
    return 0


def _tissue_box_um(ad) -> list[float]:
    """World (x0, y0, x1, y1) µm around the measured spots (the tissue section), one spot
    pitch of margin: the grid is predicted on the tissue, not on background smudges."""
    mpp = h5ad_mpp(ad)[0]
    xy = np.asarray(ad.obsm["spatial"], dtype=np.float64)[:, :2] * mpp
    d = np.sort(np.linalg.norm(xy[:, None] - xy[None, :50], axis=-1), axis=0)[1]
    m = float(np.median(d))
    (x0, y0), (x1, y1) = xy.min(0) - m, xy.max(0) + m
    return [float(x0), float(y0), float(x1), float(y1)]


def _role(card: dict, section: str) -> dict:
    """The sample's role for the model: a training section or held out."""
    trained = [str(s) for s in (card.get("data", {}) or {}).get("sections", [])]
    if section in trained:
        return {
            "sample_section": section,
            "sample_role": "training section of the default model",
            "model_training_sections": trained,
        }
    return {"sample_section": section, "sample_role": "not seen in training"}


def _held_out(card: dict, section: str) -> dict | None:
    """The card's held-out Pearson: first a new patient (the out-of-patient fold), then this
    section held out and the within-patient and all-fold means."""
    ev = card.get("evaluation") or {}
    per = ev.get("per_fold") or {}
    mean = ev.get("mean") or {}
    if not per:
        return None
    out: dict = {"protocol": ev.get("protocol", "leave-one-section-out")}
    oop = ev.get("out_of_patient") or {}
    if oop:
        out["new_patient"] = {
            "folds": oop.get("folds"),  # held-out section → the sections its fold trained on
            "pearson": (oop.get("mean") or {}).get("genst"),
        }
    wp = ev.get("within_patient") or {}
    if wp:
        out["within_patient_mean"] = (wp.get("mean") or {}).get("genst")
    out[f"{section}_held_out"] = (per.get(section) or {}).get("genst")
    out["mean_over_folds"] = mean.get("genst")
    out["folds"] = sorted(per)
    return out


def _figure(ad, measured, total, gene: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lib = next(iter(ad.uns["spatial"]))
    img = ad.uns["spatial"][lib]["images"]["lowres"]
    sf = ad.uns["spatial"][lib]["scalefactors"]["tissue_lowres_scalef"]
    xy = np.asarray(ad.obsm["spatial"]) * sf
    m = measured[gene].to_numpy(float)
    m = np.log1p(m / total.to_numpy(float) * 1e4) if total is not None else np.log1p(m)
    p = np.asarray(ad[:, gene].X).ravel()
    # one colour scale for both panels (1st–99th percentile of measured and predicted pooled)
    vmin, vmax = (float(v) for v in np.nanpercentile(np.concatenate([m, p]), [1, 99]))
    unit = "log1p CP10k" if total is not None else "log1p counts"
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4), dpi=100)
    for ax, v, title in (
        (axes[0], m, f"{gene} measured ({unit})\nrange {np.nanmin(m):.2f}–{np.nanmax(m):.2f}"),
        (axes[1], p, f"{gene} predicted by GenST (log1p CP10k)\n"
                     f"range {np.nanmin(p):.2f}–{np.nanmax(p):.2f}"),
    ):  # fmt: skip
        ax.imshow(img)
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=v, s=18, cmap="magma", alpha=0.85,
                        vmin=vmin, vmax=vmax)  # fmt: skip
        fig.colorbar(sc, ax=ax, shrink=0.7)
        ax.set_title(title)
        ax.axis("off")
    note = "one colour scale for both panels"
    if total is None:
        note += "; the sample has no library sizes, so measured is log1p of raw counts"
    fig.text(0.5, 0.02, note, ha="center", fontsize=9, color="dimgray")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def _synthesize(ad, slide_path: Path, gene: str, out: Path) -> dict | str:
    try:
        resolve_checkpoint("default", "stmdit")
    except Exception as e:  # noqa: BLE001 - generation is optional in the demo
        return f"skipped: {e}"

    model = load_stmdit("default")
    i = int(np.argmax(ad[:, gene].X.ravel()))
    xy = np.asarray(ad.obsm["spatial"][i : i + 1], dtype=np.float64)
    with open_slide(slide_path) as slide:
        ctx_px = 3 * model.tile_px
        ctx = read_patches(slide, xy, ctx_px * model.mpp, ctx_px)
        real = read_patches(slide, xy, model.tile_px * model.mpp, model.tile_px)
    base = ad[i].X.ravel()
    genes = list(ad.var_names)
    prof = {g: float(v) for g, v in zip(genes, base, strict=True) if g in model.genes}
    v0 = gene_vector(model, overrides=prof)
    hi = gene_vector(model, overrides={**prof, gene: float(prof.get(gene, 0)) + 2.0})
    tiles = synthesize(model, np.stack([v0, hi]), np.repeat(ctx, 2, 0), seed=0, focus=[gene])
    paths = {}
    for name, t in (("real", real[0]), ("generated", tiles[0]), (f"generated_{gene}_up", tiles[1])):
        paths[name] = str(save_tile_png(out / f"tile_{name}.png", t, model.mpp))
    return {"spot": str(ad.obs_names[i]), "tiles": paths}
