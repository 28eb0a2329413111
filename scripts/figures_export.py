"""Figures for docs/export.md: an exported prediction in scanpy next to the napari view.

Runs ``stgen predict`` on the bundled sample (HER2ST C3, its ST spots) with the default
GenST model, then
- ``sc.pl.spatial(adata, color=GENE)`` of the prediction and of the measured counts kept from
  the spots CSV → docs/images/export_scanpy.png,
- napari with the slide and the same h5ad opened through the plugin reader, spots coloured by
  the gene → docs/images/export_napari.png (needs a display: run under ``xvfb-run``),
- both side by side → docs/images/export_side_by_side.png.

Usage: ``xvfb-run -a -s "-screen 0 1280x1024x24" python scripts/figures_export.py
[--gene ERBB2] [--model default] [--out docs/images]``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def save_png(im: object, out: Path) -> None:
    """A 256-colour PNG (keeps the docs light; H&E and viridis survive the palette)."""
    from PIL import Image

    im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


def predict(model: str, workdir: Path) -> Path:
    from napari_stgen.inference.batch import predict_slide
    from napari_stgen.io.sample import sample_slide_path, sample_spots_path

    return predict_slide(
        sample_slide_path(), workdir / "her2st_C3_pred.h5ad", spots=sample_spots_path(),
        model=model, device="cpu", overwrite=True,
    )  # fmt: skip


def scanpy_figure(h5ad: Path, gene: str, out: Path) -> float:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    adata = sc.read_h5ad(h5ad)
    measured = f"{gene}_csv"
    r = float("nan")
    if measured in adata.obs:
        adata.obs[f"{gene} measured log1p"] = np.log1p(adata.obs[measured].astype(float))
        r = float(np.corrcoef(adata[:, gene].X.ravel(), adata.obs[f"{gene} measured log1p"])[0, 1])
    colors = [gene] + ([f"{gene} measured log1p"] if measured in adata.obs else [])
    sc.pl.spatial(adata, color=colors, show=False, ncols=2, title=[
        f"{gene} predicted (GenST, log1p CP10k)", f"{gene} measured (log1p counts)"
    ][: len(colors)])  # fmt: skip
    fig = plt.gcf()
    stat = f" — Pearson r = {r:.2f} over {adata.n_obs} spots" if r == r else ""
    fig.suptitle(f"sc.pl.spatial(adata, color={gene!r}) on the exported h5ad{stat}")
    fig.savefig(out, dpi=90, bbox_inches="tight")
    from PIL import Image

    save_png(Image.open(out), out)
    plt.close(fig)
    return r


def napari_figure(h5ad: Path, gene: str, out: Path) -> None:
    import napari

    from napari_stgen.io.layer_meta import layer_kind
    from napari_stgen.io.sample import sample_slide_path

    viewer = napari.Viewer(show=True, title="napari-stgen: exported prediction")
    viewer.window.resize(1400, 950)
    viewer.open(str(sample_slide_path()), plugin="napari-stgen")
    layers = viewer.open(str(h5ad), plugin="napari-stgen")
    for ly in layers:
        if layer_kind(ly.metadata) == "thumbnail":
            ly.visible = False  # the full-resolution slide is open underneath
        if type(ly).__name__ == "Points":
            pts = ly
    from napari_stgen.io.anndata import robust_limits

    pts.face_color = gene
    pts.face_colormap = "viridis"
    pts.face_contrast_limits = robust_limits(pts.features[gene].to_numpy())
    pts.refresh_colors()
    viewer.reset_view()
    # frame the spots (the tissue), as sc.pl.spatial does
    lo, hi = pts.data.min(0) - 300.0, pts.data.max(0) + 300.0
    canvas = np.asarray(viewer.screenshot(canvas_only=True, flash=False).shape[:2], float)
    viewer.camera.center = tuple((lo + hi) / 2)
    viewer.camera.zoom = float(np.min(canvas / (hi - lo)))
    viewer.scale_bar.visible = True
    viewer.text_overlay.visible = True
    viewer.text_overlay.text = (
        f"napari: slide + h5ad via the plugin reader, spots coloured by {gene}"
    )
    img = viewer.screenshot(canvas_only=False, flash=False)[..., :3]
    from PIL import Image

    save_png(Image.fromarray(img), out)
    viewer.close()


def side_by_side(left: Path, right: Path, out: Path) -> None:
    from PIL import Image

    a, b = Image.open(left).convert("RGB"), Image.open(right).convert("RGB")
    h = min(700, max(a.height, b.height))
    a = a.resize((round(a.width * h / a.height), h), Image.Resampling.LANCZOS)
    b = b.resize((round(b.width * h / b.height), h), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (a.width + b.width + 20, h), "white")
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width + 20, 0))
    save_png(canvas, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gene", default="ERBB2")
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "images"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        h5ad = predict(args.model, Path(d))
        r = scanpy_figure(h5ad, args.gene, out / "export_scanpy.png")
        napari_figure(h5ad, args.gene, out / "export_napari.png")
    side_by_side(out / "export_scanpy.png", out / "export_napari.png",
                 out / "export_side_by_side.png")  # fmt: skip
    print(f"{args.gene}: Pearson r (predicted vs measured log1p, sample spots) = {r:.3f}")
    print(f"wrote {out}/export_scanpy.png, export_napari.png, export_side_by_side.png")


if __name__ == "__main__":
    main()
