"""HistoTx with expression-only sections (no image) and the leave-one-patient-out benchmark,
on real HER2ST spots: a tiny model, a few sections."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

TINY = dict(steps=60, batch=8, dim=32, depth=1, max_tokens=24, lr=3e-3, knn_k=4, seed=0)


@pytest.fixture(scope="module")
def expr_dir(her2st_dir) -> Path:
    d = her2st_dir.parent / "her2st_expression"
    if not (d / "A1_selection.tsv").is_file():
        pytest.skip(f"needs the expression-only HER2ST sections at {d}")
    return d


@pytest.fixture(scope="module")
def lopo_data(her2st_dir, expr_dir, tmp_path_factory):
    """Imaged C3 + expression-only A1, B1 as SpotSets (panel from C3)."""
    from napari_stgen.training.evaluate_histotx import load_lopo_data

    cache = tmp_path_factory.mktemp("histotx_cache")
    return load_lopo_data(her2st_dir, expr_dir, ["C3"], ["A1", "B1"], cache), cache


def test_expression_sections_are_image_free_spotsets(lopo_data):
    from napari_stgen.training.histotx import TrainConfig, WindowSampler

    (sets, panel, bench), _ = lopo_data
    by = {s.name: s for s in sets}
    assert by["C3"].has_image and not by["A1"].has_image and by["A1"].patient == "A"
    assert by["A1"].y.shape == (len(by["A1"].xy_um), len(panel)) and len(bench) == 50
    # array pitch 200 µm: nearest-neighbour spacing of A1 is 200 µm
    d = np.linalg.norm(by["A1"].xy_um[:, None] - by["A1"].xy_um[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert np.median(d.min(1)) == pytest.approx(200.0)
    s = by["A1"]
    sampler = WindowSampler([s], s.y.mean(0), s.y.std(0) + 1e-3, TrainConfig(**TINY))
    b = sampler.batch(np.random.default_rng(0))
    assert not b["image_only"] and not b["img_present"].any()  # image tokens withheld
    assert b["tx_valid"].any()


@pytest.fixture(scope="module")
def tiny(lopo_data):
    """A tiny kNN-residual HistoTx trained on C3 (imaged) + A1, B1 (expression only)."""
    from napari_stgen.training.histotx import TrainConfig, train_histotx

    torch.set_num_threads(1)
    (sets, panel, _), _ = lopo_data
    tcfg = TrainConfig(**TINY)
    model, hist = train_histotx(sets, panel, None, tcfg)
    return model, hist, tcfg


def test_training_with_expression_sections_loss_falls(lopo_data, tiny):
    from napari_stgen.models.histotx import HistoTx
    from napari_stgen.training.histotx import WindowSampler

    (sets, panel, _), _ = lopo_data
    model, hist, tcfg = tiny
    fresh = HistoTx(model.cfg)
    fresh.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    for m in (fresh.head, fresh.knn_in):  # the untrained model, same normalization
        m.reset_parameters()
    with torch.no_grad():
        fresh.knn_gate.zero_()
    expr_only = [s for s in sets if not s.has_image]

    def loss(net) -> float:
        sampler = WindowSampler(expr_only, net.y_mean.numpy(), net.y_std.numpy(), tcfg)
        rng, tot = np.random.default_rng(7), 0.0
        with torch.no_grad():
            for _ in range(4):
                b = sampler.batch(rng)
                t = {k: torch.from_numpy(v) for k, v in b.items() if isinstance(v, np.ndarray)}
                keys = (
                    "img_feat",
                    "img_pos",
                    "img_valid",
                    "tx",
                    "tx_mask",
                    "tx_pos",
                    "tx_valid",
                    "img_present",
                )
                err = ((net(*[t[k] for k in keys]) - t["target"]) ** 2).mean(-1)
                w = (t["weight"] == 1.0).float()  # hidden spots only
                tot += float((err * w).sum() / w.sum())
        return tot / 4

    assert loss(model) < 0.8 * loss(fresh)
    assert np.mean(hist["loss"][-15:]) < np.mean(hist["loss"][:15])


def test_lopo_fold_holds_the_patient_out_and_reports_knn(lopo_data):
    from napari_stgen.training.evaluate_histotx import knn_interpolate, lopo_fold, split_hidden
    from napari_stgen.training.histotx import TrainConfig

    data, _ = lopo_data
    sets, panel, bench = data
    res = lopo_fold(data, "A", TrainConfig(**TINY), log=lambda s: None)
    assert res["split"] == "leave-one-patient-out" and res["test_patient"] == "A"
    assert res["test_sections"] == ["A1"]
    assert "A" not in res["train_patients"] and not any(
        n.startswith("A") for n in res["train_sections"]
    )
    assert sorted(res["train_sections"]) == ["B1", "C3"]
    s = res["summary"]
    for k in ("knn4", "knn8", "knn8_idw", "histotx_transcripts_only"):
        assert -1.0 <= s[k] <= 1.0
    assert "histotx" not in s  # A1 has no image: no fused / image-only figure
    # the kNN figure is the plain mean of the 8 nearest visible spots, scored on the hidden ones
    a1 = next(x for x in sets if x.name == "A1")
    hid, vis = split_hidden(len(a1.xy_um), 0.5, 0)
    ib = [panel.index(g) for g in bench if a1.gene_present()[panel.index(g)]]
    assert res["sections"][0]["n_genes_scored"] == len(ib) >= 40
    p = knn_interpolate(a1.xy_um[vis], a1.y[vis], a1.xy_um[hid], 8)
    from napari_stgen.training.metrics import pearson_per_gene

    r = pearson_per_gene(p[:, ib], a1.y[hid][:, ib]).mean()
    assert s["knn8"] == pytest.approx(r, abs=1e-4) and r > 0.15
    assert set(res["uncertainty_spearman"]) >= {"histotx_transcripts_only:knn8_spread"}


def test_cli_evaluate_lopo_subprocess(her2st_dir, expr_dir, lopo_data, tmp_path):
    _, cache = lopo_data
    out = tmp_path / "lopo.json"
    cmd = [
        sys.executable,
        "-m",
        "napari_stgen.cli.main",
        "evaluate",
        "histotx",
        "--data",
        str(her2st_dir),
        "--expression-data",
        str(expr_dir),
        "--holdout-patient",
        "B",
        "--sections",
        "C3",
        "A1",
        "B1",
        "--steps",
        "20",
        "--knn-k",
        "4",
        "--adapt-steps",
        "0",
        "--cache",
        str(cache),
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["split"] == "leave-one-patient-out" and res["test_patient"] == "B"
    assert res["train_patients"] == ["A", "C"] and res["test_sections"] == ["B1"]
    assert {"knn4", "knn8", "histotx_transcripts_only"} <= set(res["summary"])
    assert json.loads(r.stdout)["test_patient"] == "B"


def test_impute_measured_without_image(lopo_data, tiny, expr_dir, tmp_path):
    """Leave-one-out fill-in of a measured section with no image, with its uncertainty."""
    import anndata
    from scipy.stats import spearmanr

    from napari_stgen.inference.histotx import impute_measured, load_histotx
    from napari_stgen.io.her2st import read_expression_section
    from napari_stgen.training.histotx import histotx_card, save_model
    from napari_stgen.training.metrics import pearson_per_gene

    (sets, panel, bench), _ = lopo_data
    model, _, tcfg = tiny
    path = save_model(tmp_path / "tiny.safetensors", model, histotx_card(model, panel, bench, tcfg))
    pred = load_histotx(path, device="cpu")
    e = read_expression_section(expr_dir, "D1")  # a patient the model never saw
    a = anndata.AnnData(X=e.counts)
    a.var_names = e.genes
    a.obsm["spatial"] = e.array_xy.astype(np.float64)
    res = impute_measured(pred, a, mpp=200.0)  # array units → µm
    y = e.target(panel)
    ib = [panel.index(g) for g in bench if g in set(e.genes)]
    assert res.expr.shape == (len(y), len(panel)) and res.info["leave_one_out"]
    assert pearson_per_gene(res.expr[:, ib], y[:, ib]).mean() > 0.15
    err = np.abs(res.expr[:, ib] - y[:, ib]).mean(1)
    assert res.uncertainty.shape == (len(y),) and np.isfinite(res.uncertainty).all()
    assert spearmanr(res.uncertainty, err).statistic > 0.3  # larger = less sure, on real data


@pytest.mark.parametrize("bw", [0.0, 300.0])
def test_model_knn_residual_is_the_gaussian_knn_of_the_evaluation(lopo_data, bw):
    """The model's kNN residual (HistoTxConfig.knn_k / knn_bw_um) is the same interpolation
    the evaluation scores as HistoTx's base (``knn_interpolate(..., bw_um=)``), on A1's spots."""
    from napari_stgen.models.histotx import HistoTx, HistoTxConfig
    from napari_stgen.training.evaluate_histotx import knn_interpolate, split_hidden

    (sets, panel, _), _ = lopo_data
    a1 = next(s for s in sets if s.name == "A1")
    hid, vis = split_hidden(len(a1.xy_um), 0.5, 0)
    hid, vis = hid[:40], vis[:64]
    xy = a1.xy_um + np.random.default_rng(0).normal(0, 5, a1.xy_um.shape)  # no tied distances
    z = ((a1.y - a1.y.mean(0)) / (a1.y.std(0) + 1e-3)).astype(np.float32)
    net = HistoTx(HistoTxConfig(n_genes=len(panel), img_dim=8, dim=16, depth=1, knn_k=8,
                                knn_bw_um=bw))  # fmt: skip
    f = lambda a: torch.from_numpy(np.asarray(a, np.float32))[None]  # noqa: E731
    tx = f(z[vis])
    knn, extra = net.knn(f(xy[hid]), tx, torch.ones_like(tx), f(xy[vis]),
                         torch.ones(1, len(vis), dtype=torch.bool), True)  # fmt: skip
    want = knn_interpolate(xy[vis], z[vis], xy[hid], 8, bw_um=bw)
    np.testing.assert_allclose(knn[0].numpy(), want, atol=1e-4)
    plain = knn_interpolate(xy[vis], z[vis], xy[hid], 8)
    assert (np.abs(want - plain).max() > 1e-3) == (bw > 0)  # the weights change the estimate
