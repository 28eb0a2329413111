"""Encoder-independent realism figures of generated H&E tiles (no network takes part).

Generated and real tiles are compared at the same µm/px (``at_mpp`` resamples a tile set):

1. sharpness: variance of the Laplacian of the grey image, and the share of (mean-removed,
   Hann-windowed) spectral power above 0.25 cycles/µm (a 4 µm period);
2. nuclei: haematoxylin channel (``skimage.color.rgb2hed``), a threshold fixed on the real
   tiles (Otsu over their pooled pixels), connected components of 10–150 µm²: their number
   per mm² of tile and their median area;
3. a classifier two-sample test: cross-validated accuracy of a logistic regression telling
   real from generated tiles on hand-crafted colour/texture/nuclei features (0.5 means
   indistinguishable). With paired tiles (same spots) the folds split by spot.
"""

from __future__ import annotations

import numpy as np

from napari_stgen.training.stmdit_data import crop, section_image
from napari_stgen.training.tile_features import colour_texture_features

HF_CUTOFF = 0.25  # cycles per µm
NUCLEUS_UM2 = (10.0, 150.0)


def _grey(tiles: np.ndarray) -> np.ndarray:
    t = np.asarray(tiles, np.float32) / 255.0
    return t @ np.array([0.299, 0.587, 0.114], np.float32)


def at_mpp(tiles: np.ndarray, mpp: float, target: float) -> np.ndarray:
    """uint8 tiles resampled from ``mpp`` to ``target`` µm/px (bicubic up, box down)."""
    from PIL import Image

    if abs(mpp - target) < 1e-9:
        return np.asarray(tiles)
    t = np.asarray(tiles)
    px = int(round(t.shape[1] * mpp / target))
    f = Image.Resampling.BICUBIC if target < mpp else Image.Resampling.BOX
    return np.stack([np.asarray(Image.fromarray(x).resize((px, px), f)) for x in t])


def laplacian_variance(tiles: np.ndarray) -> np.ndarray:
    """(N,) variance of the Laplacian of each tile's grey image in [0, 1]."""
    from scipy.ndimage import laplace

    return np.array([float(laplace(g).var()) for g in _grey(tiles)])


def high_frequency_share(tiles: np.ndarray, mpp: float, cutoff: float = HF_CUTOFF) -> np.ndarray:
    """(N,) share of each tile's spectral power above ``cutoff`` cycles/µm."""
    g = _grey(tiles)
    n = g.shape[1]
    w = np.hanning(n)[:, None] * np.hanning(n)[None]
    g = (g - g.mean((1, 2), keepdims=True)) * w
    p = np.abs(np.fft.fft2(g)) ** 2
    f = np.fft.fftfreq(n) / mpp  # cycles per µm
    r = np.hypot(f[:, None], f[None])
    tot = p.sum((1, 2)) + 1e-12
    return p[:, r > cutoff].sum(1) / tot


def haematoxylin(tiles: np.ndarray) -> np.ndarray:
    """(N, H, W) haematoxylin optical density (``rgb2hed`` channel 0)."""
    from skimage.color import rgb2hed

    return np.stack([rgb2hed(t)[..., 0] for t in np.asarray(tiles)]).astype(np.float32)


def nuclei_threshold(real_tiles: np.ndarray) -> float:
    """Haematoxylin threshold fixed on real tiles: Otsu over their pooled pixels."""
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(haematoxylin(real_tiles).ravel()))


def nuclei(tiles: np.ndarray, mpp: float, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per tile: nuclei (10–150 µm² components above ``threshold``) per mm², median area µm²
    (NaN when a tile has none)."""
    from scipy.ndimage import label

    lo, hi = NUCLEUS_UM2[0] / mpp**2, NUCLEUS_UM2[1] / mpp**2
    dens, med = [], []
    for h in haematoxylin(tiles):
        lab, k = label(h > threshold)
        areas = np.bincount(lab.ravel())[1:] if k else np.zeros(0)
        keep = areas[(areas >= lo) & (areas <= hi)]
        dens.append(len(keep) / (h.size * mpp**2 * 1e-6))
        med.append(float(np.median(keep)) * mpp**2 if len(keep) else np.nan)
    return np.asarray(dens), np.asarray(med)


def tile_features(tiles: np.ndarray, mpp: float, threshold: float) -> np.ndarray:
    """Hand-crafted colour/texture/nuclei features (N, F) for the two-sample test."""
    dens, med = nuclei(tiles, mpp, threshold)
    extra = np.stack(
        [
            np.log(laplacian_variance(tiles) + 1e-8),
            np.log(high_frequency_share(tiles, mpp) + 1e-8),
            dens / 1000.0,
            np.nan_to_num(med, nan=0.0) / 100.0,
        ],
        1,
    )
    return np.concatenate([colour_texture_features(tiles), extra], 1).astype(np.float64)


def two_sample_accuracy(
    fa: np.ndarray, fb: np.ndarray, folds: int = 5, seed: int = 0, paired: bool = False
) -> float:
    """Cross-validated accuracy of a logistic regression telling the rows of ``fa`` from
    those of ``fb`` (balanced classes expected; 0.5 = indistinguishable). ``paired``: row i
    of both comes from the same spot, and the folds keep each pair together."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([fa, fb])
    y = np.r_[np.zeros(len(fa)), np.ones(len(fb))]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    if paired and len(fa) == len(fb):
        rng = np.random.default_rng(seed)
        g = rng.permutation(len(fa)) % folds
        cv = GroupKFold(folds)
        s = cross_val_score(clf, x, y, cv=cv, groups=np.r_[g, g])
    else:
        cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
        s = cross_val_score(clf, x, y, cv=cv)
    return float(np.mean(s))


def realism_report(
    real: np.ndarray,
    gen: np.ndarray,
    mpp: float,
    threshold: float | None = None,
    paired: bool = True,
) -> dict:
    """The realism figures of ``gen`` against ``real`` (uint8 tiles at the same ``mpp``):
    each measure's real and generated mean and their ratio generated/real, and the
    two-sample accuracy. ``threshold``: haematoxylin threshold (default: Otsu on ``real``)."""
    real, gen = np.asarray(real), np.asarray(gen)
    if real.shape[1:] != gen.shape[1:]:
        raise ValueError(f"tiles differ in size: {real.shape[1:]} vs {gen.shape[1:]}")
    thr = nuclei_threshold(real) if threshold is None else float(threshold)
    out: dict = {
        "mpp": mpp,
        "tile_px": int(real.shape[1]),
        "n_real": len(real),
        "n_generated": len(gen),
        "haematoxylin_threshold": round(thr, 4),
    }
    dr, mr = nuclei(real, mpp, thr)
    dg, mg = nuclei(gen, mpp, thr)
    measures = {
        "laplacian_variance": (laplacian_variance(real), laplacian_variance(gen)),
        "hf_power_share": (high_frequency_share(real, mpp), high_frequency_share(gen, mpp)),
        "nuclei_per_mm2": (dr, dg),
        "nuclei_median_area_um2": (mr, mg),
    }
    for k, (a, b) in measures.items():
        ra = float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")
        rb = float(np.nanmean(b)) if np.isfinite(b).any() else float("nan")
        out[k] = {"real": _r(ra), "generated": _r(rb), "ratio": _r(rb / ra if ra else np.nan)}
    out["two_sample_accuracy"] = round(
        two_sample_accuracy(
            tile_features(real, mpp, thr),
            tile_features(gen, mpp, thr),
            paired=paired and len(real) == len(gen),
        ),
        3,
    )
    return out


def _r(v: float) -> float | None:
    return None if not np.isfinite(v) else float(f"{v:.4g}")


REFERENCE_MPP = 0.875  # µm/px at which generated and real tiles are compared (issue 15)


def spot_tiles_at(sec, mpp: float, cache_dir, tile_um: float = 112.0) -> np.ndarray:
    """Real tiles of ``tile_um`` centred on a section's spots, at ``mpp`` µm/px."""
    img = section_image(sec, mpp, cache_dir)
    px = int(round(tile_um / mpp))
    xy = np.asarray(sec.xy_px) * sec.mpp / mpp
    return np.stack([crop(img, x, y, px) for x, y in xy])


def compare_at_scales(
    real_ref: np.ndarray,
    tiles: np.ndarray,
    tiles_mpp: float,
    ref_mpp: float = REFERENCE_MPP,
    paired: bool = True,
) -> dict:
    """``realism_report`` of ``tiles`` (at ``tiles_mpp``) against the real tiles of the same
    spots ``real_ref`` (at ``ref_mpp``): at ``ref_mpp`` (tiles resampled), and, when the
    tiles are coarser, also at their own µm/px (real tiles shrunk to it)."""
    out = {
        f"at_{ref_mpp:g}_um_px": realism_report(
            real_ref, at_mpp(tiles, tiles_mpp, ref_mpp), ref_mpp, paired=paired
        )
    }
    if tiles_mpp > ref_mpp + 1e-9:
        out[f"at_model_{tiles_mpp:g}_um_px"] = realism_report(
            at_mpp(real_ref, ref_mpp, tiles_mpp), tiles, tiles_mpp, paired=paired
        )
    return out
