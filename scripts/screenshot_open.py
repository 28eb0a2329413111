"""Screenshots for docs/open.md: the bundled sample opened in napari, scale bar in µm.

    xvfb-run -a -s "-screen 0 1280x1024x24" python3 scripts/screenshot_open.py

Writes docs/images/open_sample.png (whole section with the measured ST spots, coloured by ERBB2
counts) and docs/images/open_zoom.png (zoomed to cellular detail, drawn from level 0).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images"


def _save(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    Image.fromarray(img[..., :3]).save(tmp, optimize=True)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    print(f"wrote {path} {img.shape[1]}x{img.shape[0]}")


def main() -> None:
    import napari

    from napari_stgen.io.sample import sample_slide_path

    OUT.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(show=True, title="napari-stgen: HER2ST C3")
    viewer.window.resize(1400, 950)
    viewer.open(str(sample_slide_path()), plugin="napari-stgen")
    viewer.open_sample("napari-stgen", "her2st_c3")
    viewer.layers.remove(viewer.layers[1])  # the sample adds the slide again; keep one
    spots = viewer.layers[-1]
    slide = viewer.layers[0]
    sb = viewer.scale_bar
    sb.visible, sb.box, sb.font_size, sb.ticks = True, True, 14, True
    viewer.reset_view()
    _save(viewer.screenshot(canvas_only=False, flash=False), OUT / "open_sample.png")

    # zoom on tissue at full resolution (level 0): 400 µm across the canvas
    spots.visible = False
    mpp = slide.metadata["stgen"]["mpp"]
    centre_px = np.array([3400.0, 4300.0])  # (row, col) inside the tumour region
    canvas_h = viewer.screenshot(canvas_only=True, flash=False).shape[0]
    viewer.camera.center = tuple(centre_px * mpp)
    viewer.camera.zoom = canvas_h / 400.0  # screen px per µm: 400 µm tall
    shot = viewer.screenshot(canvas_only=True, flash=False)
    print(f"zoomed view drawn from level {slide.data_level}")
    _save(shot, OUT / "open_zoom.png")
    viewer.close()


if __name__ == "__main__":
    main()
