"""HistoTx benchmark on all five HER2ST folds (leave-one-section-out, half the spots hidden).

    python scripts/eval_histotx.py --data ../shared/data/her2st --genst default \
        --out scratch/histotx/folds.json --plot docs/images/histotx_folds.png

Per fold: train HistoTx on the other four sections (seeded), hide a seeded random half of the
held-out spots, and score on the hidden spots (mean Pearson over the 50 benchmark genes):
HistoTx image+transcripts, HistoTx image-only, GenST (``--genst``; the card says whether it
saw the held-out section), nearest-neighbour and Gaussian-process interpolation of the
visible spots. ``--genst-folds`` adds GenST figures from G's fold JSON (trained without the
held-out section, scored on all its spots). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from napari_stgen.io.atomic import write_text_atomic

METHODS = [
    ("histotx_adapted", "HistoTx image + transcripts, adapted to the visible spots"),
    ("histotx", "HistoTx image + transcripts"),
    ("histotx_transcripts_only", "HistoTx transcripts only"),
    ("histotx_image_only", "HistoTx image only"),
    ("genst", "GenST (--genst)"),
    ("genst_fold", "GenST fold model (all spots)"),
    ("nearest_neighbour", "nearest visible spot"),
    ("gaussian_process", "Gaussian process (kriging)"),
]


def table(res: dict) -> str:
    folds = [f["holdout"] for f in res["folds"]]
    rows = ["| method | " + " | ".join(folds) + " | mean |", "|---" * (len(folds) + 2) + "|"]
    for k, label in METHODS:
        vals = [f["summary"].get(k) for f in res["folds"]]
        if all(v is None for v in vals):
            continue
        v = [np.nan if x is None else x for x in vals]
        cells = ["–" if np.isnan(x) else f"{x:.3f}" for x in v]
        rows.append(f"| {label} | " + " | ".join(cells) + f" | **{np.nanmean(v):.3f}** |")
    return "\n".join(rows)


def bar_plot(groups: list[str], series: list[tuple[str, list[float]]], title: str, path) -> None:
    """Grouped bars (one series per method, ``len(groups)`` values each) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.6), dpi=120)
    w = 0.8 / len(series)
    for i, (lab, vals) in enumerate(series):
        ax.bar(np.arange(len(groups)) + (i - len(series) / 2 + 0.5) * w, vals, w, label=lab)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("mean Pearson, hidden spots (top-50)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


def plot(res: dict, path: Path) -> None:
    folds = [f["holdout"] for f in res["folds"]]
    present = [(k, lab) for k, lab in METHODS if any(k in f["summary"] for f in res["folds"])]
    series = []
    for k, lab in present:
        vals = [f["summary"].get(k, np.nan) for f in res["folds"]]
        series.append((lab, vals + [np.nanmean(vals)]))
    title = "HER2ST leave-one-section-out, half of the held-out spots hidden"
    bar_plot(folds + ["mean"], series, title, path)


def _means(res: dict) -> dict:
    return {
        k: round(float(np.mean([f["summary"][k] for f in res["folds"] if k in f["summary"]])), 4)
        for k, _ in METHODS
        if any(k in f["summary"] for f in res["folds"])
    }


def genst_fold_figures(paths: list[str] | None) -> dict[str, float]:
    """Held-out section → GenST's headline figure from ``eval_genst_folds.py`` JSON files."""
    out: dict[str, float] = {}
    for gpath in paths or []:
        g = json.loads(Path(gpath).read_text())
        for f in g.get("folds", [g] if "holdout" in g else []):
            s = f.get("summary", {})
            if "genst" in s:
                out[f["holdout"]] = s["genst"]
    return out


def merge(a) -> int:
    """Combine per-fold JSON files (one run per fold, e.g. run in parallel) into ``--out``."""
    parts = [json.loads(Path(p).read_text()) for p in a.merge]
    res = dict(parts[0])
    folds = [f for p in parts for f in p.get("folds", [p] if "holdout" in p else [])]
    res["folds"] = sorted(folds, key=lambda f: f["holdout"])
    gfold = genst_fold_figures(a.genst_folds)
    for f in res["folds"]:
        if f["holdout"] in gfold:
            f["summary"]["genst_fold"] = gfold[f["holdout"]]
    res["commands"] = [p.get("command") for p in parts]
    res["mean"] = _means(res)
    out = Path(a.out)
    write_text_atomic(out, json.dumps(res, indent=2) + "\n")
    if a.plot:
        plot(res, Path(a.plot))
    print(table(res))
    return 0


LOPO_METHODS = [
    ("histotx_transcripts_only", "HistoTx transcripts only"),
    ("knn8", "kNN k = 8 (mean)"),
    ("knn4", "kNN k = 4 (mean)"),
    ("knn8_idw", "kNN k = 8 (inverse distance)"),
    ("knn8_denoised", "kNN k = 8 of the denoised measured spots"),
    (
        "kernel_denoised",
        "HistoTx's kNN residual alone (Gaussian k = 16, 300 µm; denoised spots)",
    ),
    ("histotx_transcripts_only_raw", "HistoTx transcripts only, raw (not denoised) tokens"),
    ("histotx", "HistoTx image + transcripts"),
    ("histotx_raw", "HistoTx image + transcripts, raw tokens"),
    ("histotx_image_only", "HistoTx image only"),
]


def lopo_table(res: dict) -> str:
    """Markdown: one column per held-out patient, then the mean over patients."""
    pts = res["summary"]["test_patients"]
    per = res["summary"]["per_patient"]
    keys = [(k, lab) for k, lab in LOPO_METHODS]
    keys += [
        (k, f"HistoTx fused, adapted {k.rsplit('_', 1)[1]} steps")
        for k in sorted(
            {k for v in per.values() for k in v if k.startswith("histotx_adapted_")},
            key=lambda k: int(k.rsplit("_", 1)[1]),
        )
    ]
    rows = ["| method | " + " | ".join(pts) + " | mean |", "|---" * (len(pts) + 2) + "|"]
    for k, lab in keys:
        if k not in res["summary"]["mean"]:
            continue
        cells = [f"{per[p][k]:.3f}" if k in per[p] else "–" for p in pts]
        rows.append(
            f"| {lab} | " + " | ".join(cells) + f" | **{res['summary']['mean'][k]['mean']:.3f}** |"
        )
    return "\n".join(rows)


def lopo_plot(res: dict, path: Path) -> None:
    """Bars per held-out patient: HistoTx transcripts-only vs kNN; fused vs image-only."""
    pts = res["summary"]["test_patients"]
    per = res["summary"]["per_patient"]
    labels = dict(LOPO_METHODS)
    series = [
        (labels[k], [per[p].get(k, np.nan) for p in pts] + [res["summary"]["mean"][k]["mean"]])
        for k, _ in LOPO_METHODS
        if k in res["summary"]["mean"]
    ]
    title = "HER2ST leave-one-patient-out, half of each held-out section's spots hidden"
    bar_plot([f"held out {p}" for p in pts] + ["mean"], series, title, path)


def lopo_merge(a) -> int:
    """Merge LOPO JSON files (one or more held-out patients each) into ``--out``."""
    from napari_stgen.training.evaluate_histotx import lopo_summary

    folds, commands = {}, []
    for p in a.lopo_merge:
        src = json.loads(Path(p).read_text())
        commands.append(src.get("command", ""))
        for f in src["folds"]:
            folds[f["test_patient"]] = f
    res = {"protocol": "leave-one-patient-out (merged)", "sources": a.lopo_merge}
    res["commands"] = [c for c in commands if c]
    res["folds"] = [folds[k] for k in sorted(folds)]
    res["summary"] = lopo_summary(res["folds"])
    out = Path(a.out)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, out)
    if a.plot:
        lopo_plot(res, Path(a.plot))
    if a.update_card:
        update_lopo_card(Path(a.update_card), res)
    print(lopo_table(res))
    return 0


def update_lopo_card(path: Path, res: dict) -> None:
    """Re-save a HistoTx checkpoint (same tensors) with the merged leave-one-patient-out
    figures in its card's ``evaluation`` (what docs/histotx.md's table shows)."""
    from napari_stgen.inference.contract import DEFAULT_ADAPT_STEPS
    from napari_stgen.models.checkpoint import load_checkpoint, save_checkpoint

    tensors, card = load_checkpoint(path, "histotx")
    folds = res["folds"]
    cmds = res.get("commands", [])
    card["evaluation"] = {
        "protocol": "leave-one-patient-out over HER2ST patients A-F: fold models trained with "
        "this recipe on every section (imaged + expression-only) of the other five patients; "
        "on each held-out section a seeded random half of the spots is hidden; mean Pearson "
        "over the 50 benchmark genes on the hidden spots, mean over split seeds, sections, "
        "then patients",
        "benchmark_command": "python scripts/eval_histotx.py --lopo ... then --lopo-merge "
        "... --update-card (docs/histotx.md)",
        "fold_commands": cmds,
        "folds": {
            f["test_patient"]: {
                "test_sections": f.get("test_sections"),
                "train_sections": f.get("train_sections"),
                "split_seeds": f.get("split_seeds"),
            }
            for f in folds
        },
        "mean": {k: v["mean"] for k, v in res["summary"]["mean"].items()},
        "per_patient": res["summary"]["per_patient"],
        "adapt_steps_default": DEFAULT_ADAPT_STEPS,
        "knn": "knn4 / knn8: plain mean of the 4 / 8 nearest visible spots; knn8_idw "
        "inverse-distance; knn8_denoised: knn8 of the within-slide denoised spots; "
        "kernel_denoised: the model's own kNN residual alone (Gaussian-weighted k nearest of "
        "the denoised spots, card architecture knn_k / knn_bw_um), without the transformer",
        "notes": "The shipped model is trained on all 29 sections (every patient); these are "
        "the leave-one-patient-out fold models of the same recipe.",
    }
    save_checkpoint(path, tensors, card)


def lopo(a) -> int:
    """Leave-one-patient-out over A–F (imaged + expression-only sections)."""
    import torch

    from napari_stgen.training.evaluate_histotx import (
        PATIENTS,
        load_lopo_data,
        lopo_fold,
        lopo_summary,
    )
    from napari_stgen.training.histotx import TrainConfig

    torch.set_num_threads(1)
    tcfg = TrainConfig(seed=a.seed, knn_k=a.knn_k, knn_bw_um=a.knn_bw_um, dim=a.dim, depth=a.depth)
    if a.steps:
        tcfg.steps = a.steps
    data = load_lopo_data(a.data, a.expression_data)
    out = Path(a.out)
    res = {
        "protocol": "leave-one-patient-out over patients A-F; train on every section "
        "(imaged + expression-only) of the other patients; hidden = seeded random half of "
        "each held-out section's spots",
        "command": "python scripts/eval_histotx.py " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPU cores, torch threads 1, no GPU",
        "folds": [],
    }
    for p in a.patients or PATIENTS:
        save = Path(a.save_models) / f"histotx_no{p}.safetensors" if a.save_models else None
        model = None
        if a.models_dir:  # evaluate saved fold models instead of training
            from napari_stgen.inference.histotx import load_histotx

            model = load_histotx(Path(a.models_dir) / f"histotx_no{p}.safetensors", device="cpu")
            save = None
        if save:
            save.parent.mkdir(parents=True, exist_ok=True)
        r = lopo_fold(
            data,
            p,
            tcfg,
            model=model,
            split_seeds=tuple(a.split_seeds),
            hide_frac=a.hide,
            adapt_steps=tuple(a.lopo_adapt),
            save_model=save,
            log=lambda s, p=p: print(f"[{p}] {s}", file=sys.stderr, flush=True),
        )
        print(f"[{p}] {json.dumps(r['summary'])}", file=sys.stderr, flush=True)
        res["folds"].append(r)
        res["summary"] = lopo_summary(res["folds"])
        write_text_atomic(out, json.dumps(res, indent=2) + "\n")
    if a.plot:
        lopo_plot(res, Path(a.plot))
    print(lopo_table(res))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/her2st")
    )
    ap.add_argument("--folds", nargs="*", default=None, help="sections (default: all)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hide", type=float, default=0.5)
    ap.add_argument("--adapt-steps", type=int, default=200)
    ap.add_argument("--genst", default=None, help="GenST checkpoint to compare (e.g. default)")
    ap.add_argument(
        "--genst-folds", nargs="*", default=None, help="GenST fold JSON file(s) (eval_genst_folds)"
    )
    ap.add_argument("--save-models", default=None, help="directory for the fold checkpoints")
    ap.add_argument("--out", default="scratch/histotx/folds.json")
    ap.add_argument("--plot", default=None, help="bar plot PNG")
    ap.add_argument(
        "--merge", nargs="*", default=None, help="only merge these per-fold JSON outputs"
    )
    ap.add_argument("--lopo", action="store_true", help="leave-one-patient-out over A-F")
    ap.add_argument("--expression-data", default=None, help="expression-only sections (--lopo)")
    ap.add_argument("--patients", nargs="*", default=None, help="held-out patients (--lopo)")
    ap.add_argument("--split-seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--lopo-adapt", nargs="*", type=int, default=[], help="adaptation steps")
    ap.add_argument("--models-dir", default=None, help="saved fold models (--lopo)")
    ap.add_argument("--knn-k", type=int, default=16, help="kNN residual (0: off)")
    ap.add_argument(
        "--knn-bw-um", type=float, default=300.0, help="its Gaussian bandwidth (0: plain)"
    )
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--lopo-merge", nargs="*", default=None, help="merge LOPO JSON files")
    ap.add_argument("--update-card", default=None, help="with --lopo-merge: this checkpoint")
    a = ap.parse_args(argv)
    if a.merge:
        return merge(a)
    if a.lopo_merge:
        return lopo_merge(a)
    if a.lopo:
        return lopo(a)

    import torch

    from napari_stgen.io.her2st import list_sections
    from napari_stgen.training.evaluate_histotx import Comparators, HiddenSplit, run_histotx_fold
    from napari_stgen.training.histotx import TrainConfig

    torch.set_num_threads(1)
    folds = a.folds or list_sections(a.data)
    tcfg = TrainConfig(seed=a.seed)
    if a.steps:
        tcfg.steps = a.steps
    gfold = genst_fold_figures(a.genst_folds)
    out = Path(a.out)
    res = {
        "protocol": "leave-one-section-out; hidden = seeded random half of the held-out spots; "
        "mean Pearson over the 50 benchmark genes (log1p CP10k) on the hidden spots",
        "command": "python scripts/eval_histotx.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{os.cpu_count()} CPU cores, torch threads 1, no GPU",
        "folds": [],
    }
    t0 = time.time()
    for h in folds:
        save = Path(a.save_models) / f"histotx_no{h}.safetensors" if a.save_models else None
        r = run_histotx_fold(
            a.data,
            h,
            tcfg,
            split=HiddenSplit(a.hide),
            compare=Comparators(genst_model=a.genst),
            save_model=save,
            adapt_steps=a.adapt_steps,
            log=lambda s, h=h: print(f"[{h}] {s}", file=sys.stderr, flush=True),
        )
        if h in gfold:
            r["summary"]["genst_fold"] = gfold[h]
        print(f"[{h}] {json.dumps(r['summary'])}", file=sys.stderr, flush=True)
        res["folds"].append(r)
        write_text_atomic(out, json.dumps(res, indent=2) + "\n")
    res["seconds"] = round(time.time() - t0, 1)
    res["mean"] = _means(res)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, out)
    if a.plot:
        plot(res, Path(a.plot))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
