"""``stgen train histotx`` and ``stgen evaluate histotx`` (HistoTx: image + measured spots)."""

from __future__ import annotations

import argparse
import sys

from napari_stgen.errors import StgenError
from napari_stgen.inference.contract import DEFAULT_ADAPT_STEPS
from napari_stgen.io.her2st import list_expression_sections, list_sections


def register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "histotx",
        help="train HistoTx (image + transcript tokens) on HER2ST sections",
        description="Train HistoTx by masking measured spots on the sections of --data "
        "(HER2ST layout) and write a safetensors checkpoint with its model card.",
    )
    p.add_argument("--data", required=True, help="directory of HER2ST sections")
    p.add_argument("--out", required=True, help="output checkpoint (.safetensors)")
    p.add_argument("--holdout", default=None, help="leave this section out")
    p.add_argument(
        "--expression-data",
        default=None,
        help="also train the transcript side on these expression-only sections (no image)",
    )
    p.add_argument(
        "--holdout-patient", default=None, help="leave every section of this patient out"
    )
    p.add_argument("--knn-k", type=int, default=None, help="kNN residual of the model (0: off)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--name", default=None, help="model name in the card")
    p.add_argument("--evaluation", default=None, help="JSON of fold figures for the card")
    p.add_argument("--cache", default=None, help="image-feature cache directory")
    p.set_defaults(func=run_train)


def register_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "histotx",
        help="HistoTx benchmark: leave-one-patient-out or leave-one-section-out (JSON)",
        description="Hide half of each held-out section's spots and print JSON: Pearson "
        "(50 benchmark genes) on the hidden spots for HistoTx (transcripts only, image + "
        "transcripts, image only, adapted) beside kNN interpolation of the visible spots "
        "(k = 4 and 8, plain mean). --holdout-patient / --protocol lopo: train on every "
        "section (imaged + expression-only) of the other patients, test on that patient's "
        "sections. --holdout: train without one section (also nearest-neighbour, Gaussian "
        "process and GenST with --genst).",
    )
    p.add_argument("--data", required=True, help="directory of HER2ST sections")
    p.add_argument(
        "--protocol",
        choices=("section", "lopo"),
        default=None,
        help="section: leave --holdout out (default); lopo: leave-one-patient-out over A-F "
        "(imaged + expression-only sections; --holdout-patient, default every patient)",
    )
    p.add_argument("--holdout", default=None, help="section to hold out (protocol section)")
    p.add_argument(
        "--holdout-patient",
        nargs="*",
        default=None,
        help="patient(s) to hold out (implies --protocol lopo)",
    )
    p.add_argument(
        "--expression-data",
        default=None,
        help="expression-only sections (default: her2st_expression beside --data, if there)",
    )
    p.add_argument(
        "--split-seeds", nargs="*", type=int, default=None, help="split seeds (lopo; default 0)"
    )
    p.add_argument(
        "--sections",
        nargs="*",
        default=None,
        help="lopo: read only these sections (imaged or expression-only; default all)",
    )
    p.add_argument("--model", default=None, help="evaluate this checkpoint instead of training")
    p.add_argument("--genst", default=None, help="GenST checkpoint to compare (name or path)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps when training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hide", type=float, default=0.5, help="fraction of held-out spots hidden")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the hidden/visible split")
    p.add_argument(
        "--adapt-steps",
        type=int,
        default=DEFAULT_ADAPT_STEPS,
        help="test-time adaptation steps on the visible spots (0: off; default "
        f"{DEFAULT_ADAPT_STEPS}, chosen leave-one-patient-out: docs/histotx.md)",
    )
    p.add_argument("--knn-k", type=int, default=None, help="kNN residual of the model (0: off)")
    p.add_argument("--no-gp", action="store_true", help="skip the Gaussian-process baseline")
    p.add_argument("--cache", default=None, help="image-feature cache directory")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.set_defaults(func=run_evaluate)


def _tcfg(args: argparse.Namespace):
    from napari_stgen.training.histotx import TrainConfig

    t = TrainConfig(seed=args.seed, threads=getattr(args, "threads", 1))
    if getattr(args, "knn_k", None) is not None:
        t.knn_k = max(0, args.knn_k)
    if args.steps is not None:
        if args.steps < 1:
            raise StgenError("--steps must be >= 1")
        t.steps = args.steps
    return t


def run_train(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from napari_stgen.training.data import CardNotes
    from napari_stgen.training.histotx import train_and_save

    ev = None
    if args.evaluation:
        try:
            ev = json.loads(Path(args.evaluation).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StgenError(f"{args.evaluation}: cannot read evaluation JSON ({e})") from e
    cmd = "stgen " + " ".join(sys.argv[1:]) if sys.argv and "stgen" in sys.argv[0] else None
    path = train_and_save(
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
    import os
    from pathlib import Path

    from napari_stgen.training.evaluate_histotx import dumps

    if not 0.0 < args.hide < 1.0:
        raise StgenError("--hide must be between 0 and 1")
    lopo = args.protocol == "lopo" or (args.protocol is None and args.holdout_patient is not None)
    if lopo:
        res = _run_lopo(args)
    elif args.holdout is None:
        raise StgenError("--holdout is required (or use --protocol lopo / --holdout-patient)")
    else:
        res = _run_section(args)
    text = dumps(res)
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(f".{out.name}.partial")
        tmp.write_text(text + "\n")
        os.replace(tmp, out)
    print(text)
    return 0


def _expression_dir(args: argparse.Namespace):
    from pathlib import Path

    if args.expression_data:
        d = Path(args.expression_data)
        if not d.is_dir():
            raise StgenError(f"{d}: not a directory (--expression-data)")
        return d
    d = Path(args.data).resolve().parent / "her2st_expression"
    return d if d.is_dir() else None


def _run_lopo(args: argparse.Namespace) -> dict:
    from napari_stgen.training.evaluate_histotx import (
        PATIENTS,
        load_lopo_data,
        lopo_fold,
        lopo_summary,
    )

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

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
        from napari_stgen.inference.histotx import load_histotx

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
    from napari_stgen.training.evaluate_histotx import Comparators, HiddenSplit, run_fold

    return run_fold(
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
