"""The Predict dock's display: heatmaps / spot circles per gene, the uncertainty and tiles
layers, and batched redraws while results stream in."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from napari_stgen.widgets import layers as L
from napari_stgen.widgets.predict_ui import NO_UNCERTAINTY_TIP, UNCERTAINTY_TIP

__all__ = ["REDRAW_MS", "HeatmapDisplayMixin"]

REDRAW_MS = 200  # at most one heatmap redraw per this interval while batches stream in


class HeatmapDisplayMixin:
    """Display handling of :class:`~napari_stgen.widgets.predict.PredictWidget` (its
    ``viewer``, ``state``, ``genes``, display controls, ``_pending_tiles`` and redraw timer)."""

    viewer: Any
    state: Any

    def _style(self) -> dict[str, Any]:
        return {
            "colormap": self.cmap_combo.currentText(),
            "opacity": self.opacity_slider.value() / 100.0,
        }

    def _redraw_gene(
        self, gene: str, new_tiles: np.ndarray | None = None, exact: bool = True
    ) -> None:
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
        for g in self.genes:
            self._redraw_gene(g, new_tiles, exact)
        self._redraw_uncertainty(new_tiles, exact)
        if points and self.points_check.isChecked() and len(self.state.store):
            L.update_tiles_points(self.viewer, self.state.store, self.markers_check.isChecked())

    def _redraw_uncertainty(self, new_tiles: np.ndarray | None = None, exact: bool = True) -> None:
        """The uncertainty layer, while its box is ticked and the store has uncertainties."""
        store = self.state.store
        if not self.uncertainty_check.isChecked() or store.grid is None or not len(store):
            return
        if not store.has_uncertainty:  # e.g. HistoTx image only: say why, show nothing stale
            self.uncertainty_check.setToolTip(NO_UNCERTAINTY_TIP)
            layer = L.find_layer(self.viewer, L.UNCERTAINTY_LAYER)
            if layer is not None:
                layer.visible = False
            return
        self.uncertainty_check.setToolTip(UNCERTAINTY_TIP)
        L.update_uncertainty(
            self.viewer, store, new_tiles, opacity=self._style()["opacity"], exact=exact
        )

    def _on_uncertainty(self, on: bool) -> None:
        if on:
            self._redraw_uncertainty()
        layer = L.find_layer(self.viewer, L.UNCERTAINTY_LAYER)
        if layer is not None:
            layer.visible = bool(on)

    def _on_markers(self, on: bool) -> None:
        layer = L.find_layer(self.viewer, L.TILES_LAYER)
        if layer is not None:
            L.show_tile_markers(layer, on)

    def _apply_style(self, *_: Any) -> None:
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
