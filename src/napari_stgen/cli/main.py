"""``stgen`` entry point.

Each area owns a module here with ``register(subparsers)`` (top-level commands) and/or
``register_train(sub)`` / ``register_evaluate(sub)`` (``stgen train X`` / ``stgen evaluate X``).
A command sets ``func`` (called with the parsed args, returns an exit code or None), named
with ``cli.lazy.command("<area>_commands:<function>")`` so its module (and torch) loads only
when the command runs. Errors with a user-facing reason (``StgenError``, missing or
unreadable files, out of memory) print one line (the library's parameter names as flags, see
``cli.flags``) and exit 2, no traceback; anything else is a bug, printed as one ``internal
error`` line with exit 1 (``STGEN_DEBUG=1``: the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from napari_stgen import __version__
from napari_stgen.cli import batch, demo, genst, histotx, predict, slide, stmdit
from napari_stgen.cli.flags import cli_message
from napari_stgen.errors import StgenError

# Modules that contribute commands (argument registration only: handlers load on use).
_AREAS = (slide, genst, predict, batch, stmdit, histotx, demo)


def build_parser() -> argparse.ArgumentParser:
    """The full ``stgen`` argument parser."""
    p = argparse.ArgumentParser(
        prog="stgen",
        description="napari-stgen: predict, explain and generate spatial gene expression on H&E.",
    )
    p.add_argument("--version", action="version", version=f"napari-stgen {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser("train", help="train a model on real data")
    train_sub = train.add_subparsers(dest="model", metavar="MODEL")
    evaluate = sub.add_parser("evaluate", help="evaluate a model (prints JSON figures)")
    eval_sub = evaluate.add_subparsers(dest="model", metavar="MODEL")
    for mod in _AREAS:
        if hasattr(mod, "register"):
            mod.register(sub)
        if hasattr(mod, "register_train"):
            mod.register_train(train_sub)
        if hasattr(mod, "register_evaluate"):
            mod.register_evaluate(eval_sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``stgen``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        rc = func(args)
    except StgenError as e:
        print(f"stgen: error: {cli_message(str(e))}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"stgen: error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stgen: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("stgen: error: out of memory", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a bug: one line unless STGEN_DEBUG asks for more
        if os.environ.get("STGEN_DEBUG"):
            raise
        msg = " ".join(str(e).split())[:300]
        print(
            f"stgen: internal error: {type(e).__name__}: {msg} (STGEN_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
