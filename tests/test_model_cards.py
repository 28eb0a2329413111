"""The shipped GenST card, the evaluation files it was written from and the docs agree.

The card's figures are written by ``scripts/eval_genst_folds.py --update-card`` and
``scripts/eval_confidence.py --update-card`` from the same runs as ``docs/genst_folds.json`` and
``docs/genst_confidence.json``; docs/models.md quotes them. A re-evaluation that updates one and
not the others fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

from napari_stgen.models.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CARD = ROOT / "src/napari_stgen/weights/genst_default.safetensors"


def _card() -> dict:
    return load_checkpoint(CARD, "genst")[1]


def test_card_fold_figures_are_the_fold_files_and_lead_the_docs():
    ev = _card()["evaluation"]
    folds = json.loads((ROOT / "docs/genst_folds.json").read_text())
    for split in ("out_of_patient", "within_patient"):
        assert ev[split]["mean"] == folds[split]["mean"]
        for holdout, trained_on in ev[split]["folds"].items():
            assert holdout not in trained_on
    assert list(ev["out_of_patient"]["folds"]) == ["B4"]
    assert ev["per_fold"] == folds["per_fold"]
    # the models.md headline row quotes the card's out-of-patient and within-patient figures
    docs = (ROOT / "docs/models.md").read_text()
    head = docs[docs.index("## Headline") : docs.index("### Confidence")]
    shipped = next(line for line in head.splitlines() if line.startswith("| **GenST v2 (shipped)"))
    oop, wp = ev["out_of_patient"]["mean"]["genst"], ev["within_patient"]["mean"]["genst"]
    assert f"**{oop:.3f}**" in shipped and f"| {wp:.3f} |" in shipped
    # where the folds were trained, and how much a new seed moves the new-patient figure
    assert ev["fold_models_cpu"]["torch_cpu_capability"]
    spread = ev["seed_spread"]["B4"]
    assert spread["genst"][0] == ev["per_fold"]["B4"]["genst"] and len(spread["genst"]) >= 3
    assert f"{spread['genst_mean']:.3f}" in head


def test_card_calibration_is_the_confidence_file():
    card = _card()
    cal = card["confidence"]["calibration"]
    conf = json.loads((ROOT / "docs/genst_confidence.json").read_text())
    assert cal["spearman_uncertainty_vs_abs_error"] == conf["mean_spearman"]
    shipped = card["confidence"]["uncertainty"]
    docs = (ROOT / "docs/models.md").read_text()
    assert f"**{conf['mean_spearman'][shipped]:.3f}**" in docs
    per_fold = {f["holdout"]: f["spearman"][shipped] for f in conf["folds"]}
    assert cal["spearman_uncertainty_vs_abs_error_per_fold"]["B4"][shipped] == per_fold["B4"]
