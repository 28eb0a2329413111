"""Handlers of ``cli/histotx.py``'s commands (loaded when one runs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from napari_stgen.errors import StgenError
from napari_stgen.inference.histotx import load_histotx
from napari_stgen.io.atomic import write_text_atomic
from napari_stgen.io.her2st import list_expression_sections, list_sections
from napari_stgen.training.data import CardNotes
from napari_stgen.training.evaluate_histotx import (
    PATIENTS,
    Comparators,
    HiddenSplit,
    load_lopo_data,
    lopo_fold,
    lopo_summary,
    run_histotx_fold,
)
from napari_stgen.training.histotx import TrainConfig, train_and_save_histotx


def _tcfg(args: argparse.Namespace):
    t = TrainConfig(seed=args.seed, threads=getattr(args, "threads", 1))
    if getattr(args, "knn_k", None) is not None:
        t.knn_k = max(0, args.knn_k)
    if getattr(args, "knn_bw_um", None) is not None:
        t.knn_bw_um = max(0.0, args.knn_bw_um)
    if args.steps is not None:
        if args.steps < 1:
            raise StgenError("--steps must be >= 1")
        t.steps = args.steps
    return t


def run_train(args: argparse.Namespace) -> int:
    ev = None
    if args.evaluation:
        try:
            ev = json.loads(Path(args.evaluation).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StgenError(f"{args.evaluation}: cannot read evaluation JSON ({e})") from e
    cmd = "stgen " + " ".join(sys.argv[1:]) if sys.argv and "stgen" in sys.argv[0] else None
    path = train_and_save_histotx(
        args.data,
        args.out,
        _tcfg(args),
        holdout=args.holdout,
        cache_dir=args.cache,
        notes=CardNotes(name=args.name, command=cmd, evaluation=ev),
        expression_dir=args.expression_data,
        holdout_patient=args.holdout_patient,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    print(path)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    if not 0.0 < args.hide < 1.0:
        raise StgenError("--hide must be between 0 and 1")
    lopo = args.protocol == "lopo" or (args.protocol is None and args.holdout_patient is not None)
    if lopo:
        res = _run_lopo(args)
    elif args.holdout is None:
        raise StgenError("--holdout is required (or use --protocol lopo / --holdout-patient)")
    else:
        res = _run_section(args)
    text = json.dumps(res, indent=2)
    if args.out:
        write_text_atomic(args.out, text + "\n")
    print(text)
    return 0


def _expression_dir(args: argparse.Namespace):
    if args.expression_data:
        d = Path(args.expression_data)
        if not d.is_dir():
            raise StgenError(f"{d}: not a directory (--expression-data)")
        return d
    d = Path(args.data).resolve().parent / "her2st_expression"
    return d if d.is_dir() else None


def _run_lopo(args: argparse.Namespace) -> dict:
    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    edir = _expression_dir(args)
    imaged = expression = None
    if args.sections is not None:
        have_img = set(list_sections(args.data))
        have_expr = set(list_expression_sections(edir)) if edir is not None else set()
        unknown = [n for n in args.sections if n not in have_img | have_expr]
        if unknown:
            raise StgenError(f"--sections: no section {unknown} in {args.data} or {edir}")
        imaged = [n for n in args.sections if n in have_img]
        expression = [n for n in args.sections if n in have_expr and n not in have_img]
    data = load_lopo_data(args.data, edir, imaged, expression, args.cache)
    have = sorted({s.patient for s in data.sets})
    pts = args.holdout_patient or [p for p in PATIENTS if p in have]
    bad = [p for p in pts if p not in have]
    if bad:
        raise StgenError(f"no section of patient(s) {bad}; patients in the data: {have}")
    model = None
    if args.model:
        model = load_histotx(args.model, device="cpu")
    folds = [
        lopo_fold(
            data,
            p,
            _tcfg(args),
            model=model,
            split_seeds=tuple(args.split_seeds or (0,)),
            hide_frac=args.hide,
            adapt_steps=(args.adapt_steps,) if args.adapt_steps > 0 else (),
            log=log,
        )
        for p in pts
    ]
    if len(folds) == 1:
        return folds[0] | {"lopo_summary": lopo_summary(folds)}
    return {"split": "leave-one-patient-out", "folds": folds, "summary": lopo_summary(folds)}


def _run_section(args: argparse.Namespace) -> dict:
    return run_histotx_fold(
        args.data,
        args.holdout,
        _tcfg(args),
        model=args.model,
        split=HiddenSplit(args.hide, args.split_seed),
        compare=Comparators(gp=not args.no_gp, genst_model=args.genst),
        adapt_steps=max(0, args.adapt_steps),
        cache_dir=args.cache,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )

