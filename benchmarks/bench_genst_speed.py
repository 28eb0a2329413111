"""GenST prediction speed on CPU: batched (64 tiles) vs a naive one-tile-at-a-time loop.

Also times the spatial context pass (windows over the sample's spots and over a 4,096-cell
grid) against the tile-by-tile pass it follows, for models with a context head.

    python benchmarks/bench_genst_speed.py [--model default] [--threads 2] [--n 256]

Both use the same real patches (spots of the bundled sample slide, repeated to --n), the same
model and the same test-time augmentation; the figure that matters is the ratio measured in
the same run. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--naive-n", type=int, default=64)
    ap.add_argument("--tta", type=int, default=None, help="rotations (default: the card's)")
    args = ap.parse_args(argv)

    import pandas as pd
    import torch

    from napari_stgen.inference.patches import read_patches
    from napari_stgen.inference.predictor import load_genst
    from napari_stgen.io.sample import sample_slide_path, sample_spots_path
    from napari_stgen.io.slide import open_slide

    torch.set_num_threads(args.threads)
    pred = load_genst(args.model, device="cpu")
    df = pd.read_csv(sample_spots_path())
    with open_slide(sample_slide_path()) as s:
        p = read_patches(s, df[["x", "y"]].to_numpy(float), pred.patch_um, pred.patch_px)
    patches = np.concatenate([p] * (args.n // len(p) + 1))[: args.n]
    tta = pred.tta if args.tta is None else args.tta
    pred.predict(patches[:64], tta=tta)  # warm-up

    t = time.perf_counter()
    pred.predict(patches, tta=tta, batch_size=64)
    batched = args.n / (time.perf_counter() - t)

    t = time.perf_counter()
    for i in range(args.naive_n):
        pred.predict(patches[i : i + 1], tta=tta, batch_size=1)
    naive = args.naive_n / (time.perf_counter() - t)

    ctx = {}
    if pred.has_context:
        xy = df[["x", "y"]].to_numpy(float)
        tok = pred.predict(p, tta=tta, tokens=True)
        t = time.perf_counter()
        pred.predict_in_context(tok.feat, tok.zhat, xy * 0.6874)
        spots = time.perf_counter() - t
        # a 64 × 64 grid of 112 µm cells (tokens reused from the spots: timing only)
        rr, cc = np.mgrid[0:64, 0:64]
        cells = np.stack([rr.ravel(), cc.ravel()], 1)
        rep = np.arange(len(cells)) % len(p)
        t = time.perf_counter()
        pred.predict_in_context(
            tok.feat[:, rep], tok.zhat[:, rep], cells[:, ::-1] * 112.0, cells=cells, tile_um=112.0
        )
        grid = time.perf_counter() - t
        ctx = {
            "context_ms_per_tile_spots": round(1000 * spots / len(p), 3),
            "context_ms_per_tile_grid4096": round(1000 * grid / len(cells), 3),
            "tile_pass_ms_per_tile": round(1000 / batched, 2),
            "context_share_of_tile_pass": round((grid / len(cells)) / (1 / batched), 3),
        }

    out = {
        "model": pred.name,
        "tta": tta,
        "patch": f"{pred.patch_px} px = {pred.patch_um} um",
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "batched_tiles_per_s": round(batched, 1),
        "naive_tiles_per_s": round(naive, 1),
        "speedup": round(batched / naive, 2),
        **ctx,
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
