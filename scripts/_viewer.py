"""Shared set-up of the screenshot scripts: napari on the bundled sample with one plugin dock
widget, and an event pump (the scripts drive the real widgets, so Qt must run between steps)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def sample_viewer(
    widget: str, size: tuple[int, int], threads: int | None = None, genst: str | None = None
) -> tuple[Any, Any, Any, Callable[[float], None]]:
    """(viewer, dock, its widget, pump) with the bundled sample slide opened by the plugin reader.

    ``threads``: torch CPU threads of the widgets (None: the policy, usable cores − 1).
    ``genst`` chooses the GenST model in the shared widget state before the widget is added.
    """
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_stgen.io.sample import sample_slide_path
    from napari_stgen.widgets.state import get_state

    viewer = napari.Viewer(show=True)
    viewer.window.resize(*size)
    viewer.open(str(sample_slide_path()), plugin="napari-stgen")
    get_state(viewer).set_threads(threads)
    if genst is not None:
        get_state(viewer).set_model(genst)
    dock, w = viewer.window.add_plugin_dock_widget("napari-stgen", widget)
    app = QApplication.instance()

    def pump(seconds: float) -> None:
        """Process Qt events for ``seconds``."""
        t = time.perf_counter() + seconds
        while time.perf_counter() < t:
            app.processEvents()
            time.sleep(0.01)

    return viewer, dock, w, pump
