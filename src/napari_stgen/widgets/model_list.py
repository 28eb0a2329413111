"""Model checkpoints the widgets offer: 'default' then the other files in ``weights/``."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["list_models", "list_stmdit_models"]

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


def list_models(kinds: tuple[str, ...] = ("genst", "histotx")) -> list[str]:
    """Model names offered in the picker: 'default' then other checkpoints in weights/."""
    wdir = WEIGHTS_DIR
    names = ["default"]
    for p in sorted(wdir.glob("*.safetensors")):
        kind = p.stem.split("_")[0]
        side = p.with_suffix(".json")
        if side.exists():
            try:
                kind = str(json.loads(side.read_text()).get("kind", kind))
            except (OSError, ValueError):
                pass
        if kind in kinds and p.stem != "genst_default":
            names.append(str(p))
    return names


def list_stmdit_models() -> list[str]:
    """'default' then other STMDiT checkpoints shipped in weights/."""
    wdir = WEIGHTS_DIR
    names = ["default"]
    for p in sorted(wdir.glob("stmdit_*.safetensors")):
        if p.stem != "stmdit_default":
            names.append(str(p))
    return names
