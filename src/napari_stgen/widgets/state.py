"""Per-viewer shared state of the napari-stgen widgets (psygnal signals, no Qt).

``get_state(viewer)`` returns the one :class:`StgenState` of a viewer. It holds the slide
layer and its opened slide, the model name (and loaded predictors), code names, and the
:class:`PredictionStore`: every tile predicted in this viewer (tile indices, centres µm,
expression, gene codes), accumulated across views, which the Codebook, Synthesize and
Export widgets read instead of running the model again.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np
from psygnal import Signal

from napari_stgen.coords import Grid

__all__ = [
    "PredictionStore",
    "StgenState",
    "get_state",
    "slide_from_layer",
    "is_slide_layer",
    "slide_layers",
    "find_slide_layer",
]


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

    def ensure(self, slide: Any, predictor: Any, grid: Grid) -> None:
        """Reset unless the store already holds this slide, model and grid."""
        from napari_stgen.inference.cache import slide_key

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


class StgenState:
    """Shared state of one viewer's napari-stgen widgets."""

    slide_changed = Signal(object)  # the slide layer (or None)
    model_changed = Signal(str)
    code_names_changed = Signal(dict)
    threads_changed = Signal(int)
    busy_changed = Signal(bool)  # whether any prediction of this viewer is running

    def __init__(self) -> None:
        self.slide_layer: Any = None
        self.slide: Any = None
        self.model_name: str = "default"
        self.store = PredictionStore()
        self.code_names: dict[int, str] = {}
        self._predictors: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.threads: int | None = None  # torch CPU threads (None: the device policy)
        self._jobs: set[int] = set()  # ids of the running predictions' tokens

    @property
    def busy(self) -> bool:
        """Whether a prediction is streaming results into the store."""
        return bool(self._jobs)

    def set_busy(self, job: Any, running: bool) -> None:
        """Mark prediction ``job`` (any object, e.g. its cancel token) running or ended;
        ``busy_changed`` emits when the viewer goes from idle to busy or back."""
        was = self.busy
        (self._jobs.add if running else self._jobs.discard)(id(job))
        if self.busy != was:
            self.busy_changed.emit(self.busy)

    def set_threads(self, threads: int | None) -> None:
        """Choose the torch CPU threads of this viewer's inference (None: policy default)."""
        threads = int(threads) if threads else None
        if threads != self.threads:
            self.threads = threads
            self.threads_changed.emit(threads or 0)

    def apply_threads(self) -> int:
        """Apply the thread choice in the calling (worker) thread; returns the count."""
        from napari_stgen.inference.device import set_threads

        return set_threads(self.threads)

    def set_slide_layer(self, layer: Any) -> Any:
        """Use ``layer`` (a slide image layer) as the current slide; returns the opened slide."""
        layer = getattr(layer, "__wrapped__", layer)  # plugin widgets see proxies of layers
        if layer is self.slide_layer and self.slide is not None:
            return self.slide
        self.slide = slide_from_layer(layer) if layer is not None else None
        self.slide_layer = layer
        self.slide_changed.emit(layer)
        return self.slide

    def set_model(self, name: str) -> None:
        """Choose the model (name or checkpoint path) used by the widgets."""
        if name != self.model_name:
            self.model_name = name
            self.model_changed.emit(name)

    def predictor(self, name: str | None = None) -> Any:
        """The loaded GenST predictor for ``name`` (default: the current model), loaded once."""
        name = name or self.model_name
        with self._lock:
            pred = self._predictors.get(name)
            if pred is None:
                self.apply_threads()
                from napari_stgen.inference.registry import load_predictor

                pred = load_predictor(name)  # GenST or HistoTx by the checkpoint card's kind
                self._predictors[name] = pred
                self._predictors.setdefault(pred.name, pred)  # also by card name
            return pred

    def cached_predictor(self, name: str | None = None) -> Any:
        """The predictor for ``name`` if it is already loaded (no loading), else None."""
        with self._lock:
            return self._predictors.get(name or self.model_name)

    def loaded_predictor(self) -> Any:
        """The already-loaded predictor whose results are in the store (or None; no loading)."""
        with self._lock:
            for pred in self._predictors.values():
                if pred.checksum == self.store.model_checksum:
                    return pred
            return self._predictors.get(self.model_name)

    def set_code_name(self, code: int, name: str) -> None:
        """Name a gene code (empty name removes it); travels with exports."""
        name = name.strip()
        if name:
            self.code_names[int(code)] = name
        else:
            self.code_names.pop(int(code), None)
        self.code_names_changed.emit(dict(self.code_names))


_states: dict[int, StgenState] = {}


def get_state(viewer: Any) -> StgenState:
    """The :class:`StgenState` of ``viewer`` (created on first use, dropped with the viewer)."""
    # plugin widgets receive the viewer wrapped in a proxy (a new one per widget): key the
    # state by the wrapped viewer so every widget of a viewer shares one state
    real = viewer
    while hasattr(real, "__wrapped__"):
        real = real.__wrapped__
    key = id(real)
    st = _states.get(key)
    if st is None:
        st = _states[key] = StgenState()
        weakref.finalize(real, _states.pop, key, None)
    return st


def slide_from_layer(layer: Any) -> Any:
    """The :class:`~napari_stgen.io.slide.Slide` behind an image layer opened by napari-stgen.

    Uses a Slide object in ``layer.metadata`` when present, else reopens the path recorded
    in the metadata (or the layer's source) with its µm/px.
    """
    from napari_stgen.errors import StgenError
    from napari_stgen.io.slide import Slide, open_slide

    md = dict(getattr(layer, "metadata", {}) or {})
    for v in (md.get("slide"), md.get("stgen_slide")):
        if isinstance(v, Slide):
            return v
    info = md.get("stgen") if isinstance(md.get("stgen"), dict) else md
    path = info.get("path") or md.get("path") or getattr(layer.source, "path", None)
    if not path:
        raise StgenError(f"layer {layer.name!r} was not opened from a slide file")
    mpp = info.get("mpp") or md.get("mpp")
    return open_slide(path, mpp=mpp)


def is_slide_layer(layer: Any) -> bool:
    """Whether ``layer`` is a slide: an RGB image layer backed by a slide file.

    Layers napari-stgen makes are never slides: heatmaps and code maps (not RGB), generated
    or kept tiles (``metadata['stgen_generated']``) and the thumbnail of a reopened export.
    """
    from napari.layers import Image

    if not isinstance(layer, Image) or not layer.rgb:
        return False
    md = dict(layer.metadata or {})
    st = md.get("stgen") if isinstance(md.get("stgen"), dict) else {}
    if "stgen_generated" in md or md.get("stgen_kind") or st.get("kind"):
        return False
    return bool(
        md.get("slide") is not None
        or md.get("stgen_slide") is not None
        or st.get("path")
        or md.get("path")
        or getattr(layer.source, "path", None)
    )


def slide_layers(viewer: Any) -> list[Any]:
    """The viewer's slide layers (see :func:`is_slide_layer`), top-most first."""
    return [ly for ly in reversed(viewer.layers) if is_slide_layer(ly)]


def find_slide_layer(viewer: Any, state: StgenState | None = None) -> Any:
    """The slide the widgets work on: the state's chosen slide layer while it is in the
    viewer, else the selected slide layer, else the top-most one (None without a slide).

    Never a layer the plugin made, so a generated tile kept on top of the slide, a heatmap
    or a code map does not change what is read.
    """
    if state is not None and state.slide_layer is not None and state.slide_layer in viewer.layers:
        return state.slide_layer
    active = viewer.layers.selection.active
    if is_slide_layer(active):
        return active
    found = slide_layers(viewer)
    return found[0] if found else None
