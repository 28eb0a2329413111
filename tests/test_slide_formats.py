"""open_slide on the sample and on each format written here from real tissue pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_stgen import open_slide
from napari_stgen.io.slide import Slide


def _halve(a: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(a).reduce(2))


def _check_levels(s: Slide) -> None:
    assert s.levels[0].shape == (s.height, s.width, 3)
    for k, lv in enumerate(s.levels):
        assert lv.dtype == np.uint8 and lv.ndim == 3 and lv.shape[2] == 3
        if k:
            assert lv.shape[0] < s.levels[k - 1].shape[0]
            assert s.downsamples[k] == pytest.approx(s.width / lv.shape[1])
    assert max(s.levels[-1].shape[:2]) <= 1024


def test_sample_slide(sample_slide_path: Path, sample_spots_path: Path) -> None:
    import pandas as pd

    with open_slide(sample_slide_path) as s:
        assert s.format == "tiff"
        assert (s.width, s.height) == (9270, 9936)
        assert s.n_stored_levels == 6 and s.level_count == 6
        # µm/px derived from the 200 µm spot pitch (≈ 291 px per step)
        assert s.mpp == pytest.approx(0.6874, abs=1e-3)
        assert s.level_mpp(2) == pytest.approx(s.mpp * 4, rel=1e-3)
        _check_levels(s)
        th = s.thumbnail(512)
        assert max(th.shape[:2]) == 512 and th.dtype == np.uint8
        # H&E: mostly bright background with pink/purple tissue (red > green)
        assert 150 < th.mean() < 250
        tissue = th[th.mean(axis=2) < 200]
        assert len(tissue) > 1000 and tissue[:, 0].mean() > tissue[:, 1].mean()
    spots = pd.read_csv(sample_spots_path)
    assert {"barcode", "x", "y", "ERBB2"} <= set(spots.columns)
    assert len(spots) > 150 and len(spots.columns) >= 50
    assert spots["x"].between(0, 9270).all() and spots["y"].between(0, 9936).all()


def test_sample_matches_her2st_jpeg(
    sample_slide_path: Path, her2st_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sample is the C3 section at native resolution (JPEG re-encoding only)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a 92 Mpx section is legitimate
    src = Image.open(her2st_dir / "C3.jpg")
    src.draft("RGB", (src.width // 8, src.height // 8))
    ref = np.asarray(src).astype(np.float32)  # 1/8 size, decoded by DCT scaling
    with open_slide(sample_slide_path) as s:
        lv = s.levels[3].compute().astype(np.float32)  # stored 8x level
    h, w = min(ref.shape[0], lv.shape[0]), min(ref.shape[1], lv.shape[1])
    assert np.abs(ref[:h, :w] - lv[:h, :w]).mean() < 6


def _write_svs(path: Path, levels: list[np.ndarray], mpp: float) -> None:
    h, w = levels[0].shape[:2]
    desc = (
        f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] (256x256) RAW|"
        f"AppMag = 20|MPP = {mpp}|Filename = test"
    )
    with tifffile.TiffWriter(path) as tw:
        tw.write(levels[0], tile=(256, 256), compression="zlib", description=desc, metadata=None)
        tw.write(levels[-1], description="Aperio thumbnail", metadata=None)  # stripped thumbnail
        for lv in levels[1:]:
            tw.write(lv, tile=(256, 256), compression="zlib", metadata=None)
        tw.write(levels[-1][:100, :200], subfiletype=1, metadata=None, description="label")
        tw.write(levels[-1][:150, :300], subfiletype=9, metadata=None, description="macro")


def test_svs_like(tmp_path: Path, tissue_rgb: np.ndarray) -> None:
    levels = [tissue_rgb, _halve(tissue_rgb)]
    p = tmp_path / "slide.svs"
    _write_svs(p, levels, 0.499)
    with open_slide(p) as s:
        assert (s.format, s.vendor) == ("svs", "aperio")
        assert s.mpp == pytest.approx(0.499) and s.mpp_source == "aperio description"
        assert s.properties["aperio.AppMag"] == "20"
        assert s.n_stored_levels == 2 and (s.width, s.height) == (1200, 1000)
        _check_levels(s)
        np.testing.assert_array_equal(s.levels[0].compute(), levels[0])
        np.testing.assert_array_equal(s.levels[1].compute(), levels[1])


def test_ome_tiff_pyramid(tmp_path: Path, tissue_rgb: np.ndarray) -> None:
    levels = [tissue_rgb, _halve(tissue_rgb), _halve(_halve(tissue_rgb))]
    p = tmp_path / "slide.ome.tif"
    with tifffile.TiffWriter(p, ome=True) as tw:
        meta = {"axes": "YXS", "PhysicalSizeX": 250, "PhysicalSizeXUnit": "nm"}
        tw.write(levels[0], tile=(256, 256), subifds=2, compression="zlib", metadata=meta)
        for lv in levels[1:]:
            tw.write(lv, tile=(256, 256), subfiletype=1, compression="zlib")
    with open_slide(p) as s:
        assert (s.format, s.vendor) == ("ome-tiff", "ome")
        assert s.mpp == pytest.approx(0.25)
        assert s.n_stored_levels == 3
        for k in range(3):
            np.testing.assert_array_equal(s.levels[k].compute(), levels[k])


def test_ome_tiff_planar_cyx(tmp_path: Path, tissue_rgb: np.ndarray) -> None:
    p = tmp_path / "planar.ome.tiff"
    cyx = np.moveaxis(tissue_rgb, 2, 0).copy()
    tifffile.imwrite(
        p, cyx, ome=True, tile=(256, 256), photometric="rgb", planarconfig="separate",
        metadata={"axes": "CYX", "PhysicalSizeX": 0.5},
    )  # fmt: skip
    with open_slide(p) as s:
        assert s.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(s.levels[0].compute(), tissue_rgb)


def _write_ome_zarr(path: Path, levels: list[np.ndarray], mpp: float, layout: str) -> None:
    import zarr

    v3 = layout == "yxc"
    g = zarr.open_group(str(path), mode="w", zarr_format=3 if v3 else 2)
    datasets = []
    for k, lv in enumerate(levels):
        data = lv if v3 else np.moveaxis(lv, 2, 0)
        chunks = (256, 256, 3) if v3 else (1, 256, 256)
        g.create_array(str(k), data=data, chunks=chunks)
        s = mpp * 2**k
        scale = [s, s, 1.0] if v3 else [1.0, s, s]
        datasets.append(
            {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        )
    sp = [{"name": "y", "type": "space", "unit": "micrometer"},
          {"name": "x", "type": "space", "unit": "micrometer"}]  # fmt: skip
    ch = [{"name": "c", "type": "channel"}]
    ms = [{"version": "0.5" if v3 else "0.4", "axes": sp + ch if v3 else ch + sp,
           "datasets": datasets}]  # fmt: skip
    if v3:
        g.attrs["ome"] = {"version": "0.5", "multiscales": ms}
    else:
        g.attrs["multiscales"] = ms


@pytest.mark.parametrize("layout", ["cyx", "yxc"])
def test_ome_zarr(tmp_path: Path, tissue_rgb: np.ndarray, layout: str) -> None:
    levels = [tissue_rgb, _halve(tissue_rgb)]
    p = tmp_path / f"slide_{layout}.zarr"
    _write_ome_zarr(p, levels, 0.3, layout)
    with open_slide(p) as s:
        assert s.format == "ome-zarr"
        assert s.mpp == pytest.approx(0.3)
        assert s.n_stored_levels == 2
        _check_levels(s)
        for k in range(2):
            np.testing.assert_array_equal(s.levels[k].compute(), levels[k])


def test_jpeg(tmp_path: Path, tissue_rgb: np.ndarray) -> None:
    big = np.tile(tissue_rgb, (2, 2, 1))  # 2000 x 2400: gets DCT-scaled coarse levels
    p = tmp_path / "he.jpg"
    Image.fromarray(big).save(p, quality=95, dpi=(25400 / 0.5, 25400 / 0.5))
    with open_slide(p) as s:
        assert s.format == "image" and (s.width, s.height) == (2400, 2000)
        assert s.mpp == pytest.approx(0.5, rel=1e-3) and s.mpp_source == "image DPI"
        _check_levels(s)
        np.testing.assert_array_equal(s.levels[0].compute(), np.asarray(Image.open(p)))
        # coarse levels approximate the 2x2 means of level 0 (DCT scaling ≈ box filter)
        ref = _halve(np.asarray(Image.open(p))).astype(np.float32)
        assert np.abs(s.levels[1].compute().astype(np.float32) - ref).mean() < 3
    with open_slide(p, mpp=0.25) as s:
        assert s.mpp == 0.25 and s.mpp_source == "argument"


def test_png_lossless_and_unknown_mpp(tmp_path: Path, tissue_rgb: np.ndarray) -> None:
    p = tmp_path / "he.png"
    Image.fromarray(tissue_rgb).save(p)
    with open_slide(p) as s:
        assert s.mpp is None and s.level_mpp(0) is None and s.best_level(2.0) == 0
        assert s.info()["mpp"] is None
        np.testing.assert_array_equal(s.levels[0].compute(), tissue_rgb)
        np.testing.assert_array_equal(s.read_region(100, 50, 400, 250), tissue_rgb[50:250, 100:400])


def test_resolution_tags(tmp_path: Path, tissue_rgb: np.ndarray) -> None:
    p = tmp_path / "res.tif"
    tifffile.imwrite(p, tissue_rgb, tile=(256, 256), resolution=(1e4 / 0.75, 1e4 / 0.75),
                     resolutionunit="CENTIMETER", metadata=None)  # fmt: skip
    with open_slide(p) as s:
        assert s.mpp == pytest.approx(0.75) and s.mpp_source == "TIFF resolution tags"
    p2 = tmp_path / "dpi72.tif"  # page-layout default, not a microscope resolution
    tifffile.imwrite(p2, tissue_rgb, resolution=(72, 72), resolutionunit="INCH", metadata=None)
    with open_slide(p2) as s:
        assert s.mpp is None


def test_stripped_tiff_is_chunked_in_row_groups(tmp_path: Path, tissue_rgb: np.ndarray) -> None:
    p = tmp_path / "stripped.tif"
    tifffile.imwrite(p, tissue_rgb, rowsperstrip=16, compression="zlib", metadata=None)
    with open_slide(p) as s:
        assert s.levels[0].chunks[0][0] == 256 and s.levels[0].chunks[1] == (1200,)
        np.testing.assert_array_equal(s.levels[0].compute(), tissue_rgb)
        np.testing.assert_array_equal(s.read_region(7, 250, 1107, 530), tissue_rgb[250:530, 7:1107])


def test_gray16_and_rgba_are_converted(tmp_path: Path, tissue_rgb: np.ndarray) -> None:
    gray = tissue_rgb.mean(axis=2).astype(np.uint16) * 257
    p = tmp_path / "gray16.tif"
    tifffile.imwrite(p, gray, tile=(256, 256), metadata=None)
    with open_slide(p) as s:
        out = s.levels[0].compute()
        assert out.dtype == np.uint8 and out.shape == (*gray.shape, 3)
        np.testing.assert_array_equal(out[..., 1], (gray >> 8).astype(np.uint8))
    rgba = np.dstack([tissue_rgb, np.full(tissue_rgb.shape[:2], 255, np.uint8)])
    rgba[:100, :100, 3] = 0  # transparent corner -> white
    p2 = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(p2)
    with open_slide(p2) as s:
        out = s.levels[0].compute()
        assert (out[:100, :100] == 255).all()
        np.testing.assert_array_equal(out[200:, 200:], tissue_rgb[200:, 200:])


def test_openslide_backend_matches_tifffile(sample_slide_path: Path) -> None:
    pytest.importorskip("openslide", reason="OpenSlide (optional extra) not installed")
    from napari_stgen.io.backends_openslide import open_openslide

    with open_openslide(sample_slide_path) as o, open_slide(sample_slide_path) as t:
        assert o.format == "openslide" and o.n_stored_levels == t.n_stored_levels
        a = o.read_region(4000, 4000, 4600, 4400, level=1)
        b = t.read_region(4000, 4000, 4600, 4400, level=1)
        assert a.shape == b.shape == (200, 300, 3)
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.0


def test_info_is_json(sample_slide_path: Path) -> None:
    with open_slide(sample_slide_path) as s:
        info = json.loads(json.dumps(s.info()))
    assert info["format"] == "tiff" and len(info["levels"]) == 6
    assert info["levels"][1]["downsample"] == 2.0
