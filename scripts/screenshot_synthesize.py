"""Screenshots for docs/synthesis.md: the Synthesize widget on the sample slide.

Run: ``xvfb-run -a -s "-screen 0 1920x1200x24" python3 scripts/screenshot_synthesize.py``.
Drives Plugins ▸ napari-stgen ▸ Synthesize exactly as a user would (draw a rectangle, move the
ERBB2 slider, Generate, flip variants, Keep) with the default GenST and STMDiT checkpoints.
Writes docs/images/synthesize_*.png:

- ``synthesize_widget_after.png`` / ``synthesize_widget_before.png``: the window, generated
  tiles shown over the slide / hidden (the before/after toggle);
- ``synthesize_before_after.png``: the region as scanned | generated at the predicted profile |
  generated with ERBB2 raised, same seed;
- ``synthesize_sweep_<GENE>.png``: a strip of one tile generated at increasing slider values
  (same seed, same neighbourhood, the card's guidance unless ``--sweep-guidance``), with the
  value GenST re-predicts on each generated tile, and below it what changed (|tile − first| × 8).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"


def _label(img: np.ndarray, text: str, scale: int = 3) -> np.ndarray:
    """Upscale ``img`` (nearest) and put ``text`` on a white band above it."""
    from PIL import Image, ImageDraw, ImageFont

    im = Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST)
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 18)
    except OSError:
        font = ImageFont.load_default()
    band = Image.new("RGB", (im.width, 30 * (text.count("\n") + 1)), "white")
    ImageDraw.Draw(band).multiline_text((6, 4), text, fill="black", font=font)
    out = Image.new("RGB", (im.width, im.height + band.height), "white")
    out.paste(band, (0, 0))
    out.paste(im, (0, band.height))
    return np.asarray(out)


def _hstack(imgs: list[np.ndarray], gap: int = 8) -> np.ndarray:
    h = max(i.shape[0] for i in imgs)
    parts = []
    for i, im in enumerate(imgs):
        pad = np.full((h, im.shape[1], 3), 255, np.uint8)
        pad[: im.shape[0]] = im
        parts.append(pad)
        if i < len(imgs) - 1:
            parts.append(np.full((h, gap, 3), 255, np.uint8))
    return np.concatenate(parts, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--genst", default="default", help="GenST checkpoint (name or path)")
    ap.add_argument("--stmdit", default="default", help="STMDiT checkpoint (name or path)")
    ap.add_argument("--gene", default="ERBB2")
    ap.add_argument("--size-um", type=float, default=300.0, help="edge of the drawn region")
    ap.add_argument("--sweep", type=int, default=6, help="tiles in the slider sweep")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--percentile", type=float, default=10.0, help="region: predicted-expression percentile"
    )
    ap.add_argument(
        "--sweep-guidance",
        type=float,
        default=None,
        help="gene guidance for the slider sweep (default: the model card's)",
    )
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    from _viewer import sample_viewer
    from PIL import Image

    from napari_stgen.inference import engine
    from napari_stgen.inference.patches import read_patches
    from napari_stgen.widgets.predict import camera_of

    viewer, _dock, w, pump = sample_viewer("Synthesize", (1700, 1050), genst=args.genst)
    w.model_combo.setCurrentText(args.stmdit)

    def wait_idle() -> None:
        pump(0.2)
        while w.workers or w._region_timer.isActive():
            pump(0.05)
        pump(0.3)

    def shot(name: str) -> None:
        pump(1.0)
        viewer.screenshot(path=str(args.out / name), canvas_only=False)
        print("wrote", args.out / name)

    st = w.state
    slide = st.set_slide_layer(viewer.layers[0])
    pred = st.predictor(args.genst)
    grid, tissue = engine.plan_whole_slide(slide, pred)
    res = engine.collect(engine.predict_tiles(slide, pred, tissue, grid=grid))
    st.store.ensure(slide, pred, grid)
    st.store.add_result(res)
    from napari_stgen.widgets import layers as L

    L.update_heatmap(viewer, st.store, args.gene, opacity=0.45)  # an overlay "before" hides
    gi = pred.genes.index(args.gene)
    # interior tissue only: every cell within 2 cells is tissue too
    cells = {(int(a), int(b)) for a, b in tissue}
    interior = np.array(
        [
            all((a + i, b + j) in cells for i in range(-2, 3) for j in range(-2, 3))
            for a, b in res.tiles
        ]
    )
    # the interior tile at the given percentile of predicted expression (low: room to raise it)
    vals = res.expr[interior, gi]
    target = np.percentile(vals, args.percentile)
    score = np.where(interior, -np.abs(res.expr[:, gi] - target), -np.inf)
    r, c = res.tiles[int(np.argmax(score))]
    cy, cx = (r + 0.5) * grid.tile_um, (c + 0.5) * grid.tile_um
    half = args.size_um / 2
    region = (cx - half, cy - half, cx + half, cy + half)

    layer = w.start_drawing()
    layer.add_rectangles(np.array([[region[1], region[0]], [region[3], region[2]]]))
    wait_idle()
    w.steps_spin.setValue(w.model.default_steps)
    w.seed_spin.setValue(args.seed)
    row = w.rows[args.gene]
    p = row.predicted
    lo, hi = row.slider.minimum(), row.slider.maximum()
    cam = camera_of(viewer)
    cam.center = (cy, cx)
    cam.zoom = 0.45 * min(viewer.canvas.size) / args.size_um
    layer.mode = "pan_zoom"
    viewer.layers.selection.active = layer

    # generated at the predicted profile, then with the gene raised to its slider maximum
    w.generate()
    wait_idle()
    at_pred = np.array(w.preview_layer.data)
    w.set_value(args.gene, hi)
    w.variants_spin.setValue(2)
    w.generate()
    wait_idle()
    raised = np.array(w.preview_layer.data)
    shot("synthesize_widget_after.png")
    w.after_check.setChecked(False)
    shot("synthesize_widget_before.png")
    w.after_check.setChecked(True)
    w.keep()

    plan = w.profile.plan
    x0, y0, x1, y1 = plan.region_um
    b = [int(round(v / slide.mpp)) for v in (x0, y0, x1, y1)]
    real = np.asarray(slide.read_region(*b, level=0))[..., :3]
    real = np.asarray(Image.fromarray(real).resize(raised.shape[1::-1], Image.BOX))
    strip = _hstack(
        [
            _label(real, f"scanned ({x1 - x0:.0f} µm)", 2),
            _label(at_pred, f"generated, predicted {args.gene} {p:.2f}", 2),
            _label(raised, f"generated, {args.gene} {hi:.2f}", 2),
        ]
    )
    Image.fromarray(strip).save(args.out / "synthesize_before_after.png")
    print("wrote", args.out / "synthesize_before_after.png")

    # seams: neighbouring tiles decoded separately, shared latent canvas vs tiles sampled alone
    from napari_stgen.inference import synthesis_grid as sg

    cond = sg.conditioning(w.profile, {})
    ctx = sg.read_contexts(slide, w.model, plan)
    seams = {}
    for share in (True, False):
        out: list = []
        sg.collect(
            sg.iter_generate(
                w.model, plan, cond.tiles, ctx, seed=args.seed, share_overlap=share, tiles_out=out
            )
        )
        seams[share] = sg.seam_disagreement(out[0], plan)
    print(
        f"seams ({plan.n_tiles} tiles): mean |difference| of neighbours in their overlap "
        f"{seams[True]:.1f} (shared latent canvas) vs {seams[False]:.1f} (tiles sampled alone), "
        "0-255 scale; the widget decodes the shared canvas whole (no seam)"
    )

    # slider sweep on one tile: click a point, move the slider, Generate, same seed
    pts = viewer.add_points(name="click", size=30, face_color="yellow", units="um")
    w.region_combo.setCurrentText("click")
    pts.add([cy, cx])
    wait_idle()
    w.variants_spin.setValue(1)
    if args.sweep_guidance is not None:
        w.guid_genes.setValue(args.sweep_guidance)
    tiles, repred = [], []
    values = np.linspace(lo, hi, args.sweep)
    # GenST reads a patch_um window around a tile: the generated tile pasted into the scanned
    # neighbourhood at GenST's resolution
    ctx_px = int(round(pred.patch_um / pred.mpp))
    ctx = read_patches(slide, np.array([[cx / slide.mpp, cy / slide.mpp]]), pred.patch_um, ctx_px)
    t_px = int(round(w.model.tile_um / pred.mpp))
    o = (ctx_px - t_px) // 2
    for v in values:
        w.set_value(args.gene, float(v))
        w.generate()
        wait_idle()
        tile = np.array(w.preview_layer.data)
        tiles.append(tile)
        win = ctx[0].copy()
        win[o : o + t_px, o : o + t_px] = np.asarray(Image.fromarray(tile).resize((t_px, t_px)))
        patch = np.asarray(Image.fromarray(win).resize((pred.patch_px, pred.patch_px), Image.BOX))
        repred.append(float(pred.predict(patch[None]).expr[0, gi]))
    top = _hstack(
        [
            _label(t, f"{args.gene} {v:.2f}\nGenST {rp:.3f}", 3)
            for t, v, rp in zip(tiles, values, repred, strict=True)
        ]
    )
    # what the slider changed: |tile - first tile|, amplified ×8
    diffs = [np.clip(np.abs(t.astype(int) - tiles[0]) * 8, 0, 255).astype(np.uint8) for t in tiles]
    bottom = _hstack(
        [
            _label(
                255 - d, f"|Δ| vs first ×8\nmean {np.abs(t.astype(int) - tiles[0]).mean():.1f}", 3
            )
            for d, t in zip(diffs, tiles, strict=True)
        ]
    )
    sweep = np.concatenate([top, np.full((10, top.shape[1], 3), 255, np.uint8), bottom], 0)
    Image.fromarray(sweep).save(args.out / f"synthesize_sweep_{args.gene}.png")
    print("wrote", args.out / f"synthesize_sweep_{args.gene}.png")
    from scipy.stats import spearmanr

    rho = float(spearmanr(values, repred).statistic)
    print(
        f"sweep {args.gene}: slider {np.round(values, 2).tolist()} → GenST "
        f"{np.round(repred, 3).tolist()} (Spearman {rho:.2f})"
    )
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
