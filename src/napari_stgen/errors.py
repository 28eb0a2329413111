"""Errors that carry a one-line, user-facing reason."""

from __future__ import annotations


class StgenError(Exception):
    """A problem with the user's input (file, argument, checkpoint) with a clear message.

    The CLI prints ``stgen: error: <message>`` and exits non-zero without a traceback;
    widgets show the message as a napari notification.
    """


class SlideReadError(StgenError):
    """A slide file could not be opened or decoded. The message names the file."""


class CheckpointError(StgenError):
    """A checkpoint is missing, corrupted, or does not match what was asked for."""


class Cancelled(Exception):
    """Raised inside long-running work when its cancellation token is set."""
