"""Sanity limits checked when a file is opened, before any array is built.

A hostile or broken file can declare any size; these checks turn absurd declarations into a
``SlideReadError`` naming the file and the value, cheaply, from metadata alone. The limits are
module constants, overridable with environment variables (read at each check):

=========================  ======================  =========================================
constant                   environment variable    meaning
=========================  ======================  =========================================
``MAX_SIDE_PX``            ``STGEN_MAX_SIDE_PX``   longest side of a level (px)
``MAX_PIXELS``             ``STGEN_MAX_PIXELS``    pixels of a level
``MAX_TILE_PX``            ``STGEN_MAX_TILE_PX``   edge of one stored tile / chunk (px)
``MAX_CHUNK_BYTES``        ``STGEN_MAX_CHUNK_BYTES``  decoded bytes of one tile / chunk
``MAX_TILES``              ``STGEN_MAX_TILES``     tiles (chunks) of one level
``MAX_IMAGE_PIXELS``       ``STGEN_MAX_IMAGE_PIXELS``  pixels of a plain JPEG/PNG decoded whole
=========================  ======================  =========================================

µm per pixel outside ``MPP_RANGE`` is refused (the value is named; ``mpp=`` / ``--mpp``
overrides the file's).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from napari_stgen.errors import SlideReadError

MAX_SIDE_PX = 1_000_000
MAX_PIXELS = 10**11
MAX_TILE_PX = 16_384
MAX_CHUNK_BYTES = 256 * 2**20
MAX_TILES = 2 * 2**20
MAX_IMAGE_PIXELS = 10**8
#: Plausible µm per level-0 pixel of a microscope slide (40× scanners ≈ 0.25, 1× ≈ 10).
MPP_RANGE = (0.05, 50.0)


def limit(name: str) -> int:
    """The limit ``name`` (e.g. 'MAX_SIDE_PX'), from ``STGEN_<name>`` when set."""
    v = os.environ.get(f"STGEN_{name}")
    if v:
        try:
            return int(float(v))
        except ValueError:
            pass
    return int(globals()[name])


def check_level_shape(path: Path | str, level: int, shape: Sequence[int]) -> None:
    """Refuse a level whose declared (height, width) is empty or past the size limits."""
    h, w = (int(v) for v in shape[:2])
    where = f"{path}: level {level}"
    if h <= 0 or w <= 0:
        raise SlideReadError(f"{where} declares an empty image ({w} × {h} px)")
    side, pixels = limit("MAX_SIDE_PX"), limit("MAX_PIXELS")
    if max(h, w) > side or h * w > pixels:
        raise SlideReadError(
            f"{where} declares {w} × {h} px, past the limit of {side:,} px a side / "
            f"{pixels:.0e} pixels (set STGEN_MAX_SIDE_PX / STGEN_MAX_PIXELS to raise it)"
        )


def check_tiling(
    path: Path | str,
    level: int,
    shape: Sequence[int],
    tile: Sequence[int],
    itemsize: int,
    *,
    what: str = "tile",
    multiple: int = 1,
    min_edge: int = 1,
) -> None:
    """Refuse tiles (or chunks) that are empty, absurdly large or so small the level has
    too many of them. ``multiple`` is the edge multiple the format demands (16 for TIFF tiles;
    with it the edge is also capped at ``MAX_TILE_PX``); strips pass their clipped height.
    ``min_edge``: smaller tiles are refused unless they span the whole image along that axis."""
    th, tw = (int(v) for v in tile[:2])
    h, w = (int(v) for v in shape[:2])
    where = f"{path}: level {level}"
    if th <= 0 or tw <= 0:
        raise SlideReadError(f"{where}: {what} size {tw} × {th} px is not positive")
    if (th < min_edge and th < h) or (tw < min_edge and tw < w):
        raise SlideReadError(
            f"{where}: {what}s of {tw} × {th} px are too small to read (corrupt metadata?)"
        )
    if multiple > 1 and (th % multiple or tw % multiple):
        raise SlideReadError(
            f"{where}: {what} size {tw} × {th} px is not a multiple of {multiple} "
            "(corrupt tile tags)"
        )
    if multiple > 1 and max(th, tw) > limit("MAX_TILE_PX"):
        raise SlideReadError(
            f"{where}: {what} size {tw} × {th} px is past the limit of {limit('MAX_TILE_PX')} px"
        )
    nbytes = th * tw * int(itemsize)  # decoders allocate the whole declared tile
    if nbytes > limit("MAX_CHUNK_BYTES"):
        raise SlideReadError(
            f"{where}: one {what} ({tw} × {th} px) would decode to {nbytes / 2**20:,.0f} MiB, "
            f"past the limit of {limit('MAX_CHUNK_BYTES') / 2**20:,.0f} MiB"
        )
    n = math.ceil(h / th) * math.ceil(w / tw)
    if n > limit("MAX_TILES"):
        raise SlideReadError(
            f"{where}: {n:,} {what}s of {tw} × {th} px, past the limit of "
            f"{limit('MAX_TILES'):,} (corrupt tile size?)"
        )


def check_pyramid(path: Path | str, shapes: Sequence[Sequence[int]]) -> None:
    """Refuse levels (largest first) that grow, or whose Y and X downsamples disagree."""
    h0, w0 = (int(v) for v in shapes[0][:2])
    for k, s in enumerate(shapes[1:], start=1):
        h, w = (int(v) for v in s[:2])
        if h > h0 or w > w0:
            raise SlideReadError(
                f"{path}: level {k} ({w} × {h} px) is larger than level 0 ({w0} × {h0} px) "
                "along one axis"
            )
        dy, dx = h0 / h, w0 / w
        # each axis may be off by a pixel of rounding at that level
        tol = max(0.02, 2.0 / min(h, w))
        if abs(dy - dx) / dx > tol:
            raise SlideReadError(
                f"{path}: level {k} ({w} × {h} px) is not a downsample of level 0 "
                f"({w0} × {h0} px): x {dx:.3g}×, y {dy:.3g}×"
            )


def check_mpp(path: Path | str, mpp: float, source: str | None) -> float:
    """Return ``mpp`` if finite and within ``MPP_RANGE``, else a SlideReadError naming it."""
    lo, hi = MPP_RANGE
    try:
        v = float(mpp)
    except (TypeError, ValueError):
        raise SlideReadError(f"{path}: µm per pixel {mpp!r} is not a number") from None
    if not (math.isfinite(v) and lo <= v <= hi):
        src = f" ({source})" if source else ""
        raise SlideReadError(
            f"{path}: resolution {v:g} µm/px{src} is outside the plausible {lo:g}–{hi:g} µm/px; "
            "pass mpp= (µm/px) with the right value"
        )
    return v
