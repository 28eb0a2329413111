"""Per-tile uncertainty from the model to the user: `stgen predict` writes it to the h5ad, the
Predict widget shows it as its own layer, aligned with the heatmap, with the CLI's values.
The shipped GenST (it carries the confidence bank a tiny model lacks) on the bundled sample."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
import test_predict_cli  # noqa: E402
from test_predict_widget import _look_at_tissue  # noqa: E402

TIMEOUT = 120_000  # ms
genst_model = test_predict_cli.genst_model  # the shipped-model fixture


def _cli_grid(slide_path, region, out, model):
    import anndata as ad

    from napari_stgen.cli.main import main

    rc = main(["predict", str(slide_path), "--out", str(out), "--grid", "--model", model,
               "--region", *(str(v) for v in region), "--device", "cpu"])  # fmt: skip
    assert rc == 0
    return ad.read_h5ad(out)


def test_widget_layer_matches_cli(
    make_napari_viewer, qtbot, sample_slide_path, genst_model, tmp_path
):
    import torch

    from napari_stgen.widgets import layers as L

    torch.set_num_threads(1)
    viewer = make_napari_viewer()
    viewer.open(str(sample_slide_path), plugin="napari-stgen")
    _d, w = viewer.window.add_plugin_dock_widget("napari-stgen", "Predict expression")
    qtbot.waitUntil(lambda: not w.workers, timeout=TIMEOUT)
    assert w.uncertainty_check.isEnabled() and not w.uncertainty_check.isChecked()
    st = w.state
    _slide, pred, _grid = _look_at_tissue(viewer, w, 4)
    region = w.visible_region_um()
    w.uncertainty_check.setChecked(True)
    w.predict()
    qtbot.waitUntil(lambda: not w.workers, timeout=TIMEOUT)

    heat = viewer.layers[L.heatmap_name(w.genes[0])]
    unc = viewer.layers[L.UNCERTAINTY_LAYER]
    assert unc.visible and unc.colormap.name != heat.colormap.name
    assert tuple(unc.scale) == tuple(heat.scale) and np.allclose(unc.translate, heat.translate)
    have = np.isfinite(heat.data)
    assert have.sum() > 4
    np.testing.assert_array_equal(np.isfinite(unc.data), have)  # every heatmap tile, no other
    w.uncertainty_check.setChecked(False)
    assert not unc.visible

    # the CLI on the same region: the same tiles, the same uncertainty
    a = _cli_grid(sample_slide_path, region, tmp_path / "grid.h5ad", genst_model)
    u = a.obs["uncertainty"].to_numpy()
    assert np.isfinite(u).all() and u.std() > 0
    info = a.uns["stgen"]["uncertainty"]
    assert "entropy" in str(info["definition"]) and float(info["spearman_vs_abs_error"]) > 0.3
    rows, cols = a.obs["grid_row"].to_numpy(), a.obs["grid_col"].to_numpy()
    assert set(zip(rows, cols, strict=True)) == set(zip(*np.nonzero(have), strict=True))
    np.testing.assert_allclose(unc.data[rows, cols], u, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(st.store.uncertainty[st.store.rows_of(np.c_[rows, cols])], u,
                               rtol=1e-4, atol=1e-4)  # fmt: skip

    # the widget's export: the same column and description
    from napari_stgen.inference.export import store_to_anndata

    b = store_to_anndata(st.store, model=pred)
    np.testing.assert_allclose(b[a.obs_names].obs["uncertainty"].to_numpy(), u, atol=1e-4)
    assert b.uns["stgen"]["uncertainty"]["definition"] == info["definition"]
