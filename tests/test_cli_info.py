"""``stgen info`` through the real console entry point (a subprocess, as users run it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

STGEN = [sys.executable, "-m", "napari_stgen.cli.main"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*STGEN, *args], capture_output=True, text=True, timeout=120)


def test_info_on_sample(sample_slide_path: Path) -> None:
    r = _run("info", str(sample_slide_path))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "tiff" and (info["width"], info["height"]) == (9270, 9936)
    assert info["mpp"] == pytest.approx(0.6874, abs=1e-3)
    assert [lv["downsample"] for lv in info["levels"]][:3] == [1.0, 2.0, pytest.approx(4, rel=1e-3)]
    assert info["levels"][0]["shape"] == [9936, 9270, 3]
    assert info["levels"][1]["mpp"] == pytest.approx(2 * info["mpp"], rel=1e-4)
    assert "vendor" in info


def test_info_mpp_override(tmp_path: Path, tissue_rgb: np.ndarray, capsys) -> None:
    from PIL import Image

    from napari_stgen.cli.main import main

    p = tmp_path / "he.png"
    Image.fromarray(tissue_rgb).save(p)
    assert main(["info", str(p)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mpp"] is None and info["format"] == "image"
    assert main(["info", str(p), "--mpp", "0.5"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mpp"] == 0.5 and info["mpp_source"] == "argument"


def _bad_cases(tmp_path: Path, tissue_rgb: np.ndarray) -> list[tuple[Path, str]]:
    from test_slide_errors import make_bad_inputs

    src = tmp_path / "src.tif"
    tifffile.imwrite(src, tissue_rgb, tile=(256, 256), compression="zlib", metadata=None)
    cases = list(make_bad_inputs(tmp_path / "bad", src).values())
    cases.append((tmp_path / "missing.svs", "no such file"))
    return cases


def _check_one_line(rc: int, out: str, err: str, path: Path, words: str) -> None:
    assert rc == 2, (path, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("stgen: error: ") and str(path) in lines[0]
    assert words in lines[0]
    assert out == ""


def test_info_bad_inputs_one_line(tmp_path: Path, tissue_rgb: np.ndarray, capsys) -> None:
    """Every bad input through ``stgen``'s main(): exit 2 and one line naming file and problem."""
    from napari_stgen.cli.main import main

    for path, words in _bad_cases(tmp_path, tissue_rgb):
        rc = main(["info", str(path)])
        cap = capsys.readouterr()
        _check_one_line(rc, cap.out, cap.err, path, words)


def test_info_bad_inputs_subprocess(tmp_path: Path, tissue_rgb: np.ndarray) -> None:
    """The same through a real process (no traceback reaches the terminal)."""
    cases = dict((p.name, (p, w)) for p, w in _bad_cases(tmp_path, tissue_rgb))
    for name in ("notes.svs", "truncated.tif"):
        path, words = cases[name]
        r = _run("info", str(path))
        _check_one_line(r.returncode, r.stdout, r.stderr, path, words)
