"""Checkpoint format: safetensors tensors + a JSON model card (in the metadata and beside it).

``save_checkpoint(path, tensors, card)`` writes ``path`` atomically (temp file then
``os.replace``) with the card JSON under metadata key ``stgen_card`` and a sidecar
``<stem>.json`` holding the card plus the file's sha256. ``load_checkpoint(path, kind)``
reads tensors and card without unpickling anything and raises ``CheckpointError`` naming the
file when it is missing, corrupt, of another kind, or its tensors disagree with the card.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

CARD_KEY = "stgen_card"
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sidecar_path(path: str | Path) -> Path:
    p = Path(path)
    return p.with_suffix(".json")


def save_checkpoint(path: str | Path, tensors: dict[str, Any], card: dict) -> Path:
    """Write tensors (name → torch.Tensor) + card atomically; returns the path.

    ``card`` must contain ``kind``. The sidecar JSON also records ``sha256`` and ``size_bytes``.
    """
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    if "kind" not in card:
        raise CheckpointError(f"{path}: model card needs a 'kind'")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    for k, v in clean.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: tensor {k!r} is not a torch.Tensor")
    meta = {CARD_KEY: json.dumps(card, sort_keys=True)}
    tmp = path.with_name(f".{path.name}.partial")
    save_file(clean, str(tmp), metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
    side = dict(card)
    side["sha256"] = sha256_file(path)
    side["size_bytes"] = path.stat().st_size
    sp = sidecar_path(path)
    tmp_side = sp.with_name(f".{sp.name}.partial")
    tmp_side.write_text(json.dumps(side, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_side, sp)
    return path


def read_card(path: str | Path) -> dict:
    """The model card stored inside a checkpoint (no tensors loaded)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({e})") from e
    if CARD_KEY not in meta:
        raise CheckpointError(f"{path}: no stgen model card in the metadata")
    try:
        card = json.loads(meta[CARD_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: model card is not valid JSON ({e})") from e
    if not isinstance(card, dict):
        raise CheckpointError(f"{path}: model card is not a JSON object")
    return card


def load_checkpoint(path: str | Path, kind: str | None = None) -> tuple[dict, dict]:
    """Tensors (name → CPU torch.Tensor) and card; CheckpointError on any problem."""
    from safetensors.torch import load_file

    path = Path(path)
    card = read_card(path)
    if kind is not None and card.get("kind") != kind:
        raise CheckpointError(
            f"{path}: checkpoint is of kind {card.get('kind')!r}, expected {kind!r}"
        )
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: corrupt tensors ({e})") from e
    expect = card.get("tensor_shapes")
    if isinstance(expect, dict):
        for k, shape in expect.items():
            if k not in tensors:
                raise CheckpointError(f"{path}: tensor {k!r} listed in the card is missing")
            if list(tensors[k].shape) != list(shape):
                raise CheckpointError(
                    f"{path}: tensor {k!r} has shape {list(tensors[k].shape)}, card says {shape}"
                )
    return tensors, card


def resolve_checkpoint(name_or_path: str | Path, kind: str) -> Path:
    """``"default"`` → ``weights/<kind>_default.safetensors``; a bare name → ``weights/<name>``
    (``.safetensors`` added); otherwise a path. CheckpointError if it does not exist."""
    s = str(name_or_path)
    if s == "default":
        p = WEIGHTS_DIR / f"{kind}_default.safetensors"
    else:
        p = Path(s).expanduser()
        if not p.exists() and os.sep not in s and "/" not in s:
            cand = WEIGHTS_DIR / (s if s.endswith(".safetensors") else f"{s}.safetensors")
            if cand.exists():
                p = cand
    if not p.is_file():
        raise CheckpointError(f"{p}: {kind} checkpoint not found")
    return p
