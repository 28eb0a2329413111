"""What the GenST and HistoTx predictors share: a checkpoint opened onto a device, and the
attributes of the ``Predictor`` contract every card gives.

::

    ck = open_model("default", "genst", build_genst, device="auto")   # CheckpointError
    ck.model, ck.card, ck.path, ck.checksum, ck.device, ck.tensors
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_stgen.inference.contract import BATCH_SIZE
from napari_stgen.inference.device import pick_device
from napari_stgen.models.checkpoint import load_checkpoint, resolve_checkpoint, sha256_file


@dataclass(frozen=True)
class OpenedModel:
    """A checkpoint's module (on ``device``), card, path, sha256 and raw tensors."""

    model: Any
    card: dict
    path: Path
    checksum: str
    device: str
    tensors: dict


def open_model(
    name_or_path: str | Path,
    kind: str,
    build: Callable[[dict, dict, Path], Any],
    device: str = "auto",
) -> OpenedModel:
    """Resolve, read and check a ``kind`` checkpoint, ``build(tensors, card, path)`` its
    module and move it to ``device`` (``"auto"``: cuda > mps > cpu)."""
    path = Path(resolve_checkpoint(name_or_path, kind))
    tensors, card = load_checkpoint(path, kind)
    model = build(tensors, card, path)
    dev = pick_device(device)
    model.to(dev)
    return OpenedModel(model, card, path, sha256_file(path), dev, tensors)


class LoadedPredictor:
    """The contract attributes a predictor takes from its checkpoint: ``model``, ``card``,
    ``path``, ``checksum``, ``device``, ``genes``, ``name``, ``kind``, ``batch_size``."""

    kind: str = ""

    def __init__(self, model: Any, card: dict, path: Path, checksum: str, device: str):
        self.model = model
        self.card = card
        self.path = path
        self.checksum = checksum
        self.device = device
        self.genes: list[str] = list(card["genes"])
        self.name: str = str(card.get("name", path.stem))
        self.batch_size = BATCH_SIZE
