"""The one world space of napari-stgen: micrometres.

A slide level-0 pixel (row, col) sits at world (row * mpp, col * mpp). Pyramid level k
multiplies the scale by its downsample. Every layer (slide, heatmaps, spots, code maps,
ROIs, generated tiles) is placed with ``scale``/``translate`` in µm built here, never by
resampling into slide pixels. Pixel (r, c) of an image layer covers world
[translate + r*scale, translate + (r+1)*scale): napari puts the *centre* of pixel 0 at
``translate``, so grid layers whose cells start at a µm corner use
``translate = corner + scale / 2``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

UNIT = "um"


def level_scale(mpp: float, downsample: float = 1.0) -> tuple[float, float]:
    """napari ``scale`` (row, col) in µm per pixel for a pyramid level."""
    s = float(mpp) * float(downsample)
    return (s, s)


def px_to_um(xy_px: np.ndarray, mpp: float) -> np.ndarray:
    """Level-0 pixel coordinates (any shape, last axis x/y or row/col) to µm."""
    return np.asarray(xy_px, dtype=np.float64) * float(mpp)


def um_to_px(xy_um: np.ndarray, mpp: float) -> np.ndarray:
    """µm to level-0 pixel coordinates."""
    return np.asarray(xy_um, dtype=np.float64) / float(mpp)


def xy_to_rc(xy: np.ndarray) -> np.ndarray:
    """(x, y) columns to napari's (row, col) = (y, x) order."""
    xy = np.asarray(xy)
    return xy[..., ::-1].copy()


@dataclass(frozen=True)
class Grid:
    """A regular grid of square tiles in µm, e.g. a model's patch grid over a region.

    ``origin_um`` is the (y, x) world position of the top-left corner of cell (0, 0);
    ``tile_um`` the cell edge; ``shape`` the number of (rows, cols).
    """

    origin_um: tuple[float, float]
    tile_um: float
    shape: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        """napari ``scale`` of an image whose pixels are the grid cells."""
        return (self.tile_um, self.tile_um)

    @property
    def translate(self) -> tuple[float, float]:
        """napari ``translate`` so pixel (0, 0) covers cell (0, 0) exactly."""
        h = self.tile_um / 2.0
        return (self.origin_um[0] + h, self.origin_um[1] + h)

    def to_record(self) -> dict:
        """The grid as stored in ``uns['stgen']['grid']`` / layer metadata."""
        return {
            "origin_yx_um": np.asarray(self.origin_um, dtype=np.float64),
            "tile_um": float(self.tile_um),
            "shape": np.asarray(self.shape, dtype=np.int64),
        }

    @classmethod
    def from_record(cls, rec: Mapping) -> Grid:
        """The grid of a :meth:`to_record` mapping (as read back from an h5ad)."""
        o = np.asarray(rec["origin_yx_um"], dtype=np.float64).ravel()
        shape = np.asarray(rec["shape"]).ravel()
        return cls(
            (float(o[0]), float(o[1])), float(rec["tile_um"]), (int(shape[0]), int(shape[1]))
        )

    def centres_um(self) -> np.ndarray:
        """(rows*cols, 2) array of cell centres (y, x) in µm, row-major."""
        r, c = np.meshgrid(np.arange(self.shape[0]), np.arange(self.shape[1]), indexing="ij")
        y = self.origin_um[0] + (r.ravel() + 0.5) * self.tile_um
        x = self.origin_um[1] + (c.ravel() + 0.5) * self.tile_um
        return np.stack([y, x], axis=1)
