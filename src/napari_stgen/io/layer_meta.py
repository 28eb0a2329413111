"""The napari-stgen layer-metadata schema: plain data under ``layer.metadata['stgen']``.

Everything napari-stgen puts on a layer lives under one key, ``'stgen'``:

- ``kind``: what the layer is (absent on slides and on the user's own layers): the Predict
  widget's views of the prediction store ``'heatmap'`` (with ``gene``), ``'uncertainty'``,
  ``'spots'`` (with ``gene``), ``'tiles'``, ``'codes'``; layers read from files
  ``'thumbnail'``, ``'spots'``, ``'codebook'``, ``'rois'``, ``'spatialdata_image'``;
  ``'generated'`` (a generated tile, its :class:`~napari_stgen.io.records.GeneratedTile`
  record in ``tile``);
- ``mpp`` (µm per level-0 pixel: the one spelling the writers read), ``mpp_source``,
  ``path`` and the slide's other facts on slides;
- ``genes`` (the gene feature columns of a points layer), ``genes_subset``, ``code_offset``
  (label value − gene code of a codebook map, default 1), ``code_names``;
- for layers read from an export the file's ``uns['stgen']`` record, ``h5ad_path``,
  ``library_id`` and (SpatialData) ``element``.

No live objects: a slide layer's opened :class:`~napari_stgen.io.slide.Slide` is kept by the
widgets' state, so napari's duplicate-layer deep-copies plain data only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

KEY = "stgen"
GENERATED = "generated"

__all__ = ["KEY", "GENERATED", "layer_info", "layer_kind", "layer_mpp", "made_by_stgen",
           "stgen_metadata", "with_info", "generated_record", "generated_metadata",
           "is_prediction_view"]  # fmt: skip


def layer_info(metadata: Mapping[str, Any] | None) -> dict:
    """``metadata['stgen']`` as a dict ({} when absent or not a mapping)."""
    v = (metadata or {}).get(KEY)
    return dict(v) if isinstance(v, Mapping) else {}


def layer_kind(metadata: Mapping[str, Any] | None) -> str | None:
    """``metadata['stgen']['kind']`` (None for slides and the user's own layers)."""
    k = layer_info(metadata).get("kind")
    return str(k) if k else None


def layer_mpp(metadata: Mapping[str, Any] | None) -> float | None:
    """The layer's µm per level-0 pixel (``metadata['stgen']['mpp']``), None if unknown."""
    v = layer_info(metadata).get("mpp")
    return float(v) if v else None


def made_by_stgen(metadata: Mapping[str, Any] | None) -> bool:
    """Whether napari-stgen made the layer (a display layer, a thumbnail, a generated tile)
    rather than it being a slide or the user's own layer."""
    return layer_kind(metadata) is not None


def is_prediction_view(metadata: Mapping[str, Any] | None) -> bool:
    """Whether the layer is one of the Predict widget's points views of the prediction store
    (its tiles, or its spot circles of one gene), which an export of the store replaces."""
    info = layer_info(metadata)
    return info.get("kind") == "tiles" or (info.get("kind") == "spots" and "gene" in info)


def stgen_metadata(kind: str | None = None, /, **info: Any) -> dict:
    """Layer metadata holding ``info`` and ``kind`` under ``KEY``."""
    return {KEY: {**info, **({"kind": kind} if kind else {})}}


def with_info(metadata: Mapping[str, Any] | None, **info: Any) -> dict:
    """A copy of ``metadata`` with ``info`` merged into ``metadata['stgen']``."""
    return {**(metadata or {}), KEY: {**layer_info(metadata), **info}}


def generated_metadata(record: Mapping[str, Any]) -> dict:
    """Layer metadata of a generated tile (``record``: ``GeneratedTile.to_metadata()``)."""
    return stgen_metadata(GENERATED, tile=dict(record))


def generated_record(metadata: Mapping[str, Any] | None) -> dict | None:
    """The generated-tile record of a layer (``metadata['stgen']['tile']``), else None."""
    info = layer_info(metadata)
    tile = info.get("tile") if info.get("kind") == GENERATED else None
    return dict(tile) if isinstance(tile, Mapping) else None
