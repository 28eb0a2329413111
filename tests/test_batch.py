"""`stgen predict-batch`: one dask.distributed task per slide on real sections; a corrupt
slide is reported while the others finish; the cluster's numbers equal the in-process run;
reruns skip finished slides."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def genst_model() -> str:
    """Path of the shipped default GenST checkpoint (skips until it is trained)."""
    from napari_stgen.errors import CheckpointError
    from napari_stgen.models.checkpoint import resolve_checkpoint

    try:
        return str(resolve_checkpoint("default", "genst"))
    except CheckpointError as e:
        pytest.skip(f"default GenST checkpoint not available yet: {e}")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, sample_slide_path, sample_spots_path):
    """Two real slides (the C3 sample slide and a crop of it as tiled TIFF), one corrupt file,
    and a spots CSV for each (a subset of spots, to stay fast)."""
    import tifffile

    d = tmp_path_factory.mktemp("cohort")
    slides, spots = d / "slides", d / "spots"
    slides.mkdir()
    spots.mkdir()

    (slides / "C3.tif").symlink_to(sample_slide_path)
    df = pd.read_csv(sample_spots_path)
    df.iloc[::8][["barcode", "x", "y"]].to_csv(spots / "C3_spots.csv", index=False)

    from napari_stgen.io.slide import open_slide

    with open_slide(sample_slide_path) as s:  # a second slide: a crop of the section
        mpp = s.mpp
        x0, y0 = int(df.x.median()) - 1200, int(df.y.median()) - 1200
        crop = s.levels[0][y0 : y0 + 2400, x0 : x0 + 2400].compute()
    tifffile.imwrite(
        slides / "C3crop.tif", crop, tile=(256, 256), compression="jpeg", photometric="rgb",
        resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER",
    )  # fmt: skip
    inside = df[
        (df.x > x0 + 150) & (df.x < x0 + 2250) & (df.y > y0 + 150) & (df.y < y0 + 2250)
    ].iloc[1::2]  # fmt: skip
    pd.DataFrame({"barcode": inside.barcode, "x": inside.x - x0, "y": inside.y - y0}).to_csv(
        spots / "C3crop_spots.csv", index=False
    )

    (slides / "broken.tif").write_bytes(b"II*\x00" + os.urandom(2048))
    pd.DataFrame({"barcode": ["a"], "x": [10.0], "y": [10.0]}).to_csv(
        spots / "broken_spots.csv", index=False
    )
    return d, [slides / "C3.tif", slides / "C3crop.tif", slides / "broken.tif"], spots


def test_predict_batch_local_cluster(genst_model, cohort, tmp_path):
    import anndata as ad

    from napari_stgen.inference.batch import predict_slide
    from napari_stgen.inference.cohort import run_batch

    d, slides, spots = cohort
    out = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "napari_stgen.cli.main", "predict-batch", *map(str, slides),
         "--out-dir", str(out), "--spots-dir", str(spots), "--workers", "1",
         "--model", genst_model, "--device", "cpu", "--quiet"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr  # one slide failed
    assert sorted(p.name for p in out.glob("*.h5ad")) == ["C3.h5ad", "C3crop.h5ad"]
    assert "2 ok, 0 skipped, 1 failed" in r.stdout
    assert "broken.tif" in r.stdout
    with open(out / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [Path(row["slide"]).name for row in rows] == ["C3.tif", "C3crop.tif", "broken.tif"]
    assert [row["status"] for row in rows] == ["ok", "ok", "failed"]
    assert "broken.tif" in rows[2]["error"] and rows[2]["output"] == ""
    n_c3 = len(pd.read_csv(spots / "C3_spots.csv"))
    assert int(rows[0]["n_obs"]) == n_c3

    # the LocalCluster worker computed the same numbers as an in-process run
    here = predict_slide(
        slides[0], tmp_path / "here.h5ad", spots=spots / "C3_spots.csv", model=genst_model,
        device="cpu",
    )  # fmt: skip
    a, b = ad.read_h5ad(out / "C3.h5ad"), ad.read_h5ad(here)
    assert list(a.obs_names) == list(b.obs_names)
    np.testing.assert_allclose(a.X, b.X, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(a.obs["genst_code"], b.obs["genst_code"])
    np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])
    crop = ad.read_h5ad(out / "C3crop.h5ad")
    assert crop.n_obs == len(pd.read_csv(spots / "C3crop_spots.csv"))
    assert crop.uns["stgen"]["slide"]["width"] == 2400

    # an existing cluster (--scheduler ADDRESS): same numbers again, and a rerun into the
    # same directory skips the finished slides (resumable)
    from distributed import LocalCluster

    before = (out / "C3.h5ad").stat().st_mtime_ns
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:  # fmt: skip
        addr = cluster.scheduler_address
        rows = run_batch(
            [str(s) for s in slides], out, spots_dir=spots, scheduler=addr, model=genst_model,
            device="cpu", progress=False,
        )  # fmt: skip
        assert [row["status"] for row in rows] == ["skipped", "skipped", "failed"]
        assert (out / "C3.h5ad").stat().st_mtime_ns == before
        (row,) = run_batch(
            [str(slides[0])], tmp_path / "again", spots_dir=spots, scheduler=addr,
            model=genst_model, device="cpu", progress=False,
        )  # fmt: skip
    assert row["status"] == "ok", row
    np.testing.assert_allclose(ad.read_h5ad(row["output"]).X, b.X, rtol=1e-4, atol=1e-4)


def test_batch_bad_arguments(tmp_path):
    from napari_stgen.cli.main import main

    assert main(["predict-batch", "a.tif", "--out-dir", str(tmp_path), "--spots-dir",
                 str(tmp_path / "missing")]) == 2  # fmt: skip
    assert main(["predict-batch", "a.tif", "--out-dir", str(tmp_path), "--grid",
                 "--workers", "0"]) == 2  # fmt: skip


def test_batch_output_names_and_spots_lookup(tmp_path):
    from napari_stgen.inference.cohort import batch_outputs, find_spots

    outs = batch_outputs(["a/S1.svs", "b/S1.svs", "c/S2.ome.tiff"], tmp_path)
    assert [p.name for p in outs] == ["S1.h5ad", "S1_2.h5ad", "S2.h5ad"]
    (tmp_path / "S2.csv").write_text("barcode,x,y\n")
    (tmp_path / "S1_spots.csv").write_text("barcode,x,y\n")
    assert find_spots("x/S1.svs", tmp_path).name == "S1_spots.csv"
    assert find_spots("x/S2.ome.tiff", tmp_path).name == "S2.csv"
    assert find_spots("x/S3.svs", tmp_path) is None
