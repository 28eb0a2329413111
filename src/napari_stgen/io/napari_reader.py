"""npe2 reader: whole-slide images as multiscale RGB layers in µm (and .h5ad via io.anndata).

``get_reader(path)`` returns a reader function for what napari-stgen can open and ``None``
otherwise, so napari tries other plugins. The slide layer's ``scale`` is µm per pixel and its
``units`` are micrometres, which is what napari's scale bar shows. When a file carries no
resolution, the layer stays in pixels (scale 1), ``metadata['stgen']['mpp_known']`` is False and
a notification says so.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from napari_stgen.coords import level_scale
from napari_stgen.io.anndata import read_h5ad_layers
from napari_stgen.io.backends_zarr import read_json_attrs
from napari_stgen.io.layer_meta import stgen_metadata
from napari_stgen.io.slide import open_slide
from napari_stgen.io.spatialdata import is_spatialdata_path, read_spatialdata_layers

LayerData = tuple[Any, dict[str, Any], str]
_SLIDE_EXTS = {
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide",
    ".zarr", ".jpg", ".jpeg", ".png",
}  # fmt: skip


def get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """npe2 reader contribution: a reader for slides (and .h5ad exports), else None."""
    if isinstance(path, list | tuple):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(os.fspath(path))
    ext = p.suffix.lower()
    if ext == ".h5ad":
        return lambda _path: read_h5ad_layers(p)
    if p.is_dir():
        if is_spatialdata_path(p):  # SpatialData zarr (a napari-stgen export or spatialdata-io)
            return read_spatialdata_layers
        # OME-Zarr images; other zarr stores (AnnData…) are left to others
        return read_slide_layers if _is_ome_zarr_image(p) else None
    if ext not in _SLIDE_EXTS:
        return None
    # claim files by extension so a broken slide gets a precise error rather than "no reader"
    return read_slide_layers


def _is_ome_zarr_image(p: Path) -> bool:
    for name in (".zattrs", "zarr.json"):
        f = p / name
        if f.is_file():
            try:
                attrs = read_json_attrs(f)
            except ValueError:
                return True  # claim it: opening says precisely what is wrong
            if not isinstance(attrs, dict):
                return True
            attrs = attrs.get("attributes", attrs)  # zarr v3 keeps attrs under "attributes"
            if not isinstance(attrs, dict):
                return True
            ome = attrs.get("ome")
            ms = attrs.get("multiscales") or (isinstance(ome, dict) and ome.get("multiscales"))
            return bool(ms)
    return (p / ".zarray").is_file()


def read_slide_layers(path: str | list[str]) -> list[LayerData]:
    """Open a slide lazily and return its multiscale image layer (raises SlideReadError)."""
    if isinstance(path, list | tuple):
        path = path[0]
    slide = open_slide(path)
    name = slide.path.name
    slide.on_display_error = lambda e: _notify(
        f"{name}: part of the slide cannot be read and is drawn blank ({e})"
    )
    if slide.mpp is None:
        _notify(
            f"{slide.path.name}: no resolution in the file; the layer is in pixels, not µm. "
            "Give µm/px with napari_stgen.open_slide(path, mpp=...)."
        )
    else:
        _show_scale_bar()
    return [slide_layer_data(slide)]


def slide_layer_data(slide: Any, name: str | None = None) -> LayerData:
    """(levels, kwargs, 'image') for a Slide: multiscale RGB, scale µm/px, units µm."""
    known = slide.mpp is not None
    info = slide.info()
    meta = stgen_metadata(
        path=str(slide.path),
        mpp=slide.mpp,
        mpp_known=known,
        mpp_source=slide.mpp_source,
        format=slide.format,
        vendor=slide.vendor,
        width=slide.width,
        height=slide.height,
        downsamples=list(slide.downsamples),
        levels=info["levels"],
        units="um" if known else "pixel",
    )
    kwargs: dict[str, Any] = {
        "name": name or slide.path.stem,
        "rgb": True,
        "multiscale": True,
        "contrast_limits": (0, 255),
        "scale": level_scale(slide.mpp) if known else (1.0, 1.0),
        "units": ("um", "um") if known else ("pixel", "pixel"),
        "metadata": meta,
    }
    levels = slide.display_levels() if hasattr(slide, "display_levels") else list(slide.levels)
    return (levels, kwargs, "image")


def _current_viewer() -> Any:
    try:
        import napari

        return napari.current_viewer()
    except Exception:  # noqa: BLE001 - no Qt app, no viewer: nothing to do
        return None


def _show_scale_bar() -> None:
    """Make the scale bar of the viewer that is opening the slide visible (units come from
    the layer's ``units``)."""
    viewer = _current_viewer()
    if viewer is not None:
        try:
            viewer.scale_bar.visible = True
        except Exception:  # noqa: BLE001 - cosmetic
            pass


def _notify(msg: str) -> None:
    try:
        from napari.utils.notifications import show_warning

        show_warning(msg)
    except Exception:  # noqa: BLE001 - headless use without napari
        warnings.warn(msg, stacklevel=3)
