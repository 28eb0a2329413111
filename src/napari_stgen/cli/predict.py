"""``stgen predict``: GenST expression at spots or on a tissue grid of one slide → .h5ad or
SpatialData .zarr."""

from __future__ import annotations

import argparse

from napari_stgen.cli import flags
from napari_stgen.cli.flags import COMMON
from napari_stgen.cli.lazy import command
from napari_stgen.errors import StgenError
from napari_stgen.inference.contract import BATCH_SIZE, DEFAULT_ADAPT_STEPS

#: how the library's error messages name ``predict_slide`` / ``run_batch`` parameters → flags
FLAGS = (
    ("region_um", "--region"),
    ("spots_dir=", "--spots-dir"),
    ("spots= (a CSV of barcode,x,y)", "--spots SPOTS.csv"),
    ("grid=True", "--grid"),
    ("workers=", "--workers"),
    ("fmt=", "--format"),
    ("model='histotx'", "--model histotx"),
    ("measured spots need", "--measured needs"),
    *COMMON,
)


def predict_message(msg: str) -> str:
    """``msg`` with ``predict`` / ``predict-batch``'s library parameter names as flags."""
    return flags.cli_message(msg, FLAGS)


def predict_error(e: StgenError) -> StgenError:
    """``e`` with ``predict`` / ``predict-batch``'s library parameter names as flags."""
    return flags.cli_error(e, FLAGS)


def add_common(p: argparse.ArgumentParser) -> None:
    """Options shared by ``predict`` and ``predict-batch``."""
    p.add_argument("--mpp", type=float, default=None, help="µm per level-0 pixel (overrides)")
    p.add_argument(
        "--model",
        default="default",
        help="checkpoint: 'default' (GenST), 'histotx' (HistoTx) or a .safetensors path",
    )
    p.add_argument(
        "--region",
        type=float,
        nargs=4,
        metavar=("X0", "Y0", "X1", "Y1"),
        default=None,
        help="restrict to this region in µm",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="patches per model batch")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def common_options(args: argparse.Namespace) -> dict:
    """The library keywords of the options ``add_common`` registers."""
    return {
        "mpp": args.mpp,
        "model": args.model,
        "region_um": args.region,
        "device": args.device,
        "batch_size": args.batch_size,
        "overwrite": args.overwrite,
    }


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="predict expression on a slide and write .h5ad or SpatialData .zarr",
        description=(
            "Predict spatial gene expression (GenST, log1p CP10k) at the spots of a CSV "
            "(barcode,x,y in level-0 px) or on a tile grid over tissue, and write AnnData "
            "that scanpy/squidpy read directly (obsm['spatial'], uns['spatial'], uns['stgen']), or "
            "with --out X.zarr a SpatialData (slide image, spot circles or tile squares, the "
            "AnnData as table; all in µm) that napari-spatialdata and spatialdata-plot open."
        ),
    )
    p.add_argument("slide", help="slide file (SVS, TIFF, OME-Zarr, JPEG/PNG with --mpp, ...)")
    p.add_argument("--out", required=True, help="output .h5ad (AnnData) or .zarr (SpatialData)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--spots", default=None, help="CSV with columns barcode,x,y (level-0 px)")
    src.add_argument("--grid", action="store_true", help="regular model-patch grid over tissue")
    add_common(p)
    p.add_argument(
        "--measured",
        default=None,
        help="HistoTx: .h5ad of measured spots on this slide (obsm['spatial'] in level-0 px)",
    )
    p.add_argument("--image-only", action="store_true", help="HistoTx: ignore --measured")
    p.add_argument(
        "--adapt-steps",
        type=int,
        default=DEFAULT_ADAPT_STEPS,
        help="HistoTx: fine-tuning steps on the measured spots before predicting (0: off; "
        f"default {DEFAULT_ADAPT_STEPS})",
    )
    p.add_argument(
        "--skip-unreadable",
        action="store_true",
        help="predict around tiles that cannot be read (NaN + obs['unreadable']) instead of "
        "stopping",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: cores-1)")
    p.set_defaults(func=command("predict_commands:run"))

