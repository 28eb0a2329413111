"""Predict expression widget, driven through napari with the real sample and default model."""

from __future__ import annotations

import numpy as np
import pytest

from napari_stgen.inference import engine
from napari_stgen.inference.patches import read_patches

pytest.importorskip("napari")

TIMEOUT = 60_000  # ms


@pytest.fixture
def ui(make_napari_viewer, sample_slide_path, qtbot):
    import torch

    torch.set_num_threads(1)
    viewer = make_napari_viewer()
    viewer.open(str(sample_slide_path), plugin="napari-stgen")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-stgen", "Predict expression")
    qtbot.waitUntil(lambda: not widget.workers, timeout=TIMEOUT)  # model loaded off-thread
    assert widget.genes, "a default gene is preselected once the model is loaded"
    return viewer, widget


def _look_at_tissue(viewer, widget, n_cells: float):
    """Centre the camera on the tissue with about n_cells model tiles across the canvas."""
    from napari_stgen.widgets.predict import camera_of

    st = widget.state
    slide = st.set_slide_layer(viewer.layers[0])
    pred = st.predictor()
    grid, tissue = engine.plan_whole_slide(slide, pred)
    cy, cx = np.median(tissue, axis=0) * grid.tile_um
    cam = camera_of(viewer)
    cam.center = (cy, cx)
    cam.zoom = max(viewer.canvas.size) / (n_cells * grid.tile_um)
    return slide, pred, grid


def _wait_idle(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.workers, timeout=TIMEOUT)


def test_visible_region_heatmap_aligned_and_equal_to_library(ui, qtbot):
    viewer, widget = ui
    slide, pred, grid = _look_at_tissue(viewer, widget, 6)
    region = widget.visible_region_um()
    gene = widget.genes[0]
    widget.predict()
    _wait_idle(qtbot, widget)

    layer = viewer.layers[f"{gene} (predicted)"]
    assert tuple(layer.scale) == (grid.tile_um, grid.tile_um)
    assert np.allclose(layer.translate, grid.translate)
    assert layer.data.shape == grid.shape  # one slide-wide canvas, not a layer per view
    rows, cols = np.nonzero(np.isfinite(layer.data))
    _, planned = engine.plan_prediction_region(slide, pred, region)
    assert {(r, c) for r, c in zip(rows, cols, strict=True)} == {tuple(t) for t in planned}
    assert len(planned) >= 10
    # pixel (r, c) of the heatmap sits over the tile's world centre...
    centres = np.asarray([layer.data_to_world((r, c)) for r, c in zip(rows, cols, strict=True)])
    np.testing.assert_allclose(centres, (np.stack([rows, cols], 1) + 0.5) * grid.tile_um)
    # ...which is the slide pixel the model read around (level-0 px = µm / mpp)
    slide_px = np.asarray([viewer.layers[0].world_to_data(c) for c in centres[:3]])
    np.testing.assert_allclose(slide_px, centres[:3] / slide.mpp, atol=1e-6)
    # values equal a direct library call on those tile centres: tile by tile, then each tile
    # in its window of the request's tiles (spatial context head of the default model)
    tok = pred.predict(
        read_patches(slide, centres[:, ::-1] / slide.mpp, pred.patch_um, pred.patch_px),
        tokens=True,
    )
    cells = np.stack([rows, cols], 1)
    direct = pred.predict_in_context(
        tok.feat, tok.zhat, centres[:, ::-1], cells=cells, tile_um=grid.tile_um
    )
    if pred.has_context:
        assert "spatial context applied" in widget.status_label.text()
        assert not np.allclose(direct.expr, tok.expr, atol=1e-3)
    gi = pred.genes.index(gene)
    np.testing.assert_allclose(layer.data[rows, cols], direct.expr[:, gi], rtol=1e-4, atol=1e-4)
    # contrast limits from robust percentiles of the predicted values
    lo, hi = np.percentile(direct.expr[:, gi], [1, 99])
    np.testing.assert_allclose(layer.contrast_limits, (lo, hi), rtol=1e-5, atol=1e-6)
    # hover values: the tiles Points layer carries every gene and the code
    pts = viewer.layers["stgen tiles"]
    assert set(pred.genes) <= set(pts.features.columns) and "genst_code" in pts.features
    assert len(pts.data) == len(planned)
    # the store that Codebook/Export read holds the same predictions
    store = widget.state.store
    assert len(store) == len(planned)

    # panning accumulates into the same layer (one more cell column to the right)
    from napari_stgen.widgets.predict import camera_of

    cam = camera_of(viewer)
    cam.center = (cam.center[-2], cam.center[-1] + 3 * grid.tile_um)
    widget.predict()
    _wait_idle(qtbot, widget)
    assert len([ly for ly in viewer.layers if ly.name.startswith(gene)]) == 1
    assert np.isfinite(layer.data).sum() > len(planned)


def test_second_gene_and_spot_display(ui, qtbot):
    viewer, widget = ui
    _look_at_tissue(viewer, widget, 4)
    pred = widget.state.predictor()
    other = next(g for g in pred.genes if g not in widget.genes)
    assert widget.add_gene(other.lower())  # completion is case-insensitive
    assert not widget.add_gene("NOT_A_GENE_XYZ")
    widget.display_combo.setCurrentText("Spot circles")
    widget.predict()
    _wait_idle(qtbot, widget)
    spots = viewer.layers[f"{other} (predicted spots)"]
    gi = pred.genes.index(other)
    np.testing.assert_allclose(spots.features[other], widget.state.store.expr[:, gi])
    np.testing.assert_allclose(spots.data, widget.state.store.centres_um)


def test_roi_mode_predicts_only_inside_roi(ui, qtbot):
    viewer, widget = ui
    slide, pred, grid = _look_at_tissue(viewer, widget, 12)
    x0, y0, x1, y1 = widget.visible_region_um()
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    s = 2.2 * grid.tile_um
    tri = np.array([[cy - s, cx - s], [cy - s, cx + s], [cy + s, cx]])
    viewer.add_shapes([tri], shape_type="polygon", name="roi")
    widget.mode_combo.setCurrentText("ROI layer")
    widget.roi_combo.setCurrentText("roi")
    widget.predict()
    _wait_idle(qtbot, widget)

    from matplotlib.path import Path as MplPath

    from napari_stgen.inference.tiles import tissue_cells

    all_cells = np.argwhere(np.ones(grid.shape, bool))
    inside = MplPath(tri).contains_points((all_cells + 0.5) * grid.tile_um)
    tissue = tissue_cells(slide, grid)[all_cells[:, 0], all_cells[:, 1]]
    want = {tuple(t) for t in all_cells[inside & tissue]}
    got = {tuple(t) for t in widget.state.store.tiles}
    assert got == want and len(want) >= 4
    layer = viewer.layers[f"{widget.genes[0]} (predicted)"]
    assert np.isfinite(layer.data).sum() == len(want)
    # without the tissue filter: every cell whose centre is inside, nothing outside
    widget.tissue_check.setChecked(False)
    widget.predict()
    _wait_idle(qtbot, widget)
    got = {tuple(t) for t in widget.state.store.tiles}
    assert got == {tuple(t) for t in all_cells[inside]}


def test_newer_request_cancels_older(ui, qtbot):
    viewer, widget = ui
    _look_at_tissue(viewer, widget, 40)  # hundreds of tiles: still running when cancelled
    widget.batch_size = 8
    first = widget.predict()
    token1 = widget._token
    _look_at_tissue(viewer, widget, 3)
    second = widget.predict()
    assert token1.cancelled and widget._token is not token1
    done = []
    first.finished.connect(lambda: done.append(1))
    _wait_idle(qtbot, widget)
    assert second is not first
    store = widget.state.store
    _, planned_big = engine.plan_prediction_region(
        widget.state.slide, widget.state.predictor(), (0, 0, 1e9, 1e9)
    )
    assert len(store) < len(planned_big) // 2, "the cancelled run stopped early"
    _, small = engine.plan_prediction_region(
        widget.state.slide, widget.state.predictor(), widget.visible_region_um()
    )
    assert {tuple(t) for t in small} <= {tuple(t) for t in store.tiles}


def test_closing_viewer_stops_workers(ui, qtbot):
    from qtpy.QtCore import QThreadPool

    viewer, widget = ui
    _look_at_tissue(viewer, widget, 40)
    widget.batch_size = 8
    worker = widget.predict()
    token = widget._token
    qtbot.waitUntil(lambda: worker.is_running, timeout=TIMEOUT)
    viewer.close()
    assert token.cancelled
    qtbot.waitUntil(lambda: QThreadPool.globalInstance().activeThreadCount() == 0, timeout=TIMEOUT)
    assert not worker.is_running


def test_whole_slide_estimate_before_start(ui, qtbot):
    viewer, widget = ui
    widget.mode_combo.setCurrentText("Whole slide")
    widget.predict()  # first press: estimate only
    qtbot.waitUntil(lambda: widget._pending_estimate is not None, timeout=TIMEOUT)
    est = widget._pending_estimate
    _, tissue = engine.plan_whole_slide(widget.state.slide, widget.state.predictor())
    assert est.tiles == len(tissue) and est.seconds > 0
    assert "Confirm" in widget.predict_btn.text()
    assert len(widget.state.store) == 0  # nothing predicted before confirmation
