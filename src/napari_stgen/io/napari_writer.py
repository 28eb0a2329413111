"""npe2 writer: napari layers → one napari-stgen ``.h5ad`` (see ``io/anndata.py``).

What goes where:

- points layers → ``obs`` rows at their world positions (µm → level-0 px with the slide's
  µm/px); their ``features`` → ``X`` (gene columns: ``metadata['stgen_genes']``, else the
  float columns) and ``obs`` (everything else: barcode, genst_code, code names, ...);
- labels layers (codebook maps) → ``obs['genst_code']`` sampled at each spot when the
  points carry none (label value − ``metadata['stgen_code_offset']``, default 1; code names
  from ``metadata['stgen_code_names']`` or the layer's features ``index``/``name``);
- shapes layers → ROIs in µm (every shape of every layer);
- image layers with ``metadata['stgen_generated']`` → generated-tile records;
- the largest other RGB image layer is the slide: its µm/px maps world µm to level-0 px and
  its pyramid gives the hires/lowres thumbnails.

No napari import here: layer data tuples are plain (data, meta, type).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StgenError
from ..inference.confidence import uncertainty_record
from .anndata import (
    GeneratedTile,
    LayerData,
    Roi,
    predictions_to_anndata,
    thumbnails_from_levels,
)
from .anndata import (
    write_h5ad as _write_atomic,
)

# obs columns that are never genes even when numeric
NON_GENE = {
    "barcode",
    "genst_code",
    "uncertainty",
    "grid_row",
    "grid_col",
    "in_tissue",
    "array_row",
    "array_col",
    "tissue_fraction",
    "index",
}


def _meta(meta: dict) -> dict:
    return dict(meta.get("metadata") or {})


def _vec2(v: Any, default: float) -> np.ndarray:
    if v is None:
        return np.array([default, default], dtype=np.float64)
    a = np.asarray(v, dtype=np.float64).ravel()
    return a[-2:] if len(a) >= 2 else np.array([default, default])


def _levels(data: Any) -> list:
    """Pyramid levels of an image layer's data (list / MultiScaleData / single array)."""
    if isinstance(data, (list, tuple)) or type(data).__name__ == "MultiScaleData":
        return list(data)
    return [data]


def _is_rgb_slide(data: Any, meta: dict) -> bool:
    lv = _levels(data)
    sh = tuple(lv[0].shape)
    return bool(meta.get("rgb", len(sh) == 3 and sh[-1] in (3, 4))) and len(sh) == 3


def _find_slide(layers: Sequence[LayerData]) -> LayerData | None:
    best, area = None, -1.0
    for data, meta, kind in layers:
        if kind != "image" or "stgen_generated" in _meta(meta):
            continue
        if not _is_rgb_slide(data, meta):
            continue
        sh = _levels(data)[0].shape
        s = _vec2(meta.get("scale"), 1.0)
        a = float(sh[0] * s[0] * sh[1] * s[1])
        if a > area:
            best, area = (data, meta, kind), a
    return best


def _slide_mpp(slide_layer: LayerData | None, points_meta: list[dict]) -> tuple[float, str]:
    if slide_layer is not None:
        md = _meta(slide_layer[1])
        if md.get("mpp"):
            return float(md["mpp"]), "slide layer metadata['mpp']"
        st = md.get("stgen") if isinstance(md.get("stgen"), dict) else {}
        if st.get("mpp"):
            return float(st["mpp"]), "slide layer metadata['stgen']['mpp']"
        sl = md.get("slide")
        if sl is not None and getattr(sl, "mpp", None):
            return float(sl.mpp), "slide layer metadata['slide'].mpp"
        return float(_vec2(slide_layer[1].get("scale"), 1.0)[-1]), "slide layer scale"
    for md in points_meta:
        st = md.get("stgen") or {}
        if md.get("mpp"):
            return float(md["mpp"]), "points layer metadata['mpp']"
        if st.get("mpp"):
            return float(st["mpp"]), "points layer metadata['stgen']['mpp']"
    return 1.0, "none (world units written as pixels)"


def _slide_images(slide_layer: LayerData, mpp: float) -> dict:
    data, meta, _ = slide_layer
    s0 = float(_vec2(meta.get("scale"), 1.0)[-1])
    (hi, sh), (lo, sl) = thumbnails_from_levels(_levels(data))
    k = mpp / s0  # layer px per level-0 px of the exported coordinates
    return {
        "hires": hi,
        "lowres": lo,
        "tissue_hires_scalef": sh * k,
        "tissue_lowres_scalef": sl * k,
    }


def _world_yx(data: Any, meta: dict) -> np.ndarray:
    d = np.asarray(data, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] < 2:
        return np.zeros((0, 2))
    return d[:, -2:] * _vec2(meta.get("scale"), 1.0) + _vec2(meta.get("translate"), 0.0)


def _gene_columns(feats: Any, md: dict) -> list[str]:
    if md.get("stgen_genes") is not None:
        return [str(g) for g in md["stgen_genes"] if str(g) in feats.columns]
    return [
        str(c)
        for c in feats.columns
        if feats[c].dtype.kind in "fiu" and str(c) not in NON_GENE and not str(c).startswith("_")
    ]


def _labels_lookup(layer: LayerData, yx_um: np.ndarray) -> np.ndarray:
    """Label value under each world (y, x); -1 outside the layer."""
    data, meta, _ = layer
    lab = _levels(data)[0]
    s = _vec2(meta.get("scale"), 1.0)
    t = _vec2(meta.get("translate"), 0.0)
    rc = np.floor((yx_um - t) / s + 0.5).astype(np.int64)
    h, w = lab.shape[-2:]
    ok = (rc[:, 0] >= 0) & (rc[:, 0] < h) & (rc[:, 1] >= 0) & (rc[:, 1] < w)
    out = np.full(len(rc), -1, dtype=np.int64)
    arr = np.asarray(lab)
    while arr.ndim > 2:
        arr = arr[0]
    out[ok] = arr[rc[ok, 0], rc[ok, 1]]
    return out


def _label_cells(layer: LayerData) -> dict:
    """Labelled cells of a codebook map (one pixel per grid cell): centres µm, codes, grid."""
    data, meta, _ = layer
    arr = np.asarray(_levels(data)[0])
    while arr.ndim > 2:
        arr = arr[0]
    off = int(_meta(meta).get("stgen_code_offset", 1))
    s = _vec2(meta.get("scale"), 1.0)
    t = _vec2(meta.get("translate"), 0.0)
    rr, cc = np.nonzero(arr >= off)
    rc = np.stack([rr, cc], axis=1).astype(np.int64)
    return {
        "rc": rc,
        "yx": rc * s + t,  # napari centres pixel (0, 0) on translate
        "code": arr[rr, cc].astype(np.int64) - off,
        "tile_um": float(s[-1]),
        "grid": {
            "origin_yx_um": t - s / 2,
            "tile_um": float(s[-1]),
            "shape": np.asarray(arr.shape, dtype=np.int64),
        },
    }


def _code_names_from_labels(layer: LayerData, offset: int) -> dict[int, str]:
    md = _meta(layer[1])
    names = md.get("stgen_code_names")
    if isinstance(names, dict):
        return {int(k): str(v) for k, v in names.items()}
    if isinstance(names, (list, tuple)):
        return {i: str(n) for i, n in enumerate(names)}
    f = layer[1].get("features")
    if f is not None and len(f) and "index" in f.columns:
        col = next((c for c in ("name", "code_name", "genst_code_name") if c in f.columns), None)
        if col:
            return {
                int(i) - offset: str(n)
                for i, n in zip(f["index"], f[col], strict=True)
                if int(i) - offset >= 0
            }
    return {}


def _shape_rois(layers: Sequence[LayerData]) -> list[Roi]:
    rois = []
    for data, meta, kind in layers:
        if kind != "shapes":
            continue
        types = meta.get("shape_type") or ["polygon"] * len(data)
        if isinstance(types, str):
            types = [types] * len(data)
        feats = meta.get("features")
        names = (
            [str(v) for v in feats["name"]]
            if feats is not None and "name" in getattr(feats, "columns", [])
            else [f"{meta.get('name', 'shapes')} {i}" for i in range(len(data))]
        )
        lname = str(meta.get("name", "shapes"))
        src = (
            [str(v) for v in feats["layer"]]
            if feats is not None and "layer" in getattr(feats, "columns", [])
            else [lname] * len(data)
        )
        for i, verts in enumerate(data):
            v = np.asarray(verts, dtype=np.float64)[:, -2:]
            v = v * _vec2(meta.get("scale"), 1.0) + _vec2(meta.get("translate"), 0.0)
            rois.append(Roi(v, str(types[i]), names[i], src[i]))
    return rois


def layers_to_anndata(layers: Sequence[LayerData], library_id: str | None = None) -> Any:
    """One AnnData from napari layer data tuples (see the module docstring)."""
    import pandas as pd

    layers = list(layers)
    slide_layer = _find_slide(layers)
    points = [ly for ly in layers if ly[2] == "points"]
    labels = [ly for ly in layers if ly[2] == "labels"]
    pmeta = [_meta(m) for _, m, _ in points]
    mpp, mpp_src = _slide_mpp(slide_layer, pmeta)
    origin = _vec2(slide_layer[1].get("translate"), 0.0) if slide_layer is not None else np.zeros(2)

    genes: list[str] = []
    blocks, yx_all, obs_parts, names = [], [], [], []
    diam = []
    uns_base: dict[str, Any] = {}
    seen: set[tuple[int, int]] = set()
    for (data, meta, _), md in zip(points, pmeta, strict=True):
        yx = _world_yx(data, meta)
        n = len(yx)
        key = (n, hash(np.ascontiguousarray(yx).tobytes()))
        if key in seen:  # the same spots shown twice (e.g. one display layer per gene)
            continue
        seen.add(key)
        feats = meta.get("features")
        feats = pd.DataFrame(feats).reset_index(drop=True) if feats is not None else pd.DataFrame()
        if len(feats) != n:
            feats = pd.DataFrame(index=range(n))
        gcols = _gene_columns(feats, md)
        for g in gcols:
            if g not in genes:
                genes.append(g)
        blocks.append((gcols, feats[gcols].to_numpy(np.float32) if gcols else None, n))
        other = feats[[c for c in feats.columns if c not in gcols and c != "barcode"]]
        obs_parts.append(other.assign(layer=str(meta.get("name", "points"))))
        ids = (
            [str(b) for b in feats["barcode"]]
            if "barcode" in feats.columns
            else [f"{meta.get('name', 'points')}_{i}" for i in range(n)]
        )
        names.append(ids)
        yx_all.append(yx)
        st = md.get("stgen") or {}
        predict_layer = st.get("kind") == "tiles" or (st.get("kind") == "spots" and "gene" in st)
        if predict_layer and "obs_kind" not in st and n > 1:
            # the Predict widget's display layers: drawn smaller than the tiles they stand for
            from scipy.spatial import cKDTree

            diam.append(float(np.median(cKDTree(yx).query(yx, k=2)[0][:, 1])))
            uns_base.setdefault("obs_kind", "tiles")
            uns_base.setdefault("normalization", "log1p_cp10k")
        else:
            if "normalization" not in st and st.get("source"):  # e.g. the sample's measured counts
                uns_base.setdefault("normalization", str(st["source"]))
            size = np.asarray(meta.get("size", 10.0), dtype=np.float64)
            diam.append(float(np.median(size)) * float(_vec2(meta.get("scale"), 1.0)[-1]))
        keys = ("model", "slide", "region_um", "grid", "code_names", "obs_kind", "normalization",
                "uncertainty")  # fmt: skip
        for k in (*keys, "display"):
            if k in st and k not in uns_base:
                uns_base[k] = st[k]

    if not blocks and labels:  # a codebook map alone: one row per labelled grid cell
        cells = _label_cells(labels[0])
        blocks.append(([], None, len(cells["yx"])))
        yx_all.append(cells["yx"])
        obs_parts.append(pd.DataFrame({"grid_row": cells["rc"][:, 0], "grid_col": cells["rc"][:, 1],
                                       "genst_code": cells["code"]}))  # fmt: skip
        names.append([f"tile_{r}_{c}" for r, c in cells["rc"]])
        diam.append(cells["tile_um"])
        uns_base.setdefault("obs_kind", "tiles")
        uns_base.setdefault("grid", cells["grid"])
    n_all = sum(b[2] for b in blocks)
    x = np.full((n_all, len(genes)), np.nan, dtype=np.float32)
    gpos = {g: i for i, g in enumerate(genes)}
    r0 = 0
    for gcols, vals, n in blocks:
        if vals is not None:
            x[r0 : r0 + n, [gpos[g] for g in gcols]] = vals
        r0 += n
    yx = np.concatenate(yx_all) if yx_all else np.zeros((0, 2))
    obs = pd.concat(obs_parts, ignore_index=True) if obs_parts else pd.DataFrame()
    ids = [i for part in names for i in part]
    if len(set(ids)) != len(ids):  # two layers with the same barcodes: prefix by layer
        ids = [f"{o}:{i}" for o, i in zip(obs.get("layer", [""] * len(ids)), ids, strict=True)]
        if len(set(ids)) != len(ids):
            ids = [f"{i}_{k}" for k, i in enumerate(ids)]
    if len(blocks) == 1 and "layer" in obs:
        obs = obs.drop(columns="layer")

    codes = None
    code_names: dict[int, str] = {}
    if "genst_code" in obs.columns:
        codes = obs.pop("genst_code").to_numpy()
    if labels and n_all:
        lab = labels[0]
        off = int(_meta(lab[1]).get("stgen_code_offset", 1))
        code_names = _code_names_from_labels(lab, off)
        if codes is None:
            v = _labels_lookup(lab, yx)
            codes = np.where(v >= off, v - off, -1)
    if "genst_code_name" in obs.columns:
        cn = obs.pop("genst_code_name")
        if codes is not None:
            for c, name in zip(codes, cn, strict=True):
                if int(c) >= 0 and isinstance(name, str):
                    code_names.setdefault(int(c), name)
    if not code_names and "code_names" in uns_base:
        cn = uns_base.pop("code_names")
        code_names = {int(c): str(n) for c, n in zip(cn["code"], cn["name"], strict=True)}
    uns_base.pop("code_names", None)

    generated = [
        GeneratedTile.from_record(_meta(m)["stgen_generated"], image=np.asarray(d))
        for d, m, k in layers
        if k == "image" and "stgen_generated" in _meta(m)
    ]
    rois = _shape_rois(layers)
    images = _slide_images(slide_layer, mpp) if slide_layer is not None else None
    slide_md = _meta(slide_layer[1]) if slide_layer is not None else {}
    extra: dict[str, Any] = {
        k: v for k, v in uns_base.items() if k in ("grid", "display", "uncertainty")
    }
    extra["mpp_source"] = mpp_src
    if np.any(origin != 0):
        extra["origin_yx_um"] = origin
    if slide_layer is not None and "slide" not in uns_base:
        st = slide_md.get("stgen") if isinstance(slide_md.get("stgen"), dict) else {}
        sp = st.get("path") or getattr(slide_md.get("slide"), "path", None)
        h, w = _levels(slide_layer[0])[0].shape[:2]
        k = float(_vec2(slide_layer[1].get("scale"), 1.0)[-1]) / mpp  # level-0 px per layer px
        h, w = round(h * k), round(w * k)
        extra["slide"] = {"path": str(sp or ""), "layer": str(slide_layer[1].get("name", ""))}
        extra["slide"].update({"width": int(w), "height": int(h)})
    elif "slide" in uns_base:
        extra["slide"] = uns_base["slide"]
    if library_id is None and slide_layer is not None:
        library_id = str(slide_layer[1].get("name") or "") or None
    adata = predictions_to_anndata(
        x,
        genes,
        (yx[:, ::-1] - origin[::-1]) / mpp,
        codes=codes,
        code_names=code_names or None,
        obs_names=ids,
        model=uns_base.get("model"),
        region_um=uns_base.get("region_um"),
        mpp=mpp,
        library_id=library_id,
        obs=obs if len(obs.columns) else None,
        rois=rois,
        generated=generated,
        spot_diameter_um=float(np.median(diam)) if diam else None,
        images=images,
        obs_kind=str(uns_base.get("obs_kind", "spots")),
        normalization=str(uns_base.get("normalization", "log1p_cp10k")),
        extra_uns=extra,
    )
    if uns_base.get("model") is not None:  # keep the recorded model provenance verbatim
        adata.uns["stgen"]["model"] = uns_base["model"]
    return adata


def exportable(layers: Sequence[LayerData]) -> bool:
    """True when the layers hold something the writer records (spots, ROIs, tiles)."""
    return any(
        k in ("points", "shapes", "labels") or (k == "image" and "stgen_generated" in _meta(m))
        for _, m, k in layers
    )


def write_layers(
    path: str | os.PathLike, layers: Sequence[LayerData], overwrite: bool = False
) -> Path:
    """Write napari layer data tuples to one h5ad (atomic; see ``layers_to_anndata``)."""
    if not exportable(layers):
        raise StgenError(
            f"{path}: nothing to export (need a points, labels or shapes layer, or a "
            "generated tile)"
        )
    return _write_atomic(layers_to_anndata(layers), path, overwrite=overwrite)


def write_h5ad(path: str, layer_data: list[LayerData]) -> list[str]:
    """npe2 writer (File ▸ Save Layers): napari's save dialog has confirmed overwriting."""
    return [str(write_layers(path, layer_data, overwrite=True))]


def store_layer_data(store: Any, code_names: dict | None = None, model: Any = None) -> LayerData:
    """A points layer tuple for a Predict-widget ``PredictionStore`` (every predicted tile).

    Carries the tile ids, grid cells, all genes, gene codes, code names, grid and model
    provenance, so the writer records them exactly as ``stgen predict --grid`` does.
    """
    import pandas as pd

    from .anndata import _model_record

    if store.grid is None or len(store) == 0:
        raise StgenError("no predictions to export yet")
    feats = pd.DataFrame(store.expr, columns=list(store.genes), copy=False)
    feats["genst_code"] = store.code
    if getattr(store, "has_uncertainty", False):
        feats["uncertainty"] = store.uncertainty
    feats["grid_row"] = store.tiles[:, 0]
    feats["grid_col"] = store.tiles[:, 1]
    feats["barcode"] = store.tile_ids
    g = store.grid
    st: dict[str, Any] = {
        "obs_kind": "tiles",
        "grid": {
            "origin_yx_um": np.asarray(g.origin_um, dtype=np.float64),
            "tile_um": float(g.tile_um),
            "shape": np.asarray(g.shape, dtype=np.int64),
        },
    }
    if store.mpp:
        st["mpp"] = float(store.mpp)
    if model is not None:
        st["model"] = {k: v for k, v in _model_record(model).items() if v is not None}
        info = uncertainty_record(model) if "uncertainty" in feats else None
        if info:
            st["uncertainty"] = info
    if code_names:
        ks = sorted(int(k) for k in code_names)
        st["code_names"] = {"code": ks, "name": [str(code_names[k]) for k in ks]}
    if getattr(store, "display", None):  # the gene and colour scale shown: same on reopening
        st["display"] = dict(store.display)
    meta = {
        "name": "predicted tiles",
        "features": feats,
        "size": float(g.tile_um),
        "metadata": {"stgen_genes": list(store.genes), "stgen": st},
    }
    return (store.centres_um, meta, "points")
