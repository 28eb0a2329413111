"""Predict widget with the HistoTx model and measured spots from an .h5ad, on the sample slide."""

from __future__ import annotations

import numpy as np
import pytest

from napari_stgen.io.layer_meta import layer_kind

pytest.importorskip("napari")

TIMEOUT = 120_000  # ms


@pytest.fixture
def measured_h5ad(her2st_c3_dir, tmp_path):
    """Half of C3's spots (raw counts, level-0 px of the sample slide, which is C3)."""
    import anndata

    from napari_stgen.io.her2st import read_her2st_section

    sec = read_her2st_section(her2st_c3_dir, "C3")
    idx = np.arange(0, sec.n_spots, 2)
    a = anndata.AnnData(X=sec.counts[idx])
    a.var_names = sec.genes
    a.obs_names = [sec.barcodes[i] for i in idx]
    a.obsm["spatial"] = sec.xy_px[idx]
    a.uns["spatial"] = {
        "C3": {
            "scalefactors": {"microns_per_pixel": sec.mpp, "spot_diameter_fullres": 100 / sec.mpp}
        }
    }
    p = tmp_path / "C3_measured.h5ad"
    a.write_h5ad(p)
    return p


def test_widget_uses_measured_spots_layer(
    make_napari_viewer, qtbot, sample_slide_path, measured_h5ad, monkeypatch
):
    import torch

    from napari_stgen.inference import engine, histotx
    from napari_stgen.models.checkpoint import WEIGHTS_DIR

    torch.set_num_threads(1)
    monkeypatch.setattr(histotx, "DEFAULT_ADAPT_STEPS", 20)  # keep the test short
    ckpt = WEIGHTS_DIR / "histotx_default.safetensors"
    if not ckpt.is_file():
        pytest.skip("no shipped HistoTx checkpoint (weights/histotx_default.safetensors)")
    viewer = make_napari_viewer()
    viewer.open(str(sample_slide_path), plugin="napari-stgen")
    n_before = len(viewer.layers)
    viewer.open(str(measured_h5ad), plugin="napari-stgen")
    spots = [
        ly for ly in list(viewer.layers)[n_before:] if layer_kind(ly.metadata) == "spots"
    ]
    assert spots, "the .h5ad opens as a spots (Points) layer"
    _dock, w = viewer.window.add_plugin_dock_widget("napari-stgen", "Predict expression")
    if not hasattr(w, "measured_combo"):
        pytest.skip("Predict widget has no measured-spots picker yet (HistoTx integration pending)")
    qtbot.waitUntil(lambda: not w.workers, timeout=TIMEOUT)
    i = w.model_combo.findData(str(ckpt))
    assert i >= 0, "the HistoTx checkpoint is offered in the model list"
    w.model_combo.setCurrentIndex(i)
    qtbot.waitUntil(lambda: not w.workers and w.measured_combo.isEnabled(), timeout=TIMEOUT)
    w.measured_combo.setCurrentText(spots[0].name)
    pred = w.state.predictor()
    assert pred.kind == "histotx"

    slide = w.state.set_slide_layer(viewer.layers[0])
    meas = histotx.measured_from_anndata(str(measured_h5ad), pred.genes)
    x, y = meas.xy_px[len(meas.xy_px) // 2] * slide.mpp
    region = (x - 250, y - 250, x + 250, y + 250)
    w.mode_combo.setCurrentText("Visible region")
    w.visible_region_um = lambda: region  # look at a fixed region around measured spots
    gene = w.genes[0]
    w.predict()
    qtbot.waitUntil(lambda: not w.workers, timeout=TIMEOUT)
    layer = viewer.layers[f"{gene} (predicted)"]
    grid, tiles = engine.plan_prediction_region(slide, pred, region)
    assert len(tiles) >= 4
    fused = layer.data[tiles[:, 0], tiles[:, 1]].copy()
    assert np.isfinite(fused).all()

    # equal to the library call with the same measured spots
    ctx = histotx.cached_context(slide, pred, meas)
    lib = engine.collect(histotx.predict_histotx_tiles(slide, pred, tiles, grid=grid, context=ctx))
    gi = pred.genes.index(gene)
    order = {tuple(t): k for k, t in enumerate(lib.tiles)}
    want = lib.expr[[order[tuple(t)] for t in tiles], gi]
    np.testing.assert_allclose(fused, want, rtol=1e-4, atol=1e-4)

    # with measured spots HistoTx says how sure it is: their spread around each tile
    from napari_stgen.inference.measured import measured_spread
    from napari_stgen.widgets import layers as L

    assert w.uncertainty_check.isEnabled()
    w.uncertainty_check.setChecked(True)
    ulayer = viewer.layers[L.UNCERTAINTY_LAYER]
    shown = ulayer.data[tiles[:, 0], tiles[:, 1]]
    y_std = pred.model.y_std.detach().cpu().numpy()
    from napari_stgen.inference.tiles import tile_centres_um

    yx = tile_centres_um(grid, tiles)
    spread = measured_spread(ctx.xy_um, meas.expr, yx[:, ::-1], y_std, meas.present)
    np.testing.assert_allclose(shown, spread, rtol=1e-4, atol=1e-5)
    assert np.ptp(spread) > 0 and ulayer.visible
    want_u = lib.uncertainty[[order[tuple(t)] for t in tiles]]
    np.testing.assert_allclose(shown, want_u, rtol=1e-4, atol=1e-5)

    # "image only" gives the image-only prediction, which differs, and no uncertainty
    w.image_only_check.setChecked(True)
    w.predict()
    qtbot.waitUntil(lambda: not w.workers, timeout=TIMEOUT)
    alone = layer.data[tiles[:, 0], tiles[:, 1]]
    assert np.isfinite(alone).all() and not np.allclose(alone, fused)
    assert not w.state.store.has_uncertainty and not ulayer.visible
    assert "only with measured spots" in w.uncertainty_check.toolTip()
