"""STMDiT: a gene- and morphology-conditioned diffusion transformer for H&E tiles.

Two networks, both small enough to train and sample on a CPU:

- ``TileAutoencoder``: a KL-regularised convolutional autoencoder (downsampling ×4) that maps an
  RGB tile in [-1, 1] to a latent grid (``z_ch`` channels) and back. The DiT works in its
  latent space (as PixCell uses a VAE latent).
- ``STMDiT``: a DiT over patchified latent tokens. The timestep, the pooled gene embedding (a
  frozen GenST gene-encoder latent, projected) and the morphology embedding (frozen GenST image
  encoder on the eight neighbouring tiles, averaged and projected) are summed into the adaLN-Zero
  condition of every block; each block also cross-attends to *gene tokens* (a learned
  tokenisation of the z-scored expression profile into ``n_gene_tokens`` tokens) plus one
  morphology token. A dropped condition is replaced by a learned null embedding, so one network
  gives ε(∅,∅), ε(m,∅) and ε(m,g) for dual classifier-free guidance.

The network predicts the rectified-flow velocity v = noise − x0 for x_t = (1−t)·x0 + t·noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_stgen.models.genst import GeneVQVAE, GenSTConfig, HistologyEncoder, to_input

# ----------------------------------------------------------------------------- autoencoder


@dataclass
class AEConfig:
    """Hyper-parameters of the tile autoencoder (downsampling ×4)."""

    ch: tuple[int, int] = (32, 64)
    z_ch: int = 4

    def to_dict(self) -> dict:
        return {"ch": list(self.ch), "z_ch": self.z_ch}

    @classmethod
    def from_dict(cls, d: dict) -> AEConfig:
        return cls(ch=tuple(d["ch"]), z_ch=int(d["z_ch"]))


class _Res(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(8, c), nn.Conv2d(c, c, 3, padding=1)
        self.n2, self.c2 = nn.GroupNorm(8, c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.silu(self.n1(x)))
        return x + self.c2(F.silu(self.n2(h)))


class TileAutoencoder(nn.Module):
    """RGB tile (B, 3, H, W) in [-1, 1] ↔ latent (B, z_ch, H/4, W/4)."""

    def __init__(self, cfg: AEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or AEConfig()
        c1, c2 = cfg.ch
        self.enc = nn.Sequential(
            nn.Conv2d(3, c1, 4, stride=2, padding=1),
            _Res(c1),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1),
            _Res(c2),
            _Res(c2),
            nn.GroupNorm(8, c2),
            nn.SiLU(),
            nn.Conv2d(c2, 2 * cfg.z_ch, 3, padding=1),
        )
        self.dec = nn.Sequential(
            nn.Conv2d(cfg.z_ch, c2, 3, padding=1),
            _Res(c2),
            _Res(c2),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(c2, c1, 3, padding=1),
            _Res(c1),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(c1, c1 // 2, 3, padding=1),
            nn.GroupNorm(8, c1 // 2),
            nn.SiLU(),
            nn.Conv2d(c1 // 2, 3, 3, padding=1),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance."""
        m, lv = self.enc(x).chunk(2, dim=1)
        return m, lv.clamp(-20.0, 10.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m, lv = self.encode(x)
        z = m + torch.randn_like(m) * torch.exp(0.5 * lv)
        return self.decode(z), m, lv


@dataclass
class AE2Config:
    """Tile autoencoder v2: ``len(ch)`` stages, downsampling ×2^(len(ch)-1) (×8 for 4 stages)."""

    ch: tuple[int, ...] = (32, 64, 128, 192)
    z_ch: int = 8
    kind: str = "v2"

    @property
    def down(self) -> int:
        return 2 ** (len(self.ch) - 1)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "ch": list(self.ch), "z_ch": self.z_ch}

    @classmethod
    def from_dict(cls, d: dict) -> AE2Config:
        return cls(ch=tuple(int(c) for c in d["ch"]), z_ch=int(d["z_ch"]))


class TileAutoencoderV2(nn.Module):
    """RGB tile (B, 3, H, W) in [-1, 1] ↔ latent (B, z_ch, H/8, W/8), KL-regularised.

    Encoder: conv, then per stage a residual block and a stride-2 conv; two residual blocks at
    the latent resolution. Decoder mirrors it with nearest up-sampling + conv. Fully
    convolutional, so it trains on small crops and encodes tiles of any multiple of 8 px.
    """

    def __init__(self, cfg: AE2Config | None = None):
        super().__init__()
        self.cfg = cfg = cfg or AE2Config()
        ch = list(cfg.ch)
        enc: list[nn.Module] = [nn.Conv2d(3, ch[0], 3, padding=1)]
        for a, b in zip(ch[:-1], ch[1:], strict=True):
            enc += [_Res(a), nn.Conv2d(a, b, 4, stride=2, padding=1)]
        enc += [_Res(ch[-1]), _Res(ch[-1]), nn.GroupNorm(8, ch[-1]), nn.SiLU()]
        enc += [nn.Conv2d(ch[-1], 2 * cfg.z_ch, 3, padding=1)]
        self.enc = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(cfg.z_ch, ch[-1], 3, padding=1)]
        dec += [_Res(ch[-1]), _Res(ch[-1])]
        for a, b in zip(ch[::-1][:-1], ch[::-1][1:], strict=True):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(a, b, 3, padding=1)]
            dec += [_Res(b)]
        dec += [nn.GroupNorm(8, ch[0]), nn.SiLU(), nn.Conv2d(ch[0], 3, 3, padding=1)]
        self.dec = nn.Sequential(*dec)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the output convolution (for the adaptive adversarial weight)."""
        return self.dec[-1].weight

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance."""
        m, lv = self.enc(x).chunk(2, dim=1)
        return m, lv.clamp(-20.0, 10.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec(z)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m, lv = self.encode(x)
        eps = torch.randn(m.shape, generator=generator, device=m.device, dtype=m.dtype)
        return self.decode(m + eps * torch.exp(0.5 * lv)), m, lv


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / latent-diffusion autoencoders): one logit per patch.

    ``norm="spectral"`` (default): spectrally normalised convolutions, no feature
    normalisation, so the logits keep the scale of the input differences (Miyato et al.).
    ``norm="group"``: GroupNorm after every inner convolution (the first version; its logits
    collapsed to a constant in long runs, see training_state/README.md)."""

    def __init__(self, ch: int = 32, layers: int = 3, norm: str = "spectral"):
        super().__init__()
        if norm not in ("spectral", "group"):
            raise ValueError(f"PatchDiscriminator: norm is 'spectral' or 'group', not {norm!r}")
        self.norm = norm
        sn = nn.utils.parametrizations.spectral_norm if norm == "spectral" else (lambda m: m)

        def block(a: int, b: int, stride: int) -> list[nn.Module]:
            conv = sn(nn.Conv2d(a, b, 4, stride=stride, padding=1))
            return [conv, nn.GroupNorm(8, b)] if norm == "group" else [conv]

        mods: list[nn.Module] = [sn(nn.Conv2d(3, ch, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        c = ch
        for i in range(1, layers):
            n = ch * min(2**i, 8)
            mods += [*block(c, n, 2), nn.LeakyReLU(0.2)]
            c = n
        mods += [*block(c, c, 1), nn.LeakyReLU(0.2)]
        mods += [sn(nn.Conv2d(c, 1, 4, padding=1))]
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def autoencoder_from_config(d: dict) -> nn.Module:
    """A tile autoencoder (v1 or v2) from its stored config."""
    if d.get("kind") == "v2":
        return TileAutoencoderV2(AE2Config.from_dict(d))
    return TileAutoencoder(AEConfig.from_dict(d))


def images_to_tensor(tiles_u8) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [-1, 1]."""
    t = torch.as_tensor(tiles_u8)
    return t.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_images(x: torch.Tensor):
    """float (N, 3, H, W) in [-1, 1] → uint8 numpy (N, H, W, 3)."""
    y = ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous().cpu().numpy()


# ----------------------------------------------------------------------------- DiT


@dataclass
class DiTConfig:
    """Hyper-parameters of the denoiser."""

    latent_ch: int = 4
    latent_px: int = 16
    patch: int = 2
    dim: int = 160
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    n_genes: int = 250  # panel size (z-scored profile for the gene tokens)
    gene_dim: int = 64  # pooled gene-encoder feature size (frozen encoder output)
    morph_dim: int = 64  # morphology feature size (frozen image encoder output)
    n_gene_tokens: int = 16
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DiTConfig:
        keys = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in d.items() if k in keys})

    @property
    def n_tokens(self) -> int:
        return (self.latent_px // self.patch) ** 2


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t ∈ [0, 1] (scaled ×1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = (t.float()[:, None] * 1000.0) * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class _Attn(nn.Module):
    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        self.h = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        ctx = x if ctx is None else ctx
        q = self.q(x).view(b, n, self.h, d // self.h).transpose(1, 2)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """Self-attention + cross-attention to condition tokens + MLP; adaLN-Zero modulation."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.n1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = _Attn(dim, heads)
        self.nx = nn.LayerNorm(dim, eps=1e-6)
        self.xattn = _Attn(dim, heads)
        self.n2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hid = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hid), nn.GELU(approximate="tanh"), nn.Linear(hid, dim)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 7 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, gx, sh2, sc2, g2 = self.ada(c).chunk(7, dim=-1)
        x = x + g1[:, None] * self.attn(_modulate(self.n1(x), sh1, sc1))
        x = x + gx[:, None] * self.xattn(self.nx(x), tokens)
        x = x + g2[:, None] * self.mlp(_modulate(self.n2(x), sh2, sc2))
        return x


class STMDiT(nn.Module):
    """Denoiser v(x_t, t | genes, morphology) with learned null conditions."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.dim, cfg.patch
        self.x_in = nn.Linear(cfg.latent_ch * p * p, d)
        self.pos = nn.Parameter(torch.zeros(1, cfg.n_tokens, d))
        nn.init.normal_(self.pos, std=0.02)
        self.t_mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        # gene condition: pooled (frozen-encoder latent) + tokens (learned tokenisation)
        self.g_pool = nn.Sequential(nn.Linear(cfg.gene_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.g_tok = nn.Linear(cfg.n_genes, cfg.n_gene_tokens * d)
        self.g_tok_pos = nn.Parameter(torch.randn(1, cfg.n_gene_tokens, d) * 0.02)
        self.g_norm = nn.LayerNorm(d)
        self.null_g_pool = nn.Parameter(torch.zeros(d))
        self.null_g_tok = nn.Parameter(torch.randn(1, cfg.n_gene_tokens, d) * 0.02)
        # morphology condition
        self.m_mlp = nn.Sequential(nn.Linear(cfg.morph_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.null_m = nn.Parameter(torch.zeros(d))
        self.null_m_tok = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.blocks = nn.ModuleList(
            [DiTBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)]
        )
        self.n_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.out = nn.Linear(d, cfg.latent_ch * p * p)
        for m in (self.ada_out[1], self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    # -- tokens
    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.cfg.patch
        x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        p, c = self.cfg.patch, self.cfg.latent_ch
        s = int(math.isqrt(n))
        x = x.view(b, s, s, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, s * p, s * p)

    def conditions(
        self,
        gene_pool: torch.Tensor,
        gene_z: torch.Tensor,
        morph: torch.Tensor,
        use_gene: torch.Tensor,
        use_morph: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled condition vector (B, d) and cross-attention tokens (B, K+1, d).

        ``use_gene`` / ``use_morph``: bool (B,) — False replaces that condition by its null.
        """
        b = gene_z.shape[0]
        ug = use_gene.view(b, 1).to(gene_z.dtype)
        um = use_morph.view(b, 1).to(gene_z.dtype)
        gp = self.g_pool(gene_pool) * ug + self.null_g_pool[None] * (1 - ug)
        gt = self.g_norm(self.g_tok(gene_z).view(b, self.cfg.n_gene_tokens, -1) + self.g_tok_pos)
        gt = gt * ug[:, :, None] + self.null_g_tok * (1 - ug[:, :, None])
        me = self.m_mlp(morph)
        mp = me * um + self.null_m[None] * (1 - um)
        mt = me[:, None] * um[:, :, None] + self.null_m_tok * (1 - um[:, :, None])
        return gp + mp, torch.cat([gt, mt], dim=1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        gene_pool: torch.Tensor,
        gene_z: torch.Tensor,
        morph: torch.Tensor,
        use_gene: torch.Tensor,
        use_morph: torch.Tensor,
    ) -> torch.Tensor:
        """Velocity for latents ``x`` (B, C, S, S) at times ``t`` (B,) in [0, 1]."""
        cvec, tokens = self.conditions(gene_pool, gene_z, morph, use_gene, use_morph)
        c = self.t_mlp(timestep_embedding(t, 256)) + cvec
        h = self.x_in(self._patchify(x)) + self.pos
        for blk in self.blocks:
            h = blk(h, c, tokens)
        sh, sc = self.ada_out(c).chunk(2, dim=-1)
        return self._unpatchify(self.out(_modulate(self.n_out(h), sh, sc)))


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------- conditions


def ring_mean_features(tile_features, ring) -> np.ndarray:
    """Mean of ``tile_features`` over each row's neighbour tiles: (N, K, t, t, 3) → (N, F)."""
    ring = np.asarray(ring)
    n, k = ring.shape[:2]
    f = tile_features(ring.reshape(n * k, *ring.shape[2:]))
    return f.reshape(n, k, -1).mean(1)


class GenSTCondition(nn.Module):
    """Frozen condition encoders copied from a GenST model.

    - genes: GenST's gene-VQ-VAE encoder on the standardised profile → continuous latent
      (before quantisation), ``gene_dim`` = GenST ``gene_latent``;
    - morphology: GenST's histology encoder on each 112 µm neighbour tile at its view size,
      [mean, max]-pooled and averaged over the neighbours, ``morph_dim`` = 2 × channels[-1].

    The STMDiT panel must equal GenST's panel (same genes, same order).
    """

    kind = "genst"

    def __init__(self, genst_cfg: dict):
        super().__init__()

        self.gcfg = GenSTConfig.from_dict(genst_cfg)
        self.histo_encoder = HistologyEncoder(self.gcfg.channels)
        self.gene_encoder = GeneVQVAE(self.gcfg).encoder
        self.register_buffer("y_mean", torch.zeros(self.gcfg.n_genes))
        self.register_buffer("y_std", torch.ones(self.gcfg.n_genes))
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def gene_dim(self) -> int:
        return int(self.gcfg.gene_latent)

    @property
    def morph_dim(self) -> int:
        return 2 * int(self.histo_encoder.out_ch)

    @classmethod
    def from_genst(cls, model) -> GenSTCondition:
        """Copy the encoders of a loaded ``napari_stgen.models.genst.GenST``."""
        enc = cls(model.cfg.to_dict())
        enc.histo_encoder.load_state_dict(model.histo.encoder.state_dict())
        enc.gene_encoder.load_state_dict(model.gene.encoder.state_dict())
        enc.y_mean.copy_(model.y_mean)
        enc.y_std.copy_(model.y_std)
        return enc

    def config(self) -> dict:
        return {"kind": self.kind, "genst": self.gcfg.to_dict()}

    @torch.inference_mode()
    def encode_genes(self, expr) -> np.ndarray:
        """(N, G) log1p CP10k → (N, gene_dim) float32."""
        y = torch.as_tensor(np.asarray(expr, np.float32))
        return self.gene_encoder((y - self.y_mean) / self.y_std).numpy().astype(np.float32)

    @torch.inference_mode()
    def tile_features(self, tiles, batch: int = 256) -> np.ndarray:
        """uint8 (N, t, t, 3) 112 µm tiles → (N, morph_dim) pooled encoder features."""

        out = []
        v = self.gcfg.view_px
        for i in range(0, len(tiles), batch):
            x = to_input(torch.as_tensor(np.ascontiguousarray(tiles[i : i + batch])))
            if x.shape[-1] != v:
                x = F.interpolate(x, size=(v, v), mode="area")
            g = self.histo_encoder(x)
            out.append(torch.cat([g.mean((2, 3)), g.amax((2, 3))], 1).numpy())
        return np.concatenate(out, 0).astype(np.float32) if out else np.zeros((0, self.morph_dim))

    def encode_context(self, ring) -> np.ndarray:
        """(N, 8, t, t, 3) neighbour tiles → (N, morph_dim): mean of their features."""
        return ring_mean_features(self.tile_features, ring)


class OwnCondition(nn.Module):
    """Frozen condition encoders without GenST (used by tests and as a fallback).

    genes: a fixed linear projection (PCA of the training profiles, z-scored);
    morphology: the tile autoencoder's encoder features, [mean, max]-pooled.
    """

    kind = "own"

    def __init__(self, n_genes: int, gene_dim: int, ae_cfg: dict):
        super().__init__()
        self.register_buffer("pca", torch.zeros(n_genes, gene_dim))
        self.register_buffer("g_mean", torch.zeros(n_genes))
        self.register_buffer("g_std", torch.ones(n_genes))
        self.ae_cfg = dict(ae_cfg)
        self.ae = autoencoder_from_config(ae_cfg)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def gene_dim(self) -> int:
        return int(self.pca.shape[1])

    @property
    def morph_dim(self) -> int:
        return 2 * int(self.ae.cfg.ch[-1])

    @classmethod
    def fit(cls, profiles, ae: TileAutoencoder, gene_dim: int = 16) -> OwnCondition:
        y = np.asarray(profiles, np.float64)
        m, s = y.mean(0), y.std(0) + 1e-3
        _, _, vt = np.linalg.svd((y - m) / s, full_matrices=False)
        k = min(gene_dim, vt.shape[0])
        enc = cls(y.shape[1], k, ae.cfg.to_dict())
        enc.pca.copy_(torch.as_tensor(vt[:k].T.copy(), dtype=torch.float32))
        enc.g_mean.copy_(torch.as_tensor(m, dtype=torch.float32))
        enc.g_std.copy_(torch.as_tensor(s, dtype=torch.float32))
        enc.ae.load_state_dict(ae.state_dict())
        return enc

    def config(self) -> dict:
        return {
            "kind": self.kind,
            "n_genes": int(self.pca.shape[0]),
            "gene_dim": self.gene_dim,
            "ae": self.ae_cfg,
        }

    @torch.inference_mode()
    def encode_genes(self, expr) -> np.ndarray:
        y = torch.as_tensor(np.asarray(expr, np.float32))
        return (((y - self.g_mean) / self.g_std) @ self.pca).numpy().astype(np.float32)

    @torch.inference_mode()
    def tile_features(self, tiles, batch: int = 256) -> np.ndarray:
        out = []
        for i in range(0, len(tiles), batch):
            g = self.ae.enc[:-1](images_to_tensor(np.ascontiguousarray(tiles[i : i + batch])))
            out.append(torch.cat([g.mean((2, 3)), g.amax((2, 3))], 1).numpy())
        return np.concatenate(out, 0).astype(np.float32) if out else np.zeros((0, self.morph_dim))

    def encode_context(self, ring) -> np.ndarray:
        """(N, 8, t, t, 3) neighbour tiles → (N, morph_dim): mean of their features."""
        return ring_mean_features(self.tile_features, ring)


def encoders_from_tensors(cfg: dict, tensors: dict) -> nn.Module:
    """Rebuild frozen condition encoders from a checkpoint's ``cond.*`` tensors."""
    if cfg.get("kind") == "genst":
        enc = GenSTCondition(cfg["genst"])
    elif cfg.get("kind") == "own":
        enc = OwnCondition(int(cfg["n_genes"]), int(cfg["gene_dim"]), cfg["ae"])
    else:
        raise ValueError(f"unknown condition-encoder kind {cfg.get('kind')!r}")
    enc.load_state_dict(tensors)
    return enc
