"""Predict expression dock widget: live gene heatmaps for the view, an ROI or the whole slide.

Thin Qt layer over :mod:`napari_stgen.inference.engine`: every request runs in a napari
``thread_worker`` generator that yields one batch at a time, so heatmaps fill in while the
UI stays responsive; a newer request cancels the older one; results accumulate in the
viewer's :class:`~napari_stgen.widgets.state.PredictionStore`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QProgressBar,
    QPushButton,
    QSlider,
    QWidget,
)

from napari_stgen.errors import Cancelled
from napari_stgen.inference import engine
from napari_stgen.inference.cache import default_cache
from napari_stgen.inference.contract import BATCH_SIZE, TileRequest
from napari_stgen.inference.engine import CancelToken, Estimate
from napari_stgen.inference.registry import list_models, read_panel, takes_measured
from napari_stgen.io.slide import Slide
from napari_stgen.widgets.close_watcher import CloseWatcher
from napari_stgen.widgets.dock import collapsible, scrolling_dock, shrinkable, threads_spin
from napari_stgen.widgets.gene_search import gene_search_edit
from napari_stgen.widgets.jobs import DockProgress
from napari_stgen.widgets.slide_picker import SlidePicker
from napari_stgen.widgets.state import find_slide_layer, get_state

MODES = ("Visible region", "ROI layer", "Whole slide")
DISPLAYS = ("Heatmap", "Spot circles")
COLORMAPS = ("inferno", "viridis", "magma", "plasma", "turbo", "red", "green", "blue")
DEBOUNCE_MS = 300
UNCERTAINTY_TIP = (
    "A separate layer, 'uncertainty (GenST)', with its own colour bar: per tile the larger of "
    "the standardized gene-code entropy and the image's novelty against the training spots "
    "(larger = less sure; held-out Spearman with the absolute error in the model card)"
)
NO_UNCERTAINTY_TIP = "This model's predictions carry no uncertainty (HistoTx gives none)"
REDRAW_MS = 200  # at most one heatmap redraw per this interval while batches stream in


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
            grid, tiles = engine.plan_region(slide, pred, req.region_um, req.tissue_only)
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
    from napari_stgen.widgets.layers import shown_display

    try:
        return shown_display(viewer)
    except RuntimeError:  # the viewer is gone
        return None


class PredictWidget(QWidget):
    """Plugins ▸ napari-stgen ▸ Predict expression."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.batch_size = BATCH_SIZE
        self.workers: list[Any] = []  # running workers (newest last)
        self._token: Any = None
        self._pending_estimate: Any = None
        self._panel: list[str] = []
        self._watched: Any = None
        self._closed = False
        self._done = 0
        self._build_ui()
        self.progress = DockProgress(self.progress_bar)
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
        self._closer = CloseWatcher(self.shutdown)
        tokens = self._tokens = []  # captured by the destroyed hook (no reference to self)
        self.destroyed.connect(lambda *_: [t.cancel() for t in tokens])
        self._refresh_roi_layers()
        viewer = self.viewer
        self.state.store.set_display_source(lambda: _shown_display(viewer))
        self.viewer.layers.events.inserted.connect(self._on_layer_inserted)
        self._load_model_async()

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        body, footer = scrolling_dock(self)
        form = QFormLayout()
        body.addLayout(form)
        self.slide_picker = SlidePicker(self.viewer, self.state)
        form.addRow("Slide", self.slide_picker)
        self.model_combo = QComboBox()
        for name in list_models():
            self.model_combo.addItem(Path(name).stem if name != "default" else name, name)
        self.model_combo.currentIndexChanged.connect(self._on_model_changed)
        form.addRow("Model", self.model_combo)
        self.device_label = QLabel("loading model…")
        form.addRow("Device", self.device_label)
        self.threads_spin = threads_spin(self.state)
        form.addRow("CPU threads", self.threads_spin)

        self.gene_edit, self._gene_model = gene_search_edit(
            self, "gene symbol, e.g. ERBB2 (Enter to add)"
        )
        self.gene_edit.returnPressed.connect(self._add_gene_from_edit)
        add = QPushButton("Add")
        add.clicked.connect(self._add_gene_from_edit)
        row = QHBoxLayout()
        row.addWidget(self.gene_edit)
        row.addWidget(add)
        form.addRow("Genes", row)
        self.gene_list = QListWidget()
        self.gene_list.setMaximumHeight(70)
        self.gene_list.setToolTip("Genes to show; select and press Delete (or Remove) to drop")
        rm = QPushButton("Remove selected")
        rm.clicked.connect(self._remove_selected_genes)
        form.addRow(self.gene_list)
        form.addRow(rm)

        self.mode_combo = QComboBox()
        self.mode_combo.addItems(MODES)
        self.mode_combo.currentIndexChanged.connect(self._on_mode_changed)
        form.addRow("Region", self.mode_combo)
        self.roi_combo = shrinkable(QComboBox())
        self.roi_combo.setEnabled(False)
        form.addRow("ROI layer", self.roi_combo)
        self.live_check = QCheckBox("Follow the view (live)")
        form.addRow(self.live_check)
        self.tissue_check = QCheckBox("Skip background (tissue mask)")
        self.tissue_check.setChecked(True)
        self.tissue_check.setToolTip(
            "Predict only grid cells whose overview pixels are stained tissue"
        )
        form.addRow(self.tissue_check)
        self.progressive_check = QCheckBox("Quick first look (refined in place)")
        self.progressive_check.setChecked(True)
        self.progressive_check.setToolTip(
            "Show a fast pass without test-time augmentation first, then refine each tile "
            "in place with the model's full prediction"
        )
        form.addRow(self.progressive_check)
        self.measured_combo = shrinkable(QComboBox())
        self.measured_combo.setToolTip(
            "HistoTx: measured spots (a Points layer, e.g. opened from an .h5ad) to condition on"
        )
        self.measured_combo.setEnabled(False)
        form.addRow("Measured spots", self.measured_combo)
        self.image_only_check = QCheckBox("Image only (ignore measured spots)")
        self.image_only_check.setEnabled(False)
        form.addRow(self.image_only_check)

        disp = QWidget()
        dform = QFormLayout(disp)
        dform.setContentsMargins(0, 0, 0, 0)
        self.display_combo = QComboBox()
        self.display_combo.addItems(DISPLAYS)
        self.display_combo.currentIndexChanged.connect(lambda *_: self._redraw_all())
        dform.addRow("Display", self.display_combo)
        self.cmap_combo = QComboBox()
        self.cmap_combo.addItems(COLORMAPS)
        self.cmap_combo.currentTextChanged.connect(self._apply_style)
        dform.addRow("Colormap", self.cmap_combo)
        self.opacity_slider = QSlider(Qt.Orientation.Horizontal)
        self.opacity_slider.setRange(0, 100)
        self.opacity_slider.setValue(70)
        self.opacity_slider.valueChanged.connect(self._apply_style)
        dform.addRow("Opacity", self.opacity_slider)
        self.blend_combo = QComboBox()
        self.blend_combo.addItems(["translucent", "additive"])
        self.blend_combo.currentTextChanged.connect(self._apply_style)
        dform.addRow("Blending", self.blend_combo)
        self.points_check = QCheckBox("All genes on hover (tiles layer)")
        self.points_check.setChecked(True)
        self.points_check.setToolTip(
            "An invisible layer over the predicted tiles: hovering shows every gene and the code"
        )
        dform.addRow(self.points_check)
        self.uncertainty_check = QCheckBox("Show uncertainty (how sure)")
        self.uncertainty_check.setChecked(False)
        self.uncertainty_check.setToolTip(UNCERTAINTY_TIP)
        self.uncertainty_check.toggled.connect(self._on_uncertainty)
        dform.addRow(self.uncertainty_check)
        self.markers_check = QCheckBox("Show tile-centre markers")
        self.markers_check.setChecked(False)
        self.markers_check.toggled.connect(self._on_markers)
        dform.addRow(self.markers_check)
        self.display_box = collapsible("Display", disp)
        body.addWidget(self.display_box)
        body.addStretch(1)

        btns = QHBoxLayout()
        self.predict_btn = QPushButton("Predict")
        self.predict_btn.clicked.connect(self.predict)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.clicked.connect(self.cancel)
        self.cancel_btn.setEnabled(False)
        btns.addWidget(self.predict_btn)
        btns.addWidget(self.cancel_btn)
        self.progress_bar = QProgressBar()  # in the dock, beside the buttons: jobs.DockProgress
        self.progress_bar.setMinimumWidth(40)
        btns.addWidget(self.progress_bar, 1)
        footer.addLayout(btns)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        footer.addWidget(self.status_label)

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
        from napari.qt.threading import thread_worker

        name = self.model_combo.currentData() or "default"
        self.state.set_model(name)
        worker = thread_worker(_panel_job, start_thread=False)(self.state, name)
        worker.returned.connect(self._on_model_loaded)
        worker.errored.connect(self._on_model_error)
        self._start(worker)

    def _on_model_loaded(self, pred: Any) -> None:
        if self._closed:
            return
        self._panel = list(pred.genes)
        self._gene_model.setStringList(self._panel)
        is_histotx = takes_measured(pred)
        self.measured_combo.setEnabled(is_histotx)
        self.image_only_check.setEnabled(is_histotx)
        self.uncertainty_check.setEnabled(not is_histotx)  # no uncertainty: say so, not fake
        self.uncertainty_check.setToolTip(NO_UNCERTAINTY_TIP if is_histotx else UNCERTAINTY_TIP)
        if is_histotx:
            self.uncertainty_check.setChecked(False)
        self._show_device(pred)
        if not self.genes and self._panel:
            self.add_gene("ERBB2" if "ERBB2" in self._panel else self._panel[0])

    def _show_device(self, pred: Any) -> None:
        from napari_stgen.inference.device import describe_device

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
        from napari_stgen.inference.tiles import visible_region_um

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
        from napari_stgen.widgets import layers as L

        layer = getattr(event, "value", None)
        md = getattr(layer, "metadata", None) or {}
        if md.get("stgen_kind") == "spots" and md.get("stgen_genes"):
            L.show_scale(layer)

    def _on_mode_changed(self, *_: Any) -> None:
        self.roi_combo.setEnabled(self.mode_combo.currentText() == "ROI layer")
        self._pending_estimate = None
        self.predict_btn.setText("Predict")

    def _roi_request(self) -> Request:
        from napari.layers import Labels, Shapes

        from napari_stgen.errors import StgenError

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
        from napari_stgen.errors import StgenError

        layer = find_slide_layer(self.viewer, self.state)
        if layer is None:
            raise StgenError("open a slide first (File ▸ Open or File ▸ Open Sample)")
        return self.state.set_slide_layer(layer)

    def predict(self) -> Any:
        """Start a prediction for the chosen mode (cancelling any running one)."""
        from napari.qt.threading import thread_worker

        from napari_stgen.errors import StgenError

        mode = self.mode_combo.currentText()
        try:
            slide = self._current_slide()
            if mode == "Visible region":
                req = Request("region", region_um=self.visible_region_um())
            elif mode == "ROI layer":
                req = self._roi_request()
            else:
                if self._pending_estimate is None:
                    return self._estimate_whole_slide(slide)
                self._pending_estimate = None
                self.predict_btn.setText("Predict")
                req = Request("slide")
        except StgenError as e:
            self._notify(str(e), error=True)
            return None
        req.tissue_only = self.tissue_check.isChecked()
        req.progressive = self.progressive_check.isChecked()
        req.image_only = self.image_only_check.isChecked()
        name = self.measured_combo.currentText()
        if self.measured_combo.isEnabled() and name in self.viewer.layers:
            from types import SimpleNamespace

            ly = self.viewer.layers[name]  # snapshot on the UI thread; read in the worker
            req.measured = SimpleNamespace(
                name=ly.name,
                metadata=dict(ly.metadata),
                features=ly.features.copy(),
                data=np.asarray(ly.data).copy(),
            )
        self.cancel()
        from napari_stgen.inference.engine import CancelToken

        token = self._token = CancelToken()
        self._tokens.append(token)
        worker = thread_worker(_job, start_thread=False)(
            self.state, slide, self.state.model_name, req, token, self.batch_size
        )
        worker.yielded.connect(lambda msg, w=worker, t=token: self._on_yield(msg, w, t))
        worker.errored.connect(lambda e: self._notify(f"prediction failed: {e}", error=True))
        worker.finished.connect(lambda t=token: self._on_finished(t))
        self.cancel_btn.setEnabled(True)
        self.status_label.setText("preparing…")
        self.state.set_busy(token, True)
        self._start(worker)
        return worker

    def _estimate_whole_slide(self, slide: Any) -> Any:
        from napari.qt.threading import thread_worker

        self.status_label.setText("estimating whole-slide work…")
        worker = thread_worker(_estimate_job, start_thread=False)(
            self.state, slide, self.state.model_name
        )

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

        worker.returned.connect(done)
        worker.errored.connect(lambda e: self._notify(f"estimate failed: {e}", error=True))
        self._start(worker)
        return worker

    def _start(self, worker: Any) -> None:
        self.workers.append(worker)
        worker.finished.connect(
            lambda w=worker: self.workers.remove(w) if w in self.workers else None
        )
        self._watch_window()
        worker.start()

    def _on_yield(self, msg: tuple, worker: Any, token: Any) -> None:
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

    def _on_finished(self, token: Any) -> None:
        if token in self._tokens:
            self._tokens.remove(token)
        self.progress.finish(token)
        self.state.set_busy(token, False)
        if self._closed:
            return
        self._flush_redraw()
        from napari_stgen.widgets import layers as L

        L.settle_limits(self.viewer, self.state.store, self.genes)
        if len(self.state.store) and self.points_check.isChecked():
            from napari_stgen.widgets import layers as L

            L.update_tiles_points(self.viewer, self.state.store, self.markers_check.isChecked())
        if token is self._token:
            self.cancel_btn.setEnabled(False)
            if token.cancelled:
                self.status_label.setText("cancelled")

    def cancel(self) -> None:
        """Cancel the running prediction (it stops after its current batch)."""
        if self._token is not None:
            self._token.cancel()
        for w in list(self.workers):
            if hasattr(w, "quit"):
                w.quit()
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
        for t in list(self._tokens):
            t.cancel()
        self.cancel()
        self.progress.close_all()

    def _watch_window(self) -> None:
        win = self.window()
        if win is not self and id(win) != self._watched:
            win.installEventFilter(self._closer)
            self._watched = id(win)  # no strong reference: the window owns us

    # ------------------------------------------------------------------ live
    def _on_camera(self, *_: Any) -> None:
        if self.live_check.isChecked() and self.mode_combo.currentText() == "Visible region":
            self._timer.start()

    def _on_live_timeout(self) -> None:
        if self.live_check.isChecked() and not self._closed:
            self.predict()

    # ------------------------------------------------------------------ display
    def _style(self) -> dict[str, Any]:
        return {
            "colormap": self.cmap_combo.currentText(),
            "opacity": self.opacity_slider.value() / 100.0,
        }

    def _redraw_gene(
        self, gene: str, new_tiles: np.ndarray | None = None, exact: bool = True
    ) -> None:
        from napari_stgen.widgets import layers as L

        store = self.state.store
        if store.grid is None or len(store) == 0 or gene not in store.genes:
            return
        if self.display_combo.currentText() == "Heatmap":
            L.update_heatmap(
                self.viewer,
                store,
                gene,
                new_tiles,
                blending=self.blend_combo.currentText(),
                exact=exact,
                **self._style(),
            )
            old = L.find_layer(self.viewer, L.spots_name(gene))
            if old is not None:
                old.visible = False
        else:
            L.update_spots(self.viewer, store, gene, extra_genes=tuple(self.genes), **self._style())
            old = L.find_layer(self.viewer, L.heatmap_name(gene))
            if old is not None:
                old.visible = False

    def _schedule_redraw(self) -> None:
        """Redraw now if the last redraw is REDRAW_MS old, else once the interval is over."""
        if self._redraw_timer.isActive():
            return
        # the interval starts when the last redraw ended and is at least twice its cost, so
        # the UI thread stays free for panning however slow the canvas draws
        gap = max(REDRAW_MS, 2000.0 * self._redraw_cost)
        wait = gap - 1000.0 * (time.perf_counter() - self._last_redraw)
        if wait <= 0:
            self._flush_redraw()
        else:
            self._redraw_timer.start(int(wait) + 1)

    def _flush_redraw(self) -> None:
        """Write every cell added since the last redraw into the heatmaps (one redraw)."""
        self._redraw_timer.stop()
        if not self._pending_tiles or self._closed:
            return
        tiles = np.concatenate(self._pending_tiles)
        self._pending_tiles.clear()
        t0 = time.perf_counter()
        self._redraw_all(tiles, points=False, exact=False)
        self._last_redraw = time.perf_counter()
        self._redraw_cost = self._last_redraw - t0

    def _redraw_all(
        self, new_tiles: np.ndarray | None = None, points: bool = True, exact: bool = True
    ) -> None:
        """Redraw every chosen gene; the all-gene tiles layer only when ``points``; ``exact``
        colour limits (False while batches stream in, see ``layers.update_heatmap``)."""
        from napari_stgen.widgets import layers as L

        for g in self.genes:
            self._redraw_gene(g, new_tiles, exact)
        self._redraw_uncertainty(new_tiles, exact)
        if points and self.points_check.isChecked() and len(self.state.store):
            L.update_tiles_points(self.viewer, self.state.store, self.markers_check.isChecked())

    def _redraw_uncertainty(self, new_tiles: np.ndarray | None = None, exact: bool = True) -> None:
        """The uncertainty layer, while its box is ticked and the store has uncertainties."""
        from napari_stgen.widgets import layers as L

        store = self.state.store
        if not self.uncertainty_check.isChecked() or store.grid is None or not len(store):
            return
        if not store.has_uncertainty:
            return
        L.update_uncertainty(
            self.viewer, store, new_tiles, opacity=self._style()["opacity"], exact=exact
        )

    def _on_uncertainty(self, on: bool) -> None:
        from napari_stgen.widgets import layers as L

        if on:
            self._redraw_uncertainty()
        layer = L.find_layer(self.viewer, L.UNCERTAINTY_LAYER)
        if layer is not None:
            layer.visible = bool(on)

    def _on_markers(self, on: bool) -> None:
        from napari_stgen.widgets import layers as L

        layer = L.find_layer(self.viewer, L.TILES_LAYER)
        if layer is not None:
            L.show_tile_markers(layer, on)

    def _apply_style(self, *_: Any) -> None:
        from napari_stgen.widgets import layers as L

        st = self._style()
        for g in self.genes:
            for name in (L.heatmap_name(g), L.spots_name(g)):
                layer = L.find_layer(self.viewer, name)
                if layer is None:
                    continue
                layer.opacity = st["opacity"]
                if name == L.heatmap_name(g):
                    layer.colormap = st["colormap"]
                    layer.blending = self.blend_combo.currentText()
                else:
                    layer.face_colormap = st["colormap"]
                    layer.refresh_colors()

    def _notify(self, msg: str, error: bool = False) -> None:
        from napari.utils.notifications import show_error, show_info

        if self._closed:
            return
        self.status_label.setText(msg)
        (show_error if error else show_info)(msg)
