"""Encoder-independent realism figures of STMDiT tiles and of tile-autoencoder reconstructions.

    python scripts/stmdit_realism.py [--model default] [--peer OLD.safetensors] [--guide GENST]
        [--ae2 AE2.safetensors] [--holdout C3] [--n 40] [--out docs/stmdit_realism.json]
        [--no-generate [--update]] [--grid PNG]

On ``--n`` spots of the held-out section (seeded choice): the model's generated tiles (genes +
morphology, the card's sampler; ``--guidance-expr 0`` for unguided) against the real tiles of
the same spots at 0.875 µm/px (``napari_stgen.training.realism``), and reconstructions of the
real tiles by the model's autoencoder and by a v2 autoencoder (PSNR/SSIM and the same
realism figures); with ``--peer`` the same for a second model (rows prefixed ``peer_``).
The figures code is the one ``stgen evaluate stmdit`` reports (``pixel_statistics``); this
script skips the fidelity/control parts and their oracles.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def save_grid(path: str, rows: dict, n: int = 6) -> None:
    """Rows of tiles (same spots, same µm/px) with a label above each row, as a PNG."""
    from PIL import Image, ImageDraw

    t = next(iter(rows.values())).shape[1]
    pad, lab = 4, 16
    w = n * (t + pad) + pad
    h = len(rows) * (t + lab + pad) + pad
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    for r, (name, tiles) in enumerate(rows.items()):
        y = pad + r * (t + lab + pad)
        d.text((pad, y + 2), name, fill="black")
        for c in range(min(n, len(tiles))):
            im.paste(
                Image.fromarray(np.ascontiguousarray(tiles[c])), (pad + c * (t + pad), y + lab)
            )
    tmp = Path(path).with_name(Path(path).name + ".partial.png")
    im.save(tmp)
    os.replace(tmp, path)


def main() -> None:
    import torch

    from napari_stgen.inference.synthesis import load_guide, load_stmdit, synthesize
    from napari_stgen.io.her2st import read_sections
    from napari_stgen.training.evaluate_stmdit import _context3
    from napari_stgen.training.realism import (
        REFERENCE_MPP,
        at_mpp,
        compare_at_scales,
        spot_tiles_at,
    )
    from napari_stgen.training.stmdit import DEFAULT_CACHE, load_ae, section_image
    from napari_stgen.training.stmdit_ae import psnr_ssim, reconstruct

    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--ae2", default=None, help="v2 autoencoder weights to compare")
    p.add_argument("--holdout", default="C3")
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--guidance-expr", type=float, default=None)
    p.add_argument("--guide", default=None, help="GenST that guides (default: the card's)")
    p.add_argument("--peer", default=None, help="a second STMDiT (e.g. the previous default)")
    p.add_argument("--no-generate", action="store_true", help="autoencoders only")
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "her2st"))
    p.add_argument("--out", default=str(ROOT / "docs" / "stmdit_realism.json"))
    p.add_argument("--update", action="store_true", help="keep --out's other rows")
    p.add_argument("--grid", default=None, help="PNG: real / generated / reconstructions, 0.875")
    a = p.parse_args()

    sec = read_sections(a.data, [a.holdout])[0]
    real = spot_tiles_at(sec, REFERENCE_MPP, a.cache)
    idx = np.sort(np.random.default_rng(0).choice(len(real), min(a.n, len(real)), False))
    real = real[idx]
    m = load_stmdit(a.model)
    res: dict = {
        "holdout": a.holdout,
        "n_spots": len(idx),
        "spots": "seeded choice (rng 0) of the section's spots",
        "model": {
            "name": m.name,
            "mpp": m.mpp,
            "tile_px": m.tile_px,
            "train_sections": m.card.get("data", {}).get("sections"),
        },
    }
    rows = {"real (0.875 um/px)": real}
    models = {"default": m}
    if a.peer:
        models["peer"] = load_stmdit(a.peer)
    for key, mm in models.items():
        tag = "" if key == "default" else "peer_"
        kind = getattr(mm.ae.cfg, "kind", "") or "v1"
        label = f"{'peer' if tag else 'model'} STMDiT {kind} ({mm.mpp:g} um/px)"
        coarse = spot_tiles_at(sec, mm.mpp, a.cache)[idx]
        if key == "default" and mm.mpp > REFERENCE_MPP + 1e-9:
            # what a perfect model at its µm/px would score at 0.875: real shrunk and re-enlarged
            back = at_mpp(at_mpp(real, REFERENCE_MPP, mm.mpp), mm.mpp, REFERENCE_MPP)
            res[f"reference_real_via_{mm.mpp:g}_um_px"] = compare_at_scales(
                real, back, REFERENCE_MPP
            )
        if not a.no_generate:
            img = section_image(sec, mm.mpp, a.cache)
            xy = np.asarray(sec.xy_px)[idx] * sec.mpp / mm.mpp
            ctx = _context3(img, xy, mm.tile_px)
            expr = sec.target(mm.genes).astype(np.float32)[idx]
            se = mm.default_guidance_expr if a.guidance_expr is None else a.guidance_expr
            gname = a.guide or mm.card["sampler"].get("guide", "default")
            guide = load_guide(mm, gname) if se > 0 else None
            gen = synthesize(mm, expr, ctx, seed=1000, guide=guide, guidance_expr=se)
            rows[f"generated: {label}"] = at_mpp(gen, mm.mpp, REFERENCE_MPP)
            res[f"{tag}generated_genes+morph"] = {
                "model": mm.name,
                "mpp": mm.mpp,
                "guidance_expr": se,
                "guide": str(gname) if se > 0 else None,
                **compare_at_scales(real, gen, mm.mpp),
            }
            print(tag + "generated", json.dumps(res[f"{tag}generated_genes+morph"]), flush=True)
        rec = reconstruct(mm.ae, coarse)
        rows[f"AE {kind} reconstruction ({mm.mpp:g} um/px)"] = at_mpp(rec, mm.mpp, REFERENCE_MPP)
        res[f"{tag}ae"] = {
            "model": mm.name,
            "config": mm.ae.cfg.to_dict(),
            "params": sum(p.numel() for p in mm.ae.parameters()),
            "at_own_mpp": psnr_ssim(coarse, rec),
            f"at_{REFERENCE_MPP:g}_vs_real": psnr_ssim(real, at_mpp(rec, mm.mpp, REFERENCE_MPP)),
            **compare_at_scales(real, rec, mm.mpp),
        }
        print(tag + "ae", json.dumps(res[f"{tag}ae"]), flush=True)
    if a.ae2:
        ae2 = load_ae(a.ae2)
        rec2 = reconstruct(ae2, real)
        rows["AE v2 reconstruction (0.875 um/px)"] = rec2
        from safetensors import safe_open

        with safe_open(a.ae2, framework="pt") as f:
            md = f.metadata()
        res["ae_v2"] = {
            "path": str(a.ae2),
            "config": ae2.cfg.to_dict(),
            "params": sum(p.numel() for p in ae2.parameters()),
            "step": json.loads(md.get("step", "null")),
            "steps": json.loads(md.get("steps", "null")),
            "wall_s": json.loads(md.get("wall_s", "null")),
            "train_sections": json.loads(md.get("sections", "null")),
            "at_0.875_vs_real": psnr_ssim(real, rec2),
            **compare_at_scales(real, rec2, REFERENCE_MPP),
        }
        print("ae_v2", json.dumps(res["ae_v2"]), flush=True)
    if a.grid:
        save_grid(a.grid, rows)
    if a.update and Path(a.out).is_file():
        res = {**json.loads(Path(a.out).read_text()), **res}
    text = json.dumps(res, indent=1)
    tmp = Path(a.out).with_name(Path(a.out).name + ".partial")
    tmp.write_text(text + "\n")
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
