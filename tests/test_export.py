"""AnnData export/import: round trips, scanpy alignment on real slides, atomic writes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_stgen.errors import StgenError
from napari_stgen.io.anndata import (
    GeneratedTile,
    Roi,
    predictions_to_anndata,
    read_generated_tiles,
    read_h5ad_layers,
    write_h5ad,
)
from napari_stgen.io.layer_meta import generated_record, layer_kind

REPO = Path(__file__).resolve().parents[1]


def sample_paths() -> tuple[Path, Path]:
    """The packaged HER2ST C3 sample slide and its spots CSV."""
    try:
        from napari_stgen.io.sample import sample_slide_path, sample_spots_path

        return Path(sample_slide_path()), Path(sample_spots_path())
    except ImportError:  # before the sample module lands
        return REPO / "sample_data" / "her2st_C3.tif", REPO / "sample_data" / "her2st_C3_spots.csv"


def _layers_by_type(layers, kind):
    return [ly for ly in layers if ly[2] == kind]


# ----------------------------------------------------------------------------- property test
names = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=8)


@st.composite
def exports(draw):
    n = draw(st.integers(1, 30))
    genes = draw(st.lists(names, min_size=1, max_size=6, unique=True))
    finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
    expr = np.array(draw(st.lists(finite, min_size=n * len(genes), max_size=n * len(genes))))
    expr = expr.astype(np.float32).reshape(n, len(genes))
    xy = np.array(draw(st.lists(st.floats(0, 1e5), min_size=2 * n, max_size=2 * n))).reshape(n, 2)
    mpp = draw(st.floats(0.1, 5.0))
    n_codes = draw(st.integers(1, 8))
    codes = np.array(draw(st.lists(st.integers(0, n_codes - 1), min_size=n, max_size=n)))
    code_names = {k: draw(names) for k in range(n_codes) if draw(st.booleans())}
    nv = [draw(st.integers(3, 6)) for _ in range(draw(st.integers(0, 3)))]
    rois = [
        Roi(
            np.array(draw(st.lists(st.floats(0, 1e4), min_size=2 * k, max_size=2 * k))).reshape(
                -1, 2
            ),
            draw(st.sampled_from(["polygon", "rectangle", "path"])),
            draw(names),
        )
        for k in nv
    ]
    gen = []
    for i in range(draw(st.integers(0, 2))):
        g = genes[: draw(st.integers(1, len(genes)))]
        gen.append(
            GeneratedTile(
                id=f"gen{i}",
                image=np.array(
                    draw(st.lists(st.integers(0, 255), min_size=4 * 5 * 3, max_size=4 * 5 * 3)),
                    dtype=np.uint8,
                ).reshape(4, 5, 3),
                origin_yx_um=(draw(st.floats(0, 1e4)), draw(st.floats(0, 1e4))),
                px_um=draw(st.floats(0.1, 2.0)),
                genes=list(g),
                condition=np.array(draw(st.lists(finite, min_size=len(g), max_size=len(g)))),
                guidance_genes=draw(st.floats(0, 10)),
                guidance_morph=draw(st.floats(0, 10)),
                steps=draw(st.integers(1, 100)),
                seed=draw(st.integers(0, 2**31 - 1)),
                model="stmdit-test",
                model_checksum=draw(st.text("0123456789abcdef", min_size=64, max_size=64)),
            )
        )
    return expr, genes, xy, mpp, codes, code_names, rois, gen


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exports())
def test_roundtrip_export_import(case):
    expr, genes, xy, mpp, codes, code_names, rois, gen = case
    adata = predictions_to_anndata(
        expr, genes, xy, mpp=mpp, codes=codes, code_names=code_names, rois=rois, generated=gen
    )
    with tempfile.TemporaryDirectory() as d:
        path = write_h5ad(adata, Path(d) / "x.h5ad")
        layers = read_h5ad_layers(path)
        tiles = read_generated_tiles(path)

    (pts,) = _layers_by_type(layers, "points")
    data, meta, _ = pts
    # coordinates in µm, napari (row, col) = (y, x)
    np.testing.assert_allclose(data, xy[:, ::-1] * mpp, rtol=1e-12, atol=1e-9)
    feats = meta["features"]
    np.testing.assert_array_equal(feats[genes].to_numpy(np.float32), expr)
    np.testing.assert_array_equal(feats["genst_code"].to_numpy(), codes)
    if code_names:
        want = [code_names.get(int(c), f"code {int(c)}") for c in codes]
        assert [str(v) for v in feats["genst_code_name"]] == want
    assert meta["metadata"]["stgen"]["mpp"] == pytest.approx(mpp)

    shapes = _layers_by_type(layers, "shapes")
    if rois:
        (sh,) = shapes
        assert len(sh[0]) == len(rois)  # every shape, not only the first
        for v, r in zip(sh[0], rois, strict=True):
            np.testing.assert_array_equal(v, r.vertices_yx_um)
        assert sh[1]["shape_type"] == [r.shape_type for r in rois]
        assert list(sh[1]["features"]["name"]) == [r.name for r in rois]
    else:
        assert not shapes

    assert len(tiles) == len(gen)
    imgs = [ly for ly in layers if ly[2] == "image" and generated_record(ly[1]["metadata"])]
    for t, want, img in zip(tiles, gen, imgs, strict=True):
        np.testing.assert_array_equal(t.image, want.image)
        np.testing.assert_array_equal(t.condition, want.condition.astype(np.float32))
        assert t.genes == want.genes
        assert (t.seed, t.steps, t.model_checksum) == (want.seed, want.steps, want.model_checksum)
        assert t.guidance_genes == want.guidance_genes
        assert t.guidance_morph == want.guidance_morph
        assert t.origin_yx_um == pytest.approx(want.origin_yx_um)
        s = want.px_um
        assert img[1]["scale"] == pytest.approx((s, s))
        assert img[1]["translate"] == pytest.approx(
            (want.origin_yx_um[0] + s / 2, want.origin_yx_um[1] + s / 2)
        )


# ----------------------------------------------------------------------------- real slides
@pytest.fixture(scope="module")
def sample_export(tmp_path_factory):
    """The sample slide's spots with their measured log1p counts, exported."""
    from napari_stgen.io.slide import open_slide

    slide_path, spots_path = sample_paths()
    if not slide_path.exists():
        pytest.skip(f"sample slide missing: {slide_path}")
    df = pd.read_csv(spots_path)
    genes = [c for c in df.columns if c not in ("barcode", "x", "y")][:8]
    out = tmp_path_factory.mktemp("export") / "c3.h5ad"
    with open_slide(slide_path) as slide:
        adata = predictions_to_anndata(
            np.log1p(df[genes].to_numpy(np.float32)),
            genes,
            df[["x", "y"]].to_numpy(np.float64),
            slide=slide,
            obs_names=df["barcode"],
            codes=np.arange(len(df)) % 4,
            code_names={0: "stroma", 1: "tumour"},
        )
        write_h5ad(adata, out)
        yield out, df, genes, slide


def test_scanpy_spatial_plot_aligned(sample_export):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    path, df, genes, slide = sample_export
    adata = sc.read_h5ad(path)
    (lib,) = adata.uns["spatial"]
    sf = adata.uns["spatial"][lib]["scalefactors"]
    hires = adata.uns["spatial"][lib]["images"]["hires"]
    s = sf["tissue_hires_scalef"]
    assert max(hires.shape[:2]) <= 2000
    # the hires image spans the whole slide at the scalefactor
    assert hires.shape[1] == pytest.approx(slide.width * s, abs=1)
    assert hires.shape[0] == pytest.approx(slide.height * s, abs=1)

    ax = sc.pl.spatial(adata, color=genes[0], show=False)
    ax = ax[0] if isinstance(ax, list) else ax
    (img,) = ax.images
    x0, x1, y1, y0 = img.get_extent()
    boxes = [p.get_extents() for p in ax.collections[0].get_paths()]
    centres = np.array([[(b.x0 + b.x1) / 2, (b.y0 + b.y1) / 2] for b in boxes])
    assert len(centres) == len(df)
    # drawn where the spots are (hires px = level-0 px × scalefactor), inside the image
    np.testing.assert_allclose(
        np.sort(centres, axis=0), np.sort(df[["x", "y"]].to_numpy() * s, axis=0), atol=0.5
    )
    assert (centres[:, 0] > x0).all() and (centres[:, 0] < x1).all()
    assert (centres[:, 1] > y0).all() and (centres[:, 1] < y1).all()
    plt.close("all")

    # the thumbnail under a spot shows the slide's tissue at that spot: mean colour of a
    # 7×7 hires window against the level-0 window it stands for (and a 40 px shifted one)
    def window(x, y):
        h = 3.5 / s
        return slide.read_region(x - h, y - h, x + h, y + h).reshape(-1, 3).mean(0)

    diffs, shifted = [], []
    for x, y in df[["x", "y"]].to_numpy()[::12]:
        hx, hy = int(round(x * s)), int(round(y * s))
        th = hires[hy - 3 : hy + 4, hx - 3 : hx + 4].reshape(-1, 3).mean(0)
        diffs.append(np.abs(th - window(hx / s, hy / s)).max())
        shifted.append(np.abs(th - window(hx / s + 40 / s, hy / s)).max())
    assert np.median(diffs) < 6, diffs
    assert np.median(diffs) < np.median(shifted) / 2, (diffs, shifted)


def test_codebook_names_and_provenance(sample_export):
    import anndata as ad

    path, df, genes, slide = sample_export
    a = ad.read_h5ad(path)
    assert a.X.dtype == np.float32
    assert list(a.var_names) == genes
    assert list(a.obs_names) == df["barcode"].astype(str).tolist()
    np.testing.assert_allclose(a.obsm["spatial"], df[["x", "y"]].to_numpy())
    assert a.obs["genst_code_name"].dtype.name == "category"
    assert a.obs["genst_code_name"].iloc[0] == "stroma"
    assert a.obs["genst_code_name"].iloc[2] == "code 2"
    st_ = a.uns["stgen"]
    assert st_["schema"] == "napari-stgen/1"
    assert st_["normalization"] == "log1p_cp10k"
    assert st_["mpp"] == pytest.approx(slide.mpp)
    assert Path(st_["slide"]["path"]).name == slide.path.name
    assert list(st_["code_names"]["name"]) == ["stroma", "tumour"]


def test_refuses_overwrite_and_bad_input(tmp_path):
    a = predictions_to_anndata(np.zeros((2, 1)), ["G"], np.zeros((2, 2)), mpp=1.0)
    p = write_h5ad(a, tmp_path / "a.h5ad")
    with pytest.raises(StgenError, match=str(p.name)):
        write_h5ad(a, p)
    write_h5ad(a, p, overwrite=True)
    with pytest.raises(StgenError, match="duplicate gene"):
        predictions_to_anndata(np.zeros((2, 2)), ["G", "G"], np.zeros((2, 2)))
    with pytest.raises(StgenError, match="2 expression rows but 3 positions"):
        predictions_to_anndata(np.zeros((2, 1)), ["G"], np.zeros((3, 2)))
    bad = tmp_path / "bad.h5ad"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(StgenError, match="bad.h5ad"):
        read_h5ad_layers(bad)


def test_interrupted_write_keeps_previous_file(tmp_path, monkeypatch):
    import anndata as ad
    import h5py

    path = tmp_path / "out.h5ad"
    old = predictions_to_anndata(np.ones((3, 2)), ["A", "B"], np.ones((3, 2)), mpp=0.5)
    write_h5ad(old, path)
    before = path.read_bytes()

    new = predictions_to_anndata(np.zeros((50, 2)), ["A", "B"], np.zeros((50, 2)), mpp=0.5)
    real = h5py.Group.create_dataset
    calls = {"n": 0}

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # the temp file exists and is half written
            assert any(p.name.endswith(".partial") for p in tmp_path.iterdir())
            raise OSError("disk full (simulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    with pytest.raises(OSError, match="simulated"):
        write_h5ad(new, path, overwrite=True)
    monkeypatch.undo()
    assert calls["n"] > 3
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5ad"]  # temp file removed
    np.testing.assert_array_equal(ad.read_h5ad(path).X, old.X)


def test_visium_mouse_crop_roundtrip(tmp_path, visium_crop_dir):
    """A real Visium crop: spots re-exported on he_crop.jpg stay on their tissue pixels."""
    import anndata as ad

    from napari_stgen.io.slide import open_slide

    d = visium_crop_dir
    src = ad.read_h5ad(d / "spots.h5ad")
    sf = src.uns["spatial"]["V1_Adult_Mouse_Brain"]["scalefactors"]
    mpp = 55.0 / sf["spot_diameter_fullres"]  # Visium spots are 55 µm across

    # a plain Visium file (no uns['stgen']) imports in µm through its scalefactors
    layers = read_h5ad_layers(d / "spots.h5ad")
    (pts,) = _layers_by_type(layers, "points")
    np.testing.assert_allclose(pts[0], src.obsm["spatial"][:, ::-1] * mpp)
    assert pts[1]["size"] == pytest.approx(55.0)

    genes = list(src.var_names[:20])
    xy = np.asarray(src.obsm["spatial"], dtype=np.float64)
    with open_slide(d / "he_crop.jpg", mpp=mpp) as slide:
        a = predictions_to_anndata(
            src[:, genes].X.toarray() if hasattr(src.X, "toarray") else src[:, genes].X,
            genes,
            xy,
            slide=slide,
            obs_names=src.obs_names,
            spot_diameter_um=55.0,
        )
        out = write_h5ad(a, tmp_path / "visium.h5ad")
        full = np.asarray(slide.levels[0])
    b = ad.read_h5ad(out)
    np.testing.assert_allclose(b.obsm["spatial"], xy)
    lib = b.uns["spatial"]["he_crop"]
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(
        sf["spot_diameter_fullres"]
    )
    hires, s = lib["images"]["hires"], lib["scalefactors"]["tissue_hires_scalef"]
    assert s == 1.0  # the crop is smaller than 2000 px: hires is the image itself
    for x, y in xy.astype(int):
        np.testing.assert_array_equal(hires[y, x], full[y, x])
    layers = read_h5ad_layers(out)
    (pts,) = _layers_by_type(layers, "points")
    np.testing.assert_allclose(pts[0], xy[:, ::-1] * mpp)
    (thumb,) = [ly for ly in layers if layer_kind(ly[1]["metadata"]) == "thumbnail"]
    assert thumb[1]["scale"] == pytest.approx((mpp / s, mpp / s))


def test_squidpy_neighbourhood_functions(sample_export):
    """squidpy's graph functions run on the export (skipped where squidpy is not installed)."""
    sq = pytest.importorskip("squidpy")
    import anndata as ad

    path, df, genes, slide = sample_export
    a = ad.read_h5ad(path)
    sq.gr.spatial_neighbors(a, coord_type="generic", n_neighs=6)
    conn = a.obsp["spatial_connectivities"]
    assert conn.shape == (len(df), len(df))
    # neighbours are adjacent spots: within 1.5 array pitches (2 × spot diameter)
    dist = a.obsp["spatial_distances"]
    pitch = 2 * a.uns["spatial"]["her2st_C3"]["scalefactors"]["spot_diameter_fullres"]
    assert np.median(dist.data) < 1.5 * pitch
    sq.gr.spatial_autocorr(a, mode="moran", genes=genes, n_perms=10, n_jobs=1)
    assert np.isfinite(a.uns["moranI"]["I"]).all()
    a.obs["genst_code_name"] = a.obs["genst_code_name"].astype("category")
    sq.gr.nhood_enrichment(a, cluster_key="genst_code_name", n_perms=10, n_jobs=1,
                           show_progress_bar=False)  # fmt: skip
    z = a.uns["genst_code_name_nhood_enrichment"]["zscore"]
    assert z.shape == (4, 4)


def test_writer_samples_codebook_labels_at_spots(tmp_path):
    """A Codebook labels layer (label = code + 1, names in features) gives each spot its code
    and name; shapes of every layer become ROIs; duplicate display layers are written once."""
    import anndata as ad

    from napari_stgen.io.napari_writer import write_layers

    mpp, tile = 0.5, 100.0
    labels = np.zeros((4, 5), dtype=np.int32)
    labels[1, 2] = 3 + 1
    labels[2, 3] = 0 + 1
    names = pd.DataFrame({"index": [0, 1, 2, 3, 4], "code": [-1, 0, 1, 2, 3],
                          "name": ["", "stroma", "", "", "tumour"]})  # fmt: skip
    lab_meta = {"name": "codes", "scale": (tile, tile), "translate": (tile / 2, tile / 2),
                "features": names, "metadata": {"stgen": {"kind": "codes"}}}  # fmt: skip
    lab = (labels, lab_meta, "labels")
    yx = np.array([[150.0, 250.0], [250.0, 350.0]])  # centres of cells (1, 2) and (2, 3)
    feats = pd.DataFrame({"ERBB2": [1.5, 0.5], "barcode": ["s1", "s2"]})
    pts = (yx, {"name": "spots", "features": feats, "size": 50.0, "scale": (1.0, 1.0),
                "translate": (0.0, 0.0), "metadata": {}}, "points")  # fmt: skip
    slide = (np.zeros((1000, 1200, 3), np.uint8), {"name": "slide", "rgb": True,
             "scale": (mpp, mpp), "translate": (0.0, 0.0), "metadata": {}}, "image")  # fmt: skip
    shp = ([np.array([[0.0, 0.0], [10.0, 10.0]]), np.array([[5.0, 5.0], [9.0, 1.0], [1, 1]])],
           {"name": "ROIs", "shape_type": ["rectangle", "polygon"], "scale": (1.0, 1.0),
            "translate": (0.0, 0.0)}, "shapes")  # fmt: skip
    out = write_layers(tmp_path / "codes.h5ad", [slide, lab, pts, pts, shp])
    a = ad.read_h5ad(out)
    assert list(a.obs_names) == ["s1", "s2"]
    assert list(a.obs["genst_code"]) == [3, 0]
    assert list(a.obs["genst_code_name"]) == ["tumour", "stroma"]
    np.testing.assert_allclose(a.obsm["spatial"], yx[:, ::-1] / mpp)
    assert list(a.uns["stgen"]["rois"]["n_vertices"]) == [2, 3]
    sf = a.uns["spatial"]["slide"]["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(50.0 / mpp)
    with pytest.raises(StgenError, match="nothing to export"):
        write_layers(tmp_path / "empty.h5ad", [slide])

    # the codebook map alone: one row per labelled cell, at the cell centre
    b = ad.read_h5ad(write_layers(tmp_path / "map.h5ad", [slide, lab]))
    assert list(b.obs_names) == ["tile_1_2", "tile_2_3"]
    assert list(b.obs["genst_code"]) == [3, 0]
    assert list(b.obs["genst_code_name"]) == ["tumour", "stroma"]
    np.testing.assert_allclose(b.obsm["spatial"], yx[:, ::-1] / mpp)
    assert b.uns["stgen"]["grid"]["tile_um"] == tile
    (cb,) = [ly for ly in read_h5ad_layers(tmp_path / "map.h5ad") if ly[2] == "labels"]
    np.testing.assert_array_equal(cb[0], labels)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exports(), st.floats(0.2, 2.0), st.tuples(st.floats(-500, 500), st.floats(-500, 500)))
def test_roundtrip_through_napari_writer(case, mpp, origin):
    """napari layer tuples → writer → h5ad → reader gives the same µm layers back."""
    from napari_stgen.io.napari_writer import write_layers

    expr, genes, xy, _, codes, code_names, rois, gen = case
    yx_um = xy[:, ::-1] * mpp + np.asarray(origin)
    feats = pd.DataFrame(expr, columns=genes)
    feats["genst_code"] = codes
    feats["barcode"] = [f"s{i}" for i in range(len(xy))]
    slide = (np.zeros((64, 48, 3), np.uint8), {"name": "slide", "rgb": True, "scale": (mpp, mpp),
             "translate": origin, "metadata": {}}, "image")  # fmt: skip
    pts = (yx_um, {"name": "spots", "features": feats, "size": 30.0,
                   "metadata": {"stgen": {"genes": genes}}}, "points")  # fmt: skip
    layers = [slide, pts]
    if rois:
        kw = {"name": "ROIs", "shape_type": [r.shape_type for r in rois]}
        layers.append(([r.vertices_yx_um for r in rois], kw, "shapes"))
    layers += [t.layer_data() for t in gen]
    with tempfile.TemporaryDirectory() as d:
        back = read_h5ad_layers(write_layers(Path(d) / "w.h5ad", layers))
    (p,) = _layers_by_type(back, "points")
    np.testing.assert_allclose(p[0], yx_um, rtol=1e-9, atol=1e-6)
    np.testing.assert_array_equal(p[1]["features"][genes].to_numpy(np.float32), expr)
    np.testing.assert_array_equal(p[1]["features"]["genst_code"], codes)
    assert p[1]["size"] == pytest.approx(30.0)
    if rois:
        (sh,) = _layers_by_type(back, "shapes")
        for v, r in zip(sh[0], rois, strict=True):
            np.testing.assert_allclose(v, r.vertices_yx_um)
    imgs = [ly for ly in back if generated_record(ly[1]["metadata"])]
    assert len(imgs) == len(gen)
    for ly, t in zip(imgs, gen, strict=True):
        np.testing.assert_array_equal(ly[0], t.image)
        assert ly[1]["translate"] == pytest.approx(t.layer_data()[1]["translate"])
        assert generated_record(ly[1]["metadata"])["seed"] == t.seed
    (thumb,) = [ly for ly in back if layer_kind(ly[1]["metadata"]) == "thumbnail"]
    assert thumb[1]["translate"] == pytest.approx(origin)
    # one schema: everything the reader records sits under metadata['stgen'], with a kind
    assert all(set(ly[1]["metadata"]) == {"stgen"} and layer_kind(ly[1]["metadata"]) for ly in back)


def test_import_shows_a_gene_subset_for_whole_transcriptome_files(visium_crop_dir):
    """A file with more spots × genes than napari features should hold keeps the variable
    genes (Visium's highly_variable flag first)."""
    import anndata as ad

    from napari_stgen.io.anndata import _feature_genes

    a = ad.read_h5ad(visium_crop_dir / "spots.h5ad")
    assert len(_feature_genes(a)) == a.n_vars  # small: everything
    hv = np.flatnonzero(a.var["highly_variable"].to_numpy(bool))
    keep = _feature_genes(a, max_values=a.n_obs * len(hv))
    np.testing.assert_array_equal(keep, hv)
    keep = _feature_genes(a, max_values=a.n_obs * 10)  # fewer than the HV genes: top variance
    x = a.X.toarray() if hasattr(a.X, "toarray") else a.X
    assert len(keep) == 10 and set(keep) == set(np.argsort(-x.var(0))[:10])


def test_append_rows_joins_two_exports_in_one_frame(tmp_path):
    """One export of two parts: genes joined in order (NaN where a part lacks one), the
    second part's positions in the first part's level-0 px, each row's part named."""
    import anndata as ad

    from napari_stgen.io.anndata_export import append_rows

    a = predictions_to_anndata(
        np.ones((2, 2), np.float32), ["A", "B"], np.array([[10.0, 20.0], [30.0, 40.0]]),
        mpp=0.5, codes=np.array([3, 4]), obs_names=["s0", "s1"],
    )  # fmt: skip
    b = predictions_to_anndata(
        np.full((1, 2), 2.0, np.float32), ["C", "B"], np.array([[4.0, 6.0]]), mpp=2.0,
        obs_names=["s0"], extra_uns={"origin_yx_um": np.array([100.0, 50.0])},
    )  # fmt: skip
    out = append_rows(a, b, ("tiles", "spots"))
    assert list(out.var_names) == ["A", "B", "C"]
    assert list(out.obs_names) == ["tiles:s0", "tiles:s1", "spots:s0"]
    assert list(out.obs["layer"]) == ["tiles", "tiles", "spots"]
    np.testing.assert_allclose(out.obsm["spatial"][2], (np.array([4.0, 6.0]) * 2 + [50, 100]) / 0.5)
    np.testing.assert_allclose(out.obsm["spatial"][:2], a.obsm["spatial"])
    np.testing.assert_allclose(out[2].X, [[np.nan, 2.0, 2.0]])
    assert np.isnan(out[:2, "C"].X).all()
    assert list(out.obs["genst_code"]) == [3, 4, -1]
    assert out.uns["stgen"]["mpp"] == 0.5
    back = ad.read_h5ad(write_h5ad(out, tmp_path / "two.h5ad"))
    assert back.n_obs == 3 and list(back.obs["genst_code"]) == [3, 4, -1]
