"""Handlers of ``cli/genst.py``'s commands (loaded when one runs)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from napari_stgen.errors import StgenError
from napari_stgen.inference.predictor import load_genst
from napari_stgen.io.atomic import write_text_atomic
from napari_stgen.models.checkpoint import sha256_file
from napari_stgen.training.data import CardNotes
from napari_stgen.training.evaluate_codes import codes_vs_pathology, update_card
from napari_stgen.training.evaluate_genst import run_genst_fold
from napari_stgen.training.genst import TrainConfig, train_and_save_genst


def _tcfg(args):
    t = TrainConfig(
        seed=args.seed,
        threads=args.threads,
        stain_aug=args.stain_aug,
        hed_sigma=args.hed_sigma,
        gene_data=args.gene_data,
        weight_avg_from=args.weight_avg_from,
        w_consist=args.consistency,
    )
    if args.epochs is not None:
        t.epochs = args.epochs
    return t


def train(args: argparse.Namespace) -> int:
    tcfg = _tcfg(args)
    cmd = "stgen " + " ".join(sys.argv[1:]) if sys.argv and "stgen" in sys.argv[0] else None
    path = train_and_save_genst(
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


def _write_json(res: dict, out: Path | None) -> None:
    text = json.dumps(res, indent=2)
    print(text)
    if out:
        write_text_atomic(out, text + "\n")


def evaluate_codes(args: argparse.Namespace) -> int:
    pred = load_genst(args.model, device="cpu")
    if args.update_card is not None and sha256_file(args.update_card) != pred.checksum:
        raise StgenError(f"{args.update_card}: not the --model checkpoint ({pred.path})")
    res = codes_vs_pathology(pred, args.data, seeds=args.seeds)
    if args.update_card is not None:
        cmd = "stgen " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        update_card(args.update_card, res, cmd)
    _write_json(res, args.out)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, args.threads))
    res = run_genst_fold(
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
    _write_json(res, args.out)
    return 0

