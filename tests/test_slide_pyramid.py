"""Laziness of pyramids, read_region, best_level, thumbnail."""

from __future__ import annotations

import threading
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile

from napari_stgen import open_slide
from napari_stgen.io.slide import CHUNK_PX, extend_pyramid


def _level0_keys(arr: da.Array, level0_name: str) -> int:
    """How many blocks of level 0 computing ``arr`` would read (graph inspection)."""
    keys = set(da.core.flatten(arr.__dask_keys__()))
    graph = arr.dask.cull(keys)
    return sum(1 for k in graph.to_dict() if isinstance(k, tuple) and k[0] == level0_name)


@pytest.fixture(scope="module")
def single_level_tiff(tmp_path_factory: pytest.TempPathFactory, tissue_rgb: np.ndarray) -> Path:
    """A 4000 x 4800 single-level tiled TIFF of real tissue (uncompressed: fast to write)."""
    p = tmp_path_factory.mktemp("single") / "single.tif"
    big = np.tile(tissue_rgb, (4, 4, 1))
    tifffile.imwrite(p, big, tile=(256, 256), metadata={"mpp": 0.5})
    return p


def test_single_level_gets_lazy_coarser_levels(single_level_tiff: Path) -> None:
    big = tifffile.imread(single_level_tiff)
    with open_slide(single_level_tiff) as s:
        assert s.n_stored_levels == 1 and s.level_count == 4
        assert [lv.shape[:2] for lv in s.levels] == [
            (4000, 4800), (2000, 2400), (1000, 1200), (500, 600)
        ]  # fmt: skip
        assert s.downsamples == [1.0, 2.0, 4.0, 8.0]
        # level 1 is the mean of 2x2 blocks of level 0 (rounded)
        ref = big[:512, :512].reshape(256, 2, 256, 2, 3).astype(np.uint16).sum((1, 3))
        np.testing.assert_array_equal(s.levels[1][:256, :256].compute(), (ref + 2) >> 2)
        # a chunk of level 2 reads only the level-0 tiles beneath it (256 px at 4x: 4x4 tiles)
        lv2 = s.levels[2]
        assert lv2.chunks[0][0] == 256
        assert _level0_keys(lv2[:256, :256], s.levels[0].name) == 16
        assert _level0_keys(s.levels[3], s.levels[0].name) == s.levels[0].npartitions == 16 * 19
        # coarse levels keep usable chunks instead of shrinking to slivers
        assert max(s.levels[3].chunks[0]) >= min(CHUNK_PX, s.levels[3].shape[0]) // 2


def test_downsample_reads_each_level0_tile_once() -> None:
    """Counting reader: computing a coarse level reads each level-0 tile exactly once and a
    coarse tile reads only the tiles beneath it."""
    reads: list[tuple[int, int]] = []
    lock = threading.Lock()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (3000, 2600, 3), dtype=np.uint8)

    def tile(block_info=None):
        (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
        with lock:
            reads.append((y0, x0))
        return base[y0:y1, x0:x1]

    lv0 = da.map_blocks(
        tile, chunks=((256,) * 11 + (184,), (256,) * 10 + (40,), (3,)), dtype=np.uint8,
        meta=np.empty((0, 0, 3), np.uint8), name="counting-level0",
    )  # fmt: skip
    levels = extend_pyramid([lv0], min_px=400)
    assert [lv.shape[:2] for lv in levels] == [(3000, 2600), (1500, 1300), (750, 650), (375, 325)]
    assert levels[2].chunks[0][0] == 256
    corner = levels[2][:256, :256].compute()  # one chunk: 1024 px of level 0 = 4 x 4 tiles
    assert sorted(reads) == [(y, x) for y in range(0, 1024, 256) for x in range(0, 1024, 256)]
    ref = base[:1024, :1024].reshape(256, 4, 256, 4, 3).astype(np.float64).mean((1, 3))
    assert np.abs(corner - ref).max() <= 1.0
    reads.clear()
    levels[-1].compute()
    assert len(reads) == lv0.npartitions and len(set(reads)) == len(reads)


def test_stored_pyramid_zoomed_out_never_touches_level0(sample_slide_path: Path) -> None:
    with open_slide(sample_slide_path) as s:
        lvl0 = s.levels[0].name
        for k in range(1, s.level_count):
            assert _level0_keys(s.levels[k], lvl0) == 0

        def boom(block_info=None):
            raise AssertionError("level 0 was read")

        s.levels[0] = da.map_blocks(
            boom, chunks=s.levels[0].chunks, dtype=np.uint8, meta=np.empty((0, 0, 3), np.uint8)
        )
        th = s.thumbnail(1024)  # must come from a coarse level
        assert max(th.shape[:2]) == 1024
        s.read_region(0, 0, s.width, s.height, level=s.level_count - 1)


def test_read_region_levels_and_padding(sample_slide_path: Path) -> None:
    with open_slide(sample_slide_path) as s:
        l0 = s.levels[0][4000:4224, 3000:3224].compute()
        np.testing.assert_array_equal(s.read_region(3000, 4000, 3224, 4224), l0)
        r1 = s.read_region(3000, 4000, 3448, 4448, level=1)
        assert r1.shape == (224, 224, 3)
        np.testing.assert_array_equal(r1, s.levels[1][2000:2224, 1500:1724].compute())
        # box half outside the slide: white padding outside, pixels inside
        pad = s.read_region(-100, -50, 100, 150)
        assert pad.shape == (200, 200, 3)
        assert (pad[:50] == 255).all() and (pad[:, :100] == 255).all()
        np.testing.assert_array_equal(pad[50:, 100:], s.levels[0][:150, :100].compute())
        edge = s.read_region(s.width - 10, s.height - 10, s.width + 30, s.height + 30)
        assert edge.shape == (40, 40, 3) and (edge[10:, :] == 255).all()
        assert (s.read_region(-500, -500, -100, -100) == 255).all()


def test_best_level(sample_slide_path: Path) -> None:
    with open_slide(sample_slide_path) as s:
        m = s.mpp
        assert s.best_level(m) == 0
        assert s.best_level(m * 0.5) == 0  # finer than level 0: level 0
        assert s.best_level(m * 2) == 1
        assert s.best_level(m * 2 * 1.04) == 1  # within 5 % tolerance of level 1 only
        assert s.best_level(m * 4 * 0.99) == 2  # tolerance lets a 1 % coarser level through
        assert s.best_level(m * 3) == 1
        assert s.best_level(1e6) == s.level_count - 1


def test_copy_and_pickle(sample_slide_path: Path) -> None:
    import copy
    import pickle

    with open_slide(sample_slide_path, mpp=0.7) as s:
        assert copy.deepcopy(s) is s  # a read-only handle: copies (of dask graphs) share it
        lv = copy.deepcopy(s.levels)  # napari's "duplicate layer" deep-copies the data
        np.testing.assert_array_equal(lv[4].compute(), s.levels[4].compute())
        s2 = pickle.loads(pickle.dumps(s))  # re-opens the file (dask workers)
        assert s2.mpp == 0.7 and s2.path == s.path and s2 is not s
        np.testing.assert_array_equal(
            s2.read_region(0, 0, 500, 500, 2), s.read_region(0, 0, 500, 500, 2)
        )
        s2.close()


def test_close_and_context_manager(sample_slide_path: Path) -> None:
    s = open_slide(sample_slide_path)
    with s as same:
        assert same is s and not s.closed
    assert s.closed
    s.close()  # idempotent
