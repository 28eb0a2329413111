"""Library parameter names in error messages → ``stgen`` flags.

Library code (``io/``, ``inference/``) names its parameters (``mpp=``, ``overwrite=True``);
the CLI rewrites them to its flags before printing: ``cli.main`` applies :data:`COMMON` to
every error, a command its own table (e.g. ``cli.predict.FLAGS``).
"""

from __future__ import annotations

from collections.abc import Sequence

from napari_stgen.errors import StgenError

Flags = Sequence[tuple[str, str]]

#: phrases any command's library calls may raise → the flags every command that reads a
#: slide or writes a file has
COMMON: Flags = (
    ("pass mpp= (µm/px)", "pass --mpp MPP"),
    ("mpp= must", "--mpp must"),
    ("overwrite=True", "--overwrite"),
)


def cli_message(msg: str, flags: Flags = COMMON) -> str:
    """``msg`` with the library's parameter names replaced by the CLI flags."""
    for name, flag in flags:
        msg = msg.replace(name, flag)
    return msg


def cli_error(e: StgenError, flags: Flags = COMMON) -> StgenError:
    """``e`` with the library's parameter names replaced by the CLI flags (same type)."""
    msg = cli_message(str(e), flags)
    if msg == str(e):
        return e
    try:
        return type(e)(msg)
    except TypeError:  # an error type with another constructor: keep the reason
        return StgenError(msg)
