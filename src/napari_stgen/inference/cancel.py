"""The package's one cancellation token, and an adapter for the other stop signals it accepts.

Long-running library work (prediction batches, sampler steps) checks a token between steps;
GUI workers cancel it from the UI thread. :func:`as_token` lets a library function also take
a callable, a ``threading.Event``, a bool or None.
"""

from __future__ import annotations

import threading
from typing import Any

from napari_stgen.errors import Cancelled

__all__ = ["CancelToken", "as_token", "is_cancelled"]


class CancelToken:
    """A thread-safe flag; :meth:`check` raises :class:`Cancelled` once it is set."""

    def __init__(self, message: str = "prediction cancelled") -> None:
        self._event = threading.Event()
        self.message = message

    def cancel(self) -> None:
        """Ask the work using this token to stop at its next check."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if cancelled."""
        if self._event.is_set():
            raise Cancelled(self.message)


def is_cancelled(cancel: Any) -> bool:
    """Whether a stop signal is set: a token (``cancelled``), a callable, an Event, a bool."""
    if cancel is None:
        return False
    flag = getattr(cancel, "cancelled", None)
    if flag is not None and not callable(flag):
        return bool(flag)
    if callable(cancel):
        return bool(cancel())
    is_set = getattr(cancel, "is_set", None)
    return bool(is_set()) if callable(is_set) else bool(cancel)


class _Adapted:
    """Any stop signal behind the token's ``cancelled`` / ``check()`` interface."""

    def __init__(self, cancel: Any, message: str) -> None:
        self._c = cancel
        self.message = message

    @property
    def cancelled(self) -> bool:
        return is_cancelled(self._c)

    def check(self) -> None:
        if is_cancelled(self._c):
            raise Cancelled(self.message)


def as_token(cancel: Any, message: str = "cancelled") -> Any:
    """``cancel`` (token, callable, Event, bool or None) with ``cancelled`` and ``check()``;
    ``check`` raises :class:`Cancelled` with ``message``."""
    return _Adapted(cancel, message)
