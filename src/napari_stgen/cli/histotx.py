"""``stgen train histotx`` and ``stgen evaluate histotx`` (HistoTx: image + measured spots)."""

from __future__ import annotations

import argparse

from napari_stgen.cli.lazy import command
from napari_stgen.inference.contract import DEFAULT_ADAPT_STEPS


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
    p.add_argument(
        "--knn-bw-um", type=float, default=None,
        help="Gaussian bandwidth (µm) weighting the kNN residual's neighbours (0: plain mean)",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--name", default=None, help="model name in the card")
    p.add_argument("--evaluation", default=None, help="JSON of fold figures for the card")
    p.add_argument("--cache", default=None, help="image-feature cache directory")
    p.set_defaults(func=command("histotx_commands:run_train"))


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
    p.add_argument(
        "--knn-bw-um", type=float, default=None,
        help="Gaussian bandwidth (µm) weighting the kNN residual's neighbours (0: plain mean)",
    )  # fmt: skip
    p.add_argument("--no-gp", action="store_true", help="skip the Gaussian-process baseline")
    p.add_argument("--cache", default=None, help="image-feature cache directory")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.set_defaults(func=command("histotx_commands:run_evaluate"))
