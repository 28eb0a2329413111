"""OME-Zarr (NGFF 0.1–0.5) multiscale images, and plain zarr arrays, through zarr."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.array as da

from ..errors import SlideReadError
from .slide import Slide, to_rgb_uint8

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


def open_zarr(path: Path) -> Slide:
    """Open an OME-Zarr image (first multiscale) or a plain 2-D/3-D zarr array."""
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as e:  # noqa: BLE001
        raise SlideReadError(f"{path}: not a readable zarr store ({e})") from None
    if isinstance(node, zarr.Array):
        arrays, axes, mpp, src = [node], _guess_axes(node.shape), None, None
    else:
        attrs = dict(node.attrs)
        ms = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
        if not ms:
            raise SlideReadError(f"{path}: zarr group has no OME-Zarr 'multiscales' metadata")
        m = ms[0]
        try:
            arrays = [node[d["path"]] for d in m["datasets"]]
        except KeyError as e:
            raise SlideReadError(f"{path}: OME-Zarr dataset {e} is missing") from None
        ax_meta = m.get("axes")
        if ax_meta:
            names = [a["name"] if isinstance(a, dict) else str(a) for a in ax_meta]
            axes = "".join(_AXIS.get(n.lower(), "Q") for n in names)
        else:
            axes = _guess_axes(arrays[0].shape)
        mpp, src = _ngff_mpp(m, ax_meta, axes)
    levels = []
    for k, z in enumerate(arrays):
        if z.ndim != len(axes):
            raise SlideReadError(f"{path}: level {k} has {z.ndim} dims, axes are {axes!r}")
        arr = da.from_zarr(z, name=f"stgen-zarr-{path.resolve()}-{k}", inline_array=True)
        levels.append(to_rgb_uint8(arr, axes, path))
    return Slide(path, "ome-zarr", levels, mpp, mpp_source=src, vendor="ome")


def _guess_axes(shape: tuple[int, ...]) -> str:
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        return "YXC" if shape[-1] in (3, 4) and shape[0] > 4 else "CYX"
    return "TCZYX"[-len(shape) :]


def _ngff_mpp(m: dict[str, Any], ax_meta: Any, axes: str) -> tuple[float | None, str | None]:
    if "X" not in axes:
        return None, None
    xi = axes.index("X")
    scale = 1.0
    ds0 = m["datasets"][0]
    for tr in list(ds0.get("coordinateTransformations", [])) + list(
        m.get("coordinateTransformations", [])
    ):
        if tr.get("type") == "scale" and "scale" in tr:
            scale *= float(tr["scale"][xi])
    unit = None
    if ax_meta and isinstance(ax_meta[xi], dict):
        unit = ax_meta[xi].get("unit")
    if unit is not None:
        f = _UNIT_UM.get(str(unit).lower())
        if f is None:
            return None, None
        return scale * f, f"OME-Zarr scale ({unit})"
    if scale != 1.0:
        return scale, "OME-Zarr scale (unit not stated, taken as µm)"
    return None, None
