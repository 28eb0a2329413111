"""Per-viewer shared state of the napari-stgen widgets (psygnal signals, no Qt).

``get_state(viewer)`` returns the one :class:`StgenState` of a viewer. It holds the slide
layer and its opened slide, the model name (and loaded predictors), code names, and the
:class:`~napari_stgen.inference.store.PredictionStore` of the viewer's predictions.

Layer metadata is plain data (``metadata['stgen']``, see :mod:`napari_stgen.io.layer_meta`);
the live :class:`~napari_stgen.io.slide.Slide` of a slide layer is kept here, in a registry
keyed by layer (:func:`register_slide`, :func:`slide_from_layer`), so napari's
duplicate-layer copies metadata and never a file handle.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from psygnal import Signal

from napari_stgen.errors import StgenError
from napari_stgen.inference.device import set_threads
from napari_stgen.inference.registry import load_predictor
from napari_stgen.inference.store import PredictionStore
from napari_stgen.io.layer_meta import layer_info, made_by_stgen
from napari_stgen.io.slide import Slide, open_slide

__all__ = [
    "StgenState",
    "register_slide",
    "get_state",
    "slide_from_layer",
    "is_slide_layer",
    "slide_layers",
    "find_slide_layer",
]


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


_slides: dict[int, Slide] = {}  # id(layer) -> the live Slide behind that slide layer


def _unwrap(obj: Any) -> Any:
    while hasattr(obj, "__wrapped__"):  # plugin widgets see proxies of layers and viewers
        obj = obj.__wrapped__
    return obj


def register_slide(layer: Any, slide: Slide) -> None:
    """Remember ``slide`` as the opened slide behind ``layer`` (forgotten with the layer)."""
    layer = _unwrap(layer)
    key = id(layer)
    if key not in _slides:
        weakref.finalize(layer, _slides.pop, key, None)
    _slides[key] = slide


def slide_from_layer(layer: Any) -> Slide:
    """The :class:`~napari_stgen.io.slide.Slide` behind an image layer opened by napari-stgen.

    The registered slide of this layer (:func:`register_slide`), else the slide file
    recorded in ``metadata['stgen']`` (or the layer's source) opened again and registered.
    """
    layer = _unwrap(layer)
    slide = _slides.get(id(layer))
    if slide is not None and not slide.closed:
        return slide
    info = layer_info(layer.metadata)
    path = info.get("path") or getattr(layer.source, "path", None)
    if not path:
        raise StgenError(f"layer {layer.name!r} was not opened from a slide file")
    # the file's own µm/px is found again on opening; only a given one is passed on
    given = info.get("mpp_source") in (None, "argument")
    slide = open_slide(path, mpp=info.get("mpp") if given else None)
    register_slide(layer, slide)
    return slide


def is_slide_layer(layer: Any) -> bool:
    """Whether ``layer`` is a slide: an RGB image layer backed by a slide file.

    Layers napari-stgen makes are never slides: heatmaps and code maps (not RGB), generated
    or kept tiles and the thumbnail of a reopened export (see ``io.layer_meta.made_by_stgen``).
    """
    from napari.layers import Image

    if not isinstance(layer, Image) or not layer.rgb:
        return False
    if made_by_stgen(layer.metadata):
        return False
    info = layer_info(layer.metadata)
    return bool(
        id(_unwrap(layer)) in _slides or info.get("path") or getattr(layer.source, "path", None)
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
