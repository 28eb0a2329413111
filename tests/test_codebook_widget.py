"""Codebook explorer, driven through napari after a prediction with the Predict widget."""

from __future__ import annotations

import numpy as np
import pytest

from napari_stgen.inference import codebook as cb
from napari_stgen.inference import engine

pytest.importorskip("napari")
TIMEOUT = 60_000


def test_codebook_after_prediction_and_names_in_export(
    make_napari_viewer, sample_slide_path, qtbot, tmp_path
):
    import anndata as ad
    import torch

    from napari_stgen.widgets.predict import camera_of

    torch.set_num_threads(1)
    viewer = make_napari_viewer()
    viewer.open(str(sample_slide_path), plugin="napari-stgen")
    _d, pw = viewer.window.add_plugin_dock_widget("napari-stgen", "Predict expression")
    qtbot.waitUntil(lambda: not pw.workers, timeout=TIMEOUT)
    st = pw.state
    slide = st.set_slide_layer(viewer.layers[0])
    pred = st.predictor()
    grid, tissue = engine.plan_whole_slide(slide, pred)
    cam = camera_of(viewer)
    cam.center = tuple(np.median(tissue, axis=0) * grid.tile_um)
    cam.zoom = max(viewer.canvas.size) / (5 * grid.tile_um)
    pw.predict()
    qtbot.waitUntil(lambda: not pw.workers, timeout=TIMEOUT)
    n = len(st.store)
    assert n >= 10

    _d2, w = viewer.window.add_plugin_dock_widget("napari-stgen", "Codebook")
    qtbot.waitUntil(lambda: "GenST codes" in viewer.layers and not w.workers, timeout=TIMEOUT)
    layer = viewer.layers["GenST codes"]
    assert tuple(layer.scale) == grid.scale and np.allclose(layer.translate, grid.translate)
    # same codes as the library on the same tiles (direct engine run, no cache)
    direct = engine.collect(engine.predict_tiles(slide, pred, st.store.tiles, grid=grid))
    # the label is the code itself (background -1): hovering a tile reads its code
    np.testing.assert_array_equal(layer.data, cb.code_map(grid, direct.tiles, direct.code) - 1)
    np.testing.assert_array_equal(w.usage(), cb.usage_counts(direct.code, pred.n_codes))

    # select a code: its gene profile's top gene matches the library computation
    k = int(np.bincount(direct.code).argmax())
    w.select_code(k)
    prof = pred.code_profiles()
    top = pred.genes[int(np.argmax(prof[k] - direct.expr.mean(0)))]
    assert w.current_summary.up[0][0] == top
    ax = w.gene_fig.axes[0]
    assert top in [t.get_text() for t in ax.get_yticklabels()]
    assert layer.selected_label == k and layer.show_selected_label
    qtbot.waitUntil(lambda: w.thumbnails is not None, timeout=TIMEOUT)
    assert w.thumbnails.shape[0] == min(8, int((direct.code == k).sum()))
    # clicking a tile of another code on the slide selects that code
    other = int(direct.code[direct.code != k][0]) if (direct.code != k).any() else k
    layer.selected_label = other
    assert w.selected == other

    # names travel with exports (through the Export widget)
    w.name_code(k, "tumour epithelium")
    assert st.code_names == {k: "tumour epithelium"}
    _d3, ew = viewer.window.add_plugin_dock_widget("napari-stgen", "Export to h5ad")
    out = tmp_path / "pred.h5ad"
    ew.path_edit.setText(str(out))
    worker = ew.export()
    assert worker is not None
    qtbot.waitUntil(lambda: out.exists(), timeout=TIMEOUT)
    qtbot.waitUntil(lambda: not worker.is_running, timeout=TIMEOUT)
    a = ad.read_h5ad(out)
    names = a.uns["stgen"]["code_names"]
    assert dict(zip(np.asarray(names["code"]).tolist(), list(names["name"]), strict=True)) == {
        k: "tumour epithelium"
    }
    assert "tumour epithelium" in set(a.obs["genst_code_name"].astype(str))

    # a code's suggested region name, from the card's pathology table, labelled as a suggestion
    from qtpy.QtCore import Qt

    assert w.suggestion_source == "pathologist regions of HER2ST A1, B1, C1, D1, E1, F1"
    shown = [int(c) for c in np.unique(direct.code)]
    with_sug = [c for c in shown if c in w.suggestions]
    assert with_sug, "no code on the view has a suggested name"
    j = with_sug[0]
    w.select_code(j)
    assert w.suggest_label.text().startswith("Suggested name: " + w.suggestions[j].label)
    assert "base rate" in w.suggest_label.text() and w.suggest_btn.isEnabled()
    qtbot.mouseClick(w.suggest_btn, Qt.MouseButton.LeftButton)
    assert st.code_names[j] == w.suggestions[j].label == w.name_edit.text()
    without = [c for c in range(pred.n_codes) if c not in w.suggestions]
    w.select_code(without[0])
    assert w.suggest_label.text().startswith("No suggested name") and not w.suggest_btn.isEnabled()
