"""Dock layout shared by the widgets: a scrolling body and a footer that always shows.

With Predict, Codebook, Synthesize and Export docked together on a 1280 × 800 screen, each
dock gets a fraction of the height: the body scrolls, the footer (primary buttons and the
status line) stays visible, and the dock asks for little height so the window never grows
past the screen.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import QSize, Qt
from qtpy.QtWidgets import QFrame, QScrollArea, QSizePolicy, QSpinBox, QVBoxLayout, QWidget

from napari_stgen.inference.device import default_threads, usable_cores
from napari_stgen.widgets.state import get_state

__all__ = ["ViewerDock", "scrolling_dock", "collapsible", "shrinkable", "threads_spin"]

MIN_BODY_PX = 60
PREFERRED_BODY_PX = 420  # asked for when there is room; the dock may get less (it scrolls)


class ViewerDock(QWidget):
    """A napari-stgen dock: its ``viewer`` and the viewer's shared ``state`` (``get_state``)."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)


class _VerticalScroll(QScrollArea):
    """Scrolls vertically only: as wide as its content wants, as tall as the dock allows."""

    def _bar(self) -> int:
        return self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt API)
        inner = self.widget().sizeHint() if self.widget() is not None else QSize(0, 0)
        return QSize(inner.width() + self._bar(), min(inner.height(), PREFERRED_BODY_PX))

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt API)
        inner = self.widget().minimumSizeHint() if self.widget() is not None else QSize(0, 0)
        return QSize(inner.width() + self._bar(), MIN_BODY_PX)


def scrolling_dock(widget: QWidget) -> tuple[QVBoxLayout, QVBoxLayout]:
    """Give ``widget`` a scroll area and a fixed footer; returns (body layout, footer layout)."""
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(2, 2, 2, 2)
    outer.setSpacing(4)
    scroll = _VerticalScroll()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
    scroll.setMinimumHeight(MIN_BODY_PX)
    scroll.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Expanding)
    body = QWidget()
    body_lay = QVBoxLayout(body)
    body_lay.setContentsMargins(4, 4, 4, 4)
    scroll.setWidget(body)
    outer.addWidget(scroll, 1)
    footer = QVBoxLayout()
    footer.setContentsMargins(4, 0, 4, 2)
    outer.addLayout(footer)
    widget.scroll_area = scroll  # tests and screenshots scroll it
    return body_lay, footer


def shrinkable(combo: QWidget, chars: int = 10) -> QWidget:
    """Let a combo box shrink to ``chars`` characters (long layer names never widen a dock)."""
    from qtpy.QtWidgets import QComboBox

    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(chars)
    return combo


def collapsible(title: str, layout_items: QWidget | None = None, expanded: bool = False):
    """A superqt ``QCollapsible`` section titled ``title`` (collapsed by default)."""
    from superqt import QCollapsible

    box = QCollapsible(title)
    if layout_items is not None:
        box.addWidget(layout_items)
    if expanded:
        box.expand(animate=False)
    else:
        box.collapse(animate=False)
    return box


def threads_spin(state: object) -> QWidget:
    """A spin box of the viewer's torch CPU threads (shared by the widgets via the state)."""
    spin = QSpinBox()
    spin.setRange(1, usable_cores())
    spin.setValue(state.threads or default_threads())
    spin.setToolTip(
        f"torch threads for inference; default {default_threads()} = usable cores − 1, "
        "leaving a core to the viewer"
    )
    spin.valueChanged.connect(lambda v: state.set_threads(int(v)))

    def follow(n: int) -> None:
        try:
            if n and spin.value() != n:
                blocked = spin.blockSignals(True)
                spin.setValue(n)
                spin.blockSignals(blocked)
        except RuntimeError:  # the spin box is gone
            state.threads_changed.disconnect(follow)

    state.threads_changed.connect(follow)
    return spin
