"""Codebook explorer dock widget: what each GenST gene code means on this slide.

Reads the viewer's prediction store (filled by the Predict widget; never re-runs the model
on stored tiles) and shows: a Labels layer of code indices in µm with a stable colour per
code, a usage histogram (all predicted tiles or the visible region), and for the selected
code its decoded gene profile against the slide mean, exemplar tiles read lazily from the
slide, and its tiles highlighted (``show_selected_label``, raised above the heatmaps). The
code map's label is the code itself (background -1), so hovering a tile reads its code; a
legend lists the codes on the slide with their colours and names. Codes can be named; names
live in the shared state, so exports carry them. Opening the widget does no heavy work on the
UI thread: matplotlib and the model's code profiles load in a worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QColor, QImage, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from napari_stgen.inference import codebook as cb
from napari_stgen.inference.code_names import Suggestion, card_suggestions
from napari_stgen.inference.tiles import read_tiles, visible_region_um
from napari_stgen.io.layer_meta import layer_kind, stgen_metadata
from napari_stgen.widgets.close_watcher import disconnect_on_destroyed
from napari_stgen.widgets.dock import ViewerDock, scrolling_dock
from napari_stgen.widgets.jobs import JobProgress, JobSpec, WidgetJobs
from napari_stgen.widgets.predict import camera_of
from napari_stgen.widgets.slide_picker import SlidePicker

if TYPE_CHECKING:  # type names only
    from napari_stgen.coords import Grid
    from napari_stgen.io.slide_handle import Slide

CODES_LAYER = "GenST codes"
N_EXEMPLARS = 8
SUGGEST_TIP = (
    "A suggestion, not a diagnosis: the pathologist's region that most of this code's spots fall "
    "in when codes are assigned from measured expression on the labelled HER2ST sections, with "
    "its share of the code's spots and its enrichment over that region's base rate"
)
THUMB_PX = 96  # read at this size
SHOWN_THUMB_PX = 64  # drawn at this size: four fit a narrow dock
N_PROFILE_GENES = 6  # up and down each in the profile chart: 12 readable labels
NO_CODE = -1  # background of the code map (a tile with no prediction)
MIN_CHART_PX = 180
REFRESH_MS = 400  # debounce: redraw once the store has been quiet this long


def _warm_matplotlib() -> None:
    """Import matplotlib's Qt canvas and figure machinery and draw once (fonts, text) with
    Agg, in the worker: on the UI thread this costs ~1–2 s on a loaded 2-core machine."""
    import matplotlib.backends.backend_qtagg  # noqa: F401 - imported to warm it, unused here
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2), tight_layout=True)
    ax = fig.add_subplot(111)
    ax.bar([0, 1], [1, 2])
    ax.barh(["a", "b"], [1, -1])
    ax.set_xlabel("x")
    FigureCanvasAgg(fig).draw()


def _profiles_job(state: Any) -> Any:
    _warm_matplotlib()
    pred = state.loaded_predictor() or state.predictor()
    return pred, pred.code_profiles()


def _thumbs_job(slide: Slide, grid: Grid, tiles: np.ndarray, code: int) -> tuple[int, np.ndarray]:
    return code, read_tiles(slide, grid, tiles, THUMB_PX)


def code_labels(grid: Grid, tiles: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Code map whose label *is* the code: :func:`~napari_stgen.inference.codebook.code_map`
    shifted by one, ``NO_CODE`` (-1) where nothing was predicted."""
    return cb.code_map(grid, tiles, code) - 1


def update_codes_layer(viewer: Any, state: Any, n_codes: int) -> Any:
    """Create/update the Labels layer of code indices (label = code, background -1) over the
    slide grid."""
    from napari.utils.colormaps import DirectLabelColormap

    store = state.store
    data = code_labels(store.grid, store.tiles, store.code)
    if CODES_LAYER in viewer.layers:
        layer = viewer.layers[CODES_LAYER]
        if layer.data.shape == data.shape:
            layer.data[...] = data
            layer.refresh()
        else:
            layer.data = data
        layer.scale, layer.translate = store.grid.scale, store.grid.translate
    else:
        colors = {k - 1: c for k, c in cb.code_colors(n_codes).items()}  # label = code
        cmap = DirectLabelColormap(
            color_dict={**colors, None: (0, 0, 0, 0)}, background_value=NO_CODE
        )
        layer = viewer.add_labels(
            data,
            name=CODES_LAYER,
            scale=store.grid.scale,
            translate=store.grid.translate,
            opacity=0.55,
            colormap=cmap,
            units=("um", "um"),
            metadata=stgen_metadata("codes", code_offset=0),
        )
    layer.features = _code_features(state, n_codes)
    return layer


def _code_features(state: Any, n_codes: int) -> Any:
    import pandas as pd

    names = [state.code_names.get(k, "") for k in range(n_codes)]
    return pd.DataFrame(
        {"index": np.arange(-1, n_codes), "code": np.arange(-1, n_codes), "name": [""] + names}
    )


def raise_above_overlays(viewer: Any, layer: Any) -> None:
    """Move ``layer`` just above the top-most heatmap / spots layer (so it is not hidden)."""
    layers = viewer.layers
    kinds = ("heatmap", "spots")
    idx = [
        i
        for i, ly in enumerate(layers)
        if layer_kind(ly.metadata) in kinds
    ]
    i = layers.index(layer)
    if idx and i < max(idx):
        layers.move(i, max(idx) + 1)


class CodebookWidget(ViewerDock):
    """Plugins ▸ napari-stgen ▸ Codebook."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(napari_viewer)
        self.predictor: Any = None
        self.profiles: np.ndarray | None = None
        self.selected: int | None = None
        self.suggestions: dict[int, Suggestion] = {}  # from the card's pathology table
        self.suggestion_source = ""
        # profiles and exemplars: short jobs without a bar; a newer exemplar request wins
        self.jobs = WidgetJobs(self, JobProgress(), lambda m, _e: self._notify(m), self.shutdown)
        self.thumbnails: np.ndarray | None = None
        self._closed = False
        self._build_ui()
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(REFRESH_MS)
        self._timer.timeout.connect(self.refresh)
        self.state.store.changed.connect(self._on_store_changed)
        self.state.code_names_changed.connect(self._on_names_changed)
        self.state.busy_changed.connect(self._on_busy_changed)
        disconnect_on_destroyed(
            self,
            [
                (self.state.store.changed, self._on_store_changed),
                (self.state.code_names_changed, self._on_names_changed),
                (self.state.busy_changed, self._on_busy_changed),
            ],
        )
        self._loading = False
        if len(self.state.store):  # else on the first predictions: opening stays light
            self._load_profiles()

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        body, footer = scrolling_dock(self)
        row = QHBoxLayout()
        row.addWidget(QLabel("Slide"))
        self.slide_picker = SlidePicker(self.viewer, self.state)
        row.addWidget(self.slide_picker, 1)
        body.addLayout(row)
        self.health_label = QLabel("Predict some tiles first (Predict expression widget).")
        self.health_label.setWordWrap(True)
        body.addWidget(self.health_label)
        row = QHBoxLayout()
        row.addWidget(QLabel("Usage over"))
        self.scope_combo = QComboBox()
        self.scope_combo.addItems(["all predicted tiles", "visible region"])
        self.scope_combo.currentIndexChanged.connect(lambda *_: self._draw_hist())
        row.addWidget(self.scope_combo, 1)
        body.addLayout(row)
        row = QHBoxLayout()
        self.highlight_check = QCheckBox("only selected code")
        self.highlight_check.setChecked(True)
        self.highlight_check.setToolTip("Show only the selected code's tiles on the slide")
        self.highlight_check.toggled.connect(self._on_highlight)
        row.addWidget(self.highlight_check)
        body.addLayout(row)

        # matplotlib canvases are made once matplotlib is imported in the worker
        self.hist_fig: Any = None
        self.gene_fig: Any = None
        self._hist_slot = QVBoxLayout()
        body.addLayout(self._hist_slot)
        body.addWidget(QLabel("Codes on this slide (colour · code · tiles · name)"))
        self.legend = QListWidget()
        self.legend.setMaximumHeight(110)
        self.legend.itemClicked.connect(self._on_legend_clicked)
        body.addWidget(self.legend)

        row = QHBoxLayout()
        row.addWidget(QLabel("Code"))
        self.code_spin = QSpinBox()
        self.code_spin.setRange(0, 0)
        self.code_spin.valueChanged.connect(self.select_code)
        row.addWidget(self.code_spin)
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("name this code, e.g. tumour epithelium")
        self.name_edit.editingFinished.connect(self._on_name_edited)
        row.addWidget(self.name_edit)
        body.addLayout(row)
        self.code_label = QLabel("")
        self.code_label.setWordWrap(True)
        body.addWidget(self.code_label)
        row = QHBoxLayout()
        self.suggest_label = QLabel("")
        self.suggest_label.setWordWrap(True)
        self.suggest_label.setToolTip(SUGGEST_TIP)
        row.addWidget(self.suggest_label, 1)
        self.suggest_btn = QPushButton("Use")
        self.suggest_btn.setToolTip("Name the code with the suggested region")
        self.suggest_btn.clicked.connect(self._use_suggestion)
        self.suggest_btn.setEnabled(False)
        row.addWidget(self.suggest_btn)
        body.addLayout(row)
        self._gene_slot = QVBoxLayout()
        body.addLayout(self._gene_slot)

        body.addWidget(QLabel("Exemplar tiles of this code (nearest to its decoded profile)"))
        self.gallery = QGridLayout()
        self.thumb_labels = []
        for i in range(N_EXEMPLARS):
            lab = QLabel()
            lab.setFixedSize(SHOWN_THUMB_PX, SHOWN_THUMB_PX)
            lab.setAlignment(Qt.AlignmentFlag.AlignCenter)
            self.gallery.addWidget(lab, i // 4, i % 4)
            self.thumb_labels.append(lab)
        body.addLayout(self.gallery)
        body.addStretch(1)
        self.refresh_btn = QPushButton("Refresh")
        self.refresh_btn.clicked.connect(self.refresh)
        footer.addWidget(self.refresh_btn)

    def _make_figures(self) -> None:
        """The histogram and profile canvases (matplotlib already imported by the worker)."""
        if self.hist_fig is not None:
            return
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.hist_fig = Figure(figsize=(4, 2.2), tight_layout=True)
        self.hist_canvas = FigureCanvasQTAgg(self.hist_fig)
        self.hist_canvas.setMinimumHeight(170)
        self.hist_canvas.setMinimumWidth(MIN_CHART_PX)  # shrinks to the dock's width
        self.hist_canvas.mpl_connect("pick_event", self._on_pick)
        self._hist_slot.addWidget(self.hist_canvas)
        self.gene_fig = Figure(figsize=(4, 3.0), tight_layout=True)
        self.gene_canvas = FigureCanvasQTAgg(self.gene_fig)
        self.gene_canvas.setMinimumHeight(260)
        self.gene_canvas.setMinimumWidth(MIN_CHART_PX)
        self._gene_slot.addWidget(self.gene_canvas)

    # ------------------------------------------------------------------ data
    @property
    def workers(self) -> list[Any]:
        """The running workers (newest last)."""
        return self.jobs.workers

    def shutdown(self) -> None:
        """The window is closing: stop every job."""
        self._closed = True
        self.jobs.shutdown()

    def _load_profiles(self) -> None:
        from napari.qt.threading import thread_worker

        self._loading = True
        token = self.jobs.new_token("profiles")
        worker = thread_worker(_profiles_job, start_thread=False)(self.state)
        spec = JobSpec(
            on_return=self._on_profiles,
            on_finished=lambda *_: setattr(self, "_loading", False),
            failed="cannot load the model",
        )
        self.jobs.start("profiles", worker, token, spec)

    def _on_profiles(self, res: tuple[Any, np.ndarray]) -> None:
        if self._closed:
            return
        self.predictor, self.profiles = res
        self.suggestions, self.suggestion_source = card_suggestions(self.predictor.card)
        self._make_figures()
        if not self.predictor.n_codes:
            self.profiles = None
            self.health_label.setText(
                f"{self.predictor.name} has no gene codebook; choose a GenST model to explore codes"
            )
            return
        self.code_spin.setRange(0, self.predictor.n_codes - 1)
        self.refresh()

    def _on_store_changed(self, *_: Any) -> None:
        # debounced: the code map and charts are rebuilt once batches stop (a prediction
        # ended, or the store was quiet for REFRESH_MS), not per batch
        if self._closed:
            return
        if self.profiles is None and self.predictor is None and not self._loading:
            self._load_profiles()  # the first predictions: now fetch the code profiles
        elif not self.state.busy:
            self._timer.start()  # (re)starts the debounce interval

    def _on_busy_changed(self, busy: bool) -> None:
        if self._closed:
            return
        if busy:
            self._timer.stop()
        elif self.predictor is not None and len(self.state.store):
            self._timer.start()

    def _on_names_changed(self, names: dict) -> None:
        if self._closed:
            return
        if CODES_LAYER in self.viewer.layers and self.predictor is not None:
            self.viewer.layers[CODES_LAYER].features = _code_features(
                self.state, self.predictor.n_codes
            )
        self._draw_hist()

    def refresh(self) -> None:
        """Rebuild the code map, histogram and the selected code's panels from the store."""
        store = self.state.store
        if self._closed or self.profiles is None or store.grid is None or not len(store):
            return
        if self.window().isVisible() and not self.isVisible():  # tabbed away: redraw on show
            self._stale = True
            return
        self._stale = False
        if store.model_checksum != self.predictor.checksum:
            self._load_profiles()  # the store holds another model's predictions
            return
        fresh = CODES_LAYER not in self.viewer.layers
        layer = update_codes_layer(self.viewer, self.state, self.predictor.n_codes)
        if fresh:
            raise_above_overlays(self.viewer, layer)
        if not getattr(self, "_label_hooked", False):
            layer.events.selected_label.connect(self._on_selected_label)
            self._label_hooked = True
        h = cb.codebook_health(store.code, self.predictor.n_codes)
        self.health_label.setText(
            f"{h['tiles']:,} tiles · codes used {h['used']}/{h['n_codes']} · "
            f"perplexity {h['perplexity']:.1f} · dead codes {h['dead']}"
        )
        if self.selected is None:  # select_code draws the histogram (once)
            counts = cb.usage_counts(store.code, self.predictor.n_codes)
            self.select_code(int(np.argmax(counts)))
        else:
            self.select_code(self.selected, force=True)

    def _scope_rows(self) -> np.ndarray:
        store = self.state.store
        if self.scope_combo.currentText() == "visible region":
            cam = camera_of(self.viewer)
            return store.rows_in_region(
                visible_region_um(cam.center, cam.zoom, self.viewer.canvas.size)
            )
        return np.arange(len(store))

    def usage(self) -> np.ndarray:
        """Tiles per code in the chosen scope."""
        return cb.usage_counts(self.state.store.code[self._scope_rows()], self.predictor.n_codes)

    def _draw_hist(self) -> None:
        if self.predictor is None or self.hist_fig is None or not len(self.state.store):
            return
        n = self.predictor.n_codes
        counts = self.usage()
        colors = cb.code_colors(n)
        self._fill_legend(counts, colors)
        self.hist_fig.clear()
        ax = self.hist_fig.add_subplot(111)
        bars = ax.bar(
            np.arange(n), counts, color=[colors[k + 1][:3] for k in range(n)], picker=True
        )
        for k, b in enumerate(bars):
            b.set_gid(str(k))
            if k == self.selected:
                b.set_edgecolor("black")
                b.set_linewidth(1.5)
        ax.set_xlabel("gene code (click a bar)")
        ax.set_ylabel("tiles")
        ax.set_xlim(-1, n)
        for k, name in self.state.code_names.items():
            if k < n and counts[k]:
                ax.annotate(name, (k, counts[k]), fontsize=7, rotation=60, ha="left", va="bottom")
        self.hist_canvas.draw_idle()

    def _fill_legend(self, counts: np.ndarray, colors: dict) -> None:
        """The categorical legend: each code on the slide with its colour, count and name."""
        self.legend.clear()
        for k in np.argsort(-counts, kind="stable"):
            if counts[k] == 0:
                break
            name = self.state.code_names.get(int(k), "")
            text = f"code {k} · {counts[k]:,} tiles" + (f" · {name}" if name else "")
            item = QListWidgetItem(text)
            pix = QPixmap(14, 14)
            pix.fill(QColor.fromRgbF(*[float(v) for v in colors[int(k) + 1][:3]]))
            item.setIcon(pix)
            item.setData(Qt.ItemDataRole.UserRole, int(k))
            self.legend.addItem(item)
            if int(k) == self.selected:
                item.setSelected(True)

    def _on_legend_clicked(self, item: QListWidgetItem) -> None:
        self.code_spin.setValue(int(item.data(Qt.ItemDataRole.UserRole)))

    def _on_highlight(self, on: bool) -> None:
        if CODES_LAYER in self.viewer.layers:
            self.viewer.layers[CODES_LAYER].show_selected_label = bool(on)

    def _on_pick(self, event: Any) -> None:
        gid = event.artist.get_gid()
        if gid is not None:
            self.code_spin.setValue(int(gid))

    def _on_selected_label(self, *_: Any) -> None:
        lab = int(self.viewer.layers[CODES_LAYER].selected_label)
        if lab >= 0 and lab != self.selected:
            self.code_spin.setValue(lab)

    # ------------------------------------------------------------------ selection
    def summary(self, k: int) -> cb.CodeSummary:
        """Library summary of code ``k`` over the stored predictions."""
        st = self.state.store
        return cb.summarize_code(
            k, st.expr, st.code, self.profiles, st.genes, n_exemplars=N_EXEMPLARS
        )

    def select_code(self, k: int, force: bool = False) -> None:
        """Show code ``k``: profile bar chart, exemplars, highlight its tiles, its name."""
        if self.profiles is None or not len(self.state.store):
            return
        k = int(k)
        if k == self.selected and not force:
            return
        self.selected = k
        if self.code_spin.value() != k:
            self.code_spin.blockSignals(True)
            self.code_spin.setValue(k)
            self.code_spin.blockSignals(False)
        self.name_edit.setText(self.state.code_names.get(k, ""))
        s = self.summary(k)
        self.current_summary = s
        self.code_label.setText(
            f"code {k}: {s.count:,} tiles ({100 * s.fraction:.1f} %) · top up: "
            + ", ".join(g for g, _ in s.up[:5])
        )
        self._show_suggestion(k)
        self._draw_genes(s)
        if CODES_LAYER in self.viewer.layers:
            layer = self.viewer.layers[CODES_LAYER]
            layer.selected_label = k
            layer.show_selected_label = self.highlight_check.isChecked()
            layer.visible = True
            raise_above_overlays(self.viewer, layer)
        self._draw_hist()
        self._load_thumbs(s)

    def _draw_genes(self, s: cb.CodeSummary) -> None:
        if self.gene_fig is None:
            return
        self.gene_fig.clear()
        ax = self.gene_fig.add_subplot(111)
        k = N_PROFILE_GENES
        items = s.up[:k] + s.down[:k][::-1]
        if items:
            names = [g for g, _ in items][::-1]
            vals = np.array([v for _, v in items][::-1])
            ax.barh(names, vals, color=np.where(vals > 0, "#c0392b", "#2e86c1"))
            ax.axvline(0, color="grey", lw=0.8)
            ax.tick_params(axis="y", labelsize=8)
            ax.tick_params(axis="x", labelsize=8)
        ax.set_xlabel("decoded profile − slide mean (log1p CP10k)", fontsize=8)
        ax.set_title(
            f"code {s.code}"
            + (f" · {self.state.code_names[s.code]}" if s.code in self.state.code_names else ""),
            fontsize=9,
        )
        self.gene_canvas.draw_idle()

    def _load_thumbs(self, s: cb.CodeSummary) -> None:
        from napari.qt.threading import thread_worker

        for lab in self.thumb_labels:
            lab.clear()
        if not len(s.exemplars) or self.state.slide is None:
            return
        tiles = self.state.store.tiles[s.exemplars]
        token = self.jobs.new_token("thumbs")  # a newer code's exemplars replace older ones
        worker = thread_worker(_thumbs_job, start_thread=False)(
            self.state.slide, self.state.store.grid, tiles, s.code
        )
        spec = JobSpec(on_return=self._on_thumbs, failed="cannot read the exemplar tiles")
        self.jobs.start("thumbs", worker, token, spec)

    def _on_thumbs(self, res: tuple[int, np.ndarray]) -> None:
        code, imgs = res
        if self._closed or code != self.selected:
            return
        self.thumbnails = imgs
        for lab, img in zip(self.thumb_labels, imgs, strict=False):
            img = np.ascontiguousarray(img)
            qimg = QImage(
                img.data, img.shape[1], img.shape[0], 3 * img.shape[1], QImage.Format.Format_RGB888
            )
            lab.setPixmap(
                QPixmap.fromImage(qimg.copy()).scaled(
                    SHOWN_THUMB_PX,
                    SHOWN_THUMB_PX,
                    Qt.AspectRatioMode.KeepAspectRatio,
                    Qt.TransformationMode.SmoothTransformation,
                )
            )

    def _show_suggestion(self, k: int) -> None:
        sug = self.suggestions.get(k)
        if sug is not None:
            text = f"Suggested name: {sug} — from {self.suggestion_source} (measured expression)"
        elif self.suggestions:
            text = f"No suggested name: on {self.suggestion_source} this code is no one region"
        else:
            text = ""  # the model's card has no pathology table
        self.suggest_label.setText(text)
        self.suggest_btn.setEnabled(sug is not None)

    def _use_suggestion(self) -> None:
        sug = self.suggestions.get(self.selected)
        if sug is not None:
            self.name_code(self.selected, sug.label)

    def _on_name_edited(self) -> None:
        if self.selected is not None:
            self.state.set_code_name(self.selected, self.name_edit.text())

    def name_code(self, k: int, name: str) -> None:
        """Name code ``k`` (stored in the shared state; exports carry it)."""
        self.state.set_code_name(k, name)
        if k == self.selected:
            self.name_edit.setText(name)

    def _notify(self, msg: str) -> None:
        from napari.utils.notifications import show_error

        if not self._closed:
            self.health_label.setText(msg)
            show_error(msg)

    def showEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        super().showEvent(event)
        if getattr(self, "_stale", False):
            self._timer.start()

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        self.shutdown()
        super().closeEvent(event)
