"""Synthesize: region → tile grid library and the dock widget, on the sample slide.

Models: the shipped default checkpoints (GenST for the predicted profile, STMDiT for the
tiles) when they exist; otherwise tiny ones trained here through the public training
functions on real HER2ST patches (never random weights).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from tiny_models import tiny_genst_config, tiny_stmdit_config, tiny_stmdit_parts

from napari_stgen.errors import StgenError
from napari_stgen.inference import synthesis_grid as sg

torch = pytest.importorskip("torch")

TIMEOUT = 90_000  # ms
STEPS = 4


# ----------------------------------------------------------------------------- models
def _default_exists(kind: str) -> bool:
    from napari_stgen.models.checkpoint import resolve_checkpoint

    try:
        return resolve_checkpoint("default", kind).is_file()
    except StgenError:
        return False


def _tiny_genst(sample_slide_path, sample_spots_path, out):
    """GenST trained a few epochs on 40 measured spots of the sample (as tests/test_genst)."""
    import pandas as pd

    from napari_stgen.inference.patches import read_patches
    from napari_stgen.io.slide import open_slide
    from napari_stgen.models.checkpoint import save_checkpoint
    from napari_stgen.training.data import SectionData
    from napari_stgen.training.genst import TrainConfig, genst_card, train_genst

    df = pd.read_csv(sample_spots_path)
    genes = [c for c in df.columns if c not in ("barcode", "x", "y")]
    df = df.iloc[:: max(1, len(df) // 40)].iloc[:40]
    with open_slide(sample_slide_path) as s:
        patches = read_patches(s, df[["x", "y"]].to_numpy(float), 224.0, 32)
        mpp = s.mpp
    y = np.log1p(df[genes].to_numpy(np.float32))
    arr = np.array([list(map(int, b.split("x"))) for b in df["barcode"]])
    sec = SectionData(
        "C3", patches, y, arr, df[["x", "y"]].to_numpy(float), list(df["barcode"]), patches, mpp
    )
    cfg = tiny_genst_config(len(genes))
    tcfg = TrainConfig(
        epochs=10,
        batch=8,
        gene_steps=30,
        label_self_weight=1.0,
        recon_every=2,
        recon_batch=4,
        lr=3e-3,
        seed=0,
    )
    model, _ = train_genst([sec], genes, cfg, tcfg, progress=False, log=lambda s: None)
    card = genst_card(model, genes, genes, tcfg, name="tiny-genst-test")
    save_checkpoint(out, model.state_dict(), card)
    return out


def _tiny_stmdit(her2st_dir, d):
    """STMDiT trained a few steps on real C3 tiles through the public training functions."""
    from napari_stgen.training.stmdit import assemble, train_dit

    ae, panel, enc, feats = tiny_stmdit_parts(her2st_dir, d)
    tcfg = tiny_stmdit_config(save_every=1000)
    return train_dit(
        assemble([feats], "real"),
        ae,
        enc,
        panel,
        d / "tiny.safetensors",
        tcfg,
        resume=False,
        progress=False,
    )


@pytest.fixture(scope="module")
def names(tmp_path_factory, sample_slide_path, sample_spots_path, request):
    """Checkpoint names/paths: (genst, stmdit)."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("synth_models")
    genst = "default"
    if not _default_exists("genst"):
        genst = str(_tiny_genst(sample_slide_path, sample_spots_path, d / "genst.safetensors"))
    stmdit = os.environ.get("STGEN_TEST_STMDIT", "default")  # a candidate checkpoint to try
    if stmdit == "default" and not _default_exists("stmdit"):
        stmdit = str(_tiny_stmdit(request.getfixturevalue("her2st_c3_dir"), d))
    return genst, stmdit


@pytest.fixture(scope="module")
def models(names):
    from napari_stgen.inference.predictor import load_genst

    return load_genst(names[0], device="cpu"), sg.load_generator(names[1])


@pytest.fixture(scope="module")
def slide(sample_slide_path):
    from napari_stgen.io.slide import open_slide

    with open_slide(sample_slide_path) as s:
        yield s


def _tissue_centre_um(slide, predictor):
    from napari_stgen.inference import engine

    grid, tiles = engine.plan_whole_slide(slide, predictor)
    cy, cx = (np.median(tiles, axis=0) + 0.5) * grid.tile_um
    return float(cy), float(cx)


def _changed(a, b) -> float:
    """Fraction of pixel values that differ between two generated images."""
    return float((np.asarray(a) != np.asarray(b)).mean())


def _region(slide, predictor, w_um=230.0, h_um=150.0):
    cy, cx = _tissue_centre_um(slide, predictor)
    return (cx - w_um / 2, cy - h_um / 2, cx + w_um / 2, cy + h_um / 2)


# ----------------------------------------------------------------------------- library
def test_plan_covers_region_with_overlapping_tiles():
    plan = sg.plan_region((100.3, 50.0, 420.0, 260.1), 1.75, 64, overlap_px=16)
    x0, y0, x1, y1 = plan.region_um
    assert abs(x0 - 100.3) <= 0.875 and abs(y1 - 260.1) <= 0.875  # snapped to whole pixels
    h, w = plan.out_hw
    assert (h, w) == (round((y1 - y0) / 1.75), round((x1 - x0) / 1.75))
    assert np.isclose(h * 1.75, y1 - y0) and np.isclose(w * 1.75, x1 - x0)
    ch, cw = plan.canvas_hw
    oy, ox = plan.offset
    assert ch >= h and cw >= w and 0 <= oy <= ch - h and 0 <= ox <= cw - w
    cover = np.zeros(plan.canvas_hw, int)
    for ty, tx in plan.tile_yx:
        cover[ty : ty + 64, tx : tx + 64] += 1
    assert cover.min() >= 1 and cover.max() == 4  # every pixel covered; 2×2 overlap corners
    assert set(np.diff(np.unique(plan.tile_yx[:, 1]))) == {48}
    # the layer transform puts the (h, w) image exactly on the region
    tr = plan.layer_transform()
    assert np.allclose(np.array(tr["translate"]) - 0.875, (y0, x0))
    # a small region is one tile, cropped
    one = sg.plan_region(sg.point_region((500.0, 700.0), 112.0), 1.75, 64)
    assert one.n_tiles == 1 and one.out_hw == (64, 64) and one.offset == (0, 0)
    with pytest.raises(StgenError, match="tiles"):
        sg.plan_region((0, 0, 1e5, 1e5), 1.75, 64)
    with pytest.raises(StgenError, match="overlap"):
        sg.plan_region((0, 0, 100, 100), 1.75, 64, overlap_px=64)


def test_region_profile_is_area_weighted_engine_prediction(models, slide):
    from napari_stgen.inference.patches import read_patches
    from napari_stgen.inference.tiles import slide_grid, tile_um_of

    pred, model = models
    plan = sg.plan_region(_region(slide, pred), model.mpp, model.tile_px)
    prof = sg.collect(sg.iter_region_profile(slide, model, pred, plan))
    assert prof.tiles.shape == (plan.n_tiles, len(model.genes)) and prof.cells_known == 0
    # direct: the model on every grid cell under the region, weighted by overlap area
    grid = slide_grid(slide, tile_um_of(pred))
    cells, w = sg.overlap_weights(grid, np.asarray(plan.region_um)[None])
    centres = (np.asarray(grid.origin_um) + (cells + 0.5) * grid.tile_um)[:, ::-1] / slide.mpp
    tok = pred.predict(read_patches(slide, centres, pred.patch_um, pred.patch_px), tokens=True)
    # GenST's spatial context head: each cell in its window of the request's cells
    e = pred.predict_in_context(
        tok.feat, tok.zhat, centres * slide.mpp, cells=cells, tile_um=grid.tile_um
    ).expr
    direct = (w[0] @ e) / w[0].sum()
    shared = [g for g in model.genes if g in pred.genes]
    assert "ERBB2" in shared
    for g in shared:
        assert prof.value(g) == pytest.approx(direct[pred.genes.index(g)], rel=1e-4, abs=1e-4)
    # tiles differ from each other (each has its own footprint) and from the region mean
    assert np.ptp(prof.tiles[:, model.genes.index("ERBB2")]) > 0
    # known cells (e.g. the Predict widget's store) are used instead of predicting again
    again = sg.collect(
        sg.iter_region_profile(slide, model, pred, plan, known=(prof.new.tiles, prof.new.expr))
    )
    assert again.new is None and again.cells_known == again.cells_total == prof.cells_total
    np.testing.assert_allclose(again.tiles, prof.tiles, rtol=1e-6)


def test_single_tile_equals_stmdit_synthesize(models, slide):
    from napari_stgen.inference.synthesis import synthesize

    pred, model = models
    cy, cx = _tissue_centre_um(slide, pred)
    plan = sg.plan_region(sg.point_region((cy, cx), model.tile_um), model.mpp, model.tile_px)
    prof = sg.collect(sg.iter_region_profile(slide, model, pred, plan))
    cond = sg.conditioning(prof, {"ERBB2": prof.value("ERBB2") + 1.0})
    assert cond.offsets == {"ERBB2": pytest.approx(1.0)}
    ctx = sg.read_contexts(slide, model, plan)
    assert ctx.shape == (1, 3 * model.tile_px, 3 * model.tile_px, 3)
    a = sg.collect(sg.iter_generate(model, plan, cond.tiles, ctx, seed=5, steps=STEPS))
    b = synthesize(model, cond.tiles, ctx, seed=5, steps=STEPS)[0]
    np.testing.assert_array_equal(a, b)


def test_grid_generation_deterministic_conditioned_and_recorded(models, slide, tmp_path):
    from napari_stgen.io.anndata import (
        GeneratedTile,
        predictions_to_anndata,
        read_generated_tiles,
        write_h5ad,
    )

    pred, model = models
    plan = sg.plan_region(_region(slide, pred), model.mpp, model.tile_px)
    assert plan.n_tiles >= 4
    prof = sg.collect(sg.iter_region_profile(slide, model, pred, plan))
    base = sg.conditioning(prof, {})
    i = model.genes.index("ERBB2")
    np.testing.assert_allclose(base.tiles, np.clip(prof.tiles, 0, None))
    hi = sg.conditioning(prof, {"ERBB2": prof.value("ERBB2") + 2.0})
    np.testing.assert_allclose(hi.tiles[:, i], prof.tiles[:, i] + 2.0, rtol=1e-6)
    with pytest.raises(StgenError, match="NOT_A_GENE"):
        sg.conditioning(prof, {"NOT_A_GENE": 1.0})

    def run(cond, seeds):
        return sg.collect(sg.iter_synthesize(slide, model, prof, cond, seeds=seeds, steps=STEPS))

    seen = []
    r1 = sg.collect(
        sg.iter_synthesize(slide, model, prof, hi, seeds=[3, 4], steps=STEPS),
        lambda d, t: seen.append((d, t)),
    )
    assert seen[-1][0] == seen[-1][1] and len(seen) == seen[-1][1]
    assert r1.images[0].shape == (*plan.out_hw, 3) and r1.images[0].dtype == np.uint8
    assert not np.array_equal(r1.images[0], r1.images[1])  # variants by seed
    r2 = run(hi, [3])
    np.testing.assert_array_equal(r1.images[0], r2.images[0])  # same seed + vector
    r3 = run(base, [3])
    # the same vector gives identical pixels, so any difference comes from the gene offset
    assert _changed(r3.images[0], r2.images[0]) > 0.1
    # record: E's GeneratedTile accepts it and the h5ad round trip keeps it
    rec = r1.records[0]
    assert rec["seed"] == 3 and rec["steps"] == STEPS and len(rec["model_checksum"]) == 64
    np.testing.assert_allclose(rec["condition"], hi.region)
    tile = GeneratedTile.from_record(rec, image=r1.images[0])
    adata = predictions_to_anndata(
        prof.new.expr,
        pred.genes,
        prof.new.centres_um[:, ::-1] / slide.mpp,
        slide=slide,
        generated=[tile],
        obs_kind="tiles",
    )
    out = write_h5ad(adata, tmp_path / "gen.h5ad")
    back = read_generated_tiles(out)[0]
    np.testing.assert_array_equal(back.image, r1.images[0])
    np.testing.assert_allclose(back.condition, hi.region, rtol=1e-6)
    np.testing.assert_allclose(back.extra["tile_conditions"], hi.tiles, rtol=1e-6)
    assert back.origin_yx_um == pytest.approx(plan.origin_yx_um)


def test_cancel_stops_generation(models, slide):
    from napari_stgen.errors import Cancelled
    from napari_stgen.inference.engine import CancelToken

    pred, model = models
    plan = sg.plan_region(_region(slide, pred), model.mpp, model.tile_px)
    prof = sg.collect(sg.iter_region_profile(slide, model, pred, plan))
    tok = CancelToken()
    gen = sg.iter_synthesize(slide, model, prof, sg.conditioning(prof), steps=50, cancel=tok)
    next(gen)
    tok.cancel()
    with pytest.raises(Cancelled):
        for _ in gen:
            pass


# ----------------------------------------------------------------------------- widget
@pytest.fixture
def ui(make_napari_viewer, sample_slide_path, names, models, qtbot):
    from napari_stgen.widgets.state import get_state

    viewer = make_napari_viewer()
    viewer.open(str(sample_slide_path), plugin="napari-stgen")
    get_state(viewer).set_model(names[0])
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-stgen", "Synthesize")
    assert widget.state is get_state(viewer)  # one shared state per viewer
    widget.model_combo.setCurrentText(names[1])
    return viewer, widget


def _wait_idle(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.workers, timeout=TIMEOUT)


def _draw(viewer, widget, qtbot, region):
    layer = widget.start_drawing()
    x0, y0, x1, y1 = region
    layer.add_rectangles(np.array([[y0, x0], [y1, x1]]))
    qtbot.waitUntil(lambda: widget.profile is not None, timeout=TIMEOUT)
    _wait_idle(qtbot, widget)
    widget.steps_spin.setValue(STEPS)  # after the model load set the card's default
    return layer


def _edges(layer):
    """World (y0, x0, y1, x1) of an image layer's pixel edges."""
    ext = np.asarray(layer.extent.world)[:, -2:]
    s = np.asarray(layer.scale)[-2:]
    return np.concatenate([ext[0] - s / 2, ext[1] + s / 2])


def test_widget_draw_generate_keep(ui, qtbot, models, tmp_path):
    from napari_stgen.io.anndata import read_generated_tiles

    viewer, widget = ui
    pred, model = models
    slide = widget.state.set_slide_layer(viewer.layers[0])
    region = _region(slide, pred)
    shapes = _draw(viewer, widget, qtbot, region)
    # sliders start at the library's predicted values for this region
    plan = sg.plan_region(region, model.mpp, model.tile_px)
    lib = sg.collect(sg.iter_region_profile(slide, model, pred, plan))
    assert "ERBB2" in widget.genes and len(widget.genes) >= 4
    for g, v in widget.slider_values().items():
        assert v == pytest.approx(lib.value(g), abs=0.01), g
    assert len(widget.state.store) == lib.cells_total  # predictions shared with other widgets

    widget.generate()
    _wait_idle(qtbot, widget)
    layer = widget.preview_layer
    assert layer is not None and layer.rgb and layer.data.shape == (*plan.out_hw, 3)
    (y0, x0), (y1, x1) = np.asarray(shapes.data[-1]).min(0), np.asarray(shapes.data[-1]).max(0)
    assert np.allclose(_edges(layer), (y0, x0, y1, x1))  # exactly over the drawn rectangle
    assert np.allclose((x0, y0, x1, y1), region, atol=model.mpp / 2)  # snapped < 1/2 pixel
    rec = layer.metadata["stgen"]["tile"]
    assert rec["seed"] == 0 and rec["steps"] == STEPS
    first = np.array(layer.data)

    widget.generate()  # same seed and sliders → same pixels
    _wait_idle(qtbot, widget)
    np.testing.assert_array_equal(widget.preview_layer.data, first)

    row = widget.rows["ERBB2"]
    far = max((row.slider.minimum(), row.slider.maximum()), key=lambda v: abs(v - row.predicted))
    widget.set_value("ERBB2", far)  # the end of the slider farthest from the prediction
    assert "Δ" in row.info.text()
    widget.generate()
    _wait_idle(qtbot, widget)
    changed = np.asarray(widget.preview_layer.data)
    assert _changed(changed, first) > 0.1
    rec = widget.preview_layer.metadata["stgen"]["tile"]
    i = model.genes.index("ERBB2")
    assert rec["condition"][i] == pytest.approx(far, abs=0.01)
    assert rec["extra"]["guidance_expr"] == pytest.approx(widget.guid_expr.value())

    widget.guid_expr.setValue(widget.guid_expr.value() + 0.5)  # GenST expression guidance
    assert widget.params()["guidance_expr"] == pytest.approx(widget.guid_expr.value())
    widget.generate()
    _wait_idle(qtbot, widget)
    guided = widget.preview_layer.metadata["stgen"]["tile"]
    assert guided["extra"]["guidance_expr"] == pytest.approx(widget.guid_expr.value())
    assert len(guided["extra"]["guide_sha256"]) == 64
    assert _changed(np.asarray(widget.preview_layer.data), changed) > 0.1
    widget.guid_expr.setValue(widget.guid_expr.value() - 0.5)
    widget.generate()
    _wait_idle(qtbot, widget)
    np.testing.assert_array_equal(widget.preview_layer.data, changed)

    widget.after_check.setChecked(False)  # before/after
    assert not widget.preview_layer.visible
    widget.after_check.setChecked(True)
    tile = widget.keep()
    assert widget.kept_list.count() == 1 and tile.seed == 0
    assert tile.condition[i] == pytest.approx(far, abs=0.01)
    assert f"generated {tile.id}" in [ly.name for ly in viewer.layers]
    widget.reset_sliders()
    assert widget.slider_values()["ERBB2"] == pytest.approx(lib.value("ERBB2"), abs=0.01)
    out = widget.export_kept(tmp_path / "kept.h5ad")
    back = read_generated_tiles(out)
    assert [t.id for t in back] == [tile.id]
    np.testing.assert_array_equal(back[0].image, changed)


def test_widget_variants_cancel_and_responsive(ui, qtbot, models):
    from qtpy.QtCore import QTimer

    viewer, widget = ui
    pred, _ = models
    slide = widget.state.set_slide_layer(viewer.layers[0])
    _draw(viewer, widget, qtbot, _region(slide, pred))
    # the event loop keeps running while a long generation works in its thread
    widget.steps_spin.setValue(60)
    ticks = []
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: ticks.append(widget.busy))
    timer.start()
    slow = widget.generate()
    token = widget._tokens["generate"]
    qtbot.waitUntil(lambda: sum(ticks) >= 3, timeout=TIMEOUT)  # ticks while the worker runs
    # a newer request cancels the older one
    widget.steps_spin.setValue(STEPS)
    widget.variants_spin.setValue(2)
    widget.seed_spin.setValue(7)
    newer = widget.generate()
    timer.stop()
    assert token.cancelled and newer is not slow
    _wait_idle(qtbot, widget)
    assert widget.result.seeds == [7, 8]
    a = np.array(widget.preview_layer.data)
    widget.variant_slider.setValue(1)
    assert widget.preview_layer.metadata["stgen"]["tile"]["seed"] == 8
    assert not np.array_equal(a, widget.preview_layer.data)
    widget.discard()
    assert widget.preview_layer is None
    assert not any(ly.name.startswith("Synthesis preview") for ly in viewer.layers)


def test_widget_point_and_live_mode(ui, qtbot, models):
    viewer, widget = ui
    pred, model = models
    slide = widget.state.set_slide_layer(viewer.layers[0])
    cy, cx = _tissue_centre_um(slide, pred)
    points = viewer.add_points(name="click", size=20, units="um")
    widget.region_combo.setCurrentText("click")
    widget.live_check.setChecked(True)
    points.add([cy, cx])
    qtbot.waitUntil(lambda: widget.result is not None, timeout=TIMEOUT)  # live: generates
    _wait_idle(qtbot, widget)
    layer = widget.preview_layer
    assert layer.data.shape == (model.tile_px, model.tile_px, 3)
    y0, x0, y1, x1 = _edges(layer)
    assert (y0 + y1) / 2 == pytest.approx(cy, abs=model.mpp) and (x1 - x0) == pytest.approx(
        model.tile_um
    )
    before, old = np.array(layer.data), widget.result
    row = widget.rows["ERBB2"]
    far = max((row.slider.minimum(), row.slider.maximum()), key=lambda v: abs(v - row.predicted))
    widget.set_value("ERBB2", far)  # live: regenerates after the debounce
    assert widget._live_timer.isActive() and widget.result is old
    qtbot.waitUntil(lambda: widget.result is not old and not widget.busy, timeout=TIMEOUT)
    assert _changed(widget.preview_layer.data, before) > 0.1


def test_grid_expression_guidance_is_seeded_and_recorded(models, slide):
    pred, model = models
    plan = sg.plan_region(_region(slide, pred), model.mpp, model.tile_px)
    prof = sg.collect(sg.iter_region_profile(slide, model, pred, plan))
    hi = sg.conditioning(prof, {"ERBB2": prof.value("ERBB2") + 2.0})

    def run(se):
        return sg.collect(
            sg.iter_synthesize(slide, model, prof, hi, seeds=[5], steps=STEPS, guidance_expr=se)
        )

    a, b, plain = run(1.0), run(1.0), run(0.0)
    np.testing.assert_array_equal(a.images[0], b.images[0])
    assert _changed(a.images[0], plain.images[0]) > 0.1
    assert a.records[0]["extra"]["guidance_expr"] == 1.0
    assert len(a.records[0]["extra"]["guide_sha256"]) == 64
    assert plain.records[0]["extra"]["guide_sha256"] == ""
