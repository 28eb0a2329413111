"""GenST: a tiny model trains on real spots, checkpoints round-trip, bad files are clear
errors, and the shipped default predicts the sample slide's measured expression."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from tiny_models import tiny_genst_config

from napari_stgen.errors import CheckpointError

SPOTS = 40


@pytest.fixture(scope="module")
def real_spots(sample_slide_path, sample_spots_path):
    """Patches (224 µm @ 32 px) and log1p counts of 40 real spots of the sample slide."""
    from napari_stgen.inference.patches import read_patches
    from napari_stgen.io.slide import open_slide

    df = pd.read_csv(sample_spots_path)
    genes = [c for c in df.columns if c not in ("barcode", "x", "y")]
    df = df.iloc[:: max(1, len(df) // SPOTS)].iloc[:SPOTS]
    with open_slide(sample_slide_path) as s:
        patches = read_patches(s, df[["x", "y"]].to_numpy(float), 224.0, 32)
    y = np.log1p(df[genes].to_numpy(np.float32))
    return patches, y, genes, df


@pytest.fixture(scope="module")
def tiny(real_spots):
    import torch

    from napari_stgen.training.data import SectionData
    from napari_stgen.training.genst import TrainConfig, train_genst

    torch.set_num_threads(1)
    patches, y, genes, df = real_spots
    arr = np.array([list(map(int, b.split("x"))) for b in df["barcode"]])
    sec = SectionData(
        "C3", patches, y, arr, df[["x", "y"]].to_numpy(float), list(df["barcode"]), patches, 0.6874
    )
    tcfg = TrainConfig(
        epochs=25,
        batch=8,
        gene_steps=60,
        label_self_weight=1.0,
        recon_every=2,
        recon_batch=4,
        lr=3e-3,
        seed=0,
    )
    model, hist = train_genst(
        [sec], genes, tiny_genst_config(len(genes)), tcfg, progress=False, log=lambda s: None
    )
    return model, hist, tcfg, genes


def test_tiny_model_loss_falls(tiny):
    _, hist, _, _ = tiny
    ep = hist["epochs"]
    assert len(ep) == 25

    def avg(key, sl):
        return float(np.mean([e[key] for e in ep[sl]]))

    assert avg("expr", slice(-3, None)) < 0.85 * avg("expr", slice(0, 3))
    assert avg("recon", slice(-3, None)) < avg("recon", slice(0, 3))


def test_save_load_roundtrip_identical(tiny, real_spots, tmp_path):
    from napari_stgen.inference.predictor import load_genst
    from napari_stgen.models.checkpoint import save_checkpoint, sha256_file
    from napari_stgen.training.genst import model_card, predict_patches

    model, _, tcfg, genes = tiny
    patches = real_spots[0]
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, model.state_dict(), model_card(model, genes, genes[:5], tcfg, tta=1))
    pred = load_genst(path, device="cpu")
    assert pred.genes == genes and pred.patch_px == 32 and pred.mpp == pytest.approx(224 / 32)
    assert pred.device == "cpu" and pred.n_codes == 8
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["sha256"] == sha256_file(path) == pred.checksum
    out = pred.predict(patches, image_codes=True)
    ref, codes = predict_patches(model, patches, tta=1)
    assert np.array_equal(out.expr, ref) and np.array_equal(out.code, codes)
    assert out.expr.shape == (len(patches), len(genes)) and out.expr.dtype == np.float32
    assert out.code.dtype == np.int64 and out.code.max() < 8
    assert out.image_codes.shape == (len(patches), 2, 2)
    assert pred.code_profiles().shape == (8, len(genes))
    # batching does not change the result
    assert np.allclose(pred.predict(patches, batch_size=7).expr, ref, atol=1e-5)


def test_bad_checkpoints_are_clear_errors(tiny, tmp_path):
    from napari_stgen.inference.predictor import load_genst
    from napari_stgen.models.checkpoint import load_checkpoint, save_checkpoint
    from napari_stgen.training.genst import model_card

    model, _, tcfg, genes = tiny
    card = model_card(model, genes, genes[:5], tcfg)
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, model.state_dict(), card)

    with pytest.raises(CheckpointError, match="not found"):
        load_genst(tmp_path / "missing.safetensors")

    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt.safetensors"):
        load_genst(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_genst(junk)

    other = tmp_path / "other.safetensors"
    save_checkpoint(other, model.state_dict(), {**card, "kind": "stmdit"})
    with pytest.raises(CheckpointError, match="kind 'stmdit', expected 'genst'"):
        load_genst(other)

    short = tmp_path / "panel.safetensors"
    save_checkpoint(short, model.state_dict(), {**card, "genes": genes[:-1]})
    with pytest.raises(CheckpointError, match="gene panel"):
        load_genst(short)

    sd = dict(model.state_dict())
    sd["gene.decoder.3.weight"] = sd["gene.decoder.3.weight"][:-1]
    shape = tmp_path / "shape.safetensors"
    save_checkpoint(shape, sd, card)  # card lists the true shapes
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(shape, "genst")


def test_default_checkpoint_predicts_sample(sample_slide_path, sample_spots_path):
    import torch

    from napari_stgen.inference.patches import read_patches
    from napari_stgen.inference.predictor import load_genst
    from napari_stgen.io.slide import open_slide
    from napari_stgen.training.metrics import pearson_per_gene

    torch.set_num_threads(1)
    pred = load_genst("default", device="auto")
    assert len(pred.genes) >= 50 and set(pred.card["benchmark_genes"]) <= set(pred.genes)
    df = pd.read_csv(sample_spots_path)
    top = [g for g in pred.card["benchmark_genes"][:20] if g in df.columns]
    assert len(top) >= 10
    with open_slide(sample_slide_path) as s:
        patches = read_patches(s, df[["x", "y"]].to_numpy(float), pred.patch_um, pred.patch_px)
    out = pred.predict(patches, tta=1)
    assert np.isfinite(out.expr).all() and out.code.min() >= 0
    idx = [pred.genes.index(g) for g in top]
    r = pearson_per_gene(out.expr[:, idx], np.log1p(df[top].to_numpy(float)))
    assert r.mean() > 0.2, dict(zip(top, r.round(2), strict=True))
    assert (r > 0).mean() >= 0.8


def test_vector_quantizer_restarts_dead_codes():
    import torch

    from napari_stgen.models.layers import VectorQuantizerEMA

    torch.set_num_threads(1)
    torch.manual_seed(0)

    def run(idle: int) -> tuple[dict, int]:
        q = VectorQuantizerEMA(32, 4, max_idle_steps=idle)
        q.train()
        q(torch.randn(64, 4) * 0.01)  # initialised on one tight blob: most codes then starve
        for _ in range(60):
            z = torch.randn(128, 4) + 5 * torch.randint(0, 8, (128, 1)).float()
            _, idx, commit = q(z)
        assert torch.isfinite(commit)
        return q.health(idx), q.restarts

    h_no, r_no = run(0)
    h_yes, r_yes = run(10)
    assert r_yes > 0 and h_yes["codes_used"] > h_no["codes_used"]
    assert h_yes["perplexity"] > h_no["perplexity"]


def test_training_resumes_from_saved_state(real_spots, tmp_path):
    import torch

    from napari_stgen.training.data import SectionData
    from napari_stgen.training.genst import TrainConfig, train_genst

    torch.set_num_threads(1)
    patches, y, genes, df = real_spots
    arr = np.array([list(map(int, b.split("x"))) for b in df["barcode"]])
    sec = SectionData(
        "C3", patches, y, arr, df[["x", "y"]].to_numpy(float), list(df["barcode"]), patches, 0.7
    )
    state = tmp_path / "run.resume.safetensors"
    kw = dict(batch=8, gene_steps=20, recon_every=2, recon_batch=4, seed=1)
    cfg = tiny_genst_config(len(genes))
    train_genst([sec], genes, cfg, TrainConfig(epochs=2, **kw), state, False, lambda s: None)
    assert state.exists()
    msgs: list[str] = []
    _, hist = train_genst(
        [sec],
        genes,
        tiny_genst_config(len(genes)),
        TrainConfig(epochs=3, **kw),
        state,
        False,
        msgs.append,
    )
    assert any("resumed" in m and "epoch 2" in m for m in msgs)
    assert len(hist["epochs"]) == 1  # only the remaining epoch ran
