"""GenST held-out figures with and without stain normalisation at inference.

For each fold model (trained without its held-out section, with the shipped HED stain
augmentation), the held-out section is scored as ``stgen evaluate genst --model`` does, once
on its own colours and once per normalisation method of ``inference/stain.py`` (the held-out
patches moved to the training sections' tissue statistics).

    python scripts/eval_stain_norm.py --data ../shared/data/her2st \\
        --fold B4=fold_B4.safetensors --fold C2=fold_C2.safetensors --out docs/genst_stain_norm.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from napari_stgen.io.atomic import write_text_atomic
from napari_stgen.training.evaluate_genst import run_genst_fold

KEYS = ("genst", "genst_tile")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--fold", action="append", required=True, help="HOLDOUT=CHECKPOINT")
    ap.add_argument("--methods", nargs="*", default=["none", "reinhard", "hed"])
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    folds = []
    for f in a.fold:
        holdout, path = f.split("=", 1)
        row: dict = {"holdout": holdout, "model": path}
        for m in a.methods:
            r = run_genst_fold(
                a.data, holdout, model=path, baselines=False, progress=False,
                stain_norm=None if m == "none" else m,
            )
            if r["model_saw_holdout"]:
                raise SystemExit(f"{path} was trained on {holdout}: not a held-out figure")
            row.update(split=r["split"], train_sections=r["train_sections"])
            row[m] = {k: r["summary"][k] for k in KEYS}
            print(json.dumps({"holdout": holdout, "method": m, **row[m]}), flush=True)
        folds.append(row)
    res = {
        "protocol": "held-out section, mean Pearson over the 50 benchmark genes; normalisation "
        "maps the held-out patches' tissue statistics to the training sections' "
        "(inference/stain.py)",
        "folds": folds,
        "mean": {
            m: {k: round(float(np.mean([f[m][k] for f in folds])), 4) for k in KEYS}
            for m in a.methods
        },
    }
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        write_text_atomic(a.out, text + "\n")


if __name__ == "__main__":
    main()
