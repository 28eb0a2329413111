"""The one export writer: a :class:`~napari_stgen.inference.store.PredictionStore` → AnnData.

:func:`store_to_anndata` is what the Export widget, the Synthesize widget and ``stgen predict
--grid`` write (``.h5ad`` directly, SpatialData from the same AnnData): every stored tile as
a row with its grid cell, gene code and uncertainty, the grid, the model and the slide's
provenance. Layers the plugin did not predict go through ``io.napari_writer`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from napari_stgen.coords import Grid
from napari_stgen.errors import StgenError
from napari_stgen.inference.cache import slide_key
from napari_stgen.inference.confidence import uncertainty_record
from napari_stgen.inference.store import PredictionStore
from napari_stgen.io.anndata_export import ExportRecord, record_to_anndata
from napari_stgen.io.records import GeneratedTile, Roi

__all__ = ["StoreExtras", "store_to_anndata", "tile_store"]


@dataclass
class StoreExtras:
    """What an export adds to the store's rows: ROIs, generated tiles, thumbnails
    (``images``, when there is no ``Slide``), ``uns['stgen']`` entries and extra obs."""

    rois: Sequence[Roi | Mapping] = ()
    generated: Sequence[GeneratedTile | Mapping] = ()
    images: Mapping[str, Any] | None = None
    uns: Mapping[str, Any] = field(default_factory=dict)
    obs: Mapping[str, np.ndarray] = field(default_factory=dict)
    region_um: Sequence[float] | None = None
    library_id: str | None = None


def _code_table(code_names: Mapping | None) -> Mapping | None:
    return dict(code_names) if code_names else None


def store_to_anndata(
    store: PredictionStore,
    slide: Any = None,
    model: Any = None,
    code_names: Mapping[int, str] | None = None,
    rows: np.ndarray | None = None,
    extras: StoreExtras | None = None,
) -> Any:
    """The AnnData of ``store`` (all rows, or ``rows``), tiles as obs (``tile_<r>_<c>``).

    ``slide`` (a ``Slide``) gives µm/px, provenance and thumbnails (else the store's µm/px
    and ``extras.images``); ``model`` the predictor (or a mapping of its record);
    ``code_names`` names per gene code.
    """
    if store.grid is None or len(store) == 0:
        raise StgenError("no predictions to export yet")
    ex = extras or StoreExtras()
    sel = np.arange(len(store)) if rows is None else np.asarray(rows, dtype=np.int64)
    tiles = store.tiles[sel]
    obs = pd.DataFrame({"grid_row": tiles[:, 0], "grid_col": tiles[:, 1]})
    for k, v in ex.obs.items():
        obs[k] = np.asarray(v)
    unc = store.uncertainty[sel] if store.has_uncertainty else None
    uns = dict(ex.uns)
    if store.display:  # the gene and colour scale shown: the same on reopening
        uns.setdefault("display", dict(store.display))
    rec = ExportRecord(
        store.expr[sel],
        store.genes,
        store.xy_px[sel],
        slide=slide,
        codes=store.code[sel],
        code_names=_code_table(code_names),
        obs_names=[f"tile_{r}_{c}" for r, c in tiles],
        model=model,
        region_um=ex.region_um,
        extra_uns=uns or None,
        mpp=None if slide is not None else store.mpp,
        library_id=ex.library_id,
        obs=obs,
        rois=list(ex.rois),
        generated=list(ex.generated),
        spot_diameter_um=float(store.grid.tile_um),
        images=ex.images,
        obs_kind="tiles",
        grid=store.grid.to_record(),
        uncertainty=unc,
        uncertainty_info=uncertainty_record(model) if unc is not None and model else None,
    )
    return record_to_anndata(rec)


def tile_store(
    grid: Grid,
    predictor: Any,
    slide: Any,
    tiles: np.ndarray,
    expr: np.ndarray,
    code: np.ndarray,
    uncertainty: np.ndarray | None = None,
) -> PredictionStore:
    """A store of these predicted grid cells (``stgen predict --grid``), so the CLI writes
    its tiles with :func:`store_to_anndata` like the widgets."""
    store = PredictionStore()
    genes = list(predictor.genes)
    store.reset(grid, genes, slide_key(slide), predictor.checksum, predictor.name, slide.mpp)
    store.add(tiles, expr, code, uncertainty)
    return store
