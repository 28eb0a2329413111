"""A loaded STMDiT (autoencoder, denoiser, condition encoders, statistics) and its loader.

:class:`STMDiTModel` is what the sampler (``napari_stgen.inference.synthesis``), the region
synthesis and the expression guide take; its sampler defaults come from the card through
:class:`~napari_stgen.inference.sampler_settings.SamplerSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_stgen.errors import CheckpointError, StgenError
from napari_stgen.inference.sampler_settings import SamplerSettings
from napari_stgen.models.checkpoint import load_checkpoint, resolve_checkpoint, sha256_file

KIND = "stmdit"


@dataclass
class STMDiTModel:
    """A loaded STMDiT: autoencoder, denoiser, frozen condition encoders and statistics."""

    ae: Any
    dit: Any
    enc: Any  # condition encoders (see napari_stgen.models.stmdit)
    genes: list[str]
    gene_mean: np.ndarray  # (G,) log1p CP10k, training mean (z-scoring)
    gene_std: np.ndarray
    gene_median: np.ndarray  # (G,) training median: default for genes not given
    gene_range: np.ndarray  # (G, 2) training 1st / 99th percentile (slider ranges)
    pool_mean: np.ndarray
    pool_std: np.ndarray
    morph_mean: np.ndarray
    morph_std: np.ndarray
    latent_scale: float
    mpp: float
    tile_px: int
    card: dict = field(default_factory=dict)
    checksum: str = ""
    name: str = ""
    device: str = "cpu"
    guide: Any = None  # ExpressionGuide, loaded on first use

    @property
    def tile_um(self) -> float:
        return self.tile_px * self.mpp

    @property
    def latent_factor(self) -> int:
        """Tile pixels per latent pixel of the autoencoder (4 for v1, 8 for v2)."""
        return self.tile_px // int(self.dit.cfg.latent_px)

    @property
    def context_px(self) -> int:
        """Edge of the context patch (3 × 3 tiles) at ``mpp`` that ``synthesize`` accepts."""
        return 3 * self.tile_px

    @property
    def sampler(self) -> SamplerSettings:
        """The card's sampler settings (read on each access: callers may edit the card)."""
        return SamplerSettings.from_card(self.card)

    @property
    def default_steps(self) -> int:
        """The card's sampler steps (``sampler.steps``)."""
        return self.sampler.steps

    @property
    def default_guidance(self) -> tuple[float, float]:
        """The card's (gene, morphology) guidance scales."""
        return self.sampler.guidance

    @property
    def default_guidance_expr(self) -> float:
        """Scale of the GenST expression guidance (0: off, as in cards that do not set it)."""
        return self.sampler.guidance_expr


def median_profile(model: STMDiTModel) -> np.ndarray:
    """The training median profile (G,) float32 (log1p CP10k)."""
    return np.asarray(model.gene_median, dtype=np.float32).copy()


def _check_context(model: STMDiTModel, context_patches: np.ndarray) -> np.ndarray:
    ctx = np.asarray(context_patches)
    if ctx.ndim == 3:
        ctx = ctx[None]
    want = model.context_px
    if ctx.ndim != 4 or ctx.shape[1:] != (want, want, 3) or ctx.dtype != np.uint8:
        raise StgenError(
            f"context patches must be uint8 (N, {want}, {want}, 3) at {model.mpp} µm/px "
            f"({want * model.mpp:.0f} µm), got {ctx.dtype} {ctx.shape}"
        )
    return ctx


def ring_tiles(context_patches: np.ndarray, tile_px: int) -> np.ndarray:
    """The eight neighbouring tiles of each 3×3 context patch: (N, 8, t, t, 3)."""
    t = tile_px
    ks = [(r, c) for r in range(3) for c in range(3) if (r, c) != (1, 1)]
    return np.stack(
        [context_patches[:, r * t : (r + 1) * t, c * t : (c + 1) * t] for r, c in ks], 1
    )


# ----------------------------------------------------------------------------- loading


def load_stmdit(name_or_path: str | Path = "default", device: str = "cpu") -> STMDiTModel:
    """Load an STMDiT checkpoint ("default" or a path); CheckpointError on a bad file."""
    from napari_stgen.models.stmdit import (  # torch
        DiTConfig,
        STMDiT,
        autoencoder_from_config,
        encoders_from_tensors,
    )

    path, tensors, card = _load_ckpt(name_or_path)
    try:
        ae = autoencoder_from_config(card["ae"])
        ae.load_state_dict(_sub(tensors, "ae."))
        dit = STMDiT(DiTConfig.from_dict(card["dit"]))
        dit.load_state_dict(_sub(tensors, "ema."))
        enc = encoders_from_tensors(card["cond"], _sub(tensors, "cond."))
        st = {k: tensors[f"stats.{k}"].numpy() for k in _STATS}
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid STMDiT checkpoint: {e}") from e
    dev = "cpu" if device in ("auto", None) else device
    ae.eval().to(dev)
    dit.eval().to(dev)
    return STMDiTModel(
        ae=ae,
        dit=dit,
        enc=enc,
        genes=list(card["genes"]),
        latent_scale=float(card["latent_scale"]),
        mpp=float(card["mpp"]),
        tile_px=int(card["tile_px"]),
        card=card,
        checksum=sha256_file(path),
        name=str(card.get("name", Path(path).stem)),
        device=dev,
        **st,
    )


_STATS = (
    "gene_mean",
    "gene_std",
    "gene_median",
    "gene_range",
    "pool_mean",
    "pool_std",
    "morph_mean",
    "morph_std",
)


def _sub(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _load_ckpt(name_or_path: str | Path) -> tuple[Path, dict, dict]:
    path = resolve_checkpoint(name_or_path, KIND)
    tensors, card = load_checkpoint(path, KIND)
    return Path(path), tensors, card
