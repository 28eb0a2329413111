"""Screenshots for docs/codebook.md: the code map over tissue and one code's profile/exemplars.

Run: ``xvfb-run -a -s "-screen 0 1920x1200x24" python3 scripts/screenshot_codebook.py``.
Predicts the tissue of the bundled sample with the Predict widget (default GenST model),
opens the Codebook widget on the same viewer (it reads the prediction store; the model is
not run again) and writes docs/images/codebook_*.png. Prints the codebook figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    from _viewer import sample_viewer

    from napari_stgen.inference import codebook as cb
    from napari_stgen.inference import engine
    from napari_stgen.widgets.predict import camera_of

    viewer, _d, pw, pump = sample_viewer("Predict expression", (1700, 1100))

    def wait(widget) -> None:
        while widget.workers:
            pump(0.05)
        pump(0.5)

    wait(pw)
    st = pw.state
    slide = st.set_slide_layer(viewer.layers[0])
    pred = st.predictor()
    grid, tissue = engine.plan_whole_slide(slide, pred)
    lo, hi = tissue.min(0) * grid.tile_um, (tissue.max(0) + 1) * grid.tile_um
    cam = camera_of(viewer)
    pump(0.5)
    cam.center = tuple((lo + hi) / 2)
    h, w = viewer.canvas.size
    cam.zoom = 0.95 * min(h / (hi - lo)[0], w / (hi - lo)[1])
    pump(0.5)
    pw.predict()
    wait(pw)
    heat = viewer.layers[f"{pw.genes[0]} (predicted)"]
    for ly in list(viewer.layers)[1:]:
        ly.visible = False

    _d2, cw = viewer.window.add_plugin_dock_widget("napari-stgen", "Codebook")
    viewer.window.remove_dock_widget(_d)  # room for the codebook panel
    while "GenST codes" not in viewer.layers or cw.workers:
        pump(0.1)
    pump(0.5)
    h, w = viewer.canvas.size  # the canvas changed width with the docks: fit the tissue again
    cam.center = tuple((lo + hi) / 2)
    cam.zoom = 0.95 * min(h / (hi - lo)[0], w / (hi - lo)[1])
    store = st.store
    counts = cb.usage_counts(store.code, pred.n_codes)
    health = cb.codebook_health(store.code, pred.n_codes)
    profiles = pred.code_profiles()
    mean, contrast = cb.profile_contrast(profiles, store.expr)
    # the most used code, then the other code (>= 20 tiles) with the strongest contrast
    k1 = int(np.argmax(counts))
    cw.select_code(k1)
    wait(cw)
    top = [g for g, _ in cw.summary(k1).up[:2]]
    cw.name_code(k1, " ".join(top) + " high")  # a name from its own profile, as a user might
    cw.highlight_check.setChecked(False)  # the whole code map
    pump(1.0)
    viewer.screenshot(path=str(args.out / "codebook_map.png"), canvas_only=False)
    print("wrote", args.out / "codebook_map.png")
    used = [k for k in np.flatnonzero(counts >= 20) if k != k1]
    k2 = int(used[np.argmax([np.abs(contrast[k]).max() for k in used])])
    heat.visible = True  # the selected code's tiles are drawn above the heatmap
    cw.highlight_check.setChecked(True)  # only this code's tiles
    cw.select_code(k2)
    wait(cw)
    pump(1.0)
    viewer.screenshot(path=str(args.out / "codebook_code.png"), canvas_only=False)
    print("wrote", args.out / "codebook_code.png")
    s1, s2 = cw.summary(k1), cw.summary(k2)
    print(
        json.dumps(
            {
                "tiles": len(store),
                "health": health,
                "codes": {
                    str(s.code): {"tiles": s.count, "up": s.up[:5], "down": s.down[:5]}
                    for s in (s1, s2)
                },
            },
            indent=1,
        )
    )
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
