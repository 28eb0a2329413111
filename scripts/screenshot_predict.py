"""Screenshots for docs/predict.md: heatmaps of two genes, uncertainty, spot circles, ROI mode.

Run: ``xvfb-run -a -s "-screen 0 1920x1200x24" python3 scripts/screenshot_predict.py``.
Uses the bundled sample and the default GenST model through the Predict widget, exactly as
a user would (Plugins ▸ napari-stgen ▸ Predict expression). Writes docs/images/predict_*.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--genes", nargs=2, default=["ERBB2", "COL1A1"])
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    from _viewer import sample_viewer

    from napari_stgen.inference import engine
    from napari_stgen.widgets.predict import camera_of

    viewer, _dock, w, pump = sample_viewer("Predict expression", (1600, 1000))

    def wait_idle() -> None:
        while w.workers:
            pump(0.05)
        pump(0.5)

    wait_idle()
    st = w.state
    slide = st.set_slide_layer(viewer.layers[0])
    pred = st.predictor()
    g1, g2 = args.genes
    w.set_genes([g1, g2])
    grid, tissue = engine.plan_whole_slide(slide, pred)
    lo, hi = tissue.min(0) * grid.tile_um, (tissue.max(0) + 1) * grid.tile_um
    cam = camera_of(viewer)
    pump(0.5)
    # a view of most of the tissue: the heatmap fills in for what is on screen
    cam.center = tuple((lo + hi) / 2)
    h, wd = viewer.canvas.size
    cam.zoom = 0.95 * min(h / (hi - lo)[0], wd / (hi - lo)[1])
    pump(0.5)
    w.predict()
    wait_idle()
    # the hover layer over the tiles stays on: it draws nothing (no tile-centre rings)

    def shot(name: str) -> None:
        pump(1.0)
        viewer.screenshot(path=str(args.out / name), canvas_only=False)
        print("wrote", args.out / name)

    viewer.layers[f"{g2} (predicted)"].visible = False
    viewer.layers.selection.active = viewer.layers[f"{g1} (predicted)"]
    shot(f"predict_heatmap_{g1}.png")
    viewer.layers[f"{g1} (predicted)"].visible = False
    viewer.layers[f"{g2} (predicted)"].visible = True
    viewer.layers.selection.active = viewer.layers[f"{g2} (predicted)"]
    shot(f"predict_heatmap_{g2}.png")

    # how sure: the uncertainty layer (its own colormap and colour bar) over the same view
    viewer.layers[f"{g2} (predicted)"].visible = False
    w.display_box.expand(animate=False)  # the ticked box is in view
    w.uncertainty_check.setChecked(True)
    pump(0.5)
    viewer.layers.selection.active = viewer.layers["uncertainty"]
    shot("predict_uncertainty.png")
    w.uncertainty_check.setChecked(False)
    w.display_box.collapse(animate=False)
    viewer.layers[f"{g2} (predicted)"].visible = True

    # spot circles of gene 1 with hover values
    w.display_combo.setCurrentText("Spot circles")
    viewer.layers[f"{g2} (predicted spots)"].visible = False
    viewer.layers.selection.active = viewer.layers[f"{g1} (predicted spots)"]
    shot(f"predict_spots_{g1}.png")

    # ROI mode: a fresh viewer state, a drawn polygon, predict only inside it
    for name in [ly.name for ly in viewer.layers][1:]:
        viewer.layers.remove(name)
    st.store.reset()
    w.display_combo.setCurrentText("Heatmap")
    w.set_genes([g1])
    c = (lo + hi) / 2
    r = 0.3 * (hi - lo).min()
    ang = np.linspace(0, 2 * np.pi, 7)[:-1] + 0.3
    poly = np.stack(
        [c[0] + r * np.sin(ang) * (1 + 0.3 * np.cos(3 * ang)), c[1] + 1.3 * r * np.cos(ang)], axis=1
    )
    viewer.add_shapes(
        [poly],
        shape_type="polygon",
        name="ROI",
        edge_color="cyan",
        face_color="transparent",
        edge_width=20,
        units=("um", "um"),
    )
    w.mode_combo.setCurrentText("ROI layer")
    w.roi_combo.setCurrentText("ROI")
    w.predict()
    wait_idle()
    viewer.layers.selection.active = viewer.layers["ROI"]
    shot("predict_roi.png")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
