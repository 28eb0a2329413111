"""The Synthesize dock's region: a Shapes rectangle or a Points click on a picked layer."""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_stgen.inference.synthesis_plan import point_region

__all__ = ["NO_REGION", "REGION_LAYER", "RegionLayerMixin"]

REGION_LAYER = "Synthesis region"
NO_REGION = "(none: draw or pick a layer)"


class RegionLayerMixin:
    """Region-layer handling of :class:`~napari_stgen.widgets.synthesize.SynthesizeWidget`
    (its ``viewer``, ``region_layer``, ``region_combo``, ``model``, ``preview_layer``,
    ``result``, ``kept_layers`` and ``_region_timer``)."""

    region_layer: Any
    viewer: Any

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
