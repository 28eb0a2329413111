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
        context_steps=120,
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
    from napari_stgen.training.genst import genst_card, predict_patches

    model, _, tcfg, genes = tiny
    patches = real_spots[0]
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, model.state_dict(), genst_card(model, genes, genes[:5], tcfg, tta=1))
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
    from napari_stgen.training.genst import genst_card

    model, _, tcfg, genes = tiny
    card = genst_card(model, genes, genes[:5], tcfg)
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
    kw = dict(batch=8, gene_steps=20, recon_every=2, recon_batch=4, seed=1, context_steps=0)
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


# ----------------------------------------------------------------------------- spatial context
def test_context_offsets_follow_the_patch_transforms():
    """A mark at offset (dx, dy) from the centre lands where ``transform_offsets`` says after
    each of the 8 transforms ``GenST.tile_tokens`` applies (rot90 over (H, W), then x flip)."""
    import torch

    from napari_stgen.inference.context import transform_offsets

    img = torch.zeros(1, 1, 9, 9)
    dx, dy = 3, -2  # x = column, y = row (down)
    img[0, 0, 4 + dy, 4 + dx] = 1
    for k in range(8):
        t = torch.rot90(img, k % 4, dims=(2, 3))
        if k >= 4:
            t = torch.flip(t, dims=(3,))
        r, c = (t[0, 0] == 1).nonzero()[0].tolist()
        assert transform_offsets(np.array([dx, dy], float), k).tolist() == [c - 4, r - 4], k


def test_context_windows_use_the_grid_sub_lattice():
    from napari_stgen.inference.context import lattice_step, windows

    rr, cc = np.mgrid[0:9, 0:9]
    cells = np.stack([rr.ravel(), cc.ravel()], 1)
    xy = cells[:, ::-1] * 112.0
    q = np.array([40])  # the centre cell (4, 4)
    assert lattice_step(112.0, 200.0) == 2 and lattice_step(224.0, 200.0) == 1
    w = windows(xy, 9, 1000.0, q, cells, 2)[0]
    assert w[0] == 40 and (w >= 0).all()
    d = cells[w] - cells[40]
    assert ((d % 2) == 0).all() and np.abs(d).max() == 2  # the 8 nearest on a 224 µm lattice
    dense = windows(xy, 9, 1000.0, q)[0]
    assert np.abs(cells[dense] - cells[40]).max() == 1  # without it: the 8 adjacent cells
    far = windows(xy, 9, 150.0, q, cells, 2)[0]
    assert far[0] == 40 and (far[1:] == -1).all()  # nothing within the radius


def test_context_head_trains_and_round_trips(tiny, real_spots, tmp_path):
    """Stage C trains (its loss falls), the head changes predictions, and a saved checkpoint
    reloads with identical windowed predictions; the engine's final result is the same."""
    from napari_stgen.inference.predictor import load_genst
    from napari_stgen.models.checkpoint import save_checkpoint
    from napari_stgen.training.genst import genst_card

    model, hist, tcfg, genes = tiny
    patches, _, _, df = real_spots
    losses = [h["expr"] for h in hist["context"]["losses"]]
    assert losses[-1] < losses[0]
    assert model.context is not None and model.cfg.ctx_depth > 0
    path = tmp_path / "ctx.safetensors"
    save_checkpoint(path, model.state_dict(), genst_card(model, genes, genes[:5], tcfg, tta=4))
    pred = load_genst(path, device="cpu")
    assert pred.has_context
    out = pred.predict(patches, tokens=True)
    assert out.feat.shape[:2] == (4, len(patches)) and out.zhat.shape[:2] == (4, len(patches))
    assert np.allclose(out.expr, pred.predict(patches).expr, atol=1e-5)
    xy_um = df[["x", "y"]].to_numpy(float) * 0.6874
    a = pred.predict_in_context(out.feat, out.zhat, xy_um)
    assert a.expr.shape == out.expr.shape and np.isfinite(a.expr).all()
    assert np.abs(a.expr - out.expr).max() > 1e-3  # the neighbours matter
    b = load_genst(path, device="cpu").predict_in_context(out.feat, out.zhat, xy_um)
    assert np.array_equal(a.expr, b.expr) and np.array_equal(a.code, b.code)
    one = pred.predict_in_context(out.feat, out.zhat, xy_um, query=np.array([3]))
    assert np.allclose(one.expr[0], a.expr[3], atol=1e-5)


def test_engine_applies_context_over_the_request(tiny, sample_slide_path, tmp_path):
    from napari_stgen.inference import engine
    from napari_stgen.inference.cache import TileCache
    from napari_stgen.inference.predictor import load_genst
    from napari_stgen.io.slide import open_slide
    from napari_stgen.models.checkpoint import save_checkpoint
    from napari_stgen.training.genst import genst_card

    model, _, tcfg, genes = tiny
    path = tmp_path / "ctx.safetensors"
    save_checkpoint(path, model.state_dict(), genst_card(model, genes, genes[:5], tcfg, tta=4))
    pred = load_genst(path, device="cpu")
    cache = TileCache()
    with open_slide(sample_slide_path) as slide:
        grid, tiles = engine.plan_whole_slide(slide, pred)
        tiles = tiles[:60]
        parts = list(
            engine.predict_tiles(slide, pred, tiles, grid=grid, batch_size=16, cache=cache)
        )
        assert parts[-1].final and not any(p.final for p in parts[:-1])
        fin = parts[-1]
        assert len(fin) == len(tiles) and fin.done == fin.total == len(tiles)
        tile_by_tile = np.concatenate([p.expr for p in parts[:-1]])
        assert not np.allclose(np.sort(fin.expr, 0), np.sort(tile_by_tile, 0))
        # a second request comes from the cache (tokens included) and gives the same result
        again = list(engine.predict_tiles(slide, pred, tiles, grid=grid, cache=cache))
        assert again[0].cached == len(tiles) and again[-1].final
        order = {tuple(t): i for i, t in enumerate(fin.tiles)}
        idx = [order[tuple(t)] for t in again[-1].tiles]
        assert np.allclose(again[-1].expr, fin.expr[idx], atol=1e-5)
        assert engine.collect(iter(parts)) is fin


def test_engine_cache_separates_tta(tiny, sample_slide_path, tmp_path):
    """One cache, the same checkpoint loaded with 4 and with 1 rotation: entries (values and a
    context model's tokens) never cross between them."""
    from napari_stgen.inference import engine
    from napari_stgen.inference.cache import TileCache
    from napari_stgen.inference.predictor import load_genst
    from napari_stgen.io.slide import open_slide
    from napari_stgen.models.checkpoint import save_checkpoint
    from napari_stgen.training.genst import genst_card

    model, _, tcfg, genes = tiny
    path = tmp_path / "ctx.safetensors"
    save_checkpoint(path, model.state_dict(), genst_card(model, genes, genes[:5], tcfg, tta=4))
    p4, p1 = load_genst(path, device="cpu"), load_genst(path, device="cpu", tta=1)
    assert p4.checksum == p1.checksum and (p4.tta, p1.tta) == (4, 1)
    cache = TileCache()
    with open_slide(sample_slide_path) as slide:
        grid, tiles = engine.plan_whole_slide(slide, p4)
        tiles = tiles[:20]
        a = engine.collect(engine.predict_tiles(slide, p4, tiles, grid=grid, cache=cache))
        parts = list(engine.predict_tiles(slide, p1, tiles, grid=grid, cache=cache))
        assert parts[0].cached == 0  # not served the 4-rotation entries
        b = engine.collect(iter(parts))
        assert a.expr.shape == b.expr.shape and not np.allclose(a.expr, b.expr)


def test_confidence_bank_round_trips_and_flags_blank_tiles(tiny, real_spots, tmp_path):
    """A checkpoint with a confidence bank loads it back; every prediction carries a finite
    per-tile uncertainty, and blank glass is less sure than the tissue the model learnt from."""
    from napari_stgen.inference.confidence import fit_confidence
    from napari_stgen.inference.predictor import load_genst
    from napari_stgen.models.checkpoint import save_checkpoint
    from napari_stgen.training.genst import genst_card

    model, _, tcfg, genes = tiny
    patches = real_spots[0]
    conf = fit_confidence(model, patches, tta=1)
    assert conf.bank.shape[0] == len(patches) and np.isfinite(conf.bank).all()
    tensors = {**model.state_dict(), **conf.tensors()}
    card = genst_card(model, genes, genes[:5], tcfg, tta=1)
    card["tensor_shapes"] = {k: list(v.shape) for k, v in tensors.items()}
    path = tmp_path / "conf.safetensors"
    save_checkpoint(path, tensors, card)
    pred = load_genst(path, device="cpu")
    assert pred.confidence is not None
    assert np.allclose(pred.confidence.stats, conf.stats)
    out = pred.predict(patches, tokens=True)
    assert out.uncertainty.shape == (len(patches),) and np.isfinite(out.uncertainty).all()
    glass = np.full((8, 32, 32, 3), 242, np.uint8)
    u_glass = pred.predict(glass).uncertainty
    assert u_glass.min() > np.median(out.uncertainty)
    xy = real_spots[3][["x", "y"]].to_numpy(float) * 0.6874
    ctx = pred.predict_in_context(out.feat, out.zhat, xy)
    assert ctx.uncertainty.shape == (len(patches),) and np.isfinite(ctx.uncertainty).all()


def test_default_model_is_less_sure_off_tissue(sample_slide_path):
    """The shipped GenST's uncertainty is higher on glass than on tissue of the sample."""
    from napari_stgen.inference.patches import tissue_fraction
    from napari_stgen.inference.predictor import load_genst
    from napari_stgen.inference.tiles import read_tiles, slide_grid
    from napari_stgen.io.slide import open_slide

    pred = load_genst("default", device="cpu")
    assert pred.confidence is not None
    assert pred.card["confidence"]["uncertainty"] == "combined_sum_pos"
    with open_slide(sample_slide_path) as s:
        g = slide_grid(s, 112.0)
        tiles = np.array([(r, c) for r in range(0, g.shape[0], 5) for c in range(0, g.shape[1], 5)])
        p = read_tiles(s, g, tiles, pred.patch_px, pred.patch_um)
    u = pred.predict(p, tta=1).uncertainty
    tf = tissue_fraction(p)
    assert (tf > 0.5).sum() >= 10 and (tf < 0.05).sum() >= 10
    assert np.median(u[tf < 0.05]) > np.percentile(u[tf > 0.5], 75)


def test_hed_stain_jitter_is_identity_at_zero_and_moves_stains(real_spots):
    import torch
    from skimage.color import rgb2hed

    from napari_stgen.training.genst import hed_jitter

    x = torch.from_numpy(real_spots[0][:6]).permute(0, 3, 1, 2).float() / 255.0
    same = hed_jitter(x, np.random.default_rng(0), 0.0)
    assert torch.allclose(same, x, atol=1e-5)
    moved = hed_jitter(x, np.random.default_rng(0), 0.2)
    assert moved.shape == x.shape and 0 <= float(moved.min()) and float(moved.max()) <= 1
    h0 = rgb2hed(x.permute(0, 2, 3, 1).numpy())[..., 0].mean((1, 2))
    h1 = rgb2hed(moved.permute(0, 2, 3, 1).numpy())[..., 0].mean((1, 2))
    assert np.abs(h1 - h0).max() > 0.005  # the haematoxylin amount changed per patch


def test_fold_split_kind_names_a_new_patient():
    from napari_stgen.training.evaluate_genst import split_kind

    assert split_kind("B4", ["C2", "C3", "C4", "C5"]) == {
        "split": "out-of-patient",
        "test_patient": "B",
        "train_patients": ["C"],
    }
    assert split_kind("C3", ["B4", "C2", "C4", "C5"])["split"] == "within-patient"


def test_weight_average_and_consistency_options(real_spots):
    """--weight-avg-from leaves the uniform mean of the late iterates in the model (not the
    last iterate); --consistency adds its loss; with both off the run is unchanged."""
    import torch

    from napari_stgen.training.data import SectionData
    from napari_stgen.training.genst import TrainConfig, train_genst

    torch.set_num_threads(1)
    patches, y, genes, df = real_spots
    arr = np.array([list(map(int, b.split("x"))) for b in df["barcode"]])
    sec = SectionData(
        "C3", patches, y, arr, df[["x", "y"]].to_numpy(float), list(df["barcode"]), patches, 0.7
    )
    kw = dict(epochs=4, batch=8, gene_steps=20, recon_every=2, recon_batch=4, context_steps=0)

    def run(**extra):
        cfg = tiny_genst_config(len(genes))
        m, h = train_genst([sec], genes, cfg, TrainConfig(**kw, **extra), None, False, print)
        return {k: v.detach().clone() for k, v in m.state_dict().items()}, h

    base, h0 = run()
    again, _ = run(weight_avg_from=0.0, w_consist=0.0)
    assert all(torch.equal(base[k], again[k]) for k in base)
    avg, h1 = run(weight_avg_from=0.5)
    steps = (len(y) // 8) * 4
    assert h1["weight_average"] == {"from_step": steps // 2, "iterates": steps - steps // 2}
    name = "align.net.1.weight"
    assert not torch.equal(avg[name], base[name])  # the mean of iterates, not the last one
    assert torch.equal(avg["gene.vq.embed"], base["gene.vq.embed"])  # stage A untouched
    _, h2 = run(w_consist=1.0)
    assert "consist" in h2["epochs"][-1] and h2["epochs"][-1]["consist"] > 0
