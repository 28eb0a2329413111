"""The npe2 reader and sample in a real napari viewer (needs a display: run under xvfb-run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_stgen.errors import SlideReadError
from napari_stgen.io.napari_reader import get_reader


def test_get_reader_declines_what_it_cannot_read(
    tmp_path: Path, sample_slide_path: Path, tissue_rgb: np.ndarray
) -> None:
    from test_slide_formats import _write_ome_zarr

    csv = tmp_path / "table.csv"
    csv.write_text("a,b\n1,2\n")
    plain_dir = tmp_path / "folder"
    plain_dir.mkdir()
    assert get_reader(str(csv)) is None
    assert get_reader(str(plain_dir)) is None
    not_image = tmp_path / "table.zarr"  # a zarr group without OME multiscales
    not_image.mkdir()
    (not_image / ".zgroup").write_text('{"zarr_format": 2}')
    (not_image / ".zattrs").write_text('{"spatialdata_attrs": {}}')
    assert get_reader(str(not_image)) is None
    for layout in ("cyx", "yxc"):  # OME-Zarr 0.4 (zarr v2) and 0.5 (zarr v3)
        zp = tmp_path / f"img_{layout}.zarr"
        _write_ome_zarr(zp, [tissue_rgb[:300, :300]], 0.5, layout)
        layers = get_reader(str(zp))(str(zp))
        assert layers[0][1]["scale"] == (0.5, 0.5)
    assert get_reader([str(sample_slide_path), str(sample_slide_path)]) is None
    assert callable(get_reader(str(sample_slide_path)))
    assert callable(get_reader([str(sample_slide_path)]))


def test_h5ad_delegates_to_anndata_module(tmp_path: Path) -> None:
    import importlib.util

    r = get_reader(str(tmp_path / "x.h5ad"))
    has = importlib.util.find_spec("napari_stgen.io.anndata") is not None
    if has:
        from napari_stgen.io import anndata

        has = hasattr(anndata, "read_h5ad_layers")
    assert (r is not None) == has


def _pink_fraction(img: np.ndarray) -> float:
    rgb = img[..., :3].astype(int)
    return float(((rgb[..., 0] > rgb[..., 1] + 20) & (rgb.mean(-1) < 235)).mean())


def test_open_sample_in_viewer(make_napari_viewer, sample_slide_path: Path) -> None:
    viewer = make_napari_viewer(show=True)  # a hidden canvas renders black with Mesa here
    layers = viewer.open(str(sample_slide_path), plugin="napari-stgen")
    assert len(layers) == 1
    layer = viewer.layers[0]
    assert layer.multiscale and layer.rgb and len(layer.data) == 6
    mpp = layer.metadata["stgen"]["mpp"]
    assert mpp == pytest.approx(0.6874, abs=1e-3)
    np.testing.assert_allclose(layer.scale, [mpp, mpp])
    assert [str(u) for u in layer.units] == ["micrometer", "micrometer"]
    assert [str(u) for u in viewer.layers.units] == ["micrometer", "micrometer"]
    assert viewer.scale_bar.visible
    # world extent in µm: 9936 px * 0.687 µm ≈ 6.83 mm tall
    ext = layer.extent.world
    assert ext[1][0] - ext[0][0] == pytest.approx(9936 * mpp, rel=1e-3)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert layer.data_level > 0  # the zoomed-out view is drawn from a coarse level
    assert _pink_fraction(shot) > 0.05  # H&E tissue is on screen


def test_sample_data_contribution(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    viewer.open_sample("napari-stgen", "her2st_c3")
    img, pts = viewer.layers
    assert img.multiscale and type(pts).__name__ == "Points"
    assert "ERBB2" in pts.features and len(pts.data) > 150
    # spots lie on the slide in the same µm world space
    lo, hi = img.extent.world
    assert (pts.data >= lo).all() and (pts.data <= hi).all()
    assert [str(u) for u in pts.units] == ["micrometer", "micrometer"]


def test_unknown_mpp_stays_in_pixels_and_says_so(
    make_napari_viewer, tmp_path: Path, tissue_rgb: np.ndarray
) -> None:
    from napari.utils.notifications import notification_manager

    p = tmp_path / "no_resolution.png"
    Image.fromarray(tissue_rgb).save(p)
    seen: list[str] = []

    def record(n) -> None:
        seen.append(str(n.message))

    notification_manager.notification_ready.connect(record)
    try:
        viewer = make_napari_viewer()
        viewer.open(str(p), plugin="napari-stgen")
    finally:
        notification_manager.notification_ready.disconnect(record)
    layer = viewer.layers[0]
    np.testing.assert_allclose(layer.scale, [1.0, 1.0])
    assert layer.metadata["stgen"]["mpp_known"] is False
    assert layer.metadata["stgen"]["units"] == "pixel"
    assert any("no resolution" in m and p.name in m for m in seen)


def _bad_files(d: Path, tissue_rgb: np.ndarray) -> list[Path]:
    from test_slide_errors import make_bad_inputs

    src = d / "src.tif"
    tifffile.imwrite(src, tissue_rgb, tile=(256, 256), compression="zlib", metadata=None)
    return [p for p, _ in make_bad_inputs(d / "bad", src).values()]


def test_bad_files_raise_clean_error_and_viewer_survives(
    make_napari_viewer, tmp_path: Path, tissue_rgb: np.ndarray, sample_slide_path: Path
) -> None:
    viewer = make_napari_viewer(show=True)
    for p in _bad_files(tmp_path, tissue_rgb):
        with pytest.raises(Exception) as ei:
            viewer.open(str(p), plugin="napari-stgen")
        chain = [ei.value, ei.value.__cause__, ei.value.__context__]
        err = next(e for e in chain if isinstance(e, SlideReadError))
        assert str(p) in str(err)
        assert len(viewer.layers) == 0
    # the viewer still works after every failure
    viewer.open(str(sample_slide_path), plugin="napari-stgen")
    viewer.reset_view()
    assert _pink_fraction(viewer.screenshot(canvas_only=True, flash=False)) > 0.05
