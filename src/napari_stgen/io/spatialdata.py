"""SpatialData (``.zarr``) export and import: the scverse layout of a napari-stgen export.

One coordinate system, ``global``, in micrometres. SpatialData's raster convention puts pixel
*corners* on integer coordinates, so a level-0 pixel ``i`` of the slide spans
``[i·mpp, (i+1)·mpp)`` µm; napari-stgen's world (and ``obsm['spatial']``) puts pixel *centres*
on ``i`` — every SpatialData coordinate is the napari-stgen world µm plus ``mpp / 2``.

Elements (``<lib>`` is the export's library id, e.g. the slide's stem):

- ``<lib>_image``: the slide as a multiscale RGB image — a *downsampled copy* (the finest
  pyramid level at most ``IMAGE_MAX_PX`` on its long side, then ×2 levels), scaled so that its
  extent is the slide's extent in µm; ``uns['stgen']['spatialdata']['image']`` says which level
  it came from and the slide path keeps the full resolution;
- ``<lib>_spots`` (circles, the spot diameter) or ``<lib>_tiles`` (squares of the tile size):
  one shape per row of the table, centred on the predicted position;
- ``table``: the AnnData of :func:`napari_stgen.io.anndata.predictions_to_anndata` (genes ×
  spots/tiles, codes, confidence, model record in ``uns['stgen']``) annotating the shapes
  (``obs['region']``, ``obs['instance_id']``); its ``uns['spatial']`` keeps the scalefactors
  but not the thumbnails (the image element replaces them);
- ``generated_<id>``: each generated tile as an RGB image at its µm position (its record,
  without pixels, stays in ``uns['stgen']['generated']``);
- ``rois``: ROIs as polygons (exact vertices also in ``uns['stgen']['rois']``).

Writes are atomic: a temp folder beside the target, renamed into place; an existing output is
refused unless ``overwrite``. spatialdata is imported lazily (the ``spatialdata`` extra).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from napari_stgen.errors import StgenError
from napari_stgen.io.anndata import VISIUM_SPOT_UM, anndata_layers
from napari_stgen.io.layer_meta import layer_kind, stgen_metadata
from napari_stgen.io.napari_writer import (
    _find_slide,
    _levels,
    _meta,
    exportable,
    layers_to_anndata,
)
from napari_stgen.io.records import GeneratedTile, LayerData, rois_from_record
from napari_stgen.io.records import plain as _plain

CS = "global"
UNIT = "micrometer"
IMAGE_MAX_PX = 4096  # long side of the finest image level written
TABLE = "table"
SD_IMAGE = "spatialdata_image"  # metadata['stgen']['kind'] of image layers read from a SpatialData


def require_spatialdata() -> Any:
    """The spatialdata module (StgenError naming the extra when it is not installed)."""
    try:
        import spatialdata
    except ImportError as e:
        raise StgenError(
            "SpatialData export/import needs spatialdata: pip install '.[spatialdata]' in the "
            "napari-stgen checkout"
        ) from e
    return spatialdata


def is_spatialdata_path(path: str | os.PathLike) -> bool:
    """True for a folder that is a SpatialData zarr (a root group with images/shapes/tables)."""
    p = Path(path)
    if not p.is_dir():
        return False
    has_root = (p / "zarr.json").is_file() or (p / ".zgroup").is_file()
    kinds = ("images", "shapes", "tables", "labels", "points")
    return has_root and any((p / k).is_dir() for k in kinds)


# ----------------------------------------------------------------------------- export
def _image_levels(levels: Sequence[Any], max_px: int) -> tuple[Any, int]:
    """The finest level with its long side ≤ ``max_px`` (else the coarsest) and its index."""
    k = len(levels) - 1
    for i, lev in enumerate(levels):
        if max(lev.shape[0], lev.shape[1]) <= max_px:
            k = i
            break
    return levels[k], k


def _scale_factors(h: int, w: int, min_px: int = 256) -> list[int]:
    out = []
    while max(h, w) // 2 >= min_px and len(out) < 8:
        out.append(2)
        h, w = h // 2, w // 2
    return out


def _image_element(arr: Any, sy: float, sx: float, tyx: tuple[float, float] = (0.0, 0.0)) -> Any:
    """An RGB (H, W, 3) array as an Image2DModel in ``global`` µm (scale, then translate)."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, Translation
    from spatialdata.transformations import Sequence as Seq

    a = arr if isinstance(arr, da.Array) else da.from_array(np.asarray(arr))
    if a.ndim == 2:
        a = da.stack([a] * 3, axis=-1)
    a = a[..., :3].transpose(2, 0, 1)
    a = a.rechunk((3, 1024, 1024))
    tr: Any = Scale([sy, sx], axes=("y", "x"))
    if tyx != (0.0, 0.0):
        tr = Seq([tr, Translation([tyx[0], tyx[1]], axes=("y", "x"))])
    sf = _scale_factors(int(a.shape[1]), int(a.shape[2]))
    return Image2DModel.parse(
        a,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],  # napari-spatialdata shows r, g, b channels as one RGB image
        transformations={CS: tr},
        scale_factors=sf or None,
    )


def _slide_image(adata: Any, levels: Sequence[Any] | None, mpp: float, max_px: int) -> tuple:
    """(image element, record) for the slide, from its pyramid or the h5ad thumbnail."""
    st = _plain(dict(adata.uns.get("stgen", {})))
    sl = st.get("slide") or {}
    size = (int(sl["height"]), int(sl["width"])) if sl.get("width") and sl.get("height") else None
    if levels:  # level 0 first (the slide's, or a downsampled image read back)
        arr, k = _image_levels(levels, max_px)
        rec = {"source": f"slide pyramid level {k}", "level": k}
        h0, w0 = size or (int(levels[0].shape[0]), int(levels[0].shape[1]))
    else:
        lib = next(iter((adata.uns.get("spatial") or {}).values()), {})
        imgs, sf = lib.get("images") or {}, lib.get("scalefactors") or {}
        if "hires" not in imgs:
            return None, None
        arr = np.asarray(imgs["hires"])
        s = float(sf.get("tissue_hires_scalef", 1.0))
        h0, w0 = size or (round(arr.shape[0] / s), round(arr.shape[1] / s))
        rec = {"source": "h5ad hires thumbnail", "level": -1}
    h, w = int(arr.shape[0]), int(arr.shape[1])
    rec.update({"downsample_yx": [h0 / h, w0 / w], "slide_path": str(sl.get("path", ""))})
    rec["extent_um"] = [0.0, 0.0, w0 * mpp, h0 * mpp]  # x0, y0, x1, y1
    return _image_element(arr, h0 * mpp / h, w0 * mpp / w), rec


def _shapes_element(adata: Any, mpp: float, kind: str) -> Any:
    """Circles (spots) or squares (tiles) centred on the rows' positions, SpatialData µm."""
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    xy = (np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2] + 0.5) * mpp
    lib = next(iter((adata.uns.get("spatial") or {}).values()), {})
    diam_px = float((lib.get("scalefactors") or {}).get("spot_diameter_fullres", 0) or 0)
    st = adata.uns.get("stgen", {})
    grid = st.get("grid") if kind == "tiles" else None
    if grid is not None:
        half = float(_plain(grid["tile_um"])) / 2
        geom = shapely.box(xy[:, 0] - half, xy[:, 1] - half, xy[:, 0] + half, xy[:, 1] + half)
        gdf = gpd.GeoDataFrame(geometry=geom)
    else:
        gdf = gpd.GeoDataFrame(
            {"radius": np.full(len(xy), diam_px * mpp / 2 or 1.0)},
            geometry=shapely.points(xy),
        )
    return ShapesModel.parse(gdf, transformations={CS: Identity()})


def _rois_element(rec: Any, mpp: float) -> Any:
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    polys, names = [], []
    for r in rois_from_record(rec):
        v = np.asarray(r.vertices_yx_um, dtype=np.float64)[:, ::-1] + mpp / 2
        if r.shape_type in ("line", "path") or len(v) < 3:
            continue  # not an area: kept in uns['stgen']['rois'] only
        if r.shape_type == "ellipse":  # napari gives the 4 corners of the bounding box
            c, (rx, ry) = v.mean(0), (np.ptp(v, 0) / 2)
            t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
            v = np.c_[c[0] + rx * np.cos(t), c[1] + ry * np.sin(t)]
        polys.append(shapely.make_valid(shapely.Polygon(v)))
        names.append(r.name)
    if not polys:
        return None
    gdf = gpd.GeoDataFrame({"name": names}, geometry=polys)
    return ShapesModel.parse(gdf, transformations={CS: Identity()})


def _shallow_table(adata: Any) -> Any:
    """A new AnnData sharing ``X`` (no 100 MB copy) with its own obs/uns; the thumbnails in
    ``uns['spatial']`` are left out (the image element replaces them)."""
    import anndata as ad

    uns = dict(adata.uns)
    uns["stgen"] = dict(uns.get("stgen", {}) or {})
    if "spatial" in uns:
        uns["spatial"] = {
            k: {kk: vv for kk, vv in dict(v).items() if kk != "images"}
            for k, v in dict(uns["spatial"]).items()
        }
    return ad.AnnData(
        X=adata.X,
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        obsm=dict(adata.obsm),
        layers=dict(adata.layers),
        uns=uns,
    )


def anndata_to_spatialdata(
    adata: Any,
    levels: Sequence[Any] | None = None,
    *,
    image_max_px: int = IMAGE_MAX_PX,
) -> Any:
    """A ``SpatialData`` from a napari-stgen AnnData (``predictions_to_anndata``'s layout).

    ``levels`` is the slide's pyramid (level 0 first, (H, W, 3) arrays, lazy is fine); without
    it the image element is the AnnData's hires thumbnail. See the module docstring.
    """
    sd = require_spatialdata()
    from spatialdata.models import TableModel

    st = _plain(dict(adata.uns.get("stgen", {}) or {}))
    mpp = float(st.get("mpp") or 0)
    if not mpp:
        raise StgenError("SpatialData export needs µm/px (uns['stgen']['mpp'])")
    lib = str(st.get("library_id") or "stgen")
    kind = "tiles" if st.get("obs_kind") == "tiles" else "spots"
    name = sd.sanitize_name(f"{lib}_{kind}")
    table = _shallow_table(adata)
    images: dict[str, Any] = {}
    img, img_rec = _slide_image(adata, levels, mpp, image_max_px)
    if img is not None:
        images[sd.sanitize_name(f"{lib}_image")] = img
    ust = dict(table.uns["stgen"])
    gen = ust.pop("generated", None) or {}
    if gen:
        recs = {}
        for key, rec in gen.items():
            t = GeneratedTile.from_record(rec)
            el = sd.sanitize_name(f"generated_{key}")
            o = (t.origin_yx_um[0] + mpp / 2, t.origin_yx_um[1] + mpp / 2)
            images[el] = _image_element(t.image, t.px_um, t.px_um, o)
            r = {k: v for k, v in dict(rec).items() if k != "image"}
            r["element"] = el
            recs[key] = r
        ust["generated"] = recs
    shapes = {name: _shapes_element(table, mpp, kind)}
    if st.get("rois"):
        rois = _rois_element(st["rois"], mpp)
        if rois is not None:
            shapes["rois"] = rois
    ust["spatialdata"] = {
        "coordinate_system": CS,
        "unit": UNIT,
        "convention": "spatialdata µm = napari-stgen world µm + mpp/2 (pixel corners)",
        "shapes": name,
        **({"image": img_rec} if img_rec else {}),
    }
    table.uns["stgen"] = ust
    table.obs["region"] = name
    table.obs["region"] = table.obs["region"].astype("category")
    table.obs["instance_id"] = np.arange(table.n_obs, dtype=np.int64)
    table = TableModel.parse(table, region=name, region_key="region", instance_key="instance_id")
    sdata = sd.SpatialData(images=images, shapes=shapes, tables={TABLE: table})
    sdata.attrs["napari_stgen"] = {"coordinate_system": CS, "unit": UNIT, "mpp": mpp}
    return sdata


def write_spatialdata(sdata: Any, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``sdata`` to ``path`` (``.zarr``) atomically: temp folder, then rename.

    Refuses an existing ``path`` unless ``overwrite``; on failure nothing is left behind and an
    existing output is untouched. Returns the path.
    """
    path = Path(path)
    if path.suffix.lower() != ".zarr":
        raise StgenError(f"{path}: SpatialData output must end in .zarr")
    if path.exists() and not overwrite:
        raise StgenError(f"{path} already exists; pass overwrite=True to replace it")
    if path.exists() and not path.is_dir():
        raise StgenError(f"{path}: exists and is not a folder")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=parent))
    except OSError as e:
        raise StgenError(f"{path}: cannot write here ({e.strerror or e})") from e
    tmp = tmp_dir / path.name
    old = None
    try:
        with warnings.catch_warnings():  # one per array, on every write
            warnings.filterwarnings("ignore", message=".*autosharding", category=UserWarning)
            sdata.write(tmp)
        if path.exists():
            old = tmp_dir / f"{path.name}.old"
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if old is not None and old.exists() and not path.exists():
            os.replace(old, path)  # put the previous output back
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def export_spatialdata(
    adata: Any,
    path: str | os.PathLike,
    levels: Sequence[Any] | None = None,
    overwrite: bool = False,
    image_max_px: int = IMAGE_MAX_PX,
) -> Path:
    """:func:`anndata_to_spatialdata` + :func:`write_spatialdata`; returns the path."""
    path = Path(path)
    if path.exists() and not overwrite:  # before the work
        raise StgenError(f"{path} already exists; pass overwrite=True to replace it")
    sdata = anndata_to_spatialdata(adata, levels, image_max_px=image_max_px)
    return write_spatialdata(sdata, path, overwrite=overwrite)


def write_layers_spatialdata(
    path: str | os.PathLike, layers: Sequence[LayerData], overwrite: bool = False
) -> Path:
    """napari layer data tuples → one SpatialData (the Export widget's SpatialData choice).

    The table is the AnnData the h5ad writer makes of the same layers
    (:func:`napari_stgen.io.napari_writer.layers_to_anndata`); the slide layer's pyramid
    gives the image element.
    """
    if not exportable(layers):
        raise StgenError(
            f"{path}: nothing to export (need a points, labels or shapes layer, or a "
            "generated tile)"
        )
    layers = list(layers)
    slide = _find_slide(layers)
    if slide is not None and layer_kind(_meta(slide[1])) == SD_IMAGE:
        # a slide image read back from a SpatialData: its translate is the half-pixel shift of
        # a downsampled level (level-0 pixel centres at 0), not an origin of the coordinates
        i = next(i for i, ly in enumerate(layers) if ly[1] is slide[1])
        slide = layers[i] = (slide[0], {**slide[1], "translate": (0.0, 0.0)}, "image")
    adata = layers_to_anndata(layers)
    levels = _levels(slide[0]) if slide is not None else None
    return export_spatialdata(adata, path, levels, overwrite=overwrite)


# ----------------------------------------------------------------------------- import
def _read_zarr(path: Path) -> Any:
    sd = require_spatialdata()
    try:
        return sd.read_zarr(path)
    except Exception as e:  # zarr / ome-zarr raise many types
        raise StgenError(
            f"{path}: not a readable SpatialData zarr ({type(e).__name__}: {e})"
        ) from e


def _pick_cs(sdata: Any) -> str:
    cs = list(sdata.coordinate_systems)
    if not cs:
        raise StgenError("the SpatialData has no coordinate system")
    if CS in cs:
        return CS
    counts = {c: len(list(sdata.filter_by_coordinate_system(c).gen_spatial_elements())) for c in cs}
    return max(cs, key=lambda c: (counts[c], c.endswith("hires")))


def _affine_yx(element: Any, cs: str) -> np.ndarray:
    from spatialdata.transformations import get_transformation

    t = get_transformation(element, to_coordinate_system=cs)
    return np.asarray(t.to_affine_matrix(input_axes=("y", "x"), output_axes=("y", "x")))


def _shape_xy_radius(gdf: Any, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shape centres (x, y) and radii in the coordinate system (``m`` the (y, x) affine)."""
    import shapely

    c = shapely.get_coordinates(gdf.geometry.centroid)
    yx = c[:, ::-1] @ m[:2, :2].T + m[:2, 2]
    s = float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
    if "radius" in gdf.columns:
        r = gdf["radius"].to_numpy(np.float64) * s
    else:
        r = np.sqrt(gdf.geometry.area.to_numpy(np.float64)) / 2 * s
    return yx[:, ::-1], r


def _image_layer(name: str, el: Any, m: np.ndarray, um: float, off: float, meta: dict) -> LayerData:
    """napari image layer for an image element (multiscale when it has scales)."""
    if hasattr(el, "children") and len(el.children):  # DataTree: multiscale
        levels = [el[k]["image"].data for k in sorted(el.children, key=lambda s: int(s[5:]))]
    else:
        levels = [el.data]
    levels = [lv.transpose(1, 2, 0) if lv.shape[0] in (1, 3, 4) else lv for lv in levels]
    rgb = levels[0].shape[-1] in (3, 4) and str(levels[0].dtype) == "uint8"
    if not rgb:
        levels = [lv[..., 0] for lv in levels]
    scale = np.array([m[0, 0], m[1, 1]]) * um
    translate = m[:2, 2] * um + scale / 2 - off
    kw: dict[str, Any] = {
        "name": name,
        "rgb": rgb,
        "scale": tuple(scale),
        "translate": tuple(translate),
        "units": "um",
        "metadata": stgen_metadata(SD_IMAGE, **meta, element=name),
    }
    if len(levels) > 1:
        kw["multiscale"] = True
    if rgb:
        kw["contrast_limits"] = (0, 255)
    return (levels if len(levels) > 1 else levels[0], kw, "image")


def read_spatialdata(path: str | os.PathLike) -> list[LayerData]:
    """napari layers from a SpatialData zarr, in world µm.

    A napari-stgen export comes back as it was exported (slide image, spots/tiles with every
    gene as a feature, codebook grid, ROIs, generated tiles); another SpatialData (e.g. a
    Visium one from spatialdata-io) gives its images and, per table annotating circles or
    polygons, one points layer, in µm when the circles are Visium spots (55 µm) and in the
    coordinate system's units otherwise.
    """
    path = Path(path)
    sdata = _read_zarr(path)
    cs = _pick_cs(sdata)
    ours = (sdata.attrs or {}).get("napari_stgen") or {}
    mpp0 = float(ours.get("mpp") or 0)
    off = mpp0 / 2 if ours else 0.0
    in_cs = {n for _, n, _ in sdata.filter_by_coordinate_system(cs).gen_spatial_elements()}

    tables = []
    for tname, table in sdata.tables.items():
        attrs = table.uns.get("spatialdata_attrs") or {}
        regions = attrs.get("region")
        regions = [regions] if isinstance(regions, str) else list(regions or [])
        regions = [r for r in regions if r in sdata.shapes and r in in_cs]
        if regions:
            tables.append((tname, table, regions[0], attrs))

    um = 1.0 if ours else 0.0
    if not um:  # not ours: µm from Visium circles, else the coordinate system's units
        for _, _, region, _ in tables:
            gdf = sdata.shapes[region]
            if "radius" in gdf.columns and len(gdf):
                _, r = _shape_xy_radius(gdf, _affine_yx(gdf, cs))
                um = VISIUM_SPOT_UM / (2 * float(np.median(r)))
                break
    um = um or 1.0

    layers: list[LayerData] = []
    gen_elements = set()
    for _, table, _, _ in tables:
        for rec in ((_plain(dict(table.uns.get("stgen", {}))).get("generated")) or {}).values():
            gen_elements.add(str(rec.get("element", "")))
    slide_meta: dict[str, Any] = {}
    for _, table, _, _ in tables[:1]:
        st = _plain(dict(table.uns.get("stgen", {}) or {}))
        if ours and st.get("mpp"):  # the writer's µm/px and slide record (level-0 px)
            slide_meta = {**(st.get("slide") or {}), "mpp": float(st["mpp"])}
    for name, el in sdata.images.items():
        if name in in_cs and name not in gen_elements:
            layers.append(_image_layer(name, el, _affine_yx(el, cs), um, off, slide_meta))

    for tname, table, region, attrs in tables:
        layers += _table_layers(sdata, path, tname, table, region, attrs, cs, um, off, ours)
    if not layers:
        raise StgenError(f"{path}: no image or annotated shapes in coordinate system {cs!r}")
    return layers


def _table_layers(
    sdata: Any,
    path: Path,
    tname: str,
    table: Any,
    region: str,
    attrs: dict,
    cs: str,
    um: float,
    off: float,
    ours: dict,
) -> list[LayerData]:
    """Points (+ codebook, ROIs, generated tiles) for one table over one shapes element."""
    import anndata as ad

    gdf = sdata.shapes[region]
    key = attrs.get("instance_key", "instance_id")
    rkey = attrs.get("region_key", "region")
    a = table[table.obs[rkey].astype(str) == region] if rkey in table.obs else table
    xy_cs, r_cs = _shape_xy_radius(gdf, _affine_yx(gdf, cs))
    if key in a.obs and len(gdf):
        pos = gdf.index.get_indexer(a.obs[key].to_numpy())
        if (pos < 0).any():
            raise StgenError(f"{path}: table {tname!r} names instances missing in {region!r}")
        xy_cs, r_cs = xy_cs[pos], r_cs[pos]
    a = ad.AnnData(X=a.X, obs=a.obs.drop(columns=[c for c in (key, rkey) if c in a.obs]),
                   var=a.var, obsm=dict(a.obsm), uns=dict(a.uns))  # fmt: skip
    st = _plain(dict(a.uns.get("stgen", {}) or {}))
    gen = st.pop("generated", None) or {}
    if ours:
        mpp = float(st.get("mpp") or ours["mpp"])
        if "spatial" not in a.obsm:
            a.obsm["spatial"] = (xy_cs - off) / mpp
    else:  # positions in µm: "level-0 px" of 1 µm
        a.obsm["spatial"] = xy_cs * um
        st.update({"mpp": 1.0, "obs_kind": "spots", "library_id": region})
        diam = 2 * float(np.median(r_cs)) * um if len(r_cs) else 1.0
        a.uns["spatial"] = {region: {"scalefactors": {"spot_diameter_fullres": diam}}}
    a.uns["stgen"] = st
    out = anndata_layers(a, path.stem, str(path), include_image=False)
    for rec in gen.values():
        el = sdata.images.get(str(rec.get("element", "")))
        if el is not None:
            img = np.asarray(el.data).transpose(1, 2, 0)
            out.append(GeneratedTile.from_record(rec, image=img).layer_data())
    return out


def read_spatialdata_layers(path: str | os.PathLike) -> list[LayerData]:
    """npe2-style reader function (napari passes the path)."""
    if isinstance(path, list | tuple):
        path = path[0]
    return read_spatialdata(path)
