"""Synthesis geometry: a world rectangle snapped to model pixels and covered by tiles.

:func:`plan_region` lays out the tiles (overlapping by a multiple of the autoencoder's latent
factor, centred on the region); :func:`overlap_weights` maps tile footprints onto the
slide's prediction grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from napari_stgen.coords import Grid
from napari_stgen.errors import StgenError

__all__ = [
    "LATENT_FACTOR",
    "SynthesisPlan",
    "snap_region",
    "point_region",
    "plan_region",
    "overlap_weights",
]

LATENT_FACTOR = 4  # the v1 tile autoencoder downsamples ×4 (v2: ×8; pass ``latent_factor``)


def snap_region(region_um: Sequence[float], px_um: float) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) µm, ordered and rounded to multiples of ``px_um`` (at least 1 px)."""
    x0, y0, x1, y1 = (float(v) for v in region_um)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise StgenError(f"region must be finite µm coordinates, got {tuple(region_um)}")
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    p = float(px_um)
    sx0, sy0 = round(x0 / p) * p, round(y0 / p) * p
    sx1 = max(round(x1 / p) * p, sx0 + p)
    sy1 = max(round(y1 / p) * p, sy0 + p)
    return (sx0, sy0, sx1, sy1)


def point_region(yx_um: Sequence[float], tile_um: float) -> tuple[float, float, float, float]:
    """The one-tile region (x0, y0, x1, y1) µm centred on a clicked world point (y, x)."""
    y, x = float(yx_um[-2]), float(yx_um[-1])
    h = float(tile_um) / 2.0
    return (x - h, y - h, x + h, y + h)


@dataclass(frozen=True)
class SynthesisPlan:
    """Tiles covering a region: pixel layout of the generation canvas at ``px_um`` µm/px.

    The canvas (``canvas_hw`` px) is at least the region (``out_hw`` px) and centred on it;
    ``offset`` (y, x) px is the region's top-left inside the canvas; tile ``i`` covers canvas
    pixels ``tile_yx[i] + [0, tile_px)``.
    """

    region_um: tuple[float, float, float, float]
    px_um: float
    tile_px: int
    overlap_px: int
    out_hw: tuple[int, int]
    canvas_hw: tuple[int, int]
    offset: tuple[int, int]
    tile_yx: np.ndarray  # (N, 2) int canvas px

    @property
    def n_tiles(self) -> int:
        return len(self.tile_yx)

    @property
    def tile_um(self) -> float:
        return self.tile_px * self.px_um

    @property
    def stride_px(self) -> int:
        return self.tile_px - self.overlap_px

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(rows, cols) of tiles."""
        ys, xs = np.unique(self.tile_yx[:, 0]), np.unique(self.tile_yx[:, 1])
        return (len(ys), len(xs))

    @property
    def origin_yx_um(self) -> tuple[float, float]:
        """World (y, x) µm of the region's top-left corner."""
        return (self.region_um[1], self.region_um[0])

    @property
    def canvas_origin_yx_um(self) -> tuple[float, float]:
        """World (y, x) µm of the canvas's top-left corner."""
        oy, ox = self.origin_yx_um
        return (oy - self.offset[0] * self.px_um, ox - self.offset[1] * self.px_um)

    def tile_boxes_um(self) -> np.ndarray:
        """(N, 4) world (x0, y0, x1, y1) µm footprint of each tile."""
        cy, cx = self.canvas_origin_yx_um
        y0 = cy + self.tile_yx[:, 0] * self.px_um
        x0 = cx + self.tile_yx[:, 1] * self.px_um
        t = self.tile_um
        return np.stack([x0, y0, x0 + t, y0 + t], axis=1)

    def tile_centres_um(self) -> np.ndarray:
        """(N, 2) world (y, x) µm of the tile centres."""
        b = self.tile_boxes_um()
        return np.stack([(b[:, 1] + b[:, 3]) / 2, (b[:, 0] + b[:, 2]) / 2], axis=1)

    def layer_transform(self) -> dict[str, tuple[float, float]]:
        """napari ``scale``/``translate`` placing an ``out_hw`` image exactly on the region."""
        s = self.px_um
        oy, ox = self.origin_yx_um
        return {"scale": (s, s), "translate": (oy + s / 2.0, ox + s / 2.0)}


def _axis(n_px: int, tile: int, stride: int) -> tuple[int, int, np.ndarray]:
    n = 1 if n_px <= tile else math.ceil((n_px - tile) / stride) + 1
    canvas = tile + (n - 1) * stride
    return canvas, (canvas - n_px) // 2, np.arange(n) * stride


def plan_region(
    region_um: Sequence[float],
    px_um: float,
    tile_px: int,
    overlap_px: int | None = None,
    max_tiles: int = 400,
    latent_factor: int = LATENT_FACTOR,
) -> SynthesisPlan:
    """Tiles of ``tile_px`` at ``px_um`` µm/px covering ``region_um`` (x0, y0, x1, y1) µm.

    The region is snapped to whole pixels (:func:`snap_region`). ``overlap_px`` (default a
    quarter tile) is rounded to ``latent_factor`` (the autoencoder's down-sampling) and must
    leave a positive stride. StgenError above ``max_tiles`` tiles.
    """
    tile_px = int(tile_px)
    f = int(latent_factor)
    if overlap_px is None:
        overlap_px = tile_px // 4
    ov = int(round(overlap_px / f)) * f
    if tile_px % f or not 0 <= ov < tile_px:
        raise StgenError(f"overlap {overlap_px} px must be in [0, {tile_px}) (tile {tile_px} px)")
    reg = snap_region(region_um, px_um)
    h = int(round((reg[3] - reg[1]) / px_um))
    w = int(round((reg[2] - reg[0]) / px_um))
    ch, oy, ys = _axis(h, tile_px, tile_px - ov)
    cw, ox, xs = _axis(w, tile_px, tile_px - ov)
    if len(ys) * len(xs) > max_tiles:
        raise StgenError(
            f"region {w * px_um:.0f} × {h * px_um:.0f} µm needs {len(ys) * len(xs)} tiles "
            f"(limit {max_tiles}); draw a smaller region"
        )
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    tiles = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.int64)
    return SynthesisPlan(reg, float(px_um), tile_px, ov, (h, w), (ch, cw), (oy, ox), tiles)


def overlap_weights(grid: Grid, boxes_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grid cells overlapped by world boxes (K, 4) (x0, y0, x1, y1) and the overlap areas.

    Returns ``cells`` (M, 2) (row, col), unique, inside the grid, and ``w`` (K, M) µm².
    """
    boxes = np.asarray(boxes_um, dtype=np.float64).reshape(-1, 4)
    t = grid.tile_um
    oy, ox = grid.origin_um
    per: list[tuple[np.ndarray, np.ndarray]] = []
    for x0, y0, x1, y1 in boxes:
        r0 = max(0, math.floor((y0 - oy) / t))
        r1 = min(grid.shape[0], math.ceil((y1 - oy) / t))
        c0 = max(0, math.floor((x0 - ox) / t))
        c1 = min(grid.shape[1], math.ceil((x1 - ox) / t))
        if r1 <= r0 or c1 <= c0:
            per.append((np.zeros((0, 2), np.int64), np.zeros(0)))
            continue
        rr, cc = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
        rr, cc = rr.ravel(), cc.ravel()
        hy = np.minimum(y1, oy + (rr + 1) * t) - np.maximum(y0, oy + rr * t)
        hx = np.minimum(x1, ox + (cc + 1) * t) - np.maximum(x0, ox + cc * t)
        area = np.clip(hy, 0, None) * np.clip(hx, 0, None)
        keep = area > 0
        per.append((np.stack([rr[keep], cc[keep]], 1).astype(np.int64), area[keep]))
    allc = [c for c, _ in per if len(c)]
    if not allc:
        return np.zeros((0, 2), np.int64), np.zeros((len(boxes), 0))
    cells, inv = np.unique(np.concatenate(allc), axis=0, return_inverse=True)
    w = np.zeros((len(boxes), len(cells)))
    k = 0
    for i, (c, a) in enumerate(per):
        w[i, inv.ravel()[k : k + len(c)]] = a
        k += len(c)
    return cells, w
