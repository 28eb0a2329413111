"""Build and update the napari layers that show predictions (heatmaps, spot circles, tiles).

One Image layer per gene holds a slide-wide grid canvas (one pixel per model tile, NaN =
not predicted, drawn transparent) placed in µm with the grid's ``scale``/``translate``.
New batches are written into that canvas in place, so panning accumulates into one layer
set. Spot mode shows a Points layer per gene coloured by the gene's feature instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from napari_stgen.inference.store import PredictionStore
from napari_stgen.io.layer_meta import KEY, layer_info, stgen_metadata

__all__ = [
    "heatmap_name",
    "spots_name",
    "TILES_LAYER",
    "robust_limits",
    "update_heatmap",
    "update_spots",
    "update_uncertainty",
    "settle_limits",
    "UNCERTAINTY_LAYER",
    "update_tiles_points",
    "show_tile_markers",
    "show_scale",
    "shown_display",
    "find_layer",
]

TILES_LAYER = "stgen tiles"
UNCERTAINTY_LAYER = "uncertainty"
UNCERTAINTY_CMAP = "cividis"  # none of the gene heatmaps' colormaps
UNITS = ("um", "um")


def heatmap_name(gene: str) -> str:
    """Name of a gene's heatmap layer."""
    return f"{gene} (predicted)"


def spots_name(gene: str) -> str:
    """Name of a gene's spot-circle layer."""
    return f"{gene} (predicted spots)"


def find_layer(viewer: Any, name: str) -> Any:
    """Layer called ``name`` or None."""
    return viewer.layers[name] if name in viewer.layers else None


def robust_limits(values: np.ndarray, lo: float = 1.0, hi: float = 99.0) -> tuple[float, float]:
    """Contrast limits from the ``lo``–``hi`` percentiles of finite values (never empty)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (0.0, 1.0)
    a, b = np.percentile(v, [lo, hi])
    if not b > a:
        b = a + max(abs(a) * 1e-3, 1e-6)
    return (float(a), float(b))


def show_scale(layer: Any) -> None:
    """Show what a layer is on the canvas: its name (the gene) and its colour scale
    (napari's colorbar overlay; ``face_colorbar`` for points)."""
    for attr in ("colorbar", "face_colorbar"):
        bar = getattr(layer, attr, None)
        if bar is not None:
            bar.visible = True
            break
    overlay = getattr(layer, "name_overlay", None)
    if overlay is not None:
        overlay.visible = True


def shown_display(viewer: Any) -> dict | None:
    """``{gene, contrast_limits, colormap}`` of the top-most visible prediction layer."""
    for layer in reversed(viewer.layers):
        md = layer_info(layer.metadata) if layer.visible else {}
        if md.get("kind") == "heatmap":
            lim, cmap = layer.contrast_limits, layer.colormap
        elif md.get("kind") == "spots" and "gene" in md:
            lim, cmap = layer.face_contrast_limits, layer.face_colormap
        else:
            continue
        return {
            "gene": str(md["gene"]),
            "contrast_limits": [float(v) for v in lim],
            "colormap": str(cmap.name),
        }
    return None


def _auto_limits(layer: Any, values: np.ndarray, exact: bool = True) -> None:
    # keep user-set limits: only update while the layer still shows the last automatic ones
    md = layer.metadata.setdefault(KEY, {})
    last = md.get("auto_limits")
    if last is not None and not np.allclose(layer.contrast_limits, last):
        return
    lim = robust_limits(values)
    if last is not None and not exact:  # streaming: < 2 % of the range is not worth a redraw
        span = max(last[1] - last[0], 1e-9)
        if abs(lim[0] - last[0]) < 0.02 * span and abs(lim[1] - last[1]) < 0.02 * span:
            return
    md["auto_limits"] = lim
    v = values[np.isfinite(values)]
    layer.contrast_limits_range = (
        min(lim[0], float(v.min())) if v.size else lim[0],
        max(lim[1], float(v.max())) if v.size else lim[1],
    )
    layer.contrast_limits = lim
    md["auto_limits"] = tuple(float(x) for x in layer.contrast_limits)


def update_heatmap(
    viewer: Any,
    store: PredictionStore,
    gene: str,
    new_tiles: np.ndarray | None = None,
    *,
    colormap: str = "inferno",
    opacity: float = 0.7,
    blending: str = "translucent",
    exact: bool = True,
) -> Any:
    """Create or update the heatmap layer of ``gene`` from the store; returns the layer.

    With ``new_tiles`` only those cells are written into the existing canvas (in place).
    ``exact=False`` (while batches stream in) keeps the colour limits unless they moved by
    2 % of their range (each change redraws the colour bar); see :func:`settle_limits`.
    """
    gi = store.gene_index(gene)
    md = {"kind": "heatmap", "gene": gene}
    style = {"colormap": colormap, "opacity": opacity, "blending": blending, "exact": exact}
    return _update_grid_layer(viewer, store, heatmap_name(gene), store.expr[:, gi], new_tiles,
                              md, style)  # fmt: skip


def update_uncertainty(
    viewer: Any,
    store: PredictionStore,
    new_tiles: np.ndarray | None = None,
    *,
    colormap: str = UNCERTAINTY_CMAP,
    opacity: float = 0.7,
    visible: bool = True,
    exact: bool = True,
) -> Any:
    """Create or update the per-tile uncertainty layer (``UNCERTAINTY_LAYER``: larger = less
    sure, its own colormap and colour bar), like a heatmap; returns the layer."""
    md = {"kind": "uncertainty"}
    style = {"colormap": colormap, "opacity": opacity, "blending": "translucent", "exact": exact}
    layer = _update_grid_layer(viewer, store, UNCERTAINTY_LAYER, store.uncertainty, new_tiles,
                               md, style)  # fmt: skip
    layer.visible = visible
    return layer


def _update_grid_layer(
    viewer: Any,
    store: PredictionStore,
    name: str,
    values: np.ndarray,
    new_tiles: np.ndarray | None,
    md: dict,
    style: dict,
) -> Any:
    """Create or update the slide-grid Image layer ``name`` showing ``values`` (N,) of the
    store's tiles (NaN elsewhere); ``new_tiles``: only those cells are written."""
    grid = store.grid
    colormap, opacity, blending = style["colormap"], style["opacity"], style["blending"]
    layer = find_layer(viewer, name)
    md_key = (store.slide_key, store.model_checksum, grid)
    fresh = layer is None or layer_info(layer.metadata).get("key") != md_key
    if fresh:
        data = store.canvas(values)
        if layer is None:
            layer = viewer.add_image(
                data,
                name=name,
                scale=grid.scale,
                translate=grid.translate,
                colormap=colormap,
                opacity=opacity,
                blending=blending,
                contrast_limits=robust_limits(values),
                interpolation2d="nearest",
                units=UNITS,
                metadata=stgen_metadata(**md, key=md_key),
            )
        else:
            layer.data = data
            layer.scale, layer.translate = grid.scale, grid.translate
            layer.metadata[KEY]["key"] = md_key
            layer.metadata[KEY].pop("auto_limits", None)
    else:
        data = layer.data
        if new_tiles is None:
            data[...] = np.nan
            t, v = store.tiles, values
        else:
            t = np.asarray(new_tiles, dtype=np.int64).reshape(-1, 2)
            rows = store.rows_of(t)
            t, v = t[rows >= 0], values[rows[rows >= 0]]
        data[t[:, 0], t[:, 1]] = v
        layer.refresh()
    _auto_limits(layer, values, style.get("exact", True))
    layer.visible = True
    if fresh:
        show_scale(layer)
    return layer


def settle_limits(viewer: Any, store: PredictionStore, genes: list[str]) -> None:
    """Exact automatic colour limits on the heatmaps of ``genes`` and the uncertainty layer
    (a request ended: the limits are the 1st–99th percentiles of every stored value)."""
    for g in genes:
        layer = find_layer(viewer, heatmap_name(g))
        if layer is not None and g in store.genes and len(store):
            _auto_limits(layer, store.expr[:, store.gene_index(g)])
    layer = find_layer(viewer, UNCERTAINTY_LAYER)
    if layer is not None and len(store):
        _auto_limits(layer, store.uncertainty)


def update_spots(
    viewer: Any,
    store: PredictionStore,
    gene: str,
    *,
    colormap: str = "inferno",
    opacity: float = 0.9,
    extra_genes: tuple[str, ...] = (),
) -> Any:
    """Create or update the spot-circle Points layer of ``gene``.

    Its features are ``gene``, ``extra_genes`` and the code (kept small so updates stay cheap
    while batches stream in; the tiles layer carries every gene).
    """
    name = spots_name(gene)
    layer = find_layer(viewer, name)
    cols = [gene] + [g for g in extra_genes if g != gene and g in store.genes]
    feats = _features(store, cols)
    lim = robust_limits(feats[gene].to_numpy())
    size = 0.9 * store.grid.tile_um
    if layer is None:
        layer = viewer.add_points(
            store.centres_um,
            name=name,
            features=feats,
            size=size,
            face_color=gene,
            face_colormap=colormap,
            face_contrast_limits=lim,
            border_width=0,
            opacity=opacity,
            units=UNITS,
            metadata=stgen_metadata("spots", gene=gene),
        )
        show_scale(layer)
    else:
        with layer.events.blocker_all():
            layer.data = store.centres_um
            layer.features = feats
        layer.size = size
        layer.face_colormap = colormap
        layer.face_contrast_limits = lim
        layer.face_color = gene
        layer.refresh()
    layer.visible = True
    return layer


def update_tiles_points(viewer: Any, store: PredictionStore, markers: bool = False) -> Any:
    """Points layer over the predicted tiles whose features (all genes + code) show on hover.

    Each point covers its tile, drawn fully transparent unless ``markers`` (a ring at each
    tile centre), so hovering anywhere on a tile shows its values without cluttering the
    heatmaps.
    """
    layer = find_layer(viewer, TILES_LAYER)
    feats = _features(store)
    if layer is None:
        layer = viewer.add_points(
            store.centres_um,
            name=TILES_LAYER,
            features=feats,
            size=store.grid.tile_um,
            face_color="transparent",
            border_color="white",
            border_width=0.0,
            units=UNITS,
            metadata=stgen_metadata("tiles"),
        )
    else:
        with layer.events.blocker_all():
            layer.data = store.centres_um
            layer.features = feats
        layer.size = store.grid.tile_um
    show_tile_markers(layer, markers)
    return layer


def show_tile_markers(layer: Any, on: bool) -> None:
    """Draw (or hide) a thin ring at each tile centre of the hover layer."""
    layer.border_width = 0.05 if on else 0.0
    layer.border_width_is_relative = True
    layer.refresh()


def _features(store: PredictionStore, genes: list[str] | None = None) -> Any:
    if genes is None:
        df = pd.DataFrame(store.expr, columns=store.genes, copy=False)
    else:
        idx = [store.gene_index(g) for g in genes]
        df = pd.DataFrame(store.expr[:, idx], columns=genes)
    df["genst_code"] = store.code
    return df
