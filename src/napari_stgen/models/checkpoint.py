"""Checkpoint format: safetensors tensors + a JSON model card (in the metadata and beside it).

``save_checkpoint(path, tensors, card)`` writes ``path`` atomically (temp file then
``os.replace``) with the card JSON under metadata key ``stgen_card`` and a sidecar
``<stem>.json`` holding the card plus the file's sha256. ``load_checkpoint(path, kind)``
reads tensors and card without unpickling anything and raises ``CheckpointError`` naming the
file and the field when it is missing, corrupt, of another kind, its card breaks the schema
(``validate_card``: required keys, types, ranges), its tensors disagree with the card or any
tensor holds a non-finite value.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, TypeVar

from napari_stgen.errors import CheckpointError
from napari_stgen.io.atomic import atomic_path, write_text_atomic

CARD_KEY = "stgen_card"
#: Required card keys per model kind (others: ``kind`` only).
REQUIRED = {
    "genst": ("genes", "mpp", "patch_px", "patch_um", "architecture"),
    "histotx": ("genes", "mpp", "architecture"),
    "stmdit": ("genes", "mpp", "tile_px", "tile_um", "latent_scale", "dit", "ae", "cond"),
}
#: (low, high, integer?) of scalar card fields.
RANGES = {
    "mpp": (0.05, 50.0, False),
    "patch_px": (8, 4096, True),
    "tile_px": (8, 4096, True),
    "patch_um": (1.0, 10_000.0, False),
    "tile_um": (1.0, 10_000.0, False),
    "tta": (1, 64, True),
    "n_codes": (0, 65_536, True),
    "latent_scale": (1e-6, 1e6, False),
}
#: Nested configuration blocks whose numbers build modules: each must stay modest.
CONFIG_BLOCKS = ("architecture", "dit", "ae", "cond", "window", "sampler", "context_head")
MAX_CONFIG_INT = 65_536
MAX_CONFIG_FLOAT = 1e7
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"

_C = TypeVar("_C", bound="CardConfig")


class CardConfig:
    """Mixin for a dataclass configuration stored in a model card: ``to_dict`` writes tuples
    as JSON lists; ``from_dict`` ignores keys the class does not know (``"class"``, fields
    of newer versions) and turns the lists of tuple-valued fields back into tuples."""

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls: type[_C], d: dict) -> _C:
        known = {f.name: f for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for k, v in kw.items():
            if isinstance(known[k].default, tuple):
                kw[k] = tuple(v)
        return cls(**kw)


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
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    side = dict(card)
    side["sha256"] = sha256_file(path)
    side["size_bytes"] = path.stat().st_size
    write_text_atomic(sidecar_path(path), json.dumps(side, indent=2, sort_keys=True) + "\n")
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


def validate_card(path: str | Path, card: dict) -> None:
    """Check a model card against the schema; CheckpointError naming the file and the field."""

    def bad(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: model card field {field!r} {why}")

    kind = card.get("kind")
    if not isinstance(kind, str):
        raise bad("kind", "is missing or not a string")
    for key in REQUIRED.get(kind, ()):
        if key not in card:
            raise bad(key, f"is missing (required for a {kind} model)")
    if card.get("genes") is not None:
        _check_genes(card["genes"], bad)
    for key, (lo, hi, integer) in RANGES.items():
        if key in card:
            _check_scalar(key, card[key], lo, hi, integer, bad)
    for block in CONFIG_BLOCKS:
        if block in card:
            if not isinstance(card[block], dict):
                raise bad(block, "must be an object")
            _check_config(card[block], block, bad)


def _check_genes(genes: Any, bad: Any) -> None:
    if not isinstance(genes, list) or not genes or len(genes) > 100_000:
        raise bad("genes", "must be a non-empty list of gene names")
    if not all(isinstance(g, str) and g for g in genes):
        raise bad("genes", "must hold non-empty strings")
    if len(set(genes)) != len(genes):
        raise bad("genes", "has duplicate names")


def _check_scalar(key: str, v: Any, lo: float, hi: float, integer: bool, bad: Any) -> None:
    ok = isinstance(v, int | float) and not isinstance(v, bool)
    if ok and integer:
        ok = float(v).is_integer()
    if not ok:
        raise bad(key, f"must be {'an integer' if integer else 'a number'}, got {v!r}")
    if not (math.isfinite(v) and lo <= v <= hi):
        raise bad(key, f"is {v}, outside [{lo:g}, {hi:g}]")


def _check_config(v: Any, where: str, bad: Any) -> None:
    if isinstance(v, dict):
        for k, x in v.items():
            _check_config(x, f"{where}.{k}", bad)
    elif isinstance(v, list):
        if len(v) > 1024:
            raise bad(where, f"has {len(v)} items")
        for i, x in enumerate(v):
            _check_config(x, f"{where}[{i}]", bad)
    elif isinstance(v, bool) or v is None or isinstance(v, str):
        return
    elif isinstance(v, int):
        if not -1 <= v <= MAX_CONFIG_INT:
            raise bad(where, f"is {v}, outside [-1, {MAX_CONFIG_INT}]")
    elif isinstance(v, float):
        if not (math.isfinite(v) and abs(v) <= MAX_CONFIG_FLOAT):
            raise bad(where, f"is {v}, not a finite number of modest size")


def check_tensors(path: str | Path, tensors: dict) -> None:
    """Every floating tensor finite; CheckpointError naming the first bad tensor."""
    import torch

    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise CheckpointError(
                f"{path}: tensor {k!r} holds {n} non-finite values (NaN/inf); corrupt weights"
            )


def load_checkpoint(path: str | Path, kind: str | None = None) -> tuple[dict, dict]:
    """Tensors (name → CPU torch.Tensor) and card; CheckpointError on any problem."""
    from safetensors.torch import load_file

    path = Path(path)
    card = read_card(path)
    if kind is not None and card.get("kind") != kind:
        raise CheckpointError(
            f"{path}: checkpoint is of kind {card.get('kind')!r}, expected {kind!r}"
        )
    validate_card(path, card)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises several types on corrupt data
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
    check_tensors(path, tensors)
    return tensors, card


def check_panel(path: str | Path, genes: list, n_genes: int) -> None:
    """CheckpointError when the card's gene panel is not the size the model predicts."""
    if len(genes) != n_genes:
        raise CheckpointError(
            f"{path}: gene panel has {len(genes)} genes but the model predicts {n_genes}"
        )


def load_weights(module: Any, tensors: dict, path: str | Path) -> Any:
    """``module`` with ``tensors`` loaded strictly, in eval mode; CheckpointError naming the
    file when they do not fit its architecture."""
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise CheckpointError(f"{path}: weights do not match the architecture: {first}") from e
    return module.eval()


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
