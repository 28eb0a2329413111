"""Thin napari dock widgets over the library."""
