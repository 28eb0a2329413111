"""TIFF-family slides (SVS, OME-TIFF, generic tiled pyramids) through tifffile's zarr store."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from ..errors import SlideReadError
from .slide import Slide, TileSource, tiled_dask, to_rgb_uint8

_MPP_RE = re.compile(r"\bMPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")
# ResolutionUnit values: 2 inch, 3 cm, plus tifffile's non-standard mm / µm
_UNIT_UM = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}
_OME_UNIT_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}
#: Resolutions coarser than this are page-layout defaults (72 dpi…), not microscope pixels.
MAX_PLAUSIBLE_MPP = 20.0


def open_tiff(path: Path) -> Slide:
    """Open a TIFF-family slide lazily (level arrays read tile by tile on demand).

    Levels stored as one tiled (or stripped) page are read directly: each dask chunk is one
    TIFF tile, read under the file lock and decoded in the worker thread. Other layouts (planar
    OME, multi-page levels) go through tifffile's zarr store.
    """
    import tifffile

    try:
        tf = tifffile.TiffFile(path)
    except Exception as e:  # noqa: BLE001 - tifffile raises many types on corrupt input
        raise SlideReadError(f"{path}: not a readable TIFF ({_short(e)})") from None
    tf.filehandle.set_lock(True)  # dask reads tiles from several threads
    stores: list[Any] = []
    try:
        series, extra = _pick_series(tf, path)
        level_series = list(series.levels) + extra
        _check_complete(tf, level_series, path)
        token = _file_token(path)
        levels = []
        for k, s in enumerate(level_series):
            name = f"stgen-tiff-{token}-{k}"
            page = s.pages[0] if len(s.pages) == 1 else None
            if page is not None and _direct_ok(page) and len(s.shape) == len(page.shape):
                arr, axes = _direct_level(page, tf.filehandle, name), page.axes
            else:
                arr, axes = _zarr_level(series, s, k, s in extra, name, stores, path)
            levels.append(to_rgb_uint8(arr, axes, path))
        # decode one tile of the coarsest stored level now, so corrupt data fails at open
        lv = levels[-1]
        lv[: min(lv.shape[0], 64), : min(lv.shape[1], 64)].compute(scheduler="synchronous")
        mpp, source = _tiff_mpp(tf, series, path)
        fmt = "svs" if tf.is_svs else "ome-tiff" if tf.is_ome else "tiff"
        props = _properties(tf)
    except Exception as e:  # noqa: BLE001
        for st in stores:
            st.close()
        tf.close()
        if isinstance(e, SlideReadError):
            raise
        raise SlideReadError(f"{path}: cannot read TIFF data ({_short(e)})") from None
    closers = [s.close for s in stores if hasattr(s, "close")] + [tf.close]
    return Slide(
        path,
        fmt,
        levels,
        mpp,
        mpp_source=source,
        vendor=_vendor(tf),
        properties=props,
        closers=closers,
    )


def _direct_ok(page: Any) -> bool:
    return (
        getattr(page, "imagedepth", 1) == 1
        and (page.planarconfig == 1 or page.samplesperpixel == 1)
        and page.axes in ("YXS", "YX")
        and page.dtype is not None
        and len(page.dataoffsets) > 0
    )


def _direct_level(page: Any, fh: Any, name: str) -> da.Array:
    """A dask array over one TIFF page whose chunks are its tiles (or groups of strips)."""
    h, w = page.shape[:2]
    if page.is_tiled:
        th, tw, group = page.tilelength, page.tilewidth, 1
    else:
        th, tw = min(page.rowsperstrip or h, h), w
        group = max(1, -(-256 // th))  # strips are grouped into chunks of >= 256 rows
    per_row = -(-w // tw)
    offsets, counts = page.dataoffsets, page.databytecounts
    decode = page.decode
    jt, jh = page.jpegtables, page.jpegheader
    fill = np.iinfo(page.dtype).max if page.dtype.kind == "u" else 0
    tail = page.shape[2:]

    def read_segment(sy: int, sx: int) -> np.ndarray:
        i = sy * per_row + sx
        th_ = min(th, h - sy * th)
        tw_ = min(tw, w - sx * tw)
        if not counts[i]:
            return np.full((th_, tw_, *tail), fill, page.dtype)
        with fh.lock:
            fh.seek(offsets[i])
            data = fh.read(counts[i])
        seg, _, _ = decode(data, i, jpegtables=jt, jpegheader=jh)
        seg = seg.reshape(seg.shape[1], seg.shape[2], -1)[:th_, :tw_]
        return seg if tail else seg[..., 0]

    def read_chunk(cy: int, cx: int) -> np.ndarray:
        if group == 1:
            return read_segment(cy, cx)
        rows = range(cy * group, min((cy + 1) * group, -(-h // th)))
        return np.concatenate([read_segment(sy, cx) for sy in rows], axis=0)

    return tiled_dask(TileSource(page.shape, (th * group, tw), page.dtype, read_chunk), name)


def _zarr_level(
    series: Any, s: Any, k: int, is_extra: bool, name: str, stores: list, path: Path
) -> tuple[da.Array, str]:
    import zarr

    store = s.aszarr() if is_extra else series.aszarr(level=k)
    stores.append(store)
    z = zarr.open_array(store, mode="r") if is_extra else _open_level(store)
    return da.from_zarr(z, name=name, inline_array=True), _axes_for(s, z.ndim, path)


def _open_level(store: Any) -> Any:
    import zarr

    z = zarr.open(store, mode="r")
    if isinstance(z, zarr.Group):  # multiscales group from series.aszarr(level=k) in old versions
        z = z[sorted(z.array_keys())[0]]
    return z


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:200]


def _file_token(path: Path) -> str:
    st = path.stat()
    from dask.base import tokenize

    return tokenize(str(path.resolve()), st.st_size, st.st_mtime_ns)


def _yx(s: Any) -> tuple[int, int]:
    axes = s.axes
    if "Y" not in axes or "X" not in axes:
        return (0, 0)
    return (int(s.shape[axes.index("Y")]), int(s.shape[axes.index("X")]))


def _pick_series(tf: Any, path: Path) -> tuple[Any, list[Any]]:
    """The largest image series, plus other series that look like its unflagged pyramid levels."""
    cands = [s for s in tf.series if _yx(s)[0] > 0]
    if not cands:
        raise SlideReadError(f"{path}: TIFF has no 2-D image series")
    main = max(cands, key=lambda s: _yx(s)[0] * _yx(s)[1])
    extra: list[Any] = []
    if len(main.levels) == 1:
        h0, w0 = _yx(main)
        for s in cands:
            if s is main or len(s.levels) != 1:
                continue
            h, w = _yx(s)
            if h < h0 and abs(h0 / h - w0 / w) / (w0 / w) < 0.02 and w0 / w >= 1.5:
                extra.append(s)
        extra.sort(key=lambda s: -_yx(s)[0])
    return main, extra


def _axes_for(s: Any, ndim: int, path: Path) -> str:
    if len(s.axes) == ndim:
        return s.axes
    full = s.get_axes(False) if hasattr(s, "get_axes") else s.axes
    if len(full) == ndim:
        return full
    raise SlideReadError(f"{path}: cannot match axes {s.axes!r} to {ndim}-D data")


def _check_complete(tf: Any, level_series: list[Any], path: Path) -> None:
    """Detect truncated files: every tile/strip must lie inside the file."""
    size = tf.filehandle.size
    for s in level_series:
        for page in s.pages:
            if page is None:
                continue
            offs, counts = page.dataoffsets, page.databytecounts
            if not len(offs):
                continue
            end = int((np.asarray(offs, np.int64) + np.asarray(counts, np.int64)).max())
            if end > size:
                raise SlideReadError(
                    f"{path}: file is truncated (image data runs to byte {end}, "
                    f"file has {size} bytes)"
                )


def _tiff_mpp(tf: Any, series: Any, path: Path) -> tuple[float | None, str | None]:
    page = series.pages[0] if series.pages else tf.pages.first
    desc = page.description or ""
    if tf.is_svs:
        m = _MPP_RE.search(desc)
        if m:
            return float(m.group(1)), "aperio description"
    if tf.is_ome:
        mpp = _ome_mpp(tf.ome_metadata or "", _yx(series))
        if mpp:
            return mpp, "OME PhysicalSizeX"
    if tf.shaped_metadata:
        md = tf.shaped_metadata[0]
        for key in ("mpp", "MPP", "PhysicalSizeX"):
            v = md.get(key) if isinstance(md, dict) else None
            if isinstance(v, int | float) and v > 0:
                return float(v), "tifffile metadata"
    if desc.startswith("{"):
        try:
            v = json.loads(desc).get("mpp")
        except (ValueError, AttributeError):
            v = None
        if isinstance(v, int | float) and v > 0:
            return float(v), "image description"
    m = _MPP_RE.search(desc)
    if m and float(m.group(1)) > 0:
        return float(m.group(1)), "image description"
    return _resolution_mpp(page)


def _resolution_mpp(page: Any) -> tuple[float | None, str | None]:
    tags = page.tags
    if "XResolution" not in tags:
        return None, None
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    if unit not in _UNIT_UM:
        return None, None
    num, den = tags["XResolution"].value
    if not num or not den:
        return None, None
    px_per_unit = num / den
    mpp = _UNIT_UM[unit] / px_per_unit
    if not (0 < mpp < MAX_PLAUSIBLE_MPP):
        return None, None
    return mpp, "TIFF resolution tags"


def _ome_mpp(xml: str, yx: tuple[int, int]) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    best = None
    for el in root.iter():
        if not el.tag.endswith("Pixels"):
            continue
        v = el.get("PhysicalSizeX")
        if v is None:
            continue
        mpp = float(v) * _OME_UNIT_UM.get(el.get("PhysicalSizeXUnit", "µm"), 1.0)
        if (int(el.get("SizeY", -1)), int(el.get("SizeX", -1))) == yx:
            return mpp
        best = best or mpp
    return best


def _vendor(tf: Any) -> str | None:
    for flag, name in (
        ("is_svs", "aperio"),
        ("is_ndpi", "hamamatsu"),
        ("is_scn", "leica"),
        ("is_philips", "philips"),
        ("is_bif", "ventana"),
        ("is_ome", "ome"),
    ):
        if getattr(tf, flag, False):
            return name
    return None


def _properties(tf: Any) -> dict[str, Any]:
    desc = tf.pages.first.description or ""
    props: dict[str, Any] = {}
    if tf.is_svs:
        for part in desc.split("|")[1:]:
            if "=" in part:
                k, v = part.split("=", 1)
                props[f"aperio.{k.strip()}"] = v.strip()
    elif desc.startswith("{"):
        try:
            md = json.loads(desc)
        except ValueError:
            md = None
        if isinstance(md, dict):
            props.update({str(k): v for k, v in md.items() if k != "shape"})
    elif tf.shaped_metadata and isinstance(tf.shaped_metadata[0], dict):
        props.update({str(k): v for k, v in tf.shaped_metadata[0].items() if k != "shape"})
    return props
