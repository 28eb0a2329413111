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
        ("cnn_smoothed", "CNN + spatial smoothing"),
        ("genst_tile", "GenST, tile alone"),
        ("genst", "GenST + spatial context head"),
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
    top = np.nanmax([f["summary"].get(k, np.nan) for f in res["folds"] for k, _ in methods])
    ax.set_ylim(0, top * 1.35)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


def plot_maps(fold: dict, genes: list[str], path: Path) -> None:
    """Measured vs predicted maps of ``genes`` on a fold's held-out section (from the fold's
    saved spot predictions: the model never saw this section)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_stgen.training.metrics import pearson_per_gene

    sp = fold["spot_predictions"]
    xy = np.asarray(sp["xy_px"])
    meas, pred = np.asarray(sp["measured"]), np.asarray(sp["predicted"])
    genes = [g for g in genes if g in sp["genes"]]
    fig, axes = plt.subplots(2, len(genes), figsize=(2.6 * len(genes), 5.4), dpi=110)
    for j, g in enumerate(genes):
        k = sp["genes"].index(g)
        r = pearson_per_gene(pred[:, [k]], meas[:, [k]])[0]
        for i, (vals, lab) in enumerate(((meas[:, k], "measured"), (pred[:, k], "predicted"))):
            ax = axes[i, j]
            lo, hi = np.percentile(vals, [2, 98])  # robust limits: one empty spot is not a scale
            ax.scatter(xy[:, 0], xy[:, 1], c=vals, s=12, cmap="magma", vmin=lo, vmax=hi)
            ax.set_aspect("equal")
            ax.invert_yaxis()
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{g} {lab}" + (f" (r={r:.2f})" if i else ""), fontsize=8)
    fig.suptitle(
        f"GenST, held-out section {fold['holdout']} (trained on the other four); log1p CP10k",
        fontsize=9,
    )
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


def split_summary(results: list[dict]) -> dict:
    """The headline split first: the out-of-patient folds (held-out section of a patient the
    fold never trained on) and the mean of the within-patient folds, each with its sections."""
    from napari_stgen.training.evaluate_genst import split_kind

    groups: dict[str, list[dict]] = {"out-of-patient": [], "within-patient": []}
    for r in results:
        groups[split_kind(r["holdout"], r["train_sections"])["split"]].append(r)
    out = {}
    for name, rs in groups.items():
        if not rs:
            continue
        keys = sorted({k for r in rs for k in r["summary"]})
        out[name.replace("-", "_")] = {
            "folds": {r["holdout"]: r["train_sections"] for r in rs},
            "mean": {k: round(float(np.mean([r["summary"][k] for r in rs])), 4) for k in keys},
        }
    return out


def seed_spread(primary: list[dict], replicates: list[dict], keys=("genst", "genst_tile")) -> dict:
    """Per held-out section with replicate runs (the same recipe, other seeds): each seed's
    figures, their mean and SD. The primary (card) fold is one of them."""
    out: dict = {}
    for r in primary:
        reps = [x for x in replicates if x["holdout"] == r["holdout"]]
        if not reps:
            continue
        runs = [r, *reps]
        entry: dict = {"seeds": [x.get("train_config", {}).get("seed") for x in runs]}
        for k in keys:
            v = [x["summary"][k] for x in runs if k in x["summary"]]
            entry[k] = v
            entry[f"{k}_mean"] = round(float(np.mean(v)), 4)
            entry[f"{k}_sd"] = round(float(np.std(v, ddof=1)), 4) if len(v) > 1 else None
        out[r["holdout"]] = entry
    return out


def update_card(path: Path, res: dict) -> None:
    """Re-save a checkpoint (same tensors) with the fold figures in its model card."""
    from napari_stgen.models.checkpoint import load_checkpoint, save_checkpoint

    tensors, card = load_checkpoint(path, "genst")
    card["evaluation"] = {
        "protocol": res["protocol"],
        "machine": res["machine"],
        "command": res.get(
            "command",
            "python scripts/eval_genst_folds.py (per fold: stgen evaluate genst "
            "--data ../shared/data/her2st --holdout SECTION)",
        ),
        "headline": "genst = soft decoding (card architecture.decode) of the spatial context "
        "head's latent (each spot's window of neighbouring spots' image tokens; 4-rotation "
        "TTA); genst_tile = the same model tile by tile; _smoothed = test-time smoothing over "
        "neighbouring spots; genst_quantized/_expected = other decodings",
        "out_of_patient": res.get("out_of_patient"),
        "within_patient": res.get("within_patient"),
        "mean": res["mean"],
        "per_fold": res["per_fold"],
    }
    if res.get("seed_spread"):
        card["evaluation"]["seed_spread"] = res["seed_spread"]
    if res.get("trained_on_cpu"):
        card["evaluation"]["fold_models_cpu"] = res["trained_on_cpu"]
    save_checkpoint(path, tensors, card)


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
    ap.add_argument("--command", default=None, help="how the merged fold files were made")
    ap.add_argument(
        "--replicates",
        nargs="*",
        default=[],
        help="fold files of the same recipe with other seeds (reported as seed_spread)",
    )
    ap.add_argument(
        "--update-card", type=Path, default=None, help="write the fold figures into this card"
    )
    ap.add_argument("--maps", nargs="*", default=["C3"], help="held-out sections to map")
    ap.add_argument("--map-genes", nargs="*", default=["ERBB2", "IGKC", "COL1A1", "MUCL1"])
    args = ap.parse_args(argv)

    import torch

    from napari_stgen.inference.device import cpu_kernel_info
    from napari_stgen.io.her2st import list_sections
    from napari_stgen.training.evaluate_genst import run_genst_fold
    from napari_stgen.training.genst import TrainConfig

    torch.set_num_threads(args.threads)
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
            r = run_genst_fold(
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
    cpu = cpu_kernel_info()
    res = {
        "protocol": "BENCHMARKS.md GenST: leave-one-section-out, top-50 genes, mean Pearson",
        "machine": f"{os.cpu_count()} CPU cores, torch threads={args.threads}, no GPU; "
        f"{cpu['cpu']}, torch kernels {cpu['torch_cpu_capability']} (the machine this ran on)",
        **split_summary(results),
        "folds": results,
        "mean": mean,
        "per_fold": {r["holdout"]: r["summary"] for r in results},
    }
    if args.command:
        res["command"] = args.command
    reps = [json.loads(Path(f).read_text()) for f in args.replicates]
    if reps:
        res["seed_spread"] = seed_spread(results, reps)
    cpus = {json.dumps(r.get("trained_on_cpu", {}), sort_keys=True) for r in results}
    if len(cpus) == 1 and cpus != {"{}"}:
        res["trained_on_cpu"] = json.loads(cpus.pop())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".partial")
    # per-spot predictions stay in the per-fold files (they feed --maps), not in the summary
    slim = {
        **res,
        "folds": [{k: v for k, v in r.items() if k != "spot_predictions"} for r in results],
    }
    tmp.write_text(json.dumps(slim, indent=2) + "\n")
    os.replace(tmp, args.out)
    plot_folds(res, args.plot)
    if args.update_card:
        update_card(args.update_card, res)
    for r in results:
        if r["holdout"] in (args.maps or []) and "spot_predictions" in r:
            out = args.plot.with_name(f"genst_maps_{r['holdout']}.png")
            plot_maps(r, args.map_genes, out)
    print(json.dumps({"mean": mean, "per_fold": res["per_fold"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
