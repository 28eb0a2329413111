"""Slide-global tile grid: alignment to slide pixels, region/ROI selection, block reads."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_stgen.coords import Grid
from napari_stgen.inference import tiles as T
from napari_stgen.inference.patches import read_patches


@pytest.fixture(scope="module")
def slide():
    from napari_stgen.io.sample import sample_slide_path
    from napari_stgen.io.slide import open_slide

    with open_slide(sample_slide_path()) as s:
        yield s


def test_grid_covers_slide_from_world_origin(slide):
    g = T.slide_grid(slide, 112.0)
    assert g.origin_um == (0.0, 0.0)
    assert g.shape[0] * 112.0 >= slide.height * slide.mpp > (g.shape[0] - 1) * 112.0
    assert g.shape[1] * 112.0 >= slide.width * slide.mpp > (g.shape[1] - 1) * 112.0
    # napari places grid pixel (r, c) over cell (r, c): centre at translate + (r, c) * scale
    c = T.tile_centres_um(g, np.array([[3, 5]]))[0]
    np.testing.assert_allclose(np.asarray(g.translate) + np.array([3, 5]) * g.scale, c)
    np.testing.assert_allclose(c, [3.5 * 112.0, 5.5 * 112.0])


def test_read_tiles_is_pixel_identical_to_read_patches_on_centres(slide):
    g = T.slide_grid(slide, 112.0)
    tiles = T.tiles_in_region(g, (1500, 2500, 2400, 3200))  # x0, y0, x1, y1 µm
    tiles = np.concatenate([tiles, [[0, 0], [g.shape[0] - 1, g.shape[1] - 1]]])  # edges pad white
    got = T.read_tiles(slide, g, tiles, 64)
    xy_px = T.tile_centres_um(g, tiles)[:, ::-1] / slide.mpp  # world (y, x) µm -> level-0 (x, y)
    want = read_patches(slide, xy_px, 112.0, 64)
    assert got.shape == (len(tiles), 64, 64, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    # the last cell reaches past the slide edge: its bottom-right corner is white padding
    assert (got[-1, -1, -1] == 255).all()
    # context windows larger than the cell (multiscale GenST: 224 µm around 112 µm cells)
    got = T.read_tiles(slide, g, tiles, 128, patch_um=224.0)
    np.testing.assert_array_equal(got, read_patches(slide, xy_px, 224.0, 128))


def test_tile_um_of_uses_card_then_multiscale_centre():
    from types import SimpleNamespace as NS

    assert T.tile_um_of(NS(patch_um=224.0, card={"architecture": {"multiscale": True}})) == 112
    assert T.tile_um_of(NS(patch_um=224.0, card={"architecture": {"multiscale": False}})) == 224
    assert T.tile_um_of(NS(patch_um=224.0, card={"tile_um": 100.0})) == 100


def test_tile_content_matches_slide_pixels_at_its_world_position(slide):
    """A tile read at native resolution equals the slide's level-0 pixels it covers."""
    mpp = slide.mpp
    g = Grid((0.0, 0.0), 64 * mpp, T.slide_grid(slide, 64 * mpp).shape)  # 64 level-0 px cells
    tile = np.array([[40, 30]])
    got = T.read_tiles(slide, g, tile, 64)[0]
    y0, x0 = 40 * 64, 30 * 64  # world (40*64*mpp) µm ↔ level-0 pixel row 40*64
    want = np.asarray(slide.levels[0][y0 : y0 + 64, x0 : x0 + 64])
    np.testing.assert_array_equal(got, want)


def test_tiles_in_region_exact_cells():
    g = Grid((0.0, 0.0), 100.0, (10, 20))
    assert T.tiles_in_region(g, (0, 0, 100, 100)).tolist() == [[0, 0]]
    assert T.tiles_in_region(g, (150, 250, 250, 350)).tolist() == [[2, 1], [2, 2], [3, 1], [3, 2]]
    assert len(T.tiles_in_region(g, (-500, -500, 1e6, 1e6))) == 200  # clipped to the grid
    assert len(T.tiles_in_region(g, (3000, 0, 4000, 100))) == 0  # right of the slide


@settings(max_examples=60, deadline=None)
@given(st.floats(-300, 2300), st.floats(-300, 1300), st.floats(1, 800), st.floats(1, 800))
def test_tiles_in_region_are_exactly_the_overlapping_cells(x0, y0, w, h):
    g = Grid((0.0, 0.0), 100.0, (10, 20))
    got = {tuple(t) for t in T.tiles_in_region(g, (x0, y0, x0 + w, y0 + h)).tolist()}
    want = {
        (r, c)
        for r in range(10)
        for c in range(20)
        if c * 100 < x0 + w and (c + 1) * 100 > x0 and r * 100 < y0 + h and (r + 1) * 100 > y0
    }
    assert got == want


def test_tiles_in_shapes_uses_tile_centres():
    g = Grid((0.0, 0.0), 100.0, (10, 10))
    rect = np.array([[0, 0], [0, 240], [160, 240], [160, 0]], float)  # (y, x) µm
    got = T.tiles_in_shapes(g, [("rectangle", rect)]).tolist()
    assert got == [[0, 0], [0, 1], [1, 0], [1, 1]]  # centres at 50/150 µm; 250 is outside
    tri = np.array([[0, 0], [0, 1000], [1000, 0]], float)
    got = T.tiles_in_shapes(g, [("polygon", tri)])
    assert all(r + c < 9 for r, c in got) and len(got) == 45
    ell = np.array([[300, 300], [300, 700], [700, 700], [700, 300]], float)
    got = T.tiles_in_shapes(g, [("ellipse", ell)])
    cen = T.tile_centres_um(g, got)
    assert len(got) > 0 and (((cen - 500) / 200) ** 2).sum(1).max() <= 1
    assert len(T.tiles_in_shapes(g, [("line", rect[:2])])) == 0


def test_tiles_in_labels_with_um_scale():
    g = Grid((0.0, 0.0), 100.0, (10, 10))
    lab = np.zeros((100, 100), np.uint8)  # 10 µm pixels
    lab[20:40, 50:70] = 3  # y 200..400 µm, x 500..700 µm
    got = T.tiles_in_labels(g, lab, scale=(10, 10), translate=(5, 5)).tolist()
    assert got == [[2, 5], [2, 6], [3, 5], [3, 6]]
    assert len(T.tiles_in_labels(g, lab, (10, 10), (5, 5), label=1)) == 0


def test_tissue_cells_match_measured_spots_under_tissue(slide, sample_spots_path):
    """Cells holding the authors' under-tissue ST spots are tissue; far-away cells are not."""
    import pandas as pd

    g = T.slide_grid(slide, 112.0)
    mask = T.tissue_cells(slide, g)
    assert mask.shape == g.shape
    assert T.tissue_cells(slide, g) is mask  # computed once per slide
    spots = pd.read_csv(sample_spots_path)
    yx_um = spots[["y", "x"]].to_numpy() * slide.mpp
    cells = (yx_um // g.tile_um).astype(int)
    assert mask[cells[:, 0], cells[:, 1]].mean() >= 0.95
    # cells more than 600 µm from every spot: background (glass, eosin haze) almost always
    centres = T.tile_centres_um(g, np.argwhere(np.ones(g.shape, bool)))
    d = np.sqrt(((centres[:, None, :] - yx_um[None]) ** 2).sum(-1)).min(1).reshape(g.shape)
    assert mask[d > 600].mean() < 0.02
    assert 0.1 < mask.mean() < 0.5


def test_split_blocks_partitions_tiles():
    tiles = T.tiles_in_region(Grid((0.0, 0.0), 1.0, (50, 60)), (0, 0, 60, 50))
    blocks = T.split_blocks(tiles, 24)
    assert sum(len(b) for b in blocks) == len(tiles) == 3000
    assert len(blocks) == 9
    assert {tuple(t) for b in blocks for t in b} == {tuple(t) for t in tiles}
    assert all((b.max(0) - b.min(0) < 24).all() for b in blocks)


def test_visible_region_from_camera():
    assert T.visible_region_um((0.0, 500.0, 1000.0), 2.0, (600, 800)) == (800, 350, 1200, 650)


def test_otsu_threshold_separates_two_modes():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(80, 10, 5000), rng.normal(200, 10, 3000)]).clip(0, 255)
    t = T.otsu_threshold(x)
    assert 100 < t < 180  # anywhere in the gap between the modes
    assert ((x < t) == (np.arange(len(x)) < 5000)).mean() > 0.999
