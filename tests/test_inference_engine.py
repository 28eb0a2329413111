"""Batched prediction engine on the sample slide with the default GenST model."""

from __future__ import annotations

import numpy as np
import pytest

from napari_stgen.errors import Cancelled
from napari_stgen.inference import engine
from napari_stgen.inference.cache import TileCache
from napari_stgen.inference.patches import read_patches
from napari_stgen.inference.tiles import tile_um_of


@pytest.fixture(scope="module")
def predictor():
    import torch

    from napari_stgen.inference.predictor import load_genst

    torch.set_num_threads(1)
    return load_genst("default", device="cpu")


@pytest.fixture(scope="module")
def slide(sample_slide_path):
    from napari_stgen.io.slide import open_slide

    with open_slide(sample_slide_path) as s:
        yield s


def _tissue_region(slide, predictor, n=6):
    """A region of about n×n cells around the centre of the tissue."""
    grid, tiles = engine.plan_whole_slide(slide, predictor)
    cy, cx = np.median(tiles, axis=0) * grid.tile_um
    h = n * grid.tile_um / 2
    return (cx - h, cy - h, cx + h, cy + h)


def test_region_prediction_equals_direct_library_call(slide, predictor):
    region = _tissue_region(slide, predictor)
    cache = TileCache()
    parts = list(engine.predict_region(slide, predictor, region, batch_size=16, cache=cache))
    assert len(parts) >= 2, "results arrive batch by batch"
    res = engine.collect(iter(parts))
    grid, planned = engine.plan_prediction_region(slide, predictor, region)
    assert grid.tile_um == tile_um_of(predictor)
    assert {tuple(t) for t in res.tiles} == {tuple(t) for t in planned}
    assert res.done == res.total == len(planned) > 10
    # direct call: the model's own patch reader on the tile centres (level-0 x, y px)
    xy = res.centres_um[:, ::-1] / slide.mpp
    tok = predictor.predict(
        read_patches(slide, xy, predictor.patch_um, predictor.patch_px), tokens=True
    )
    # the default model's spatial context head: each tile from its window of the request
    assert res.final == predictor.has_context
    direct = predictor.predict_in_context(
        tok.feat, tok.zhat, res.centres_um[:, ::-1], cells=res.tiles, tile_um=grid.tile_um
    )
    np.testing.assert_allclose(res.expr, direct.expr, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(res.code, direct.code)
    # tile-by-tile batches before it equal the tile-alone library call
    first = parts[0]
    i0 = [int(np.flatnonzero((res.tiles == t).all(1))[0]) for t in first.tiles]
    np.testing.assert_allclose(first.expr, tok.expr[i0], rtol=1e-4, atol=1e-4)
    # again: every tile from the cache (tokens included) in one result, then the same
    # windowed values
    again = list(engine.predict_region(slide, predictor, region, cache=cache))
    assert again[0].cached == len(planned) == len(again[0])
    assert len(again) == (2 if predictor.has_context else 1)
    order = {tuple(t): i for i, t in enumerate(res.tiles)}
    idx = [order[tuple(t)] for t in again[-1].tiles]
    np.testing.assert_allclose(again[-1].expr, res.expr[idx], rtol=1e-5, atol=1e-5)


def test_cancel_between_batches(slide, predictor):
    region = _tissue_region(slide, predictor, n=8)
    token = engine.CancelToken()
    gen = engine.predict_region(slide, predictor, region, cancel=token, batch_size=8)
    first = next(gen)
    assert len(first) == 8 and first.done < first.total
    token.cancel()
    with pytest.raises(Cancelled):
        next(gen)
    with pytest.raises(StopIteration):
        next(gen)


def test_roi_and_estimate(slide, predictor):
    grid, tiles = engine.plan_whole_slide(slide, predictor)
    est = engine.estimate(slide, predictor, tiles, grid=grid, tiles_per_s=100.0)
    assert est.tiles == len(tiles) and est.cached == 0
    assert est.seconds == pytest.approx(len(tiles) / 100.0)
    x0, y0, x1, y1 = _tissue_region(slide, predictor, n=4)
    tri = np.array([[y0, x0], [y0, x1], [y1, x0]])  # (y, x) µm
    g2, roi = engine.plan_roi(slide, predictor, shapes=[("polygon", tri)])
    c = (roi + 0.5) * g2.tile_um  # centres (y, x)
    assert len(roi) > 0
    assert ((c[:, 0] >= y0) & (c[:, 1] >= x0)).all()
    assert ((c[:, 0] - y0) / (y1 - y0) + (c[:, 1] - x0) / (x1 - x0) <= 1 + 1e-9).all()
