"""Run the GenST benchmark on all five HER2ST folds (leave-one-section-out) with baselines.

    python scripts/eval_genst_folds.py --data ../shared/data/her2st --out docs/genst_folds.json

Writes the JSON (per fold: GenST soft/quantized, with/without TTA and spatial smoothing, the
three baselines) and a bar plot ``docs/images/genst_folds.png``; ``--maps SECTION`` also draws
predicted vs measured maps for a few genes of that held-out section
(``docs/images/genst_maps_<SECTION>.png``). Each fold trains from scratch with the default
recipe (seeded), on one CPU thread unless ``--threads`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np


def plot_folds(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folds = [f["holdout"] for f in res["folds"]]
    methods = [
        ("train_mean", "training mean"),
        ("ridge", "ridge (colour/texture)"),
        ("cnn", "supervised CNN"),
        ("genst", "GenST"),
        ("genst_smoothed", "GenST + spatial smoothing"),
    ]
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=120)
    w = 0.8 / len(methods)
    for i, (k, label) in enumerate(methods):
        vals = [f["summary"].get(k, np.nan) for f in res["folds"]]
        vals.append(np.nanmean(vals))
        ax.bar(np.arange(len(folds) + 1) + (i - len(methods) / 2 + 0.5) * w, vals, w, label=label)
    ax.set_xticks(np.arange(len(folds) + 1), folds + ["mean"])
    ax.axhline(0.30, color="k", lw=0.8, ls="--")
    ax.set_ylabel("mean Pearson (top-50 genes)")
    ax.set_title("HER2ST leave-one-section-out")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


def plot_maps(data: Path, holdout: str, genes: list[str], path: Path, threads: int) -> None:
    """Train without ``holdout``, then draw measured vs predicted maps of ``genes``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_stgen.training.data import load_dataset
    from napari_stgen.training.genst import TrainConfig, predict_patches, train_genst
    from napari_stgen.training.metrics import pearson_per_gene

    secs, panel, bench = load_dataset(data)
    te = next(s for s in secs if s.name == holdout)
    tr = [s for s in secs if s.name != holdout]
    model, _ = train_genst(tr, panel, None, TrainConfig(threads=threads), progress=True)
    pred, _ = predict_patches(model, te.patches, tta=4)
    fig, axes = plt.subplots(2, len(genes), figsize=(2.6 * len(genes), 5.2), dpi=110)
    xy = te.xy_px
    for j, g in enumerate(genes):
        k = panel.index(g)
        r = pearson_per_gene(pred[:, [k]], te.y[:, [k]])[0]
        for i, (vals, lab) in enumerate(((te.y[:, k], "measured"), (pred[:, k], "predicted"))):
            ax = axes[i, j]
            ax.scatter(xy[:, 0], xy[:, 1], c=vals, s=14, cmap="magma")
            ax.set_aspect("equal")
            ax.invert_yaxis()
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{g} {lab}" + (f" r={r:.2f}" if i else ""), fontsize=8)
    fig.suptitle(f"GenST on held-out section {holdout} (trained on the other four)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).parents[2] / "shared/data/her2st")
    ap.add_argument("--out", type=Path, default=Path("docs/genst_folds.json"))
    ap.add_argument("--plot", type=Path, default=Path("docs/images/genst_folds.png"))
    ap.add_argument("--folds", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--cnn-epochs", type=int, default=30)
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--merge", nargs="*", default=None, help="combine per-fold JSON files")
    ap.add_argument("--maps", default=None, help="held-out section for the map figure")
    ap.add_argument("--map-genes", nargs="*", default=["ERBB2", "IGKC", "COL1A1", "MUCL1"])
    args = ap.parse_args(argv)

    import torch

    from napari_stgen.io.her2st import list_sections
    from napari_stgen.training.evaluate_genst import run_fold
    from napari_stgen.training.genst import TrainConfig

    torch.set_num_threads(args.threads)
    if args.maps:
        plot_maps(
            args.data,
            args.maps,
            args.map_genes,
            Path(f"docs/images/genst_maps_{args.maps}.png"),
            args.threads,
        )
        return 0
    results = []
    if args.merge:
        for f in args.merge:
            d = json.loads(Path(f).read_text())
            results.extend(d["folds"] if "folds" in d else [d])
        results.sort(key=lambda r: r["holdout"])
    else:
        tcfg = TrainConfig(threads=args.threads)
        if args.epochs:
            tcfg.epochs = args.epochs
        for h in args.folds or list_sections(args.data):
            r = run_fold(
                args.data,
                h,
                tcfg=tcfg,
                baselines=not args.no_baselines,
                cnn_epochs=args.cnn_epochs,
                progress=True,
            )
            results.append(r)
            print(json.dumps({"holdout": h, **r["summary"]}), file=sys.stderr, flush=True)
    keys = sorted({k for r in results for k in r["summary"]})
    mean = {k: round(float(np.mean([r["summary"][k] for r in results])), 4) for k in keys}
    res = {
        "protocol": "BENCHMARKS.md GenST: leave-one-section-out, top-50 genes, mean Pearson",
        "machine": f"{os.cpu_count()} CPU cores, torch threads={args.threads}, no GPU",
        "folds": results,
        "mean": mean,
        "per_fold": {r["holdout"]: r["summary"] for r in results},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".partial")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, args.out)
    plot_folds(res, args.plot)
    print(json.dumps({"mean": mean, "per_fold": res["per_fold"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
