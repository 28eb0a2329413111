"""``stgen predict-batch``: a cohort of slides, one dask.distributed task per slide."""

from __future__ import annotations

import argparse

from napari_stgen.cli.lazy import command
from napari_stgen.cli.predict import add_common


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict-batch",
        help="predict many slides on a dask.distributed cluster",
        description=(
            "Run `stgen predict` on every slide as one dask.distributed task: a LocalCluster by "
            "default, or an existing cluster with --scheduler tcp://host:8786. Outputs are "
            "<out-dir>/<slide stem>.h5ad (.zarr with --format spatialdata); slides whose output "
            "exists are skipped unless --overwrite; a failing slide is reported and the others "
            "finish. Prints a summary table and writes <out-dir>/summary.csv. Exit code 1 when "
            "any slide failed."
        ),
    )
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files")
    p.add_argument("--out-dir", required=True, help="directory for the outputs")
    p.add_argument(
        "--format",
        default="h5ad",
        choices=("h5ad", "spatialdata"),
        help="h5ad (AnnData) or spatialdata (SpatialData .zarr: image, shapes, table)",
    )
    p.add_argument("--scheduler", default=None, metavar="ADDRESS", help="e.g. tcp://host:8786")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    p.add_argument(
        "--no-processes",
        action="store_true",
        help="LocalCluster workers as threads of this process (no worker processes)",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--grid", action="store_true", help="tile grid over tissue")
    src.add_argument(
        "--spots-dir",
        default=None,
        metavar="DIR",
        help="spots CSVs named <slide stem>_spots.csv or <slide stem>.csv",
    )
    add_common(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=command("batch_commands:run"))

