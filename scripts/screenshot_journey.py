"""Screenshot for docs: all four napari-stgen docks open on a 1280 × 800 screen mid-journey.

Run: ``xvfb-run -a -s "-screen 0 1280x800x24" python3 scripts/screenshot_journey.py``.
Opens the bundled sample (File ▸ Open Sample), docks Predict, Codebook, Synthesize and Export,
predicts the view, selects the most used gene code, generates one region with STMDiT and keeps
it, then predicts again with the kept tile on top. Writes docs/images/journey_1280x800.png:
the window fits the screen, every dock names its slide, the primary buttons are visible.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_stgen.inference import engine
    from napari_stgen.widgets.predict import camera_of

    app = QApplication.instance() or QApplication([])

    def pump(seconds: float) -> None:
        t = time.perf_counter() + seconds
        while time.perf_counter() < t:
            app.processEvents()
            time.sleep(0.01)

    def idle(*ws) -> None:
        pump(0.2)
        while any(w.workers for w in ws):
            pump(0.05)
        pump(0.3)

    viewer = napari.Viewer(show=True)
    viewer.open_sample("napari-stgen", "her2st_c3")
    ws = [
        viewer.window.add_plugin_dock_widget("napari-stgen", name)[1]
        for name in ("Predict expression", "Codebook", "Synthesize", "Export to h5ad")
    ]
    pw, cw, sw, _ew = ws
    win = pw.window()
    win.resize(1280, 800)
    idle(pw, cw)
    st = pw.state
    pred = st.predictor()
    grid, tissue = engine.plan_whole_slide(st.slide, pred)
    centre = np.median(tissue, axis=0) * grid.tile_um
    cam = camera_of(viewer)
    cam.center = tuple(centre)
    cam.zoom = max(viewer.canvas.size) / (16 * grid.tile_um)
    pump(0.5)
    pw.predict()
    idle(pw, cw)
    pump(1.0)
    idle(cw)
    layer = sw.start_drawing()
    y, x = centre
    layer.add_rectangles(np.array([[y - 60.0, x - 100.0], [y + 60.0, x + 100.0]]))
    while sw.profile is None:
        pump(0.1)
    idle(sw)
    sw.set_value("ERBB2", sw.rows["ERBB2"].slider.maximum())
    sw.generate()
    while sw.result is None:
        pump(0.1)
    idle(sw)
    sw.keep()
    layer.mode = "pan_zoom"
    viewer.layers.selection.active = viewer.layers[-1]
    pw.predict()  # with the kept tile on top: still reads the slide
    idle(pw, cw)
    pump(1.5)
    path = args.out / "journey_1280x800.png"
    viewer.screenshot(path=str(path), canvas_only=False)
    print("wrote", path, "window", win.width(), "x", win.height())
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
