"""GenST spatial context head: training on frozen per-tile tokens of the training sections.

Stage C of GenST training (after the gene VQ-VAE and the alignment, whose weights stay frozen):
every spot of the training sections becomes a token (pooled image features and aligned latent
ẑ under each of the 8 dihedral transforms of its patch). A query spot's window is itself plus
its nearest spots within ``ctx_radius_um``; the window is seen under one random dihedral
transform (features of the transformed patches, offsets transformed alike), with random token
dropout, the query's own image withheld at random and the offsets rescaled at random (so a
tile grid of another pitch than the 200 µm spot array stays in distribution). The head maps
the window to ẑ_ctx, trained with the stage-B losses on ẑ_ctx through the frozen gene decoder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from napari_stgen.inference.context import context_latent, transform_offsets, windows
from napari_stgen.models.genst import ContextAligner, GenST, code_logits, to_input
from napari_stgen.training.data import SectionData

__all__ = [
    "ContextConfig",
    "context_latent",
    "section_tokens",
    "train_context",
    "transform_offsets",
    "windows",
]


@dataclass
class ContextConfig:
    """Hyper-parameters of stage C (stored in the model card)."""

    steps: int = 1500
    batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-3
    token_drop: float = 0.5  # per window, neighbours dropped with p ~ U(0, token_drop)
    query_withheld: float = 0.25  # the query's own image withheld with this probability
    scale_jitter: tuple[float, float] = (0.85, 1.3)  # offsets × U(lo, hi)
    w_latent: float = 0.5
    w_code: float = 0.1
    seed: int = 0


def section_tokens(model: GenST, patches: np.ndarray, tta: int = 8, batch: int = 128):
    """(feat (R, N, F), ẑ (R, N, D)) float32 of uint8 patches under ``tta`` transforms."""
    import torch

    model.eval()
    fs, zs = [], []
    with torch.inference_mode():
        for i in range(0, len(patches), batch):
            x = to_input(torch.from_numpy(np.ascontiguousarray(patches[i : i + batch])))
            f, z, _ = model.tile_tokens(x, tta)
            fs.append(f.float().numpy())
            zs.append(z.float().numpy())
    return np.concatenate(fs, 1), np.concatenate(zs, 1)


def train_context(
    model: GenST,
    sections: list[SectionData],
    targets: list[np.ndarray],
    ccfg: ContextConfig | None = None,
    tokens: list[tuple[np.ndarray, np.ndarray]] | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Train ``model.context`` (created if absent) in place; returns a history dict.

    ``targets``: per section, standardized (model.standardize) log1p CP10k of the spots.
    ``tokens``: per section, ``section_tokens(model, s.patches, 8)`` (computed if None).
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    ccfg = ccfg or ContextConfig()
    cfg = model.cfg
    if cfg.ctx_depth <= 0:
        cfg.ctx_depth = 2
    torch.manual_seed(ccfg.seed)
    rng = np.random.default_rng(ccfg.seed)
    t0 = time.time()
    if tokens is None:
        tokens = [section_tokens(model, s.patches, 8) for s in sections]
    nr = tokens[0][0].shape[0]
    feat_dim = tokens[0][0].shape[2]
    if model.context is None:
        model.context = ContextAligner(feat_dim, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.context.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=ccfg.lr, weight_decay=ccfg.weight_decay)

    # all windows of all sections, as global token indices
    offs = np.cumsum([0] + [len(s.y) for s in sections])
    F_all = np.concatenate([t[0] for t in tokens], 1)  # (R, N, F)
    Z_all = np.concatenate([t[1] for t in tokens], 1)
    XY = np.concatenate([s.xy_px * s.mpp for s in sections], 0)
    W = np.concatenate(
        [
            np.where(w >= 0, w + o, -1)
            for w, o in zip(
                (windows(s.xy_px * s.mpp, cfg.ctx_tokens, cfg.ctx_radius_um) for s in sections),
                offs[:-1],
                strict=True,
            )
        ]
    )
    Y = torch.from_numpy(np.concatenate(targets, 0).astype(np.float32))
    with torch.no_grad():
        Zg = model.gene.encode(Y)
        code_g = model.gene.vq.codes(Zg)
    hist: dict = {"losses": []}
    model.context.train()
    bar = tqdm(range(ccfg.steps), desc="GenST context", disable=not progress, unit="step")
    run = 0.0
    for step in bar:
        q = rng.integers(0, len(W), ccfg.batch)
        w = W[q].copy()
        b, k = w.shape
        drop = rng.random((b, k)) < rng.uniform(0, ccfg.token_drop, (b, 1))
        drop[:, 0] = False
        w[drop] = -1
        valid = w >= 0
        wi = np.maximum(w, 0)
        r = rng.integers(0, nr, b)
        rel = XY[wi] - XY[w[:, :1]]
        rel = rel * rng.uniform(*ccfg.scale_jitter, (b, 1, 1))
        pos = np.empty_like(rel)
        for t in range(nr):
            m = r == t
            if m.any():
                pos[m] = transform_offsets(rel[m], t)
        f = F_all[r[:, None], wi]
        z = Z_all[r[:, None], wi]
        present = np.ones((b, k), bool)
        present[:, 0] = rng.random(b) >= ccfg.query_withheld
        zc = model.context(
            torch.from_numpy(f),
            torch.from_numpy(z),
            torch.from_numpy(pos.astype(np.float32)),
            torch.from_numpy(valid),
            torch.from_numpy(present),
        )
        y, zg = Y[q], Zg[q]
        l_expr = F.mse_loss(model.gene.decoder(zc), y)
        l_lat = F.mse_loss(zc, zg)
        l_code = F.cross_entropy(code_logits(model.gene.vq.distances(zc)), code_g[q])
        loss = l_expr + ccfg.w_latent * l_lat + ccfg.w_code * l_code
        lr = ccfg.lr * 0.5 * (1 + np.cos(np.pi * step / ccfg.steps))
        for pg in opt.param_groups:
            pg["lr"] = lr
        opt.zero_grad()
        loss.backward()
        opt.step()
        le = float(l_expr.detach())
        run = 0.98 * run + 0.02 * le if step else le
        if step % 100 == 0 or step == ccfg.steps - 1:
            hist["losses"].append({"step": step, "expr": round(run, 4)})
            bar.set_postfix(expr=f"{run:.3f}")
    for p in model.parameters():
        p.requires_grad_(True)
    model.context.eval()
    hist["seconds"] = round(time.time() - t0, 1)
    hist["n_windows"] = int(len(W))
    log(f"context head: {hist['losses'][-1]} in {hist['seconds']} s")
    return hist
