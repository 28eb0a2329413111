"""TIFF-family slides (SVS, OME-TIFF, generic tiled pyramids) through tifffile's zarr store."""

from __future__ import annotations

import json
import logging
import math
import re
import struct
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import tifffile
import zarr
from dask.base import tokenize

from napari_stgen.errors import SlideReadError
from napari_stgen.io.dask_tiles import TileSource, guarded_dask, tiled_dask, to_rgb_uint8
from napari_stgen.io.limits import check_level_shape, check_pyramid, check_tiling
from napari_stgen.io.slide_handle import Slide

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
    with _tifffile_warnings() as warned:
        try:
            tf = tifffile.TiffFile(path)
        except Exception as e:  # noqa: BLE001 - tifffile raises many types on corrupt input
            raise SlideReadError(f"{path}: not a readable TIFF ({_short(e)})") from None
    tf.filehandle.set_lock(True)  # dask reads tiles from several threads
    stores: list[Any] = []
    try:
        with _tifffile_warnings() as warned2:
            series, extra = _pick_series(tf, path)
            level_series = list(series.levels) + extra
        _check_structure(tf, level_series, path, warned + warned2)
        token = _file_token(path)
        levels = []
        for k, s in enumerate(level_series):
            name = f"stgen-tiff-{token}-{k}"
            page = s.pages[0] if len(s.pages) == 1 else None
            if page is not None and _direct_ok(page) and len(s.shape) == len(page.shape):
                arr, axes = _direct_level(page, tf.filehandle, name, path, k), page.axes
                _probe_tile(page, arr, path, k)
            else:
                arr, axes = _zarr_level(series, s, k, s in extra, name, stores, path)
            levels.append(to_rgb_uint8(arr, axes, path))
        check_pyramid(path, [lv.shape for lv in sorted(levels, key=lambda a: -a.shape[0])])
        # decode one tile of the coarsest stored level now, so corrupt data fails at open
        lv = levels[-1]
        lv[: min(lv.shape[0], 64), : min(lv.shape[1], 64)].compute(scheduler="synchronous")
        mpp, source = _tiff_mpp(tf, series, path)
        fmt = "svs" if tf.is_svs else "ome-tiff" if tf.is_ome else "tiff"
        props = _properties(tf)
    except Exception as e:  # noqa: BLE001 - close what was opened, then one SlideReadError
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


def _direct_level(page: Any, fh: Any, name: str, path: Path, level: int) -> da.Array:
    """A dask array over one TIFF page whose chunks are its tiles (or groups of strips).

    A tile whose bytes are missing, short or undecodable raises SlideReadError naming the
    file, the level and the tile (never a tile of fill values).
    """
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
    tail = page.shape[2:]
    kind = "tile" if page.is_tiled else "strip"
    jpeg = int(page.compression) in _JPEG_CODES

    def read_segment(sy: int, sx: int) -> np.ndarray:
        i = sy * per_row + sx
        th_ = min(th, h - sy * th)
        tw_ = min(tw, w - sx * tw)
        where = f"{path}: level {level} {kind} (row {sy}, col {sx})"
        if not counts[i]:
            raise SlideReadError(f"{where} is missing (byte count 0)")
        with fh.lock:
            fh.seek(offsets[i])
            data = fh.read(counts[i])
        if len(data) != counts[i]:
            raise SlideReadError(
                f"{where} is truncated ({len(data)} of {counts[i]} bytes in the file)"
            )
        if jpeg and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            # JPEG has no checksum; a short or overlong byte count shows as a missing EOI
            raise SlideReadError(f"{where} is truncated or corrupt (JPEG data has no end marker)")
        try:
            seg, _, _ = decode(data, i, jpegtables=jt, jpegheader=jh)
            seg = seg.reshape(seg.shape[-3], seg.shape[-2], -1)[:th_, :tw_]
        except Exception as e:  # noqa: BLE001 - codecs raise their own types
            raise SlideReadError(f"{where} cannot be decoded ({_short(e)})") from None
        if seg.shape[:2] != (th_, tw_):
            raise SlideReadError(
                f"{where} decodes to {seg.shape[1]} × {seg.shape[0]} px, expected {tw_} × {th_}"
            )
        return seg if tail else seg[..., 0]

    def read_chunk(cy: int, cx: int) -> np.ndarray:
        if group == 1:
            return read_segment(cy, cx)
        rows = range(cy * group, min((cy + 1) * group, -(-h // th)))
        return np.concatenate([read_segment(sy, cx) for sy in rows], axis=0)

    return tiled_dask(TileSource(page.shape, (th * group, tw), page.dtype, read_chunk), name)


def _probe_tile(page: Any, arr: da.Array, path: Path, level: int) -> None:
    """Decode the first stored tile of a level (unknown codecs fail at open, not at draw)."""
    counts = np.asarray(page.databytecounts)
    nz = np.flatnonzero(counts)
    if not len(nz):
        raise SlideReadError(f"{path}: level {level} has no image data (all byte counts 0)")
    ch = arr.chunks
    per_row = len(ch[1])
    i = int(nz[0])
    if not page.is_tiled:
        group = max(1, ch[0][0] // max(1, min(page.rowsperstrip or page.shape[0], page.shape[0])))
        i = i // group
    cy, cx = divmod(i, per_row)
    if cy < len(ch[0]):
        y0, x0 = sum(ch[0][:cy]), sum(ch[1][:cx])
        arr[y0 : y0 + ch[0][cy], x0 : x0 + ch[1][cx]].compute(scheduler="synchronous")


def _zarr_level(
    series: Any, s: Any, k: int, is_extra: bool, name: str, stores: list, path: Path
) -> tuple[da.Array, str]:
    store = s.aszarr() if is_extra else series.aszarr(level=k)
    stores.append(store)
    z = zarr.open_array(store, mode="r") if is_extra else _open_level(store)
    return guarded_dask(z, name, path, k), _axes_for(s, z.ndim, path)


def _open_level(store: Any) -> Any:
    z = zarr.open(store, mode="r")
    if isinstance(z, zarr.Group):  # multiscales group from series.aszarr(level=k) in old versions
        z = z[sorted(z.array_keys())[0]]
    return z


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:200]


def _file_token(path: Path) -> str:
    st = path.stat()

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


#: TIFF compressions whose segments are JPEG streams ending with an EOI marker.
_JPEG_CODES = {7, 34892}
_CORRUPT_LOG = re.compile(r"invalid (?:page |value |tag )?offset|raised TiffFileError|missing data")


@contextmanager
def _tifffile_warnings():  # -> Iterator[list[str]]
    """Collect what tifffile logs (it logs, rather than raises, on many corrupt structures)."""
    msgs: list[str] = []

    class _H(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msgs.append(record.getMessage())

    log = logging.getLogger("tifffile")
    h = _H(logging.WARNING)
    log.addHandler(h)
    old = log.propagate
    log.propagate = False  # the reason goes into our error, not onto stderr
    try:
        yield msgs
    finally:
        log.removeHandler(h)
        log.propagate = old


def _check_structure(tf: Any, level_series: list[Any], path: Path, warned: list[str]) -> None:
    """Validate every level page from its tags alone, before any array is built.

    Declared sizes within limits, tile sizes positive, multiples of 16 and not absurd, as
    many tile offsets and byte counts as tiles, a known compression, tag arrays and tile data
    inside the file and tiles not overlapping one another. Truncation is detected here: an
    IFD chain, tag array or tile that points past the end of the file.
    """
    size = tf.filehandle.size
    bad = [m for m in warned if _CORRUPT_LOG.search(m)]
    if bad:
        what = "truncated" if size < _max_ifd_pointer(tf, size) else "corrupt"
        raise SlideReadError(f"{path}: file is {what} ({_short(Exception(bad[0]))})")
    _check_ifd_chain(tf, path, size)
    spans: list[tuple[np.ndarray, np.ndarray]] = []
    for k, s in enumerate(level_series):
        check_level_shape(path, k, _yx(s))
        for page in s.pages:
            if page is None or not hasattr(page, "tags"):
                continue
            _check_page(tifffile, page, path, k, size)
            offs = np.asarray(page.dataoffsets, np.int64)
            counts = np.asarray(page.databytecounts, np.int64)
            spans.append((offs, counts))
    if spans:
        offs = np.concatenate([o for o, _ in spans])
        counts = np.concatenate([c for _, c in spans])
        keep = counts > 0
        offs, counts = offs[keep], counts[keep]
        if len(offs):
            end = int((offs + counts).max())
            if end > size:
                raise SlideReadError(
                    f"{path}: file is truncated (image data runs to byte {end}, "
                    f"file has {size} bytes)"
                )
            if int(offs.min()) < 8:
                raise SlideReadError(f"{path}: corrupt tile table (a tile starts at byte 0)")
            # tiles may share bytes only when identical (writers dedupe blank tiles)
            pairs = np.unique(np.stack([offs, counts], axis=1), axis=0)
            ends = pairs[:-1, 0] + pairs[:-1, 1]
            over = np.flatnonzero(ends > pairs[1:, 0])
            if len(over):
                j = int(over[0])
                raise SlideReadError(
                    f"{path}: corrupt tile table (tile at byte {pairs[j, 0]} of "
                    f"{pairs[j, 1]} bytes overlaps the tile at byte {pairs[j + 1, 0]})"
                )


def _check_page(tifffile: Any, page: Any, path: Path, k: int, size: int) -> None:
    h, w = int(page.imagelength), int(page.imagewidth)
    spp = int(page.samplesperpixel or 1)
    if page.dtype is None:
        raise SlideReadError(
            f"{path}: level {k} has unsupported pixels ({page.bitspersample}-bit, "
            f"sample format {page.sampleformat})"
        )
    try:
        tifffile.COMPRESSION(page.compression)
    except ValueError:
        raise SlideReadError(
            f"{path}: level {k} has unknown compression {page.compression}"
        ) from None
    item = np.dtype(page.dtype).itemsize * (spp if page.planarconfig == 1 else 1)
    if page.is_tiled:
        th, tw = int(page.tilelength), int(page.tilewidth)
        check_tiling(path, k, (h, w), (th, tw), item, multiple=16)
    else:
        rps = int(page.rowsperstrip or h)
        th, tw = min(max(rps, 0), h), w
        check_tiling(path, k, (h, w), (th, tw), item, what="strip")
    depth = int(getattr(page, "imagedepth", 1) or 1)
    tdepth = int(getattr(page, "tiledepth", 1) or 1) if page.is_tiled else 1
    expect = math.ceil(h / th) * math.ceil(w / tw) * math.ceil(depth / tdepth)
    if page.planarconfig == 2:
        expect *= spp
    n_off, n_cnt = len(page.dataoffsets), len(page.databytecounts)
    if n_off != expect or n_cnt != expect:
        raise SlideReadError(
            f"{path}: level {k} tile table has {n_off} offsets and {n_cnt} byte counts, "
            f"expected {expect} for {w} × {h} px in {tw} × {th} "
            f"{'tiles' if page.is_tiled else 'strips'}"
            " (truncated or corrupt file)"
        )
    for tag in page.tags.values():
        end = int(tag.valueoffset) + int(tag.valuebytecount)
        if tag.valuebytecount > tf_inline(page) and end > size:
            raise SlideReadError(
                f"{path}: file is truncated (tag {tag.name} of level {k} runs to byte {end}, "
                f"file has {size} bytes)"
            )


def tf_inline(page: Any) -> int:
    """Bytes a tag value may hold inline in its IFD entry (4 classic, 8 BigTIFF)."""
    return int(page.parent.tiff.tagoffsetthreshold)


def _ifd_next(tf: Any, offset: int) -> tuple[int, int]:
    """(end of the IFD at ``offset``, the next-IFD pointer it holds); (-1, -1) if unreadable."""
    t = tf.tiff
    fh = tf.filehandle
    try:
        with fh.lock:
            fh.seek(offset)
            (n,) = struct.unpack(t.tagnoformat, fh.read(t.tagnosize))
            fh.seek(offset + t.tagnosize + n * t.tagsize)
            raw = fh.read(t.offsetsize)
    except (OSError, struct.error):
        return -1, -1
    if len(raw) != t.offsetsize:
        return -1, -1
    (nxt,) = struct.unpack(t.offsetformat, raw)
    return offset + t.tagnosize + n * t.tagsize + t.offsetsize, int(nxt)


def _max_ifd_pointer(tf: Any, size: int) -> int:
    last = tf.pages[-1] if len(tf.pages) else None
    if last is None:
        return 0
    end, nxt = _ifd_next(tf, int(last.offset))
    return max(end, nxt) if end >= 0 else size + 1


def _check_ifd_chain(tf: Any, path: Path, size: int) -> None:
    """The top-level IFD chain ends inside the file (a pointer past EOF means truncation)."""
    for page in tf.pages:
        off = int(getattr(page, "offset", 0) or 0)
        end, nxt = _ifd_next(tf, off)
        if end < 0 or end > size:
            raise SlideReadError(
                f"{path}: file is truncated (IFD at byte {off} runs past the end, "
                f"file has {size} bytes)"
            )
        if nxt >= size:
            raise SlideReadError(
                f"{path}: file is truncated (next IFD at byte {nxt}, file has {size} bytes)"
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
