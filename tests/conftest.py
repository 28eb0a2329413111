"""Shared fixtures: the bundled sample, the shared HER2ST data, small real-tissue images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


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
        pytest.skip(f"HER2ST data not found at {d} (shared/ must sit beside the repo)")
    return d


@pytest.fixture(scope="session")
def tissue_rgb(sample_slide_path: Path) -> np.ndarray:
    """A real H&E crop (1000 x 1200 px, uint8 RGB) read from the sample slide's level 1."""
    from napari_stgen.io.slide import open_slide

    with open_slide(sample_slide_path) as s:
        lv = s.levels[1]
        y0, x0 = lv.shape[0] // 2 - 500, lv.shape[1] // 2 - 600
        return np.ascontiguousarray(lv[y0 : y0 + 1000, x0 : x0 + 1200].compute())
