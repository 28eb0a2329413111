"""Synthesize speed on CPU: one tile and a drawn region, with and without expression guidance.

    python benchmarks/bench_synthesize.py [--threads 1] [--size-um 300] [--repeats 3]
        [--model default] [--peer OLD.safetensors]

The Synthesize widget's library path on the bundled sample slide with the shipped GenST and
STMDiT: region profile (engine), context reading and generation of one variant at the card's
settings, against the same generation with ``guidance_expr=0`` (the peer measured in the same
run). ``--peer``: a second STMDiT checkpoint (e.g. the previous default, from git history)
measured the same way in the same run. Prints JSON; the ratios are the figures that travel
between machines.
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
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size-um", type=float, default=300.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="default", help="STMDiT checkpoint measured")
    ap.add_argument("--peer", default=None, help="a second STMDiT checkpoint, same run")
    args = ap.parse_args(argv)

    import torch

    from napari_stgen.inference import synthesis_grid as sg
    from napari_stgen.inference.predictor import load_genst
    from napari_stgen.io.sample import sample_slide_path
    from napari_stgen.io.slide import open_slide

    torch.set_num_threads(args.threads)
    genst = load_genst("default", device="cpu")
    out: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "torch_threads": args.threads,
    }
    with open_slide(sample_slide_path()) as slide:
        for key, name in (("model", args.model), ("peer", args.peer)):
            if name is not None:
                out[key] = _measure(slide, genst, sg.load_generator(name), args)
    if "peer" in out:
        m, p = out["model"]["one_tile"], out["peer"]["one_tile"]
        out["one_tile_guided_model_vs_peer"] = round(
            m["generate_guided_s"] / p["generate_guided_s"], 2
        )
    print(json.dumps(out, indent=1))
    return 0


def _measure(slide, genst, model, args) -> dict:
    """One tile and a ``--size-um`` region: profile + context, guided and unguided generation."""
    from napari_stgen.inference import synthesis_grid as sg

    se = model.default_guidance_expr
    res: dict = {
        "name": model.name,
        "mpp": model.mpp,
        "tile_px": model.tile_px,
        "steps": model.default_steps,
        "guidance_expr": se,
    }
    h, w = slide.levels[0].shape[:2]
    cx, cy = w * slide.mpp / 2, h * slide.mpp / 2
    for label, size in (("one_tile", model.tile_um), ("region", args.size_um)):
        box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
        plan = sg.plan_region(box, model.mpp, model.tile_px, latent_factor=model.latent_factor)
        t0 = time.perf_counter()
        prof = sg.collect(sg.iter_region_profile(slide, model, genst, plan))
        ctx = sg.read_contexts(slide, model, plan)
        t_prep = time.perf_counter() - t0
        cond = sg.conditioning(prof, {"ERBB2": prof.value("ERBB2") + 1.0})
        times: dict[str, list[float]] = {"guided": [], "unguided": []}
        for _ in range(args.repeats):
            for name, s in (("guided", se), ("unguided", 0.0)):
                t0 = time.perf_counter()
                sg.collect(
                    sg.iter_synthesize(slide, model, prof, cond, contexts=ctx, guidance_expr=s)
                )
                times[name].append(time.perf_counter() - t0)
        g, u = float(np.median(times["guided"])), float(np.median(times["unguided"]))
        res[label] = {
            "tiles": plan.n_tiles,
            "profile_and_context_s": round(t_prep, 3),
            "generate_guided_s": round(g, 3),
            "generate_unguided_s": round(u, 3),
            "ratio_guided_vs_unguided": round(g / u, 2) if u > 0 else None,
        }
    return res


if __name__ == "__main__":
    raise SystemExit(main())
