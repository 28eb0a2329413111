"""HER2ST / AnnData section readers, normalization, benchmark genes, patches."""

from __future__ import annotations

import numpy as np
import pytest

from napari_stgen.errors import StgenError
from napari_stgen.inference.patches import read_patches, tissue_fraction
from napari_stgen.io.her2st import (
    benchmark_genes,
    common_genes,
    gene_panel,
    list_sections,
    mpp_from_pitch,
    normalize_log1p_cp10k,
    read_anndata_section,
    read_her2st_section,
    read_sections,
    smooth_over_neighbours,
    spot_neighbours,
)


@pytest.fixture(scope="module")
def sections(her2st_dir):
    return read_sections(her2st_dir)


def test_normalize_log1p_cp10k_formula():
    c = np.array([[1, 3, 0], [0, 0, 0], [10, 0, 10]], dtype=np.float32)
    y = normalize_log1p_cp10k(c)
    assert np.allclose(y[0], np.log1p([2500, 7500, 0]), rtol=1e-6)
    assert np.all(y[1] == 0)
    assert np.allclose(y[2], np.log1p([5000, 0, 5000]), rtol=1e-6)
    assert y.dtype == np.float32


def test_mpp_from_pitch_recovers_scale():
    a = np.array([[x, y] for x in range(5) for y in range(4)], dtype=float)
    px = a * 250.0 + 17.0  # 200 µm per 250 px = 0.8 µm/px
    assert mpp_from_pitch(a, px) == pytest.approx(0.8)


def test_read_section_c3(her2st_c3_dir):
    s = read_her2st_section(her2st_c3_dir, "C3")
    assert s.n_spots > 150 and s.counts.shape == (s.n_spots, len(s.genes))
    assert all("x" in b for b in s.barcodes)
    x, y = map(int, s.barcodes[0].split("x"))
    assert tuple(s.array_xy[0]) == (x, y)
    # spot pitch ~290 px in these images at 200 µm → about 0.69 µm/px
    assert 0.6 < s.mpp < 0.8
    assert s.image_path.name == "C3.jpg"
    with pytest.raises(StgenError, match="missing"):
        read_her2st_section(her2st_c3_dir, "Z9")


def test_list_sections(her2st_dir, tmp_path):
    assert list_sections(her2st_dir) == ["B4", "C2", "C3", "C4", "C5"]
    with pytest.raises(StgenError, match="no HER2ST sections"):
        read_sections(tmp_path)


def test_benchmark_genes_are_top_variance(sections):
    bench = benchmark_genes(sections, 50)
    assert len(bench) == 50 == len(set(bench))
    genes = common_genes(sections)
    assert set(bench) <= set(genes)
    y = np.concatenate([s.target(genes) for s in sections], 0)
    var = dict(zip(genes, y.var(0), strict=True))
    worst_in = min(var[g] for g in bench)
    best_out = max(v for g, v in var.items() if g not in set(bench))
    assert worst_in >= best_out
    panel = gene_panel(sections, 250)
    assert panel[:50] == bench and len(panel) == 250 == len(set(panel))


def test_neighbours_and_smoothing():
    a = np.array([[0, 0], [1, 0], [5, 5]])
    nb = spot_neighbours(a)
    assert list(nb[0]) == [1] and list(nb[2]) == []
    v = np.array([[0.0], [2.0], [7.0]], dtype=np.float32)
    s = smooth_over_neighbours(v, nb, 0.5)
    assert s[:, 0].tolist() == [1.0, 1.0, 7.0]


def test_read_anndata_section_visium(visium_crop_dir):
    s = read_anndata_section(visium_crop_dir / "spots.h5ad", visium_crop_dir / "he_crop.jpg")
    assert s.n_spots == 49 and s.counts.shape[1] == 1999
    assert 0.4 < s.mpp < 0.9  # 55 µm / ~89 px
    p = read_patches(np.zeros((100, 100, 3), np.uint8), s.xy_px[:2] * 0 + 50, 40.0, 16, mpp=1.0)
    assert p.shape == (2, 16, 16, 3)


def test_read_patches_array_geometry():
    img = np.full((200, 300, 3), 255, np.uint8)
    img[90:110, 140:160] = 0  # a 20 px black square centred at (150, 100)
    p = read_patches(img, np.array([[150.0, 100.0]]), patch_um=40.0, out_px=20, mpp=1.0)
    assert p.shape == (1, 20, 20, 3)
    assert p[0, 5:15, 5:15].max() == 0 and p[0, 0, 0].min() == 255
    # outside the image is white
    q = read_patches(img, np.array([[0.0, 0.0]]), patch_um=40.0, out_px=20, mpp=1.0)
    assert q[0, :5, :5].min() == 255
    with pytest.raises(StgenError, match="mpp"):
        read_patches(img, np.array([[1.0, 1.0]]), 40.0, 20)
    frac = tissue_fraction(np.concatenate([p, q]))
    assert frac[0] == pytest.approx(0.25) and frac[1] < frac[0]
