"""Writes that leave either the old file or the complete new one, never a partial file.

``with atomic_path(path) as tmp:`` gives a temp path beside ``path`` (same folder, so the
rename is atomic, and the same suffix, so writers that add one — ``np.save`` — keep it); when
the block ends the temp file is renamed onto ``path``, and when it raises it is removed. The
temp name carries the process id and a random part, so two processes writing the same file
(e.g. two evaluations filling one cache) each rename a complete file of their own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_text_atomic"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path to write ``path``'s new content to; renamed into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file in the same folder renamed into place."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
