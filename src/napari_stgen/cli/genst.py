"""``stgen train genst`` and ``stgen evaluate genst`` (heavy imports inside handlers)."""

from __future__ import annotations

from pathlib import Path

from napari_stgen.cli.lazy import command


def register_train(sub) -> None:
    p = sub.add_parser(
        "genst",
        help="train GenST (two VQ-VAEs + alignment) on HER2ST-layout sections",
        description="Train GenST on the sections of --data (leaving out --holdout if given) "
        "and write a safetensors checkpoint + JSON model card to --out.",
    )
    p.add_argument("--data", required=True, type=Path, help="HER2ST-layout directory")
    p.add_argument("--out", required=True, type=Path, help="output .safetensors checkpoint")
    p.add_argument("--epochs", type=int, default=None, help="alignment epochs (default: recipe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from <out>.resume state")
    p.add_argument("--holdout", default=None, help="section to leave out of training")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    _recipe_args(p)
    p.add_argument("--cache", type=Path, default=None, help="patch cache directory")
    p.add_argument("--name", default=None, help="model name in the card")
    p.add_argument("--folds-json", type=Path, default=None, help="fold figures for the card")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=command("genst_commands:train"))


def register_evaluate(sub) -> None:
    p = sub.add_parser(
        "genst",
        help="leave-one-section-out evaluation of GenST with baselines (prints JSON)",
        description="Train GenST without --holdout (or load --model), score it and the "
        "baselines (training mean, ridge on colour/texture, supervised CNN) on --holdout: "
        "mean Pearson over the 50 benchmark genes.",
    )
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--holdout", required=True)
    p.add_argument("--model", default=None, help="evaluate this checkpoint instead of training")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    _recipe_args(p)
    p.add_argument("--cnn-epochs", type=int, default=30)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--per-gene", action="store_true", help="include per-gene figures")
    p.set_defaults(func=command("genst_commands:evaluate"))
    c = sub.add_parser(
        "codes",
        help="GenST gene codes vs pathologist regions (NMI/ARI beside k-means; prints JSON)",
        description="Assign gene codes from measured expression on the labelled HER2ST "
        "sections (A1, B1, C1, D1, E1, F1) and score them against the pathologist's regions.",
    )
    c.add_argument("--data", required=True, type=Path, help="her2st_expression directory")
    c.add_argument("--model", default="default", help="GenST checkpoint (name or path)")
    c.add_argument("--seeds", type=int, default=10, help="k-means seeds")
    c.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    c.add_argument(
        "--update-card",
        type=Path,
        default=None,
        metavar="CKPT",
        help="also store the per-code region counts in this GenST checkpoint's card (the "
        "Codebook widget suggests code names from them); must be the --model checkpoint",
    )
    c.set_defaults(func=command("genst_commands:evaluate_codes"))


def _recipe_args(p) -> None:
    p.add_argument(
        "--stain-aug",
        choices=["rgb", "hed"],
        default="rgb",
        help="colour augmentation: per-channel RGB jitter or H/E/DAB-space jitter",
    )
    p.add_argument("--hed-sigma", type=float, default=0.1, help="H/E/DAB jitter strength")
    p.add_argument(
        "--weight-avg-from",
        type=float,
        default=0.0,
        help="average the alignment stage's weights over its iterates from this fraction of "
        "its steps on (0: off; SWA/SWAD)",
    )
    p.add_argument(
        "--consistency",
        type=float,
        default=0.0,
        help="weight of an MSE between two augmented views' latents (0: off)",
    )
    p.add_argument(
        "--gene-data",
        default=None,
        help="directory of expression-only sections the gene VQ-VAE also learns from "
        "(sections of the held-out section's patient are left out)",
    )

