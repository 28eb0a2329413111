"""Tiling, batched prediction with cache and cancellation, synthesis. No napari."""
