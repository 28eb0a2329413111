"""One real napari session driven like a user, across all four widgets (issue 14).

open the sample → Predict the visible region (and again, fully cached) → ROI from shapes and
from painted labels → Codebook (select a code, name it) → Synthesize (draw a region, move
ERBB2, Generate, Before/After, Keep) → Predict again with the kept tile on top → Follow the
view while panning → Export → reopen the export → close the viewer.

Each step asserts its result (layers, finite values, µm positions), no error notification is
raised anywhere, and no worker thread outlives the viewer. Models: the shipped GenST and
STMDiT (4 sampler steps, so the whole journey takes about a minute on 2 cores); figures of the
same journey with full settings are in ``benchmarks/bench_journey.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_stgen.inference import engine

pytest.importorskip("napari")

TIMEOUT = 120_000  # ms
STEPS = 4
SCREEN = (1280, 800)


# ----------------------------------------------------------------------------- library
def test_progressive_prediction_drafts_then_full_values(sample_slide_path):
    """A progressive request yields a no-TTA draft of every tile first, then the full values
    (identical to a plain request), and ``collect`` drops the drafts."""
    from napari_stgen.inference.predictor import load_genst
    from napari_stgen.io.slide import open_slide

    pred = load_genst("default", device="cpu")
    assert pred.tta > 1
    with open_slide(sample_slide_path) as slide:
        grid, tissue = engine.plan_whole_slide(slide, pred)
        tiles = tissue[:: max(1, len(tissue) // 20)][:20]
        parts = list(engine.predict_tiles(slide, pred, tiles, grid=grid, progressive=True))
        plain = engine.collect(engine.predict_tiles(slide, pred, tiles, grid=grid))
    drafts = [p for p in parts if p.draft]
    assert drafts and parts[0].draft, "the first results are the fast pass"
    n_draft = sum(len(p) for p in drafts)
    assert n_draft == len(tiles) and drafts[-1].done == len(tiles)
    first_full = next(i for i, p in enumerate(parts) if not p.draft)
    assert all(p.draft for p in parts[:first_full]), "every draft comes before the full pass"
    # the draft is the model without test-time augmentation, tile by tile
    from napari_stgen.inference.tiles import read_tiles

    with open_slide(sample_slide_path) as slide:
        patches = read_tiles(slide, grid, np.concatenate([p.tiles for p in drafts]),
                             pred.patch_px, pred.patch_um)  # fmt: skip
    np.testing.assert_allclose(
        np.concatenate([p.expr for p in drafts]), pred.predict(patches, tta=1).expr, atol=1e-4
    )
    full = engine.collect(iter(parts))
    order = {tuple(t): i for i, t in enumerate(plain.tiles)}
    idx = [order[tuple(t)] for t in full.tiles]
    np.testing.assert_allclose(full.expr, plain.expr[idx], atol=1e-4)
    assert not np.allclose(np.concatenate([p.expr for p in drafts]).mean(0), full.expr.mean(0))


def test_thread_policy_leaves_a_core():
    import torch

    from napari_stgen.inference import device

    cores = device.usable_cores()
    assert device.default_threads() == max(1, cores - 1)
    before = torch.get_num_threads()
    try:
        assert device.set_threads(None) == max(1, cores - 1) == torch.get_num_threads()
        assert device.set_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- helpers
class Errors:
    """Every error notification raised during the session."""

    def __init__(self) -> None:
        from napari.utils.notifications import notification_manager

        self.seen: list[str] = []
        self._mgr = notification_manager
        self._mgr.notification_ready.connect(self._on)

    def _on(self, event) -> None:
        from napari.utils.notifications import NotificationSeverity

        n = getattr(event, "value", event)
        if n.severity >= NotificationSeverity.ERROR:
            self.seen.append(str(n.message))

    def close(self) -> None:
        self._mgr.notification_ready.disconnect(self._on)


def _idle(qtbot, *widgets) -> None:
    qtbot.waitUntil(lambda: not any(w.workers for w in widgets), timeout=TIMEOUT)


def _look_at(viewer, centre_yx, width_um) -> None:
    from napari_stgen.widgets.predict import camera_of

    cam = camera_of(viewer)
    cam.center = tuple(float(v) for v in centre_yx)
    cam.zoom = max(viewer.canvas.size) / width_um


def _reachable(button, window) -> bool:
    """The button is shown and lies inside the main window (not scrolled or pushed off it)."""
    from qtpy.QtCore import QPoint, QRect

    if not button.isVisible() or button.visibleRegion().isEmpty():
        return False
    tl = button.mapTo(window, QPoint(0, 0))
    return QRect(QPoint(0, 0), window.size()).contains(QRect(tl, button.size()))


def _labels_overlap(fig) -> bool:
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in fig.axes[0].get_yticklabels() if t.get_text()]
    return any(a.overlaps(b) for a, b in zip(boxes[:-1], boxes[1:], strict=True))


# ----------------------------------------------------------------------------- the journey
def test_user_journey_across_the_four_widgets(make_napari_viewer, qtbot, tmp_path):
    from qtpy.QtCore import QThreadPool

    from napari_stgen.widgets import layers as L
    from napari_stgen.widgets.codebook import CODES_LAYER
    from napari_stgen.widgets.state import find_slide_layer
    from napari_stgen.widgets.synthesize import NO_REGION

    errors = Errors()
    viewer = make_napari_viewer(show=True)
    win = viewer.window._qt_window.window() if hasattr(viewer.window, "_qt_window") else None
    # 1. open the sample (File ▸ Open Sample): the slide and its measured spots
    viewer.open_sample("napari-stgen", "her2st_c3")
    slide_layer = viewer.layers["HER2ST C3"]
    spots = viewer.layers["HER2ST C3 spots"]

    # 2. dock all four widgets on a 1280 × 800 screen: the window stays on screen and the
    # primary buttons are reachable
    docks = {}
    for name in ("Predict expression", "Codebook", "Synthesize", "Export to h5ad"):
        _d, w = viewer.window.add_plugin_dock_widget("napari-stgen", name)
        docks[name] = w
    pw, cw, sw, ew = docks.values()
    win = pw.window()
    win.resize(*SCREEN)
    qtbot.wait(300)
    assert win.minimumSizeHint().height() <= SCREEN[1]
    assert win.height() <= SCREEN[1], f"window grew to {win.height()} px"
    for btn in (pw.predict_btn, sw.generate_btn, sw.keep_btn, ew.export_btn):
        assert _reachable(btn, win), btn.text()
    # every widget names the slide it works on; nothing loads by itself in Synthesize
    for w in (pw, cw, sw):
        assert w.slide_picker.currentText() == "HER2ST C3"
    assert sw.region_combo.currentText() == NO_REGION and sw.region_layer is None
    _idle(qtbot, pw, cw, sw)
    assert sw.model is None, "the generator is not loaded before the user asks for it"
    st = pw.state
    assert st.slide_layer is slide_layer

    # 3. Predict the visible region
    pred = st.predictor()
    grid, tissue = engine.plan_whole_slide(st.slide, pred)
    centre = np.median(tissue, axis=0) * grid.tile_um
    _look_at(viewer, centre, 8 * grid.tile_um)
    gene = pw.genes[0]
    pw.predict()
    _idle(qtbot, pw)
    heat = viewer.layers[L.heatmap_name(gene)]
    vals = heat.data[np.isfinite(heat.data)]
    assert vals.size >= 10 and np.isfinite(vals).all()
    assert heat.colorbar.visible and heat.name_overlay.visible  # gene and scale on canvas
    tiles_layer = viewer.layers[L.TILES_LAYER]
    assert tiles_layer.border_width.max() == 0 if np.ndim(tiles_layer.border_width) else True
    assert len(pw.progress) == 0, "progress bar closed"
    n_first = len(st.store)
    np.testing.assert_allclose(st.store.centres_um, (st.store.tiles + 0.5) * grid.tile_um
                               + np.asarray(grid.origin_um))  # fmt: skip
    # again, fully cached: the bar (and the activity spinner) must not stay on
    pw.predict()
    _idle(qtbot, pw)
    assert len(pw.progress) == 0 and "from cache" in pw.status_label.text()

    # 4. ROI from a polygon, then from painted labels
    s = 2.5 * grid.tile_um
    cy, cx = centre + np.array([0.0, 6 * grid.tile_um])
    viewer.add_shapes([np.array([[cy - s, cx - s], [cy - s, cx + s], [cy + s, cx]])],
                      shape_type="polygon", name="roi", units="um")  # fmt: skip
    pw.mode_combo.setCurrentText("ROI layer")
    pw.roi_combo.setCurrentText("roi")
    pw.predict()
    _idle(qtbot, pw)
    assert len(st.store) > n_first
    n_roi = len(st.store)
    lab = viewer.add_labels(np.zeros((60, 60), np.int32), name="painted",
                            scale=(grid.tile_um / 3,) * 2,
                            translate=tuple(centre - [0.0, 9 * grid.tile_um]),
                            units="um")  # fmt: skip
    lab.paint((30, 30), 1, refresh=True)  # a user's brush stroke (brush size 10 px)
    pw.roi_combo.setCurrentText("painted")
    pw.predict()
    _idle(qtbot, pw)
    assert len(st.store) > n_roi
    pw.mode_combo.setCurrentText("Visible region")

    # 5. Codebook: select a code, name it
    qtbot.waitUntil(lambda: CODES_LAYER in viewer.layers, timeout=TIMEOUT)
    _idle(qtbot, cw)
    codes = viewer.layers[CODES_LAYER]
    k = int(np.bincount(st.store.code).argmax())
    cw.select_code(k)
    # the label under a tile is its code (no off-by-one), the highlight is above the heatmap
    r = int(np.flatnonzero(st.store.code == k)[0])
    # the code map is rebuilt REFRESH_MS after the last prediction ended (debounced)
    qtbot.waitUntil(
        lambda: viewer.layers[CODES_LAYER].get_value(st.store.centres_um[r], world=True) == k,
        timeout=TIMEOUT,
    )
    codes = viewer.layers[CODES_LAYER]
    assert viewer.layers.index(codes) > viewer.layers.index(heat)
    assert codes.show_selected_label and codes.selected_label == k and codes.visible
    assert any(f"code {k} " in cw.legend.item(i).text() for i in range(cw.legend.count()))
    assert not _labels_overlap(cw.gene_fig)
    cw.name_code(k, "tumour epithelium")
    assert "tumour epithelium" in cw.legend.item(0).text() or any(
        "tumour epithelium" in cw.legend.item(i).text() for i in range(cw.legend.count())
    )

    # 6. Synthesize: draw a region, move ERBB2, Generate, Before/After, Keep
    region_layer = sw.start_drawing()
    x0, y0 = centre[1] - 100.0, centre[0] - 60.0
    region_layer.add_rectangles(np.array([[y0, x0], [y0 + 120.0, x0 + 200.0]]))
    qtbot.waitUntil(lambda: sw.profile is not None, timeout=TIMEOUT)
    _idle(qtbot, sw)
    sw.steps_spin.setValue(STEPS)
    assert "ERBB2" in sw.rows
    row = sw.rows["ERBB2"]
    sw.set_value("ERBB2", row.slider.maximum())
    sw.generate()
    qtbot.waitUntil(lambda: sw.result is not None, timeout=TIMEOUT)
    _idle(qtbot, sw)
    assert len(sw.progress) == 0
    preview = sw.preview_layer
    assert preview.visible and preview.data.dtype == np.uint8
    sw.after_check.setChecked(False)  # before: the H&E alone
    shown = [ly for ly in viewer.layers if ly.visible]
    assert shown == [slide_layer] or set(shown) <= {slide_layer, lab, viewer.layers["roi"]}
    assert not heat.visible and not codes.visible and not preview.visible
    sw.after_check.setChecked(True)
    assert heat.visible and codes.visible and preview.visible
    tile = sw.keep()
    kept = viewer.layers[f"generated {tile.id}"]
    viewer.layers.selection.active = kept  # the user clicks the kept tile

    # 7. Predict again with the kept tile on top and selected: still reads the slide
    assert find_slide_layer(viewer, st) is slide_layer
    before = dict(zip(map(tuple, st.store.tiles), st.store.expr[:, 0], strict=True))
    pw.predict()
    _idle(qtbot, pw)
    assert not errors.seen, errors.seen
    assert st.slide_layer is slide_layer and pw.slide_picker.currentText() == "HER2ST C3"
    after = dict(zip(map(tuple, st.store.tiles), st.store.expr[:, 0], strict=True))
    common = [t for t in before if t in after]
    np.testing.assert_allclose([after[t] for t in common], [before[t] for t in common])

    # 8. Follow the view: pans predict as the camera moves, without errors
    from napari_stgen.widgets.predict import camera_of

    pw.live_check.setChecked(True)
    cam = camera_of(viewer)
    n_live = len(st.store)
    for dx in (3, 6, 9):
        cam.center = (centre[0], centre[1] - dx * grid.tile_um)
        qtbot.wait(120)
    qtbot.waitUntil(lambda: not pw._timer.isActive(), timeout=TIMEOUT)
    _idle(qtbot, pw)
    pw.live_check.setChecked(False)
    assert len(st.store) > n_live and not errors.seen, errors.seen

    # 9. Export (the Export widget as the user sees it), then reopen the file
    out = tmp_path / "journey.h5ad"
    shown_lim = tuple(heat.contrast_limits)  # the export records the gene and scale shown
    ew.path_edit.setText(str(out))
    worker = ew.export()
    assert worker is not None
    qtbot.waitUntil(lambda: out.exists() and not worker.is_running, timeout=TIMEOUT)
    import anndata as ad

    a = ad.read_h5ad(out)
    mine = a[[str(t) for t in st.store.tile_ids]]  # the session's predictions, by tile id
    x = np.asarray(mine[:, st.store.genes].X)  # the panel (the measured spots add others)
    assert mine.n_obs == len(st.store) and np.isfinite(x).all()
    np.testing.assert_allclose(x, st.store.expr, atol=1e-5)
    assert "tumour epithelium" in set(a.obs["genst_code_name"].astype(str))
    back = viewer.open(str(out), plugin="napari-stgen")
    pts = next(ly for ly in back if type(ly).__name__ == "Points" and len(ly.data) >= len(st.store))
    ids = list(pts.features["barcode"])
    rows = [ids.index(t) for t in st.store.tile_ids]
    np.testing.assert_allclose(np.asarray(pts.data)[rows], st.store.centres_um, atol=1e-3)
    # reopened: coloured by the same gene on the same scale, the scale drawn on the canvas
    np.testing.assert_allclose(pts.face_contrast_limits, shown_lim, rtol=1e-5)
    assert pts.face_colormap.name == heat.colormap.name
    v = pts.features[gene].to_numpy(float)
    want = pts.face_colormap.map(np.clip((v - shown_lim[0]) / (shown_lim[1] - shown_lim[0]), 0, 1))
    np.testing.assert_allclose(np.asarray(pts.face_color)[:, :3], want[:, :3], atol=0.02)
    assert pts.face_colorbar.visible
    assert not errors.seen, errors.seen

    # 10. close the viewer: every worker stops, none outlives it
    all_workers = [w for x in (pw, cw, sw) for w in x.workers]
    viewer.close()
    qtbot.waitUntil(lambda: QThreadPool.globalInstance().activeThreadCount() == 0,
                    timeout=TIMEOUT)  # fmt: skip
    assert not any(getattr(w, "is_running", False) for w in all_workers)
    errors.close()
    assert not errors.seen, errors.seen
    del spots
