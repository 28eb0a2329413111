"""AnnData import: a napari-stgen (or plain Visium) ``.h5ad`` → napari layers in world µm.

The layout is the export's (:mod:`napari_stgen.io.anndata_export`); this module also
re-exports the writer's public names, so ``napari_stgen.io.anndata`` is the one place to
import AnnData I/O from. No napari, no torch here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_stgen.coords import Grid
from napari_stgen.errors import StgenError
from napari_stgen.io.anndata_export import (
    NORMALIZATION,
    SCHEMA,
    ExportRecord,
    model_record,
    predictions_to_anndata,
    record_to_anndata,
    write_h5ad,
)
from napari_stgen.io.layer_meta import stgen_metadata
from napari_stgen.io.records import GeneratedTile, LayerData, Roi, plain, rois_from_record
from napari_stgen.io.thumbnails import HIRES_PX, LOWRES_PX, thumbnails_from_levels
from napari_stgen.io.validate import validate_h5ad

__all__ = [
    "SCHEMA", "NORMALIZATION", "HIRES_PX", "LOWRES_PX", "VISIUM_SPOT_UM", "ExportRecord",
    "GeneratedTile", "LayerData", "Roi", "model_record", "predictions_to_anndata",
    "record_to_anndata", "write_h5ad", "thumbnails_from_levels", "rois_from_record",
    "read_h5ad_layers", "anndata_layers", "read_generated_tiles", "h5ad_mpp",
    "spatial_library", "spot_colour_limits",
]  # fmt: skip

VISIUM_SPOT_UM = 55.0
MAX_FEATURE_VALUES = 20_000_000  # spots × genes shown as napari point features on import


# ----------------------------------------------------------------------------- import
def _read(path: Path) -> Any:
    import anndata as ad

    if not path.exists():
        raise StgenError(f"{path}: no such file")
    validate_h5ad(path)  # structure first: a broken sparse matrix would crash native code
    try:
        return ad.read_h5ad(path)
    except Exception as e:  # h5py OSError, KeyError on a broken layout, ...
        raise StgenError(f"{path}: not a readable .h5ad file ({type(e).__name__}: {e})") from e


def spatial_library(adata: Any) -> tuple[str | None, dict]:
    """(library_id, uns['spatial'][library_id]) — the stgen one, else the first; (None, {})."""
    sp = adata.uns.get("spatial") or {}
    if not sp:
        return None, {}
    lib = plain(dict(adata.uns.get("stgen", {}) or {})).get("library_id")
    if lib not in sp:
        lib = next(iter(sp))
    return str(lib), dict(sp[lib])


def h5ad_mpp(adata: Any) -> tuple[float, str]:
    """(µm per level-0 px, source): ``uns['stgen']['mpp']``, else Visium scalefactors.

    Falls back to ``scalefactors['microns_per_pixel']`` (if present), then to the Visium
    spot diameter (55 µm / ``spot_diameter_fullres``), then to 1.0 ("pixels").
    """
    st = plain(dict(adata.uns.get("stgen", {}) or {}))
    if st.get("mpp"):
        return float(st["mpp"]), "uns['stgen']['mpp']"
    _, lib = spatial_library(adata)
    sf = plain(dict(lib.get("scalefactors", {}) or {}))
    if sf.get("microns_per_pixel"):
        return float(sf["microns_per_pixel"]), "scalefactors['microns_per_pixel']"
    if sf.get("spot_diameter_fullres"):
        return VISIUM_SPOT_UM / float(sf["spot_diameter_fullres"]), "Visium spot diameter"
    return 1.0, "none (pixels)"


def _feature_genes(adata: Any, max_values: int = MAX_FEATURE_VALUES) -> np.ndarray:
    """Columns to show as point features: all, unless spots × genes exceeds ``max_values``
    (a whole-transcriptome Visium file); then the highly variable genes, else the most
    variable ones, as many as fit."""
    n, g = adata.n_obs, adata.n_vars
    if n * g <= max_values or n == 0:
        return np.arange(g)
    k = max(1, max_values // n)
    if "highly_variable" in adata.var and adata.var["highly_variable"].sum() > 0:
        hv = np.flatnonzero(adata.var["highly_variable"].to_numpy(bool))
        if len(hv) <= k:
            return hv
    x = adata.X
    mean = np.asarray(x.mean(axis=0)).ravel()
    sq = x.multiply(x).mean(axis=0) if hasattr(x, "multiply") else (np.asarray(x) ** 2).mean(0)
    var = np.asarray(sq).ravel() - mean**2
    return np.sort(np.argsort(-var)[:k])


def spot_colour_limits(values: np.ndarray) -> tuple[float, float]:
    """Colour limits from the 2nd-98th percentiles of the finite values (never empty)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (0.0, 1.0)
    lo, hi = (float(x) for x in np.percentile(v, [2, 98]))
    return (lo, hi if hi > lo else lo + 1.0)


def read_h5ad_layers(path: str | os.PathLike, include_image: bool = True) -> list[LayerData]:
    """napari layers from an h5ad, in world µm.

    Returns, in order: the hires thumbnail (image, if present and ``include_image``), the
    codebook grid (labels, for tile exports with a grid), the spots / tiles (points with one
    feature column per gene plus the obs columns), the ROIs (shapes) and each generated tile
    (image of kind ``'generated'``); layer metadata as :mod:`napari_stgen.io.layer_meta`.
    """
    path = Path(path)
    adata = _read(path)
    try:
        return _layers(path, adata, include_image)
    except StgenError:
        raise
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
        msg = " ".join(str(e).split())[:200]
        raise StgenError(
            f"{path}: malformed napari-stgen content ({type(e).__name__}: {msg})"
        ) from e


def _finite(path: Path, what: str, v: Any, positive: bool = False) -> np.ndarray:
    """``v`` as float64, refusing non-numbers, NaN/inf (and ≤ 0 when ``positive``)."""
    try:
        a = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        raise StgenError(f"{path}: {what} is not numeric ({v!r:.60})") from None
    if not np.isfinite(a).all() or (positive and (a <= 0).any()):
        kind = "finite positive" if positive else "finite"
        raise StgenError(f"{path}: {what} must be {kind}, got {a.ravel()[:4].tolist()}")
    return a


#: Codebook grids larger than this many cells are refused on import (4 bytes a cell).
MAX_GRID_CELLS = 1 << 26


def anndata_layers(
    adata: Any, base: str, source: str, include_image: bool = True
) -> list[LayerData]:
    """napari layers from an in-memory AnnData (as ``read_h5ad_layers``); ``base`` names the
    layers, ``source`` (a path) goes into messages and ``metadata['stgen']['h5ad_path']``."""
    return _layers(Path(source), adata, include_image, base)


def _layers(
    path: Path, adata: Any, include_image: bool, base: str | None = None
) -> list[LayerData]:
    if adata.n_obs == 0:
        raise StgenError(f"{path}: no spots (obs is empty)")
    if "spatial" not in adata.obsm:
        raise StgenError(f"{path}: no obsm['spatial'] (spot positions); not a spatial h5ad")
    sp = np.asarray(adata.obsm["spatial"])
    if sp.ndim != 2 or sp.shape[1] < 2:
        raise StgenError(f"{path}: obsm['spatial'] has shape {sp.shape}, expected (n_obs, 2)")
    xy = _finite(path, "obsm['spatial']", sp[:, :2])
    mpp, mpp_src = h5ad_mpp(adata)
    mpp = float(_finite(path, f"µm per pixel ({mpp_src})", mpp, positive=True))
    if not 1e-3 <= mpp <= 1e4:
        raise StgenError(f"{path}: µm per pixel {mpp:g} ({mpp_src}) is not plausible")
    st = plain(dict(adata.uns.get("stgen", {}) or {}))
    lib_id, lib = spatial_library(adata)
    sf = plain(dict(lib.get("scalefactors", {}) or {}))
    base = base or path.stem
    origin = _finite(path, "origin_yx_um", st.get("origin_yx_um", (0.0, 0.0))).ravel()[:2]
    if origin.shape != (2,):
        raise StgenError(f"{path}: origin_yx_um must hold two numbers")
    common = {"h5ad_path": str(path), "mpp": mpp, "mpp_source": mpp_src, "library_id": lib_id}
    layers: list[LayerData] = []

    if include_image:
        layers += _thumbnail_layers(path, lib, mpp, origin, f"{base} ", common)

    keep = _feature_genes(adata)
    genes = [str(g) for g in adata.var_names[keep]]
    xmat = adata.X[:, keep] if len(keep) < adata.n_vars else adata.X
    if hasattr(xmat, "toarray"):
        xmat = xmat.toarray()
    xmat = np.asarray(xmat, dtype=np.float32)
    feats = pd.DataFrame(xmat, columns=genes)
    obs = adata.obs.reset_index(drop=True)
    for c in obs.columns:
        if str(c) not in feats.columns:
            feats[str(c)] = obs[c].to_numpy() if obs[c].dtype.name != "category" else obs[c]
    feats.insert(0, "barcode", np.asarray(adata.obs_names, dtype=object))
    diam_um = float(sf.get("spot_diameter_fullres", 0) or 0) * mpp or 1.0
    pkw: dict[str, Any] = {
        "name": f"{base} {st.get('obs_kind', 'spots')}",
        "features": feats,
        "size": diam_um,
        "scale": (1.0, 1.0),
        "units": "um",
        "border_width": 0,
        "metadata": stgen_metadata(
            "spots", **{**common, **st, "mpp": mpp, "genes": genes,
                        "genes_subset": len(genes) < adata.n_vars}
        ),  # fmt: skip
    }
    if genes and len(adata):
        disp = st.get("display") if isinstance(st.get("display"), dict) else {}
        show = str(disp["gene"]) if disp.get("gene") in genes else genes[0]  # as exported
        lim = disp.get("contrast_limits") if show == disp.get("gene") else None
        pkw["face_color"] = show
        pkw["face_colormap"] = str(disp.get("colormap") or "viridis")
        pkw["face_contrast_limits"] = (
            tuple(float(v) for v in lim)
            if lim is not None
            else spot_colour_limits(xmat[:, genes.index(show)])
        )

    layers += _codebook_layers(path, adata, st.get("grid"), f"{base} ", common)

    layers.append((xy[:, ::-1] * mpp + origin, pkw, "points"))

    rois = rois_from_record(st["rois"]) if st.get("rois") else []
    if rois:
        layers.append(
            (
                [r.vertices_yx_um for r in rois],
                {
                    "name": f"{base} ROIs",
                    "shape_type": [r.shape_type for r in rois],
                    "features": pd.DataFrame(
                        {"name": [r.name for r in rois], "layer": [r.layer for r in rois]}
                    ),
                    "units": "um",
                    "face_color": "transparent",
                    "edge_color": "yellow",
                    "metadata": stgen_metadata("rois", **common),
                },
                "shapes",
            )
        )
    for rec in (st.get("generated") or {}).values():
        layers.append(GeneratedTile.from_record(rec).layer_data())
    return layers


def _codebook_layers(
    path: Path, adata: Any, grid: dict | None, prefix: str, common: dict
) -> list[LayerData]:
    """The gene-code map of a tile export with a grid as a labels layer (or none)."""
    if not grid or "genst_code" not in adata.obs or not {"grid_row", "grid_col"} <= set(adata.obs):
        return []
    shape = tuple(int(v) for v in _finite(path, "grid shape", grid["shape"]).ravel()[:2])
    if len(shape) != 2 or min(shape) < 1 or shape[0] * shape[1] > MAX_GRID_CELLS:
        raise StgenError(f"{path}: grid shape {list(shape)} is not a plausible tile grid")
    _finite(path, "grid tile_um", grid["tile_um"], positive=True)
    _finite(path, "grid origin_yx_um", grid["origin_yx_um"])
    lab = np.zeros(shape, dtype=np.int32)
    r = adata.obs["grid_row"].to_numpy(np.int64)
    c = adata.obs["grid_col"].to_numpy(np.int64)
    ok = (r >= 0) & (r < shape[0]) & (c >= 0) & (c < shape[1])
    lab[r[ok], c[ok]] = adata.obs["genst_code"].to_numpy(np.int64)[ok] + 1
    g = Grid.from_record(grid)
    meta = {
        "name": f"{prefix}codebook",
        "scale": g.scale,
        "translate": g.translate,
        "units": "um",
        "opacity": 0.5,
        "visible": False,
        "metadata": stgen_metadata("codebook", code_offset=1, **common),
    }
    return [(lab, meta, "labels")]


def _thumbnail_layers(
    path: Path, lib: dict, mpp: float, origin: np.ndarray, prefix: str, common: dict
) -> list[LayerData]:
    """The hires (else lowres) thumbnail of ``uns['spatial']`` as an image layer (or none)."""
    images = lib.get("images", {}) or {}
    if "hires" not in images and "lowres" not in images:
        return []
    sf = plain(dict(lib.get("scalefactors", {}) or {}))
    key = "hires" if "hires" in images else "lowres"
    f = _finite(path, f"tissue_{key}_scalef", sf.get(f"tissue_{key}_scalef", 1.0) or 1.0, True)
    s = mpp / float(f)
    img = np.asarray(images[key])
    if img.ndim != 3 or img.shape[2] not in (3, 4) or img.dtype.kind not in "uf":
        raise StgenError(f"{path}: uns spatial image {key!r} is not an RGB image ({img.shape})")
    meta = {
        "name": f"{prefix}{key}",
        "rgb": True,
        "scale": (s, s),
        "translate": tuple(origin),
        "units": "um",
        "metadata": stgen_metadata("thumbnail", **common),
    }
    return [(img, meta, "image")]


def read_generated_tiles(path: str | os.PathLike) -> list[GeneratedTile]:
    """The generated-tile records of an h5ad (``uns['stgen']['generated']``)."""
    st = plain(dict(_read(Path(path)).uns.get("stgen", {}) or {}))
    return [GeneratedTile.from_record(r) for r in (st.get("generated") or {}).values()]
