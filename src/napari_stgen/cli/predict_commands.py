"""Handlers of ``cli/predict.py``'s commands (loaded when one runs)."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from napari_stgen.cli.predict import common_options, predict_error
from napari_stgen.errors import StgenError
from napari_stgen.inference.batch import predict_slide
from napari_stgen.inference.device import set_threads


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        print("stgen: error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    set_threads(args.threads)
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:  # created on the first batch: bad input errors stay one line

            bar = tqdm(total=total, unit="patch", desc="predict", file=sys.stderr, leave=False)
        bar.n = done
        bar.refresh()

    try:
        path = predict_slide(
            args.slide,
            args.out,
            spots=args.spots,
            grid=args.grid,
            **common_options(args),
            progress=None if args.quiet else progress,
            measured=args.measured,
            image_only=args.image_only,
            adapt_steps=max(0, args.adapt_steps),
            skip_unreadable=args.skip_unreadable,
        )
    except StgenError as e:
        raise predict_error(e) from e
    finally:
        if bar is not None:
            bar.close()
    print(path)
    return 0

