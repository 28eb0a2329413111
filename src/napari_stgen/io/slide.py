"""Whole-slide images as lazy pyramids of RGB uint8 dask arrays, in one µm world space.

``open_slide(path, mpp=None)`` picks a backend from the file's content (not only its name):

- TIFF family (SVS, OME-TIFF, generic tiled pyramids, single-level TIFF): tifffile's zarr store;
- OME-Zarr (and plain zarr arrays): zarr;
- vendor formats (NDPI, MRXS, SCN, BIF, VMS…): OpenSlide, an optional extra imported lazily;
- plain images (JPEG, PNG…): Pillow, decoded on first access (JPEG coarse levels by DCT scaling).

Every slide gets coarser levels down to about ``MIN_LEVEL_PX`` computed tile-wise and lazily from
the level above (never by striding level 0), so a zoomed-out view never touches level 0 of a
stored pyramid. A level-0 pixel (row, col) sits at world (row * mpp, col * mpp) µm.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from napari_stgen.errors import SlideReadError
from napari_stgen.io.backends_image import open_image
from napari_stgen.io.backends_openslide import open_openslide
from napari_stgen.io.backends_tiff import open_tiff
from napari_stgen.io.backends_zarr import open_zarr
from napari_stgen.io.dask_tiles import CHUNK_PX, MIN_LEVEL_PX, extend_pyramid, first_line
from napari_stgen.io.limits import MPP_RANGE, check_mpp
from napari_stgen.io.slide_handle import OPENSLIDE_HINT, Slide

__all__ = ["Slide", "open_slide", "sniff", "openslide_available", "OPENSLIDE_HINT", "CHUNK_PX",
           "MIN_LEVEL_PX", "extend_pyramid"]  # fmt: skip

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: Extensions read with OpenSlide when it is installed (TIFF-based ones fall back to tifffile).
OPENSLIDE_EXTS = {".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide"}


# ------------------------------------------------------------------------------------------
def _given_mpp(p: Path, mpp: float | None) -> float | None:
    """``mpp`` as a float, refused unless a plausible positive number of µm per pixel."""
    if mpp is None:
        return None
    try:
        mpp = float(mpp)
    except (TypeError, ValueError):
        raise SlideReadError(f"{p}: mpp must be a number, got {mpp!r}") from None
    if not (math.isfinite(mpp) and mpp > 0):
        raise SlideReadError(f"{p}: mpp must be a positive number of µm per pixel, got {mpp}")
    lo, hi = MPP_RANGE
    if not lo <= mpp <= hi:
        raise SlideReadError(f"{p}: mpp {mpp:g} µm/px is outside the plausible {lo:g}–{hi:g} µm/px")
    return mpp


def _open_backend(p: Path) -> Slide:
    """The backend ``sniff`` picks, its failures as one-line ``SlideReadError`` reasons."""
    kind = sniff(p)
    opener = {"zarr": open_zarr, "openslide": open_openslide, "tiff": _open_tiff_or_openslide,
              "image": open_image}.get(kind)  # fmt: skip
    if opener is None:  # pragma: no cover - sniff raises for unknown content
        raise SlideReadError(f"{p}: unsupported file")
    try:
        return opener(p)
    except SlideReadError:
        raise
    except MemoryError:
        raise SlideReadError(f"{p}: out of memory while opening (corrupt sizes?)") from None
    except RecursionError:
        raise SlideReadError(f"{p}: metadata nested too deeply to read") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure becomes a one-line reason
        why = f"{type(e).__name__}: {first_line(e)}"
        raise SlideReadError(f"{p}: cannot read slide ({why})") from e


def open_slide(path: str | os.PathLike, mpp: float | None = None) -> Slide:
    """Open a whole-slide image lazily; ``mpp`` (µm/px at level 0) overrides the file's.

    Raises ``SlideReadError`` naming the file and the problem.
    """
    p = Path(path).expanduser()
    mpp = _given_mpp(p, mpp)
    if not p.exists():
        raise SlideReadError(f"{p}: no such file or directory")
    slide = _open_backend(p)
    if mpp is not None:
        slide.mpp = mpp
        slide.mpp_source = "argument"
    elif slide.mpp is not None:
        try:
            check_mpp(p, slide.mpp, slide.mpp_source)
        except SlideReadError:
            slide.close()
            raise
    return slide


def _open_tiff_or_openslide(p: Path) -> Slide:
    if p.suffix.lower() in OPENSLIDE_EXTS and openslide_available():
        return open_openslide(p)
    return open_tiff(p)


def openslide_available() -> bool:
    """Whether ``openslide`` (and its library) can be imported."""
    try:
        import openslide  # noqa: F401 - imported only to see whether it loads
    except Exception:  # noqa: BLE001 - missing library raises OSError, not ImportError
        return False
    return True


def sniff(p: Path) -> str:
    """'tiff' | 'zarr' | 'openslide' | 'image' from content; raises SlideReadError otherwise."""
    if p.is_dir():
        if any((p / n).exists() for n in (".zattrs", ".zgroup", ".zarray", "zarr.json")):
            return "zarr"
        if p.suffix.lower() == ".zarr":
            raise SlideReadError(f"{p}: not a zarr store (no .zgroup/.zattrs/zarr.json inside)")
        raise SlideReadError(f"{p}: is a directory, not a slide (expected an OME-Zarr store)")
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(16)
    except OSError as e:
        raise SlideReadError(f"{p}: cannot read file ({e.strerror or e})") from None
    if size == 0:
        raise SlideReadError(f"{p}: file is empty")
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    ext = p.suffix.lower()
    if ext in (".mrxs", ".vms", ".vmu"):
        if not openslide_available():
            raise SlideReadError(f"{p}: {ext} slides need OpenSlide; {OPENSLIDE_HINT}")
        return "openslide"
    if head[:3] == b"\xff\xd8\xff" or head[:8] == b"\x89PNG\r\n\x1a\n":
        return "image"
    if head[:2] == b"BM" or head[:6] in (b"GIF87a", b"GIF89a") or head[:4] == b"RIFF":
        return "image"
    what = {".svs": "an SVS (TIFF) file", ".tif": "a TIFF file", ".tiff": "a TIFF file"}.get(
        ext, "a supported slide (TIFF/SVS/OME-TIFF, OME-Zarr, JPEG/PNG or an OpenSlide format)"
    )
    if ext in OPENSLIDE_EXTS:
        what = f"a {ext} slide"
    raise SlideReadError(f"{p}: not {what} (file starts with {head[:8]!r})")
