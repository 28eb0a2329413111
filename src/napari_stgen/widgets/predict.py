"""Predict expression dock widget: live gene heatmaps for the view, an ROI or the whole slide.

Thin Qt layer over :mod:`napari_stgen.inference.engine`: every request runs in a napari
``thread_worker`` generator that yields one batch at a time, so heatmaps fill in while the
UI stays responsive; a newer request cancels the older one; results accumulate in the
viewer's :class:`~napari_stgen.widgets.state.PredictionStore`. Controls are built in
``predict_ui``, the display in ``predict_display``, the worker lifecycle in ``jobs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
from qtpy.QtCore import QTimer

from napari_stgen.errors import Cancelled, StgenError
from napari_stgen.inference import engine
from napari_stgen.inference.cache import default_cache
from napari_stgen.inference.contract import BATCH_SIZE, Predictor, TileRequest
from napari_stgen.inference.device import describe_device
from napari_stgen.inference.engine import CancelToken, Estimate
from napari_stgen.inference.registry import list_models, read_panel, takes_measured
from napari_stgen.inference.tiles import visible_region_um
from napari_stgen.io.layer_meta import layer_info
from napari_stgen.io.slide import Slide
from napari_stgen.widgets import layers as L
from napari_stgen.widgets.dock import ViewerDock
from napari_stgen.widgets.jobs import DockProgress, JobSpec, WidgetJobs
from napari_stgen.widgets.predict_display import REDRAW_MS, HeatmapDisplayMixin
from napari_stgen.widgets.predict_ui import (
    COLORMAPS,
    DISPLAYS,
    MODES,
    UNCERTAINTY_TIP,
    build_predict_ui,
)
from napari_stgen.widgets.state import find_slide_layer

__all__ = [
    "COLORMAPS",
    "DISPLAYS",
    "MODES",
    "REDRAW_MS",
    "PredictWidget",
    "Request",
    "camera_of",
    "list_models",
]

DEBOUNCE_MS = 300


def camera_of(viewer: Any) -> Any:
    """The viewer's 2D camera (``viewer.scene.camera`` in napari >= 0.9, else ``.camera``)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


@dataclass
class Request:
    """What one prediction run should cover (built on the UI thread, planned in the worker)."""

    mode: str  # 'region' | 'roi' | 'slide'
    region_um: tuple[float, float, float, float] | None = None
    shapes: list[tuple[str, np.ndarray]] = field(default_factory=list)
    labels: tuple[np.ndarray, tuple, tuple] | None = None
    tissue_only: bool = True
    progressive: bool = True  # a fast pass without TTA first, refined in place
    measured: Any = None  # HistoTx: snapshot of the measured-spots Points layer (or None)
    image_only: bool = False  # HistoTx: ignore the measured spots


def _job(state: Any, slide: Slide, model: str, req: Request, token: CancelToken, batch_size: int):
    """Worker generator: load model, plan tiles, then predict batch by batch."""
    try:
        pred = state.predictor(model)
        state.apply_threads()
        token.check()
        if req.mode == "region":
            grid, tiles = engine.plan_prediction_region(slide, pred, req.region_um, req.tissue_only)
            centre = (
                (req.region_um[1] + req.region_um[3]) / 2,
                (req.region_um[0] + req.region_um[2]) / 2,
            )
        elif req.mode == "roi":
            grid, tiles = engine.plan_roi(slide, pred, req.shapes, req.labels, req.tissue_only)
            centre = None
        else:
            grid, tiles = engine.plan_whole_slide(slide, pred)
            centre = None
        yield ("plan", pred, grid, len(tiles))
        request = TileRequest(
            tiles,
            grid=grid,
            batch_size=batch_size,
            cancel=token,
            cache=default_cache(),
            centre_um=centre,
            progressive=req.progressive,
            measured=None if req.image_only else req.measured,
            image_only=req.image_only,
        )
        yield from (("part", p) for p in engine.predict_tiles(slide, pred, request))
    except Cancelled:
        return


def _panel_job(state: Any, model: str) -> Any:
    """The model's gene panel and kind from its card's JSON sidecar (no torch: opening the
    widget stays light); the loaded predictor when there is no sidecar or it is loaded."""
    loaded = state.cached_predictor(model)
    if loaded is not None:
        return loaded
    panel = read_panel(model)
    if panel is not None:
        return SimpleNamespace(**panel, device=None)
    return state.predictor(model)


def _estimate_job(state: Any, slide: Slide, model: str) -> Estimate:
    pred = state.predictor(model)
    state.apply_threads()
    grid, tiles = engine.plan_whole_slide(slide, pred)
    return engine.estimate(slide, pred, tiles, grid=grid, cache=default_cache())


def _shown_display(viewer: Any) -> dict | None:
    try:
        return L.shown_display(viewer)
    except RuntimeError:  # the viewer is gone
        return None


class PredictWidget(HeatmapDisplayMixin, ViewerDock):
    """Plugins ▸ napari-stgen ▸ Predict expression."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(napari_viewer)
        self.batch_size = BATCH_SIZE
        self._token: Any = None  # the newest prediction's token
        self._pending_estimate: Any = None
        self._panel: list[str] = []
        self._closed = False
        self._done = 0
        build_predict_ui(self)
        self.progress = DockProgress(self.progress_bar)
        self.jobs = WidgetJobs(self, self.progress, self._notify, self.shutdown)
        self.workers = self.jobs.workers  # running workers (newest last), the jobs' own list
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self._on_live_timeout)
        self._pending_tiles: list[np.ndarray] = []  # cells added since the last redraw
        self._last_redraw = 0.0
        self._redraw_cost = 0.0  # seconds the last coalesced redraw took on the UI thread
        self._redraw_timer = QTimer(self)
        self._redraw_timer.setSingleShot(True)
        self._redraw_timer.timeout.connect(self._flush_redraw)
        cam = camera_of(self.viewer)
        cam.events.center.connect(self._on_camera)
        cam.events.zoom.connect(self._on_camera)
        self.viewer.dims.events.current_step.connect(self._on_camera)
        self.viewer.layers.events.inserted.connect(self._refresh_roi_layers)
        self.viewer.layers.events.removed.connect(self._refresh_roi_layers)
        self._refresh_roi_layers()
        viewer = self.viewer
        self.state.store.set_display_source(lambda: _shown_display(viewer))
        self.viewer.layers.events.inserted.connect(self._on_layer_inserted)
        self._load_model_async()

    def _worker(self, fn: Any, *args: Any) -> Any:
        from napari.qt.threading import thread_worker  # napari

        return thread_worker(fn, start_thread=False)(*args)

    # ------------------------------------------------------------------ genes
    @property
    def genes(self) -> list[str]:
        """Genes currently chosen for display."""
        return [self.gene_list.item(i).text() for i in range(self.gene_list.count())]

    def set_genes(self, genes: list[str]) -> None:
        """Replace the chosen genes (unknown names are reported and skipped)."""
        self.gene_list.clear()
        for g in genes:
            self.add_gene(g)

    def add_gene(self, gene: str) -> bool:
        """Add ``gene`` (case-insensitive match against the panel); False if unknown."""
        gene = gene.strip()
        if not gene:
            return False
        if self._panel:
            match = {g.upper(): g for g in self._panel}.get(gene.upper())
            if match is None:
                self._notify(f"{gene!r} is not in the model's gene panel", error=True)
                return False
            gene = match
        if gene not in self.genes:
            self.gene_list.addItem(gene)
            if len(self.state.store):
                self._redraw_gene(gene)
        return True

    def _add_gene_from_edit(self) -> None:
        for g in self.gene_edit.text().replace(",", " ").split():
            self.add_gene(g)
        self.gene_edit.clear()

    def _remove_selected_genes(self) -> None:
        for item in self.gene_list.selectedItems():
            self.gene_list.takeItem(self.gene_list.row(item))

    # ------------------------------------------------------------------ model
    def _on_model_changed(self, *_: Any) -> None:
        self.state.set_model(self.model_combo.currentData())
        self.device_label.setText("loading model…")
        self._load_model_async()

    def _load_model_async(self) -> None:
        name = self.model_combo.currentData() or "default"
        self.state.set_model(name)
        worker = self._worker(_panel_job, self.state, name)
        worker.errored.connect(self._on_model_error)
        self.jobs.start("panel", worker, spec=JobSpec(on_return=self._on_model_loaded))

    def _on_model_loaded(self, pred: Predictor | SimpleNamespace) -> None:
        if self._closed:
            return
        self._panel = list(pred.genes)
        self._gene_model.setStringList(self._panel)
        is_histotx = takes_measured(pred)
        self.measured_combo.setEnabled(is_histotx)
        self.image_only_check.setEnabled(is_histotx)
        self.uncertainty_check.setToolTip(UNCERTAINTY_TIP)
        self._show_device(pred)
        if not self.genes and self._panel:
            self.add_gene("ERBB2" if "ERBB2" in self._panel else self._panel[0])

    def _show_device(self, pred: Predictor | SimpleNamespace) -> None:
        n = len(pred.genes)
        if getattr(pred, "device", None) is None:  # only the card read: loads on first use
            self.device_label.setText(f"loads on first Predict · {n} genes")
        else:
            self.device_label.setText(f"{describe_device(pred.device)} · {n} genes")

    def _on_model_error(self, exc: BaseException) -> None:
        if self._closed:
            return
        self.device_label.setText("no model")
        self._notify(f"cannot load model: {exc}", error=True)

    # ------------------------------------------------------------------ regions
    def visible_region_um(self) -> tuple[float, float, float, float]:
        """World rectangle (x0, y0, x1, y1) µm on screen (camera centre, zoom, canvas size)."""
        cam = camera_of(self.viewer)
        return visible_region_um(cam.center, cam.zoom, self.viewer.canvas.size)

    def _roi_layers(self) -> list[Any]:
        from napari.layers import Labels, Shapes

        return [ly for ly in self.viewer.layers if isinstance(ly, (Shapes, Labels))]

    def _refresh_roi_layers(self, *_: Any) -> None:
        current = self.roi_combo.currentText()
        self.roi_combo.clear()
        names = [ly.name for ly in self._roi_layers()]
        self.roi_combo.addItems(names)
        if current in names:
            self.roi_combo.setCurrentText(current)
        from napari.layers import Points

        current = self.measured_combo.currentText()
        self.measured_combo.clear()
        names = ["(none)"] + [ly.name for ly in self.viewer.layers if isinstance(ly, Points)]
        self.measured_combo.addItems(names)
        if current in names:
            self.measured_combo.setCurrentText(current)

    def _on_layer_inserted(self, event: Any) -> None:
        """A reopened napari-stgen export: show its gene and colour scale on the canvas."""
        layer = getattr(event, "value", None)
        info = layer_info(getattr(layer, "metadata", None))
        if info.get("kind") == "spots" and info.get("genes"):
            L.show_scale(layer)

    def _on_mode_changed(self, *_: Any) -> None:
        self.roi_combo.setEnabled(self.mode_combo.currentText() == "ROI layer")
        self._pending_estimate = None
        self.predict_btn.setText("Predict")

    def _roi_request(self) -> Request:
        from napari.layers import Labels, Shapes

        name = self.roi_combo.currentText()
        if not name or name not in self.viewer.layers:
            raise StgenError("ROI mode: add a Shapes or Labels layer and choose it")
        layer = self.viewer.layers[name]
        if isinstance(layer, Shapes):
            shapes = [
                (st, np.asarray([layer.data_to_world(p) for p in v])[:, -2:])
                for st, v in zip(layer.shape_type, layer.data, strict=True)
            ]
            if not shapes:
                raise StgenError(f"ROI layer {name!r} has no shapes")
            return Request("roi", shapes=shapes)
        if isinstance(layer, Labels):
            data = np.asarray(layer.data)
            if data.ndim != 2:
                raise StgenError(f"ROI layer {name!r} must be 2D")
            tr = tuple(float(v) for v in layer.translate[-2:])
            return Request("roi", labels=(data, tuple(layer.scale[-2:]), tr))
        raise StgenError(f"ROI layer {name!r} is not a Shapes or Labels layer")

    # ------------------------------------------------------------------ running
    def _current_slide(self) -> Any:
        layer = find_slide_layer(self.viewer, self.state)
        if layer is None:
            raise StgenError("open a slide first (File ▸ Open or File ▸ Open Sample)")
        return self.state.set_slide_layer(layer)

    def _request(self) -> Request:
        """The request for the chosen mode (a whole slide once its estimate was confirmed)."""
        mode = self.mode_combo.currentText()
        if mode == "Visible region":
            return Request("region", region_um=self.visible_region_um())
        if mode == "ROI layer":
            return self._roi_request()
        self._pending_estimate = None
        self.predict_btn.setText("Predict")
        return Request("slide")

    def _snapshot_measured(self, req: Request) -> None:
        name = self.measured_combo.currentText()
        if self.measured_combo.isEnabled() and name in self.viewer.layers:
            ly = self.viewer.layers[name]  # snapshot on the UI thread; read in the worker
            req.measured = SimpleNamespace(
                name=ly.name,
                metadata=dict(ly.metadata),
                features=ly.features.copy(),
                data=np.asarray(ly.data).copy(),
            )

    def predict(self) -> Any:
        """Start a prediction for the chosen mode (cancelling any running one)."""
        try:
            slide = self._current_slide()
            whole = self.mode_combo.currentText() == "Whole slide"
            if whole and self._pending_estimate is None:
                return self._estimate_whole_slide(slide)  # first press: estimate only
            req = self._request()
        except StgenError as e:
            self._notify(str(e), error=True)
            return None
        req.tissue_only = self.tissue_check.isChecked()
        req.progressive = self.progressive_check.isChecked()
        req.image_only = self.image_only_check.isChecked()
        self._snapshot_measured(req)
        self.cancel()
        token = self._token = self.jobs.new_token("predict")
        worker = self._worker(
            _job, self.state, slide, self.state.model_name, req, token, self.batch_size
        )
        worker.yielded.connect(lambda msg, t=token: self._on_yield(msg, t))
        spec = JobSpec(on_finished=self._on_finished, failed="prediction failed")
        self.cancel_btn.setEnabled(True)
        self.status_label.setText("preparing…")
        self.state.set_busy(token, True)
        return self.jobs.start("predict", worker, token, spec)

    def _estimate_whole_slide(self, slide: Slide) -> Any:
        self.status_label.setText("estimating whole-slide work…")
        worker = self._worker(_estimate_job, self.state, slide, self.state.model_name)

        def done(est: Any) -> None:
            if self._closed:
                return
            self._pending_estimate = est
            self.status_label.setText(
                f"Whole slide: {est.tiles:,} tissue tiles ({est.cached:,} cached), "
                f"about {est.seconds:,.0f} s at {est.tiles_per_s:.0f} tiles/s. "
                "Press Confirm to start."
            )
            self.predict_btn.setText(f"Confirm (~{est.seconds:,.0f} s)")

        spec = JobSpec(on_return=done, failed="estimate failed")
        return self.jobs.start("estimate", worker, spec=spec)

    def _on_yield(self, msg: tuple, token: Any) -> None:
        if token.cancelled or self._closed:
            return
        if msg[0] == "plan":
            _, pred, grid, n = msg
            self._show_device(pred)
            self._flush_redraw()  # cells of an earlier request, before the store may reset
            self.state.store.ensure(self.state.slide, pred, grid)
            self._done = 0
            self.status_label.setText(
                f"{n} tissue tiles to predict" if n else "no tissue tiles in this region"
            )
            # the bar may process events while it is created: JobProgress copes with the
            # job finishing meanwhile (a fully cached request finishes at once)
            self.progress.update(token, 0, max(n, 1), "Predicting expression")
            return
        part = msg[1]
        self.state.store.add_result(part)
        draft = bool(getattr(part, "draft", False))
        if not draft:
            self._done = part.done
        # heatmaps in place, batches coalesced (one redraw per REDRAW_MS); the all-gene hover
        # layer once at the end
        self._pending_tiles.append(part.tiles)
        self._schedule_redraw()
        self.progress.update(token, self._done, part.total, "Predicting expression")
        if draft:
            self.status_label.setText(
                f"quick look {part.done}/{part.total} tiles (refining with the full model…)"
            )
            return
        cached = f", {part.cached} from cache" if part.cached else ""
        ctx = " (spatial context applied)" if getattr(part, "final", False) else ""
        self.status_label.setText(f"{part.done}/{part.total} tiles{cached}{ctx}")

    def _on_finished(self, token: Any, current: bool) -> None:
        self.state.set_busy(token, False)
        if self._closed:
            return
        self._flush_redraw()
        L.settle_limits(self.viewer, self.state.store, self.genes)
        if len(self.state.store) and self.points_check.isChecked():
            L.update_tiles_points(self.viewer, self.state.store, self.markers_check.isChecked())
        if token is self._token:
            self.cancel_btn.setEnabled(False)
            if token.cancelled:
                self.status_label.setText("cancelled")

    def cancel(self) -> None:
        """Cancel the running prediction (it stops after its current batch)."""
        if self._token is not None:
            self._token.cancel()
        self.jobs.cancel()
        if self._token is not None:
            self.progress.finish(self._token)
        if not self._closed:
            self.cancel_btn.setEnabled(False)

    def shutdown(self) -> None:
        """Stop live updates and all work (the viewer is closing)."""
        self._closed = True
        self._timer.stop()
        self._redraw_timer.stop()
        self._pending_tiles.clear()
        self.cancel()
        self.jobs.shutdown()

    # ------------------------------------------------------------------ live
    def _on_camera(self, *_: Any) -> None:
        if self.live_check.isChecked() and self.mode_combo.currentText() == "Visible region":
            self._timer.start()

    def _on_live_timeout(self) -> None:
        if self.live_check.isChecked() and not self._closed:
            self.predict()

    def _notify(self, msg: str, error: bool = False) -> None:
        from napari.utils.notifications import show_error, show_info  # napari

        if self._closed:
            return
        self.status_label.setText(msg)
        (show_error if error else show_info)(msg)
