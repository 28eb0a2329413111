"""STMDiT v2 (issue 15): realism figures and the v2 tile autoencoder, on real C3 tissue.

Real tiles are the 112 µm tiles of section C3's spots at 0.875 µm/px (128 px).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

MPP = 0.875


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("stmdit_v2_cache")


@pytest.fixture(scope="module")
def real_tiles(her2st_c3_dir, cache) -> np.ndarray:
    from napari_stgen.io.her2st import read_sections
    from napari_stgen.training.realism import spot_tiles_at

    sec = read_sections(her2st_c3_dir, ["C3"])[0]
    t = spot_tiles_at(sec, MPP, cache)
    return t[np.random.default_rng(0).permutation(len(t))]


def _blur(tiles: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return np.stack(
        [np.clip(gaussian_filter(t.astype(np.float32), (sigma, sigma, 0)), 0, 255) for t in tiles]
    ).astype(np.uint8)


def test_real_tiles_are_128_px_for_112_um(real_tiles):
    assert real_tiles.shape[1:] == (128, 128, 3) and len(real_tiles) >= 80


def test_realism_of_real_vs_real_is_near_one_and_indistinguishable(real_tiles):
    from napari_stgen.training.realism import realism_report

    r = realism_report(real_tiles[:40], real_tiles[40:80], MPP, paired=False)
    for k in ("laplacian_variance", "hf_power_share", "nuclei_per_mm2", "nuclei_median_area_um2"):
        assert 0.8 <= r[k]["ratio"] <= 1.25, (k, r[k])
    assert r["nuclei_per_mm2"]["real"] > 200  # the threshold finds nuclei in real tissue
    assert r["two_sample_accuracy"] <= 0.7, r


def test_realism_of_real_vs_blurred_is_clearly_not(real_tiles):
    from napari_stgen.training.realism import realism_report

    a = real_tiles[:40]
    r = realism_report(a, _blur(a, 1.5), MPP)
    assert r["laplacian_variance"]["ratio"] < 0.3, r
    assert r["hf_power_share"]["ratio"] < 0.3, r
    assert r["two_sample_accuracy"] >= 0.9, r


def test_high_frequency_share_follows_the_physical_scale(real_tiles):
    from napari_stgen.training.realism import at_mpp, high_frequency_share

    a = real_tiles[:20]
    fine = high_frequency_share(a, MPP).mean()
    # the same tiles shrunk to 1.75 µm/px keep less power above 0.25 cycles/µm
    coarse = high_frequency_share(at_mpp(a, MPP, 1.75), 1.75).mean()
    assert coarse < fine


def test_hed_jitter_identity_reproduces_the_tile_and_jitter_changes_stain(real_tiles):
    from napari_stgen.training.stmdit_ae import hed_jitter_uint8 as hed_jitter

    a = real_tiles[:4]
    rng = np.random.default_rng(0)
    same = hed_jitter(a, rng, sigma=0.0, bias=0.0)
    assert np.abs(same.astype(int) - a).max() <= 1
    moved = hed_jitter(a, rng)
    d = np.abs(moved.astype(int) - a)
    assert d.mean() > 0.5 and d.mean() < 25


def _tiny_cfg(**kw):
    from napari_stgen.training.stmdit_ae import AE2TrainConfig

    base = dict(
        steps=30, batch=4, crop_px=32, ch=(8, 16, 16, 16), z_ch=4, disc_ch=8,
        disc_start=10, disc_warmup=3, sections=("C3",), holdout=(), lr=2e-3, save_every_s=1e9,
    )  # fmt: skip
    base.update(kw)
    return AE2TrainConfig(**base)


def _recon_l1(ae, tiles) -> float:
    from napari_stgen.training.stmdit_ae import reconstruct

    return float(np.abs(reconstruct(ae, tiles).astype(np.float32) - tiles).mean())


def test_tiny_ae_v2_loss_falls_on_real_crops_and_loads(her2st_c3_dir, cache, real_tiles, tmp_path):
    from napari_stgen.models.stmdit import AE2Config, TileAutoencoderV2
    from napari_stgen.training.stmdit import load_ae
    from napari_stgen.training.stmdit_ae import train_autoencoder_v2

    torch.set_num_threads(1)
    cfg = _tiny_cfg()
    out = train_autoencoder_v2(her2st_c3_dir, tmp_path / "ae.safetensors", cfg, cache_dir=cache,
                               log=lambda m: None)  # fmt: skip
    ae = load_ae(out)
    assert isinstance(ae, TileAutoencoderV2) and ae.cfg.down == 8
    torch.manual_seed(cfg.seed)
    init = TileAutoencoderV2(AE2Config(ch=cfg.ch, z_ch=cfg.z_ch)).eval()
    tiles = real_tiles[:8]
    assert _recon_l1(ae, tiles) < 0.9 * _recon_l1(init, tiles)
    with torch.no_grad():
        m, _ = ae.encode(torch.zeros(1, 3, 128, 128))
    assert m.shape == (1, 4, 16, 16)


def test_ae_v2_resume_is_bit_identical(her2st_c3_dir, cache, tmp_path):
    from safetensors.torch import load_file

    from napari_stgen.training.stmdit_ae import train_autoencoder_v2

    torch.set_num_threads(1)
    cfg = _tiny_cfg(steps=12, disc_start=4)
    quiet = {"cache_dir": cache, "log": lambda m: None}
    a = train_autoencoder_v2(her2st_c3_dir, tmp_path / "a.safetensors", cfg, **quiet)
    b = tmp_path / "b.safetensors"
    train_autoencoder_v2(her2st_c3_dir, b, cfg, stop_after=7, **quiet)
    train_autoencoder_v2(her2st_c3_dir, b, cfg, resume=str(b) + ".state", **quiet)
    ta, tb = load_file(str(a) + ".state"), load_file(str(b) + ".state")
    assert ta.keys() == tb.keys() and any(k.startswith("dopt.") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_ae_v2_warm_starts_from_an_fp16_weights_file(her2st_c3_dir, cache, tmp_path):
    """The committed intermediate is fp16 weights only: training continues from its step."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from napari_stgen.training.stmdit_ae import train_autoencoder_v2

    torch.set_num_threads(1)
    quiet = {"cache_dir": cache, "log": lambda m: None}
    w = train_autoencoder_v2(her2st_c3_dir, tmp_path / "w.safetensors", _tiny_cfg(steps=4), **quiet)
    with safe_open(str(w), "pt") as f:
        meta = f.metadata()
    half = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in load_file(str(w)).items()}, str(half), metadata=meta)
    logs: list[str] = []
    out = train_autoencoder_v2(
        her2st_c3_dir, tmp_path / "c.safetensors", _tiny_cfg(steps=6), resume=half,
        cache_dir=cache, log=logs.append,
    )  # fmt: skip
    assert any("warm start" in m and "step 4" in m for m in logs)
    with safe_open(str(out), "pt") as f:
        assert int(f.metadata()["step"]) == 6


def test_tiny_dit_trains_in_the_v2_latent_space_and_samples_at_0875(her2st_c3_dir, cache, tmp_path):
    from tiny_models import tiny_stmdit_config

    from napari_stgen.inference.synthesis import load_stmdit, synthesize
    from napari_stgen.io.her2st import gene_panel, read_sections
    from napari_stgen.models.stmdit import OwnCondition
    from napari_stgen.training.stmdit import (
        ae_geometry,
        assemble,
        load_ae,
        section_features,
        section_image,
        train_dit,
    )
    from napari_stgen.training.stmdit_ae import train_autoencoder_v2

    torch.set_num_threads(1)
    cfg = _tiny_cfg(steps=10)
    ae_path = train_autoencoder_v2(
        her2st_c3_dir, tmp_path / "ae.safetensors", cfg, cache_dir=cache, log=lambda m: None
    )
    ae = load_ae(ae_path)
    mpp, px = ae_geometry(ae)
    assert (mpp, px) == (0.875, 128)
    sec = read_sections(her2st_c3_dir, ["C3"])[0]
    panel = gene_panel([sec], 20)
    enc = OwnCondition.fit(sec.target(panel), ae, 8)
    feats = section_features(sec, panel, enc, None, tile_px=px, cache_dir=cache, mpp=mpp)
    assert feats["spot_tiles"].shape[1:] == (128, 128, 3)
    data = assemble([feats], "real")
    tcfg = tiny_stmdit_config(save_every=10)
    tcfg.steps, tcfg.tile_px = 20, px
    ckpt = train_dit(data, ae, enc, panel, tmp_path / "dit.safetensors", tcfg,
                     resume=False, progress=False, mpp=mpp)  # fmt: skip
    m = load_stmdit(ckpt)
    assert m.mpp == 0.875 and m.tile_px == 128 and m.dit.cfg.latent_px == 16
    hist = m.card["loss_history"]
    assert hist[-1][1] < hist[0][1], hist
    out = synthesize(m, sec.target(panel)[:1], None, seed=0, steps=2, guidance_expr=0.0)
    assert out.shape == (1, 128, 128, 3) and out.dtype == np.uint8

    # GenST (1.75 µm/px) guides the 0.875 µm/px tiles: decoded tiles are area-averaged ×2, the
    # real 224 µm surroundings are cut from the 336 µm context at 0.875 and averaged the same way
    from napari_stgen.inference.synthesis import load_guide
    from napari_stgen.training.evaluate_stmdit import _context3

    guide = load_guide(m, "default")
    assert guide.zoom == 2 and guide.patch_px == 128
    img = section_image(sec, mpp, cache)
    ctx = _context3(img, feats["spot_xy"][:1], px)
    assert ctx.shape == (1, 384, 384, 3)
    kw = dict(seed=0, steps=2)
    plain = synthesize(m, sec.target(panel)[:1], ctx, guidance_expr=0.0, **kw)
    guided = synthesize(m, sec.target(panel)[:1], ctx, guidance_expr=2.0, guide=guide, **kw)
    assert np.abs(guided.astype(int) - plain.astype(int)).mean() > 0.5

    # a region plan for this model overlaps by whole latent pixels (×8)
    from napari_stgen.inference.synthesis_plan import plan_region

    plan = plan_region((0.0, 0.0, 300.0, 150.0), m.mpp, m.tile_px, latent_factor=m.latent_factor)
    assert m.latent_factor == 8 and plan.overlap_px == 32 and plan.n_tiles >= 3


def test_discriminator_step_learns_real_from_blurred_crops(tissue_rgb):
    """The trainer's own D update, at the trainer's default D (norm, lr), tells real tissue
    crops from blurred ones in a few dozen steps: hinge loss well below 1 and the real and fake
    logits apart (issue 15: the D of the long run ended with the same output on every input)."""
    from napari_stgen.models.stmdit import PatchDiscriminator, images_to_tensor
    from napari_stgen.training.stmdit_ae import AE2TrainConfig, discriminator_step

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = AE2TrainConfig()
    disc = PatchDiscriminator(8, norm=cfg.disc_norm)
    dopt = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9))
    lecam = {"weight": cfg.lecam_weight, "ema_real": torch.zeros(()), "ema_fake": torch.zeros(())}
    rng = np.random.default_rng(0)
    h, w = tissue_rgb.shape[:2]
    for _ in range(60):
        ys, xs = rng.integers(0, h - 32, 8), rng.integers(0, w - 32, 8)
        real = np.stack([tissue_rgb[y : y + 32, x : x + 32] for y, x in zip(ys, xs, strict=True)])
        fake = images_to_tensor(_blur(real, 1.5))
        r = discriminator_step(disc, dopt, images_to_tensor(real), fake, lecam=lecam)
    assert r["d"] < 0.7, r
    assert r["d_real"] - r["d_fake"] > 0.8, r


def test_train_stmdit_ae_cli_records_the_discriminator_settings(her2st_c3_dir, cache, tmp_path):
    import json
    import subprocess
    import sys

    from safetensors import safe_open

    out = tmp_path / "ae.safetensors"
    args = ["--data", str(her2st_c3_dir), "--out", str(out), "--holdout", "--steps", "3",
            "--batch", "1", "--crop-px", "32", "--disc-start", "0", "--disc-warmup", "1",
            "--disc-gate", "0", "--adaptive-max", "0.5", "--disc-norm", "spectral",
            "--lecam-weight", "0.1", "--cache", str(cache)]  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-m", "napari_stgen.cli.main", "train", "stmdit-ae", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    with safe_open(str(out), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    tr = meta["train"]
    assert (tr["disc_warmup"], tr["disc_gate"], tr["adaptive_max"]) == (1, 0.0, 0.5)
    assert (tr["disc_norm"], tr["lecam_weight"]) == ("spectral", 0.1)
    assert meta["step"] == 3 and "--disc-gate 0" in meta["command"]


def test_shipped_default_card_figures_are_its_evaluation():
    """The default's card: v2 geometry, where it trained, and figures that are exactly
    ``card_figures`` of the evaluation result stored beside them (what `stgen evaluate stmdit`
    printed for these weights)."""
    from napari_stgen.models.checkpoint import read_card, resolve_checkpoint
    from napari_stgen.training.evaluate_stmdit import card_figures

    card = read_card(resolve_checkpoint("default", "stmdit"))
    assert card["mpp"] == 0.875 and card["tile_px"] == 128 and card["ae"]["kind"] == "v2"
    ev = card["evaluation"]
    assert ev["result"]["model"]["weights_sha256"] == card["weights_sha256"]
    assert ev["result"]["holdout"] not in card["data"]["sections"]
    assert card["figures"] == {
        **card_figures(ev["result"]),
        "without_expression_guidance": card_figures(ev["result_without_expression_guidance"]),
    }
    assert "CPU" in card["training"]["where"]
    assert card["training"]["steps"] == card["train"]["steps"]
    ae = card["autoencoder"]
    assert ae["step"] > 0 and "stgen train stmdit-ae" in ae["command"]
