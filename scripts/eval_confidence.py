"""Calibration of GenST's per-tile uncertainty candidates on held-out sections.

For each (fold model, held-out section): the section's spots are predicted as in the benchmark
(4-rotation tokens, the context head's window of neighbouring spots' images), every candidate
of ``inference/confidence.py`` is computed, and its Spearman correlation with the spot's actual
absolute error (mean over the 50 benchmark genes of |predicted − measured| log1p CP10k) is
reported, with a reliability table (error by uncertainty quintile).

    python scripts/eval_confidence.py --data ../shared/data/her2st \
        --fold B4=scratch/g16/fold_B4_hedgene.safetensors --out docs/genst_confidence.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from napari_stgen.inference.confidence import candidates, code_entropy, fit_confidence
from napari_stgen.inference.predictor import load_genst
from napari_stgen.io.atomic import write_text_atomic
from napari_stgen.training.data import load_dataset, split_holdout
from napari_stgen.training.genst_context import context_latent, section_tokens


def fold_calibration(data: Path, holdout: str, model_path: str, bins: int = 5) -> dict:
    """Candidates' Spearman with the absolute error on ``holdout`` for one fold model."""
    sections, panel, bench = load_dataset(data)
    te, tr = split_holdout(sections, holdout, data)
    pred = load_genst(model_path, device="cpu")
    net = pred.model
    trained_on = pred.card.get("data", {}).get("sections", [])
    if holdout in trained_on:
        raise SystemExit(f"{model_path} was trained on {holdout}: not a held-out figure")
    feat, zhat = section_tokens(net, te.patches, 4)
    z = zhat.mean(0)
    if net.context is not None:
        z = context_latent(net, feat, zhat, te.xy_px * te.mpp)
    with torch.inference_mode():
        e, _ = net.decode_latent(torch.from_numpy(np.asarray(z, np.float32)))
        e = net.unstandardize(e.float()).numpy()
    gi = [pred.genes.index(g) for g in bench]
    yi = [panel.index(g) for g in bench]
    err = np.abs(e[:, gi] - te.y[:, yi]).mean(1)
    # the same with each gene's section-wide offset removed (a new patient's level shift
    # is one number per gene; this asks which tiles are read worse than the others)
    pc, mc = e[:, gi] - e[:, gi].mean(0), te.y[:, yi] - te.y[:, yi].mean(0)
    err_c = np.abs(pc - mc).mean(1)
    conf = fit_confidence(net, np.concatenate([s.patches for s in tr], 0))
    cands = candidates(net, feat, zhat, z, bank=conf.bank)
    cands["combined"] = conf.score(cands["code_entropy"], feat.mean(0))
    cands["combined_sum"] = conf.score(cands["code_entropy"], feat.mean(0), how="sum")
    cands["combined_sum_pos"] = conf.score(cands["code_entropy"], feat.mean(0), how="sum_pos")
    with torch.inference_mode():
        ent_tile = code_entropy(net.gene.vq.distances(torch.from_numpy(zhat.mean(0)))).numpy()
    cands["code_entropy_tile"] = ent_tile
    cands["combined_tile"] = conf.score(ent_tile, feat.mean(0))
    out: dict = {
        "holdout": holdout,
        "train_sections": trained_on,
        "model": {"path": str(model_path), "sha256": pred.checksum},
        "n_spots": int(len(err)),
        "spearman": {},
        "spearman_centred_error": {},
        "reliability": {},
    }
    for name, u in cands.items():
        rho = spearmanr(u, err).statistic
        out["spearman"][name] = round(float(rho), 4)
        out["spearman_centred_error"][name] = round(float(spearmanr(u, err_c).statistic), 4)
        q = np.quantile(u, np.linspace(0, 1, bins + 1))
        idx = np.clip(np.searchsorted(q, u, side="right") - 1, 0, bins - 1)
        out["reliability"][name] = {
            "uncertainty_mean": [round(float(u[idx == b].mean()), 4) for b in range(bins)],
            "error_mean": [round(float(err[idx == b].mean()), 4) for b in range(bins)],
        }
    out["error_mean"] = round(float(err.mean()), 4)
    out["centred_error_mean"] = round(float(err_c.mean()), 4)
    return out


def plot_reliability(res: dict, path: Path, name: str = "combined_sum_pos") -> None:
    """Error by uncertainty quintile, one line per held-out fold (the shipped score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.4), dpi=120)
    for f in res["folds"]:
        rel = f["reliability"][name]
        kind = "new patient" if f["holdout"][:1] not in {s[:1] for s in f["train_sections"]} else (
            "within patient"
        )
        ax.plot(
            np.arange(1, len(rel["error_mean"]) + 1),
            rel["error_mean"],
            marker="o",
            lw=2.2 if kind == "new patient" else 1.2,
            label=f"{f['holdout']} ({kind}), ρ = {f['spearman'][name]:.2f}",
        )
    ax.set_xticks(np.arange(1, 6))
    ax.set_xlabel("uncertainty quintile (1 = surest fifth of the section's spots)")
    ax.set_ylabel("mean |pred − measured|\n(log1p CP10k, 50 genes)")
    ax.set_title("GenST confidence on held-out sections (fold models)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp)
    tmp.replace(path)


def update_card(path: Path, res: dict, command: str, folds_note: str) -> None:
    """Re-save a GenST checkpoint (same tensors) with this calibration in its card
    (``confidence.calibration``, which exports quote for the shipped score)."""
    from napari_stgen.models.checkpoint import load_checkpoint, save_checkpoint

    tensors, card = load_checkpoint(path, "genst")
    card.setdefault("confidence", {})["calibration"] = {
        "command": command,
        "fold": "mean of the held-out folds " + ", ".join(f["holdout"] for f in res["folds"]),
        "folds": folds_note,
        "spearman_uncertainty_vs_abs_error": res["mean_spearman"],
        "spearman_uncertainty_vs_abs_error_per_fold": {
            f["holdout"]: f["spearman"] for f in res["folds"]
        },
        "spearman_vs_centred_error": res["mean_spearman_centred_error"],
        "fold_models": {f["holdout"]: f["model"]["sha256"] for f in res["folds"]},
    }
    card.pop("sha256", None)
    card.pop("size_bytes", None)
    save_checkpoint(path, tensors, card)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--fold", action="append", help="HOLDOUT=CHECKPOINT")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="reliability plot (PNG)")
    ap.add_argument("--from-json", type=Path, default=None, help="only re-plot this result")
    ap.add_argument(
        "--update-card", type=Path, default=None, help="write the calibration into this card"
    )
    ap.add_argument("--folds-note", default="", help="how the fold models were made (card)")
    a = ap.parse_args()
    if a.from_json:
        plot_reliability(json.loads(a.from_json.read_text()), a.plot)
        return
    torch.set_num_threads(1)
    folds = [fold_calibration(a.data, *f.split("=", 1)) for f in a.fold]
    names = list(folds[0]["spearman"])
    res = {
        "protocol": "per held-out spot: Spearman(uncertainty, mean |pred - measured| over the "
        "50 benchmark genes); fold models never saw their held-out section",
        "folds": folds,
        "mean_spearman": {
            n: round(float(np.mean([f["spearman"][n] for f in folds])), 4) for n in names
        },
        "mean_spearman_centred_error": {
            n: round(float(np.mean([f["spearman_centred_error"][n] for f in folds])), 4)
            for n in names
        },
    }
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        write_text_atomic(a.out, text + "\n")
    if a.plot:
        plot_reliability(res, a.plot)
    if a.update_card:
        argv = sys.argv[1:]
        i = argv.index("--update-card")
        command = shlex.join(["python", "scripts/eval_confidence.py", *argv[:i], *argv[i + 2 :]])
        update_card(a.update_card, res, command, a.folds_note)


if __name__ == "__main__":
    main()
