"""The Synthesize dock's controls (built once; the widget wires them to its methods)."""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QPushButton,
    QSlider,
    QSpinBox,
    QWidget,
)

from napari_stgen.inference.registry import Kind, list_models
from napari_stgen.widgets.dock import collapsible, scrolling_dock, shrinkable, threads_spin
from napari_stgen.widgets.gene_search import gene_search_edit
from napari_stgen.widgets.slide_picker import SlidePicker

__all__ = ["LIVE_DEBOUNCE_MS", "build_ui"]

LIVE_DEBOUNCE_MS = 400


def _button(text: str, tip: str, slot: Any) -> QPushButton:
    btn = QPushButton(text)
    btn.setToolTip(tip)
    btn.clicked.connect(slot)
    return btn


def build_ui(w: Any) -> None:
    """Create the Synthesize dock's controls as attributes of ``w`` and wire them to it."""
    lay, footer = scrolling_dock(w)
    form = QFormLayout()
    w.slide_picker = SlidePicker(w.viewer, w.state)
    form.addRow("Slide", w.slide_picker)
    w.model_combo = QComboBox()
    w.model_combo.setEditable(True)
    w.model_combo.addItems(list_models((Kind.STMDIT,)))
    w.model_combo.setToolTip("STMDiT checkpoint: 'default' or a .safetensors path")
    w.model_combo.currentTextChanged.connect(w._on_model_changed)
    form.addRow("Generator", w.model_combo)
    reg = QHBoxLayout()
    w.region_combo = shrinkable(QComboBox())
    w.region_combo.setToolTip("Shapes layer (rectangle) or Points layer (one tile)")
    w.region_combo.currentIndexChanged.connect(w._on_region_layer_picked)
    w.draw_btn = _button(
        "Draw region", "Add a rectangle layer over the slide and start drawing", w.start_drawing
    )
    reg.addWidget(w.region_combo, 1)
    reg.addWidget(w.draw_btn)
    form.addRow("Region", reg)
    lay.addLayout(form)
    w.region_label = QLabel("Draw a rectangle (or click a point) on the slide.")
    w.region_label.setWordWrap(True)
    lay.addWidget(w.region_label)

    w.genes_grid = QGridLayout()
    w.genes_grid.setColumnStretch(1, 1)
    lay.addLayout(w.genes_grid)
    add = QHBoxLayout()
    w.gene_edit, w._gene_model = gene_search_edit(w, "add gene…")
    w.gene_edit.returnPressed.connect(w._add_gene_from_edit)
    w.reset_btn = _button(
        "Reset", "Return every slider to the region's predicted value", w.reset_sliders
    )
    add.addWidget(w.gene_edit, 1)
    add.addWidget(w.reset_btn)
    lay.addLayout(add)

    sampler = QWidget()
    params = QFormLayout(sampler)
    params.setContentsMargins(0, 0, 0, 0)
    w.guid_genes = QDoubleSpinBox()
    w.guid_genes.setRange(0.0, 20.0)
    w.guid_genes.setSingleStep(0.25)
    w.guid_genes.setValue(2.0)
    w.guid_morph = QDoubleSpinBox()
    w.guid_morph.setRange(0.0, 20.0)
    w.guid_morph.setSingleStep(0.25)
    w.guid_morph.setValue(1.0)
    w.guid_expr = QDoubleSpinBox()
    w.guid_expr.setRange(0.0, 5.0)
    w.guid_expr.setSingleStep(0.1)
    w.guid_expr.setValue(0.0)
    w.guid_expr.setToolTip(
        "GenST expression guidance: steer each tile so that GenST re-predicts its gene "
        "values (0: off). See docs/synthesis.md for what it does and does not measure."
    )
    w.use_morph = QCheckBox("use the surrounding tissue")
    w.use_morph.setChecked(True)
    w.steps_spin = QSpinBox()
    w.steps_spin.setRange(1, 200)
    w.steps_spin.setValue(16)
    w.seed_spin = QSpinBox()
    w.seed_spin.setRange(0, 2**31 - 1)
    w.variants_spin = QSpinBox()
    w.variants_spin.setRange(1, 8)
    w.variants_spin.setValue(1)
    params.addRow("Gene guidance", w.guid_genes)
    params.addRow("Morphology guidance", w.guid_morph)
    params.addRow(w.use_morph)  # its own row: beside the spin box it widened the dock
    params.addRow("Expression guidance", w.guid_expr)
    params.addRow("Steps", w.steps_spin)
    params.addRow("Seed", w.seed_spin)
    params.addRow("Variants", w.variants_spin)
    w.threads_spin = threads_spin(w.state)
    params.addRow("CPU threads", w.threads_spin)
    w.sampler_box = collapsible("Sampler settings", sampler)
    lay.addWidget(w.sampler_box)
    for spin in (w.guid_genes, w.guid_morph, w.guid_expr, w.steps_spin, w.seed_spin):
        spin.valueChanged.connect(w._on_param_changed)
    w.use_morph.toggled.connect(w._on_param_changed)

    btns = QHBoxLayout()
    w.generate_btn = QPushButton("Generate")
    w.generate_btn.clicked.connect(w.generate)
    w.cancel_btn = QPushButton("Cancel")
    w.cancel_btn.setEnabled(False)
    w.cancel_btn.clicked.connect(w.cancel)
    w.live_check = QCheckBox("Live")
    w.live_check.setToolTip(f"Regenerate {LIVE_DEBOUNCE_MS} ms after the last change")
    btns.addWidget(w.generate_btn, 1)
    btns.addWidget(w.cancel_btn)
    btns.addWidget(w.live_check)
    footer.addLayout(btns)

    res = QHBoxLayout()
    w.after_check = QCheckBox("After")
    w.after_check.setToolTip("Show the generated tiles (unchecked: the original slide)")
    w.after_check.setChecked(True)
    w.after_check.toggled.connect(w._on_before_after)
    w.variant_slider = QSlider(Qt.Orientation.Horizontal)
    w.variant_slider.setRange(0, 0)
    w.variant_slider.valueChanged.connect(w.show_variant)
    w.variant_label = QLabel("")
    w.keep_btn = QPushButton("Keep")
    w.keep_btn.clicked.connect(w.keep)
    w.discard_btn = QPushButton("Discard")
    w.discard_btn.clicked.connect(w.discard)
    res.addWidget(w.after_check)
    res.addWidget(w.variant_slider, 1)
    res.addWidget(w.variant_label)
    res.addWidget(w.keep_btn)
    res.addWidget(w.discard_btn)
    footer.addLayout(res)

    lay.addWidget(QLabel("Kept tiles"))
    w.kept_list = QListWidget()
    w.kept_list.setMaximumHeight(80)
    lay.addWidget(w.kept_list)
    w.export_btn = QPushButton("Export kept tiles…")
    w.export_btn.clicked.connect(w._export_dialog)
    lay.addWidget(w.export_btn)
    lay.addStretch(1)
    w.status_label = QLabel("")
    w.status_label.setWordWrap(True)
    footer.addWidget(w.status_label)
    w._update_result_buttons()
