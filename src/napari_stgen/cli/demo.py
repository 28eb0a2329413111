"""``stgen demo``: the whole job on the bundled sample slide with the bundled checkpoints.

Predicts expression at the sample's measured spots and on a tissue grid (GenST), writes both as
.h5ad, compares predictions with the measured counts, draws a figure, and, when the STMDiT
checkpoint is present, generates a tile at the spot with the highest predicted ERBB2 twice: as
predicted and with ERBB2 raised.

Honest by construction: stdout carries only the JSON summary (progress goes to stderr); the
summary says when the sample is one of the default model's training sections and prints the
model card's held-out (leave-one-section-out) figures beside the in-sample ones; the figure
draws measured and predicted on one colour scale; the grid covers the tissue under the spots.
"""

from __future__ import annotations

import argparse

from napari_stgen.cli.lazy import command


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run predict (+ synthesize) on the bundled sample slide",
        description=__doc__,
    )
    p.add_argument("--out-dir", default="stgen-demo", help="output folder (default stgen-demo)")
    p.add_argument("--gene", default="ERBB2", help="gene shown in the figure (default ERBB2)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-synthesis", action="store_true", help="skip tile generation")
    p.set_defaults(func=command("demo_commands:run"))
