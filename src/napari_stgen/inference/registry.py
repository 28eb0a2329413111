"""The model registry: which checkpoints exist (``weights/`` and paths) and how to load them.

::

    list_models()                     # ['default', '/…/weights/histotx_default.safetensors', …]
    list_models((Kind.STMDIT,))       # ['default', other STMDiT checkpoints]
    pred = load_predictor("histotx")  # GenST or HistoTx by the checkpoint card's kind
    card = read_panel("default")      # genes + kind from the JSON sidecar, no torch

Names: ``"default"`` (= ``genst_default``) is the default GenST, ``"histotx"`` (=
``histotx_default``) the default HistoTx; a bare name is looked up in ``weights/``; anything
else is a path loaded as whatever its card says.
"""

from __future__ import annotations

import json
from pathlib import Path

from napari_stgen.errors import CheckpointError
from napari_stgen.inference.contract import PREDICTOR_KINDS, Kind, Predictor
from napari_stgen.inference.histotx import load_histotx
from napari_stgen.inference.predictor import load_genst
from napari_stgen.models.checkpoint import (
    WEIGHTS_DIR,
    read_card,
    resolve_checkpoint,
    sidecar_path,
)

__all__ = [
    "Kind",
    "PREDICTOR_KINDS",
    "kind_of",
    "list_models",
    "load_predictor",
    "read_panel",
    "takes_measured",
]

_ALIASES = {
    "default": (Kind.GENST, "default"),
    "genst_default": (Kind.GENST, "default"),
    "histotx": (Kind.HISTOTX, "default"),
    "histotx_default": (Kind.HISTOTX, "default"),
}
_LOADERS = {Kind.GENST: load_genst, Kind.HISTOTX: load_histotx}


def checkpoint_kind(path: str | Path) -> str:
    """A shipped checkpoint's kind from its JSON sidecar (no tensors), else its name's
    prefix (``histotx_x.safetensors`` → 'histotx')."""
    p = Path(path)
    kind = p.stem.split("_")[0]
    side = sidecar_path(p)
    if side.exists():
        try:
            kind = str(json.loads(side.read_text()).get("kind", kind))
        except (OSError, ValueError):
            pass
    return kind


def list_models(kinds: tuple[str, ...] = PREDICTOR_KINDS) -> list[str]:
    """Model names a picker offers: 'default' (the first kind's default checkpoint) then
    the paths of the other checkpoints of ``kinds`` in ``weights/``."""
    default = f"{kinds[0]}_default"
    names = ["default"]
    for p in sorted(WEIGHTS_DIR.glob("*.safetensors")):
        if checkpoint_kind(p) in kinds and p.stem != default:
            names.append(str(p))
    return names


def kind_of(name_or_path: str | Path) -> Kind:
    """The kind of a predictor name or checkpoint (its card's ``kind``); GenST when the name
    resolves to no HistoTx checkpoint (its loader then says what is wrong)."""
    alias = _ALIASES.get(str(name_or_path))
    if alias is not None:
        return alias[0]
    try:
        path = resolve_checkpoint(name_or_path, Kind.HISTOTX.value)
    except CheckpointError:
        return Kind.GENST
    return Kind.HISTOTX if read_card(path).get("kind") == Kind.HISTOTX else Kind.GENST


def load_predictor(name_or_path: str | Path = "default", device: str = "auto") -> Predictor:
    """A GenST or HistoTx predictor by the checkpoint card's ``kind`` (see the module doc);
    CheckpointError naming the file on any problem."""
    kind, name = _ALIASES.get(str(name_or_path), (None, name_or_path))
    if kind is None:
        kind = kind_of(name_or_path)
    return _LOADERS[kind](name, device=device)


def takes_measured(predictor: Predictor | object) -> bool:
    """Whether a predictor (or a ``read_panel`` stand-in with a ``kind``) conditions on
    measured spots (HistoTx) rather than giving its own uncertainty (GenST)."""
    return getattr(predictor, "kind", Kind.GENST) == Kind.HISTOTX


def read_panel(name_or_path: str | Path) -> dict | None:
    """``{'genes': [...], 'kind': ...}`` of a predictor checkpoint from its JSON sidecar (no
    torch, so a widget opens light); None when no sidecar has a gene panel."""
    alias = _ALIASES.get(str(name_or_path))
    tries = [alias] if alias else [(kind, name_or_path) for kind in PREDICTOR_KINDS]
    for kind, name in tries:
        try:
            side = sidecar_path(resolve_checkpoint(name, kind.value))
        except CheckpointError:
            continue
        if side.is_file():
            card = json.loads(side.read_text())
            if "genes" in card:
                return {"genes": list(card["genes"]), "kind": str(card.get("kind", kind))}
    return None
