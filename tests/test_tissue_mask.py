"""Tissue mask of the bundled sample (HER2ST C3): the grey smudge on its glass is not tissue,
the section is, whole."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from napari_stgen.inference.patches import stained_pixels
from napari_stgen.inference.tiles import otsu_threshold, tissue_cells, tissue_pixels


def test_smudge_dropped_section_kept(sample_slide_path):
    from napari_stgen.coords import Grid
    from napari_stgen.io.slide import open_slide

    with open_slide(sample_slide_path) as s:
        thumb = np.asarray(s.thumbnail(max_px=2048))[..., :3]
        grid = Grid((0.0, 0.0), 224.0, (int(np.ceil(s.height * s.mpp / 224)),
                                        int(np.ceil(s.width * s.mpp / 224))))  # fmt: skip
        cells = tissue_cells(s, grid)
    gray = thumb.astype(np.float32).mean(-1)
    before = stained_pixels(thumb) & (gray < min(max(otsu_threshold(gray), 180.0), 215.0))
    after = tissue_pixels(thumb)
    assert not (after & ~before).any()  # only ever removes
    lab, n = ndi.label(before, structure=np.ones((3, 3)))
    sizes = np.bincount(lab.ravel())[1:]
    section = lab == 1 + int(np.argmax(sizes))
    assert after[section].all()  # the section, every pixel of it
    # the smudge: the largest piece outside the section with almost no colour
    hi, lo = thumb.max(-1).astype(np.float32), thumb.min(-1).astype(np.float32)
    sat = (hi - lo) / np.maximum(hi, 1)
    idx = np.arange(1, n + 1)
    grey = idx[(sizes > 200) & (ndi.mean(sat, lab, idx) < 0.12)]
    assert len(grey), "the sample's smudge is found as a grey piece of the old mask"
    assert not after[np.isin(lab, grey)].any()
    # on the tile grid: one connected piece of tissue cells (no tiles on the glass)
    assert ndi.label(cells, structure=np.ones((3, 3)))[1] == 1
