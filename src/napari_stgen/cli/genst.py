"""``stgen train genst`` and ``stgen evaluate genst`` (heavy imports inside handlers)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register_train(sub) -> None:
    p = sub.add_parser(
        "genst",
        help="train GenST (two VQ-VAEs + alignment) on HER2ST-layout sections",
        description="Train GenST on the sections of --data (leaving out --holdout if given) "
        "and write a safetensors checkpoint + JSON model card to --out.",
    )
    p.add_argument("--data", required=True, type=Path, help="HER2ST-layout directory")
    p.add_argument("--out", required=True, type=Path, help="output .safetensors checkpoint")
    p.add_argument("--epochs", type=int, default=None, help="alignment epochs (default: recipe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from <out>.resume state")
    p.add_argument("--holdout", default=None, help="section to leave out of training")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    _recipe_args(p)
    p.add_argument("--cache", type=Path, default=None, help="patch cache directory")
    p.add_argument("--name", default=None, help="model name in the card")
    p.add_argument("--folds-json", type=Path, default=None, help="fold figures for the card")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_train)


def register_evaluate(sub) -> None:
    p = sub.add_parser(
        "genst",
        help="leave-one-section-out evaluation of GenST with baselines (prints JSON)",
        description="Train GenST without --holdout (or load --model), score it and the "
        "baselines (training mean, ridge on colour/texture, supervised CNN) on --holdout: "
        "mean Pearson over the 50 benchmark genes.",
    )
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--holdout", required=True)
    p.add_argument("--model", default=None, help="evaluate this checkpoint instead of training")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    _recipe_args(p)
    p.add_argument("--cnn-epochs", type=int, default=30)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--per-gene", action="store_true", help="include per-gene figures")
    p.set_defaults(func=_evaluate)
    c = sub.add_parser(
        "codes",
        help="GenST gene codes vs pathologist regions (NMI/ARI beside k-means; prints JSON)",
        description="Assign gene codes from measured expression on the labelled HER2ST "
        "sections (A1, B1, C1, D1, E1, F1) and score them against the pathologist's regions.",
    )
    c.add_argument("--data", required=True, type=Path, help="her2st_expression directory")
    c.add_argument("--model", default="default", help="GenST checkpoint (name or path)")
    c.add_argument("--seeds", type=int, default=10, help="k-means seeds")
    c.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    c.set_defaults(func=_evaluate_codes)


def _recipe_args(p) -> None:
    p.add_argument(
        "--stain-aug",
        choices=["rgb", "hed"],
        default="rgb",
        help="colour augmentation: per-channel RGB jitter or H/E/DAB-space jitter",
    )
    p.add_argument("--hed-sigma", type=float, default=0.1, help="H/E/DAB jitter strength")
    p.add_argument(
        "--gene-data",
        default=None,
        help="directory of expression-only sections the gene VQ-VAE also learns from "
        "(sections of the held-out section's patient are left out)",
    )


def _tcfg(args):
    from napari_stgen.training.genst import TrainConfig

    t = TrainConfig(
        seed=args.seed,
        threads=args.threads,
        stain_aug=args.stain_aug,
        hed_sigma=args.hed_sigma,
        gene_data=args.gene_data,
    )
    if args.epochs is not None:
        t.epochs = args.epochs
    return t


def _train(args: argparse.Namespace) -> int:
    from napari_stgen.training.data import CardNotes
    from napari_stgen.training.genst import train_and_save

    tcfg = _tcfg(args)
    cmd = "stgen " + " ".join(sys.argv[1:]) if sys.argv and "stgen" in sys.argv[0] else None
    path = train_and_save(
        args.data,
        args.out,
        tcfg,
        holdout=args.holdout,
        resume=args.resume,
        cache_dir=args.cache,
        notes=CardNotes(name=args.name, command=cmd),
        folds_json=args.folds_json,
        progress=not args.no_progress,
    )
    print(path)
    return 0


def _strip(res: dict) -> dict:
    def walk(d):
        if isinstance(d, dict):
            drop = ("per_gene", "spot_predictions")
            return {k: walk(v) for k, v in d.items() if k not in drop}
        return d

    return walk(res)


def _write_json(text: str, out: Path | None) -> None:
    import os

    print(text)
    if out:
        tmp = out.with_name(out.name + ".partial")
        tmp.write_text(text + "\n")
        os.replace(tmp, out)


def _evaluate_codes(args: argparse.Namespace) -> int:
    import json

    from napari_stgen.inference.predictor import load_genst
    from napari_stgen.training.evaluate_codes import codes_vs_pathology

    res = codes_vs_pathology(load_genst(args.model, device="cpu"), args.data, seeds=args.seeds)
    _write_json(json.dumps(res, indent=2), args.out)
    return 0


def _evaluate(args: argparse.Namespace) -> int:

    import torch

    from napari_stgen.training.evaluate_genst import dumps, run_fold

    torch.set_num_threads(max(1, args.threads))
    res = run_fold(
        args.data,
        args.holdout,
        model=args.model,
        tcfg=_tcfg(args),
        baselines=not args.no_baselines,
        cnn_epochs=args.cnn_epochs,
        cache_dir=args.cache,
        log=lambda s: print(s, file=sys.stderr),
    )
    if not args.per_gene:
        res = _strip(res)
    _write_json(dumps(res), args.out)
    return 0
