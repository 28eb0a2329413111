"""README's main command: ``stgen demo`` on the bundled sample, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata as ad
import numpy as np


def test_demo_prints_only_json_and_names_the_held_out_figures(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "napari_stgen.cli.main",
            "demo",
            "--out-dir",
            str(out),
            "--no-synthesis",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)  # stdout is the JSON summary and nothing else
    assert summary["sample_section"] == "C3"
    assert summary["sample_role"] == "training section of the default model"
    held = summary["held_out_pearson_from_card"]
    folds = held["new_patient"]["folds"]
    assert list(folds) == ["B4"] and not any(s.startswith("B") for s in folds["B4"])
    assert 0.0 < held["new_patient"]["pearson"] < 1.0
    assert 0.0 < held["within_patient_mean"] < 1.0
    spots = ad.read_h5ad(summary["spots_h5ad"])
    assert spots.n_obs == summary["n_spots"] > 100
    assert np.isfinite(np.asarray(spots.X)).all()
    assert (out / summary["figure"].split("/")[-1]).exists()
