"""Plain records of a napari-stgen export: ROIs, generated tiles, and h5ad ``uns`` values.

No napari, no anndata here: dataclasses and the conversions between them and the nested
dicts stored in ``uns['stgen']`` / ``layer.metadata``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_stgen.errors import StgenError
from napari_stgen.io.layer_meta import generated_metadata

LayerData = tuple[Any, dict, str]

__all__ = ["LayerData", "Roi", "GeneratedTile", "plain", "h5_value", "rois_record",
           "rois_from_record"]  # fmt: skip


# ----------------------------------------------------------------------------- records
@dataclass
class Roi:
    """A region of interest: a napari shape in world µm, vertices in (y, x) order."""

    vertices_yx_um: np.ndarray
    shape_type: str = "polygon"
    name: str = ""
    layer: str = "ROIs"


@dataclass
class GeneratedTile:
    """A generated H&E tile and what produced it (the Synthesize widget's record).

    In napari it is an RGB image layer with ``scale=(px_um, px_um)``, ``translate =
    origin_yx_um + px_um / 2`` and ``metadata['stgen'] = {'kind': 'generated', 'tile':
    tile.to_metadata()}`` (:func:`napari_stgen.io.layer_meta.generated_metadata`).
    """

    id: str
    image: np.ndarray  # uint8 (H, W, 3)
    origin_yx_um: tuple[float, float]  # world position of the tile's top-left corner
    px_um: float  # µm per image pixel
    genes: list[str] = field(default_factory=list)  # conditioning panel (ordered)
    condition: np.ndarray | None = None  # float32 (len(genes),) log1p CP10k values
    guidance_genes: float = float("nan")
    guidance_morph: float = float("nan")
    steps: int = -1
    seed: int = -1
    model: str = ""  # generator model name
    model_checksum: str = ""  # sha256 of the generator checkpoint
    context: str = ""  # morphology context, e.g. "slide.svs @ (x, y) µm", "" for none
    extra: dict = field(default_factory=dict)  # anything else (scalars / arrays)

    def to_metadata(self) -> dict:
        """The record without the pixels (a layer's ``metadata['stgen']['tile']``)."""
        return {
            "id": str(self.id),
            "origin_yx_um": [float(v) for v in self.origin_yx_um],
            "px_um": float(self.px_um),
            "genes": [str(g) for g in self.genes],
            "condition": (
                np.zeros(0, np.float32)
                if self.condition is None
                else np.asarray(self.condition, dtype=np.float32)
            ),
            "guidance_genes": float(self.guidance_genes),
            "guidance_morph": float(self.guidance_morph),
            "steps": int(self.steps),
            "seed": int(self.seed),
            "model": str(self.model),
            "model_checksum": str(self.model_checksum),
            "context": str(self.context),
            "extra": dict(self.extra),
        }

    def to_record(self) -> dict:
        """The h5ad record (``uns['stgen']['generated'][id]``), pixels included."""
        rec = self.to_metadata()
        rec["image"] = np.ascontiguousarray(self.image, dtype=np.uint8)
        rec["origin_yx_um"] = np.asarray(rec["origin_yx_um"], dtype=np.float64)
        rec["genes"] = np.asarray(rec["genes"], dtype=object)
        return rec

    @classmethod
    def from_record(cls, rec: Mapping, image: np.ndarray | None = None) -> GeneratedTile:
        """From an h5ad record or a layer's ``metadata['stgen']['tile']`` (+ its pixels)."""
        rec = plain(dict(rec))
        img = image if image is not None else rec.get("image")
        if img is None:
            raise StgenError(f"generated tile {rec.get('id', '?')!r} has no image")
        for k in ("id", "origin_yx_um", "px_um"):
            if k not in rec:
                raise StgenError(f"generated tile record lacks {k!r}")
        cond = rec.get("condition")
        return cls(
            id=str(rec["id"]),
            image=np.asarray(img, dtype=np.uint8),
            origin_yx_um=tuple(float(v) for v in np.asarray(rec["origin_yx_um"]).ravel()[:2]),
            px_um=float(rec["px_um"]),
            genes=[str(g) for g in rec.get("genes", [])],
            condition=None if cond is None else np.asarray(cond, dtype=np.float32),
            guidance_genes=float(rec.get("guidance_genes", float("nan"))),
            guidance_morph=float(rec.get("guidance_morph", float("nan"))),
            steps=int(rec.get("steps", -1)),
            seed=int(rec.get("seed", -1)),
            model=str(rec.get("model", "")),
            model_checksum=str(rec.get("model_checksum", "")),
            context=str(rec.get("context", "")),
            extra=dict(rec.get("extra", {}) or {}),
        )

    def layer_data(self) -> LayerData:
        """napari ``LayerData`` placing the tile in world µm."""
        s = float(self.px_um)
        return (
            np.asarray(self.image, dtype=np.uint8),
            {
                "name": f"generated {self.id}",
                "rgb": True,
                "scale": (s, s),
                "translate": (self.origin_yx_um[0] + s / 2, self.origin_yx_um[1] + s / 2),
                "units": "um",
                "metadata": generated_metadata(self.to_metadata()),
            },
            "image",
        )


# ----------------------------------------------------------------------------- helpers
def plain(v: Any) -> Any:
    """h5ad-read values to plain Python / numpy (bytes → str, 0-d arrays → scalars)."""
    if isinstance(v, Mapping):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        if v.ndim == 0:
            return plain(v.item())
        if v.dtype.kind in "OSU":
            return np.asarray([plain(x) for x in v.ravel()], dtype=object).reshape(v.shape)
        return v
    if isinstance(v, np.generic):
        return v.item()
    return v


def h5_value(v: Any) -> Any:
    """Values ready for h5ad ``uns``: Nones dropped, str lists → arrays, tuples → arrays."""
    if isinstance(v, Mapping):
        return {str(k): h5_value(x) for k, x in v.items() if x is not None}
    if isinstance(v, (list, tuple)):
        if len(v) and all(isinstance(x, str) for x in v):
            return np.asarray(v, dtype=object)
        if len(v) and all(isinstance(x, Mapping) for x in v):
            return {str(i): h5_value(x) for i, x in enumerate(v)}
        if not len(v):
            return np.zeros(0, dtype=np.float64)
        return np.asarray(v)
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, np.ndarray) and v.dtype.kind == "U":
        return v.astype(object)
    return v


def rois_record(rois: Sequence[Roi | Mapping]) -> dict:
    names, types, layers, nv, verts = [], [], [], [], []
    for r in rois:
        if isinstance(r, Mapping):
            r = Roi(
                vertices_yx_um=np.asarray(r["vertices_yx_um"], dtype=np.float64),
                shape_type=str(r.get("shape_type", "polygon")),
                name=str(r.get("name", "")),
                layer=str(r.get("layer", "ROIs")),
            )
        v = np.asarray(r.vertices_yx_um, dtype=np.float64).reshape(-1, 2)
        names.append(r.name)
        types.append(r.shape_type)
        layers.append(r.layer)
        nv.append(len(v))
        verts.append(v)
    return {
        "name": np.asarray(names, dtype=object),
        "shape_type": np.asarray(types, dtype=object),
        "layer": np.asarray(layers, dtype=object),
        "n_vertices": np.asarray(nv, dtype=np.int64),
        "vertices_yx_um": np.concatenate(verts) if verts else np.zeros((0, 2)),
    }


def rois_from_record(rec: Mapping) -> list[Roi]:
    """ROIs from ``uns['stgen']['rois']``."""
    rec = plain(dict(rec))
    n = np.asarray(rec.get("n_vertices", []), dtype=np.int64)
    v = np.asarray(rec.get("vertices_yx_um", np.zeros((0, 2))), dtype=np.float64).reshape(-1, 2)
    ends = np.cumsum(n)
    starts = ends - n
    names = list(np.asarray(rec.get("name", [""] * len(n)), dtype=object).ravel())
    types = list(np.asarray(rec.get("shape_type", ["polygon"] * len(n)), dtype=object).ravel())
    layers = list(np.asarray(rec.get("layer", ["ROIs"] * len(n)), dtype=object).ravel())
    return [
        Roi(v[a:b].copy(), str(types[i]), str(names[i]), str(layers[i]))
        for i, (a, b) in enumerate(zip(starts, ends, strict=True))
    ]
