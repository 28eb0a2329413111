"""The napari-stgen layer-metadata schema: plain data under ``layer.metadata['stgen']``.

Every layer napari-stgen makes or reads keeps what it is under one key, ``'stgen'``:
``path``, ``mpp`` (µm per level-0 pixel: the one spelling the writers read), ``mpp_source``,
``kind`` (``'heatmap'``, ``'spots'``, ``'tiles'``, ``'codes'``; absent on slides), and for
layers read from an export the file's ``uns['stgen']`` record. No live objects: a slide
layer's opened :class:`~napari_stgen.io.slide.Slide` is kept by the widgets' state, so
napari's duplicate-layer deep-copies plain data only.

Layers read from files also carry ``stgen_kind`` (``'thumbnail'``, ``'spots'``,
``'codebook'``, ``'rois'``, ``'spatialdata_image'``); generated tiles ``stgen_generated``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

KEY = "stgen"

__all__ = ["KEY", "layer_info", "layer_mpp", "made_by_stgen"]


def layer_info(metadata: Mapping[str, Any] | None) -> dict:
    """``metadata['stgen']`` as a dict ({} when absent or not a mapping)."""
    v = (metadata or {}).get(KEY)
    return dict(v) if isinstance(v, Mapping) else {}


def layer_mpp(metadata: Mapping[str, Any] | None) -> float | None:
    """The layer's µm per level-0 pixel (``metadata['stgen']['mpp']``), None if unknown."""
    v = layer_info(metadata).get("mpp")
    return float(v) if v else None


def made_by_stgen(metadata: Mapping[str, Any] | None) -> bool:
    """Whether napari-stgen made the layer (a display layer, a thumbnail, a generated tile)
    rather than it being a slide or the user's own layer."""
    md = metadata or {}
    return bool(layer_info(md).get("kind") or md.get("stgen_kind") or "stgen_generated" in md)
