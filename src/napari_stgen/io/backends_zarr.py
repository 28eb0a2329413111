"""OME-Zarr (NGFF 0.1–0.5) multiscale images, and plain zarr arrays, through zarr."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import zarr

from napari_stgen.errors import SlideReadError
from napari_stgen.io.dask_tiles import guarded_dask, to_rgb_uint8
from napari_stgen.io.limits import check_level_shape, check_pyramid, check_tiling
from napari_stgen.io.slide_handle import Slide

#: Metadata files larger than this are refused unread (a .zattrs is a few kB).
MAX_ATTRS_BYTES = 4 * 2**20

_UNIT_UM = {
    "micrometer": 1.0,
    "micron": 1.0,
    "um": 1.0,
    "µm": 1.0,
    "nanometer": 1e-3,
    "nm": 1e-3,
    "millimeter": 1e3,
    "mm": 1e3,
    "centimeter": 1e4,
    "meter": 1e6,
}
_AXIS = {"y": "Y", "x": "X", "c": "C", "z": "Z", "t": "T"}


def read_json_attrs(f: Path) -> Any:
    """A zarr metadata file's JSON (ValueError when unreadable, too large or too deep)."""
    try:
        if f.stat().st_size > MAX_ATTRS_BYTES:
            raise ValueError(f"{f.name} is {f.stat().st_size:,} bytes (not metadata)")
        return json.loads(f.read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError(f"{f.name} is nested too deeply") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{f.name} is not valid JSON ({e})") from None


def _check_metadata_files(path: Path) -> None:
    for name in (".zattrs", ".zgroup", ".zarray", "zarr.json"):
        f = path / name
        if f.is_file():
            try:
                v = read_json_attrs(f)
            except ValueError as e:
                raise SlideReadError(f"{path}: {e}") from None
            if not isinstance(v, dict):
                raise SlideReadError(
                    f"{path}: {name} holds {type(v).__name__ if v is not None else 'null'}, "
                    "not a JSON object"
                )


def open_zarr(path: Path) -> Slide:
    """Open an OME-Zarr image (first multiscale) or a plain 2-D/3-D zarr array.

    The metadata is validated before any array is built: JSON objects of sane size and depth,
    a well-formed ``multiscales`` entry, finite positive scales, level shapes and chunks
    within ``io.limits``, levels that shrink consistently and no missing chunk files.
    """
    _check_metadata_files(path)
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as e:  # noqa: BLE001 - zarr and its stores raise their own types
        raise SlideReadError(f"{path}: not a readable zarr store ({e})") from None
    if isinstance(node, zarr.Array):
        arrays, axes, mpp, src = [node], _guess_axes(node.shape), None, None
    else:
        m = _multiscale(path, dict(node.attrs))
        arrays = []
        for d in m["datasets"]:
            try:
                z = node[d["path"]]
            except KeyError:
                raise SlideReadError(f"{path}: OME-Zarr dataset {d['path']!r} is missing") from None
            if not isinstance(z, zarr.Array):
                raise SlideReadError(f"{path}: OME-Zarr dataset {d['path']!r} is not an array")
            arrays.append(z)
        ax_meta = m.get("axes")
        if ax_meta:
            if not isinstance(ax_meta, list):
                raise SlideReadError(f"{path}: OME-Zarr 'axes' is not a list")
            names = [a.get("name", "?") if isinstance(a, dict) else str(a) for a in ax_meta]
            axes = "".join(_AXIS.get(str(n).lower(), "Q") for n in names)
        else:
            axes = _guess_axes(arrays[0].shape)
        mpp, src = _ngff_mpp(path, m, ax_meta, axes)
    levels = []
    shapes = []
    for k, z in enumerate(arrays):
        if z.ndim != len(axes):
            raise SlideReadError(f"{path}: level {k} has {z.ndim} dims, axes are {axes!r}")
        _check_array(path, k, z, axes)
        arr = guarded_dask(z, f"stgen-zarr-{path.resolve()}-{k}", path, k)
        rgb = to_rgb_uint8(arr, axes, path)
        shapes.append(rgb.shape)
        levels.append(rgb)
    check_pyramid(path, shapes)
    # decode one chunk of the coarsest level now, so corrupt data fails at open
    lv = levels[-1]
    lv[: min(lv.shape[0], 64), : min(lv.shape[1], 64)].compute(scheduler="synchronous")
    return Slide(path, "ome-zarr", levels, mpp, mpp_source=src, vendor="ome")


def _multiscale(path: Path, attrs: dict) -> dict:
    ome = attrs.get("ome")
    ms = attrs.get("multiscales") or (ome.get("multiscales") if isinstance(ome, dict) else None)
    if not ms:
        raise SlideReadError(f"{path}: zarr group has no OME-Zarr 'multiscales' metadata")
    if not isinstance(ms, list) or not isinstance(ms[0], dict):
        raise SlideReadError(f"{path}: OME-Zarr 'multiscales' is not a list of objects")
    m = ms[0]
    ds = m.get("datasets")
    if not isinstance(ds, list) or not ds:
        raise SlideReadError(f"{path}: OME-Zarr multiscale has no 'datasets' list")
    for i, d in enumerate(ds):
        if not isinstance(d, dict) or not isinstance(d.get("path"), str) or not d["path"]:
            raise SlideReadError(f"{path}: OME-Zarr dataset {i} has no 'path' string")
    return m


def _check_array(path: Path, k: int, z: Any, axes: str) -> None:
    """Declared shape, chunking and stored chunks of one level, before reading it."""
    if "Y" not in axes or "X" not in axes:
        raise SlideReadError(f"{path}: no Y/X image axes in {axes!r}")
    yx = (z.shape[axes.index("Y")], z.shape[axes.index("X")])
    check_level_shape(path, k, yx)
    chunks = tuple(int(c) for c in z.chunks)
    if any(c <= 0 for c in chunks):
        raise SlideReadError(f"{path}: level {k} has chunks {chunks}")
    n_other = math.prod(
        math.ceil(n / c) for a, n, c in zip(axes, z.shape, chunks, strict=True) if a not in "YX"
    )
    cyx = (chunks[axes.index("Y")], chunks[axes.index("X")])
    other = math.prod(c for a, c in zip(axes, chunks, strict=True) if a not in "YX")
    check_tiling(path, k, yx, cyx, z.dtype.itemsize * other, what="chunk", min_edge=16)
    if n_other > 64:
        raise SlideReadError(f"{path}: level {k} has {n_other} chunks along non-spatial axes")
    try:
        stored, total = int(z.nchunks_initialized), int(z.nchunks)
    except Exception:  # noqa: BLE001 - remote stores may not list: checked at read time
        return
    if stored < total:
        raise SlideReadError(
            f"{path}: level {k} is missing {total - stored} of {total} chunks "
            "(incomplete copy or write)"
        )


def _guess_axes(shape: tuple[int, ...]) -> str:
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        return "YXC" if shape[-1] in (3, 4) and shape[0] > 4 else "CYX"
    return "TCZYX"[-len(shape) :]


def _ngff_mpp(
    path: Path, m: dict[str, Any], ax_meta: Any, axes: str
) -> tuple[float | None, str | None]:
    if "X" not in axes:
        return None, None
    xi = axes.index("X")
    scale = 1.0
    ds0 = m["datasets"][0]
    trs = list(ds0.get("coordinateTransformations") or []) + list(
        m.get("coordinateTransformations") or []
    )
    for tr in trs:
        if not isinstance(tr, dict) or tr.get("type") != "scale" or "scale" not in tr:
            continue
        sc = tr["scale"]
        try:
            vals = [float(v) for v in sc]
        except (TypeError, ValueError):
            why = f"OME-Zarr scale {sc!r} is not a list of numbers"
            raise SlideReadError(f"{path}: {why}") from None
        if len(vals) != len(axes):
            raise SlideReadError(f"{path}: OME-Zarr scale {sc!r} does not match axes {axes!r}")
        bad = [v for v in vals if not (math.isfinite(v) and v > 0)]
        if bad:
            raise SlideReadError(f"{path}: OME-Zarr scale holds {bad[0]}, not a positive number")
        if "Y" in axes and abs(vals[axes.index("Y")] / vals[xi] - 1.0) > 0.01:
            raise SlideReadError(
                f"{path}: OME-Zarr pixels are not square (y {vals[axes.index('Y')]:g}, "
                f"x {vals[xi]:g})"
            )
        scale *= vals[xi]
    unit = None
    if ax_meta and len(ax_meta) > xi and isinstance(ax_meta[xi], dict):
        unit = ax_meta[xi].get("unit")
    if unit is not None:
        f = _UNIT_UM.get(str(unit).lower())
        if f is None:
            return None, None
        return scale * f, f"OME-Zarr scale ({unit})"
    if scale != 1.0:
        return scale, "OME-Zarr scale (unit not stated, taken as µm)"
    return None, None
