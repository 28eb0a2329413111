"""STMDiT: a tiny model trained on real HER2ST patches (section C3) — training, sampling, CLI.

The tiny model uses its own frozen condition encoders (PCA of the profiles, autoencoder
features) instead of GenST so the tests do not depend on a GenST checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from tiny_models import tiny_genst_config, tiny_stmdit_config, tiny_stmdit_parts

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(her2st_c3_dir, tmp_path_factory):
    from napari_stgen.training.stmdit import assemble, train_dit

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("stmdit")
    ae, panel, enc, feats = tiny_stmdit_parts(her2st_c3_dir, d)
    data = assemble([feats], "real")
    tcfg = tiny_stmdit_config(save_every=20)
    ckpt = train_dit(
        data, ae, enc, panel, d / "tiny.safetensors", tcfg, resume=False, progress=False
    )
    return {
        "ckpt": ckpt,
        "data": data,
        "ae": ae,
        "enc": enc,
        "panel": panel,
        "tcfg": tcfg,
        "dir": d,
        "ctx": feats,
    }


@pytest.fixture(scope="module")
def model(tiny):
    from napari_stgen.inference.synthesis import load_stmdit

    return load_stmdit(tiny["ckpt"])


def _fixed_batch_loss(dit, model, data, n=32):
    from napari_stgen.training.stmdit import encode_latents

    gen = torch.Generator().manual_seed(0)
    x0 = torch.from_numpy(encode_latents(model.ae, data["tiles"][:n])) * model.latent_scale
    gz = torch.from_numpy((data["expr"][:n] - model.gene_mean) / model.gene_std).float()
    pool = torch.from_numpy((data["pool"][:n] - model.pool_mean) / model.pool_std).float()
    morph = torch.from_numpy((data["morph"][:n] - model.morph_mean) / model.morph_std).float()
    t = torch.rand(n, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise
    on = torch.ones(n, dtype=torch.bool)
    with torch.no_grad():
        v = dit(xt, t, pool, gz, morph, on, on)
    return float((v - (noise - x0)).pow(2).mean())


def test_tiny_dit_loss_falls_on_real_patches(tiny, model):
    from napari_stgen.models.stmdit import STMDiT

    torch.manual_seed(tiny["tcfg"].seed)
    init = STMDiT(model.dit.cfg).eval()
    before = _fixed_batch_loss(init, model, tiny["data"])
    after = _fixed_batch_loss(model.dit, model, tiny["data"])
    assert after < 0.85 * before, (before, after)
    hist = model.card["loss_history"]
    assert hist[-1][1] < hist[0][1] or after < before


def test_training_resumes_to_the_same_weights(tiny, model):
    from napari_stgen.inference.synthesis import load_stmdit
    from napari_stgen.training.stmdit import train_dit

    out = tiny["dir"] / "resumed.safetensors"
    args = (tiny["data"], tiny["ae"], tiny["enc"], tiny["panel"], out, tiny["tcfg"])
    assert train_dit(*args, resume=False, progress=False, stop_after=25) is None
    assert not out.exists()
    train_dit(*args, resume=True, progress=False)  # continues from the step-25 state
    m2 = load_stmdit(out)
    for (k, a), (_, b) in zip(
        model.dit.state_dict().items(), m2.dit.state_dict().items(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-5), k


def test_gene_subset_keeps_some_genes_and_sets_the_others_to_the_median(tiny):
    from napari_stgen.training.stmdit import _gene_subset, _stats

    data, enc = tiny["data"], tiny["enc"]
    st = _stats(data)
    expr = data["expr"][:24]
    z = torch.from_numpy(((expr - st["gene_mean"]) / st["gene_std"]).astype(np.float32))
    pool = torch.from_numpy(((data["pool"][:24] - st["pool_mean"]) / st["pool_std"]).astype("f4"))
    same_p, same_z = _gene_subset(expr, st, enc, 0.0, np.random.default_rng(0), pool, z)
    assert torch.equal(same_p, pool) and torch.equal(same_z, z)
    p2, z2 = _gene_subset(expr, st, enc, 1.0, np.random.default_rng(0), pool, z)
    raw = z2.numpy() * st["gene_std"] + st["gene_mean"]
    kept = np.isclose(raw, expr, atol=1e-4)
    at_median = np.isclose(raw, st["gene_median"][None], atol=1e-4)
    assert (kept | at_median).all()  # every gene keeps its value or is set to the median
    assert (kept.sum(1) >= 1).all()
    assert (at_median & ~kept).any(1).mean() > 0.5  # most rows lose genes
    want = (enc.encode_genes(raw.astype(np.float32)) - st["pool_mean"]) / st["pool_std"]
    assert np.allclose(p2.numpy(), want, atol=1e-4)  # pooled embedding of the masked profile
    # single-gene rows: everything but one gene at the median
    _, z1 = _gene_subset(expr, st, enc, 1.0, np.random.default_rng(1), pool, z, p_single=1.0)
    raw1 = z1.numpy() * st["gene_std"] + st["gene_mean"]
    off_median = ~np.isclose(raw1, st["gene_median"][None], atol=1e-4)
    assert (off_median.sum(1) <= 1).all() and off_median.any()


def test_gene_subset_training_is_seeded(tiny):
    from safetensors.torch import load_file

    from napari_stgen.training.stmdit import STMDiTTrainConfig, train_dit

    cfg = STMDiTTrainConfig(**{**tiny["tcfg"].__dict__, "p_gene_subset": 0.5, "save_every": 100})
    states = []
    for name in ("a", "b"):
        out = tiny["dir"] / f"subset_{name}.safetensors"
        args = (tiny["data"], tiny["ae"], tiny["enc"], tiny["panel"], out, cfg)
        assert train_dit(*args, resume=False, progress=False, stop_after=6) is None
        states.append(load_file(str(out) + ".state"))
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    plain = train_dit(
        tiny["data"],
        tiny["ae"],
        tiny["enc"],
        tiny["panel"],
        tiny["dir"] / "plain.safetensors",
        STMDiTTrainConfig(**{**cfg.__dict__, "p_gene_subset": 0.0}),
        resume=False,
        progress=False,
        stop_after=6,
    )
    assert plain is None
    other = load_file(str(tiny["dir"] / "plain.safetensors") + ".state")
    assert not torch.equal(other["dit.g_tok.weight"], states[0]["dit.g_tok.weight"])


def test_train_fold_reuses_a_matching_fold_model_and_refuses_another(tiny, her2st_c3_dir):
    from napari_stgen.errors import StgenError
    from napari_stgen.models.checkpoint import load_checkpoint, save_checkpoint
    from napari_stgen.training.stmdit import fold_command, fold_recipe, train_fold

    tensors, card = load_checkpoint(tiny["ckpt"], "stmdit")
    recipe = fold_recipe(card)
    assert recipe["steps"] == tiny["tcfg"].steps and "holdout" not in recipe
    cmd = fold_command(card, "DATA", "C3", "FOLD.safetensors")
    assert "--holdout C3" in cmd and f"--steps {tiny['tcfg'].steps}" in cmd
    fold = tiny["dir"] / "fold_C3.safetensors"
    save_checkpoint(fold, tensors, {**card, "train": {**card["train"], "holdout": ["C3"]}})
    assert train_fold(tiny["ckpt"], her2st_c3_dir, "C3", fold) == fold  # reused, not retrained
    with pytest.raises(StgenError, match="another recipe or hold-out"):
        train_fold(tiny["ckpt"], her2st_c3_dir, "B4", fold)


def test_genst_label_key_ignores_the_context_head_and_follows_decoding():
    from napari_stgen.models.genst import GenST
    from napari_stgen.training.stmdit import genst_label_key

    torch.manual_seed(0)
    g = GenST(tiny_genst_config(12))
    key = genst_label_key(g)
    g.context = torch.nn.Linear(3, 3)  # a spatial-context head: not used per tile
    assert genst_label_key(g) == key
    g.cfg.decode = "quantized" if g.cfg.decode != "quantized" else "soft"
    assert genst_label_key(g) != key


def test_sampling_is_deterministic_per_seed(model):
    from napari_stgen.inference.synthesis import gene_vector, synthesize

    g = gene_vector(model, {"ERBB2": 3.0})
    a = synthesize(model, g, None, seed=7, steps=6)
    b = synthesize(model, g, None, seed=7, steps=6)
    c = synthesize(model, g, None, seed=8, steps=6)
    assert a.dtype == np.uint8 and a.shape == (1, 64, 64, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_dual_guidance_zero_scales_is_the_unconditional_branch(model, tiny):
    from napari_stgen.inference.synthesis import (
        condition_features,
        gene_vector,
        guided_velocity,
        synthesize,
    )

    ctx = np.stack([tiny["ctx"]["spot_tiles"][0]] * 1)
    ctx3 = np.tile(ctx, (1, 3, 3, 1))  # a (1, 192, 192, 3) context patch of real tissue
    g = gene_vector(model, {"ERBB2": 4.0})
    pool, gz, morph, has_m = condition_features(model, g, ctx3)
    assert has_m
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.full((1,), 0.6)
    with torch.no_grad():
        v = guided_velocity(model.dit, x, t, pool, gz, morph, True, 0.0, 0.0)
        off = torch.zeros(1, dtype=torch.bool)
        v00 = model.dit(x, t, pool, gz, morph, off, off)
        v_g = guided_velocity(model.dit, x, t, pool, gz, morph, True, 2.0, 1.0)
    assert torch.allclose(v, v00, atol=1e-5)
    assert not torch.allclose(v_g, v00, atol=1e-4)
    # end to end: with both scales 0 the conditions do not matter
    a = synthesize(model, g, ctx3, seed=3, steps=4, guidance_genes=0.0, guidance_morph=0.0)
    b = synthesize(
        model, gene_vector(model), None, seed=3, steps=4, guidance_genes=0.0, guidance_morph=0.0
    )
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_changing_a_gene_changes_the_tile(model):
    from napari_stgen.inference.synthesis import gene_vector, synthesize

    lo, hi = model.gene_range[model.genes.index("ERBB2")]
    a = synthesize(
        model, gene_vector(model, {"ERBB2": float(lo)}), None, seed=1, steps=6, guidance_genes=3.0
    )
    b = synthesize(
        model,
        gene_vector(model, {"ERBB2": float(hi) + 2}),
        None,
        seed=1,
        steps=6,
        guidance_genes=3.0,
    )
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 0.5


def test_unknown_gene_is_a_clear_error(model):
    from napari_stgen.errors import StgenError
    from napari_stgen.inference.synthesis import gene_vector, parse_gene_overrides

    with pytest.raises(StgenError, match="NOT_A_GENE"):
        gene_vector(model, {"NOT_A_GENE": 1.0})
    with pytest.raises(StgenError, match="GENE=VALUE"):
        parse_gene_overrides(["ERBB2"])


def _stgen(*args):
    return subprocess.run(
        [sys.executable, "-m", "napari_stgen.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_synthesize_writes_rgb_png_with_mpp(tiny, tmp_path):
    from PIL import Image

    out = tmp_path / "tile.png"
    r = _stgen(
        "synthesize",
        "--model",
        str(tiny["ckpt"]),
        "--out",
        str(out),
        "--genes",
        "ERBB2=3.5",
        "--seed",
        "2",
        "--steps",
        "4",
    )
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        assert im.mode == "RGB" and im.size == (64, 64)
        assert float(im.text["stgen:mpp"]) == pytest.approx(1.75)
        arr = np.asarray(im)
    assert arr.std() > 0
    side = json.loads(out.with_name("tile.png.json").read_text())
    assert side["mpp"] == pytest.approx(1.75) and side["overrides"] == {"ERBB2": 3.5}


def test_cli_synthesize_bad_gene_exits_2_with_one_line(tiny, tmp_path):
    out = tmp_path / "bad.png"
    r = _stgen("synthesize", "--model", str(tiny["ckpt"]), "--out", str(out), "--genes", "ERBB2X=1")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and "ERBB2X" in lines[0] and "ERBB2" in lines[0]
    assert not out.exists()


@pytest.fixture(scope="module")
def guide(model):
    """The shipped default GenST as the expression guide of the tiny STMDiT."""
    from napari_stgen.inference.synthesis import load_guide

    return load_guide(model, "default")


def test_expression_guidance_moves_genst_reprediction_towards_the_target(model, guide, her2st_dir):
    """(Needs the tiny model trained on C3's whole transcriptome: the sample's 81 genes give
    CP10k values in other units than the GenST guide's, so the targets saturate it.)"""
    from napari_stgen.inference.synthesis import gene_vector, synthesize

    j = int(np.flatnonzero(np.array(model.genes)[guide.model_idx] == "ERBB2")[0])
    gj = int(guide.guide_idx[j])
    lo, hi = (float(v) for v in model.gene_range[model.genes.index("ERBB2")])
    profs = np.stack([gene_vector(model, {"ERBB2": lo}), gene_vector(model, {"ERBB2": hi + 2})])

    def repredict(tiles):
        from napari_stgen.models.genst import to_input

        px, t = guide.patch_px, tiles.shape[1]
        o = (px - t) // 2
        x = np.pad(tiles, ((0, 0), (o, px - t - o), (o, px - t - o), (0, 0)), "reflect")
        with torch.no_grad():
            return guide.genst.predict(to_input(torch.from_numpy(x)), tta=4)[0][:, gj].numpy()

    kw = {"seed": 4, "steps": 6, "guide": guide, "focus": ["ERBB2"]}
    plain = repredict(synthesize(model, profs, None, guidance_expr=0.0, **kw))
    guided = repredict(synthesize(model, profs, None, guidance_expr=1.0, **kw))
    # the guided pair is pulled apart in GenST's reading, by more than the unguided pair
    assert guided[1] - guided[0] > 0.2
    assert guided[1] - guided[0] > plain[1] - plain[0] + 0.1
    # deterministic per seed; scale 0 is exactly the unguided sampler
    again = synthesize(model, profs, None, guidance_expr=1.0, **kw)
    assert np.array_equal(again, synthesize(model, profs, None, guidance_expr=1.0, **kw))
    assert np.array_equal(
        synthesize(model, profs, None, guidance_expr=0.0, **kw),
        synthesize(model, profs, None, seed=4, steps=6),
    )


def test_expression_guidance_checks_its_inputs(model, guide):
    from napari_stgen.errors import StgenError
    from napari_stgen.inference.synthesis import gene_vector, guide_weights, synthesize

    with pytest.raises(StgenError, match="expression guidance"):
        synthesize(model, gene_vector(model), None, steps=2, guidance_expr=-1.0, guide=guide)
    w = guide_weights(model, ["erbb2"])  # case-insensitive, like --genes
    assert w.sum() == pytest.approx(1.0)
    assert w[model.genes.index("ERBB2")] == pytest.approx(0.5)


def test_cnn_oracle_trains_caches_and_reloads_identically(tiny, tmp_path):
    from napari_stgen.training.evaluate_stmdit import cnn_oracle

    tiles = tiny["ctx"]["spot_tiles"][:96]
    expr = tiny["ctx"]["spot_expr"][:96, :5]
    a = cnn_oracle(tiles, expr, cache_dir=tmp_path, epochs=2)
    assert len(list(tmp_path.glob("cnn_oracle_*.safetensors"))) == 1
    b = cnn_oracle(tiles, expr, cache_dir=tmp_path, epochs=2)  # from the cache
    pa, pb = a.predict(tiles[:8]), b.predict(tiles[:8])
    assert pa.shape == (8, 5) and np.isfinite(pa).all()
    np.testing.assert_array_equal(pa, pb)
    # predictions live on the targets' scale (log1p CP10k), not the standardised one
    assert abs(float(pa.mean()) - float(expr.mean())) < 2 * float(expr.std())
