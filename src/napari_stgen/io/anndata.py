"""AnnData export and import: predictions, codebook, ROIs and generated tiles ↔ ``.h5ad``.

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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StgenError
from .validate import RESERVED_OBS, validate_h5ad

SCHEMA = "napari-stgen/1"
NORMALIZATION = "log1p_cp10k"
HIRES_PX = 2000
LOWRES_PX = 600
VISIUM_SPOT_UM = 55.0
MAX_FEATURE_VALUES = 20_000_000  # spots × genes shown as napari point features on import

LayerData = tuple[Any, dict, str]


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
    origin_yx_um + px_um / 2`` and ``metadata['stgen_generated'] = tile.to_metadata()``.
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
        """The record without the pixels (for ``layer.metadata['stgen_generated']``)."""
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
        """From an h5ad record or a layer's ``metadata['stgen_generated']`` (+ its pixels)."""
        rec = _plain(dict(rec))
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
                "metadata": {"stgen_generated": self.to_metadata()},
            },
            "image",
        )


# ----------------------------------------------------------------------------- helpers
def _plain(v: Any) -> Any:
    """h5ad-read values to plain Python / numpy (bytes → str, 0-d arrays → scalars)."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        if v.ndim == 0:
            return _plain(v.item())
        if v.dtype.kind in "OSU":
            return np.asarray([_plain(x) for x in v.ravel()], dtype=object).reshape(v.shape)
        return v
    if isinstance(v, np.generic):
        return v.item()
    return v


def _h5(v: Any) -> Any:
    """Values ready for h5ad ``uns``: Nones dropped, str lists → arrays, tuples → arrays."""
    if isinstance(v, Mapping):
        return {str(k): _h5(x) for k, x in v.items() if x is not None}
    if isinstance(v, (list, tuple)):
        if len(v) and all(isinstance(x, str) for x in v):
            return np.asarray(v, dtype=object)
        if len(v) and all(isinstance(x, Mapping) for x in v):
            return {str(i): _h5(x) for i, x in enumerate(v)}
        if not len(v):
            return np.zeros(0, dtype=np.float64)
        return np.asarray(v)
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, np.ndarray) and v.dtype.kind == "U":
        return v.astype(object)
    return v


def _software_version() -> str:
    from .. import __version__

    return f"napari-stgen {__version__}"


def _as_code_table(code_names: Mapping | Sequence[str] | None) -> dict[int, str]:
    if code_names is None:
        return {}
    if isinstance(code_names, Mapping):
        items = code_names.items()
    else:
        items = enumerate(code_names)
    return {int(k): str(v) for k, v in items if v is not None and str(v).strip()}


def _model_record(model: Any) -> dict:
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
    from scipy.spatial import cKDTree

    sample = xy if len(xy) <= 20000 else xy[:: len(xy) // 20000 + 1]
    d, _ = cKDTree(xy).query(sample, k=2)
    med = float(np.median(d[:, 1]))
    return med / 2.0 if med > 0 else None


def _resize_rgb(img: np.ndarray, w: int, h: int) -> np.ndarray:
    from PIL import Image

    img = np.ascontiguousarray(np.asarray(img)[..., :3], dtype=np.uint8)
    if img.shape[1] == w and img.shape[0] == h:
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BOX))


def _resample(level: np.ndarray, d_yx: tuple[float, float], s: float, w: int, h: int) -> np.ndarray:
    """(h, w) thumbnail whose pixel j is centred on level-0 pixel j / s (scanpy's convention).

    ``level`` is a pyramid level with downsample ``d_yx`` (level-0 px per level px); box
    filter, edges replicated so the half-pixel shift never reads outside.
    """
    from PIL import Image

    a = np.ascontiguousarray(np.asarray(level)[..., :3], dtype=np.uint8)
    dy, dx = d_yx
    if s == 1.0 and dy == 1.0 and dx == 1.0 and a.shape[:2] == (h, w):
        return a
    pad = int(np.ceil(0.5 / (s * min(dx, dy)))) + 1
    a = np.pad(a, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    b = 0.5 - 0.5 / s  # level-0 continuous coordinate of the thumbnail's left/top edge
    box = (b / dx + pad, b / dy + pad, (b + w / s) / dx + pad, (b + h / s) / dy + pad)
    return np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.BOX, box=box))


def thumbnails_from_levels(
    levels: Sequence[Any], max_px: Sequence[int] = (HIRES_PX, LOWRES_PX)
) -> list[tuple[np.ndarray, float]]:
    """(image, scalefactor) per ``max_px`` from a pyramid (level 0 first, (H, W, 3) arrays).

    Reads the coarsest stored level that is at least as large as wanted (never level 0 of a
    pyramid unless it is the only one large enough), then resamples so that thumbnail pixel
    j is centred on level-0 pixel j / scalefactor (the Visium / scanpy convention).
    """
    h0, w0 = int(levels[0].shape[0]), int(levels[0].shape[1])
    out = []
    cache: dict[int, np.ndarray] = {}
    for m in max_px:
        s = min(1.0, float(m) / max(h0, w0))
        w, h = max(1, round(w0 * s)), max(1, round(h0 * s))
        k = 0
        for i, lev in enumerate(levels):
            if lev.shape[0] >= h and lev.shape[1] >= w:
                k = i
        if k not in cache:
            a = levels[k]
            a = a.compute(scheduler="threads") if hasattr(a, "compute") else np.asarray(a)
            if a.ndim == 2:
                a = np.repeat(a[..., None], 3, axis=2)
            cache[k] = a
        lev = cache[k]
        d = (h0 / lev.shape[0], w0 / lev.shape[1])
        out.append((_resample(lev, d, s, w, h), s))
    return out


def _images_from_slide(slide: Any, lenient: bool = False) -> dict:
    """Thumbnails of a slide; ``lenient``: unreadable tiles are white (a run that skipped
    them), otherwise they raise like any other read."""
    if lenient and hasattr(slide, "display_levels"):
        levels = slide.display_levels()
    else:
        levels = list(getattr(slide, "levels", []) or [])
    if levels:
        (hi, sh), (lo, sl) = thumbnails_from_levels(levels)
    else:  # a slide-like object with thumbnail() only
        w0, h0 = float(slide.width), float(slide.height)
        hi = np.asarray(slide.thumbnail(max_px=HIRES_PX))[..., :3]
        sh = hi.shape[1] / w0
        lo_w, lo_h = max(1, round(w0 * sh * LOWRES_PX / max(hi.shape[:2]))), 0
        sl = lo_w / w0
        lo_h = max(1, round(h0 * sl))
        lo = _resize_rgb(hi, lo_w, lo_h)
    return {"hires": hi, "lowres": lo, "tissue_hires_scalef": sh, "tissue_lowres_scalef": sl}


def _rois_record(rois: Sequence[Roi | Mapping]) -> dict:
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
    rec = _plain(dict(rec))
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


# ----------------------------------------------------------------------------- export
def predictions_to_anndata(
    expr: np.ndarray,
    genes: Sequence[str],
    xy_px: np.ndarray,
    *,
    slide: Any = None,
    codes: np.ndarray | None = None,
    code_names: Mapping[int, str] | Sequence[str] | None = None,
    obs_names: Sequence[str] | None = None,
    model: Any = None,
    region_um: Sequence[float] | None = None,
    extra_uns: Mapping[str, Any] | None = None,
    mpp: float | None = None,
    library_id: str | None = None,
    obs: Any = None,
    rois: Sequence[Roi | Mapping] | None = None,
    generated: Sequence[GeneratedTile | Mapping] | None = None,
    spot_diameter_um: float | None = None,
    images: Mapping[str, Any] | None = None,
    obs_kind: str = "spots",
    grid: Mapping[str, Any] | None = None,
    normalization: str = NORMALIZATION,
    uncertainty: np.ndarray | None = None,
    uncertainty_info: Mapping[str, Any] | None = None,
) -> Any:
    """An AnnData of predictions (or measurements) at level-0 pixel positions.

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
    import anndata as ad
    import pandas as pd

    x = np.asarray(expr, dtype=np.float32)
    if x.ndim != 2:
        raise StgenError(f"expression must be 2-D (spots × genes), got shape {x.shape}")
    genes = [str(g) for g in genes]
    if len(genes) != x.shape[1]:
        raise StgenError(f"{x.shape[1]} expression columns but {len(genes)} gene names")
    if len(set(genes)) != len(genes):
        dup = sorted({g for g in genes if genes.count(g) > 1})[:5]
        raise StgenError(f"duplicate gene names in the panel: {dup}")
    xy = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
    n = x.shape[0]
    if len(xy) != n:
        raise StgenError(f"{n} expression rows but {len(xy)} positions")
    if obs_names is None:
        names = pd.Index(
            [f"{obs_kind[:-1] if obs_kind.endswith('s') else obs_kind}_{i}" for i in range(n)]
        )
    else:
        names = pd.Index([str(s) for s in obs_names])
        if len(names) != n:
            raise StgenError(f"{n} rows but {len(names)} obs names")
        if not names.is_unique:
            raise StgenError(f"duplicate spot ids, e.g. {names[names.duplicated()][0]!r}")

    obs_df = pd.DataFrame(index=names)
    if obs is not None:
        extra = pd.DataFrame(obs).reset_index(drop=True)
        if len(extra) != n:
            raise StgenError(f"obs table has {len(extra)} rows, expected {n}")
        for c in extra.columns:
            col = str(c)
            if col in genes:
                col = f"{col}_obs"
            elif col in RESERVED_OBS:  # AnnData's own name: writing it fails inside h5py
                col = f"{col}_csv"
            obs_df[col] = extra[c].to_numpy()

    stgen: dict[str, Any] = {
        "schema": SCHEMA,
        "software_version": _software_version(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "normalization": normalization,
        "obs_kind": obs_kind,
    }

    if uncertainty is not None:
        u = np.asarray(uncertainty, dtype=np.float32).ravel()
        if len(u) != n:
            raise StgenError(f"{n} rows but {len(u)} uncertainties")
        obs_df["uncertainty"] = u
        if uncertainty_info:
            stgen["uncertainty"] = dict(uncertainty_info)
    table = _as_code_table(code_names)
    if codes is not None:
        c = np.asarray(codes).astype(np.int64).ravel()
        if len(c) != n:
            raise StgenError(f"{n} rows but {len(c)} codes")
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

    if mpp is None and slide is not None:
        mpp = getattr(slide, "mpp", None)
    if mpp is not None:
        stgen["mpp"] = float(mpp)
        if slide is None or mpp != slide.mpp:
            stgen["mpp_source"] = "argument"
        else:
            stgen["mpp_source"] = str(getattr(slide, "mpp_source", None) or "slide")
    if slide is not None:
        stgen["slide"] = {
            "path": str(Path(getattr(slide, "path", "")).resolve())
            if getattr(slide, "path", None)
            else "",
            "format": str(getattr(slide, "format", "")),
            "width": int(slide.width),
            "height": int(slide.height),
        }
    if region_um is not None:
        stgen["region_um"] = np.asarray(region_um, dtype=np.float64).ravel()
    if model is not None:
        stgen["model"] = _model_record(model)
    if grid is not None:
        stgen["grid"] = dict(grid)
    if rois:
        stgen["rois"] = _rois_record(rois)
    if generated:
        recs = {}
        for g in generated:
            t = g if isinstance(g, GeneratedTile) else GeneratedTile.from_record(g)
            key = str(t.id).replace("/", "_") or "tile"
            while key in recs:
                key += "_"
            recs[key] = t.to_record()
        stgen["generated"] = recs
    if extra_uns:
        stgen.update(dict(extra_uns))

    if library_id is None:
        p = getattr(slide, "path", None)
        library_id = Path(p).stem if p else "stgen"
    library_id = str(library_id).replace("/", "_") or "stgen"  # an HDF5 group name
    stgen["library_id"] = library_id

    if spot_diameter_um is not None and mpp:
        diam_px = float(spot_diameter_um) / float(mpp)
    else:
        diam_px = _nn_diameter_px(xy) or (100.0 / float(mpp) if mpp else 50.0)
    if images is None and slide is not None:
        images = _images_from_slide(slide, lenient="n_unreadable" in (extra_uns or {}))
    lib: dict[str, Any] = {
        "images": {},
        "scalefactors": {
            "tissue_hires_scalef": 1.0,
            "tissue_lowres_scalef": 1.0,
            "spot_diameter_fullres": float(diam_px),
        },
        "metadata": {"source": "napari-stgen", "software_version": stgen["software_version"]},
    }
    if images is not None:
        for key in ("hires", "lowres"):
            if images.get(key) is not None:
                lib["images"][key] = np.ascontiguousarray(images[key])[..., :3].astype(np.uint8)
                lib["scalefactors"][f"tissue_{key}_scalef"] = float(images[f"tissue_{key}_scalef"])

    adata = ad.AnnData(X=x, obs=obs_df, var=pd.DataFrame(index=pd.Index(genes)))
    adata.obsm["spatial"] = xy
    adata.uns["spatial"] = {library_id: lib}
    adata.uns["stgen"] = _h5(stgen)
    return adata


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
        raise StgenError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
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
    lib = _plain(dict(adata.uns.get("stgen", {}) or {})).get("library_id")
    if lib not in sp:
        lib = next(iter(sp))
    return str(lib), dict(sp[lib])


def h5ad_mpp(adata: Any) -> tuple[float, str]:
    """(µm per level-0 px, source): ``uns['stgen']['mpp']``, else Visium scalefactors.

    Falls back to ``scalefactors['microns_per_pixel']`` (if present), then to the Visium
    spot diameter (55 µm / ``spot_diameter_fullres``), then to 1.0 ("pixels").
    """
    st = _plain(dict(adata.uns.get("stgen", {}) or {}))
    if st.get("mpp"):
        return float(st["mpp"]), "uns['stgen']['mpp']"
    _, lib = spatial_library(adata)
    sf = _plain(dict(lib.get("scalefactors", {}) or {}))
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


def robust_limits(values: np.ndarray) -> tuple[float, float]:
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
    (image with ``metadata['stgen_generated']``).
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
    layers, ``source`` (a path) goes into messages and ``metadata['h5ad_path']``."""
    return _layers(Path(source), adata, include_image, base)


def _layers(
    path: Path, adata: Any, include_image: bool, base: str | None = None
) -> list[LayerData]:
    import pandas as pd

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
    st = _plain(dict(adata.uns.get("stgen", {}) or {}))
    lib_id, lib = spatial_library(adata)
    sf = _plain(dict(lib.get("scalefactors", {}) or {}))
    base = base or path.stem
    origin = _finite(path, "origin_yx_um", st.get("origin_yx_um", (0.0, 0.0))).ravel()[:2]
    if origin.shape != (2,):
        raise StgenError(f"{path}: origin_yx_um must hold two numbers")
    common = {"h5ad_path": str(path), "mpp": mpp, "mpp_source": mpp_src, "library_id": lib_id}
    layers: list[LayerData] = []

    images = lib.get("images", {}) or {}
    if include_image and ("hires" in images or "lowres" in images):
        key = "hires" if "hires" in images else "lowres"
        f = _finite(path, f"tissue_{key}_scalef", sf.get(f"tissue_{key}_scalef", 1.0) or 1.0, True)
        s = mpp / float(f)
        img = np.asarray(images[key])
        if img.ndim != 3 or img.shape[2] not in (3, 4) or img.dtype.kind not in "uf":
            raise StgenError(f"{path}: uns spatial image {key!r} is not an RGB image ({img.shape})")
        layers.append(
            (
                img,
                {
                    "name": f"{base} {key}",
                    "rgb": True,
                    "scale": (s, s),
                    "translate": tuple(origin),
                    "units": "um",
                    "metadata": {"stgen_kind": "thumbnail", **common},
                },
                "image",
            )
        )

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
        "metadata": {
            "stgen_kind": "spots",
            "stgen_genes": genes,
            "stgen_genes_subset": len(genes) < adata.n_vars,
            "stgen": st,
            **common,
        },
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
            else robust_limits(xmat[:, genes.index(show)])
        )

    grid = st.get("grid")
    if grid and "genst_code" in adata.obs and {"grid_row", "grid_col"} <= set(adata.obs):
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
        t = float(grid["tile_um"])
        o = np.asarray(grid["origin_yx_um"], dtype=np.float64).ravel()
        layers.append(
            (
                lab,
                {
                    "name": f"{base} codebook",
                    "scale": (t, t),
                    "translate": (o[0] + t / 2, o[1] + t / 2),
                    "units": "um",
                    "opacity": 0.5,
                    "visible": False,
                    "metadata": {"stgen_kind": "codebook", "stgen_code_offset": 1, **common},
                },
                "labels",
            )
        )

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
                    "metadata": {"stgen_kind": "rois", **common},
                },
                "shapes",
            )
        )
    for rec in (st.get("generated") or {}).values():
        layers.append(GeneratedTile.from_record(rec).layer_data())
    return layers


def read_generated_tiles(path: str | os.PathLike) -> list[GeneratedTile]:
    """The generated-tile records of an h5ad (``uns['stgen']['generated']``)."""
    st = _plain(dict(_read(Path(path)).uns.get("stgen", {}) or {}))
    return [GeneratedTile.from_record(r) for r in (st.get("generated") or {}).values()]
