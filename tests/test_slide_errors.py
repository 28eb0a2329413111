"""Bad input gives SlideReadError naming the file and the problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_stgen import open_slide
from napari_stgen.errors import SlideReadError, StgenError


def make_bad_inputs(d: Path, source_tif: Path) -> dict[str, tuple[Path, str]]:
    """Bad files (name -> (path, expected words in the message)); shared with other tests."""
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Path, str]] = {}
    empty = d / "empty.svs"
    empty.write_bytes(b"")
    out["empty"] = (empty, "empty")
    text = d / "notes.svs"
    text.write_text("patient notes, not a slide\n" * 20)
    out["text"] = (text, "not an SVS")
    data = source_tif.read_bytes()
    trunc = d / "truncated.tif"
    trunc.write_bytes(data[: len(data) // 2])
    out["truncated"] = (trunc, "truncated")
    fluo = d / "fluorescence.tif"
    rng = np.random.default_rng(0)
    tifffile.imwrite(fluo, rng.random((5, 64, 64), dtype=np.float32), metadata={"axes": "CYX"})
    out["non-rgb"] = (fluo, "channels")
    jpg = d / "cut.jpg"
    from PIL import Image

    Image.fromarray(rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)).save(jpg, quality=90)
    jb = jpg.read_bytes()
    jpg.write_bytes(jb[: len(jb) // 3])
    out["truncated-jpeg"] = (jpg, "truncated")
    return out


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory, tissue_rgb: np.ndarray) -> dict:
    d = tmp_path_factory.mktemp("bad")
    src = d / "good_source.tif"
    tifffile.imwrite(src, tissue_rgb, tile=(256, 256), compression="zlib", metadata=None)
    return make_bad_inputs(d, src)


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "non-rgb", "truncated-jpeg"])
def test_bad_input_names_file_and_problem(bad_inputs: dict, kind: str) -> None:
    path, words = bad_inputs[kind]
    with pytest.raises(SlideReadError) as ei:
        open_slide(path)
    msg = str(ei.value)
    assert str(path) in msg and words in msg
    assert "\n" not in msg and isinstance(ei.value, StgenError)


def test_missing_file_and_bad_mpp(tmp_path: Path, sample_slide_path: Path) -> None:
    with pytest.raises(SlideReadError, match="no such file"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(SlideReadError, match="mpp must be a positive"):
        open_slide(sample_slide_path, mpp=-1)
    with pytest.raises(SlideReadError, match="is a directory"):
        open_slide(tmp_path)


def test_zstack_and_float_rejected(tmp_path: Path) -> None:
    p = tmp_path / "zstack.ome.tif"
    tifffile.imwrite(p, np.zeros((4, 64, 64, 3), np.uint8), ome=True, metadata={"axes": "ZYXS"})
    with pytest.raises(SlideReadError, match="4 planes along axis 'Z'"):
        open_slide(p)
    p2 = tmp_path / "float.tif"
    tifffile.imwrite(p2, np.zeros((64, 64, 3), np.float32))
    with pytest.raises(SlideReadError, match="float32"):
        open_slide(p2)


def test_openslide_only_format_without_openslide_hint(tmp_path: Path) -> None:
    """A .mrxs is OpenSlide-only: the message says so (or OpenSlide's own error names it)."""
    p = tmp_path / "slide.mrxs"
    p.write_bytes(b"[GENERAL]\nSLIDE_VERSION=1\n")
    with pytest.raises(SlideReadError) as ei:
        open_slide(p)
    assert str(p) in str(ei.value)
    assert "OpenSlide" in str(ei.value)
