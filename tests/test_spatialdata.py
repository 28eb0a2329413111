"""SpatialData export and import with the real packages: `stgen predict --out X.zarr` and
`predict-batch --format spatialdata` on the bundled sample, `spatialdata.read_zarr` of the
result (elements aligned in µm), the plugin reader's round trip, napari-spatialdata opening it,
and Visium SpatialData made by spatialdata-io."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sd = pytest.importorskip("spatialdata")

from napari_stgen.errors import StgenError  # noqa: E402
from napari_stgen.io.spatialdata import (  # noqa: E402
    export_spatialdata,
    read_spatialdata,
    write_layers_spatialdata,
)


def stgen(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "napari_stgen.cli.main", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def c3_exports(tmp_path_factory, sample_slide_path, sample_spots_path):
    """`stgen predict` of the sample spots → c3.zarr (CLI) and c3.h5ad (same model, in process)."""
    from napari_stgen.inference.batch import predict_slide

    d = tmp_path_factory.mktemp("sd")
    zarr = d / "c3.zarr"
    r = stgen("predict", str(sample_slide_path), "--spots", str(sample_spots_path),
              "--out", str(zarr), "--device", "cpu", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(zarr)
    assert "autosharding" not in r.stderr  # no warning per array
    h5ad = predict_slide(sample_slide_path, d / "c3.h5ad", spots=sample_spots_path, device="cpu")
    return zarr, h5ad


def test_cli_zarr_has_aligned_elements(c3_exports, sample_slide_path, sample_spots_path):
    import anndata as ad

    from napari_stgen.io.slide import open_slide

    zarr, h5ad = c3_exports
    s = sd.read_zarr(zarr)
    assert set(s.images) == {"her2st_C3_image"}
    assert set(s.shapes) == {"her2st_C3_spots"}
    assert set(s.tables) == {"table"}
    assert set(s.coordinate_systems) == {"global"}
    with open_slide(sample_slide_path) as slide:
        mpp, w, h = slide.mpp, slide.width, slide.height
        level2 = slide.levels[2].compute()
    # image extent = slide extent in µm; the pixels are the slide's own pyramid level
    ext = sd.get_extent(s["her2st_C3_image"], coordinate_system="global")
    assert ext["x"] == pytest.approx((0.0, w * mpp)) and ext["y"] == pytest.approx((0.0, h * mpp))
    img = s["her2st_C3_image"]["scale0"]["image"].data.compute().transpose(1, 2, 0)
    np.testing.assert_array_equal(img, level2)
    # circles centred on the predicted positions (µm, pixel-corner convention: +mpp/2)
    df = pd.read_csv(sample_spots_path)
    shp = s["her2st_C3_spots"]
    table = s.tables["table"]
    assert table.uns["spatialdata_attrs"]["region"] == "her2st_C3_spots"
    pos = shp.index.get_indexer(table.obs["instance_id"])
    xy = np.c_[shp.geometry.x, shp.geometry.y][pos]
    np.testing.assert_allclose(xy, (df[["x", "y"]].to_numpy() + 0.5) * mpp, atol=1e-9)
    assert (shp.geometry.geom_type == "Point").all()
    diam_um = table.uns["spatial"]["her2st_C3"]["scalefactors"]["spot_diameter_fullres"] * mpp
    np.testing.assert_allclose(shp["radius"], diam_um / 2)
    assert 80 < diam_um < 120  # ST spots: 100 µm
    # the table is the h5ad's AnnData (same values, ids, positions, codes, model record)
    a = ad.read_h5ad(h5ad)
    assert list(table.obs_names) == list(a.obs_names) == df["barcode"].astype(str).tolist()
    assert list(table.var_names) == list(a.var_names)
    np.testing.assert_allclose(table.X, a.X, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(table.obsm["spatial"], a.obsm["spatial"])
    np.testing.assert_array_equal(table.obs["genst_code"], a.obs["genst_code"])
    st = table.uns["stgen"]
    assert st["model"]["checksum"] == a.uns["stgen"]["model"]["checksum"]
    assert st["spatialdata"]["image"]["source"] == "slide pyramid level 2"
    assert "images" not in table.uns["spatial"]["her2st_C3"]  # the image element replaces them


def test_cli_refuses_existing_zarr_and_overwrites_atomically(c3_exports, tmp_path, monkeypatch):
    zarr, _ = c3_exports
    before = sorted(p.name for p in zarr.parent.iterdir())
    r = stgen("predict", "nothing.tif", "--spots", "x.csv", "--out", str(zarr))
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    r = stgen("predict", str(zarr), "--grid", "--out", str(tmp_path / "x.zip"))
    assert r.returncode != 0 and ".h5ad" in r.stderr and ".zarr" in r.stderr
    # an existing output is refused before any work, untouched
    s = sd.read_zarr(zarr)
    with pytest.raises(StgenError, match="already exists"):
        export_spatialdata(s.tables["table"], zarr)
    # a failing write leaves the previous output and no partial folder
    out = tmp_path / "again.zarr"
    import shutil

    shutil.copytree(zarr, out)
    table = sd.read_zarr(out).tables["table"].copy()
    del table.uns["spatialdata_attrs"]
    table.obs = table.obs.drop(columns=["region", "instance_id"])

    def boom(self, path, *a, **k):
        Path(path).mkdir()
        (Path(path) / "half").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(sd.SpatialData, "write", boom)
    with pytest.raises(OSError, match="disk full"):
        export_spatialdata(table, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.zarr"]
    assert set(sd.read_zarr(out).tables) == {"table"}
    monkeypatch.undo()
    export_spatialdata(table, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.zarr"]
    assert sorted(p.name for p in zarr.parent.iterdir()) == before


def test_reader_round_trip_is_identical(c3_exports, sample_slide_path, tmp_path):
    """zarr → layers equals h5ad → layers; layers → zarr again → the same table values."""
    from napari_stgen.io.anndata import read_h5ad_layers
    from napari_stgen.io.napari_reader import get_reader, read_slide_layers

    zarr, h5ad = c3_exports
    reader = get_reader(str(zarr))
    assert reader is not None
    layers = reader(str(zarr))
    kinds = [k for _, _, k in layers]
    assert kinds == ["image", "points"]
    (img, ikw, _), (pts, pkw, _) = layers
    assert set(ikw["metadata"]) == set(pkw["metadata"]) == {"stgen"}  # one schema, one key
    assert ikw["metadata"]["stgen"]["kind"] == "spatialdata_image"
    assert ikw["metadata"]["stgen"]["mpp"] == pytest.approx(pkw["metadata"]["stgen"]["mpp"])
    (hp, hkw, _) = next(ly for ly in read_h5ad_layers(h5ad) if ly[2] == "points")
    np.testing.assert_allclose(pts, hp, atol=1e-9)  # napari-stgen world µm, as the h5ad
    assert pkw["size"] == pytest.approx(hkw["size"])
    table = sd.read_zarr(zarr).tables["table"]
    genes = list(table.var_names)
    np.testing.assert_array_equal(pkw["features"][genes].to_numpy(), table.X)
    assert list(pkw["features"]["barcode"]) == list(table.obs_names)
    # the image sits on the slide: same µm extent as the slide layer, level-for-level pixels
    (sl, skw, _) = read_slide_layers(str(sample_slide_path))[0]
    mpp = skw["scale"][0]
    assert ikw["multiscale"] and len(img) == 4
    for a in (0, 1):
        lo = ikw["translate"][a] - ikw["scale"][a] / 2
        hi = lo + img[0].shape[a] * ikw["scale"][a]
        assert lo == pytest.approx(-mpp / 2) and hi == pytest.approx(sl[0].shape[a] * mpp - mpp / 2)
    # and back: the read layers export to the same values
    again = write_layers_spatialdata(tmp_path / "again.zarr", layers)
    t2 = sd.read_zarr(again).tables["table"]
    np.testing.assert_array_equal(t2[:, genes].X, table.X)
    np.testing.assert_allclose(t2.obsm["spatial"], table.obsm["spatial"], atol=1e-9)


def test_viewer_opens_it_with_both_plugins(
    c3_exports, make_napari_viewer, napari_spatialdata, qtbot
):
    zarr, _ = c3_exports
    viewer = make_napari_viewer()
    layers = viewer.open(str(zarr), plugin="napari-stgen")
    assert [type(ly).__name__ for ly in layers] == ["Image", "Points"]
    pts = layers[1]
    assert pts.units[-1] == "µm" or str(pts.units[-1]) in ("micrometer", "um")
    assert np.isfinite(pts.features.select_dtypes("number").to_numpy()).all()

    # napari-spatialdata (the scverse viewer) shows the same elements at the same places
    v2 = make_napari_viewer()
    it = napari_spatialdata.Interactive(sd.read_zarr(zarr), headless=True)
    for name in ("her2st_C3_image", "her2st_C3_spots"):
        it.add_element(name, "global")
        thread = it._sdata_widget.worker_thread
        qtbot.waitUntil(lambda t=thread: not t.isRunning(), timeout=60000)
        qtbot.waitUntil(lambda n=name: n in v2.layers, timeout=10000)
    shown = v2.layers["her2st_C3_spots"]
    # napari-spatialdata keeps SpatialData coordinates: ours + mpp/2
    mpp = float(sd.read_zarr(zarr).tables["table"].uns["stgen"]["mpp"])
    np.testing.assert_allclose(np.sort(shown.data, 0), np.sort(pts.data + mpp / 2, 0), atol=1e-6)
    ext = v2.layers["her2st_C3_image"].extent.world
    np.testing.assert_allclose(ext[1, -2:] - ext[0, -2:], np.array([9936, 9270]) * mpp, rtol=1e-3)


def test_batch_grid_tiles_are_squares(sample_slide_path, tmp_path):
    from napari_stgen.inference.cohort import run_batch

    rows = run_batch([sample_slide_path], tmp_path, grid=True, workers=1, processes=False,
                     region_um=(2000.0, 2000.0, 2700.0, 2600.0), device="cpu", progress=False,
                     fmt="spatialdata")  # fmt: skip
    assert [r["status"] for r in rows] == ["ok"], rows
    out = tmp_path / "her2st_C3.zarr"
    assert rows[0]["output"] == str(out.resolve()) and rows[0]["n_obs"] > 4
    s = sd.read_zarr(out)
    t = s.tables["table"]
    shp = s["her2st_C3_tiles"]
    tile = float(t.uns["stgen"]["grid"]["tile_um"])
    mpp = float(t.uns["stgen"]["mpp"])
    b = shp.geometry.bounds.to_numpy()
    np.testing.assert_allclose(b[:, 2] - b[:, 0], tile)
    np.testing.assert_allclose(b[:, 3] - b[:, 1], tile)
    centre = np.c_[(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2]
    pos = shp.index.get_indexer(t.obs["instance_id"])
    np.testing.assert_allclose(centre[pos], (t.obsm["spatial"] + 0.5) * mpp, atol=1e-6)
    # tile centres on the grid: origin + (cell + 1/2) · tile
    g = t.uns["stgen"]["grid"]
    rc = t.obs[["grid_row", "grid_col"]].to_numpy()
    want = (rc[:, ::-1] + 0.5) * tile + np.asarray(g["origin_yx_um"])[::-1]
    np.testing.assert_allclose(t.obsm["spatial"] * mpp, want, atol=1e-6)
    # rerun: skipped (resumable), as for h5ad
    again = run_batch([sample_slide_path], tmp_path, grid=True, workers=1, processes=False,
                      fmt="spatialdata", progress=False)  # fmt: skip
    assert again[0]["status"] == "skipped"


def _legacy_visium(sample_slide_path, sample_spots_path):
    """The sample's measured spots as a legacy (uns['spatial']) Visium-layout AnnData."""
    from napari_stgen.io.anndata import predictions_to_anndata
    from napari_stgen.io.slide import open_slide

    df = pd.read_csv(sample_spots_path)
    genes = [c for c in df.columns if c not in ("barcode", "x", "y")]
    with open_slide(sample_slide_path) as s:
        x, xy = np.log1p(df[genes].to_numpy(np.float32)), df[["x", "y"]].to_numpy(float)
        a = predictions_to_anndata(x, genes, xy, slide=s, obs_names=df["barcode"].tolist())
    del a.uns["stgen"]  # as a foreign file: no napari-stgen record
    return a


@pytest.mark.parametrize("source", ["sample", "visium_crop"])
def test_reads_visium_spatialdata_from_spatialdata_io(
    source, request, sample_slide_path, sample_spots_path, tmp_path
):
    """spatialdata-io's conversion of a Visium-layout AnnData opens as an image with the spots
    on it, in µm from the spot size (a foreign file carries no µm: Visium's 55 µm is assumed)."""
    import anndata as ad

    sio = pytest.importorskip("spatialdata_io.experimental")
    if source == "sample":
        a = _legacy_visium(sample_slide_path, sample_spots_path)
    else:
        a = ad.read_h5ad(request.getfixturevalue("visium_crop_dir") / "spots.h5ad")
    lib = next(iter(a.uns["spatial"]))
    sf = a.uns["spatial"][lib]["scalefactors"]
    sdata = sio.from_legacy_anndata(a)
    path = tmp_path / "visium.zarr"
    sdata.write(path)
    layers = read_spatialdata(path)
    images = [ly for ly in layers if ly[2] == "image"]
    (pts, pkw, _) = next(ly for ly in layers if ly[2] == "points")
    assert images and len(pts) == a.n_obs
    # µm per full-resolution px from the spot diameter
    um_per_px = 55.0 / sf["spot_diameter_fullres"]
    np.testing.assert_allclose(pts[:, ::-1], a.obsm["spatial"] * um_per_px, rtol=1e-6)
    assert pkw["size"] == pytest.approx(55.0)
    # every spot lies on the hires image, on the pixel scanpy puts it on
    hires = next(ly for ly in images if ly[1]["name"].endswith("hires"))
    (im, ikw, _) = hires
    ij = (pts - np.asarray(ikw["translate"])) / np.asarray(ikw["scale"])
    want = a.obsm["spatial"][:, ::-1] * sf["tissue_hires_scalef"]
    np.testing.assert_allclose(ij, want - 0.5, atol=1e-6)
    if source == "sample":  # (the crop's hires image is a 100 px stand-in, not the tissue)
        assert (ij >= -0.5).all() and (ij < np.asarray(im.shape[:2]) - 0.5).all()
    genes = list(pkw["metadata"]["stgen"]["genes"])[:5]
    x = a[:, genes].X
    x = x.toarray() if hasattr(x, "toarray") else x
    np.testing.assert_allclose(pkw["features"][genes].to_numpy(), x)


def test_bad_zarr_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.zarr"
    (bad / "tables").mkdir(parents=True)
    (bad / "zarr.json").write_text("{not json")
    with pytest.raises(StgenError, match="bad.zarr"):
        read_spatialdata(bad)


def test_cli_zarr_carries_the_uncertainty(c3_exports):
    """The SpatialData table has the h5ad's per-spot uncertainty and its description."""
    import anndata as ad

    zarr, h5ad = c3_exports
    table = sd.read_zarr(zarr).tables["table"]
    a = ad.read_h5ad(h5ad)
    u = table.obs["uncertainty"].to_numpy()
    assert np.isfinite(u).all() and u.std() > 0
    np.testing.assert_allclose(u, a[table.obs_names].obs["uncertainty"].to_numpy(), atol=1e-5)
    info = table.uns["stgen"]["uncertainty"]
    assert info["larger_means"] == "less sure"
    assert info["definition"] == a.uns["stgen"]["uncertainty"]["definition"]
