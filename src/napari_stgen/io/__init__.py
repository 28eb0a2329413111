"""Reading and writing: slides (lazy pyramids), spot tables, AnnData. No napari, no torch."""
