"""Expression-only HER2ST sections (issue 16): reading them, leaving a held-out patient out of
the gene VQ-VAE's extra data, and `stgen evaluate codes` against the pathologist's regions."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from napari_stgen.io.her2st import read_expression_section, read_labelled_regions


@pytest.fixture(scope="module")
def expr_dir(her2st_dir):
    d = her2st_dir.parent / "her2st_expression"
    if not d.is_dir():
        pytest.skip(f"expression-only HER2ST sections not found at {d}")
    return d


def test_expression_sections_and_extra_profiles_leave_the_patient_out(expr_dir):
    from napari_stgen.training.genst import extra_gene_profiles

    sec = read_expression_section(expr_dir, "C1")
    labels = read_labelled_regions(expr_dir, sec)
    assert len(labels) == len(sec.barcodes) > 100 and (labels != "").all()
    assert "invasive cancer" in set(labels)
    y = sec.target(["ERBB2", "NOT_A_GENE"])
    assert y.shape == (len(sec.barcodes), 2) and y[:, 0].max() > 1 and (y[:, 1] == 0).all()
    prof, names = extra_gene_profiles(expr_dir, ["ERBB2", "COL1A1"], {"B"}, 1.0)
    assert names and not any(n.startswith("B") for n in names) and "C1" in names
    assert prof.shape[1] == 2 and np.isfinite(prof).all()


def test_evaluate_codes_cli_scores_codes_beside_kmeans(expr_dir):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "napari_stgen.cli.main",
            "evaluate",
            "codes",
            "--data",
            str(expr_dir),
            "--seeds",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert set(res["per_section"]) == {"A1", "B1", "C1", "D1", "E1", "F1"}
    for s in res["per_section"].values():
        for src in ("codes", "kmeans"):
            assert 0 <= s[src]["nmi"] <= 1 and -1 <= s[src]["ari"] <= 1
    n = sum(s["spots"] for s in res["per_section"].values())
    assert sum(sum(c.values()) for c in res["code_labels"].values()) == n
