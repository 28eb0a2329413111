"""HistoTx: a tiny model trained on real HER2ST spots (C3), its checkpoint, measured spots."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def c3(her2st_c3_dir, tmp_path_factory):
    """Section C3 as a SpotSet on a 20-gene panel (features cached in a temp dir)."""
    from napari_stgen.io.her2st import benchmark_genes, read_her2st_section
    from napari_stgen.training.histotx import SpotSet, spot_image_features

    sec = read_her2st_section(her2st_c3_dir, "C3")
    panel = benchmark_genes([sec], 20)
    feats = spot_image_features(sec, tmp_path_factory.mktemp("histotx_cache"))
    s = SpotSet("C3", sec.xy_px, sec.xy_px * sec.mpp, sec.target(panel), feats, sec.mpp)
    return sec, s, panel


@pytest.fixture(scope="module")
def trained(c3):
    """A tiny HistoTx trained for a few steps on C3, and the loss on fixed batches before/after."""
    from napari_stgen.models.histotx import HistoTx, HistoTxConfig
    from napari_stgen.training.histotx import TrainConfig, WindowSampler, train_histotx

    torch.set_num_threads(1)
    _, s, panel = c3
    tcfg = TrainConfig(
        steps=150, batch=8, dim=32, depth=1, max_tokens=24, lr=3e-3, w_visible=1.0, seed=0
    )
    cfg = HistoTxConfig(n_genes=len(panel), img_dim=s.feats.shape[1], dim=32, depth=1, heads=2)

    def held_out_loss(model) -> float:
        sampler = WindowSampler([s], model.y_mean.numpy(), model.y_std.numpy(), tcfg)
        rng = np.random.default_rng(123)
        tot = 0.0
        model.eval()
        with torch.no_grad():
            for _ in range(6):
                b = sampler.batch(rng)
                t = {k: torch.from_numpy(v) for k, v in b.items() if isinstance(v, np.ndarray)}
                args = [t["img_feat"], t["img_pos"], t["img_valid"]]
                if not b["image_only"]:
                    args += [t["tx"], t["tx_mask"], t["tx_pos"], t["tx_valid"]]
                w = t["weight"]
                err = ((model(*args) - t["target"]) ** 2).mean(-1)
                tot += float((err * w).sum() / w.sum())
        return tot / 6

    # the untrained model with the same normalization statistics as the trained one
    model, hist = train_histotx([s], panel, cfg, tcfg)
    fresh = HistoTx(cfg)
    for k in ("feat_mean", "feat_std", "y_mean", "y_std"):
        getattr(fresh, k).copy_(getattr(model, k))
    return model, tcfg, held_out_loss(fresh), held_out_loss(model), hist


def test_loss_falls_on_real_spots(trained):
    _, _, before, after, hist = trained
    assert np.isfinite(hist["loss"]).all()
    assert after < 0.85 * before, (before, after)


@pytest.fixture(scope="module")
def saved(trained, c3, tmp_path_factory):
    from napari_stgen.training.histotx import histotx_card, save_model

    model, tcfg, *_ = trained
    _, _, panel = c3
    path = tmp_path_factory.mktemp("ckpt") / "tiny_histotx.safetensors"
    card = histotx_card(model, panel, panel, tcfg, name="tiny", data={"sections": ["C3"]})
    save_model(path, model, card)
    return path


def test_save_load_round_trip_identical(trained, saved, c3):
    from napari_stgen.inference.histotx import load_histotx, predict_sites

    model = trained[0]
    _, s, panel = c3
    loaded = load_histotx(saved, device="cpu")
    assert loaded.genes == panel and loaded.max_img == 24
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k
    half = np.arange(0, len(s.y), 2)
    args = (s.feats[:20], s.xy_um[:20], s.feats, s.xy_um, s.y[half], None, s.xy_um[half])
    a, _ = predict_sites(model, *args, max_img=24, max_tx=24)
    b, _ = predict_sites(loaded.model, *args, max_img=24, max_tx=24)
    np.testing.assert_array_equal(a, b)


def _anndata(counts, genes, xy, names):
    import anndata

    a = anndata.AnnData(X=np.asarray(counts, np.float32))
    a.var_names = list(genes)
    a.obs_names = list(names)
    a.obsm["spatial"] = np.asarray(xy, np.float64)
    return a


def test_measurements_pull_predictions_toward_measured(saved, c3, sample_slide_path, tmp_path):
    """On the sample slide (C3), predicting at measured spots with their measured profiles
    given lands closer to the measurement than the image-only prediction."""
    from napari_stgen.inference.histotx import load_histotx, predict_with_measurements
    from napari_stgen.io.slide import open_slide

    sec, s, panel = c3
    pred = load_histotx(saved, device="cpu")
    meas_idx = np.arange(0, sec.n_spots, 2)
    h5 = tmp_path / "measured.h5ad"
    # panel genes only, with the library size over the whole transcriptome in obs
    ad = _anndata(
        sec.counts[meas_idx][:, sec.gene_index(panel)],
        panel,
        sec.xy_px[meas_idx],
        [sec.barcodes[i] for i in meas_idx],
    )
    ad.obs["total_counts"] = sec.counts[meas_idx].sum(1)
    ad.write_h5ad(h5)
    q = sec.xy_px[meas_idx[:40]]
    with open_slide(sample_slide_path) as slide:
        fused = predict_with_measurements(slide, pred, q, str(h5))
        img = predict_with_measurements(slide, pred, q, str(h5), image_only=True)
    assert fused.expr.shape == (40, len(panel)) and not fused.image_only and img.image_only
    assert (fused.n_context > 0).all() and (img.n_context == 0).all()
    assert fused.measured.n_overlap == len(panel)
    truth = s.y[meas_idx[:40]]
    err_fused = np.abs(fused.expr - truth).mean()
    err_img = np.abs(img.expr - truth).mean()
    assert err_fused < 0.9 * err_img, (err_fused, err_img)


def test_measured_genes_must_overlap_panel(saved, c3, tmp_path):
    from napari_stgen.errors import StgenError
    from napari_stgen.inference.histotx import load_histotx, measured_from_anndata

    sec, _, _ = c3
    pred = load_histotx(saved, device="cpu")
    h5 = tmp_path / "other_genes.h5ad"
    names = [f"NOTAGENE{i}" for i in range(5)]
    _anndata(np.ones((3, 5)), names, sec.xy_px[:3], ["a", "b", "c"]).write_h5ad(h5)
    with pytest.raises(StgenError, match=r"other_genes\.h5ad.*none of its 5 genes"):
        measured_from_anndata(str(h5), pred.genes)
    bad = _anndata(np.ones((3, 2)), pred.genes[:2], sec.xy_px[:3], ["a", "b", "c"])
    del bad.obsm["spatial"]
    with pytest.raises(StgenError, match="obsm"):
        measured_from_anndata(bad, pred.genes, source="spots.h5ad")


def test_cli_registers_histotx_commands():
    from napari_stgen.cli.main import build_parser

    p = build_parser()
    a = p.parse_args(["train", "histotx", "--data", "D", "--out", "x.safetensors"])
    assert a.func.__name__ == "run_train"
    a = p.parse_args(["evaluate", "histotx", "--data", "D", "--holdout", "C3"])
    assert a.func.__name__ == "run_evaluate" and a.hide == 0.5


def test_predict_tiles_on_sample_slide_with_measured_context(saved, c3, sample_slide_path):
    """The widget path: grid cells of a region → PartialResults conditioned on measured spots."""
    from napari_stgen.inference.engine import collect
    from napari_stgen.inference.histotx import load_histotx, predict_histotx_tiles, prepare_measured
    from napari_stgen.inference.registry import load_predictor as load_model
    from napari_stgen.inference.tiles import slide_grid, tiles_in_region
    from napari_stgen.io.slide import open_slide

    sec, _, _ = c3
    pred = load_histotx(saved, device="cpu")
    assert load_model(saved, device="cpu").kind == "histotx"
    near = np.flatnonzero(np.linalg.norm(sec.xy_px - sec.xy_px[0], axis=1) * sec.mpp < 1000)
    ad = _anndata(sec.counts[near], sec.genes, sec.xy_px[near], [sec.barcodes[i] for i in near])
    with open_slide(sample_slide_path) as slide:
        ctx = prepare_measured(slide, pred, ad)
        assert ctx.feats.shape == (len(near), 120)
        x, y = sec.xy_px[0] * slide.mpp
        grid = slide_grid(slide, pred.tile_um)
        tiles = tiles_in_region(grid, (x - 300, y - 300, x + 300, y + 300))
        run = partial(predict_histotx_tiles, slide, pred, tiles, grid=grid, context=ctx)
        res = collect(run(batch_size=8))
        alone = collect(run(image_only=True))
    assert res.total == len(tiles) == len(res) and (res.code == -1).all()
    assert np.isfinite(res.expr).all() and res.expr.shape == (len(tiles), len(pred.genes))
    assert not np.allclose(res.expr, alone.expr)


def test_measured_from_points_layer_features(c3):
    """A Points layer without an .h5ad behind it: µm (y, x) data + gene feature columns."""
    from types import SimpleNamespace

    import pandas as pd

    from napari_stgen.errors import StgenError
    from napari_stgen.inference.histotx import measured_from_layer

    sec, s, panel = c3
    feats = pd.DataFrame(s.y[:10], columns=panel).drop(columns=panel[-5:])  # log1p, 15 genes
    layer = SimpleNamespace(
        name="spots", metadata={}, features=feats, data=sec.xy_px[:10, ::-1] * sec.mpp
    )
    m = measured_from_layer(layer, panel, sec.mpp)
    np.testing.assert_allclose(m.xy_px, sec.xy_px[:10])
    assert m.n_overlap == 15 and not m.present[-5:].any()
    np.testing.assert_allclose(m.expr[:, :15], s.y[:10, :15], rtol=1e-6)
    layer.features = pd.DataFrame({"area": np.ones(10)})
    with pytest.raises(StgenError, match="spots"):
        measured_from_layer(layer, panel, sec.mpp)
