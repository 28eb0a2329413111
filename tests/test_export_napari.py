"""napari side of export: the npe2 writer (File ▸ Save Layers), the reader round trip and the
Export widget, on the sample slide with its real spots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_stgen.io.anndata import GeneratedTile
from napari_stgen.io.layer_meta import generated_record, layer_kind


@pytest.fixture
def viewer_with_layers(make_napari_viewer, sample_slide_path, sample_spots_path):
    """Slide (via the plugin reader), spots with measured genes, two ROIs, a generated tile."""
    viewer = make_napari_viewer()
    (slide_layer,) = viewer.open(str(sample_slide_path), plugin="napari-stgen")
    mpp = slide_layer.scale[-1]
    df = pd.read_csv(sample_spots_path)
    genes = [c for c in df.columns if c not in ("barcode", "x", "y")][:6]
    feats = np.log1p(df[genes].astype(np.float32))
    feats.insert(0, "barcode", df["barcode"].astype(str))
    viewer.add_points(
        df[["y", "x"]].to_numpy() * mpp,
        features=feats,
        size=100.0,
        name="measured spots",
        metadata={"stgen": {"genes": genes}},
    )
    rois = [
        np.array([[1000.0, 2000.0], [1000.0, 3000.0], [2500.0, 3000.0], [2500.0, 2000.0]]),
        np.array([[3000.0, 3000.0], [3500.0, 4200.0], [4000.0, 3100.0]]),
    ]
    viewer.add_shapes(rois, shape_type=["rectangle", "polygon"], name="ROIs")
    rng = np.random.default_rng(0)
    tile = GeneratedTile(
        id="gen_ERBB2_high",
        image=rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
        origin_yx_um=(2000.0, 2500.0),
        px_um=3.5,
        genes=genes,
        condition=feats[genes].to_numpy()[0],
        guidance_genes=2.5,
        guidance_morph=1.0,
        steps=8,
        seed=7,
        model="stmdit_default",
        model_checksum="ab" * 32,
    )
    data, kw, _ = tile.layer_data()
    viewer.add_image(data, **kw)
    return viewer, df, genes, mpp, rois, tile


def _check_h5ad(path: Path, df, genes, mpp, rois, tile):
    import anndata as ad

    a = ad.read_h5ad(path)
    assert list(a.obs_names) == df["barcode"].astype(str).tolist()
    np.testing.assert_allclose(a.obsm["spatial"], df[["x", "y"]].to_numpy(), atol=1e-6)
    np.testing.assert_allclose(a[:, genes].X, np.log1p(df[genes].to_numpy(np.float32)))
    st = a.uns["stgen"]
    assert st["mpp"] == pytest.approx(mpp)
    assert Path(st["slide"]["path"]).name == "her2st_C3.tif"
    assert list(st["rois"]["n_vertices"]) == [4, 3]  # both shapes, not only the first
    np.testing.assert_allclose(st["rois"]["vertices_yx_um"], np.concatenate(rois), atol=1e-9)
    rec = st["generated"][tile.id]
    np.testing.assert_array_equal(rec["image"], tile.image)
    assert rec["seed"] == 7 and rec["model_checksum"] == tile.model_checksum
    lib = a.uns["spatial"][next(iter(a.uns["spatial"]))]
    s = lib["scalefactors"]["tissue_hires_scalef"]
    assert max(lib["images"]["hires"].shape[:2]) == pytest.approx(2000, abs=1)
    assert lib["images"]["hires"].shape[1] == pytest.approx(9270 * s, abs=1)
    # spot circles ~ 100 µm
    assert lib["scalefactors"]["spot_diameter_fullres"] * mpp == pytest.approx(100.0)
    return a


def test_writer_and_reader_roundtrip(viewer_with_layers, make_napari_viewer, tmp_path):
    viewer, df, genes, mpp, rois, tile = viewer_with_layers
    out = tmp_path / "session.h5ad"
    written = viewer.layers.save(str(out), selected=False, plugin="napari-stgen")
    assert [Path(p) for p in written] == [out]
    _check_h5ad(out, df, genes, mpp, rois, tile)

    # napari reads it back (plugin reader → read_h5ad_layers) in the same µm places
    v2 = make_napari_viewer()
    layers = v2.open(str(out), plugin="napari-stgen")
    by_type = {type(ly).__name__: ly for ly in layers}
    pts = next(ly for ly in layers if type(ly).__name__ == "Points")
    np.testing.assert_allclose(pts.data, viewer.layers["measured spots"].data, atol=1e-9)
    np.testing.assert_allclose(pts.features[genes].to_numpy(), np.log1p(df[genes].to_numpy()))
    shapes = by_type["Shapes"]
    assert shapes.shape_type == ["rectangle", "polygon"]
    for a, b in zip(shapes.data, rois, strict=True):
        np.testing.assert_allclose(a, b)
    gen = v2.layers[f"generated {tile.id}"]
    np.testing.assert_allclose(gen.scale, viewer.layers[f"generated {tile.id}"].scale)
    np.testing.assert_allclose(gen.translate, viewer.layers[f"generated {tile.id}"].translate)
    assert generated_record(gen.metadata)["seed"] == 7
    thumb = next(ly for ly in layers if layer_kind(ly.metadata) == "thumbnail")
    # the thumbnail covers the slide's extent in µm
    ext = np.asarray(thumb.data.shape[:2]) * np.asarray(thumb.scale)
    np.testing.assert_allclose(ext, np.array([9936, 9270]) * mpp, rtol=2e-3)


def test_export_widget(viewer_with_layers, qtbot, tmp_path):
    from napari_stgen.widgets.export import ExportWidget
    from napari_stgen.widgets.state import get_state

    viewer, df, genes, mpp, rois, tile = viewer_with_layers
    w = ExportWidget(viewer)
    qtbot.addWidget(w)
    listed = [w.layer_list.item(i).text() for i in range(w.layer_list.count())]
    assert set(listed) == {"measured spots", "ROIs", f"generated {tile.id}"}

    out = tmp_path / "widget.h5ad"
    w.path_edit.setText(str(out))
    worker = w.export()
    assert worker is not None
    with qtbot.waitSignal(worker.finished, timeout=30000):
        pass
    _check_h5ad(out, df, genes, mpp, rois, tile)

    # refuses to overwrite unless ticked
    assert w.export() is None
    assert "exists" in w.status.text()

    # the session's prediction store shows up and exports as tiles with their grid
    from napari_stgen.coords import Grid

    store = get_state(viewer).store
    grid = Grid(origin_um=(0.0, 0.0), tile_um=112.0, shape=(60, 56))
    store.reset(grid, genes, "k", "cafe", "default", mpp)
    tiles = np.array([[10, 20], [10, 21], [30, 5]])
    store.add(tiles, np.arange(18, dtype=np.float32).reshape(3, 6), np.array([4, 4, 9]))
    get_state(viewer).set_code_name(4, "tumour")
    assert w.layer_list.item(0).text().startswith("\u2731 predicted tiles")
    for i in range(1, w.layer_list.count()):
        w.layer_list.item(i).setCheckState(w.layer_list.item(i).checkState().Unchecked)
    w.overwrite.setChecked(True)
    with qtbot.waitSignal(w.export().finished, timeout=30000):
        pass
    import anndata as ad

    a = ad.read_h5ad(out)
    assert list(a.obs_names) == ["tile_10_20", "tile_10_21", "tile_30_5"]
    np.testing.assert_allclose(a.obsm["spatial"], (tiles[:, ::-1] + 0.5) * 112.0 / mpp)
    assert list(a.obs["genst_code_name"]) == ["tumour", "tumour", "code 9"]
    assert a.uns["stgen"]["grid"]["tile_um"] == 112.0
    assert a.uns["spatial"][next(iter(a.uns["spatial"]))]["scalefactors"][
        "spot_diameter_fullres"
    ] == pytest.approx(112.0 / mpp)


def test_export_widget_store_with_other_points(viewer_with_layers, qtbot, tmp_path):
    """The store and the user's points ticked together: the store's rows as
    ``store_to_anndata`` writes them, then the points' rows in the same level-0 px; the
    Predict widget's own views of the store are not written twice."""
    import anndata as ad

    from napari_stgen.coords import Grid
    from napari_stgen.inference.export import store_to_anndata
    from napari_stgen.widgets.export import ExportWidget
    from napari_stgen.widgets.state import get_state

    viewer, df, genes, mpp, rois, tile = viewer_with_layers
    store = get_state(viewer).store
    store.reset(Grid((0.0, 0.0), 112.0, (60, 56)), genes[:4], "k", "cafe", "default", mpp)
    tiles = np.array([[10, 20], [10, 21], [30, 5]])
    store.add(tiles, np.arange(12, dtype=np.float32).reshape(3, 4), np.array([4, 4, 9]))
    view = viewer.add_points(
        store.centres_um, name="tiles view", metadata={"stgen": {"kind": "tiles"}}
    )
    w = ExportWidget(viewer)
    qtbot.addWidget(w)
    for i in range(w.layer_list.count()):
        w.layer_list.item(i).setCheckState(w.layer_list.item(i).checkState().Checked)
    out = tmp_path / "mixed.h5ad"
    w.path_edit.setText(str(out))
    with qtbot.waitSignal(w.export().finished, timeout=30000):
        pass
    a = ad.read_h5ad(out)
    n = len(tiles)
    assert a.n_obs == n + len(df)  # the tiles view adds no rows
    assert list(a.var_names) == genes  # the store's panel first, then the points' genes
    only = store_to_anndata(store)
    assert list(a.obs_names[:n]) == list(only.obs_names)
    np.testing.assert_allclose(a.obsm["spatial"][:n], only.obsm["spatial"])
    np.testing.assert_allclose(a.obsm["spatial"][n:], df[["x", "y"]].to_numpy(), atol=1e-6)
    np.testing.assert_allclose(a[n:, genes].X, np.log1p(df[genes].to_numpy(np.float32)))
    np.testing.assert_allclose(a[:n, genes[:4]].X, store.expr)
    assert np.isnan(a[:n, genes[4:]].X).all()
    assert list(a.obs["genst_code"][:n]) == [4, 4, 9] and (a.obs["genst_code"][n:] == -1).all()
    assert set(a.obs["layer"]) == {"predicted tiles", "measured spots"}
    assert view.name not in set(a.obs["layer"])
    assert a.uns["stgen"]["grid"]["tile_um"] == 112.0
    assert list(a.uns["stgen"]["rois"]["n_vertices"]) == [4, 3]


def test_closed_export_widget_does_not_break_predictions(make_napari_viewer, qtbot):
    """A closed (deleted) Export widget stops listening to the prediction store."""
    from qtpy.QtCore import QCoreApplication, QEvent

    from napari_stgen.coords import Grid
    from napari_stgen.widgets.export import ExportWidget
    from napari_stgen.widgets.state import get_state

    viewer = make_napari_viewer()
    w = ExportWidget(viewer)
    store = get_state(viewer).store
    store.reset(Grid((0.0, 0.0), 100.0, (4, 4)), ["A"], "k", "c", "m", 0.5)
    store.add(np.array([[0, 0]]), np.ones((1, 1), np.float32), np.array([1]))
    assert w.layer_list.count() == 1
    w.close()
    w.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    store.add(np.array([[1, 1]]), np.ones((1, 1), np.float32), np.array([2]))  # no error
    viewer.add_points(np.zeros((1, 2)))  # nor from layer events
    assert len(store) == 2


def test_widget_export_of_predictions_equals_stgen_predict_grid(
    make_napari_viewer, qtbot, sample_slide_path, tmp_path
):
    """Predict widget engine → store → Export widget gives the same file content as
    ``stgen predict --grid`` over the same region (same tiles, ids, values, positions)."""
    import anndata as ad
    import torch

    from napari_stgen.errors import CheckpointError
    from napari_stgen.inference import engine
    from napari_stgen.inference.batch import predict_slide
    from napari_stgen.widgets.export import ExportWidget
    from napari_stgen.widgets.state import get_state

    torch.set_num_threads(1)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(sample_slide_path), plugin="napari-stgen")
    state = get_state(viewer)
    slide = state.set_slide_layer(layer)
    try:
        pred = state.predictor("default")
    except CheckpointError as e:
        pytest.skip(f"default GenST checkpoint not available yet: {e}")
    region = (2000.0, 2000.0, 3000.0, 2900.0)
    grid, tiles = engine.plan_prediction_region(slide, pred, region)
    state.store.ensure(slide, pred, grid)
    for res in engine.predict_tiles(slide, pred, tiles, grid=grid):
        state.store.add_result(res)
    state.set_code_name(int(state.store.code[0]), "first code")

    w = ExportWidget(viewer)
    qtbot.addWidget(w)
    w.path_edit.setText(str(tmp_path / "widget.h5ad"))
    with qtbot.waitSignal(w.export().finished, timeout=60000):
        pass
    cli = predict_slide(
        sample_slide_path, tmp_path / "cli.h5ad", grid=True, region_um=region, predictor=pred
    )
    a, b = ad.read_h5ad(tmp_path / "widget.h5ad"), ad.read_h5ad(cli)
    order = b.obs_names.get_indexer(a.obs_names)  # same tiles, maybe another order
    assert (order >= 0).all()
    b = b[order]
    assert a.n_obs == len(tiles) == b.n_obs
    np.testing.assert_allclose(a.X, b.X, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.obsm["spatial"], b.obsm["spatial"])
    np.testing.assert_array_equal(a.obs["genst_code"], b.obs["genst_code"])
    assert a.uns["stgen"]["model"]["checksum"] == b.uns["stgen"]["model"]["checksum"]
    assert float(a.uns["stgen"]["grid"]["tile_um"]) == float(b.uns["stgen"]["grid"]["tile_um"])
    assert "first code" in set(a.obs["genst_code_name"])
    la = [ly for ly in viewer.layers]  # the widget left the viewer untouched
    assert la == [layer]


def test_export_widget_spatialdata(viewer_with_layers, qtbot, tmp_path):
    """Format 'SpatialData' writes a .zarr: slide image, spot circles, ROIs, generated tile and
    the same table as the h5ad; it reopens in the same places."""
    sd = pytest.importorskip("spatialdata")
    from napari_stgen.widgets.export import ExportWidget

    viewer, df, genes, mpp, rois, tile = viewer_with_layers
    w = ExportWidget(viewer)
    qtbot.addWidget(w)
    w.path_edit.setText(str(tmp_path / "widget.h5ad"))
    w.format.setCurrentText("SpatialData")
    assert w.path_edit.text().endswith("widget.zarr")  # the suffix follows the format
    with qtbot.waitSignal(w.export().finished, timeout=60000):
        pass
    out = tmp_path / "widget.zarr"
    assert "exported" in w.status.text(), w.status.text()
    s = sd.read_zarr(out)
    assert set(s.images) == {"her2st_C3_image", f"generated_{tile.id}"}
    assert set(s.shapes) == {"her2st_C3_spots", "rois"}
    t = s.tables["table"]
    assert list(t.obs_names) == df["barcode"].astype(str).tolist()
    np.testing.assert_allclose(t[:, genes].X, np.log1p(df[genes].to_numpy(np.float32)))
    shp = s["her2st_C3_spots"]
    xy = np.c_[shp.geometry.x, shp.geometry.y][shp.index.get_indexer(t.obs["instance_id"])]
    np.testing.assert_allclose(xy, (df[["x", "y"]].to_numpy() + 0.5) * mpp, atol=1e-6)
    np.testing.assert_allclose(shp["radius"], 50.0)
    # the generated tile covers its µm square; the ROIs their vertices
    ext = sd.get_extent(s[f"generated_{tile.id}"], coordinate_system="global")
    y0, x0 = tile.origin_yx_um
    assert ext["x"] == pytest.approx((x0 + mpp / 2, x0 + mpp / 2 + 32 * tile.px_um))
    assert ext["y"] == pytest.approx((y0 + mpp / 2, y0 + mpp / 2 + 32 * tile.px_um))
    b = s["rois"].geometry.bounds.to_numpy()
    np.testing.assert_allclose(
        b[0], [2000 + mpp / 2, 1000 + mpp / 2, 3000 + mpp / 2, 2500 + mpp / 2]
    )
    # reopened: spots, ROIs and the tile where they were
    v2_layers = viewer.open(str(out), plugin="napari-stgen")
    pts = next(ly for ly in v2_layers if type(ly).__name__ == "Points")
    np.testing.assert_allclose(pts.data, viewer.layers["measured spots"].data, atol=1e-6)
    gen = next(ly for ly in v2_layers if generated_record(ly.metadata))
    assert generated_record(gen.metadata)["seed"] == 7
    np.testing.assert_allclose(gen.translate, viewer.layers[f"generated {tile.id}"].translate)
    np.testing.assert_array_equal(gen.data, tile.image)
    shapes = next(ly for ly in v2_layers if type(ly).__name__ == "Shapes")
    for a, r in zip(shapes.data, rois, strict=True):
        np.testing.assert_allclose(a, r)


def test_export_list_follows_renames_and_ticks_are_stable(viewer_with_layers, qtbot):
    """A renamed layer is listed by its new name; the measured spots are unticked (their
    genes outside the panel would be NaN on the tiles) whatever the order of events
    (prediction store before or after the widget); the user's ticks stay."""
    from napari_stgen.coords import Grid
    from napari_stgen.widgets.export import ExportWidget
    from napari_stgen.widgets.state import get_state

    viewer, df, genes, mpp, rois, tile = viewer_with_layers
    viewer.layers["measured spots"].metadata["stgen"] = {"kind": "spots", "source": "measured"}
    w = ExportWidget(viewer)
    qtbot.addWidget(w)

    def ticks() -> dict:
        items = [w.layer_list.item(i) for i in range(w.layer_list.count())]
        return {it.text(): it.checkState() == it.checkState().Checked for it in items}

    before = ticks()
    assert before["measured spots"] is False and before["ROIs"] is True
    viewer.layers[f"generated {tile.id}"].name = "kept tile"
    assert "kept tile" in ticks() and f"generated {tile.id}" not in ticks()
    # a prediction store appearing later does not tick measured spots
    store = get_state(viewer).store
    store.reset(Grid((0.0, 0.0), 112.0, (60, 56)), genes, "k", "cafe", "default", mpp)
    store.add(np.array([[1, 1]]), np.ones((1, 6), np.float32), np.array([0]))
    assert not ticks()["measured spots"] and ticks()[next(iter(ticks()))]  # store ticked
    w2 = ExportWidget(viewer)  # opened after the store: the same defaults
    qtbot.addWidget(w2)
    assert {k: v for k, v in ticks().items()} == {
        w2.layer_list.item(i).text(): w2.layer_list.item(i).checkState()
        == w2.layer_list.item(i).checkState().Checked
        for i in range(w2.layer_list.count())
    }
    # the user's untick survives refreshes and renames
    row = next(i for i in range(w.layer_list.count()) if w.layer_list.item(i).text() == "ROIs")
    w.layer_list.item(row).setCheckState(w.layer_list.item(row).checkState().Unchecked)
    viewer.layers["ROIs"].name = "tumour ROIs"
    viewer.add_points(np.zeros((1, 2)), name="another")
    assert ticks()["tumour ROIs"] is False and ticks()["another"] is True
