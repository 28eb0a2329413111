"""`stgen predict`: the default GenST model on the sample slide and on a HER2ST JPEG, the tile
grid, and one-line errors on bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from napari_stgen.cli.main import main


@pytest.fixture(scope="session")
def genst_model() -> str:
    """Path of the shipped default GenST checkpoint (skips until it is trained)."""
    from napari_stgen.errors import CheckpointError
    from napari_stgen.models.checkpoint import resolve_checkpoint

    try:
        return str(resolve_checkpoint("default", "genst"))
    except CheckpointError as e:
        pytest.skip(f"default GenST checkpoint not available yet: {e}")


def stgen(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the real CLI in a fresh process (one torch thread)."""
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    import os

    return subprocess.run(
        [sys.executable, "-m", "napari_stgen.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
    )


def pearson_cols(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = np.sqrt((a**2).sum(0) * (b**2).sum(0))
    return np.where(den > 0, (a * b).sum(0) / np.where(den > 0, den, 1), 0.0)


def test_predict_sample_spots(genst_model, sample_slide_path, sample_spots_path, tmp_path):
    import anndata as ad

    from napari_stgen.models.checkpoint import sha256_file

    out = tmp_path / "c3.h5ad"
    r = stgen(
        "predict", str(sample_slide_path), "--spots", str(sample_spots_path), "--out", str(out),
        "--model", genst_model, "--device", "cpu", "--quiet",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    df = pd.read_csv(sample_spots_path)
    a = ad.read_h5ad(out)
    assert a.X.dtype == np.float32 and np.isfinite(a.X).all()
    assert list(a.obs_names) == df["barcode"].astype(str).tolist()
    np.testing.assert_allclose(a.obsm["spatial"], df[["x", "y"]].to_numpy())
    assert a.obs["genst_code"].dtype.kind == "i"
    st = a.uns["stgen"]
    assert st["model"]["checksum"] == sha256_file(genst_model)
    assert st["normalization"] == "log1p_cp10k" and st["obs_kind"] == "spots"
    assert "hires" in a.uns["spatial"]["her2st_C3"]["images"]

    # predictions follow the measured counts of the section's top genes
    card_genes = [str(g) for g in np.asarray(st["model"]["card"].get("benchmark_genes", []))]
    import json

    card = json.loads(st["model"]["card_json"])
    top = [g for g in card.get("benchmark_genes", card_genes)[:20] if g in df.columns][:15]
    assert len(top) >= 10
    measured = np.log1p(df[top].to_numpy(np.float64))
    r_gene = pearson_cols(a[:, top].X.astype(np.float64), measured)
    assert r_gene.mean() > 0.2, dict(zip(top, r_gene.round(2), strict=True))
    assert (r_gene > 0).mean() >= 0.8
    # the CSV's measured columns are kept, apart from the predictions
    assert f"{top[0]}_csv" in a.obs.columns


def test_predict_her2st_jpeg_needs_mpp(genst_model, her2st_c3_dir, tmp_path, capsys):
    import anndata as ad
    import torch

    from napari_stgen.io.her2st import mpp_from_pitch

    torch.set_num_threads(1)
    sel = pd.read_csv(her2st_c3_dir / "C3_selection.tsv", sep="\t")
    spots = sel.iloc[::6]
    csv = tmp_path / "c3_spots.csv"
    pd.DataFrame(
        {"barcode": [f"{x}x{y}" for x, y in zip(spots.x, spots.y, strict=True)],
         "x": spots.pixel_x, "y": spots.pixel_y}
    ).to_csv(csv, index=False)  # fmt: skip
    out = tmp_path / "c3.h5ad"
    jpg = str(her2st_c3_dir / "C3.jpg")
    args = ["predict", jpg, "--spots", str(csv), "--out", str(out), "--model", genst_model]

    assert main(args) == 2  # a JPEG has no resolution: one line asking for --mpp
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--mpp" in err and "C3.jpg" in err

    mpp = mpp_from_pitch(sel[["x", "y"]].to_numpy(), sel[["pixel_x", "pixel_y"]].to_numpy())
    assert main([*args, "--mpp", f"{mpp:.5f}", "--device", "cpu", "--quiet"]) == 0
    a = ad.read_h5ad(out)
    assert a.n_obs == len(spots)
    assert a.uns["stgen"]["mpp"] == pytest.approx(mpp, rel=1e-4)
    assert a.uns["stgen"]["slide"]["format"] == "image"
    np.testing.assert_allclose(a.obsm["spatial"], spots[["pixel_x", "pixel_y"]].to_numpy())


def test_predict_grid_region(genst_model, sample_slide_path, tmp_path):
    """--grid: tissue cells of the model-patch grid inside --region, restored as a codebook."""
    import anndata as ad

    from napari_stgen.inference.batch import predict_slide
    from napari_stgen.io.anndata import read_h5ad_layers

    region = (2000.0, 2000.0, 3200.0, 3000.0)
    out = predict_slide(
        sample_slide_path, tmp_path / "grid.h5ad", grid=True, model=genst_model,
        region_um=region, device="cpu",
    )  # fmt: skip
    a = ad.read_h5ad(out)
    g = a.uns["stgen"]["grid"]
    t = float(g["tile_um"])
    mpp = a.uns["stgen"]["mpp"]
    rows, cols = a.obs["grid_row"].to_numpy(), a.obs["grid_col"].to_numpy()
    assert a.n_obs > 0
    assert list(a.obs_names) == [f"tile_{r}_{c}" for r, c in zip(rows, cols, strict=True)]
    np.testing.assert_allclose(a.obsm["spatial"], (np.c_[cols, rows] + 0.5) * t / mpp)
    # every cell overlaps the region
    assert ((cols + 1) * t > region[0]).all() and (cols * t < region[2]).all()
    assert ((rows + 1) * t > region[1]).all() and (rows * t < region[3]).all()
    sf = a.uns["spatial"]["her2st_C3"]["scalefactors"]
    assert sf["spot_diameter_fullres"] * mpp == pytest.approx(t)
    layers = read_h5ad_layers(out)
    (lab,) = [ly for ly in layers if ly[2] == "labels"]
    np.testing.assert_array_equal(lab[0][rows, cols], a.obs["genst_code"].to_numpy() + 1)
    assert lab[1]["scale"] == (t, t)


def test_predict_bad_input_is_one_line(sample_slide_path, sample_spots_path, tmp_path, capsys):
    def run(*args: str) -> tuple[int, str]:
        rc = main(["predict", *args])
        return rc, capsys.readouterr().err

    slide = str(sample_slide_path)
    bad_csv = tmp_path / "spots.csv"
    bad_csv.write_text("id,x,y\na,1,2\n")
    rc, err = run(slide, "--spots", str(bad_csv), "--out", str(tmp_path / "o.h5ad"))
    assert rc == 2 and "spots.csv" in err and "barcode" in err and err.count("\n") == 1

    nan_csv = tmp_path / "nan.csv"
    nan_csv.write_text("barcode,x,y\na,1,2\nb,oops,3\n")
    rc, err = run(slide, "--spots", str(nan_csv), "--out", str(tmp_path / "o.h5ad"))
    assert rc == 2 and "nan.csv" in err and "'x'" in err and "row 3" in err

    rc, err = run(str(tmp_path / "nope.svs"), "--grid", "--out", str(tmp_path / "o.h5ad"))
    assert rc == 2 and "nope.svs" in err

    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + b"\x00" * 64)
    rc, err = run(str(corrupt), "--grid", "--out", str(tmp_path / "o.h5ad"))
    assert rc == 2 and "corrupt.tif" in err and err.count("\n") == 1

    out = tmp_path / "exists.h5ad"
    out.write_bytes(b"")
    rc, err = run(slide, "--spots", str(sample_spots_path), "--out", str(out))
    assert rc == 2 and "exists.h5ad" in err and "--overwrite" in err

    rc, err = run(
        slide, "--grid", "--out", str(tmp_path / "o.h5ad"), "--region", "5", "5", "1", "9"
    )
    assert rc == 2 and "--region" in err

    rc, err = run(slide, "--grid", "--out", str(tmp_path / "o.csv"))
    assert rc == 2 and ".h5ad" in err

    far = tmp_path / "far.csv"
    far.write_text("barcode,x,y\na,1e7,1e7\n")
    rc, err = run(slide, "--spots", str(far), "--out", str(tmp_path / "o.h5ad"))
    assert rc == 2 and "no spot lies on the slide" in err
