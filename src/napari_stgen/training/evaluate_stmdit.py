"""STMDiT evaluation on a held-out section (BENCHMARKS.md, "STMDiT tile generation").

- Fidelity: condition on the measured expression of the held-out spots, generate, re-predict
  with GenST and take the per-gene Pearson between conditioning and re-predicted values (the 50
  benchmark genes), as a fraction of the ceiling (GenST on the real tiles of the same spots).
  GenST sees 224 µm; a generated tile is 112 µm, so two read-outs are reported: ``tile`` (the
  112 µm tile reflect-padded to 224 µm, for real and generated tiles alike: only tile content
  counts) and ``context`` (the tile pasted into its real surroundings, as the viewer shows it;
  the unconditional tile in the same surroundings gives the floor). An independent oracle (ridge
  regression on colour/texture features trained on the measured spots of the training sections,
  not GenST) repeats the fidelity read-out, since training uses GenST pseudo-labels.
- Control: for each of the top-10 genes, sweep its value over the training 1st–99th percentile
  with everything else fixed — the other genes at the training median and, within a sweep, the
  seed (every slider value starts from the same noise, as the Synthesize slider does) — over
  several seeds; Spearman(slider, re-predicted), pooled over seeds. The earlier read-out with a
  different noise per slider value is reported too (``*_independent_noise``).
- Realism: KID and Fréchet distance between generated and real held-out tiles in the feature
  space of GenST's histology encoder (Inception weights cannot be downloaded here), and
  encoder-independent pixel statistics (``training.realism``: sharpness, nuclei, a classifier
  two-sample test) against real tiles of the same spots at 0.875 µm/px.
- Speed: seconds per tile on CPU at the default step count.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import linalg
from scipy.stats import spearmanr

from napari_stgen.inference.sampler_settings import SamplerSettings
from napari_stgen.inference.stmdit_model import STMDiTModel
from napari_stgen.inference.synthesis import load_guide, load_stmdit, synthesize
from napari_stgen.io.atomic import atomic_path
from napari_stgen.io.her2st import benchmark_genes, read_sections
from napari_stgen.models.checkpoint import resolve_checkpoint
from napari_stgen.models.stmdit import GenSTCondition, images_to_tensor, tensor_to_images
from napari_stgen.training.baselines import CNNRegressor, fit_cnn_regressor
from napari_stgen.training.data import split_holdout
from napari_stgen.training.realism import REFERENCE_MPP, compare_at_scales, spot_tiles_at
from napari_stgen.training.stmdit import (
    DEFAULT_CACHE,
    crop,
    genst_label_key,
    genst_patches_for_tiles,
    genst_predict,
    load_genst_model,
    section_features,
    section_image,
    tensors_sha,
)
from napari_stgen.training.tile_features import colour_texture_features

SLIDER_VALUES = 7


def pearson_per_gene(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r per column (NaN where either column is constant)."""
    a = np.asarray(a, np.float64) - np.mean(a, 0)
    b = np.asarray(b, np.float64) - np.mean(b, 0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(0) / den, np.nan)


def mean_r(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.nanmean(pearson_per_gene(a, b)))


# ----------------------------------------------------------------------------- oracle


class RidgeOracle:
    """Independent expression read-out: ridge on ``colour_texture_features``."""

    def __init__(self, tiles: np.ndarray, expr: np.ndarray):
        from sklearn.linear_model import RidgeCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-1, 4, 12)))
        self.model.fit(colour_texture_features(tiles), expr)

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        return self.model.predict(colour_texture_features(tiles)).astype(np.float32)


# ----------------------------------------------------------------------------- realism


def kid(fx: np.ndarray, fy: np.ndarray, n_sub: int = 50, sub: int = 100, seed: int = 0) -> float:
    """Kernel Inception Distance (unbiased MMD², cubic polynomial kernel), mean over subsets."""
    rng = np.random.default_rng(seed)
    m = min(sub, len(fx), len(fy))
    d = fx.shape[1]
    vals = []
    for _ in range(n_sub):
        x = fx[rng.choice(len(fx), m, replace=False)]
        y = fy[rng.choice(len(fy), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        vals.append(
            (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
            + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean()
        )
    return float(np.mean(vals))


def frechet(fx: np.ndarray, fy: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets."""
    mx, my = fx.mean(0), fy.mean(0)
    cx, cy = np.cov(fx, rowvar=False), np.cov(fy, rowvar=False)
    s, _ = linalg.sqrtm(cx @ cy, disp=False)
    s = np.real(s)
    return float(((mx - my) ** 2).sum() + np.trace(cx + cy - 2 * s))


class FeatureSpace:
    """GenST histology-encoder features, z-scored on the real reference set; PCA-32 for FD."""

    def __init__(self, enc, real_tiles: np.ndarray, n_pca: int = 32):
        self.enc = enc
        f = enc.tile_features(real_tiles)
        self.mu, self.sd = f.mean(0), f.std(0) + 1e-6
        z = (f - self.mu) / self.sd
        _, _, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
        self.pca = vt[:n_pca].T
        self.real = z

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        return (self.enc.tile_features(tiles) - self.mu) / self.sd

    def scores(self, tiles: np.ndarray) -> dict:
        z = self(tiles)
        return {
            "kid": round(kid(self.real, z), 4),
            "fd_pca32": round(frechet(self.real @ self.pca, z @ self.pca), 3),
        }


# ----------------------------------------------------------------------------- evaluation


def _context3(img: np.ndarray, xy: np.ndarray, t: int) -> np.ndarray:
    return np.stack([crop(img, x, y, 3 * t) for x, y in xy])


def evaluate_stmdit(
    data_dir: str | Path,
    holdout: str,
    model: str | Path = "default",
    genst: str | Path = "default",
    seeds: int = 3,
    settings: SamplerSettings | None = None,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    parts: tuple[str, ...] = ("fidelity", "control", "realism", "speed"),
) -> dict:
    """All figures of the protocol for one held-out section, as a JSON-able dict.

    ``parts`` selects among fidelity, control, realism and speed (realism needs fidelity's
    tiles, so it runs fidelity too). ``settings``: the sampler settings to evaluate with
    (steps, guidance scales, the expression guide and its options; default: the model
    card's), written into the loaded model's card so every sampler call uses them."""
    import torch

    def say(msg):
        if log is not None:
            log(msg)

    m = load_stmdit(model)
    if settings is not None:  # e.g. the default's sampler settings for its fold model
        m.card["sampler"] = {**m.card.get("sampler", {}), **dataclasses.asdict(settings)}
    s_all = m.sampler
    steps, (sg, sm), se = s_all.steps, s_all.guidance, s_all.guidance_expr
    gd = load_guide(m, s_all.guide) if se > 0 else None
    eg = {"guidance_expr": se, "guide": gd}
    secs = read_sections(data_dir)

    test, train = split_holdout(secs, holdout, data_dir)
    held = list(m.card.get("data", {}).get("held_out", []))
    bench = [g for g in benchmark_genes(secs, 50) if g in m.genes]
    bi = np.array([m.genes.index(g) for g in bench])
    gmodel, gcard, gpath, gsha = load_genst_model(genst)
    gpos = {g: i for i, g in enumerate(gcard["genes"])}
    gb = np.array([gpos[g] for g in bench])
    t = m.tile_px

    feat = section_features(test, m.genes, m.enc, None, tile_px=t, cache_dir=cache_dir, mpp=m.mpp)
    tiles, ctx2, expr = feat["spot_tiles"], feat["spot_ctx"], feat["spot_expr"]
    img = section_image(test, m.mpp, cache_dir or _default_cache())
    ctx3 = _context3(img, feat["spot_xy"], t)
    n = len(tiles)
    say(f"{holdout}: {n} spots, {len(bench)} benchmark genes")

    def repredict(gen_tiles: np.ndarray) -> dict:
        return {
            "tile": genst_predict(gmodel, genst_patches_for_tiles(gen_tiles))[:, gb],
            "context": genst_predict(gmodel, genst_patches_for_tiles(gen_tiles, ctx2))[:, gb],
        }

    y = expr[:, bi]
    run_fid = "fidelity" in parts or "realism" in parts
    ceiling: dict = {}
    run_cnn = run_fid or "control" in parts
    tr_tiles = [_spot_tiles(s, t, cache_dir, m.mpp) for s in train] if run_cnn else []
    if run_cnn:
        # independent oracle: a supervised CNN on the measured spots of the training sections
        cnn = cnn_oracle(
            np.concatenate(tr_tiles), np.concatenate([s.target(bench) for s in train]), cache_dir
        )
    if run_fid:
        real_pred = repredict(tiles)
        ceiling = {k: mean_r(y, v) for k, v in real_pred.items()}
        # independent oracle trained on the measured spots of the training sections
        oracle = RidgeOracle(
            np.concatenate(tr_tiles), np.concatenate([s.target(bench) for s in train])
        )
        ceiling["oracle"] = mean_r(y, oracle.predict(tiles))
        ceiling["cnn_oracle"] = mean_r(y, cnn.predict(tiles))
        say(f"ceiling {ceiling}")

    g_full = expr
    sets = {
        "genes": (g_full, None, sg, sm, se),
        "genes+morph": (g_full, ctx3, sg, sm, se),
        "morph": (g_full, ctx3, 0.0, sm, 0.0),
        "uncond": (g_full, None, 0.0, 0.0, 0.0),
    }
    fid: dict = {}
    gen_tiles: dict = {}
    for name, (g, c, s_g, s_m, s_e) in sets.items() if run_fid else ():
        t0 = time.time()
        out = synthesize(
            m,
            g,
            c,
            seed=1000,
            steps=steps,
            guidance_genes=s_g,
            guidance_morph=s_m,
            guidance_expr=s_e,
            guide=gd,
        )
        gen_tiles[name] = out
        rp = repredict(out)
        row = {k: round(mean_r(y, v), 4) for k, v in rp.items()}
        row["oracle"] = round(mean_r(y, oracle.predict(out)), 4)
        row["cnn_oracle"] = round(mean_r(y, cnn.predict(out)), 4)
        for k in ("tile", "context", "oracle", "cnn_oracle"):
            row[f"{k}_pct_of_ceiling"] = round(100 * row[k] / ceiling[k], 1)
        row["seconds"] = round(time.time() - t0, 1)
        fid[name] = row
        say(f"{name}: {row}")

    # control: slider sweeps of the top-10 genes, others at the training median
    top10 = bench[:10]
    ctrl: dict = {}
    if "control" in parts:
        gen = functools.partial(
            synthesize, m, steps=steps, guidance_genes=sg, guidance_morph=sm, **eg
        )
        ctrl = _control_sweeps(m, gen, top10, seeds, Readout(gmodel, gpos, cnn, bench))
    say(f"control done {ctrl}")

    # realism in GenST histology-encoder space (the default GenST = the re-predictor)
    realism: dict = {}
    if "realism" in parts:
        space = FeatureSpace(GenSTCondition.from_genst(gmodel), tiles)
        realism = {k: space.scores(v) for k, v in gen_tiles.items()}
        with torch.inference_mode():
            rec = tensor_to_images(m.ae.decode(m.ae.encode(images_to_tensor(tiles))[0]))
        realism["autoencoder_reconstruction"] = space.scores(rec)
        other = np.concatenate(tr_tiles)
        rng = np.random.default_rng(0)
        realism["real_training_sections"] = space.scores(other[rng.choice(len(other), n, False)])
        say("pixel realism (sharpness, nuclei, two-sample test)")
        realism["pixel_statistics"] = pixel_realism(test, gen_tiles, rec, m.mpp, cache_dir)

    # speed
    speed = _speed(m, ctx3, steps, (sg, sm), eg) if "speed" in parts else {}

    ctrl_vals = [v["spearman_pooled"] for v in ctrl.values()]
    return {
        "holdout": holdout,
        "model": {
            "name": m.name,
            "sha256": m.checksum,
            "weights_sha256": _weights_sha(model),
            "trained_without_holdout": holdout in held,
            "train_sections": m.card.get("data", {}).get("sections"),
        },
        "genst": {
            "path": gpath.name,
            "sha256": gsha,
            "same_as_condition_encoders": gsha == m.card.get("genst", {}).get("sha256"),
        },
        "n_spots": n,
        "genes": bench,
        "steps": steps,
        "guidance_genes": sg,
        "guidance_morph": sm,
        "guidance_expr": se,
        "sampler": m.card.get("sampler", {}),
        "guide": None
        if gd is None
        else {
            "name": gd.name,
            "sha256": gd.sha256,
            # the guide's per-tile tensors and decoding: what the figures depend on (the file's
            # sha256 also covers its card, which records wall-clock times)
            "label_key": genst_label_key(gd.genst),
            "same_as_evaluator": gd.sha256 == gsha,
            "trained_without_holdout": holdout not in gd.sections,
        },
        "ceiling": {k: round(v, 4) for k, v in ceiling.items()},
        "fidelity": fid,
        "control": {
            "genes": top10,
            "seeds": seeds,
            "slider_noise": "one seed per sweep: every slider value starts from the same noise",
            "mean_spearman_pooled": _mean(ctrl_vals),
            "mean_spearman_pooled_independent_noise": _mean(
                [v["spearman_pooled_independent_noise"] for v in ctrl.values()]
            ),
            "mean_spearman_per_seed": _mean([v["spearman_per_seed_mean"] for v in ctrl.values()]),
            "mean_spearman_pooled_cnn_oracle": _mean(
                [v["spearman_pooled_cnn_oracle"] for v in ctrl.values()]
            ),
            "mean_spearman_seed_mean_curve": _mean(
                [v["spearman_seed_mean_curve"] for v in ctrl.values()]
            ),
            "per_gene": ctrl,
        },
        "realism": {
            "feature_space": "GenST histology encoder ([mean,max]-pooled, z-scored on "
            "the real held-out tiles); Inception weights cannot be downloaded here",
            **realism,
        },
        "speed": speed,
    }


RATIO_KEYS = ("laplacian_variance", "hf_power_share", "nuclei_per_mm2", "nuclei_median_area_um2")


def card_figures(result: dict) -> dict:
    """The headline figures of an ``evaluate_stmdit`` result, flat, for a model card's
    ``figures`` block (the card keeps the full result next to it, so the two can be compared).

    Fidelity as % of the real tiles' ceiling per reader (GenST tile / context, ridge and CNN
    oracles) and condition set; slider control (pooled Spearman, GenST and CNN read-outs);
    the encoder-free realism ratios generated/real of genes+morph tiles and of the
    autoencoder's reconstructions at the reference µm/px; KID; seconds per tile."""
    fig: dict = {"holdout": result["holdout"], "n_spots": result["n_spots"]}
    fig["train_sections"] = result["model"].get("train_sections")
    for name, row in result.get("fidelity", {}).items():
        for reader in ("tile", "context", "oracle", "cnn_oracle"):
            fig[f"fidelity_pct_of_ceiling_{name}_{reader}"] = row[f"{reader}_pct_of_ceiling"]
    ctrl = result.get("control", {})
    for k in ("mean_spearman_pooled", "mean_spearman_pooled_cnn_oracle"):
        if ctrl.get(k) is not None:
            fig[f"control_{k}"] = ctrl[k]
    real = result.get("realism", {})
    for name in ("genes", "genes+morph", "morph", "uncond"):
        if name in real:
            fig[f"kid_{name}"] = real[name]["kid"]
    pix = real.get("pixel_statistics", {})
    ref = f"at_{REFERENCE_MPP:g}_um_px"
    for name in ("genes+morph", "autoencoder_reconstruction"):
        rep = pix.get(name, {}).get(ref)
        if rep is None:
            continue
        for k in RATIO_KEYS:
            fig[f"realism_{name}_{k}_ratio"] = rep[k]["ratio"]
        fig[f"realism_{name}_two_sample_accuracy"] = rep["two_sample_accuracy"]
    fig.update({f"speed_{k}": v for k, v in result.get("speed", {}).items()})
    return fig


@dataclass
class Readout:
    """How generated tiles are read back: the GenST re-predictor and the CNN oracle."""

    gmodel: Any
    gpos: dict[str, int]
    cnn: Any
    bench: list[str]

    def genst(self, tiles: np.ndarray, gene: str) -> np.ndarray:
        patches = genst_patches_for_tiles(tiles)
        return genst_predict(self.gmodel, patches)[:, self.gpos[gene]]

    def cnn_gene(self, tiles: np.ndarray, gene: str) -> np.ndarray:
        return self.cnn.predict(tiles)[:, self.bench.index(gene)]


def _control_sweeps(
    m: STMDiTModel, synth: Callable[..., np.ndarray], genes: list[str], seeds: int, ro: Readout
) -> dict:
    """Slider sweeps of ``genes`` (others at the training median), read back by ``ro``."""
    ctrl: dict = {}
    for gname in genes:
        j = m.genes.index(gname)
        lo, hi = m.gene_range[j]
        vals = np.linspace(lo, hi, SLIDER_VALUES)
        prof = np.tile(m.gene_median, (SLIDER_VALUES, 1)).astype(np.float32)
        prof[:, j] = vals
        rep, per_seed, rep_ind, rep_cnn = [], [], [], []
        gen = functools.partial(synth, focus=[gname])
        for s in range(seeds):
            # the slider as used: one seed (same starting noise) for every slider value
            out = np.concatenate(
                [gen(prof[i : i + 1], None, seed=2000 + s) for i in range(SLIDER_VALUES)]
            )
            r = ro.genst(out, gname)
            rep.append(r)
            rep_cnn.append(ro.cnn_gene(out, gname))
            per_seed.append(spearmanr(vals, r).statistic)
            # earlier read-out: a different starting noise for every slider value
            out = gen(prof, None, seed=2000 + s)
            rep_ind.append(ro.genst(out, gname))
        rep, rep_ind = np.stack(rep), np.stack(rep_ind)  # (seeds, values)
        rep_cnn = np.stack(rep_cnn)
        ctrl[gname] = {
            "spearman_pooled_cnn_oracle": round(
                float(spearmanr(np.tile(vals, seeds), rep_cnn.ravel()).statistic), 3
            ),
            "cnn_oracle_mean": [round(float(v), 3) for v in rep_cnn.mean(0)],
            "spearman_pooled_independent_noise": round(
                float(spearmanr(np.tile(vals, seeds), rep_ind.ravel()).statistic), 3
            ),
            "values": [round(float(v), 3) for v in vals],
            "repredicted_mean": [round(float(v), 3) for v in rep.mean(0)],
            "spearman_pooled": round(
                float(spearmanr(np.tile(vals, seeds), rep.ravel()).statistic), 3
            ),
            "spearman_per_seed_mean": round(float(np.nanmean(per_seed)), 3),
            "spearman_seed_mean_curve": round(float(spearmanr(vals, rep.mean(0)).statistic), 3),
        }
    return ctrl


def _speed(
    m: STMDiTModel, ctx3: np.ndarray, steps: int, guidance: tuple[float, float], eg: dict
) -> dict:
    """Seconds per tile at batch 1 (genes, genes+morph; median of 3) and batch 16."""
    import torch

    g1 = m.gene_median[None]
    speed: dict = {}
    for label, c in (("genes", None), ("genes+morph", ctx3[:1])):
        ts = []
        for r in range(3):
            t0 = time.perf_counter()
            synthesize(
                m, g1, c, seed=r, steps=steps, guidance_genes=guidance[0],
                guidance_morph=guidance[1], **eg,
            )  # fmt: skip
            ts.append(time.perf_counter() - t0)
        speed[f"s_per_tile_{label}_batch1"] = round(float(np.median(ts)), 3)
    t0 = time.perf_counter()
    synthesize(m, np.repeat(g1, 16, 0), ctx3[:16], seed=0, steps=steps, **eg)
    speed["s_per_tile_genes+morph_batch16"] = round((time.perf_counter() - t0) / 16, 3)
    speed["torch_threads"] = torch.get_num_threads()
    return speed


def pixel_realism(sec, gen_tiles: dict, rec: np.ndarray, mpp: float, cache_dir=None) -> dict:
    """Encoder-independent realism figures (``training.realism``) of every generated set and
    of the autoencoder's reconstructions, against the real tiles of the same spots of ``sec``
    at ``realism.REFERENCE_MPP`` (and at the model's µm/px when it is coarser)."""
    real = spot_tiles_at(sec, REFERENCE_MPP, cache_dir or _default_cache())
    out: dict = {
        "reference": f"real tiles of the same spots at {REFERENCE_MPP} µm/px; generated tiles "
        "resampled to it (bicubic), and real tiles shrunk (box) to the model's µm/px",
        "model_mpp": mpp,
    }
    for k, v in {**gen_tiles, "autoencoder_reconstruction": rec}.items():
        out[k] = compare_at_scales(real, v, mpp)
    return out


def cnn_oracle(tiles: np.ndarray, expr: np.ndarray, cache_dir=None, epochs: int = 30):
    """The CNN baseline regressor (``training.baselines``) fitted on real 112 µm tiles and
    their measured expression, cached in ``cache_dir`` by the data's checksum."""
    from safetensors.torch import load_file, save_file

    h = hashlib.sha1(np.ascontiguousarray(tiles).tobytes())
    h.update(np.ascontiguousarray(expr, np.float32).tobytes())
    path = (
        Path(cache_dir or _default_cache())
        / f"cnn_oracle_{h.hexdigest()[:12]}_e{epochs}.safetensors"
    )
    if path.exists():
        return CNNRegressor.from_state(load_file(str(path)))
    reg = fit_cnn_regressor(tiles, np.asarray(expr, np.float32), epochs=epochs)
    with atomic_path(path) as tmp:
        save_file(reg.state(), str(tmp))
    return reg


def _weights_sha(model: str | Path) -> str:
    """``tensors_sha`` of a checkpoint's tensors (the file's sha256 also covers its card)."""
    from safetensors.torch import load_file

    return tensors_sha(load_file(str(resolve_checkpoint(model, "stmdit"))))


def _mean(v: list) -> float | None:
    return round(float(np.mean(v)), 3) if v else None


def _spot_tiles(sec, t: int, cache_dir, mpp: float) -> np.ndarray:
    img = section_image(sec, mpp, cache_dir or _default_cache())
    xy = np.asarray(sec.xy_px) * sec.mpp / mpp
    return np.stack([crop(img, x, y, t) for x, y in xy])


def _default_cache() -> Path:
    return DEFAULT_CACHE
