"""Leave-one-section-out evaluation of HistoTx with half of the held-out spots hidden.

On the held-out section a seeded random half of the spots is hidden; the other half is
"measured". Every method predicts the hidden spots; the score is the per-gene Pearson over
the hidden spots, mean over the 50 benchmark genes (BENCHMARKS.md genes, log1p CP10k):

- ``histotx``: image tokens of the window's spots + transcript tokens of the visible spots;
- ``histotx_adapted``: the same, after ``adapt_steps`` of masked fine-tuning on the visible
  (measured) spots of the held-out section only (test-time adaptation);
- ``histotx_image_only``: the same model without transcript tokens;
- ``histotx_transcripts_only``: the same model with every image token's pixels withheld;
- ``genst``: a GenST checkpoint (image only) when one is given — the result records whether
  it saw the held-out section in training;
- ``nearest_neighbour``: the profile of the nearest visible spot;
- ``gaussian_process``: per-gene sklearn GaussianProcessRegressor (constant × RBF + white
  noise, hyper-parameters by marginal likelihood) on the visible spots' µm positions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .metrics import pearson_per_gene


def split_hidden(n: int, frac: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(hidden, visible) sorted index arrays: a seeded random ``frac`` of n spots hidden."""
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * frac))
    return np.sort(perm[:k]), np.sort(perm[k:])


def nearest_neighbour(xy_vis: np.ndarray, y_vis: np.ndarray, xy_q: np.ndarray) -> np.ndarray:
    """Profile of the nearest visible spot for each query."""
    from scipy.spatial import cKDTree

    _, i = cKDTree(xy_vis).query(xy_q, k=1)
    return y_vis[i]


def gaussian_process(
    xy_vis: np.ndarray, y_vis: np.ndarray, xy_q: np.ndarray, seed: int = 0
) -> np.ndarray:
    """Per-column GP regression (kriging) of ``y_vis`` at the queries; positions in µm."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

    x = np.asarray(xy_vis, np.float64) / 1000.0  # mm
    xq = np.asarray(xy_q, np.float64) / 1000.0
    out = np.empty((len(xq), y_vis.shape[1]), np.float32)
    for j in range(y_vis.shape[1]):
        k = ConstantKernel(1.0, (1e-3, 1e2)) * RBF(0.4, (0.05, 5.0)) + WhiteKernel(0.5, (1e-3, 1e1))
        gp = GaussianProcessRegressor(k, normalize_y=True, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gp.fit(x, y_vis[:, j])
        out[:, j] = gp.predict(xq)
    return out


def _score(pred: np.ndarray, true: np.ndarray) -> dict:
    r = pearson_per_gene(pred, true)
    return {"mean_pearson": round(float(r.mean()), 4), "per_gene": [round(float(v), 4) for v in r]}


def genst_predict(genst_model: str | Path, data_dir: str | Path, holdout: str, xy_px, mpp):
    """GenST predictions (panel = its genes) at the held-out section's spots, and its card."""
    from PIL import Image

    from ..inference.patches import patches_from_array
    from ..inference.predictor import load_genst
    from ..io.her2st import read_her2st_section

    pred = load_genst(genst_model, device="cpu")
    sec = read_her2st_section(data_dir, holdout)
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(sec.image_path) as im:
        img = np.asarray(im.convert("RGB"))
    patches = patches_from_array(img, xy_px, pred.patch_um / mpp, pred.patch_px)
    return pred.predict(patches).expr, pred


def run_fold(
    data_dir: str | Path,
    holdout: str,
    tcfg=None,
    model: str | Path | None = None,
    genst_model: str | Path | None = None,
    hide_frac: float = 0.5,
    split_seed: int = 0,
    gp: bool = True,
    cache_dir: str | Path | None = None,
    save_model: str | Path | None = None,
    adapt_steps: int = 0,
    log=print,
) -> dict:
    """Train HistoTx without ``holdout`` (or load ``model``) and score all methods on it."""
    import torch

    from ..errors import StgenError
    from ..inference.histotx import load_histotx, predict_sites
    from .histotx import TrainConfig, load_spotsets, model_card, train_histotx
    from .histotx import save_model as _save

    sets, panel, bench = load_spotsets(data_dir, cache_dir=cache_dir)
    from .data import split_holdout

    te, tr = split_holdout(sets, holdout, data_dir)
    hid, vis = split_hidden(len(te.xy_um), hide_frac, split_seed)
    res: dict = {
        "holdout": holdout,
        "train_sections": [s.name for s in tr],
        "n_spots": int(len(te.xy_um)),
        "n_hidden": int(len(hid)),
        "hide_fraction": hide_frac,
        "split_seed": split_seed,
        "genes": bench,
        "metric": "mean Pearson over the 50 benchmark genes on the hidden spots",
    }
    t0 = time.time()
    if model is None:
        tcfg = tcfg or TrainConfig()
        net, hist = train_histotx(tr, panel, None, tcfg, log=log)
        res["train_seconds"] = round(time.time() - t0, 1)
        res["train_config"] = {k: v for k, v in tcfg.__dict__.items() if k != "extra"}
        mpanel = panel
        if save_model is not None:
            card = model_card(
                net,
                panel,
                bench,
                tcfg,
                name=Path(save_model).stem,
                data={"dir": str(data_dir), "sections": res["train_sections"]},
            )
            _save(save_model, net, card)
        max_img = max_tx = tcfg.max_tokens
        radius = tcfg.radius_um
    else:
        p = load_histotx(model, device="cpu")
        net, mpanel = p.model, p.genes
        res["model"] = {"name": p.name, "path": str(p.path), "sha256": p.checksum}
        res["model_saw_holdout"] = holdout in p.card.get("data", {}).get("sections", [])
        max_img, max_tx, radius = p.max_img, p.max_tx, p.radius_um
        if mpanel != panel:
            raise StgenError(f"{p.path}: gene panel differs from the data's panel")
    torch.set_num_threads(1)
    ib = [panel.index(g) for g in bench]
    true = te.y[hid][:, ib]
    q_f, q_xy = te.feats[hid], te.xy_um[hid]
    t1 = time.time()
    # every mode predicts the hidden spots from all image tokens of the section
    window = dict(max_img=max_img, max_tx=max_tx, radius_um=radius, exclude_self=True)
    measured = (te.y[vis], None, te.xy_um[vis])
    fused, nctx = predict_sites(net, q_f, q_xy, te.feats, te.xy_um, *measured, **window)
    img_only, _ = predict_sites(net, q_f, q_xy, te.feats, te.xy_um, **window)
    tx_only, _ = predict_sites(
        net, q_f, q_xy, te.feats, te.xy_um, *measured, **window, use_image=False
    )
    res["predict_seconds"] = round(time.time() - t1, 2)
    adapted = None
    if adapt_steps > 0:
        from .histotx import adapt_to_measured

        t2 = time.time()
        net_a = adapt_to_measured(
            net, te.feats[vis], te.xy_um[vis], te.y[vis], steps=adapt_steps, tcfg=tcfg
        )
        adapted, _ = predict_sites(
            net_a,
            q_f,
            q_xy,
            te.feats,
            te.xy_um,
            te.y[vis],
            None,
            te.xy_um[vis],
            max_img=max_img,
            max_tx=max_tx,
            radius_um=radius,
            exclude_self=True,
        )
        res["adapt_seconds"] = round(time.time() - t2, 1)
        res["adapt_steps"] = adapt_steps
    res["mean_transcript_tokens"] = round(float(nctx.mean()), 1)
    methods = {
        "histotx": _score(fused[:, ib], true),
        **({"histotx_adapted": _score(adapted[:, ib], true)} if adapted is not None else {}),
        "histotx_image_only": _score(img_only[:, ib], true),
        "histotx_transcripts_only": _score(tx_only[:, ib], true),
        "nearest_neighbour": _score(nearest_neighbour(te.xy_um[vis], te.y[vis][:, ib], q_xy), true),
    }
    if gp:
        t2 = time.time()
        methods["gaussian_process"] = _score(
            gaussian_process(te.xy_um[vis], te.y[vis][:, ib], q_xy), true
        )
        res["gp_seconds"] = round(time.time() - t2, 1)
    if genst_model is not None:
        e, gp_ = genst_predict(genst_model, data_dir, holdout, te.xy_px[hid], te.mpp)
        missing = [g for g in bench if g not in gp_.genes]
        if missing:
            raise StgenError(f"{gp_.path}: GenST panel lacks benchmark genes {missing[:5]}")
        methods["genst"] = _score(e[:, [gp_.genes.index(g) for g in bench]], true)
        res["genst_model"] = {
            "path": str(gp_.path),
            "sha256": gp_.checksum,
            "saw_holdout": holdout in gp_.card.get("data", {}).get("sections", []),
        }
    res["methods"] = methods
    res["summary"] = {k: v["mean_pearson"] for k, v in methods.items()}
    return res


def dumps(res: dict) -> str:
    return json.dumps(res, indent=2)
