"""Export dock widget: chosen layers (+ the session's predictions) → one .h5ad.

Thin Qt layer over :func:`napari_stgen.io.napari_writer.write_layers`: lists what can be
exported (points with features, shapes as ROIs, codebook labels, generated tiles and the
viewer's prediction store), takes an output path and an overwrite flag, and writes in a
``thread_worker`` (atomic: temp file + rename). The slide layer supplies µm/px and the
thumbnails that ``sc.pl.spatial`` draws under the spots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_stgen.widgets.state import get_state

STORE_ITEM = "\u2731 predicted tiles (all predictions of this session)"
_ROLE = Qt.ItemDataRole.UserRole


def is_exportable(layer: Any) -> bool:
    """Points, shapes, labels and generated-tile image layers can be exported."""
    kind = type(layer).__name__
    if kind in ("Points", "Shapes", "Labels"):
        return True
    return kind == "Image" and "stgen_generated" in (layer.metadata or {})


def is_slide_like(layer: Any) -> bool:
    """Not a generated tile (a slide, or the thumbnail of an imported h5ad, stands in)."""
    return "stgen_generated" not in (layer.metadata or {})


def _default_checked(layer: Any, has_store: bool) -> bool:
    # the Predict widget's own display layers duplicate the store: leave them unticked then
    kind = ((layer.metadata or {}).get("stgen") or {}).get("kind")
    return not (has_store and kind in ("spots", "tiles"))


class ExportWidget(QWidget):
    """Export to h5ad: layer checklist, output path, overwrite, Export button."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.worker: Any = None

        self.layer_list = QListWidget()
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("output .h5ad")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        self.overwrite = QCheckBox("Overwrite an existing file")
        self.export_btn = QPushButton("Export")
        self.export_btn.clicked.connect(self.export)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        row = QHBoxLayout()
        row.addWidget(self.path_edit)
        row.addWidget(browse)
        lay = QVBoxLayout(self)
        lay.addWidget(QLabel("Layers to export"))
        lay.addWidget(self.layer_list)
        lay.addLayout(row)
        lay.addWidget(self.overwrite)
        lay.addWidget(self.export_btn)
        lay.addWidget(self.status)

        ev = self.viewer.layers.events
        for name in ("inserted", "removed", "moved"):
            getattr(ev, name).connect(self.refresh)
        self.state.store.changed.connect(self._store_changed)
        self.refresh()

    # ---------------------------------------------------------------- listing
    def _store_changed(self, *_: Any) -> None:
        self.refresh()

    def refresh(self, *_: Any) -> None:
        """Rebuild the checklist, keeping the user's ticks."""
        try:
            self._refresh()
        except RuntimeError:  # the Qt side is gone (widget closed): stop listening
            self._disconnect()

    def _disconnect(self) -> None:
        try:
            self.state.store.changed.disconnect(self._store_changed)
        except Exception:  # noqa: BLE001 - already disconnected
            pass
        for name in ("inserted", "removed", "moved"):
            try:
                getattr(self.viewer.layers.events, name).disconnect(self.refresh)
            except Exception:  # noqa: BLE001
                pass

    def _refresh(self) -> None:
        prev = {
            self.layer_list.item(i).text(): self.layer_list.item(i).checkState()
            for i in range(self.layer_list.count())
        }
        self.layer_list.clear()
        has_store = len(self.state.store) > 0
        if has_store:
            self._add_item(STORE_ITEM, None, prev.get(STORE_ITEM, Qt.CheckState.Checked))
        for layer in reversed(self.viewer.layers):
            if is_exportable(layer):
                default = (
                    Qt.CheckState.Checked
                    if _default_checked(layer, has_store)
                    else Qt.CheckState.Unchecked
                )
                self._add_item(layer.name, layer, prev.get(layer.name, default))
        if self.layer_list.count() == 0:
            self.status.setText("Nothing to export yet: predict, draw ROIs or generate tiles.")
        elif self.status.text().startswith("Nothing"):
            self.status.setText("")

    def _add_item(self, text: str, layer: Any, state: Any) -> None:
        item = QListWidgetItem(text)
        item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
        item.setCheckState(state)
        item.setData(_ROLE, layer)
        self.layer_list.addItem(item)

    def selected(self) -> tuple[list[Any], bool]:
        """(ticked layers, whether the prediction store is ticked)."""
        layers, store = [], False
        for i in range(self.layer_list.count()):
            item = self.layer_list.item(i)
            if item.checkState() != Qt.CheckState.Checked:
                continue
            if item.text() == STORE_ITEM and item.data(_ROLE) is None:
                store = True
            else:
                layers.append(item.data(_ROLE))
        return layers, store

    def _browse(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Export to h5ad", self.path_edit.text(), "AnnData (*.h5ad)"
        )
        if path:
            self.path_edit.setText(path if path.endswith(".h5ad") else path + ".h5ad")

    # ---------------------------------------------------------------- export
    def layer_data(self) -> list[Any]:
        """Layer data tuples to write: ticked layers, the store, and the slide layer."""
        from napari_stgen.io.napari_writer import store_layer_data

        layers, use_store = self.selected()
        data = [ly.as_layer_data_tuple() for ly in layers]
        slide = self.slide_layer()
        if slide is not None:
            data.insert(0, slide.as_layer_data_tuple())
        if use_store:
            model = self._model_record()
            data.append(store_layer_data(self.state.store, self.state.code_names, model))
        return data

    def slide_layer(self) -> Any:
        """The slide: the widgets' current one, else the largest RGB image (not generated)."""
        cur = self.state.slide_layer
        if cur is not None and cur in self.viewer.layers:
            return cur
        best, area = None, -1.0
        for ly in self.viewer.layers:
            if type(ly).__name__ != "Image" or not ly.rgb or not is_slide_like(ly):
                continue
            ext = ly.extent.world
            a = float(np.prod(ext[1, -2:] - ext[0, -2:]))
            if a > area:
                best, area = ly, a
        return best

    def _model_record(self) -> Any:
        st = self.state.store
        pred = self.state.loaded_predictor()
        if pred is not None and pred.checksum == st.model_checksum:
            return pred
        return {"name": st.model_name, "checksum": st.model_checksum}

    def export(self) -> Any:
        """Start writing the ticked layers to the chosen path (returns the worker)."""
        from napari.qt.threading import thread_worker

        from napari_stgen.io.napari_writer import write_layers

        text = self.path_edit.text().strip()
        if not text:
            self._notify("choose an output .h5ad path first", error=True)
            return None
        path = Path(text).expanduser()
        if path.suffix.lower() != ".h5ad":
            path = (
                path.with_suffix(path.suffix + ".h5ad")
                if path.suffix
                else path.with_suffix(".h5ad")
            )
        if path.exists() and not self.overwrite.isChecked():
            self._notify(f"{path} exists; tick 'Overwrite' to replace it", error=True)
            return None
        try:
            data = self.layer_data()
        except Exception as e:  # noqa: BLE001 - surfaced to the user
            self._notify(f"export failed: {e}", error=True)
            return None
        self.export_btn.setEnabled(False)
        self.status.setText(f"Exporting to {path.name}…")
        worker = thread_worker(write_layers, start_thread=False)(
            path, data, overwrite=self.overwrite.isChecked()
        )
        worker.returned.connect(self._done)
        worker.errored.connect(lambda e: self._notify(f"export failed: {e}", error=True))
        worker.finished.connect(lambda: self.export_btn.setEnabled(True))
        self.worker = worker
        worker.start()
        return worker

    def _done(self, path: Path) -> None:
        self._notify(f"exported {path}")

    def _notify(self, msg: str, error: bool = False) -> None:
        from napari.utils.notifications import show_error, show_info

        self.status.setText(msg)
        (show_error if error else show_info)(msg)
