"""The "Slide" row every napari-stgen widget shows: which layer is the slide it works on.

Lists the viewer's slide layers (:func:`~napari_stgen.widgets.state.is_slide_layer`: never a
heatmap, code map or generated tile) and keeps the choice in the viewer's shared state, so
every widget reads the same slide and shows the same name.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QComboBox

from napari_stgen.errors import StgenError
from napari_stgen.widgets.close_watcher import disconnect_on_destroyed
from napari_stgen.widgets.dock import shrinkable
from napari_stgen.widgets.state import find_slide_layer, slide_layers

NO_SLIDE = "(open a slide: File ▸ Open)"


class SlidePicker(QComboBox):
    """A combo box of the viewer's slide layers bound to ``state.slide_layer``."""

    def __init__(self, viewer: Any, state: Any) -> None:
        super().__init__()
        shrinkable(self)
        self.viewer = viewer
        self.state = state
        self.setToolTip(
            "The slide this widget reads (heatmaps, code maps and generated tiles never are)"
        )
        self.currentIndexChanged.connect(self._on_picked)
        ev = viewer.layers.events
        ev.inserted.connect(self.refresh)
        ev.removed.connect(self.refresh)
        state.slide_changed.connect(self._on_state_changed)
        ev_pairs = [(ev.inserted, self.refresh), (ev.removed, self.refresh)]
        disconnect_on_destroyed(self, [*ev_pairs, (state.slide_changed, self._on_state_changed)])
        self.refresh()

    def layers(self) -> list[Any]:
        """Slide layers offered, in the combo's order."""
        return [self.itemData(i) for i in range(self.count()) if self.itemData(i) is not None]

    def refresh(self, *_: Any) -> None:
        """Re-list the slide layers; adopt one as the state's slide when none is chosen."""
        try:
            found = slide_layers(self.viewer)
        except RuntimeError:  # the viewer is being torn down
            return
        cur = self.state.slide_layer if self.state.slide_layer in found else None
        if cur is None and found:
            cur = find_slide_layer(self.viewer)
            if cur is not None:
                try:
                    self.state.set_slide_layer(cur)  # emits slide_changed -> _on_state_changed
                except Exception:  # noqa: BLE001 - an unreadable slide: listed, not chosen
                    cur = None
        if cur is None and self.state.slide_layer is not None and not found:
            self.state.set_slide_layer(None)
        self._fill(found, cur)

    def _fill(self, found: list[Any], cur: Any) -> None:
        blocked = self.blockSignals(True)
        self.clear()
        if not found:
            self.addItem(NO_SLIDE, None)
        for ly in found:
            self.addItem(ly.name, ly)
        if cur is not None and cur in found:
            self.setCurrentIndex(found.index(cur))
        self.blockSignals(blocked)

    def _on_picked(self, index: int) -> None:
        layer = self.itemData(index)
        if layer is not None and layer != self.state.slide_layer:
            try:
                self.state.set_slide_layer(layer)
            except StgenError as e:
                from napari.utils.notifications import show_error

                show_error(str(e))

    def _on_state_changed(self, layer: Any) -> None:
        try:
            found = slide_layers(self.viewer)
            self._fill(found, layer)
        except RuntimeError:  # the Qt side is gone
            pass
