"""Stain normalisation (inference/stain.py) on real H&E from the sample slide."""

from __future__ import annotations

import numpy as np
import pytest

from napari_stgen.inference.stain import METHODS, normalise, stain_stats


def _patches(rgb: np.ndarray, px: int = 100) -> np.ndarray:
    h, w = rgb.shape[0] // px * px, rgb.shape[1] // px * px
    p = rgb[:h, :w].reshape(h // px, px, w // px, px, 3).swapaxes(1, 2).reshape(-1, px, px, 3)
    return np.ascontiguousarray(p)


def _restain(p: np.ndarray) -> np.ndarray:
    """The same tissue with a paler haematoxylin and a stronger eosin (an optical-density
    change, as a different lab's staining would make)."""
    od = -np.log(np.clip(p / 255.0, 1 / 255, 1))
    od = od * np.array([0.7, 1.25, 0.9])
    return np.round(np.exp(-od) * 255).astype(np.uint8)


@pytest.mark.parametrize("method", METHODS)
def test_own_statistics_are_near_identity(tissue_rgb, method):
    p = _patches(tissue_rgb)[:40]
    st = stain_stats(p, method)
    out = normalise(p, st, st)
    assert out.shape == p.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - p.astype(int)).mean() < 2.0


@pytest.mark.parametrize("method", METHODS)
def test_restained_tissue_moves_back_towards_the_reference(tissue_rgb, method):
    ref_p = _patches(tissue_rgb)[:40]
    moved = _restain(ref_p)
    ref, src = stain_stats(ref_p, method), stain_stats(moved, method)
    back = normalise(moved, src, ref)
    err_before = np.abs(moved.astype(int) - ref_p.astype(int)).mean()
    err_after = np.abs(back.astype(int) - ref_p.astype(int)).mean()
    assert err_after < 0.6 * err_before, (err_before, err_after)


def test_unknown_method_is_named(tissue_rgb):
    with pytest.raises(ValueError, match="macenko"):
        stain_stats(_patches(tissue_rgb)[:2], "macenko")
