"""napari-stgen: spatial gene expression from H&E slides, in napari.

Heavy modules (torch, napari, openslide) are imported lazily so that the plugin
and the ``stgen`` CLI start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from napari_stgen.io.slide import Slide, open_slide

__all__ = ["Slide", "open_slide", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("open_slide", "Slide"):
        from napari_stgen.io import slide

        return getattr(slide, name)
    raise AttributeError(f"module 'napari_stgen' has no attribute {name!r}")
