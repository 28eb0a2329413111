"""npe2 writer: napari layers → one napari-stgen ``.h5ad`` (see ``io/anndata_export.py``).

For layers the plugin did not predict (File ▸ Save Layers, user points, ROIs, generated
tiles, reopened exports); the viewer's predictions are written from their store by
:func:`napari_stgen.inference.export.store_to_anndata`. Both end in the same
:func:`~napari_stgen.io.anndata_export.record_to_anndata`. µm/px comes from one place, the
slide layer's ``metadata['stgen']['mpp']`` (:mod:`napari_stgen.io.layer_meta`).

What goes where:

- points layers → ``obs`` rows at their world positions (µm → level-0 px with the slide's
  µm/px); their ``features`` → ``X`` (gene columns: ``metadata['stgen']['genes']``, else
  the float columns) and ``obs`` (everything else: barcode, genst_code, code names, ...);
- labels layers (codebook maps) → ``obs['genst_code']`` sampled at each spot when the
  points carry none (label value − ``metadata['stgen']['code_offset']``, default 1; code
  names from ``metadata['stgen']['code_names']`` or the layer's features ``index``/``name``);
- shapes layers → ROIs in µm (every shape of every layer);
- generated-tile image layers (kind ``'generated'``) → generated-tile records;
- the largest other RGB image layer is the slide: its µm/px maps world µm to level-0 px and
  its pyramid gives the hires/lowres thumbnails.

No napari import here: layer data tuples are plain (data, meta, type).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from napari_stgen.coords import Grid
from napari_stgen.errors import StgenError
from napari_stgen.io.anndata_export import ExportRecord, record_to_anndata, write_h5ad
from napari_stgen.io.layer_meta import generated_record, is_prediction_view, layer_info, layer_mpp
from napari_stgen.io.records import GeneratedTile, LayerData, Roi
from napari_stgen.io.thumbnails import thumbnails_from_levels

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
        if kind != "image" or generated_record(_meta(meta)) is not None:
            continue
        if not _is_rgb_slide(data, meta):
            continue
        sh = _levels(data)[0].shape
        s = _vec2(meta.get("scale"), 1.0)
        a = float(sh[0] * s[0] * sh[1] * s[1])
        if a > area:
            best, area = (data, meta, kind), a
    return best


def _slide_mpp(slide_layer: LayerData | None, points: list[LayerData]) -> tuple[float, str]:
    """µm per level-0 px: the slide layer's ``metadata['stgen']['mpp']`` (else its scale),
    else a points layer's, else 1.0 (world units written as pixels)."""
    if slide_layer is not None:
        mpp = layer_mpp(_meta(slide_layer[1]))
        if mpp:
            return mpp, "slide layer metadata['stgen']['mpp']"
        return float(_vec2(slide_layer[1].get("scale"), 1.0)[-1]), "slide layer scale"
    for _, meta, _ in points:
        mpp = layer_mpp(_meta(meta))
        if mpp:
            return mpp, "points layer metadata['stgen']['mpp']"
    return 1.0, "none (world units written as pixels)"


def layer_images(slide_layer: LayerData, mpp: float) -> dict:
    """Thumbnails (and scalefactors at ``mpp``) of a slide layer's pyramid."""
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
    genes = layer_info(md).get("genes")
    if genes is not None:
        return [str(g) for g in genes if str(g) in feats.columns]
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
    off = _code_offset(layer)
    s = _vec2(meta.get("scale"), 1.0)
    t = _vec2(meta.get("translate"), 0.0)
    rr, cc = np.nonzero(arr >= off)
    rc = np.stack([rr, cc], axis=1).astype(np.int64)
    return {
        "rc": rc,
        "yx": rc * s + t,  # napari centres pixel (0, 0) on translate
        "code": arr[rr, cc].astype(np.int64) - off,
        "tile_um": float(s[-1]),
        "grid": Grid(tuple(t - s / 2), float(s[-1]), arr.shape[-2:]).to_record(),
    }


def _code_offset(layer: LayerData) -> int:
    """Label value − gene code of a codebook map (``metadata['stgen']['code_offset']``)."""
    return int(layer_info(_meta(layer[1])).get("code_offset", 1))


def _code_names_from_labels(layer: LayerData, offset: int) -> dict[int, str]:
    names = layer_info(_meta(layer[1])).get("code_names")
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


def shape_rois(layers: Sequence[LayerData]) -> list[Roi]:
    """ROIs in world µm: every shape of every shapes layer."""
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


#: ``metadata['stgen']`` entries of a points layer that go to ``uns['stgen']`` (first wins)
UNS_KEYS = ("model", "slide", "region_um", "grid", "code_names", "obs_kind", "normalization",
            "uncertainty", "display")  # fmt: skip


@dataclass
class _Rows:
    """Rows gathered from points (or codebook labels) layers, in layer order."""

    genes: list[str] = field(default_factory=list)
    blocks: list[tuple[list[str], np.ndarray | None, int]] = field(default_factory=list)
    yx: list[np.ndarray] = field(default_factory=list)
    obs: list[Any] = field(default_factory=list)
    ids: list[list[str]] = field(default_factory=list)
    diam: list[float] = field(default_factory=list)
    uns: dict[str, Any] = field(default_factory=dict)
    seen: set[tuple[int, int]] = field(default_factory=set)

    @property
    def n(self) -> int:
        return sum(b[2] for b in self.blocks)


def _spot_diameter(yx: np.ndarray, meta: dict, st: dict, uns: dict) -> float:
    """Spot diameter µm of a points layer; the Predict widget's display layers are drawn
    smaller than the tiles they stand for, so theirs is the tile pitch."""
    if is_prediction_view(_meta(meta)) and "obs_kind" not in st and len(yx) > 1:
        uns.setdefault("obs_kind", "tiles")
        uns.setdefault("normalization", "log1p_cp10k")
        return float(np.median(cKDTree(yx).query(yx, k=2)[0][:, 1]))
    if "normalization" not in st and st.get("source"):  # e.g. the sample's measured counts
        uns.setdefault("normalization", str(st["source"]))
    size = np.asarray(meta.get("size", 10.0), dtype=np.float64)
    return float(np.median(size)) * float(_vec2(meta.get("scale"), 1.0)[-1])


def _add_points(rows: _Rows, layer: LayerData) -> None:
    """Add a points layer's spots (once: the same spots shown twice are written once)."""
    data, meta, _ = layer
    md = _meta(meta)
    yx = _world_yx(data, meta)
    n = len(yx)
    key = (n, hash(np.ascontiguousarray(yx).tobytes()))
    if key in rows.seen:  # e.g. one display layer per gene
        return
    rows.seen.add(key)
    feats = meta.get("features")
    feats = pd.DataFrame(feats).reset_index(drop=True) if feats is not None else pd.DataFrame()
    if len(feats) != n:
        feats = pd.DataFrame(index=range(n))
    gcols = _gene_columns(feats, md)
    rows.genes += [g for g in gcols if g not in rows.genes]
    rows.blocks.append((gcols, feats[gcols].to_numpy(np.float32) if gcols else None, n))
    other = feats[[c for c in feats.columns if c not in gcols and c != "barcode"]]
    name = str(meta.get("name", "points"))
    rows.obs.append(other.assign(layer=name))
    if "barcode" in feats.columns:
        rows.ids.append([str(b) for b in feats["barcode"]])
    else:
        rows.ids.append([f"{name}_{i}" for i in range(n)])
    rows.yx.append(yx)
    st = layer_info(md)
    rows.diam.append(_spot_diameter(yx, meta, st, rows.uns))
    for k in UNS_KEYS:
        if k in st and k not in rows.uns:
            rows.uns[k] = st[k]


def _add_label_cells(rows: _Rows, layer: LayerData) -> None:
    """A codebook map alone: one row per labelled grid cell."""
    cells = _label_cells(layer)
    rc = cells["rc"]
    rows.blocks.append(([], None, len(cells["yx"])))
    rows.yx.append(cells["yx"])
    rows.obs.append(pd.DataFrame({"grid_row": rc[:, 0], "grid_col": rc[:, 1],
                                  "genst_code": cells["code"]}))  # fmt: skip
    rows.ids.append([f"tile_{r}_{c}" for r, c in rc])
    rows.diam.append(cells["tile_um"])
    rows.uns.setdefault("obs_kind", "tiles")
    rows.uns.setdefault("grid", cells["grid"])


def _matrix(rows: _Rows) -> np.ndarray:
    """(N, G) expression, NaN where a layer lacks a gene."""
    x = np.full((rows.n, len(rows.genes)), np.nan, dtype=np.float32)
    gpos = {g: i for i, g in enumerate(rows.genes)}
    r0 = 0
    for gcols, vals, n in rows.blocks:
        if vals is not None:
            x[r0 : r0 + n, [gpos[g] for g in gcols]] = vals
        r0 += n
    return x


def _unique_ids(ids: list[str], obs: Any) -> list[str]:
    if len(set(ids)) != len(ids):  # two layers with the same barcodes: prefix by layer
        ids = [f"{o}:{i}" for o, i in zip(obs.get("layer", [""] * len(ids)), ids, strict=True)]
        if len(set(ids)) != len(ids):
            ids = [f"{i}_{k}" for k, i in enumerate(ids)]
    return ids


def _codes(
    obs: Any, labels: list[LayerData], yx: np.ndarray, uns: dict
) -> tuple[np.ndarray | None, dict[int, str]]:
    """Gene codes per row (points' ``genst_code``, else sampled from the codebook labels)
    and code names (labels, points' ``genst_code_name``, else the recorded table)."""
    codes = obs.pop("genst_code").to_numpy() if "genst_code" in obs.columns else None
    code_names: dict[int, str] = {}
    if labels and len(yx):
        off = _code_offset(labels[0])
        code_names = _code_names_from_labels(labels[0], off)
        if codes is None:
            v = _labels_lookup(labels[0], yx)
            codes = np.where(v >= off, v - off, -1)
    if "genst_code_name" in obs.columns:
        cn = obs.pop("genst_code_name")
        for c, name in zip(codes if codes is not None else [], cn, strict=False):
            if int(c) >= 0 and isinstance(name, str):
                code_names.setdefault(int(c), name)
    cn = uns.pop("code_names", None)
    if not code_names and cn is not None:
        code_names = {int(c): str(n) for c, n in zip(cn["code"], cn["name"], strict=True)}
    return codes, code_names


def _slide_extra(slide_layer: LayerData | None, mpp: float, uns: dict) -> dict:
    """``uns['stgen']['slide']``: recorded by a points layer, else the slide layer's file
    and level-0 size."""
    if "slide" in uns:
        return {"slide": uns["slide"]}
    if slide_layer is None:
        return {}
    data, meta, _ = slide_layer
    h, w = _levels(data)[0].shape[:2]
    k = float(_vec2(meta.get("scale"), 1.0)[-1]) / mpp  # level-0 px per layer px
    path = layer_info(_meta(meta)).get("path")
    rec = {"path": str(path or ""), "layer": str(meta.get("name", ""))}
    return {"slide": {**rec, "width": round(w * k), "height": round(h * k)}}


def generated_tiles(layers: Sequence[LayerData]) -> list[GeneratedTile]:
    """The generated tiles among image layers (``metadata['stgen']['tile']`` + pixels)."""
    return [
        GeneratedTile.from_record(rec, image=np.asarray(d))
        for d, m, k in layers
        if k == "image" and (rec := generated_record(_meta(m))) is not None
    ]


def layers_to_anndata(layers: Sequence[LayerData], library_id: str | None = None) -> Any:
    """One AnnData from napari layer data tuples (see the module docstring)."""
    layers = list(layers)
    slide_layer = _find_slide(layers)
    points = [ly for ly in layers if ly[2] == "points"]
    labels = [ly for ly in layers if ly[2] == "labels"]
    mpp, mpp_src = _slide_mpp(slide_layer, points)
    origin = _vec2(slide_layer[1].get("translate"), 0.0) if slide_layer is not None else np.zeros(2)

    rows = _Rows()
    for ly in points:
        _add_points(rows, ly)
    if not rows.blocks and labels:
        _add_label_cells(rows, labels[0])
    yx = np.concatenate(rows.yx) if rows.yx else np.zeros((0, 2))
    obs = pd.concat(rows.obs, ignore_index=True) if rows.obs else pd.DataFrame()
    ids = _unique_ids([i for part in rows.ids for i in part], obs)
    if len(rows.blocks) == 1 and "layer" in obs:
        obs = obs.drop(columns="layer")
    codes, code_names = _codes(obs, labels, yx, rows.uns)

    uns = rows.uns
    extra: dict[str, Any] = {k: uns[k] for k in ("grid", "display", "uncertainty") if k in uns}
    extra["mpp_source"] = mpp_src
    if np.any(origin != 0):
        extra["origin_yx_um"] = origin
    extra.update(_slide_extra(slide_layer, mpp, uns))
    if library_id is None and slide_layer is not None:
        library_id = str(slide_layer[1].get("name") or "") or None
    rec = ExportRecord(
        _matrix(rows),
        rows.genes,
        (yx[:, ::-1] - origin[::-1]) / mpp,
        codes=codes,
        code_names=code_names or None,
        obs_names=ids,
        model=uns.get("model"),
        region_um=uns.get("region_um"),
        mpp=mpp,
        library_id=library_id,
        obs=obs if len(obs.columns) else None,
        rois=shape_rois(layers),
        generated=generated_tiles(layers),
        spot_diameter_um=float(np.median(rows.diam)) if rows.diam else None,
        images=layer_images(slide_layer, mpp) if slide_layer is not None else None,
        obs_kind=str(uns.get("obs_kind", "spots")),
        normalization=str(uns.get("normalization", "log1p_cp10k")),
        extra_uns=extra,
    )
    adata = record_to_anndata(rec)
    if uns.get("model") is not None:  # keep the recorded model provenance verbatim
        adata.uns["stgen"]["model"] = uns["model"]
    return adata


def exportable(layers: Sequence[LayerData]) -> bool:
    """True when the layers hold something the writer records (spots, ROIs, tiles)."""
    return any(
        k in ("points", "shapes", "labels")
        or (k == "image" and generated_record(_meta(m)) is not None)
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
    return write_h5ad(layers_to_anndata(layers), path, overwrite=overwrite)


def write_layers_npe2(path: str, layer_data: list[LayerData]) -> list[str]:
    """npe2 writer (File ▸ Save Layers): napari's save dialog has confirmed overwriting."""
    return [str(write_layers(path, layer_data, overwrite=True))]
