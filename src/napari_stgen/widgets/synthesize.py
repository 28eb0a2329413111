"""Synthesize dock widget: draw a region, move gene sliders, generate H&E tiles in place.

Thin Qt layer over :mod:`napari_stgen.inference.synthesis_grid`. Drawing a rectangle (or
clicking a point) on the region layer predicts the region's expression (from the viewer's
prediction store, else through the prediction engine) and sets each gene slider to it.
Generate (or live mode, debounced) runs STMDiT in a napari ``thread_worker`` generator with
progress and Cancel; a newer request cancels the older one. The result appears exactly over
the region as an image layer in µm with ``metadata['stgen_generated']``; variants by seed,
a before/after toggle (before: the H&E alone, every overlay hidden), Keep / Discard, Reset
and an export of the kept tiles. Nothing loads until the user draws or picks a region.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QPushButton,
    QSlider,
    QSpinBox,
    QToolButton,
    QWidget,
)

from napari_stgen.widgets.close_watcher import CloseWatcher
from napari_stgen.widgets.dock import collapsible, scrolling_dock, shrinkable, threads_spin
from napari_stgen.widgets.gene_search import gene_search_edit
from napari_stgen.widgets.jobs import JobProgress
from napari_stgen.widgets.slide_picker import SlidePicker
from napari_stgen.widgets.state import find_slide_layer, get_state

LIVE_DEBOUNCE_MS = 400
REGION_DEBOUNCE_MS = 150
N_DEFAULT_GENES = 8
REGION_LAYER = "Synthesis region"
PREVIEW_LAYER = "Synthesis preview"
NO_REGION = "(none: draw or pick a layer)"
OVERLAY_KINDS = ("heatmap", "spots", "tiles", "codes")  # hidden in the "before" view


def list_stmdit_models() -> list[str]:
    """'default' then other STMDiT checkpoints shipped in weights/."""
    wdir = Path(__file__).resolve().parents[1] / "weights"
    names = ["default"]
    for p in sorted(wdir.glob("stmdit_*.safetensors")):
        if p.stem != "stmdit_default":
            names.append(str(p))
    return names


# ----------------------------------------------------------------------------- worker jobs
class _Failed:
    """A worker's clear, expected failure (StgenError): shown, not raised in the Qt loop."""

    def __init__(self, message: str) -> None:
        self.message = message


def _load_job(state: Any, stmdit_name: str) -> Any:
    from napari_stgen.errors import StgenError
    from napari_stgen.inference.synthesis_grid import load_generator

    try:
        return load_generator(stmdit_name), state.predictor()
    except StgenError as e:
        return _Failed(f"could not load the models: {e}")


def _profile_job(
    slide: Any, model: Any, predictor: Any, plan: Any, known: Any, token: Any, threads: Any
):
    from napari_stgen.errors import Cancelled, StgenError
    from napari_stgen.inference import synthesis_grid as sg
    from napari_stgen.inference.device import set_threads

    set_threads(threads)
    try:
        return (yield from sg.iter_region_profile(slide, model, predictor, plan, known, token))
    except Cancelled:
        return None
    except StgenError as e:
        return _Failed(f"region prediction failed: {e}")


def _generate_job(
    slide: Any, model: Any, profile: Any, cond: Any, params: dict, token: Any, threads: Any
):
    from napari_stgen.errors import Cancelled, StgenError
    from napari_stgen.inference import synthesis_grid as sg
    from napari_stgen.inference.device import set_threads

    set_threads(threads)
    try:
        return (yield from sg.iter_synthesize(slide, model, profile, cond, cancel=token, **params))
    except Cancelled:
        return None
    except StgenError as e:
        return _Failed(f"generation failed: {e}")


class _GeneRow:
    """One gene slider: label, labelled double slider, predicted/observed text, remove."""

    def __init__(self, gene: str, removable: bool, on_change: Any, on_remove: Any) -> None:
        from superqt import QLabeledDoubleSlider

        self.gene = gene
        self.name = QLabel(gene)
        self.name.setMinimumWidth(64)
        self.slider = QLabeledDoubleSlider(Qt.Orientation.Horizontal)
        self.slider.setDecimals(2)
        self.slider.setRange(0.0, 1.0)
        self.slider.setEnabled(False)
        self.info = QLabel("–")
        self.info.setStyleSheet("color: gray; font-size: 10px")
        self.info.setWordWrap(True)  # never widens the dock
        self.predicted: float | None = None
        self.observed: tuple[float, float] = (0.0, 1.0)
        self.remove = QToolButton()
        self.remove.setText("×")
        self.remove.setToolTip(f"remove {gene}")
        self.remove.setVisible(removable)
        self.remove.clicked.connect(lambda: on_remove(gene))
        self.slider.valueChanged.connect(lambda _v: on_change(gene))

    def widgets(self) -> list[QWidget]:
        return [self.name, self.slider, self.remove, self.info]

    def value(self) -> float:
        return float(self.slider.value())

    def set_profile(self, predicted: float, observed: tuple[float, float], rng: tuple) -> None:
        self.predicted, self.observed = float(predicted), observed
        blocked = self.slider.blockSignals(True)
        self.slider.setRange(float(rng[0]), float(rng[1]))
        self.slider.setValue(float(predicted))
        self.slider.blockSignals(blocked)
        self.slider.setEnabled(True)
        self._mark_groove(rng)
        self._update_info()

    def _mark_groove(self, rng: tuple) -> None:
        """Colour the observed range on the groove and draw the predicted value as a tick."""
        lo, hi = float(rng[0]), float(rng[1])
        span = max(hi - lo, 1e-9)

        def frac(v: float) -> float:
            return float(np.clip((v - lo) / span, 0.0, 1.0))

        a, b = frac(self.observed[0]), frac(self.observed[1])
        p = frac(self.predicted if self.predicted is not None else lo)
        p0, p1 = max(p - 0.006, 0.0), min(p + 0.006, 1.0)

        def colour(x: float) -> str:
            if p0 <= x <= p1:
                return "#f2c94c"  # the predicted value
            return "#2f7d68" if a <= x <= b else "#4a4f58"  # observed range / outside

        cuts = sorted({round(v, 4) for v in (0.0, a, b, p0, p1, 1.0)})
        stops = []  # strictly increasing positions (Qt rejects repeated stops)
        for k, (u, v) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
            c = colour((u + v) / 2)
            stops += [f"stop:{u + (0.0001 if k else 0.0):.4f} {c}", f"stop:{v:.4f} {c}"]
        grad = ", ".join(stops)
        inner = self.slider.findChild(QSlider) or self.slider
        inner.setStyleSheet(
            "QSlider::groove:horizontal { height: 6px; border-radius: 3px; "
            f"background: qlineargradient(x1:0, y1:0, x2:1, y2:0, {grad}); }}"
            "QSlider::add-page:horizontal, QSlider::sub-page:horizontal { background: none; }"
            "QSlider::handle:horizontal { width: 14px; margin: -5px 0; border-radius: 7px; "
            "background: #dfe3ea; }"
        )

    def _update_info(self) -> None:
        if self.predicted is None:
            return
        lo, hi = self.observed
        d = self.value() - self.predicted
        delta = f"  Δ {d:+.2f}" if abs(d) > 5e-3 else ""
        self.info.setText(f"predicted {self.predicted:.2f} · observed {lo:.2f}–{hi:.2f}{delta}")
        self.slider.setToolTip(self.info.text())


class SynthesizeWidget(QWidget):
    """Draw a region, set gene sliders and generate H&E tiles with STMDiT in place."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        # napari hands plugin widgets a PublicOnlyProxy per widget: key the shared state by
        # the real viewer so the Predict / Export widgets see the same store
        self.state = get_state(getattr(napari_viewer, "__wrapped__", napari_viewer))
        self.model: Any = None
        self.predictor: Any = None
        self._model_name: str | None = None
        self._pred_name: str | None = None
        self.profile: Any = None
        self.result: Any = None
        self.preview_layer: Any = None
        self.region_layer: Any = None
        self.kept: list[Any] = []  # napari_stgen.io.anndata.GeneratedTile
        self.kept_layers: list[Any] = []
        self.rows: dict[str, _GeneRow] = {}
        self.workers: list[Any] = []
        self._tokens: dict[str, Any] = {}
        self.progress = JobProgress()
        self._hidden_overlays: list[Any] = []  # overlays hidden by the "before" view
        self._after_load: list[Any] = []
        self._generate_after_profile = False
        self._region_sig: tuple | None = None
        self._live_timer = QTimer(self)
        self._live_timer.setSingleShot(True)
        self._live_timer.setInterval(LIVE_DEBOUNCE_MS)
        self._live_timer.timeout.connect(self.generate)
        self._region_timer = QTimer(self)
        self._region_timer.setSingleShot(True)
        self._region_timer.setInterval(REGION_DEBOUNCE_MS)
        self._region_timer.timeout.connect(self.update_region)
        self._closer = CloseWatcher(self.shutdown)
        self._watched: Any = None
        tokens = self._tokens  # captured by the destroyed hook (no reference to self)
        self.destroyed.connect(
            lambda *_: [t.cancel() for t in tokens.values() if hasattr(t, "cancel")]
        )
        self._build_ui()
        self.viewer.layers.events.inserted.connect(self._refresh_region_layers)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self._refresh_region_layers()

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        lay, footer = scrolling_dock(self)
        form = QFormLayout()
        self.slide_picker = SlidePicker(self.viewer, self.state)
        form.addRow("Slide", self.slide_picker)
        self.model_combo = QComboBox()
        self.model_combo.setEditable(True)
        self.model_combo.addItems(list_stmdit_models())
        self.model_combo.setToolTip("STMDiT checkpoint: 'default' or a .safetensors path")
        self.model_combo.currentTextChanged.connect(self._on_model_changed)
        form.addRow("Generator", self.model_combo)
        reg = QHBoxLayout()
        self.region_combo = shrinkable(QComboBox())
        self.region_combo.setToolTip("Shapes layer (rectangle) or Points layer (one tile)")
        self.region_combo.currentIndexChanged.connect(self._on_region_layer_picked)
        self.draw_btn = QPushButton("Draw region")
        self.draw_btn.setToolTip("Add a rectangle layer over the slide and start drawing")
        self.draw_btn.clicked.connect(self.start_drawing)
        reg.addWidget(self.region_combo, 1)
        reg.addWidget(self.draw_btn)
        form.addRow("Region", reg)
        lay.addLayout(form)
        self.region_label = QLabel("Draw a rectangle (or click a point) on the slide.")
        self.region_label.setWordWrap(True)
        lay.addWidget(self.region_label)

        self.genes_grid = QGridLayout()
        self.genes_grid.setColumnStretch(1, 1)
        lay.addLayout(self.genes_grid)
        add = QHBoxLayout()
        self.gene_edit, self._gene_model = gene_search_edit(self, "add gene…")
        self.gene_edit.returnPressed.connect(self._add_gene_from_edit)
        self.reset_btn = QPushButton("Reset")
        self.reset_btn.setToolTip("Return every slider to the region's predicted value")
        self.reset_btn.clicked.connect(self.reset_sliders)
        add.addWidget(self.gene_edit, 1)
        add.addWidget(self.reset_btn)
        lay.addLayout(add)

        sampler = QWidget()
        params = QFormLayout(sampler)
        params.setContentsMargins(0, 0, 0, 0)
        self.guid_genes = QDoubleSpinBox()
        self.guid_genes.setRange(0.0, 20.0)
        self.guid_genes.setSingleStep(0.25)
        self.guid_genes.setValue(2.0)
        self.guid_morph = QDoubleSpinBox()
        self.guid_morph.setRange(0.0, 20.0)
        self.guid_morph.setSingleStep(0.25)
        self.guid_morph.setValue(1.0)
        self.guid_expr = QDoubleSpinBox()
        self.guid_expr.setRange(0.0, 5.0)
        self.guid_expr.setSingleStep(0.1)
        self.guid_expr.setValue(0.0)
        self.guid_expr.setToolTip(
            "GenST expression guidance: steer each tile so that GenST re-predicts its gene "
            "values (0: off). See docs/synthesis.md for what it does and does not measure."
        )
        self.use_morph = QCheckBox("use the surrounding tissue")
        self.use_morph.setChecked(True)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 200)
        self.steps_spin.setValue(16)
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.variants_spin = QSpinBox()
        self.variants_spin.setRange(1, 8)
        self.variants_spin.setValue(1)
        params.addRow("Gene guidance", self.guid_genes)
        params.addRow("Morphology guidance", self.guid_morph)
        params.addRow(self.use_morph)  # its own row: beside the spin box it widened the dock
        params.addRow("Expression guidance", self.guid_expr)
        params.addRow("Steps", self.steps_spin)
        params.addRow("Seed", self.seed_spin)
        params.addRow("Variants", self.variants_spin)
        self.threads_spin = threads_spin(self.state)
        params.addRow("CPU threads", self.threads_spin)
        self.sampler_box = collapsible("Sampler settings", sampler)
        lay.addWidget(self.sampler_box)
        for w in (
            self.guid_genes,
            self.guid_morph,
            self.guid_expr,
            self.steps_spin,
            self.seed_spin,
        ):
            w.valueChanged.connect(self._on_param_changed)
        self.use_morph.toggled.connect(self._on_param_changed)

        btns = QHBoxLayout()
        self.generate_btn = QPushButton("Generate")
        self.generate_btn.clicked.connect(self.generate)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        self.live_check = QCheckBox("Live")
        self.live_check.setToolTip(f"Regenerate {LIVE_DEBOUNCE_MS} ms after the last change")
        btns.addWidget(self.generate_btn, 1)
        btns.addWidget(self.cancel_btn)
        btns.addWidget(self.live_check)
        footer.addLayout(btns)

        res = QHBoxLayout()
        self.after_check = QCheckBox("After")
        self.after_check.setToolTip("Show the generated tiles (unchecked: the original slide)")
        self.after_check.setChecked(True)
        self.after_check.toggled.connect(self._on_before_after)
        self.variant_slider = QSlider(Qt.Orientation.Horizontal)
        self.variant_slider.setRange(0, 0)
        self.variant_slider.valueChanged.connect(self.show_variant)
        self.variant_label = QLabel("")
        self.keep_btn = QPushButton("Keep")
        self.keep_btn.clicked.connect(self.keep)
        self.discard_btn = QPushButton("Discard")
        self.discard_btn.clicked.connect(self.discard)
        res.addWidget(self.after_check)
        res.addWidget(self.variant_slider, 1)
        res.addWidget(self.variant_label)
        res.addWidget(self.keep_btn)
        res.addWidget(self.discard_btn)
        footer.addLayout(res)

        lay.addWidget(QLabel("Kept tiles"))
        self.kept_list = QListWidget()
        self.kept_list.setMaximumHeight(80)
        lay.addWidget(self.kept_list)
        self.export_btn = QPushButton("Export kept tiles…")
        self.export_btn.clicked.connect(self._export_dialog)
        lay.addWidget(self.export_btn)
        lay.addStretch(1)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        footer.addWidget(self.status_label)
        self._update_result_buttons()

    # ------------------------------------------------------------------ models
    def _on_model_changed(self, *_: Any) -> None:
        self.model = None
        self.profile = None
        self._region_sig = None
        self._region_timer.start()

    def _ensure_models(self, then: Any) -> bool:
        """True when models are loaded; else load them in a worker and call ``then`` after."""
        from napari.qt.threading import thread_worker

        name = self.model_combo.currentText().strip() or "default"
        pred_ok = self.predictor is not None and self._pred_name == self.state.model_name
        if self.model is not None and self._model_name == name and pred_ok:
            return True
        self._after_load.append(then)
        if "load" in self._tokens:
            return False
        self._tokens["load"] = object()
        self.status_label.setText("loading models…")
        pred_name = self.state.model_name
        worker = thread_worker(_load_job, start_thread=False)(self.state, name)

        def done(models: Any) -> None:
            if isinstance(models, _Failed):
                self._after_load = []
                self._notify(models.message, error=True)
                return
            self.model, self.predictor = models
            self._model_name, self._pred_name = name, pred_name
            self._on_models_loaded()
            calls, self._after_load = self._after_load, []
            for c in calls:
                c()

        def failed(e: BaseException) -> None:
            self._after_load = []
            self._notify(f"could not load the models: {e}", error=True)

        worker.returned.connect(done)
        worker.errored.connect(failed)
        worker.finished.connect(lambda: self._tokens.pop("load", None))
        self._start(worker, "load")
        return False

    def _on_models_loaded(self) -> None:
        from napari_stgen.inference.synthesis_grid import informative_genes

        m = self.model
        self._gene_model.setStringList(sorted(m.genes))
        dg, dm = m.default_guidance
        for w, v in (
            (self.guid_genes, dg),
            (self.guid_morph, dm),
            (self.guid_expr, m.default_guidance_expr),
            (self.steps_spin, None),
        ):
            w.blockSignals(True)
            w.setValue(v if v is not None else m.default_steps)
            w.blockSignals(False)
        for g in list(self.rows):
            if g not in m.genes:
                self.remove_gene(g)
        for g in informative_genes(m, N_DEFAULT_GENES):
            self.add_gene(g, removable=False)
        self.status_label.setText(
            f"{m.name}: {len(m.genes)} genes, tiles {m.tile_px} px at {m.mpp:g} µm/px "
            f"({m.tile_um:g} µm); expression from {self.predictor.name}"
        )

    # ------------------------------------------------------------------ genes
    @property
    def genes(self) -> list[str]:
        """Genes with a slider, in display order."""
        return list(self.rows)

    def add_gene(self, gene: str, removable: bool = True) -> bool:
        """Add a slider for ``gene`` (a gene of the generator's panel, any case)."""
        if self.model is None:
            return False
        match = {g.upper(): g for g in self.model.genes}.get(gene.strip().upper())
        if match is None:
            self._notify(f"{gene!r} is not in the generator's panel", error=True)
            return False
        if match in self.rows:
            return True
        row = _GeneRow(match, removable, self._on_slider, self.remove_gene)
        r = self.genes_grid.rowCount()
        self.genes_grid.addWidget(row.name, 2 * r, 0)
        self.genes_grid.addWidget(row.slider, 2 * r, 1)
        self.genes_grid.addWidget(row.remove, 2 * r, 2)
        self.genes_grid.addWidget(row.info, 2 * r + 1, 1, 1, 2)
        self.rows[match] = row
        if self.profile is not None:
            self._init_row(row)
        return True

    def remove_gene(self, gene: str) -> None:
        """Remove a gene's slider (its value returns to each tile's prediction)."""
        row = self.rows.pop(gene, None)
        if row is None:
            return
        for w in row.widgets():
            self.genes_grid.removeWidget(w)
            w.deleteLater()
        self._schedule_live()

    def _add_gene_from_edit(self) -> None:
        if self.add_gene(self.gene_edit.text()):
            self.gene_edit.clear()

    def slider_values(self) -> dict[str, float]:
        """Current slider values (log1p CP10k) by gene."""
        return {g: r.value() for g, r in self.rows.items() if r.predicted is not None}

    def set_value(self, gene: str, value: float) -> None:
        """Move a gene's slider (as a user would); live mode regenerates after the debounce."""
        self.rows[gene].slider.setValue(float(value))

    def _init_row(self, row: _GeneRow) -> None:
        from napari_stgen.inference.synthesis_grid import slider_range

        p = self.profile.value(row.gene)
        i = self.model.genes.index(row.gene)
        lo, hi = (float(v) for v in np.asarray(self.model.gene_range)[i])
        row.set_profile(p, (lo, hi), slider_range(self.model, row.gene, p))

    def reset_sliders(self) -> None:
        """Return every slider to the region's predicted value."""
        if self.profile is None:
            return
        for row in self.rows.values():
            self._init_row(row)
        self._schedule_live()

    def _on_slider(self, gene: str) -> None:
        row = self.rows.get(gene)
        if row is not None:
            row._update_info()
        self._schedule_live()

    def _on_param_changed(self, *_: Any) -> None:
        self._schedule_live()

    def _schedule_live(self) -> None:
        if self.live_check.isChecked() and self.profile is not None:
            self._live_timer.start()

    # ------------------------------------------------------------------ region
    def _region_layers(self) -> list[Any]:
        from napari.layers import Points, Shapes

        return [ly for ly in self.viewer.layers if isinstance(ly, (Shapes, Points))]

    def _refresh_region_layers(self, *_: Any) -> None:
        names = [ly.name for ly in self._region_layers()]
        cur = self.region_layer.name if self.region_layer is not None else None
        self.region_combo.blockSignals(True)
        self.region_combo.clear()
        self.region_combo.addItems([NO_REGION, *names])  # never a layer the user did not pick
        if cur in names:
            self.region_combo.setCurrentText(cur)
        self.region_combo.blockSignals(False)

    def _on_layer_removed(self, event: Any) -> None:
        layer = getattr(event, "value", None)
        if layer is self.preview_layer:
            self.preview_layer = None
            self.result = None
            self._update_result_buttons()
        if layer in self.kept_layers:
            self.kept_layers.remove(layer)
        if layer is self.region_layer:
            self._connect_region(None)
        self._refresh_region_layers()

    def _on_region_layer_picked(self, *_: Any) -> None:
        name = self.region_combo.currentText()
        layer = next((ly for ly in self._region_layers() if ly.name == name), None)
        self._connect_region(layer)

    def _connect_region(self, layer: Any) -> None:
        if self.region_layer is not None:
            try:
                self.region_layer.events.data.disconnect(self._on_region_data)
            except (TypeError, ValueError, RuntimeError):
                pass
        self.region_layer = layer
        if layer is not None:
            layer.events.data.connect(self._on_region_data)
            self._region_timer.start()

    def start_drawing(self) -> Any:
        """Create (or reuse) the rectangle layer over the slide and enter drawing mode."""
        from napari.layers import Shapes

        layer = next(
            (ly for ly in self.viewer.layers if isinstance(ly, Shapes) and ly.name == REGION_LAYER),
            None,
        )
        if layer is None:
            layer = self.viewer.add_shapes(
                name=REGION_LAYER,
                edge_color="yellow",
                face_color="transparent",
                edge_width=4,
                units="um",
            )
        self._refresh_region_layers()
        self.region_combo.setCurrentText(layer.name)
        self._connect_region(layer)
        self.viewer.layers.selection.active = layer
        layer.mode = "add_rectangle"
        return layer

    def _on_region_data(self, *_: Any) -> None:
        self._region_timer.start()

    def region_um(self) -> tuple[float, float, float, float] | None:
        """The region (x0, y0, x1, y1) µm: the last rectangle, or one tile at the last point."""
        from napari.layers import Points

        from napari_stgen.inference.synthesis_grid import point_region

        layer = self.region_layer
        if layer is None or len(layer.data) == 0:
            return None
        if isinstance(layer, Points):
            yx = np.asarray(layer.data_to_world(layer.data[-1]))[-2:]
            tile = self.model.tile_um if self.model is not None else 112.0
            return point_region(yx, tile)
        verts = np.asarray(layer.data[-1], dtype=np.float64)
        world = np.array([np.asarray(layer.data_to_world(v))[-2:] for v in verts])
        (y0, x0), (y1, x1) = world.min(0), world.max(0)
        return (float(x0), float(y0), float(x1), float(y1))

    def _slide(self) -> Any:
        from napari_stgen.errors import StgenError

        layer = find_slide_layer(self.viewer, self.state)  # never a generated tile
        if layer is None:
            raise StgenError("open a slide first (File ▸ Open or File ▸ Open Sample)")
        return self.state.set_slide_layer(layer)

    def update_region(self) -> Any:
        """Plan the current region and predict its profile (worker); sliders follow."""
        from napari.qt.threading import thread_worker

        from napari_stgen.errors import StgenError
        from napari_stgen.inference import synthesis_grid as sg

        region = self.region_um()
        if region is None:
            return None
        if not self._ensure_models(self.update_region):
            return None
        try:
            slide = self._slide()
            plan = sg.plan_region(region, self.model.mpp, self.model.tile_px)
        except StgenError as e:
            self._notify(str(e), error=True)
            return None
        sig = (id(slide), self._model_name, plan.region_um)
        if sig == self._region_sig and self.profile is not None:
            return None
        self._region_sig = sig
        self._snap_region_shape(plan.region_um)
        known = sg.known_from_store(self.state.store, slide, self.predictor, plan)
        token = self._new_token("profile")
        h, w = plan.out_hw
        rows, cols = plan.grid_shape
        self.region_label.setText(
            f"Region {w * plan.px_um:.0f} × {h * plan.px_um:.0f} µm at "
            f"({plan.region_um[0]:.0f}, {plan.region_um[1]:.0f}) µm → {plan.n_tiles} tile(s) "
            f"({rows}×{cols}); predicting expression…"
        )
        worker = thread_worker(_profile_job, start_thread=False)(
            slide, self.model, self.predictor, plan, known, token, self.state.threads
        )
        worker.yielded.connect(lambda p, t=token: self._on_progress(p, t, "Predicting region"))
        worker.returned.connect(lambda prof, t=token, s=slide: self._on_profile(prof, t, s))
        worker.errored.connect(lambda e: self._notify(f"region prediction failed: {e}", True))
        worker.finished.connect(lambda t=token: self._on_finished("profile", t))
        self.cancel_btn.setEnabled(True)
        self._start(worker, "profile")
        return worker

    def _snap_region_shape(self, reg: tuple[float, float, float, float]) -> None:
        """Replace the last rectangle by the pixel-snapped region the tiles will cover."""
        from napari.layers import Shapes

        layer = self.region_layer
        if not isinstance(layer, Shapes) or len(layer.data) == 0:
            return
        if layer.shape_type[-1] != "rectangle":
            return
        x0, y0, x1, y1 = reg
        world = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]])
        data = np.array([np.asarray(layer.world_to_data(p))[-2:] for p in world])
        if np.allclose(data, np.asarray(layer.data[-1])[:, -2:], atol=1e-9):
            return
        shapes = list(layer.data)
        shapes[-1] = data
        with layer.events.data.blocker(self._on_region_data):
            layer.data = shapes
            layer.shape_type = ["rectangle"] * len(shapes)

    def _on_profile(self, prof: Any, token: Any, slide: Any) -> None:
        if token is not self._tokens.get("profile") or token.cancelled or prof is None:
            return
        if isinstance(prof, _Failed):
            self._generate_after_profile = False
            self._notify(prof.message, error=True)
            return
        if prof.new is not None and len(prof.new):
            self.state.store.ensure(slide, self.predictor, prof.grid)
            self.state.store.add_result(prof.new)
        self.profile = prof
        for row in self.rows.values():
            self._init_row(row)
        plan = prof.plan
        h, w = plan.out_hw
        rows, cols = plan.grid_shape
        src = f"{prof.cells_known}/{prof.cells_total} cells from the prediction store"
        self.region_label.setText(
            f"Region {w * plan.px_um:.0f} × {h * plan.px_um:.0f} µm at "
            f"({plan.region_um[0]:.0f}, {plan.region_um[1]:.0f}) µm → {plan.n_tiles} tile(s) "
            f"({rows}×{cols}); {src}."
        )
        if self._generate_after_profile or self.live_check.isChecked():
            self._generate_after_profile = False
            self.generate()

    # ------------------------------------------------------------------ generation
    def params(self) -> dict[str, Any]:
        """Sampler parameters from the controls (keyword arguments of ``iter_synthesize``)."""
        seed = int(self.seed_spin.value())
        return {
            "seeds": [seed + k for k in range(int(self.variants_spin.value()))],
            "steps": int(self.steps_spin.value()),
            "guidance_genes": float(self.guid_genes.value()),
            "guidance_morph": float(self.guid_morph.value()),
            "guidance_expr": float(self.guid_expr.value()),
            "use_morphology": bool(self.use_morph.isChecked()),
        }

    def generate(self) -> Any:
        """Generate the region with the current sliders (cancelling any running generation)."""
        from napari.qt.threading import thread_worker

        from napari_stgen.errors import StgenError
        from napari_stgen.inference import synthesis_grid as sg

        self._live_timer.stop()
        region = self.region_um()
        if region is None:
            self._notify("draw a rectangle (or click a point) on the region layer first")
            return None
        if not self._ensure_models(self.generate):
            return None
        try:
            plan = sg.plan_region(region, self.model.mpp, self.model.tile_px)
        except StgenError as e:
            self._notify(str(e), error=True)
            return None
        if self.profile is None or self.profile.plan.region_um != plan.region_um:
            self._generate_after_profile = True
            self._region_sig = None
            self.update_region()
            return None
        try:
            slide = self._slide()
            cond = sg.conditioning(self.profile, self.slider_values())
        except StgenError as e:
            self._notify(str(e), error=True)
            return None
        token = self._new_token("generate")
        params = self.params()
        self.status_label.setText(
            f"generating {plan.n_tiles} tile(s) × {len(params['seeds'])} variant(s), "
            f"{params['steps']} steps…"
        )
        worker = thread_worker(_generate_job, start_thread=False)(
            slide, self.model, self.profile, cond, params, token, self.state.threads
        )
        worker.yielded.connect(lambda p, t=token: self._on_progress(p, t, "Synthesizing tiles"))
        worker.returned.connect(lambda r, t=token: self._on_generated(r, t))
        worker.errored.connect(lambda e: self._notify(f"generation failed: {e}", True))
        worker.finished.connect(lambda t=token: self._on_finished("generate", t))
        self.cancel_btn.setEnabled(True)
        self._start(worker, "generate")
        return worker

    def _on_generated(self, res: Any, token: Any) -> None:
        if token is not self._tokens.get("generate") or token.cancelled or res is None:
            return
        if isinstance(res, _Failed):
            self._notify(res.message, error=True)
            return
        self.result = res
        tr = res.plan.layer_transform()
        if self.preview_layer is None or self.preview_layer not in self.viewer.layers:
            self.preview_layer = self.viewer.add_image(
                res.images[0],
                name=PREVIEW_LAYER,
                rgb=True,
                scale=tr["scale"],
                translate=tr["translate"],
                units="um",
                metadata={"stgen_generated": res.records[0]},
            )
        else:
            ly = self.preview_layer
            ly.data = res.images[0]
            ly.scale, ly.translate = tr["scale"], tr["translate"]
            ly.metadata = {**ly.metadata, "stgen_generated": res.records[0]}
        self._on_before_after(self.after_check.isChecked())
        self._keep_region_on_top()
        self.variant_slider.blockSignals(True)
        self.variant_slider.setRange(0, len(res.images) - 1)
        self.variant_slider.setValue(0)
        self.variant_slider.blockSignals(False)
        self.show_variant(0)
        self._update_result_buttons()
        off = self._offset_text(res.records[0])
        self.status_label.setText(f"generated {len(res.images)} variant(s); offsets: {off}")

    @staticmethod
    def _offset_text(rec: dict) -> str:
        ex = rec.get("extra", {})
        gs, vs = list(ex.get("offset_genes", [])), list(ex.get("offset_values", []))
        return ", ".join(f"{g} {float(v):+.2f}" for g, v in zip(gs, vs, strict=False)) or "none"

    def _keep_region_on_top(self) -> None:
        layers = self.viewer.layers
        if self.region_layer is not None and self.region_layer in layers:
            i = layers.index(self.region_layer)
            if i != len(layers) - 1:
                layers.move(i, len(layers))

    def show_variant(self, k: int) -> None:
        """Show variant ``k`` (by seed) of the current result in the preview layer."""
        if self.result is None or self.preview_layer is None:
            self.variant_label.setText("")
            return
        k = int(np.clip(k, 0, len(self.result.images) - 1))
        self.preview_layer.data = self.result.images[k]
        self.preview_layer.metadata = {
            **self.preview_layer.metadata,
            "stgen_generated": self.result.records[k],
        }
        self.variant_label.setText(f"seed {self.result.seeds[k]}")
        if self.variant_slider.value() != k:
            self.variant_slider.setValue(k)

    def _on_before_after(self, after: bool) -> None:
        """After: the generated tile over the slide. Before: the H&E alone (the preview and
        every napari-stgen overlay hidden, restored on After)."""
        if self.preview_layer is not None:
            self.preview_layer.visible = bool(after)
        if after:
            for ly in self._hidden_overlays:
                if ly in self.viewer.layers:
                    ly.visible = True
            self._hidden_overlays = []
            return
        for ly in self.viewer.layers:
            kind = ((ly.metadata or {}).get("stgen") or {}).get("kind")
            if ly.visible and (kind in OVERLAY_KINDS or ly == self.region_layer):
                ly.visible = False
                self._hidden_overlays.append(ly)

    def keep(self) -> Any:
        """Keep the shown variant: it becomes a named layer, listed and exportable."""
        from napari_stgen.io.anndata import GeneratedTile

        if self.result is None or self.preview_layer is None:
            return None
        k = int(self.variant_slider.value())
        rec = self.result.records[k]
        tile = GeneratedTile.from_record(rec, image=self.result.images[k])
        layer = self.preview_layer
        layer.name = f"generated {tile.id}"
        layer.visible = True
        self.kept.append(tile)
        self.kept_layers.append(layer)
        x0, y0, x1, y1 = rec["extra"]["region_um"]
        self.kept_list.addItem(
            f"{tile.id}: {x1 - x0:.0f}×{y1 - y0:.0f} µm at ({x0:.0f}, {y0:.0f}), seed "
            f"{tile.seed}, {tile.steps} steps, g {tile.guidance_genes:g}/m "
            f"{tile.guidance_morph:g}; {self._offset_text(rec)}"
        )
        self.preview_layer = None
        self.result = None
        self._update_result_buttons()
        return tile

    def discard(self) -> None:
        """Remove the current (not kept) generated layer."""
        layer = self.preview_layer
        self.preview_layer = None
        self.result = None
        if layer is not None and layer in self.viewer.layers:
            self.viewer.layers.remove(layer)
        self._update_result_buttons()

    def _update_result_buttons(self) -> None:
        has = self.result is not None
        for w in (self.keep_btn, self.discard_btn, self.variant_slider):
            w.setEnabled(has)
        if not has:
            self.variant_label.setText("")

    def export_kept(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the kept tiles to an ``.h5ad``: the predicted tiles under them as rows, the
        generated tiles (pixels + conditioning records) in ``uns['stgen']['generated']``."""
        from napari_stgen.errors import StgenError
        from napari_stgen.inference.export import StoreExtras, store_to_anndata
        from napari_stgen.io.anndata import write_h5ad

        if not self.kept:
            raise StgenError("no kept tiles to export (press Keep first)")
        store, slide = self.state.store, self.state.slide
        rows = np.zeros(0, np.int64)
        if len(store):
            rows = np.unique(
                np.concatenate(
                    [store.rows_in_region(tuple(t.extra["region_um"])) for t in self.kept]
                )
            )
        if slide is None or len(rows) == 0:
            from napari_stgen.io.napari_writer import write_layers

            data = [ly.as_layer_data_tuple() for ly in self.kept_layers if ly in self.viewer.layers]
            return write_layers(path, data, overwrite=overwrite)
        extras = StoreExtras(generated=list(self.kept))
        adata = store_to_anndata(store, slide, self.predictor, self.state.code_names, rows, extras)
        return write_h5ad(adata, path, overwrite=overwrite)

    def _export_dialog(self) -> None:
        from napari_stgen.errors import StgenError

        path, _ = QFileDialog.getSaveFileName(self, "Export kept tiles", "", "AnnData (*.h5ad)")
        if not path:
            return
        try:
            out = self.export_kept(path, overwrite=True)
        except StgenError as e:
            self._notify(str(e), error=True)
            return
        self.status_label.setText(f"wrote {out}")

    # ------------------------------------------------------------------ workers
    def _new_token(self, kind: str) -> Any:
        from napari_stgen.inference.engine import CancelToken

        old = self._tokens.get(kind)
        if old is not None and hasattr(old, "cancel"):
            old.cancel()
        for w in list(self.workers):
            if getattr(w, "_stgen_kind", None) == kind:
                w.quit()
        tok = self._tokens[kind] = CancelToken()
        return tok

    def _start(self, worker: Any, kind: str) -> None:
        win = self.window()
        if win is not self and id(win) != self._watched:
            win.installEventFilter(self._closer)
            self._watched = id(win)  # an id, not the window: no reference cycle to leak it
        worker._stgen_kind = kind
        self.workers.append(worker)
        worker.finished.connect(
            lambda w=worker: self.workers.remove(w) if w in self.workers else None
        )
        worker.start()

    def _on_progress(self, p: tuple[int, int], token: Any, desc: str) -> None:
        done, total = p
        self.progress.update(token, done, total, desc)

    def _on_finished(self, kind: str, token: Any) -> None:
        self.progress.finish(token)
        if self._tokens.get(kind) is token:
            self._tokens.pop(kind, None)
            if token.cancelled:
                self.status_label.setText("cancelled")
        if not any(k in self._tokens for k in ("profile", "generate")):
            self.cancel_btn.setEnabled(False)

    @property
    def busy(self) -> bool:
        """Whether a model load, region prediction or generation is running."""
        return bool(self.workers)

    def cancel(self) -> None:
        """Cancel the running region prediction and generation (stop at the next step)."""
        for kind in ("profile", "generate"):
            tok = self._tokens.get(kind)
            if tok is not None:
                tok.cancel()
        for w in list(self.workers):
            if getattr(w, "_stgen_kind", None) in ("profile", "generate"):
                w.quit()
        self._generate_after_profile = False
        for kind in ("profile", "generate"):
            tok = self._tokens.get(kind)
            if tok is not None:
                self.progress.finish(tok)
        self.cancel_btn.setEnabled(False)

    def shutdown(self) -> None:
        """Stop timers and all work (the viewer is closing)."""
        self._live_timer.stop()
        self._region_timer.stop()
        self.live_check.setChecked(False)
        self.cancel()
        self.progress.close_all()

    def _notify(self, msg: str, error: bool = False) -> None:
        self.status_label.setText(msg)
        try:
            from napari.utils.notifications import show_error, show_info

            (show_error if error else show_info)(msg)
        except Exception:  # noqa: BLE001 - notifications are best effort
            pass
