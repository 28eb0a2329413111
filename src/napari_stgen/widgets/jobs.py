"""Progress bars of worker jobs, closed exactly once per job (shared by the widgets).

A napari ``progress`` bar is created on the first progress message of a job and closed when
the job finishes. Creating a bar can process Qt events, so a job's *finished* signal may be
handled re-entrantly before the bar exists; :class:`JobProgress` remembers finished jobs and
closes such a bar at once, so no bar (nor the activity spinner) is left running; progress
reported while a bar is being created is applied once it exists (no nested creation).
"""

from __future__ import annotations

import weakref
from typing import Any

__all__ = ["JobProgress"]


class JobProgress:
    """One napari progress bar per job token (any object with a ``cancelled`` flag)."""

    def __init__(self) -> None:
        self._bars: dict[int, tuple[Any, Any]] = {}  # id(token) -> (token, bar)
        self._finished: weakref.WeakSet = weakref.WeakSet()
        self._creating: set[int] = set()  # bars being created (creation processes events)
        self._pending: dict[int, int] = {}  # progress reported meanwhile

    def __len__(self) -> int:
        return len(self._bars)

    def update(self, token: Any, done: int, total: int, desc: str) -> None:
        """Show ``done`` / ``total`` for the job of ``token`` (creating its bar if needed)."""
        if token in self._finished or getattr(token, "cancelled", False) or total <= 0:
            return
        if id(token) in self._creating:
            self._pending[id(token)] = int(done)  # a message handled while creating the bar
            return
        entry = self._bars.get(id(token))
        if entry is None:
            from napari.utils import progress

            self._creating.add(id(token))
            try:
                bar = progress(total=max(int(total), 1), desc=desc)
            finally:
                self._creating.discard(id(token))
            if token in self._finished or getattr(token, "cancelled", False):
                bar.close()  # the job finished while the bar was being created
                self._pending.pop(id(token), None)
                return
            entry = self._bars[id(token)] = (token, bar)
            done = max(int(done), self._pending.pop(id(token), 0))
        bar = entry[1]
        if bar.total != max(int(total), 1):
            bar.total = max(int(total), 1)
        if desc and bar.desc != desc:
            bar.set_description(desc)
        bar.n = int(done)
        bar.refresh()

    def finish(self, token: Any) -> None:
        """The job of ``token`` ended (done, failed or cancelled): close its bar."""
        self._finished.add(token)
        entry = self._bars.pop(id(token), None)
        if entry is not None:
            entry[1].close()

    def close_all(self) -> None:
        """Close every bar (the widget is closing or cancelling everything)."""
        for token, bar in list(self._bars.values()):
            self._finished.add(token)
            bar.close()
        self._bars.clear()


class DockProgress:
    """:class:`JobProgress`'s interface on a ``QProgressBar`` in a dock's footer.

    napari's global progress bar animates the activity indicator, and each frame repaints the
    main window: on a CPU-rendered display that took ~35 ms twenty times a second, starving
    the UI thread during a prediction. A plain determinate bar in the dock repaints only when
    the count changes; it hides when no job is running.
    """

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self._active: dict[int, Any] = {}
        self._finished: weakref.WeakSet = weakref.WeakSet()
        policy = bar.sizePolicy()
        policy.setRetainSizeWhenHidden(True)  # showing it never moves the dock's layout
        bar.setSizePolicy(policy)
        bar.setVisible(False)

    def __len__(self) -> int:
        return len(self._active)

    def update(self, token: Any, done: int, total: int, desc: str) -> None:
        """Show ``done`` / ``total`` for the job of ``token``."""
        if token in self._finished or getattr(token, "cancelled", False) or total <= 0:
            return
        self._active[id(token)] = token
        try:
            self.bar.setMaximum(max(int(total), 1))
            self.bar.setValue(min(int(done), max(int(total), 1)))
            self.bar.setFormat(f"{desc}: %v/%m")
            self.bar.setVisible(True)
        except RuntimeError:  # the bar is gone with its dock
            pass

    def finish(self, token: Any) -> None:
        """The job of ``token`` ended: hide the bar when no job is left."""
        self._finished.add(token)
        self._active.pop(id(token), None)
        if not self._active:
            self._hide()

    def _hide(self) -> None:
        try:
            self.bar.setVisible(False)
        except RuntimeError:  # the bar is gone with its dock
            pass

    def close_all(self) -> None:
        """Forget every job and hide the bar."""
        for token in self._active.values():
            self._finished.add(token)
        self._active.clear()
        self._hide()
