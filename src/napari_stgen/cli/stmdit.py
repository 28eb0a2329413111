"""Arguments of ``stgen train stmdit``, ``stgen train stmdit-ae``, ``stgen evaluate stmdit`` and
``stgen synthesize`` (handlers: ``stmdit_commands``)."""

from __future__ import annotations

import argparse

from napari_stgen.cli.lazy import command


def register_train(sub) -> None:
    p = sub.add_parser("stmdit", help="train the STMDiT tile generator")
    p.add_argument("--data", required=True, help="HER2ST directory (S.jpg, S.tsv.gz, ...)")
    p.add_argument("--out", required=True, help="output checkpoint (.safetensors)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from <out>.state")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--holdout", nargs="*", default=[], help="sections left out (fold model)")
    p.add_argument(
        "--labels",
        default="both",
        choices=["real", "ptpl", "both"],
        help="measured spots, GenST pseudo-labels on every tissue tile, or both",
    )
    p.add_argument("--genst", default="default", help="GenST checkpoint (condition encoders)")
    p.add_argument(
        "--ae",
        default=None,
        help="pre-trained tile autoencoder: a file, or an STMDiT checkpoint name/path such as "
        "'default' (its autoencoder); else one is trained",
    )
    p.add_argument("--ae-steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--gene-subset",
        type=float,
        default=0.0,
        metavar="P",
        help="share of training profiles that keep only a random subset of genes (others at "
        "the training median), so one gene can move the tile on its own",
    )
    p.add_argument(
        "--gene-single",
        type=float,
        default=0.0,
        metavar="Q",
        help="share of the --gene-subset profiles that keep exactly one gene (drawn by its "
        "training standard deviation)",
    )
    p.set_defaults(func=command("stmdit_commands:train"))
    _register_train_ae(sub)


def _register_train_ae(sub) -> None:
    p = sub.add_parser(
        "stmdit-ae",
        help="train the v2 tile autoencoder (0.875 µm/px, ×8) of STMDiT; resumable",
    )
    p.add_argument("--data", required=True, help="HER2ST directory")
    p.add_argument("--out", required=True, help="output weights (.safetensors); state: <out>.state")
    p.add_argument(
        "--resume",
        default=None,
        metavar="STATE",
        help="continue from this state file (bit-identical) or warm-start from a weights file",
    )
    p.add_argument("--steps", type=int, default=12000, help="length of the whole schedule")
    p.add_argument("--stop-after", type=int, default=None, help="stop (state saved) at this step")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop-px", type=int, default=64, help="training crop size")
    p.add_argument("--disc-start", type=int, default=2500, help="step the PatchGAN term starts")
    p.add_argument(
        "--disc-warmup", type=int, default=100, help="steps a new discriminator trains alone"
    )
    p.add_argument(
        "--disc-gate",
        type=float,
        default=0.2,
        help="the generator's adversarial weight × clamp(D's moving real−fake logit gap / this, "
        "0, 1); 0 turns the gate off",
    )
    p.add_argument(
        "--adaptive-max", type=float, default=1.0, help="clamp of the adaptive adversarial weight"
    )
    p.add_argument(
        "--disc-norm", choices=["group", "spectral"], default="group", help="PatchGAN norm"
    )
    p.add_argument("--lecam-weight", type=float, default=0.0, help="LeCam regulariser of D")
    p.add_argument("--holdout", nargs="*", default=["C3"], help="sections not trained on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-every-s", type=float, default=240.0, help="checkpoint interval (s)")
    p.add_argument("--cache", default=None, help="image cache directory")
    p.set_defaults(func=command("stmdit_commands:train_ae"))


def register_evaluate(sub) -> None:
    p = sub.add_parser("stmdit", help="evaluate STMDiT on a held-out section (prints JSON)")
    p.add_argument("--data", required=True)
    p.add_argument(
        "--holdout",
        required=True,
        help="held-out section (the model must not "
        "have been trained on it: train a fold model with --holdout)",
    )
    p.add_argument(
        "--model",
        default="default",
        help="STMDiT checkpoint evaluated, or with --train-fold the one whose recipe is used",
    )
    p.add_argument(
        "--train-fold",
        default=None,
        metavar="CKPT",
        help="first train (or reuse/resume) CKPT with --model's recorded recipe minus the "
        "hold-out section, then evaluate CKPT",
    )
    p.add_argument("--genst", default="default", help="GenST re-predictor")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--parts",
        nargs="*",
        default=["fidelity", "control", "realism", "speed"],
        choices=["fidelity", "control", "realism", "speed"],
    )
    _sampler_args(p)
    p.add_argument(
        "--guide",
        default=None,
        metavar="GENST",
        help="GenST checkpoint that guides (default: the card's); for a held-out section use "
        "one trained without it, e.g. `stgen train genst --holdout SECTION`",
    )
    p.set_defaults(func=command("stmdit_commands:evaluate"))


def register(sub) -> None:
    p = sub.add_parser("synthesize", help="generate an H&E tile conditioned on gene expression")
    p.add_argument("--out", required=True, help="output PNG (µm/px in metadata + .json sidecar)")
    p.add_argument(
        "--genes",
        nargs="*",
        default=[],
        metavar="GENE=VALUE",
        help="log1p CP10k values; genes not given: predicted at --context, "
        "else the training median",
    )
    p.add_argument(
        "--from-h5ad",
        default=None,
        metavar="H5AD",
        help="conditioning profile "
        "from an AnnData row (X in log1p CP10k, e.g. `stgen predict` output)",
    )
    p.add_argument("--obs", default=None, metavar="ID", help="obs name of the row in --from-h5ad")
    p.add_argument("--context", default=None, metavar="SLIDE", help="slide for morphology")
    p.add_argument(
        "--at",
        nargs=2,
        type=float,
        default=None,
        metavar=("X", "Y"),
        help="tile centre on --context in µm",
    )
    p.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="µm/px of a --context slide without resolution metadata",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    _sampler_args(p)
    p.add_argument("--model", default="default", help="STMDiT checkpoint name or path")
    p.add_argument(
        "--genst", default="default", help="GenST model for context genes and expression guidance"
    )
    p.set_defaults(func=command("stmdit_commands:synthesize_tile"))


def _sampler_args(p: argparse.ArgumentParser) -> None:
    """Overrides of the model card's sampler guidance (None: the card's)."""
    p.add_argument("--guidance-genes", type=float, default=None)
    p.add_argument("--guidance-morph", type=float, default=None)
    p.add_argument(
        "--guidance-expr",
        type=float,
        default=None,
        help="GenST expression guidance scale (default: the model card's; 0: off)",
    )
