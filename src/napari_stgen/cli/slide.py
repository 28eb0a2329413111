"""``stgen info SLIDE``: what a slide is, as JSON."""

from __future__ import annotations

import argparse

from napari_stgen.cli.lazy import command


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``info`` to the ``stgen`` command line."""
    p = subparsers.add_parser(
        "info",
        help="print a slide's format, size, pyramid levels and µm/px as JSON",
        description="Print a slide's format, size, pyramid levels and µm per pixel as JSON.",
    )
    p.add_argument("slide", help="slide file (SVS, TIFF, OME-TIFF, OME-Zarr, NDPI…, JPEG/PNG)")
    p.add_argument(
        "--mpp", type=float, default=None, help="µm per pixel of level 0 (overrides the file)"
    )
    p.set_defaults(func=command("slide_commands:info"))
