"""A Qt event filter that calls back when the window it watches closes."""

from __future__ import annotations

from collections.abc import Callable

from qtpy.QtCore import QEvent, QObject


class CloseWatcher(QObject):
    """Stops a widget's work when its top-level window closes (install on that window)."""

    def __init__(self, callback: Callable[[], object]) -> None:
        super().__init__()
        self._callback = callback

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt API)
        if event.type() == QEvent.Type.Close:
            self._callback()
        return False


def disconnect_on_destroyed(obj: QObject, pairs: list[tuple[object, Callable]]) -> None:
    """Disconnect each (signal, slot) of ``pairs`` when ``obj`` is destroyed (the hook holds
    the signals and slots, not ``obj``)."""

    def _disc(*_: object) -> None:
        for sig, slot in pairs:
            try:
                sig.disconnect(slot)
            except Exception:  # noqa: BLE001 - already gone
                pass

    obj.destroyed.connect(_disc)
