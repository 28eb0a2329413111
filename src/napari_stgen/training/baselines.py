"""Baselines for the GenST benchmark (BENCHMARKS.md), run on the same folds and genes.

1. training mean (a constant: Pearson 0 by construction — the sanity floor);
2. ridge regression on colour/texture features of the 112 µm spot patch;
3. a supervised CNN regressor with GenST's image encoder (same conv blocks and channels) on
   the 112 µm patch at 64 px, flips/rotations/colour jitter, 4-rotation test-time averaging.
"""

from __future__ import annotations

import numpy as np

from napari_stgen.inference.device import safe_cpu_training
from napari_stgen.inference.features import he_patch_features
from napari_stgen.inference.patches import _resize
from napari_stgen.models.genst import HistologyEncoder, to_input
from napari_stgen.training.data import SectionData
from napari_stgen.training.genst import _cosine, augment


def centre_view(patches: np.ndarray, frac: float = 0.5, out_px: int = 64) -> np.ndarray:
    """Centre crop of ``frac`` of the edge (224 µm → 112 µm), resized to ``out_px``."""

    s = patches.shape[1]
    c = int(round(s * frac))
    o = (s - c) // 2
    crop = patches[:, o : o + c, o : o + c]
    if c == out_px:
        return np.ascontiguousarray(crop)
    return np.stack([_resize(p, out_px) for p in crop])


def mean_baseline(train: list[SectionData], n_test: int) -> np.ndarray:
    """Predict the training mean for every test spot."""
    y = np.concatenate([s.y for s in train], 0)
    return np.repeat(y.mean(0, keepdims=True), n_test, axis=0)


def ridge_baseline(train: list[SectionData], test_patches: np.ndarray) -> np.ndarray:
    """RidgeCV (alpha by leave-one-out over a log grid) on standardized features."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    Xtr = he_patch_features(np.concatenate([centre_view(s.patches) for s in train], 0))
    ytr = np.concatenate([s.y for s in train], 0)
    Xte = he_patch_features(centre_view(test_patches))
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
    model.fit(Xtr, ytr)
    return model.predict(Xte).astype(np.float32)


class CNNRegressor:
    """A fitted supervised CNN (GenST's encoder blocks → global pool → linear) on 112 µm
    tiles at 64 px; ``predict`` averages four rotations and returns log1p CP10k."""

    def __init__(self, model, mu: np.ndarray, sd: np.ndarray):
        self.model, self.mu, self.sd = model, mu, sd

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        import torch

        out = []
        self.model.eval()
        with torch.inference_mode():
            for i in range(0, len(tiles), 64):
                x = to_input(torch.from_numpy(np.ascontiguousarray(tiles[i : i + 64])))
                p = torch.stack([self.model(torch.rot90(x, k, dims=(2, 3))) for k in range(4)])
                out.append(p.mean(0).numpy())
        return (np.concatenate(out, 0) * self.sd + self.mu).astype(np.float32)

    def state(self) -> dict:
        import torch

        st = {f"net.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        st["mu"], st["sd"] = torch.from_numpy(self.mu), torch.from_numpy(self.sd)
        return st

    @classmethod
    def from_state(cls, st: dict, channels: tuple[int, ...] = (32, 64, 96, 128)):
        net = _cnn(channels, len(st["mu"]))
        net.load_state_dict({k[4:]: v for k, v in st.items() if k.startswith("net.")})
        return cls(net, st["mu"].numpy(), st["sd"].numpy())


def _cnn(channels: tuple[int, ...], n_out: int):
    from torch import nn

    enc = HistologyEncoder(channels)
    head = nn.Sequential(nn.Dropout(0.2), nn.Linear(enc.out_ch, n_out))
    return nn.Sequential(enc, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def fit_cnn_regressor(
    X: np.ndarray,
    Y: np.ndarray,
    epochs: int = 30,
    seed: int = 0,
    channels: tuple[int, ...] = (32, 64, 96, 128),
    progress: bool = False,
) -> CNNRegressor:
    """Train the CNN regressor on uint8 tiles ``X`` (N, 64, 64, 3) and targets ``Y`` (N, G)
    with flips/rotations/colour jitter (AdamW, cosine schedule, seeded)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    safe_cpu_training()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mu, sd = Y.mean(0), Y.std(0) + 1e-3
    Yt = torch.from_numpy((Y - mu) / sd)
    model = _cnn(channels, Y.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    bs = 32
    spe = max(1, len(X) // bs)
    total, step = spe * epochs, 0
    for _ in tqdm(range(epochs), desc="CNN regressor", disable=not progress):
        model.train()
        perm = rng.permutation(len(X))
        for b in range(spe):
            idx = perm[b * bs : (b + 1) * bs]
            x = augment(X[idx], rng, 0.05)
            loss = F.mse_loss(model(x), Yt[idx])
            for pg in opt.param_groups:
                pg["lr"] = 1e-3 * _cosine(step, total)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return CNNRegressor(model, mu, sd)


def cnn_baseline(
    train: list[SectionData],
    test_patches: np.ndarray,
    epochs: int = 30,
    seed: int = 0,
    channels: tuple[int, ...] = (32, 64, 96, 128),
    progress: bool = False,
) -> np.ndarray:
    """Supervised CNN regressor on the 112 µm centre of the spot patches (see
    ``fit_cnn_regressor``), trained on ``train`` and applied to ``test_patches``."""
    X = np.concatenate([centre_view(s.patches) for s in train], 0)
    Y = np.concatenate([s.y for s in train], 0)
    reg = fit_cnn_regressor(X, Y, epochs, seed, channels, progress)
    return reg.predict(centre_view(test_patches))
