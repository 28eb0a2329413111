"""``stgen train histotx`` and ``stgen evaluate histotx`` (HistoTx: image + measured spots)."""

from __future__ import annotations

import argparse
import sys


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
        help="leave-one-section-out HistoTx benchmark (JSON)",
        description="Train HistoTx without --holdout (or load --model), hide half of the "
        "held-out spots and print JSON: Pearson (50 benchmark genes) on the hidden spots for "
        "HistoTx image+transcripts, HistoTx image-only, nearest-neighbour and Gaussian-process "
        "interpolation of the visible spots, and GenST when --genst is given.",
    )
    p.add_argument("--data", required=True, help="directory of HER2ST sections")
    p.add_argument("--holdout", required=True, help="section to hold out")
    p.add_argument("--model", default=None, help="evaluate this checkpoint instead of training")
    p.add_argument("--genst", default=None, help="GenST checkpoint to compare (name or path)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps when training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hide", type=float, default=0.5, help="fraction of held-out spots hidden")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the hidden/visible split")
    p.add_argument(
        "--adapt-steps",
        type=int,
        default=200,
        help="test-time adaptation steps on the visible spots (0: off)",
    )
    p.add_argument("--no-gp", action="store_true", help="skip the Gaussian-process baseline")
    p.add_argument("--cache", default=None, help="image-feature cache directory")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.set_defaults(func=run_evaluate)


def _tcfg(args: argparse.Namespace):
    from ..training.histotx import TrainConfig

    t = TrainConfig(seed=args.seed, threads=getattr(args, "threads", 1))
    if args.steps is not None:
        if args.steps < 1:
            from ..errors import StgenError

            raise StgenError("--steps must be >= 1")
        t.steps = args.steps
    return t


def run_train(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..errors import StgenError
    from ..training.histotx import train_and_save

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
        name=args.name,
        evaluation=ev,
        command=cmd,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    print(path)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from ..errors import StgenError
    from ..training.evaluate_histotx import dumps, run_fold

    if not 0.0 < args.hide < 1.0:
        raise StgenError("--hide must be between 0 and 1")
    res = run_fold(
        args.data,
        args.holdout,
        _tcfg(args),
        model=args.model,
        genst_model=args.genst,
        hide_frac=args.hide,
        split_seed=args.split_seed,
        adapt_steps=max(0, args.adapt_steps),
        gp=not args.no_gp,
        cache_dir=args.cache,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    text = dumps(res)
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(f".{out.name}.partial")
        tmp.write_text(text + "\n")
        os.replace(tmp, out)
    print(text)
    return 0
