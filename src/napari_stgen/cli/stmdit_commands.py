"""Handlers of the STMDiT commands (arguments: ``cli/stmdit.py``)."""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from napari_stgen.errors import StgenError
from napari_stgen.inference.patches import read_patches
from napari_stgen.inference.predictor import load_genst
from napari_stgen.inference.synthesis import (
    gene_vector,
    load_guide,
    load_stmdit,
    parse_gene_overrides,
    predicted_profile,
    save_tile_png,
    synthesize,
)
from napari_stgen.io.atomic import write_text_atomic
from napari_stgen.io.slide import open_slide
from napari_stgen.io.validate import check_tile_image, validate_h5ad
from napari_stgen.training.evaluate_stmdit import evaluate_stmdit
from napari_stgen.training.stmdit import RunInfo, train_fold, train_stmdit
from napari_stgen.training.stmdit_ae import AE2TrainConfig, train_autoencoder_v2


def train_ae(args: argparse.Namespace) -> int:
    """``stgen train stmdit-ae``."""
    cfg = AE2TrainConfig(
        steps=args.steps,
        batch=args.batch,
        crop_px=args.crop_px,
        disc_start=args.disc_start,
        disc_warmup=args.disc_warmup,
        disc_gate=args.disc_gate,
        adaptive_max=args.adaptive_max,
        disc_norm=args.disc_norm,
        lecam_weight=args.lecam_weight,
        holdout=tuple(args.holdout),
        seed=args.seed,
        threads=args.threads,
        save_every_s=args.save_every_s,
    )
    path = train_autoencoder_v2(
        args.data,
        args.out,
        cfg,
        resume=args.resume,
        cache_dir=args.cache,
        stop_after=args.stop_after,
        log=lambda m: print(m, flush=True),
        command="stgen " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    print(path)
    return 0


def train(args: argparse.Namespace) -> int:
    """``stgen train stmdit``."""
    path = train_stmdit(
        args.data,
        args.out,
        genst=args.genst,
        ae_path=args.ae,
        ae_steps=args.ae_steps,
        resume=args.resume,
        info=RunInfo(command="stgen " + " ".join(shlex.quote(a) for a in sys.argv[1:])),
        steps=args.steps,
        seed=args.seed,
        threads=args.threads,
        holdout=args.holdout,
        labels=args.labels,
        batch=args.batch,
        p_gene_subset=args.gene_subset,
        p_gene_single=args.gene_single,
    )
    print(path)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """``stgen evaluate stmdit``."""
    torch.set_num_threads(args.threads)
    model = args.model
    if args.train_fold is not None:
        model = str(
            train_fold(
                args.model,
                args.data,
                args.holdout,
                args.train_fold,
                log=lambda s: print(s, file=sys.stderr, flush=True),
            )
        )
    # a fold model is evaluated with the sampler settings of the model whose recipe it used
    base = load_stmdit(args.model if args.train_fold is not None else model).sampler
    settings = base.resolve(
        steps=args.steps,
        guidance_genes=args.guidance_genes,
        guidance_morph=args.guidance_morph,
        guidance_expr=args.guidance_expr,
        guide=args.guide,
    )
    res = evaluate_stmdit(
        args.data,
        args.holdout,
        model=model,
        genst=args.genst,
        seeds=args.seeds,
        settings=settings,
        parts=tuple(args.parts),
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    text = json.dumps(res, indent=1)
    if args.out:
        write_text_atomic(args.out, text + "\n")
    print(text)
    return 0


def _profile_from_h5ad(model, path: str, obs: str):
    import anndata
    import scipy.sparse as sp

    p = Path(path)
    if not p.is_file():
        raise StgenError(f"{p}: file not found")
    validate_h5ad(p, need_x=True)
    try:
        a = anndata.read_h5ad(p)
    except Exception as e:  # noqa: BLE001 - h5py/anndata raise many types
        raise StgenError(f"{p}: cannot read AnnData: {e}") from e
    if obs not in a.obs_names:
        raise StgenError(f"{p}: no obs {obs!r} (has {a.n_obs} rows, e.g. {list(a.obs_names[:3])})")
    row = a[obs].X
    row = np.asarray(row.toarray() if sp.issparse(row) else row, np.float32).ravel()
    pos = {str(g): i for i, g in enumerate(a.var_names)}
    shared = [g for g in model.genes if g in pos]
    if not shared:
        raise StgenError(f"{p}: none of its genes is in the STMDiT panel")
    return {g: float(row[pos[g]]) for g in shared}


def _save_tile(out: str, tile: np.ndarray, mpp: float, meta: dict) -> None:
    """``save_tile_png`` (atomic: no partial file stays behind), OSError as a one-line reason."""
    try:
        save_tile_png(out, tile, mpp, meta)
    except OSError as e:
        raise StgenError(f"{out}: cannot write the tile ({e.strerror or e})") from e


def synthesize_tile(args: argparse.Namespace) -> int:
    """``stgen synthesize``."""
    torch.set_num_threads(1)
    try:
        overrides = parse_gene_overrides(args.genes)
    except StgenError as e:
        raise StgenError(f"--genes: {str(e).removeprefix('gene override: ')}") from e
    if (args.from_h5ad is None) != (args.obs is None):
        raise StgenError("--from-h5ad and --obs go together")
    if (args.context is None) != (args.at is None):
        raise StgenError("--context SLIDE and --at X Y go together")
    model = load_stmdit(args.model)
    gene_vector(model, overrides)  # unknown gene names fail before any slide is read
    base = None
    ctx = None
    # one GenST, loaded when first needed, for the context profile and the expression guidance
    genst = functools.cache(lambda: load_genst(args.genst, device="cpu"))

    meta: dict = {"model": model.name, "model_sha256": model.checksum, "seed": args.seed}
    if args.context is not None:
        with open_slide(args.context, mpp=args.mpp) as slide:
            mpp = args.mpp or slide.mpp
            if not mpp:
                raise StgenError(f"{args.context}: no µm/px in the file; pass --mpp")
            xy_px = np.array([[args.at[0] / mpp, args.at[1] / mpp]])
            ctx = read_patches(slide, xy_px, 3 * model.tile_um, model.context_px, mpp=mpp)
        meta["context"] = {"slide": str(args.context), "at_um": list(args.at)}
        if args.from_h5ad is None:
            base = predicted_profile(model, ctx, genst())[0]
            meta["base_profile"] = "GenST prediction at the context location"
    if args.from_h5ad is not None:
        h = _profile_from_h5ad(model, args.from_h5ad, args.obs)
        base = gene_vector(model, h, base)
        meta["base_profile"] = f"{args.from_h5ad} obs {args.obs} ({len(h)} panel genes)"
    meta.setdefault("base_profile", "training median")
    g = gene_vector(model, overrides, base)
    gv = np.asarray(g, np.float64)
    if not np.all(np.isfinite(gv)) or np.abs(gv).max() > 50:
        i = int(np.argmax(~np.isfinite(gv) | (np.abs(gv) > 50)))
        raise StgenError(
            f"conditioning value {gv[i]:g} for {model.genes[i]} is not a log1p CP10k level "
            "(expected 0..~15)"
        )
    settings = model.sampler.resolve(
        steps=args.steps,
        guidance_genes=args.guidance_genes,
        guidance_morph=args.guidance_morph,
        guidance_expr=args.guidance_expr,
    )
    guide = load_guide(model, genst()) if settings.guidance_expr > 0 else None
    tile = synthesize(
        model, g, ctx, seed=args.seed, guide=guide, focus=list(overrides), settings=settings
    )[0]
    meta.update(
        {
            "steps": settings.steps,
            "guidance_genes": settings.guidance_genes,
            "guidance_morph": settings.guidance_morph,
            "guidance_expr": settings.guidance_expr,
            "guide": None if guide is None else {"name": guide.name, "sha256": guide.sha256},
            "overrides": overrides,
            "genes": model.genes,
            "conditioning": [round(float(v), 4) for v in g],
        }
    )
    check_tile_image(tile, args.out)
    _save_tile(args.out, tile, model.mpp, meta)
    print(f"{args.out}: {tile.shape[1]}x{tile.shape[0]} px at {model.mpp} µm/px")
    return 0
