"""Subcommand handlers imported when their command runs, so ``stgen --help`` stays light.

A registration module (``cli/<area>.py``) names its handlers as ``"<module>:<function>"`` of
this package's ``cli``; the handler modules (``cli/<area>_commands.py``) import what they
use at their top (torch, the trainers) and are loaded only by the command that needs them.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

__all__ = ["command"]


def command(target: str) -> Callable[[argparse.Namespace], int]:
    """The handler ``"module:function"`` (a module of ``napari_stgen.cli``), loaded on call."""
    module, _, name = target.partition(":")

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)(args)

    run.__qualname__ = run.__name__ = name
    return run
