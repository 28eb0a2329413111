"""GenST: two VQ-VAEs (histology, genes) and the alignment from image to gene latent space.

::

    patch (224 µm, 128 px)
      ├─ centre 112 µm @ 64 px ─┐
      └─ whole 224 µm @ 64 px ──┴─ HistologyEncoder (shared conv) → grid (8×8×C)
                                     │  → 1×1 → VQ (image codebook) → HistologyDecoder → patch
                                     └─ pool(both scales) → Aligner MLP → ẑ (gene latent)
    profile (G genes, log1p CP10k) → GeneEncoder MLP → z → VQ (gene codebook) → GeneDecoder → G
    inference: ẑ → gene decoder  (soft)   or   ẑ → nearest gene code → gene decoder (quantized)

    spatial context (optional, ``ctx_depth`` > 0): the tile's pooled features and ẑ together with
    those of up to ``ctx_tokens`` − 1 neighbouring tiles within ``ctx_radius_um`` (µm offsets,
    Fourier-embedded, distance-biased attention) → ContextAligner → ẑ_ctx = ẑ + Δ → same decoders

Imports torch at module import: import lazily from GUI code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from napari_stgen.models.checkpoint import CardConfig
from napari_stgen.models.layers import ConvBlock, FourierPos, UpBlock, VectorQuantizerEMA, norm

# ImageNet-like RGB statistics are irrelevant here: H&E patch statistics of HER2ST.
RGB_MEAN = (0.66, 0.58, 0.72)
RGB_STD = (0.16, 0.18, 0.12)


@dataclass
class GenSTConfig(CardConfig):
    """Architecture hyper-parameters (stored in the model card)."""

    n_genes: int = 250
    patch_px: int = 128  # model input edge (px) at ``mpp``
    patch_um: float = 224.0
    view_px: int = 64  # each scale is encoded at this size
    multiscale: bool = True  # centre 112 µm crop + whole 224 µm context
    channels: tuple[int, ...] = (32, 64, 96, 128)
    img_latent: int = 32
    img_codes: int = 256
    gene_hidden: int = 256
    gene_latent: int = 32
    gene_codes: int = 64
    align_hidden: int = 256
    dropout: float = 0.2
    decode: str = "soft"  # "soft" (aligned latent), "quantized" (nearest code), "expected"
    ctx_depth: int = 0  # transformer blocks of the spatial context head (0: no head)
    ctx_dim: int = 128
    ctx_heads: int = 4
    ctx_tokens: int = 48  # the tile itself + up to 47 neighbours
    ctx_radius_um: float = 1200.0
    ctx_pitch_um: float = 200.0  # site spacing the head was trained at (ST spot array)
    extra: dict = field(default_factory=dict)

    @property
    def mpp(self) -> float:
        return self.patch_um / self.patch_px


def code_logits(dist: torch.Tensor) -> torch.Tensor:
    """Code logits from squared distances (N, K), scaled by each row's mean distance."""
    return -4.0 * dist / dist.detach().mean(1, keepdim=True).clamp_min(1e-6)


def views(x: torch.Tensor, cfg: GenSTConfig) -> list[torch.Tensor]:
    """The scales the encoder sees: [centre crop, downsampled whole] (or just resized whole)."""
    v = cfg.view_px
    if not cfg.multiscale:
        if x.shape[-1] != v:
            x = F.interpolate(x, size=(v, v), mode="area")
        return [x]
    s = x.shape[-1]
    o = (s - s // 2) // 2
    centre = x[..., o : o + s // 2, o : o + s // 2]
    if centre.shape[-1] != v:
        centre = F.interpolate(centre, size=(v, v), mode="area")
    whole = F.interpolate(x, size=(v, v), mode="area") if s != v else x
    return [centre, whole]


def to_input(patches: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) or float [0,1] (N, 3, H, W) → normalized float (N, 3, H, W)."""
    if patches.dtype == torch.uint8:
        patches = patches.permute(0, 3, 1, 2).float() / 255.0
    m = torch.tensor(RGB_MEAN, device=patches.device, dtype=patches.dtype)[None, :, None, None]
    s = torch.tensor(RGB_STD, device=patches.device, dtype=patches.dtype)[None, :, None, None]
    return (patches - m) / s


class HistologyEncoder(nn.Module):
    """Conv encoder: view (3, 64, 64) → feature grid (C, 8, 8)."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        blocks, cin = [], 3
        for i, c in enumerate(channels):
            blocks.append(ConvBlock(cin, c, stride=2 if i < 3 else 1))
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.out_ch = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class HistologyDecoder(nn.Module):
    """Latent grid (D, 8, 8) → RGB view (3, 64, 64), normalized space."""

    def __init__(self, latent: int, channels: tuple[int, ...]):
        super().__init__()
        ch = list(channels)[::-1]
        self.inp = nn.Conv2d(latent, ch[0], 3, 1, 1)
        ups = [UpBlock(ch[i], ch[i + 1]) for i in range(min(3, len(ch) - 1))]
        self.ups = nn.Sequential(*ups)
        last = ch[min(3, len(ch) - 1)]
        self.out = nn.Sequential(norm(last), nn.SiLU(), nn.Conv2d(last, 3, 3, 1, 1))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.out(self.ups(F.silu(self.inp(q))))


class HistologyVQVAE(nn.Module):
    """conv encoder → latent grid → VQ (image codebook) → decoder (reconstructs each view)."""

    def __init__(self, cfg: GenSTConfig):
        super().__init__()
        self.encoder = HistologyEncoder(cfg.channels)
        self.pre_q = nn.Conv2d(self.encoder.out_ch, cfg.img_latent, 1)
        self.vq = VectorQuantizerEMA(cfg.img_codes, cfg.img_latent)
        self.decoder = HistologyDecoder(cfg.img_latent, cfg.channels)

    def quantize(self, h: torch.Tensor):
        z = self.pre_q(h).permute(0, 2, 3, 1)  # (N, h, w, D)
        q, idx, commit = self.vq(z)
        return q.permute(0, 3, 1, 2), idx, commit

    def forward(self, x: torch.Tensor):
        """x: one normalized view (N, 3, 64, 64) → (reconstruction, code map, losses dict)."""
        h = self.encoder(x)
        q, idx, commit = self.quantize(h)
        rec = self.decoder(q)
        return rec, idx, {"rec": F.mse_loss(rec, x), "commit": commit}


class GeneVQVAE(nn.Module):
    """MLP encoder over the panel → latent → VQ (gene codebook) → MLP decoder → profile."""

    def __init__(self, cfg: GenSTConfig):
        super().__init__()
        g, h, d = cfg.n_genes, cfg.gene_hidden, cfg.gene_latent
        self.encoder = nn.Sequential(
            nn.Linear(g, h), nn.LayerNorm(h), nn.SiLU(), nn.Dropout(0.1), nn.Linear(h, d)
        )
        self.vq = VectorQuantizerEMA(cfg.gene_codes, d)
        self.decoder = nn.Sequential(nn.Linear(d, h), nn.LayerNorm(h), nn.SiLU(), nn.Linear(h, g))

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        return self.encoder(y)

    def forward(self, y: torch.Tensor):
        z = self.encode(y)
        q, idx, commit = self.vq(z)
        rec = self.decoder(q)
        rec_soft = self.decoder(z)
        losses = {"rec": F.mse_loss(rec, y), "rec_soft": F.mse_loss(rec_soft, y), "commit": commit}
        return rec, idx, z, losses


class Aligner(nn.Module):
    """Pooled multi-scale image features → gene latent ẑ."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_dim, hidden),
            nn.LayerNorm(hidden),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f)


class CrossBlock(nn.Module):
    """The query token attends to the window's tokens (additive (B, H, 1, N) bias), then an MLP."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.nq, self.nkv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv, self.proj = (
            nn.Linear(dim, dim),
            nn.Linear(dim, 2 * dim),
            nn.Linear(dim, dim),
        )
        self.n2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, e: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, d = e.shape
        dh = d // self.heads
        q = self.q(self.nq(h)).view(b, 1, self.heads, dh).transpose(1, 2)
        k, v = self.kv(self.nkv(e)).view(b, n, 2, self.heads, dh).unbind(2)
        a = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
        h = h + self.drop(self.proj(a.transpose(1, 2).reshape(b, 1, d)))
        return h + self.drop(self.mlp(self.n2(h)))


class ContextAligner(nn.Module):
    """Tile + neighbour tokens (pooled features, ẑ, µm offset) → correction Δ of the tile's ẑ.

    Each token is embedded on its own; the tile's query then attends to the window
    ``ctx_depth`` times, with ``-slope_h · distance / 100 µm`` added to each head's logits (a
    learned locality prior). The output projection starts at zero, so an untrained head leaves
    ẑ unchanged.
    """

    def __init__(self, feat_dim: int, cfg: GenSTConfig):
        super().__init__()
        d = cfg.ctx_dim
        self.feat_in = nn.Sequential(nn.LayerNorm(feat_dim), nn.Linear(feat_dim, d))
        self.z_in = nn.Linear(cfg.gene_latent, d)
        self.pos = FourierPos(d, 8, 100.0, 4000.0)
        self.tok = nn.Sequential(nn.GELU(), nn.Linear(d, d))
        self.query = nn.Parameter(torch.zeros(d))  # marks the tile being predicted
        self.no_image = nn.Parameter(torch.zeros(d))  # a token whose image is withheld
        init = torch.logspace(math.log10(0.05), math.log10(2.0), cfg.ctx_heads)
        self.slope_raw = nn.Parameter(torch.log(torch.expm1(init)))
        self.blocks = nn.ModuleList(
            [CrossBlock(d, cfg.ctx_heads, cfg.dropout / 2) for _ in range(cfg.ctx_depth)]
        )
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, cfg.gene_latent)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(
        self,
        feat: torch.Tensor,
        zhat: torch.Tensor,
        pos: torch.Tensor,
        valid: torch.Tensor,
        present: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """feat (B, N, F), zhat (B, N, D), pos (B, N, 2) µm from the tile (token 0 = the tile),
        valid (B, N) bool, present (B, N) bool (False: image withheld) → ẑ_ctx (B, D)."""
        e = self.feat_in(feat) + self.z_in(zhat)
        if present is not None:
            e = torch.where(present[..., None], e, self.no_image.to(e.dtype))
        e = self.tok(e + self.pos(pos))
        h = e[:, :1] + self.query
        dist = pos.norm(dim=-1) / 100.0  # (B, N) from the tile
        bias = -F.softplus(self.slope_raw)[None, :, None, None] * dist[:, None, None, :]
        bias = bias.masked_fill(~valid[:, None, None, :], float("-inf"))
        for blk in self.blocks:
            h = blk(h, e, bias)
        return zhat[:, 0] + self.out(self.norm(h[:, 0]))


class GenST(nn.Module):
    """Histology VQ-VAE + gene VQ-VAE + aligner; ``predict`` maps patches to profiles."""

    def __init__(self, cfg: GenSTConfig):
        super().__init__()
        self.cfg = cfg
        self.histo = HistologyVQVAE(cfg)
        self.gene = GeneVQVAE(cfg)
        n_views = 2 if cfg.multiscale else 1
        feat = self.histo.encoder.out_ch * 2 * n_views  # avg + max pool per view
        self.align = Aligner(feat, cfg.align_hidden, cfg.gene_latent, cfg.dropout)
        self.context = ContextAligner(feat, cfg) if cfg.ctx_depth > 0 else None
        self.logit_scale = nn.Parameter(torch.tensor(2.3))
        # per-gene standardization of log1p CP10k targets (set from the training spots)
        self.register_buffer("y_mean", torch.zeros(cfg.n_genes))
        self.register_buffer("y_std", torch.ones(cfg.n_genes))

    def image_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalized input (N, 3, P, P) → pooled features (N, F) and per-view grids."""
        grids = [self.histo.encoder(v) for v in views(x, self.cfg)]
        pooled = [torch.cat([g.mean((2, 3)), g.amax((2, 3))], 1) for g in grids]
        return torch.cat(pooled, 1), grids

    def image_to_gene_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f, grids = self.image_features(x)
        return self.align(f), grids

    def decode_latent(self, zhat: torch.Tensor, mode: str | None = None):
        """ẑ → (profile, gene code): soft decodes ẑ, quantized decodes its nearest code."""
        mode = mode or self.cfg.decode
        dist = self.gene.vq.distances(zhat.float())
        code = dist.argmin(1)
        if mode == "quantized":
            return self.gene.decoder(self.gene.vq.lookup(code)), code
        if mode == "expected":
            # expectation of the code profiles under the code posterior (the softmax that the
            # code-agreement loss trains)
            p = torch.softmax(code_logits(dist), dim=1)
            return p @ self.gene.decoder(self.gene.vq.embed), code
        return self.gene.decoder(zhat), code

    def unstandardize(self, y: torch.Tensor) -> torch.Tensor:
        """Standardized decoder output → log1p CP10k."""
        return y * self.y_std + self.y_mean

    def standardize(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.y_mean) / self.y_std

    def predict(
        self, x: torch.Tensor, mode: str | None = None, image_codes: bool = False, tta: int = 1
    ):
        """Normalized input → (expr log1p CP10k (N, G), gene code (N,), image codes | None).

        ``tta`` > 1 averages the aligned latent over that many 90° rotations (1, 2 or 4;
        8 adds the flipped versions).
        """
        _, zs, grids = self.tile_tokens(x, tta)
        expr, code = self.decode_latent(zs.mean(0), mode)
        icodes = self.image_code_map(grids) if image_codes else None
        return self.unstandardize(expr.float()), code, icodes

    def tile_tokens(
        self, x: torch.Tensor, tta: int = 4, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Normalized input (N, 3, P, P) → per-transform pooled features (R, N, F), ẑ (R, N, D)
        for the ``tta`` transforms (k % 4 quarter turns; k ≥ 4 adds a horizontal flip), and the
        per-view feature grids of the untransformed input. ``start`` skips the first
        transforms (computed before by the caller): R = ``tta - start``, no grids."""
        fs, zs, grids0 = [], [], []
        for k in range(start, tta):
            xi = torch.rot90(x, k % 4, dims=(2, 3))
            if k >= 4:
                xi = torch.flip(xi, dims=(3,))
            f, grids = self.image_features(xi)
            fs.append(f)
            zs.append(self.align(f))
            if k == 0:
                grids0 = grids
        return torch.stack(fs), torch.stack(zs), grids0

    def image_code_map(self, grids: list[torch.Tensor]) -> torch.Tensor:
        """Image-codebook indices (N, h, w) of the first view's feature grid."""
        z = self.histo.pre_q(grids[0]).permute(0, 2, 3, 1)
        return self.histo.vq.codes(z.float())

    def code_profiles(self) -> torch.Tensor:
        """Decoded profile (log1p CP10k) of every gene code (K, G)."""
        return self.unstandardize(self.gene.decoder(self.gene.vq.embed))
