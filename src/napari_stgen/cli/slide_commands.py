"""Handler of ``stgen info`` (arguments: ``cli/slide.py``)."""

from __future__ import annotations

import argparse
import json

from napari_stgen.io.slide import open_slide


def info(args: argparse.Namespace) -> int:
    """``stgen info SLIDE``."""
    with open_slide(args.slide, mpp=args.mpp) as slide:
        info = slide.info()
    print(json.dumps(info, indent=2))
    return 0
