"""Slide-wide accumulation of one model's per-tile predictions on one slide (the data model).

:class:`PredictionStore` holds every tile predicted (grid cells, centres µm, expression, gene
codes, uncertainty) so the Codebook, Synthesize and Export widgets read it instead of running
the model again; :func:`napari_stgen.inference.export.store_to_anndata` writes it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np
from psygnal import Signal

from napari_stgen.coords import Grid
from napari_stgen.inference.cache import slide_key

if TYPE_CHECKING:  # type names only
    from napari_stgen.inference.contract import Predictor
    from napari_stgen.io.slide_handle import Slide

__all__ = ["PredictionStore"]


class PredictionStore:
    """Slide-wide accumulation of per-tile predictions of one model on one slide.

    Rows are unique grid cells; adding a cell again overwrites its row. ``changed`` emits
    the (n, 2) cells just added (or an empty array after :meth:`reset`).
    """

    changed = Signal(object)

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.grid: Grid | None = None
        self.genes: list[str] = []
        self.slide_key: str | None = None
        self.model_checksum: str | None = None
        self.model_name: str | None = None
        self.mpp: float | None = None
        self._display_source: Any = None
        self._alloc(0, 0)

    @property
    def display(self) -> dict | None:
        """What the viewer shows of these predictions: ``{gene, contrast_limits, colormap}`` of
        the top-most visible heatmap (exports record it, so a reopened file looks the same)."""
        return self._display_source() if self._display_source is not None else None

    def set_display_source(self, source: Any) -> None:
        """A callable returning :attr:`display` (the Predict widget's layers), or None."""
        self._display_source = source

    def _alloc(self, n_cells: int, n_genes: int, cap: int = 256) -> None:
        self._row_of = np.full(n_cells, -1, dtype=np.int64)
        self._tiles = np.zeros((cap, 2), dtype=np.int64)
        self._expr = np.zeros((cap, n_genes), dtype=np.float32)
        self._code = np.zeros(cap, dtype=np.int64)
        self._unc = np.full(cap, np.nan, dtype=np.float32)
        self._n = 0

    # ---------------------------------------------------------------- identity
    def matches(self, slide_key: str, model_checksum: str, grid: Grid) -> bool:
        """Whether this store holds results of this slide, model and grid."""
        return (
            self.slide_key == slide_key
            and self.model_checksum == model_checksum
            and self.grid == grid
        )

    def reset(
        self,
        grid: Grid | None = None,
        genes: list[str] | None = None,
        slide_key: str | None = None,
        model_checksum: str | None = None,
        model_name: str | None = None,
        mpp: float | None = None,
    ) -> None:
        """Forget all predictions and start a store for a new slide/model/grid."""
        with self._lock:
            self.grid, self.genes = grid, list(genes or [])
            self.slide_key, self.model_checksum, self.model_name = (
                slide_key,
                model_checksum,
                model_name,
            )
            self.mpp = mpp
            n_cells = grid.shape[0] * grid.shape[1] if grid is not None else 0
            self._alloc(n_cells, len(self.genes))
        self.changed.emit(np.zeros((0, 2), dtype=np.int64))

    def ensure(self, slide: Slide, predictor: Predictor, grid: Grid) -> None:
        """Reset unless the store already holds this slide, model and grid."""
        key = slide_key(slide)
        if not self.matches(key, predictor.checksum, grid):
            self.reset(
                grid, list(predictor.genes), key, predictor.checksum, predictor.name, slide.mpp
            )

    # ---------------------------------------------------------------- writing
    def add(
        self,
        tiles: np.ndarray,
        expr: np.ndarray,
        code: np.ndarray,
        uncertainty: np.ndarray | None = None,
    ) -> None:
        """Insert or overwrite predictions of grid cells ``tiles`` (n, 2); ``uncertainty``
        (n,) per tile (NaN when the model gives none)."""
        if self.grid is None:
            raise RuntimeError("PredictionStore.add before reset(grid, genes, ...)")
        tiles = np.asarray(tiles, dtype=np.int64).reshape(-1, 2)
        if len(tiles) == 0:
            return
        expr = np.asarray(expr, dtype=np.float32)
        code = np.asarray(code, dtype=np.int64)
        unc = (
            np.full(len(tiles), np.nan, np.float32)
            if uncertainty is None
            else np.asarray(uncertainty, dtype=np.float32)
        )
        with self._lock:
            flat = tiles[:, 0] * self.grid.shape[1] + tiles[:, 1]
            rows = self._row_of[flat]
            new = rows < 0
            n_new = int(new.sum())
            if self._n + n_new > len(self._tiles):
                cap = max(2 * len(self._tiles), self._n + n_new)
                self._tiles = _grow(self._tiles, cap)
                self._expr = _grow(self._expr, cap)
                self._code = _grow(self._code, cap)
                self._unc = _grow(self._unc, cap, np.nan)
            rows = rows.copy()
            rows[new] = np.arange(self._n, self._n + n_new)
            self._row_of[flat[new]] = rows[new]
            self._tiles[rows] = tiles
            self._expr[rows] = expr
            self._code[rows] = code
            self._unc[rows] = unc
            self._n += n_new
        self.changed.emit(tiles)

    def add_result(self, result: Any) -> None:
        """Add an engine :class:`PartialResult`."""
        self.add(result.tiles, result.expr, result.code, getattr(result, "uncertainty", None))

    # ---------------------------------------------------------------- reading
    def __len__(self) -> int:
        return self._n

    @property
    def tiles(self) -> np.ndarray:
        """(N, 2) grid cells (row, col) of the stored predictions."""
        return self._tiles[: self._n]

    @property
    def expr(self) -> np.ndarray:
        """(N, G) float32 predicted expression (the model's normalization)."""
        return self._expr[: self._n]

    @property
    def code(self) -> np.ndarray:
        """(N,) int64 gene-code index per tile."""
        return self._code[: self._n]

    @property
    def uncertainty(self) -> np.ndarray:
        """(N,) float32 per-tile uncertainty, larger = less sure (NaN: none given)."""
        return self._unc[: self._n]

    @property
    def has_uncertainty(self) -> bool:
        """Whether any stored tile has an uncertainty (GenST predictions; HistoTx none)."""
        return bool(np.isfinite(self.uncertainty).any())

    @property
    def centres_um(self) -> np.ndarray:
        """(N, 2) world (y, x) µm of the tile centres."""
        if self.grid is None:
            return np.zeros((0, 2))
        return np.asarray(self.grid.origin_um) + (self.tiles + 0.5) * self.grid.tile_um

    @property
    def xy_px(self) -> np.ndarray:
        """(N, 2) level-0 pixel (x, y) of the tile centres (AnnData ``obsm['spatial']``)."""
        if not self.mpp:
            raise RuntimeError("store has no slide µm/px")
        return self.centres_um[:, ::-1] / self.mpp

    @property
    def tile_ids(self) -> list[str]:
        """Stable tile names ``tile_<row>_<col>`` (AnnData ``obs_names``)."""
        return [f"tile_{r}_{c}" for r, c in self.tiles]

    def gene_index(self, gene: str) -> int:
        """Column of ``gene`` in :attr:`expr` (KeyError naming the gene if absent)."""
        try:
            return self.genes.index(gene)
        except ValueError:
            raise KeyError(f"gene {gene!r} is not in the model's panel") from None

    def rows_of(self, tiles: np.ndarray) -> np.ndarray:
        """Store rows of grid cells ``tiles`` (-1 where not predicted)."""
        tiles = np.asarray(tiles, dtype=np.int64).reshape(-1, 2)
        if self.grid is None or len(tiles) == 0:
            return np.full(len(tiles), -1, dtype=np.int64)
        return self._row_of[tiles[:, 0] * self.grid.shape[1] + tiles[:, 1]]

    def rows_in_region(self, region_um: tuple[float, float, float, float]) -> np.ndarray:
        """Rows whose tile centre lies in world (x0, y0, x1, y1) µm."""
        x0, y0, x1, y1 = region_um
        c = self.centres_um
        sel = (c[:, 1] >= x0) & (c[:, 1] < x1) & (c[:, 0] >= y0) & (c[:, 0] < y1)
        return np.flatnonzero(sel)

    def canvas(
        self, values: np.ndarray, fill: float = np.nan, dtype: Any = np.float32
    ) -> np.ndarray:
        """Slide-wide grid image (rows, cols) with ``values`` (N,) at the stored cells."""
        assert self.grid is not None
        out = np.full(self.grid.shape, fill, dtype=dtype)
        t = self.tiles
        out[t[:, 0], t[:, 1]] = values
        return out


def _grow(a: np.ndarray, cap: int, fill: float = 0) -> np.ndarray:
    out = np.full((cap,) + a.shape[1:], fill, dtype=a.dtype)
    out[: len(a)] = a
    return out
