"""Masked-window fitting of a HistoTx model on spot sets: the loop training uses and
test-time adaptation (``adapt_to_measured``: a copy fine-tuned on one slide's measured spots).

A sample is a window of up to ``max_tokens`` spots of one set nearest a random spot
(within ``radius_um``), randomly rotated/flipped; see ``training.histotx`` for the losses.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from napari_stgen.inference.features import N_FEATURES
from napari_stgen.inference.neighbours import neighbour_order

if TYPE_CHECKING:  # torch at import: type names only
    from napari_stgen.models.histotx import HistoTx


@dataclass
class SpotSet:
    """One section: spot positions (µm), panel targets and image features (``None`` for an
    expression-only section: its image tokens are withheld, i.e. the "no image" embedding)."""

    name: str
    xy_px: np.ndarray  # (N, 2)
    xy_um: np.ndarray  # (N, 2)
    y: np.ndarray  # (N, G) log1p CP10k on the panel
    feats: np.ndarray | None  # (N, F)
    mpp: float
    present: np.ndarray | None = None  # (G,) bool: panel genes the section measured (None: all)

    @property
    def patient(self) -> str:
        return self.name[:1]

    @property
    def has_image(self) -> bool:
        return self.feats is not None

    def gene_present(self) -> np.ndarray:
        g = self.y.shape[1]
        return np.ones(g, bool) if self.present is None else np.asarray(self.present, bool)


@dataclass
class TrainConfig:
    """Training hyper-parameters (stored in the model card)."""

    steps: int = 500
    batch: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    max_tokens: int = 48
    radius_um: float = 1500.0
    hide_lo: float = 0.3
    hide_hi: float = 0.7
    p_image_only: float = 0.25
    p_gene_drop: float = 0.3
    w_visible: float = 0.1
    p_no_image: float = 0.15  # fused windows whose image tokens are all withheld
    p_drop_image: float = 0.15  # per-token image dropout in the other fused windows
    feat_noise: float = 0.5  # Gaussian noise on standardized image features (anti-memorizing)
    dim: int = 64
    depth: int = 3
    seed: int = 0
    threads: int = 1
    knn_k: int = 16  # > 0: the model is a residual on kNN interpolation (HistoTxConfig.knn_k)
    knn_bw_um: float = 300.0  # Gaussian weights of those k (HistoTxConfig.knn_bw_um; 0: plain)
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- batches
class WindowSampler:
    """Random masked windows over SpotSets (numpy); ``batch(rng)`` → dict of arrays."""

    def __init__(self, sets: list[SpotSet], y_mean, y_std, tcfg: TrainConfig):
        self.sets, self.t = sets, tcfg
        self.ys = [((s.y - y_mean) / y_std).astype(np.float32) for s in sets]
        self.nbr = [
            neighbour_order(s.xy_um, s.xy_um, min(tcfg.max_tokens, len(s.xy_um)), tcfg.radius_um)
            for s in sets
        ]
        w = np.array([len(s.xy_um) for s in sets], np.float64)
        self.p = w / w.sum()
        wi = w * np.array([s.has_image for s in sets])
        self.p_img = wi / wi.sum() if wi.sum() > 0 else None  # image-only batches: imaged sets
        self.fdim = next((s.feats.shape[1] for s in sets if s.has_image), N_FEATURES)

    def batch(self, rng: np.random.Generator, b: int | None = None) -> dict:
        t = self.t
        b = b or t.batch
        n, g = t.max_tokens, self.ys[0].shape[1]
        fdim = self.fdim
        out = {
            "img_feat": np.zeros((b, n, fdim), np.float32),
            "img_pos": np.zeros((b, n, 2), np.float32),
            "img_valid": np.zeros((b, n), bool),
            "img_present": np.ones((b, n), bool),
            "tx": np.zeros((b, n, g), np.float32),
            "tx_mask": np.zeros((b, n, g), np.float32),
            "tx_pos": np.zeros((b, n, 2), np.float32),
            "tx_valid": np.zeros((b, n), bool),
            "target": np.zeros((b, n, g), np.float32),
            "weight": np.zeros((b, n), np.float32),
            "gene_w": np.ones((b, g), np.float32),
        }
        # whole batch one mode; image-only batches draw imaged sections only
        image_only = self.p_img is not None and rng.random() < t.p_image_only
        for i in range(b):
            k = rng.choice(len(self.sets), p=self.p_img if image_only else self.p)
            s, ys = self.sets[k], self.ys[k]
            pres = s.gene_present().astype(np.float32)
            out["gene_w"][i] = pres
            c = rng.integers(len(s.xy_um))
            idx = self.nbr[k][c]
            idx = idx[idx >= 0]
            m = len(idx)
            rel = s.xy_um[idx] - s.xy_um[c]
            a = rng.uniform(0, 2 * np.pi)
            rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
            if rng.random() < 0.5:
                rot = rot @ np.diag([1.0, -1.0])
            rel = rel @ rot.T
            if s.has_image:
                out["img_feat"][i, :m] = s.feats[idx]
            out["img_pos"][i, :m] = rel
            out["img_valid"][i, :m] = True
            out["target"][i, :m] = ys[idx]
            if image_only:
                out["weight"][i, :m] = 1.0
                continue
            frac = rng.uniform(t.hide_lo, t.hide_hi)
            hidden = rng.random(m) < frac
            if hidden.all() or not hidden.any():
                hidden[rng.integers(m)] = not hidden.all()
                if hidden.all():
                    hidden[rng.integers(m)] = False
            vis = np.flatnonzero(~hidden)
            gm = pres.copy()
            if rng.random() < t.p_gene_drop:
                gm *= (rng.random(g) >= rng.uniform(0.1, 0.9)).astype(np.float32)
                if gm.sum() == 0:
                    gm[np.flatnonzero(pres)[rng.integers(int(pres.sum()))]] = 1.0
            out["tx"][i, : len(vis)] = ys[idx[vis]] * gm
            out["tx_mask"][i, : len(vis)] = gm
            out["tx_pos"][i, : len(vis)] = rel[vis]
            out["tx_valid"][i, : len(vis)] = True
            out["weight"][i, :m] = np.where(hidden, 1.0, t.w_visible)
            if not s.has_image or rng.random() < t.p_no_image:
                out["img_present"][i] = False
            else:
                out["img_present"][i] = rng.random(n) >= t.p_drop_image
        out["image_only"] = image_only
        m_tx = max(1, int(out["tx_valid"].sum(1).max()))
        for k in ("tx", "tx_mask", "tx_pos", "tx_valid"):
            out[k] = np.ascontiguousarray(out[k][:, :m_tx])
        return out


def cosine_lr(step: int, total: int, warm: int = 100) -> float:
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + np.cos(np.pi * (step - warm) / max(1, total - warm)))


def fit_masked(
    model: HistoTx,
    sets: list[SpotSet],
    tcfg: TrainConfig,
    log: Callable[[str], None] | None = None,
    warm: int = 100,
) -> tuple[HistoTx, dict]:
    """Masked training of ``model`` on ``sets`` (normalization buffers already set)."""
    import torch

    torch.set_num_threads(max(1, tcfg.threads))
    torch.manual_seed(tcfg.seed)
    rng = np.random.default_rng(tcfg.seed)
    y_mean, y_std = model.y_mean.numpy(), model.y_std.numpy()
    sampler = WindowSampler(sets, y_mean, y_std, tcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    hist: dict = {"loss": [], "loss_fused": [], "loss_image": []}
    t0 = time.time()
    model.train()
    run = {"fused": [], "image": []}
    for step in range(tcfg.steps):
        bt = sampler.batch(rng)
        tens = {k: torch.from_numpy(v) for k, v in bt.items() if isinstance(v, np.ndarray)}
        if tcfg.feat_noise > 0:
            noise = torch.randn_like(tens["img_feat"]) * tcfg.feat_noise * model.feat_std
            tens["img_feat"] = tens["img_feat"] + noise
        if bt["image_only"]:
            pred = model(tens["img_feat"], tens["img_pos"], tens["img_valid"])
        else:
            pred = model(
                tens["img_feat"],
                tens["img_pos"],
                tens["img_valid"],
                tens["tx"],
                tens["tx_mask"],
                tens["tx_pos"],
                tens["tx_valid"],
                tens["img_present"],
            )
        w, gw = tens["weight"], tens["gene_w"][:, None, :]
        se = (((pred - tens["target"]) ** 2) * gw).sum(-1) / gw.sum(-1).clamp_min(1.0)
        loss = (se * w).sum() / w.sum().clamp_min(1e-6)
        for pg in opt.param_groups:
            pg["lr"] = tcfg.lr * cosine_lr(step, tcfg.steps, warm)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lv = float(loss.detach())
        hist["loss"].append(lv)
        run["image" if bt["image_only"] else "fused"].append(lv)
        if log is not None and (step + 1) % 250 == 0:
            f = np.mean(run["fused"][-50:]) if run["fused"] else float("nan")
            im = np.mean(run["image"][-50:]) if run["image"] else float("nan")
            log(
                f"step {step + 1}/{tcfg.steps} fused {f:.4f} image-only {im:.4f} "
                f"({time.time() - t0:.0f}s)"
            )
    hist["loss_fused"] = run["fused"]
    hist["loss_image"] = run["image"]
    hist["train_seconds"] = time.time() - t0
    model.eval()
    return model, hist


def adapt_to_measured(
    model: HistoTx,
    feats: np.ndarray,
    xy_um: np.ndarray,
    y: np.ndarray,
    steps: int = 200,
    lr: float = 3e-4,
    tcfg: TrainConfig | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> HistoTx:
    """Test-time adaptation: a copy of ``model`` fine-tuned by masking on the measured spots
    of one slide (their image features, µm positions and log1p CP10k panel profiles ``y``).

    Only measured spots are used (a window hides some of them and predicts them from the
    others and the image), so nothing unmeasured is seen. Normalization statistics are kept.
    """
    tcfg = copy.copy(tcfg or TrainConfig())
    tcfg.steps, tcfg.lr, tcfg.seed = steps, lr, seed
    tcfg.batch = min(tcfg.batch, max(2, len(y) // 8))
    m = copy.deepcopy(model)
    if steps <= 0 or len(y) < 4:
        return m.eval()
    s = SpotSet(
        "measured",
        np.asarray(xy_um, np.float64),
        np.asarray(xy_um, np.float64),
        y,
        np.asarray(feats, np.float32),
        1.0,
    )
    return fit_masked(m, [s], tcfg, log=log, warm=min(20, steps // 5))[0]
