"""AnnData export: one :class:`ExportRecord` (predictions + provenance) → AnnData → ``.h5ad``.

Layout (the contract in ARCHITECTURE.md, the scanpy/squidpy Visium convention):

- ``obs`` index: spot barcode or tile id; ``X``: predicted expression, float32, the model's
  normalization (``uns['stgen']['normalization']``, ``"log1p_cp10k"``); ``var_names``: panel.
- ``obsm['spatial']``: level-0 pixel coordinates (x, y) of the spot / tile centres.
- ``uns['spatial'][library_id]``: ``images`` {``hires``, ``lowres``} RGB thumbnails of the
  slide and ``scalefactors`` {``tissue_hires_scalef``, ``tissue_lowres_scalef``,
  ``spot_diameter_fullres``}, so ``sc.pl.spatial(adata, color=GENE)`` plots aligned.
- ``obs['genst_code']`` (int) and ``obs['genst_code_name']`` (categorical) when known.
- ``obs['uncertainty']`` (float, larger = less sure) when the model gives one, described in
  ``uns['stgen']['uncertainty']`` (definition and held-out calibration).
- ``uns['stgen']``: provenance and records, schema ``napari-stgen/1``::

    schema, software_version, created_utc, normalization, obs_kind ('spots' | 'tiles'),
    library_id, mpp, mpp_source, slide {path, format, width, height},
    region_um [x0, y0, x1, y1], model {name, checksum, mpp, patch_px, patch_um, n_codes,
    card_json, card (scalar items of the card)}, grid {origin_yx_um, tile_um, shape},
    code_names {code: int[K], name: str[K]},
    rois {name: str[R], shape_type: str[R], layer: str[R], n_vertices: int[R],
          vertices_yx_um: float[sum n_vertices, 2]}   # napari (row, col) order, µm
    generated {<tile id>: GeneratedTile record (see ``GeneratedTile``)}

Writes are atomic (temp file in the target's directory, then ``os.replace``).
No napari, no torch here.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from napari_stgen import __version__
from napari_stgen.errors import StgenError
from napari_stgen.io.records import GeneratedTile, Roi, h5_value, rois_record
from napari_stgen.io.thumbnails import images_from_slide
from napari_stgen.io.validate import RESERVED_OBS

SCHEMA = "napari-stgen/1"
NORMALIZATION = "log1p_cp10k"

__all__ = [
    "SCHEMA",
    "NORMALIZATION",
    "ExportRecord",
    "record_to_anndata",
    "predictions_to_anndata",
    "append_rows",
    "model_record",
    "write_h5ad",
]


@dataclass
class ExportRecord:
    """What one export holds: predictions (or measurements) at level-0 pixel positions.

    ``expr`` (N, G) in ``normalization`` units, ``genes`` the panel, ``xy_px`` (N, 2) level-0
    (x, y). ``slide`` (a ``Slide``) gives µm/px, provenance and the hires/lowres thumbnails;
    ``images`` = {hires, lowres, tissue_hires_scalef, tissue_lowres_scalef} supplies them
    otherwise. ``mpp`` overrides the slide's. ``codes`` are GenST gene-code indices and
    ``code_names`` names per code (mapping or list by index). ``model`` is a GenST predictor
    (or a mapping of name, checksum, mpp, patch_px, patch_um, n_codes, card). ``obs`` adds
    columns (a DataFrame aligned with the rows). ``rois`` / ``generated`` are recorded in
    ``uns['stgen']``, ``extra_uns`` is merged into it. ``spot_diameter_um`` defaults to half
    the median nearest-neighbour distance of the positions. ``uncertainty`` (N,) goes to
    ``obs['uncertainty']``, ``uncertainty_info`` (what it is) to ``uns['stgen']``.
    """

    expr: np.ndarray
    genes: Sequence[str]
    xy_px: np.ndarray
    slide: Any = None
    codes: np.ndarray | None = None
    code_names: Mapping[int, str] | Sequence[str] | None = None
    obs_names: Sequence[str] | None = None
    model: Any = None
    region_um: Sequence[float] | None = None
    extra_uns: Mapping[str, Any] | None = None
    mpp: float | None = None
    library_id: str | None = None
    obs: Any = None
    rois: Sequence[Roi | Mapping] | None = None
    generated: Sequence[GeneratedTile | Mapping] | None = None
    spot_diameter_um: float | None = None
    images: Mapping[str, Any] | None = None
    obs_kind: str = "spots"
    grid: Mapping[str, Any] | None = None
    normalization: str = NORMALIZATION
    uncertainty: np.ndarray | None = None
    uncertainty_info: Mapping[str, Any] | None = None


_FIELDS = {f.name for f in fields(ExportRecord)}


def predictions_to_anndata(
    expr: np.ndarray, genes: Sequence[str], xy_px: np.ndarray, **options: Any
) -> Any:
    """An AnnData of ``expr`` (N, G) at level-0 ``xy_px``; ``options`` are the other fields
    of :class:`ExportRecord` (see there)."""
    unknown = sorted(set(options) - _FIELDS)
    if unknown:
        raise TypeError(f"predictions_to_anndata: unknown option(s) {unknown}")
    return record_to_anndata(ExportRecord(expr, genes, xy_px, **options))


# ----------------------------------------------------------------------------- helpers
def _as_code_table(code_names: Mapping | Sequence[str] | None) -> dict[int, str]:
    if code_names is None:
        return {}
    if isinstance(code_names, Mapping):
        items = code_names.items()
    else:
        items = enumerate(code_names)
    return {int(k): str(v) for k, v in items if v is not None and str(v).strip()}


def model_record(model: Any) -> dict:
    """Provenance of a GenST predictor object (or a mapping with the same fields)."""
    get = model.get if isinstance(model, Mapping) else (lambda k, d=None: getattr(model, k, d))
    card = get("card") or {}
    card = dict(card) if isinstance(card, Mapping) else {}
    rec = {
        "name": get("name"),
        "checksum": get("checksum"),
        "mpp": get("mpp"),
        "patch_px": get("patch_px"),
        "patch_um": get("patch_um"),
        "n_codes": get("n_codes"),
        "card_json": json.dumps(card, default=str, sort_keys=True) if card else None,
        "card": {k: v for k, v in card.items() if isinstance(v, (str, int, float, bool))} or None,
    }
    return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in rec.items()}


def _nn_diameter_px(xy: np.ndarray) -> float | None:
    """Half the median nearest-neighbour distance (ST/Visium spot diameter ≈ pitch / 2)."""
    if len(xy) < 2:
        return None
    sample = xy if len(xy) <= 20000 else xy[:: len(xy) // 20000 + 1]
    d, _ = cKDTree(xy).query(sample, k=2)
    med = float(np.median(d[:, 1]))
    return med / 2.0 if med > 0 else None


def _checked_arrays(rec: ExportRecord) -> tuple[np.ndarray, list[str], np.ndarray]:
    x = np.asarray(rec.expr, dtype=np.float32)
    if x.ndim != 2:
        raise StgenError(f"expression must be 2-D (spots × genes), got shape {x.shape}")
    genes = [str(g) for g in rec.genes]
    if len(genes) != x.shape[1]:
        raise StgenError(f"{x.shape[1]} expression columns but {len(genes)} gene names")
    if len(set(genes)) != len(genes):
        dup = sorted({g for g in genes if genes.count(g) > 1})[:5]
        raise StgenError(f"duplicate gene names in the panel: {dup}")
    xy = np.asarray(rec.xy_px, dtype=np.float64).reshape(-1, 2)
    if len(xy) != x.shape[0]:
        raise StgenError(f"{x.shape[0]} expression rows but {len(xy)} positions")
    return x, genes, xy


def _obs_frame(rec: ExportRecord, n: int, genes: list[str]) -> Any:
    """obs: the row names and the extra columns (renamed off gene and AnnData names)."""
    kind = rec.obs_kind
    if rec.obs_names is None:
        names = pd.Index([f"{kind[:-1] if kind.endswith('s') else kind}_{i}" for i in range(n)])
    else:
        names = pd.Index([str(s) for s in rec.obs_names])
        if len(names) != n:
            raise StgenError(f"{n} rows but {len(names)} obs names")
        if not names.is_unique:
            raise StgenError(f"duplicate spot ids, e.g. {names[names.duplicated()][0]!r}")
    obs_df = pd.DataFrame(index=names)
    if rec.obs is not None:
        extra = pd.DataFrame(rec.obs).reset_index(drop=True)
        if len(extra) != n:
            raise StgenError(f"obs table has {len(extra)} rows, expected {n}")
        for c in extra.columns:
            col = str(c)
            if col in genes:
                col = f"{col}_obs"
            elif col in RESERVED_OBS:  # AnnData's own name: writing it fails inside h5py
                col = f"{col}_csv"
            obs_df[col] = extra[c].to_numpy()
    return obs_df


def _add_uncertainty(rec: ExportRecord, obs_df: Any, stgen: dict) -> None:
    if rec.uncertainty is None:
        return
    u = np.asarray(rec.uncertainty, dtype=np.float32).ravel()
    if len(u) != len(obs_df):
        raise StgenError(f"{len(obs_df)} rows but {len(u)} uncertainties")
    obs_df["uncertainty"] = u
    if rec.uncertainty_info:
        stgen["uncertainty"] = dict(rec.uncertainty_info)


def _add_codes(rec: ExportRecord, obs_df: Any, stgen: dict) -> None:
    table = _as_code_table(rec.code_names)
    if rec.codes is not None:
        c = np.asarray(rec.codes).astype(np.int64).ravel()
        if len(c) != len(obs_df):
            raise StgenError(f"{len(obs_df)} rows but {len(c)} codes")
        obs_df["genst_code"] = c
        if table:
            uniq, inv = np.unique(c, return_inverse=True)
            cats = [table.get(int(k), f"code {int(k)}") if k >= 0 else "no code" for k in uniq]
            dedup = list(dict.fromkeys(cats))  # two codes may share a name
            pos = np.array([dedup.index(name) for name in cats], dtype=np.int64)
            obs_df["genst_code_name"] = pd.Categorical.from_codes(pos[inv], categories=dedup)
    if table:
        ks = sorted(table)
        stgen["code_names"] = {
            "code": np.asarray(ks, dtype=np.int64),
            "name": np.asarray([table[k] for k in ks], dtype=object),
        }


def _slide_provenance(rec: ExportRecord, stgen: dict) -> float | None:
    """µm/px (and where it came from) and the slide record; returns the µm/px."""
    slide, mpp = rec.slide, rec.mpp
    if mpp is None and slide is not None:
        mpp = getattr(slide, "mpp", None)
    if mpp is not None:
        stgen["mpp"] = float(mpp)
        if slide is None or mpp != slide.mpp:
            stgen["mpp_source"] = "argument"
        else:
            stgen["mpp_source"] = str(getattr(slide, "mpp_source", None) or "slide")
    if slide is not None:
        path = getattr(slide, "path", None)
        stgen["slide"] = {
            "path": str(Path(path).resolve()) if path else "",
            "format": str(getattr(slide, "format", "")),
            "width": int(slide.width),
            "height": int(slide.height),
        }
    return mpp


def _generated_records(generated: Sequence[GeneratedTile | Mapping]) -> dict:
    recs: dict[str, Any] = {}
    for g in generated:
        t = g if isinstance(g, GeneratedTile) else GeneratedTile.from_record(g)
        key = str(t.id).replace("/", "_") or "tile"
        while key in recs:
            key += "_"
        recs[key] = t.to_record()
    return recs


def _stgen_uns(rec: ExportRecord) -> dict:
    """``uns['stgen']`` of ``rec`` but the per-row parts (codes, uncertainty, µm/px)."""
    stgen: dict[str, Any] = {
        "schema": SCHEMA,
        "software_version": f"napari-stgen {__version__}",
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "normalization": rec.normalization,
        "obs_kind": rec.obs_kind,
    }
    if rec.region_um is not None:
        stgen["region_um"] = np.asarray(rec.region_um, dtype=np.float64).ravel()
    if rec.model is not None:
        stgen["model"] = model_record(rec.model)
    if rec.grid is not None:
        stgen["grid"] = dict(rec.grid)
    if rec.rois:
        stgen["rois"] = rois_record(rec.rois)
    if rec.generated:
        stgen["generated"] = _generated_records(rec.generated)
    return stgen


def _library_id(rec: ExportRecord) -> str:
    library_id = rec.library_id
    if library_id is None:
        p = getattr(rec.slide, "path", None)
        library_id = Path(p).stem if p else "stgen"
    return str(library_id).replace("/", "_") or "stgen"  # an HDF5 group name


def _spatial_library(rec: ExportRecord, xy: np.ndarray, mpp: float | None, version: str) -> dict:
    """``uns['spatial'][library_id]``: thumbnails and scalefactors."""
    if rec.spot_diameter_um is not None and mpp:
        diam_px = float(rec.spot_diameter_um) / float(mpp)
    else:
        diam_px = _nn_diameter_px(xy) or (100.0 / float(mpp) if mpp else 50.0)
    images = rec.images
    if images is None and rec.slide is not None:
        images = images_from_slide(rec.slide, lenient="n_unreadable" in (rec.extra_uns or {}))
    lib: dict[str, Any] = {
        "images": {},
        "scalefactors": {
            "tissue_hires_scalef": 1.0,
            "tissue_lowres_scalef": 1.0,
            "spot_diameter_fullres": float(diam_px),
        },
        "metadata": {"source": "napari-stgen", "software_version": version},
    }
    for key in ("hires", "lowres"):
        if images is not None and images.get(key) is not None:
            lib["images"][key] = np.ascontiguousarray(images[key])[..., :3].astype(np.uint8)
            lib["scalefactors"][f"tissue_{key}_scalef"] = float(images[f"tissue_{key}_scalef"])
    return lib


# ----------------------------------------------------------------------------- export
def record_to_anndata(rec: ExportRecord) -> Any:
    """The AnnData of one :class:`ExportRecord` (the layout in the module docstring)."""
    import anndata as ad

    x, genes, xy = _checked_arrays(rec)
    obs_df = _obs_frame(rec, x.shape[0], genes)
    stgen = _stgen_uns(rec)
    _add_uncertainty(rec, obs_df, stgen)
    _add_codes(rec, obs_df, stgen)
    mpp = _slide_provenance(rec, stgen)
    stgen = _ordered(stgen)
    if rec.extra_uns:
        stgen.update(dict(rec.extra_uns))
    library_id = _library_id(rec)
    stgen["library_id"] = library_id
    lib = _spatial_library(rec, xy, mpp, stgen["software_version"])

    adata = ad.AnnData(X=x, obs=obs_df, var=pd.DataFrame(index=pd.Index(genes)))
    adata.obsm["spatial"] = xy
    adata.uns["spatial"] = {library_id: lib}
    adata.uns["stgen"] = h5_value(stgen)
    return adata


_ORDER = ("schema", "software_version", "created_utc", "normalization", "obs_kind",
          "uncertainty", "code_names", "mpp", "mpp_source", "slide", "region_um", "model",
          "grid", "rois", "generated")  # fmt: skip


def _ordered(stgen: dict) -> dict:
    """``uns['stgen']`` keys in the order of the schema (as files always had them)."""
    return {k: stgen[k] for k in _ORDER if k in stgen}


def _frame(adata: Any) -> tuple[float, np.ndarray]:
    """µm/px and world (x, y) µm origin of ``obsm['spatial']`` (from ``uns['stgen']``)."""
    st = adata.uns.get("stgen", {}) or {}
    origin = np.asarray(st.get("origin_yx_um", (0.0, 0.0)), dtype=np.float64).ravel()[:2]
    return float(st.get("mpp") or 1.0), origin[::-1]


def append_rows(adata: Any, other: Any, names: tuple[str, str]) -> Any:
    """``adata`` with the rows of ``other`` after its own (one export of two parts).

    ``other``'s positions move into ``adata``'s level-0 px (each side's ``uns['stgen']`` µm/px
    and origin); genes (``adata``'s order first) and obs columns are joined, NaN where a part
    lacks one (gene code -1); ``obs['layer']`` names each row's part (``names``, unless
    ``other`` records its own); ``adata``'s ``uns`` is kept.
    """
    import anndata as ad

    a, b = adata.copy(), other.copy()
    a.obs["layer"] = names[0]
    if "layer" not in b.obs:
        b.obs["layer"] = names[1]
    (mpp_a, origin_a), (mpp_b, origin_b) = _frame(a), _frame(b)
    xy = np.asarray(b.obsm["spatial"], dtype=np.float64)[:, :2]
    b.obsm["spatial"] = (xy * mpp_b + origin_b - origin_a) / mpp_a
    if len({*a.obs_names, *b.obs_names}) < a.n_obs + b.n_obs:  # e.g. the same barcodes
        for part in (a, b):
            part.obs_names = part.obs["layer"].astype(str).to_numpy() + ":" + part.obs_names
    out = ad.concat([a, b], join="outer", merge=None, uns_merge=None)
    if not out.obs_names.is_unique:
        out.obs_names_make_unique()
    have = set(a.var_names)
    genes = list(a.var_names) + [g for g in b.var_names if g not in have]
    out = out[:, genes].copy()
    if "genst_code" in out.obs:
        out.obs["genst_code"] = out.obs["genst_code"].fillna(-1).astype(np.int64)
    out.uns = dict(adata.uns)
    return out


# ----------------------------------------------------------------------------- write
def write_h5ad(adata: Any, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``adata`` to ``path`` atomically (temp file in the same directory + rename).

    Refuses to replace an existing file unless ``overwrite``; on any failure the previous
    file (if any) is left untouched and the temp file removed. Returns the path.
    """
    path = Path(path)
    if path.suffix.lower() != ".h5ad":
        raise StgenError(f"{path}: output must end in .h5ad")
    if path.is_dir():
        raise StgenError(f"{path}: is a directory")
    if path.exists() and not overwrite:
        raise StgenError(f"{path} already exists; pass overwrite=True to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=parent)
    except OSError as e:
        raise StgenError(f"{path}: cannot write here ({e.strerror or e})") from e
    os.close(fd)
    try:
        adata.write_h5ad(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes the file private (0600): give it the mode of the file it replaces
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
