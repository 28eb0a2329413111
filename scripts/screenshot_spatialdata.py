"""docs/images/export_spatialdata.png: the SpatialData export of the bundled sample opened in
napari-spatialdata (the scverse viewer), next to the same file opened with napari-stgen's reader.

Writes the export with ``stgen predict SAMPLE --spots SPOTS --out c3.zarr`` (default GenST),
then, under ``xvfb-run``: left, napari-spatialdata's ``Interactive`` with the slide image and
the spot circles of the ``global`` (µm) coordinate system, the circles coloured by the table's
predicted ERBB2; right, napari with the file opened through the napari-stgen reader.
Usage: ``xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshot_spatialdata.py``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "docs" / "images" / "export_spatialdata.png"
GENE = "ERBB2"


def export(d: Path) -> Path:
    from napari_stgen.inference.batch import predict_slide
    from napari_stgen.io.sample import sample_slide_path, sample_spots_path

    return predict_slide(
        sample_slide_path(), d / "c3.zarr", spots=sample_spots_path(), device="cpu"
    )


def pump(seconds: float) -> None:
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    t = time.perf_counter() + seconds
    while time.perf_counter() < t:
        app.processEvents()
        time.sleep(0.01)


def napari_spatialdata_view(path: Path) -> np.ndarray:
    import napari
    import pyqtgraph.Qt.QtCore as qtcore
    import spatialdata as sd
    from matplotlib import colormaps

    if not hasattr(qtcore, "pyqtSignal"):  # napari-spatialdata 0.7.2 under PySide6 (#399)
        qtcore.pyqtSignal = qtcore.Signal
    from napari_spatialdata import Interactive

    viewer = napari.Viewer(show=True, title="napari-spatialdata")
    viewer.window.resize(1500, 900)
    sdata = sd.read_zarr(path)
    it = Interactive(sdata, headless=True)
    for name in ("her2st_C3_image", "her2st_C3_spots"):
        it.add_element(name, "global")
        while it._sdata_widget.worker_thread.isRunning():
            pump(0.1)
        pump(0.5)
    spots = viewer.layers["her2st_C3_spots"]
    table = sdata.tables["table"]
    v = np.asarray(table[:, GENE].X).ravel()
    lo, hi = np.percentile(v, [2, 98])
    spots.face_color = colormaps["viridis"](np.clip((v - lo) / (hi - lo), 0, 1))
    spots.border_width = 0
    # the 'global' system is in µm; napari-spatialdata does not pass the unit on to napari
    return shot(viewer, f"napari-spatialdata: c3.zarr, predicted {GENE} (global, µm)")


def shot(viewer, text: str) -> np.ndarray:
    """Scale bar, a caption, the whole window as an array; closes the viewer."""
    viewer.scale_bar.visible = True
    viewer.text_overlay.visible = True
    viewer.text_overlay.position = "top_left"
    viewer.text_overlay.text = text
    viewer.reset_view()
    pump(1.5)
    img = viewer.screenshot(canvas_only=False, flash=False)
    viewer.close()
    return img


def napari_stgen_view(path: Path) -> np.ndarray:
    import napari

    viewer = napari.Viewer(show=True, title="napari-stgen reader")
    viewer.window.resize(900, 900)
    layers = viewer.open(str(path), plugin="napari-stgen")
    from napari_stgen.io.anndata import robust_limits

    pts = next(ly for ly in layers if type(ly).__name__ == "Points")
    pts.face_color = GENE
    pts.face_colormap = "viridis"
    pts.face_contrast_limits = robust_limits(pts.features[GENE].to_numpy())
    return shot(viewer, f"napari-stgen reader: the same c3.zarr, {GENE}")


def main() -> None:
    from PIL import Image

    with tempfile.TemporaryDirectory() as d:
        path = export(Path(d))
        left = napari_spatialdata_view(path)
        right = napari_stgen_view(path)
    h = min(left.shape[0], right.shape[0])
    both = np.concatenate([left[:h, ..., :3], right[:h, ..., :3]], axis=1)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(both).save(OUT, optimize=True)
    print(OUT, both.shape)


if __name__ == "__main__":
    main()
