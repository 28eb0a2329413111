"""Shared fixtures: the bundled sample, the shared HER2ST data, small real-tissue images.

``../shared/data`` (beside the repository) holds the five HER2ST sections and a Visium crop; a
user's checkout has none of it. ``STGEN_SHARED_DATA=/some/dir`` points elsewhere,
``STGEN_SHARED_DATA=/nonexistent`` checks what a user's checkout runs. ``her2st_c3_dir`` (the
bundled sample as a one-section HER2ST folder) stands in wherever section C3 is enough; the
Visium crop is bundled in ``tests/data``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from napari_stgen.inference.device import safe_cpu_training

# every test process trains tiny models: oneDNN's convolution backward corrupts the heap on
# some CPUs (inference/device.py); the trainers call this too, this covers tests' own loops
safe_cpu_training()

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STGEN_SHARED_DATA") or REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def sample_slide_path() -> Path:
    """The bundled HER2ST C3 pyramidal TIFF (as the installed package finds it)."""
    from napari_stgen.io.sample import sample_slide_path as find

    return find()


@pytest.fixture(scope="session")
def sample_spots_path() -> Path:
    """The bundled spot table (barcode, x, y level-0 px, measured gene counts)."""
    from napari_stgen.io.sample import sample_spots_path as find

    return find()


@pytest.fixture(scope="session")
def her2st_dir() -> Path:
    """../shared/data/her2st beside the repository; skips when it is absent."""
    d = SHARED_DATA / "her2st"
    if not (d / "C3_selection.tsv").is_file():
        pytest.skip(f"needs the five HER2ST sections at {d} (shared data, not in a checkout)")
    return d


@pytest.fixture(scope="session")
def visium_crop_dir() -> Path:
    """squidpy's Visium mouse-brain test crop (``he_crop.jpg``, ``spots.h5ad``), bundled in
    ``tests/data`` (the same files as ``../shared/data/visium_mouse_brain_crop``)."""
    return REPO / "tests" / "data" / "visium_mouse_brain_crop"


@pytest.fixture(scope="session")
def her2st_c3_dir(tmp_path_factory, sample_slide_path: Path, sample_spots_path: Path) -> Path:
    """Section C3 as a HER2ST folder (``C3.jpg``, ``C3.tsv.gz``, ``C3_selection.tsv``).

    The shared section when present, else made from the bundled sample: its slide (same
    pixels as the shared C3.jpg, as a pyramid) and its 180 spots with 81 measured genes.
    """
    d = SHARED_DATA / "her2st"
    if (d / "C3_selection.tsv").is_file():
        return d
    import pandas as pd

    out = tmp_path_factory.mktemp("her2st_c3")
    df = pd.read_csv(sample_spots_path)
    ax, ay = zip(*(map(int, b.split("x")) for b in df["barcode"]), strict=True)
    sel = pd.DataFrame({"x": ax, "y": ay, "new_x": ax, "new_y": ay,
                        "pixel_x": df["x"], "pixel_y": df["y"], "selected": 1})  # fmt: skip
    sel.to_csv(out / "C3_selection.tsv", sep="\t", index=False)
    counts = df.drop(columns=["x", "y"]).set_index("barcode")
    counts.index.name = None
    counts.to_csv(out / "C3.tsv.gz", sep="\t")
    from PIL import Image

    from napari_stgen.io.slide import open_slide

    with open_slide(sample_slide_path) as s:  # the section's image, as HER2ST ships it
        Image.fromarray(s.levels[0].compute()).save(out / "C3.jpg", quality=90)
    return out


@pytest.fixture(scope="session")
def napari_spatialdata():
    """napari-spatialdata, importable under PySide6 (0.7.2 takes PyQt's ``pyqtSignal`` from
    pyqtgraph's shim: scverse/napari-spatialdata#399); skips where it is not installed."""
    qtcore = pytest.importorskip("pyqtgraph.Qt.QtCore")
    if not hasattr(qtcore, "pyqtSignal"):
        qtcore.pyqtSignal = qtcore.Signal
    return pytest.importorskip("napari_spatialdata")


@pytest.fixture(scope="session")
def tissue_rgb(sample_slide_path: Path) -> np.ndarray:
    """A real H&E crop (1000 x 1200 px, uint8 RGB) read from the sample slide's level 1."""
    from napari_stgen.io.slide import open_slide

    with open_slide(sample_slide_path) as s:
        lv = s.levels[1]
        y0, x0 = lv.shape[0] // 2 - 500, lv.shape[1] // 2 - 600
        return np.ascontiguousarray(lv[y0 : y0 + 1000, x0 : x0 + 1200].compute())


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


def pytest_unconfigure(config):
    """End the test process without interpreter finalization: after the full suite (Qt,
    vispy, zarr/numcodecs and torch all loaded), CPython's final garbage collection aborts in a
    C extension ("none_dealloc", after every test passed), which would turn a green run into
    exit 134. The results are reported by then; the exit status is pytest's own."""
    import os
    import sys

    if _EXIT_STATUS and os.environ.get("STGEN_TEST_FINALIZE") != "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
