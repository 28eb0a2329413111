"""The bundled sample: HER2ST breast-cancer section C3 (H&E pyramid + measured ST spots).

Files live in ``napari_stgen/sample_data`` in an installed wheel, or ``<repo>/sample_data`` in an
editable install. ``her2st_sample`` is the npe2 sample-data contribution.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_stgen.coords import px_to_um, xy_to_rc
from napari_stgen.errors import StgenError
from napari_stgen.io.layer_meta import stgen_metadata
from napari_stgen.io.napari_reader import _show_scale_bar, slide_layer_data
from napari_stgen.io.slide import open_slide

SLIDE_NAME = "her2st_C3.tif"
SPOTS_NAME = "her2st_C3_spots.csv"
#: ST spot diameter (µm) on the HER2ST arrays.
SPOT_DIAMETER_UM = 100.0


def sample_dir() -> Path:
    """Directory holding the sample files (wheel install first, then the source tree)."""
    cands = []
    try:
        cands.append(Path(str(files("napari_stgen") / "sample_data")))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover
        pass
    cands.append(Path(__file__).resolve().parents[3] / "sample_data")
    for d in cands:
        if (d / SLIDE_NAME).is_file():
            return d
    raise StgenError(
        f"napari-stgen sample data not found (looked in {', '.join(map(str, cands))}); "
        "run scripts/make_sample.py or reinstall napari-stgen"
    )


def sample_slide_path() -> Path:
    """Path of the sample slide ``her2st_C3.tif``."""
    return sample_dir() / SLIDE_NAME


def sample_spots_path() -> Path:
    """Path of the sample spot table ``her2st_C3_spots.csv`` (barcode, x, y px, gene counts)."""
    p = sample_dir() / SPOTS_NAME
    if not p.is_file():
        raise StgenError(f"{p}: sample spot table missing")
    return p


def read_spots(path: str | Path | None = None) -> Any:
    """Spot table as a pandas DataFrame (columns barcode, x, y, then gene counts)."""
    p = Path(path) if path is not None else sample_spots_path()
    try:
        df = pd.read_csv(p)
    except Exception as e:  # noqa: BLE001 - pandas raises parser, decode and OS errors
        raise StgenError(f"{p}: cannot read spot table ({e})") from None
    missing = {"barcode", "x", "y"} - set(df.columns)
    if missing:
        raise StgenError(f"{p}: spot table needs columns barcode,x,y (missing {sorted(missing)})")
    return df


def spots_layer_data(df: Any, mpp: float, name: str = "HER2ST C3 spots") -> tuple:
    """A napari Points layer of spots in µm, gene counts (and log1p CP10k of ERBB2) as features."""
    rc_um = xy_to_rc(px_to_um(df[["x", "y"]].to_numpy(np.float64), mpp))
    features = df.drop(columns=["x", "y"]).reset_index(drop=True)
    kwargs: dict[str, Any] = {
        "name": name,
        "features": features,
        "size": SPOT_DIAMETER_UM,
        "border_width": 0.0,
        "opacity": 0.6,
        "units": ("um", "um"),
        "metadata": stgen_metadata("spots", mpp=mpp, source="measured counts"),
    }
    if "ERBB2" in features:
        kwargs["face_color"] = "ERBB2"
        kwargs["face_colormap"] = "magma"
    return (rc_um, kwargs, "points")


def her2st_sample() -> list[tuple]:
    """npe2 sample data: the C3 slide (multiscale, µm) and its measured spots (Points, µm)."""
    slide = open_slide(sample_slide_path())
    layers = [slide_layer_data(slide, name="HER2ST C3")]
    layers.append(spots_layer_data(read_spots(), slide.mpp))
    _show_scale_bar()
    return layers
