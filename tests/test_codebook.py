"""Codebook library functions (no Qt) on predictions of the default model on the sample."""

from __future__ import annotations

import numpy as np
import pytest

from napari_stgen.coords import Grid
from napari_stgen.inference import codebook as cb


def test_code_map_usage_health():
    g = Grid((0.0, 0.0), 100.0, (3, 4))
    tiles = np.array([[0, 0], [1, 2], [2, 3], [2, 0]])
    code = np.array([0, 5, 5, 2])
    m = cb.code_map(g, tiles, code)
    assert m.dtype == np.int32 and m.shape == (3, 4)
    assert m[0, 0] == 1 and m[1, 2] == 6 and m[2, 3] == 6 and m[2, 0] == 3
    assert (m > 0).sum() == 4  # 0 = not predicted
    assert cb.usage_counts(code, 8).tolist() == [1, 0, 1, 0, 0, 2, 0, 0]
    h = cb.codebook_health(code, 8)
    assert h["used"] == 3 and h["dead"] == 5 and h["tiles"] == 4
    p = np.array([0.25, 0.25, 0.5])
    assert h["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))


def test_contrast_top_genes_exemplars():
    genes = ["A", "B", "C", "D"]
    profiles = np.array([[1.0, 0.0, 2.0, 1.0], [0.0, 3.0, 0.0, 1.0]], np.float32)
    expr = np.array([[1, 1, 1, 1], [0, 2, 0, 1], [1, 0, 2, 1], [0.5, 1, 1, 1]], np.float32)
    code = np.array([0, 1, 0, 0])
    mean, contrast = cb.profile_contrast(profiles, expr)
    np.testing.assert_allclose(mean, expr.mean(0))
    np.testing.assert_allclose(contrast, profiles - expr.mean(0), rtol=1e-6)
    up, down = cb.top_genes(contrast[1], genes, 2)
    assert up[0][0] == "B" and down[0][0] in ("A", "C")
    ex = cb.exemplar_rows(expr, code, profiles, 0, n=2)
    assert ex.tolist() == [2, 0]  # row 2 equals code 0's profile, then the next nearest
    s = cb.summarize_code(0, expr, code, profiles, genes, n_top=2, n_exemplars=2)
    assert s.count == 3 and s.fraction == pytest.approx(0.75) and s.up[0][0] == "C"


def test_colors_are_stable_and_distinct():
    a, b = cb.code_colors(64), cb.code_colors(64)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a[0][3] == 0  # background transparent
    rgb = {tuple(np.round(a[k][:3], 4)) for k in range(1, 61)}
    assert len(rgb) >= 55


def test_on_real_predictions(sample_slide_path):
    import torch

    from napari_stgen.inference import engine
    from napari_stgen.inference.predictor import load_genst
    from napari_stgen.io.slide import open_slide

    torch.set_num_threads(1)
    pred = load_genst("default", device="cpu")
    with open_slide(sample_slide_path) as slide:
        grid, tissue = engine.plan_whole_slide(slide, pred)
        sel = tissue[:: max(1, len(tissue) // 60)]
        res = engine.collect(engine.predict_tiles(slide, pred, sel, grid=grid))
    prof = pred.code_profiles()
    assert prof.shape == (pred.n_codes, len(pred.genes))
    k = int(np.bincount(res.code).argmax())
    s = cb.summarize_code(k, res.expr, res.code, prof, pred.genes)
    top = pred.genes[int(np.argmax(prof[k] - res.expr.mean(0)))]
    assert s.up[0][0] == top
    assert (res.code[s.exemplars] == k).all() and len(s.exemplars) >= 1
