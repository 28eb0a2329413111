"""Handlers of ``cli/batch.py``'s commands (loaded when one runs)."""

from __future__ import annotations

import argparse
import sys

from napari_stgen.cli.predict import common_options, predict_error, predict_message
from napari_stgen.errors import StgenError
from napari_stgen.inference.cohort import format_summary, run_batch


def run(args: argparse.Namespace) -> int:
    try:
        rows = run_batch(
            args.slides,
            args.out_dir,
            grid=args.grid,
            spots_dir=args.spots_dir,
            scheduler=args.scheduler,
            workers=args.workers,
            processes=not args.no_processes,
            **common_options(args),
            progress=not args.quiet,
            fmt=args.format,
        )
    except StgenError as e:
        raise predict_error(e) from e
    shown = [{**r, "error": predict_message(str(r.get("error") or ""))} for r in rows]
    print(format_summary(shown))
    print(f"summary: {args.out_dir.rstrip('/')}/summary.csv", file=sys.stderr)
    return 1 if any(r["status"] == "failed" for r in rows) else 0

