"""HistoTx: early fusion of H&E image tokens and measured-transcript tokens in one transformer.

::

    image token  (every spot / query tile):  Linear(image features) + pos(x, y µm) + m_img
    transcript token (every measured spot):  MLP([profile, gene-present mask]) + pos + m_tx
    one sequence → L × [pre-norm attention with a learned per-head distance bias → MLP]
    head on the image tokens → profile (standardized log1p CP10k over the gene panel)

Positions are µm relative to the window centre, embedded with Fourier features; every
attention head also adds ``-slope_h · distance / 100 µm`` to its logits (a learned, 2-D
ALiBi-like locality prior), so nearby measurements weigh more. With no transcript tokens the
model is an image model over the window's tiles. Imports torch at import: import lazily.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from napari_stgen.models.checkpoint import CardConfig
from napari_stgen.models.layers import Block, FourierPos


@dataclass
class HistoTxConfig(CardConfig):
    """Architecture hyper-parameters (stored in the model card)."""

    n_genes: int = 250
    img_dim: int = 120  # image feature size per token
    dim: int = 96
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    n_freq: int = 8  # Fourier frequencies per axis
    min_wavelength_um: float = 100.0
    max_wavelength_um: float = 4000.0
    dropout: float = 0.1
    # optional: transcript tokens resampled to every image token by Gaussian pooling of the
    # measured profiles at these bandwidths (µm), embedded into the image token and mixed per
    # gene into the output. Off by default: on the B4 fold it helped after test-time
    # adaptation (0.398 vs 0.385) but hurt without it (0.104 vs 0.232).
    pool_um: tuple = ()
    # > 0: residual on k-nearest-neighbour interpolation. Every image token gets the plain mean
    # of the k nearest transcript tokens (per gene, measured genes only; standardized) as an
    # input, and the output is ``knn_gate · kNN + head`` (per-gene gate, starts at 1), so the
    # transformer predicts the correction to kNN. 0 (older checkpoints): off.
    knn_k: int = 0
    # > 0: the k nearest are weighted exp(-d² / 2 bw²) (d, bw in µm) instead of equally; 0
    # (older checkpoints): plain mean.
    knn_bw_um: float = 0.0


class HistoTx(nn.Module):
    """Early-fusion transformer; ``forward`` returns standardized profiles at image tokens."""

    def __init__(self, cfg: HistoTxConfig):
        super().__init__()
        self.cfg = cfg
        d, g = cfg.dim, cfg.n_genes
        self.img_in = nn.Sequential(nn.LayerNorm(cfg.img_dim), nn.Linear(cfg.img_dim, d))
        self.tx_in = nn.Sequential(nn.Linear(2 * g, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.pos = FourierPos(cfg.dim, cfg.n_freq, cfg.min_wavelength_um, cfg.max_wavelength_um)
        self.no_image = nn.Parameter(torch.zeros(d))  # image token whose pixels are withheld
        self.modality = nn.Parameter(torch.zeros(2, d))
        nn.init.normal_(self.modality, std=0.02)
        # per-head locality slopes (softplus), initialised log-spaced: 0.05 … 2 per 100 µm
        init = torch.logspace(math.log10(0.05), math.log10(2.0), cfg.heads)
        self.slope_raw = nn.Parameter(torch.log(torch.expm1(init)))
        self.blocks = nn.ModuleList(
            [Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth)]
        )
        k = len(cfg.pool_um)
        if k:
            self.register_buffer(
                "pool_sigma", torch.tensor(cfg.pool_um, dtype=torch.float32), persistent=False
            )
            self.pool_in = nn.Linear(k * (g + 1), d)
            self.pool_mix = nn.Parameter(torch.zeros(k, g))  # per-gene skip of pooled profiles
        if cfg.knn_k > 0:
            self.knn_in = nn.Linear(g + 2, d)  # kNN profile, log #neighbours, mean dist
            self.knn_gate = nn.Parameter(torch.ones(g))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, g)
        # normalization statistics (set from the training spots)
        self.register_buffer("feat_mean", torch.zeros(cfg.img_dim))
        self.register_buffer("feat_std", torch.ones(cfg.img_dim))
        self.register_buffer("y_mean", torch.zeros(g))
        self.register_buffer("y_std", torch.ones(g))

    def standardize(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.y_mean) / self.y_std

    def unstandardize(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.y_std + self.y_mean

    def forward(
        self,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_valid: torch.Tensor,
        tx: torch.Tensor | None = None,
        tx_mask: torch.Tensor | None = None,
        tx_pos: torch.Tensor | None = None,
        tx_valid: torch.Tensor | None = None,
        img_present: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Standardized profiles (B, N, G) at the image tokens.

        img_feat (B, N, F) raw image features; img_pos (B, N, 2) µm; img_valid (B, N) bool.
        tx (B, M, G) standardized profiles (0 where a gene is absent); tx_mask (B, M, G) 1 where
        measured; tx_pos (B, M, 2) µm; tx_valid (B, M) bool. Omit tx for image-only.
        img_present (B, N) bool: False replaces a token's image by a learned "no image"
        embedding (modality dropout in training; default all present).
        """
        f = (img_feat - self.feat_mean) / self.feat_std
        e = self.img_in(f)
        if img_present is not None:
            e = torch.where(img_present[..., None], e, self.no_image.to(e.dtype))
        h = e + self.pos(img_pos) + self.modality[0]
        pos, valid = img_pos, img_valid
        n = h.shape[1]
        has_tx = tx is not None and tx.shape[1] > 0
        skip = None
        if len(self.cfg.pool_um):
            pooled, wsum = self.pool(img_pos, tx, tx_mask, tx_pos, tx_valid, has_tx)
            b, _, k, g = pooled.shape
            h = h + self.pool_in(torch.cat([pooled, wsum], -1).reshape(b, n, -1))
            skip = (pooled * self.pool_mix).sum(2)
        if self.cfg.knn_k > 0:
            knn, extra = self.knn(img_pos, tx, tx_mask, tx_pos, tx_valid, has_tx)
            h = h + self.knn_in(torch.cat([knn, extra], -1))
            sk = knn * self.knn_gate
            skip = sk if skip is None else skip + sk
        if has_tx:
            t = self.tx_in(torch.cat([tx * tx_mask, tx_mask], -1))
            t = t + self.pos(tx_pos) + self.modality[1]
            h = torch.cat([h, t], 1)
            pos = torch.cat([img_pos, tx_pos], 1)
            valid = torch.cat([img_valid, tx_valid], 1)
        dist = torch.cdist(pos, pos) / 100.0  # (B, L, L) in units of 100 µm
        slope = F.softplus(self.slope_raw)[None, :, None, None]
        bias = -slope * dist[:, None]
        bias = bias.masked_fill(~valid[:, None, None, :], float("-inf"))
        for blk in self.blocks:
            h = blk(h, bias)
        out = self.head(self.norm(h[:, :n]))
        return out if skip is None else out + skip

    def knn(self, img_pos, tx, tx_mask, tx_pos, tx_valid, has_tx: bool):
        """Mean of the ``knn_k`` nearest transcript tokens at every image token (plain, or
        Gaussian-weighted when ``knn_bw_um`` > 0): (B, N, G) standardized profiles (0 = mean
        where nothing is measured) and (B, N, 2) [log1p #neighbours used, mean neighbour
        distance / 1 mm]."""
        b, n = img_pos.shape[:2]
        g = self.cfg.n_genes
        if not has_tx:
            return img_pos.new_zeros(b, n, g), img_pos.new_zeros(b, n, 2)
        d = torch.cdist(img_pos, tx_pos)  # (B, N, M)
        d = d.masked_fill(~tx_valid[:, None, :], float("inf"))
        k = min(self.cfg.knn_k, d.shape[-1])
        dk, ik = d.topk(k, dim=-1, largest=False)
        ok = torch.isfinite(dk)
        wk = ok.to(d.dtype)
        bw = float(self.cfg.knn_bw_um)
        if bw > 0:
            wk = wk * torch.exp(-0.5 * (torch.where(ok, dk, torch.zeros_like(dk)) / bw) ** 2)
        w = torch.zeros_like(d).scatter(-1, ik, wk)  # (B, N, M) weights on the k nearest
        num = torch.bmm(w, tx * tx_mask)
        den = torch.bmm(w, tx_mask)
        knn = num / (den + 1e-6) if bw > 0 else num / den.clamp_min(1.0)
        cnt = ok.sum(-1, keepdim=True).to(d.dtype)
        md = torch.where(ok, dk, torch.zeros_like(dk)).sum(-1, keepdim=True) / cnt.clamp_min(1)
        return knn, torch.cat([torch.log1p(cnt), md / 1000.0], -1)

    def pool(self, img_pos, tx, tx_mask, tx_pos, tx_valid, has_tx: bool):
        """Gaussian pooling of the transcript tokens at every image token, per bandwidth:
        (B, N, K, G) profiles (standardized; shrunk to 0 = mean where little is measured)
        and (B, N, K, 1) log total weights."""
        b, n = img_pos.shape[:2]
        k, g = len(self.cfg.pool_um), self.cfg.n_genes
        if not has_tx:
            z = img_pos.new_zeros(b, n, k, g)
            return z, img_pos.new_zeros(b, n, k, 1)
        d2 = torch.cdist(img_pos, tx_pos).pow(2)  # (B, N, M)
        w = torch.exp(-d2[:, :, None, :] / (2 * self.pool_sigma**2).view(1, 1, k, 1))
        w = w * tx_valid[:, None, None, :].to(w.dtype)  # (B, N, K, M)
        wm = w.flatten(1, 2)  # (B, N*K, M)
        num = torch.bmm(wm, tx * tx_mask).view(b, n, k, g)
        den = torch.bmm(wm, tx_mask).view(b, n, k, g)
        pooled = num / (den + 0.5)
        wsum = torch.log1p(w.sum(-1, keepdim=True))
        return pooled, wsum
