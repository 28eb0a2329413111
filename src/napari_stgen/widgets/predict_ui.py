"""The Predict dock's controls (built once; the widget wires them to its methods)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt
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

from napari_stgen.inference.registry import list_models
from napari_stgen.widgets.dock import collapsible, scrolling_dock, shrinkable, threads_spin
from napari_stgen.widgets.gene_search import gene_search_edit
from napari_stgen.widgets.slide_picker import SlidePicker

__all__ = ["COLORMAPS", "DISPLAYS", "MODES", "UNCERTAINTY_TIP", "build_predict_ui"]

MODES = ("Visible region", "ROI layer", "Whole slide")
DISPLAYS = ("Heatmap", "Spot circles")
COLORMAPS = ("inferno", "viridis", "magma", "plasma", "turbo", "red", "green", "blue")
UNCERTAINTY_TIP = (
    "A separate layer, 'uncertainty', with its own colour bar (larger = less sure). GenST: the "
    "image's novelty against the training spots plus the gene-code entropy above its average. "
    "HistoTx with measured spots: the spread of the nearest measured profiles. Held-out "
    "Spearman with the absolute error: in the model card and the export"
)
NO_UNCERTAINTY_TIP = (
    "HistoTx gives an uncertainty only with measured spots (their spread around each tile): "
    "pick a measured-spots layer and untick 'image only'"
)


def build_predict_ui(w: Any) -> None:
    """Create the Predict dock's controls as attributes of ``w`` and wire them to it."""
    body, footer = scrolling_dock(w)
    form = QFormLayout()
    body.addLayout(form)
    w.slide_picker = SlidePicker(w.viewer, w.state)
    form.addRow("Slide", w.slide_picker)
    w.model_combo = QComboBox()
    for name in list_models():
        w.model_combo.addItem(Path(name).stem if name != "default" else name, name)
    w.model_combo.currentIndexChanged.connect(w._on_model_changed)
    form.addRow("Model", w.model_combo)
    w.device_label = QLabel("loading model…")
    form.addRow("Device", w.device_label)
    w.threads_spin = threads_spin(w.state)
    form.addRow("CPU threads", w.threads_spin)

    w.gene_edit, w._gene_model = gene_search_edit(w, "gene symbol, e.g. ERBB2 (Enter to add)")
    w.gene_edit.returnPressed.connect(w._add_gene_from_edit)
    add = QPushButton("Add")
    add.clicked.connect(w._add_gene_from_edit)
    row = QHBoxLayout()
    row.addWidget(w.gene_edit)
    row.addWidget(add)
    form.addRow("Genes", row)
    w.gene_list = QListWidget()
    w.gene_list.setMaximumHeight(70)
    w.gene_list.setToolTip("Genes to show; select and press Delete (or Remove) to drop")
    rm = QPushButton("Remove selected")
    rm.clicked.connect(w._remove_selected_genes)
    form.addRow(w.gene_list)
    form.addRow(rm)

    w.mode_combo = QComboBox()
    w.mode_combo.addItems(MODES)
    w.mode_combo.currentIndexChanged.connect(w._on_mode_changed)
    form.addRow("Region", w.mode_combo)
    w.roi_combo = shrinkable(QComboBox())
    w.roi_combo.setEnabled(False)
    form.addRow("ROI layer", w.roi_combo)
    w.live_check = QCheckBox("Follow the view (live)")
    form.addRow(w.live_check)
    w.tissue_check = QCheckBox("Skip background (tissue mask)")
    w.tissue_check.setChecked(True)
    w.tissue_check.setToolTip("Predict only grid cells whose overview pixels are stained tissue")
    form.addRow(w.tissue_check)
    w.progressive_check = QCheckBox("Quick first look (refined in place)")
    w.progressive_check.setChecked(True)
    w.progressive_check.setToolTip(
        "Show a fast pass without test-time augmentation first, then refine each tile "
        "in place with the model's full prediction"
    )
    form.addRow(w.progressive_check)
    w.measured_combo = shrinkable(QComboBox())
    w.measured_combo.setToolTip(
        "HistoTx: measured spots (a Points layer, e.g. opened from an .h5ad) to condition on"
    )
    w.measured_combo.setEnabled(False)
    form.addRow("Measured spots", w.measured_combo)
    w.image_only_check = QCheckBox("Image only (ignore measured spots)")
    w.image_only_check.setEnabled(False)
    form.addRow(w.image_only_check)

    disp = QWidget()
    dform = QFormLayout(disp)
    dform.setContentsMargins(0, 0, 0, 0)
    w.display_combo = QComboBox()
    w.display_combo.addItems(DISPLAYS)
    w.display_combo.currentIndexChanged.connect(lambda *_: w._redraw_all())
    dform.addRow("Display", w.display_combo)
    w.cmap_combo = QComboBox()
    w.cmap_combo.addItems(COLORMAPS)
    w.cmap_combo.currentTextChanged.connect(w._apply_style)
    dform.addRow("Colormap", w.cmap_combo)
    w.opacity_slider = QSlider(Qt.Orientation.Horizontal)
    w.opacity_slider.setRange(0, 100)
    w.opacity_slider.setValue(70)
    w.opacity_slider.valueChanged.connect(w._apply_style)
    dform.addRow("Opacity", w.opacity_slider)
    w.blend_combo = QComboBox()
    w.blend_combo.addItems(["translucent", "additive"])
    w.blend_combo.currentTextChanged.connect(w._apply_style)
    dform.addRow("Blending", w.blend_combo)
    w.points_check = QCheckBox("All genes on hover (tiles layer)")
    w.points_check.setChecked(True)
    w.points_check.setToolTip(
        "An invisible layer over the predicted tiles: hovering shows every gene and the code"
    )
    dform.addRow(w.points_check)
    w.uncertainty_check = QCheckBox("Show uncertainty (how sure)")
    w.uncertainty_check.setChecked(False)
    w.uncertainty_check.setToolTip(UNCERTAINTY_TIP)
    w.uncertainty_check.toggled.connect(w._on_uncertainty)
    dform.addRow(w.uncertainty_check)
    w.markers_check = QCheckBox("Show tile-centre markers")
    w.markers_check.setChecked(False)
    w.markers_check.toggled.connect(w._on_markers)
    dform.addRow(w.markers_check)
    w.display_box = collapsible("Display", disp)
    body.addWidget(w.display_box)
    body.addStretch(1)

    btns = QHBoxLayout()
    w.predict_btn = QPushButton("Predict")
    w.predict_btn.clicked.connect(w.predict)
    w.cancel_btn = QPushButton("Cancel")
    w.cancel_btn.clicked.connect(w.cancel)
    w.cancel_btn.setEnabled(False)
    btns.addWidget(w.predict_btn)
    btns.addWidget(w.cancel_btn)
    w.progress_bar = QProgressBar()  # in the dock, beside the buttons: jobs.DockProgress
    w.progress_bar.setMinimumWidth(40)
    btns.addWidget(w.progress_bar, 1)
    footer.addLayout(btns)
    w.status_label = QLabel("")
    w.status_label.setWordWrap(True)
    footer.addWidget(w.status_label)
