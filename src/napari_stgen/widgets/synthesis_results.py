"""The Synthesize dock's results: variants by seed, before/after, Keep and Discard."""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_stgen.io.anndata import GeneratedTile
from napari_stgen.io.layer_meta import GENERATED, layer_kind, with_info

__all__ = ["OVERLAY_KINDS", "ResultsMixin", "offset_text"]

OVERLAY_KINDS = ("heatmap", "spots", "tiles", "codes")  # hidden in the "before" view


def offset_text(rec: dict) -> str:
    """'GENE +0.50, ...': the slider offsets recorded in a generated tile's record."""
    ex = rec.get("extra", {})
    gs, vs = list(ex.get("offset_genes", [])), list(ex.get("offset_values", []))
    return ", ".join(f"{g} {float(v):+.2f}" for g, v in zip(gs, vs, strict=False)) or "none"


class ResultsMixin:
    """Result handling of :class:`~napari_stgen.widgets.synthesize.SynthesizeWidget` (its
    ``viewer``, ``result``, ``preview_layer``, ``region_layer``, ``kept``, ``kept_layers``,
    result buttons and ``_hidden_overlays``)."""

    result: Any
    preview_layer: Any
    viewer: Any

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
        self.preview_layer.metadata = with_info(
            self.preview_layer.metadata, kind=GENERATED, tile=self.result.records[k]
        )
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
            kind = layer_kind(ly.metadata)
            if ly.visible and (kind in OVERLAY_KINDS or ly == self.region_layer):
                ly.visible = False
                self._hidden_overlays.append(ly)

    def keep(self) -> Any:
        """Keep the shown variant: it becomes a named layer, listed and exportable."""
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
            f"{tile.guidance_morph:g}; {offset_text(rec)}"
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
