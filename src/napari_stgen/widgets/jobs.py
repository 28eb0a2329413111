"""Worker jobs of the widgets: their lifecycle (:class:`WidgetJobs`) and progress bars.

A napari ``progress`` bar is created on the first progress message of a job and closed when
the job finishes. Creating a bar can process Qt events, so a job's *finished* signal may be
handled re-entrantly before the bar exists; :class:`JobProgress` remembers finished jobs and
closes such a bar at once, so no bar (nor the activity spinner) is left running; progress
reported while a bar is being created is applied once it exists (no nested creation).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from napari_stgen.errors import Cancelled, StgenError
from napari_stgen.inference.cancel import CancelToken
from napari_stgen.widgets.close_watcher import CloseWatcher

__all__ = ["DockProgress", "Failed", "JobProgress", "JobSpec", "WidgetJobs", "guarded"]


@dataclass
class JobSpec:
    """How a job reports back: progress label, result and end callbacks, failure prefix."""

    desc: str | None = None  # progress-bar label; the worker yields (done, total)
    on_return: Callable[[Any], None] | None = None
    on_finished: Callable[[Any, bool], None] | None = None  # (token, was it the newest)
    failed: str = ""  # "<failed>: <error>" is notified when the worker raises


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
            from napari.utils import progress  # napari: loaded on the first bar

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


# ----------------------------------------------------------------------------- worker lifecycle
class Failed:
    """A worker's clear, expected failure (StgenError): returned and shown, not raised in Qt."""

    def __init__(self, message: str) -> None:
        self.message = message


def guarded(what: str, gen: Generator[Any, None, Any]) -> Generator[Any, None, Any]:
    """Run a job generator: cancelled → None, a ``StgenError`` → :class:`Failed` ("what failed")."""
    try:
        return (yield from gen)
    except Cancelled:
        return None
    except StgenError as e:
        return Failed(f"{what} failed: {e}")


class WidgetJobs:
    """The worker lifecycle of a dock widget, shared by Predict and Synthesize.

    Each job has a *kind* ('predict', 'profile', 'generate', 'load', ...). :meth:`new_token`
    cancels the running job of that kind (a newer request cancels the older one) and issues
    a fresh :class:`CancelToken`; :meth:`start` runs a napari ``thread_worker`` with progress
    (``(done, total)`` yields when ``desc`` is given), its result, and an error notification;
    when a job ends its progress bar closes and its token is retired. The widget's window
    closing calls ``on_close``; the widget's destruction cancels every token still live.
    """

    def __init__(
        self,
        widget: Any,
        progress: Any,
        notify: Callable[[str, bool], None],
        on_close: Callable[[], object],
    ) -> None:
        self.widget = widget
        self.progress = progress
        self.notify = notify
        self.workers: list[Any] = []  # running workers (newest last)
        self.tokens: dict[str, CancelToken] = {}  # the newest token of each kind
        live = self._live = []  # every unfinished token; the destroyed hook holds only this
        self._closer = CloseWatcher(on_close)
        self._watched: int | None = None
        widget.destroyed.connect(lambda *_: [t.cancel() for t in list(live)])

    @property
    def busy(self) -> bool:
        """Whether any worker is running."""
        return bool(self.workers)

    def new_token(self, kind: str) -> CancelToken:
        """Cancel the running job of ``kind`` and return the token of its successor."""
        self.cancel(kind)
        tok = self.tokens[kind] = CancelToken()
        self._live.append(tok)
        return tok

    def is_current(self, kind: str, token: Any) -> bool:
        """Whether ``token`` is the newest of ``kind`` and not cancelled."""
        return token is self.tokens.get(kind) and not token.cancelled

    def start(self, kind: str, worker: Any, token: Any = None, spec: JobSpec | None = None) -> Any:
        """Start ``worker`` (a napari worker, not started) as a job of ``kind``."""
        spec = spec or JobSpec()
        worker._stgen_kind = kind
        if spec.desc is not None and token is not None:
            worker.yielded.connect(lambda p, t=token: self.progress.update(t, *p, spec.desc))
        if spec.on_return is not None:
            worker.returned.connect(spec.on_return)
        if spec.failed:
            worker.errored.connect(lambda e: self.notify(f"{spec.failed}: {e}", True))
        worker.finished.connect(lambda w=worker, t=token: self._finished(w, kind, t, spec))
        self.workers.append(worker)
        self._watch_window()
        worker.start()
        return worker

    def _finished(self, worker: Any, kind: str, token: Any, spec: JobSpec) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        current = token is not None and self.tokens.get(kind) is token
        if token is not None:
            if token in self._live:
                self._live.remove(token)
            self.progress.finish(token)
        if current:
            self.tokens.pop(kind, None)
        if spec.on_finished is not None:
            spec.on_finished(token, current)

    def cancel(self, *kinds: str) -> None:
        """Cancel the jobs of ``kinds`` (all tokens and workers when none is given): their
        tokens stop them at the next check, their workers quit, their bars close."""
        for kind, tok in list(self.tokens.items()):
            if not kinds or kind in kinds:
                tok.cancel()
                self.progress.finish(tok)
        for w in list(self.workers):
            if not kinds or getattr(w, "_stgen_kind", None) in kinds:
                w.quit()

    def shutdown(self) -> None:
        """Cancel every job (the viewer is closing) and close every bar."""
        for tok in list(self._live):
            tok.cancel()
        self.cancel()
        self.progress.close_all()

    def _watch_window(self) -> None:
        win = self.widget.window()
        if win is not self.widget and id(win) != self._watched:
            win.installEventFilter(self._closer)
            self._watched = id(win)  # an id, not the window: no reference cycle to leak it
