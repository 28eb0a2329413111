"""Export dock widget: chosen layers (+ the session's predictions) → one .h5ad or SpatialData.

Thin Qt layer over the one export writer: the prediction store goes through
:func:`napari_stgen.inference.export.store_to_anndata` (with the ticked ROIs and generated
tiles; the rows of ticked points layers the plugin did not predict follow, from
:func:`napari_stgen.io.napari_writer.layers_to_anndata`), then ``.h5ad`` or
:func:`napari_stgen.io.spatialdata.export_spatialdata`; without the store the ticked layers go
through :func:`~napari_stgen.io.napari_writer.write_layers` (AnnData ``.h5ad``) and
:func:`napari_stgen.io.spatialdata.write_layers_spatialdata` (SpatialData ``.zarr``). It lists
what can be exported (points with features, shapes as ROIs, codebook labels, generated tiles
and the viewer's prediction store), takes a format, an output path and an overwrite flag, and
writes in a ``thread_worker`` (atomic: temp file/folder + rename). The slide layer supplies
µm/px and the image (thumbnails in the h5ad, a downsampled pyramid in the SpatialData).

The list follows the viewer: added, removed, moved and renamed layers. A row's tick is its
default (everything but the Predict widget's own display layers, which duplicate the
prediction store) until the user changes it; the user's choice is kept per layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
)

from napari_stgen.inference.export import StoreExtras, store_to_anndata
from napari_stgen.io.anndata import write_h5ad
from napari_stgen.io.anndata_export import append_rows
from napari_stgen.io.layer_meta import generated_record, is_prediction_view, layer_kind
from napari_stgen.io.napari_writer import (
    generated_tiles,
    layer_images,
    layers_to_anndata,
    shape_rois,
    write_layers,
)
from napari_stgen.io.spatialdata import export_spatialdata, write_layers_spatialdata
from napari_stgen.widgets.dock import ViewerDock
from napari_stgen.widgets.state import is_slide_layer, slide_from_layer

STORE_ITEM = "\u2731 predicted tiles (all predictions of this session)"
STORE_LAYER = "predicted tiles"  # obs['layer'] of the store's rows in a mixed export
_ROLE = Qt.ItemDataRole.UserRole
#: format name → (suffix, file-dialog filter)
FORMATS = {
    "h5ad": (".h5ad", "AnnData (*.h5ad)"),
    "SpatialData": (".zarr", "SpatialData (*.zarr)"),
}


def is_exportable(layer: Any) -> bool:
    """Points, shapes, labels and generated-tile image layers can be exported."""
    kind = type(layer).__name__
    if kind in ("Points", "Shapes", "Labels"):
        return True
    return kind == "Image" and generated_record(layer.metadata) is not None


def is_slide_like(layer: Any) -> bool:
    """Not a generated tile (a slide, or the thumbnail of an imported h5ad, stands in)."""
    return generated_record(layer.metadata) is None


def _is_spots(layer: Any) -> bool:
    """A spots layer napari-stgen made or read (measured spots, a reopened export's spots,
    the Predict widget's spot circles) rather than the user's own points."""
    return layer_kind(layer.metadata) in ("tiles", "spots")


def _default_checked(layer: Any) -> bool:
    """Ticked unless it is a spots layer (:func:`_is_spots`): the Predict widget's display
    layers duplicate the prediction store, and measured spots carry genes outside the
    model's panel, which would read NaN on every predicted tile. The user can tick them."""
    return not _is_spots(layer)


SPOTS_TIP = (
    "Spots layer: unticked by default. Ticked, its spots become rows of the export too; "
    "genes it measures outside the model's panel are NaN on the predicted tiles."
)


class ExportWidget(ViewerDock):
    """Export: layer checklist, format (h5ad / SpatialData), output path, overwrite, Export."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(napari_viewer)
        self.worker: Any = None

        self.layer_list = QListWidget()
        self.layer_list.itemChanged.connect(self._item_changed)
        self._user_ticks: dict[int, Any] = {}  # id(layer) (0: the store) → the user's tick
        self._watched: dict[int, Any] = {}  # id(layer) → layer whose name changes we follow
        self.format = QComboBox()
        self.format.addItems(list(FORMATS))
        self.format.setToolTip(
            "h5ad: AnnData (scanpy/squidpy, Visium layout); SpatialData: .zarr with the slide "
            "image, spot/tile shapes and the table (napari-spatialdata, spatialdata-plot)"
        )
        self.format.currentTextChanged.connect(self._format_changed)
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
        fmt_row = QHBoxLayout()
        fmt_row.addWidget(QLabel("Format"))
        fmt_row.addWidget(self.format, 1)
        lay.addLayout(fmt_row)
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
        for layer in self._watched.values():
            try:
                layer.events.name.disconnect(self.refresh)
            except Exception:  # noqa: BLE001 - the layer was already removed or disconnected
                pass
        self._watched.clear()
        for name in ("inserted", "removed", "moved"):
            try:
                getattr(self.viewer.layers.events, name).disconnect(self.refresh)
            except Exception:  # noqa: BLE001 - the viewer is closing: its event emitters may be gone
                pass

    def _item_changed(self, item: QListWidgetItem) -> None:
        layer = item.data(_ROLE)
        self._user_ticks[0 if layer is None else id(layer)] = item.checkState()

    def _watch_names(self) -> None:
        """Follow renames of the viewer's layers (and forget layers that are gone)."""
        live = {id(ly): ly for ly in self.viewer.layers}
        for k in list(self._watched):
            if k not in live:
                try:
                    self._watched.pop(k).events.name.disconnect(self.refresh)
                except Exception:  # noqa: BLE001 - the layer is gone
                    pass
                self._user_ticks.pop(k, None)
        for k, ly in live.items():
            if k not in self._watched:
                ly.events.name.connect(self.refresh)
                self._watched[k] = ly

    def _refresh(self) -> None:
        self._watch_names()
        self.layer_list.blockSignals(True)  # rebuilding is not the user ticking
        try:
            self.layer_list.clear()
            yes, no = Qt.CheckState.Checked, Qt.CheckState.Unchecked
            if len(self.state.store) > 0:
                self._add_item(STORE_ITEM, None, self._user_ticks.get(0, yes))
            for layer in reversed(self.viewer.layers):
                if is_exportable(layer):
                    default = yes if _default_checked(layer) else no
                    self._add_item(layer.name, layer, self._user_ticks.get(id(layer), default))
        finally:
            self.layer_list.blockSignals(False)
        if self.layer_list.count() == 0:
            self.status.setText("Nothing to export yet: predict, draw ROIs or generate tiles.")
        elif self.status.text().startswith("Nothing"):
            self.status.setText("")

    def _add_item(self, text: str, layer: Any, state: Any) -> None:
        item = QListWidgetItem(text)
        if layer is not None and _is_spots(layer):
            item.setToolTip(SPOTS_TIP)
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
            if item.data(_ROLE) is None:
                store = True
            else:
                layers.append(item.data(_ROLE))
        return layers, store

    def suffix(self) -> str:
        """The chosen format's suffix (.h5ad or .zarr)."""
        return FORMATS[self.format.currentText()][0]

    def _format_changed(self, *_: Any) -> None:
        suffix = self.suffix()
        self.path_edit.setPlaceholderText(f"output {suffix}")
        text = self.path_edit.text().strip()
        for other, _f in FORMATS.values():
            if text.endswith(other) and other != suffix:
                self.path_edit.setText(text[: -len(other)] + suffix)

    def _browse(self) -> None:
        suffix, filt = FORMATS[self.format.currentText()]
        path, _ = QFileDialog.getSaveFileName(self, "Export", self.path_edit.text(), filt)
        if path:
            self.path_edit.setText(path if path.endswith(suffix) else path + suffix)

    # ---------------------------------------------------------------- export
    def layer_data(self) -> list[Any]:
        """Layer data tuples to write when the store is not ticked: the ticked layers and
        the slide layer (:func:`~napari_stgen.io.napari_writer.layers_to_anndata`)."""
        layers, _ = self.selected()
        data = [ly.as_layer_data_tuple() for ly in layers]
        slide = self.slide_layer()
        if slide is not None:
            data.insert(0, slide.as_layer_data_tuple())
        return data

    def store_export(self) -> Any:
        """A no-argument function making the store's AnnData (:func:`store_to_anndata`, with
        the ticked ROIs and generated tiles), followed by the rows of the ticked points
        layers the plugin did not predict (:func:`layers_to_anndata`); None when the store
        is not ticked. Reads the widgets here, converts when called."""
        layers, use_store = self.selected()
        if not use_store:
            return None
        st = self.state
        slide_layer = self.slide_layer()
        slide = slide_from_layer(slide_layer) if is_slide_layer(slide_layer) else None
        tuples = [ly.as_layer_data_tuple() for ly in layers]
        thumb = (
            None if slide is not None or slide_layer is None else slide_layer.as_layer_data_tuple()
        )
        others = [
            ly for ly in layers
            if type(ly).__name__ == "Points" and not is_prediction_view(ly.metadata)
        ]  # fmt: skip
        other_data = [ly.as_layer_data_tuple() for ly in others]
        if other_data and slide_layer is not None:  # µm/px and origin of the points
            other_data.insert(0, slide_layer.as_layer_data_tuple())
        names = (STORE_LAYER, others[0].name if others else "")
        model, codes, rows = self._model_record(), dict(st.code_names), np.arange(len(st.store))

        def make() -> Any:
            images = layer_images(thumb, float(st.store.mpp or 1.0)) if thumb else None
            extras = StoreExtras(shape_rois(tuples), generated_tiles(tuples), images)
            adata = store_to_anndata(st.store, slide, model, codes, rows, extras)
            if others:
                adata = append_rows(adata, layers_to_anndata(other_data), names)
            return adata

        return make

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

    def _writer(self, path: Path) -> Any:
        """A no-argument function writing the export (built here, run in the worker)."""
        overwrite = self.overwrite.isChecked()
        make = self.store_export()
        if make is None:
            data = self.layer_data()
            write = write_layers if path.suffix == ".h5ad" else write_layers_spatialdata
            return lambda: write(path, data, overwrite=overwrite)
        if path.suffix == ".h5ad":
            return lambda: write_h5ad(make(), path, overwrite=overwrite)
        slide = self.slide_layer()
        levels = None if slide is None else list(slide.data) if slide.multiscale else [slide.data]
        return lambda: export_spatialdata(make(), path, levels, overwrite=overwrite)

    def export(self) -> Any:
        """Start writing the ticked layers to the chosen path (returns the worker)."""
        from napari.qt.threading import thread_worker

        suffix = self.suffix()
        text = self.path_edit.text().strip()
        if not text:
            self._notify(f"choose an output {suffix} path first", error=True)
            return None
        path = Path(text).expanduser()
        if path.suffix.lower() != suffix:
            path = path.with_name(path.name + suffix)
        if path.exists() and not self.overwrite.isChecked():
            self._notify(f"{path} exists; tick 'Overwrite' to replace it", error=True)
            return None
        try:
            write = self._writer(path)
        except Exception as e:  # noqa: BLE001 - surfaced to the user
            self._notify(f"export failed: {e}", error=True)
            return None
        self.export_btn.setEnabled(False)
        self.status.setText(f"Exporting to {path.name}…")
        worker = thread_worker(write, start_thread=False)()
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
