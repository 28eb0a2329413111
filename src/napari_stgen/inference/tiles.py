"""Slide-global tile grids at a model's patch size, ROI selection, tissue mask and block reads.

The grid of a slide starts at world (0, 0) µm and has cells of ``tile_um``: cell (r, c)
covers y in [r·t, (r+1)·t) and x in [c·t, (c+1)·t) µm. Every view, ROI and whole-slide run
uses the same grid, so tiles coincide across views and their cache keys are stable.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from napari_stgen.coords import Grid
from napari_stgen.errors import SlideReadError, StgenError
from napari_stgen.inference.cache import slide_key
from napari_stgen.inference.contract import Predictor
from napari_stgen.inference.patches import _resize, stained_pixels
from napari_stgen.io.slide import Slide

__all__ = [
    "tile_um_of",
    "slide_grid",
    "tile_centres_um",
    "tiles_in_region",
    "tiles_in_shapes",
    "tiles_in_labels",
    "tissue_pixels",
    "otsu_threshold",
    "tissue_cells",
    "filter_tissue",
    "read_tiles",
    "split_blocks",
    "visible_region_um",
    "read_or_skip",
]


def _mpp(slide: Slide) -> float:
    if slide.mpp is None:
        raise StgenError(
            f"{slide.path}: slide has no µm/px resolution; reopen it with an explicit mpp"
        )
    return float(slide.mpp)


def tile_um_of(predictor: Predictor) -> float:
    """Edge (µm) of the grid cell a model predicts for: its spot, not its context window.

    A card's ``tile_um`` wins; a multiscale GenST (centre crop + whole-patch context) predicts
    for the central half of its ``patch_um`` window; otherwise the whole patch.
    """
    t = getattr(predictor, "tile_um", None)
    card = getattr(predictor, "card", None) or {}
    t = t or card.get("tile_um")
    if t:
        return float(t)
    if (card.get("architecture") or {}).get("multiscale"):
        return float(predictor.patch_um) / 2.0
    return float(predictor.patch_um)


def slide_grid(slide: Slide, tile_um: float) -> Grid:
    """The slide-wide grid of ``tile_um`` cells anchored at world (0, 0) µm."""
    mpp = _mpp(slide)
    rows = max(1, math.ceil(slide.height * mpp / tile_um))
    cols = max(1, math.ceil(slide.width * mpp / tile_um))
    return Grid(origin_um=(0.0, 0.0), tile_um=float(tile_um), shape=(rows, cols))


def tile_centres_um(grid: Grid, tiles: np.ndarray) -> np.ndarray:
    """(N, 2) world centres (y, x) in µm of grid cells ``tiles`` (N, 2) = (row, col)."""
    tiles = np.asarray(tiles, dtype=np.float64).reshape(-1, 2)
    return np.asarray(grid.origin_um) + (tiles + 0.5) * grid.tile_um


def _all_tiles(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    if r1 <= r0 or c1 <= c0:
        return np.zeros((0, 2), dtype=np.int64)
    r, c = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
    return np.stack([r.ravel(), c.ravel()], axis=1).astype(np.int64)


def tiles_in_region(grid: Grid, region_um: Sequence[float]) -> np.ndarray:
    """Cells (row, col) overlapping ``region_um = (x0, y0, x1, y1)`` µm, clipped to the grid."""
    x0, y0, x1, y1 = (float(v) for v in region_um)
    if x1 < x0:
        x0, x1 = x1, x0
    if y1 < y0:
        y0, y1 = y1, y0
    t = grid.tile_um
    oy, ox = grid.origin_um
    r0 = max(0, math.floor((y0 - oy) / t))
    c0 = max(0, math.floor((x0 - ox) / t))
    r1 = min(grid.shape[0], math.ceil((y1 - oy) / t))
    c1 = min(grid.shape[1], math.ceil((x1 - ox) / t))
    return _all_tiles(r0, r1, c0, c1)


def _inside_ellipse(pts: np.ndarray, corners: np.ndarray) -> np.ndarray:
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    centre, radius = (lo + hi) / 2.0, np.maximum((hi - lo) / 2.0, 1e-12)
    return (((pts - centre) / radius) ** 2).sum(axis=1) <= 1.0


def tiles_in_shapes(grid: Grid, shapes: Sequence[tuple[str, np.ndarray]]) -> np.ndarray:
    """Cells whose centre falls inside any of ``shapes``.

    ``shapes`` is a list of ``(shape_type, vertices)`` with vertices (K, 2) in world µm
    (y, x) as napari gives them; 'rectangle' and 'polygon' are polygons, 'ellipse' uses its
    bounding box; lines and paths enclose nothing and are ignored.
    """
    from matplotlib.path import Path as MplPath

    keep = np.zeros(grid.shape[0] * grid.shape[1], dtype=bool)
    allt = _all_tiles(0, grid.shape[0], 0, grid.shape[1])
    for shape_type, verts in shapes:
        verts = np.asarray(verts, dtype=np.float64)[:, -2:]
        if shape_type in ("line", "path") or len(verts) < 3:
            continue
        lo, hi = verts.min(axis=0), verts.max(axis=0)
        cand = tiles_in_region(grid, (lo[1], lo[0], hi[1], hi[0]))
        if len(cand) == 0:
            continue
        pts = tile_centres_um(grid, cand)
        if shape_type == "ellipse":
            inside = _inside_ellipse(pts, verts)
        else:
            inside = MplPath(verts).contains_points(pts)
        keep[cand[inside, 0] * grid.shape[1] + cand[inside, 1]] = True
    return allt[keep]


def tiles_in_labels(
    grid: Grid,
    labels: np.ndarray,
    scale: Sequence[float] = (1.0, 1.0),
    translate: Sequence[float] = (0.0, 0.0),
    label: int | None = None,
) -> np.ndarray:
    """Cells whose centre falls on a non-zero (or ``label``) pixel of a 2D labels image.

    ``scale``/``translate`` are the labels layer's (y, x) world transform in µm (napari
    convention: pixel (0, 0) is centred at ``translate``).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise StgenError(f"ROI labels must be 2D, got shape {labels.shape}")
    allt = _all_tiles(0, grid.shape[0], 0, grid.shape[1])
    pts = tile_centres_um(grid, allt)
    idx = np.round((pts - np.asarray(translate[-2:])) / np.asarray(scale[-2:])).astype(np.int64)
    ok = (idx >= 0).all(axis=1) & (idx[:, 0] < labels.shape[0]) & (idx[:, 1] < labels.shape[1])
    vals = np.zeros(len(allt), dtype=labels.dtype)
    vals[ok] = labels[idx[ok, 0], idx[ok, 1]]
    sel = vals != 0 if label is None else vals == label
    return allt[sel]


# ---------------------------------------------------------------- tissue mask
_mask_lock = threading.Lock()
_mask_cache: dict[tuple, np.ndarray] = {}


SMUDGE_SAT = 0.12  # stained tissue on the sample: 0.20–0.40; a grey smudge on its glass 0.07
SMUDGE_DETAIL = 3.0  # mean |Laplacian| (grey levels): tissue 17–37; the smudge 0.5


def tissue_pixels(rgb: np.ndarray) -> np.ndarray:
    """Tissue pixels of a slide overview: stained and darker than the slide's background.

    Stained = ``napari_stgen.inference.patches.stained_pixels`` (saturated or dark); darker =
    grey level below an Otsu threshold of the overview clipped to [180, 215], which drops
    faintly tinted glass (eosin haze around a section) that a fixed saturation cut keeps.
    Connected pieces that are both grey (mean saturation < ``SMUDGE_SAT``) and featureless
    (mean |Laplacian| < ``SMUDGE_DETAIL``: no nuclei, out of focus) are dropped: a smudge or
    dust on the glass. Stained tissue, however small, is coloured and textured.
    """
    p = np.asarray(rgb)[..., :3]
    gray = p.astype(np.float32).mean(-1)
    t = otsu_threshold(gray)
    mask = stained_pixels(rgb) & (gray < min(max(t, 180.0), 215.0))
    lab, n = ndi.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return mask
    idx = np.arange(1, n + 1)
    hi = np.asarray(ndi.mean(p.max(-1), lab, idx))  # per piece: mean max and min channel
    lo = np.asarray(ndi.mean(p.min(-1), lab, idx))
    grey = idx[(hi - lo) / np.maximum(hi, 1.0) < SMUDGE_SAT]
    boxes = ndi.find_objects(lab)
    for k in grey:  # only grey pieces: is there any detail (nuclei) in them?
        box = boxes[k - 1]
        pad = tuple(slice(max(b.start - 2, 0), b.stop + 2) for b in box)
        detail = np.abs(ndi.laplace(ndi.gaussian_filter(gray[pad], 0.7)))
        piece = lab[pad] == k
        if detail[piece].mean() < SMUDGE_DETAIL:
            mask[pad] &= ~piece
    return mask


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of 8-bit-range values (maximises the between-class variance)."""
    hist, edges = np.histogram(np.asarray(values).ravel(), bins=bins, range=(0.0, 256.0))
    p = hist.astype(np.float64)
    if p.sum() == 0:
        return 128.0
    centres = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(p)
    w1 = w0[-1] - w0
    m0 = np.cumsum(p * centres)
    mu0 = m0 / np.maximum(w0, 1e-12)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def tissue_cells(
    slide: Slide, grid: Grid, min_fraction: float = 0.1, max_px: int = 2048
) -> np.ndarray:
    """Per-cell tissue flag (rows, cols) from a coarse thumbnail, computed once per slide.

    A cell is tissue when at least ``min_fraction`` of its thumbnail pixels are tissue by
    :func:`tissue_pixels`.
    """
    key = (slide_key(slide), grid, float(min_fraction), int(max_px))
    with _mask_lock:
        hit = _mask_cache.get(key)
    if hit is not None:
        return hit
    thumb = np.asarray(slide.thumbnail(max_px=max_px))[..., :3]
    th, tw = thumb.shape[:2]
    tissue = tissue_pixels(thumb)
    mpp = _mpp(slide)
    # world µm of each thumbnail pixel centre (the thumbnail spans the whole level-0 image)
    ys = (np.arange(th) + 0.5) * (slide.height / th) * mpp
    xs = (np.arange(tw) + 0.5) * (slide.width / tw) * mpp
    rr = np.clip(((ys - grid.origin_um[0]) // grid.tile_um).astype(np.int64), 0, grid.shape[0] - 1)
    cc = np.clip(((xs - grid.origin_um[1]) // grid.tile_um).astype(np.int64), 0, grid.shape[1] - 1)
    cell = (rr[:, None] * grid.shape[1] + cc[None, :]).ravel()
    n = grid.shape[0] * grid.shape[1]
    tot = np.bincount(cell, minlength=n)
    hit = np.bincount(cell, weights=tissue.ravel().astype(np.float64), minlength=n)
    frac = np.where(tot > 0, hit / np.maximum(tot, 1), 0.0)
    mask = (frac >= min_fraction).reshape(grid.shape)
    with _mask_lock:
        if len(_mask_cache) > 16:
            _mask_cache.clear()
        _mask_cache[key] = mask
    return mask


def filter_tissue(
    slide: Slide, grid: Grid, tiles: np.ndarray, min_fraction: float = 0.1
) -> np.ndarray:
    """Keep only the cells of ``tiles`` flagged as tissue by :func:`tissue_cells`."""
    tiles = np.asarray(tiles, dtype=np.int64).reshape(-1, 2)
    if len(tiles) == 0:
        return tiles
    mask = tissue_cells(slide, grid, min_fraction=min_fraction)
    return tiles[mask[tiles[:, 0], tiles[:, 1]]]


# ---------------------------------------------------------------- reading
def split_blocks(tiles: np.ndarray, block: int = 24) -> list[np.ndarray]:
    """Group cells into square blocks of ``block``×``block`` cells (one read each), row-major.

    Blocks start at the top-left cell of ``tiles``, so a region of up to ``block`` cells a
    side is read at once.
    """
    tiles = np.asarray(tiles, dtype=np.int64).reshape(-1, 2)
    if len(tiles) == 0:
        return []
    b = (tiles - tiles.min(axis=0)) // block
    order = np.lexsort((tiles[:, 1], tiles[:, 0], b[:, 1], b[:, 0]))
    tiles, b = tiles[order], b[order]
    key = b[:, 0] * (int(b[:, 1].max()) + 1) + b[:, 1]
    cuts = np.flatnonzero(np.diff(key)) + 1
    return np.split(tiles, cuts)


def _level_for(slide: Slide, target_mpp: float) -> int:
    # same rule as read_patches: coarsest level with mpp*ds <= target (5 % tolerance)
    level = 0
    for k, d in enumerate(slide.downsamples):
        if _mpp(slide) * d <= target_mpp * 1.05:
            level = k
    return level


def read_tiles(
    slide: Slide, grid: Grid, tiles: np.ndarray, out_px: int, patch_um: float | None = None
) -> np.ndarray:
    """Patches of ``patch_um`` (default: the cell size) centred on cells, one read in all.

    Returns uint8 (N, out_px, out_px, 3), pixel-identical to ``read_patches(slide, centres,
    patch_um, out_px)`` on the cell centres (same level choice, integer windows and
    resampling), but the level is read once for the bounding box of all windows instead of
    once per tile. A patch larger than the cell carries context around it.
    """
    tiles = np.asarray(tiles, dtype=np.int64).reshape(-1, 2)
    out = np.empty((len(tiles), out_px, out_px, 3), dtype=np.uint8)
    if len(tiles) == 0:
        return out
    mpp = _mpp(slide)
    patch_um = float(patch_um or grid.tile_um)
    level = _level_for(slide, patch_um / out_px)
    arr = slide.levels[level]
    dy, dx = slide.height / arr.shape[0], slide.width / arr.shape[1]
    c = tile_centres_um(grid, tiles)[:, ::-1] / mpp  # level-0 (x, y) px
    size0 = patch_um / mpp
    x0 = np.round(c[:, 0] - size0 / 2).astype(np.int64)
    y0 = np.round(c[:, 1] - size0 / 2).astype(np.int64)
    s0 = int(round(size0))
    # level-k windows exactly as Slide.read_region computes them
    lx0 = np.floor(x0 / dx).astype(np.int64)
    ly0 = np.floor(y0 / dy).astype(np.int64)
    w = max(1, int(round(s0 / dx)))
    h = max(1, int(round(s0 / dy)))
    bx0, by0 = int(lx0.min()), int(ly0.min())
    bx1, by1 = int(lx0.max()) + w, int(ly0.max()) + h
    region = _crop_level(arr, bx0, by0, bx1, by1)
    for i in range(len(tiles)):
        ox, oy = int(lx0[i] - bx0), int(ly0[i] - by0)
        out[i] = _resize(region[oy : oy + h, ox : ox + w], out_px)
    return out


def _crop_level(arr: Any, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """``arr[y0:y1, x0:x1]`` of a lazy level as uint8 RGB, white outside, one compute."""
    h, w = arr.shape[:2]
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    out = np.full((y1 - y0, x1 - x0, 3), 255, dtype=np.uint8)
    if sx1 > sx0 and sy1 > sy0:
        sub = arr[sy0:sy1, sx0:sx1, :3]
        data = sub.compute(scheduler="threads") if hasattr(sub, "compute") else sub
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = np.asarray(data)
    return out


def visible_region_um(
    center_yx: Sequence[float], zoom: float, canvas_hw: Sequence[int]
) -> tuple[float, float, float, float]:
    """World rectangle (x0, y0, x1, y1) µm seen by a 2D camera (centre, zoom, canvas size)."""
    cy, cx = float(center_yx[-2]), float(center_yx[-1])
    hh = float(canvas_hw[0]) / (2.0 * zoom)
    hw = float(canvas_hw[1]) / (2.0 * zoom)
    return (cx - hw, cy - hh, cx + hw, cy + hh)


def read_or_skip(
    read: Any, index: np.ndarray, skip: bool, unreadable: np.ndarray, out_px: int
) -> np.ndarray:
    """``read(index)`` (patches for rows ``index``); with ``skip``, a SlideReadError makes
    each row be read alone, and rows that still fail become white patches flagged in
    ``unreadable`` (a bool array over all rows), instead of stopping the prediction."""
    try:
        return read(index)
    except SlideReadError:
        if not skip:
            raise
    out = np.full((len(index), out_px, out_px, 3), 255, dtype=np.uint8)
    for k, i in enumerate(index):
        try:
            out[k] = read(np.asarray([i]))[0]
        except SlideReadError:
            unreadable[i] = True
    return out
