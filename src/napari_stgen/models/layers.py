"""Shared building blocks: conv blocks, an EMA vector quantizer with dead-code restarts, and
the position-aware transformer pieces of the spatial models (Fourier µm positions, blocks
with an additive attention bias).

Used by GenST (VQ-VAEs, spatial context head), HistoTx and STMDiT (which reuses GenST's
encoders).
Imports torch at module import: import this module lazily from GUI code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups (works at batch size 1, unlike BatchNorm)."""
    g = 8 if ch % 8 == 0 else 1
    return nn.GroupNorm(g, ch)


class ConvBlock(nn.Module):
    """conv3x3(stride) → GN → SiLU → conv3x3 → GN → SiLU, with a 1×1/strided skip."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = norm(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = norm(cout)
        self.skip = (
            nn.Identity()
            if cin == cout and stride == 1
            else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.n1(self.c1(x)))
        h = self.n2(self.c2(h))
        return F.silu(h + self.skip(x))


class UpBlock(nn.Module):
    """Nearest ×2 upsampling then a ConvBlock."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = ConvBlock(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VectorQuantizerEMA(nn.Module):
    """Vector quantizer with EMA codebook updates and dead-code restarts.

    Input ``z`` (..., D) (channels last). Returns the straight-through quantized tensor, the
    code indices and the commitment loss. Buffers: ``embed`` (K, D), ``cluster_size`` (K),
    ``embed_avg`` (K, D) and ``usage`` (K, running assignment counts for reporting).
    """

    def __init__(
        self,
        n_codes: int,
        dim: int,
        decay: float = 0.99,
        eps: float = 1e-5,
        beta: float = 0.25,
        dead_threshold: float = 0.05,
        max_idle_steps: int = 0,
    ):
        super().__init__()
        self.n_codes, self.dim, self.decay, self.eps, self.beta = n_codes, dim, decay, eps, beta
        self.dead_threshold = dead_threshold
        self.max_idle_steps = max_idle_steps
        embed = torch.randn(n_codes, dim) / math.sqrt(dim)
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.ones(n_codes))
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("usage", torch.zeros(n_codes))
        self.register_buffer("initted", torch.zeros((), dtype=torch.uint8))
        # training steps since each code was last chosen (not saved in checkpoints)
        self.register_buffer("idle", torch.zeros(n_codes), persistent=False)
        self.restarts = 0

    def distances(self, flat: torch.Tensor) -> torch.Tensor:
        """Squared L2 distances (M, K) between flat vectors (M, D) and the codebook."""
        e = self.embed.to(flat.dtype)
        return flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code index for each vector of ``z`` (..., D)."""
        flat = z.reshape(-1, self.dim)
        return self.distances(flat).argmin(1).reshape(z.shape[:-1])

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.embed)

    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor) -> None:
        n = flat.shape[0]
        sel = flat[torch.randint(0, n, (self.n_codes,), device=flat.device)]
        sel = sel + 1e-3 * torch.randn_like(sel)
        self.embed.copy_(sel)
        self.embed_avg.copy_(sel)
        self.cluster_size.fill_(1.0)
        self.initted.fill_(1)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        onehot = F.one_hot(idx, self.n_codes).type(flat.dtype)
        counts = onehot.sum(0)
        self.usage.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(onehot.t() @ flat, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        size = (self.cluster_size + self.eps) / (n + self.n_codes * self.eps) * n
        self.embed.copy_(self.embed_avg / size[:, None])
        # dead-code restarts: codes whose EMA size fell below ``dead_threshold`` (or, when
        # ``max_idle_steps`` > 0, unchosen for that many steps) jump to batch vectors
        self.idle.add_(1).mul_((counts == 0).to(self.idle.dtype))
        dead = self.cluster_size < self.dead_threshold
        if self.max_idle_steps > 0:
            dead |= self.idle > self.max_idle_steps
        nd = int(dead.sum())
        if nd:
            pick = flat[torch.randint(0, flat.shape[0], (nd,), device=flat.device)]
            pick = pick + 1e-3 * torch.randn_like(pick)
            self.embed[dead] = pick
            self.embed_avg[dead] = pick
            self.cluster_size[dead] = 1.0
            self.idle[dead] = 0
            self.restarts += nd

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        flat = z.reshape(-1, self.dim).float()
        if self.training and not bool(self.initted):
            self._init_from(flat.detach())
        idx = self.distances(flat).argmin(1)
        q = self.lookup(idx).reshape(z.shape).to(z.dtype)
        if self.training:
            self._ema_update(flat.detach(), idx)
        commit = self.beta * F.mse_loss(z, q.detach())
        q = z + (q - z).detach()  # straight-through
        return q, idx.reshape(z.shape[:-1]), commit

    @torch.no_grad()
    def health(self, idx: torch.Tensor | None = None) -> dict:
        """Codes used, perplexity and dead codes: from ``idx`` if given, else running usage."""
        if idx is not None:
            counts = torch.bincount(idx.reshape(-1), minlength=self.n_codes).float()
        else:
            counts = self.usage.clone()
        p = counts / counts.sum().clamp_min(1e-12)
        ent = -(p[p > 0] * p[p > 0].log()).sum()
        used = int((counts > (1e-3 * counts.sum() / self.n_codes if idx is None else 0)).sum())
        return {
            "n_codes": self.n_codes,
            "codes_used": used,
            "dead_codes": self.n_codes - used,
            "perplexity": float(ent.exp()),
            "restarts": int(self.restarts),
        }


class FourierPos(nn.Module):
    """(…, 2) µm → (…, dim): sin/cos at ``n_freq`` log-spaced wavelengths, then a linear map."""

    def __init__(self, dim: int, n_freq: int, min_wavelength_um: float, max_wavelength_um: float):
        super().__init__()
        wl = torch.logspace(math.log10(min_wavelength_um), math.log10(max_wavelength_um), n_freq)
        self.register_buffer("freq", 2 * math.pi / wl, persistent=False)
        self.proj = nn.Linear(4 * n_freq, dim)

    def forward(self, pos_um: torch.Tensor) -> torch.Tensor:
        a = pos_um[..., :, None] * self.freq  # (…, 2, F)
        f = torch.cat([a.sin(), a.cos()], -1).flatten(-2)
        return self.proj(f)


class Block(nn.Module):
    """Pre-norm transformer block; attention logits get an additive (B, H, L, L) bias."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        d, h = dim, heads
        self.heads = h
        self.n1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.n2 = nn.LayerNorm(d)
        hid = int(d * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(d, hid), nn.GELU(), nn.Dropout(dropout), nn.Linear(hid, d)
        )
        self.drop = nn.Dropout(dropout)
        self.p_drop = dropout

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.p_drop if self.training else 0.0
        )
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.mlp(self.n2(x)))
