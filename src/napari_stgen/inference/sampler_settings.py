"""STMDiT sampler settings: one object, resolved once from the model card plus overrides.

``SamplerSettings.from_card(card)`` reads the card's ``sampler`` block (missing keys take the
defaults below); :meth:`SamplerSettings.resolve` applies a caller's overrides (``None`` keeps
the card's value). The library, the CLI and the Synthesize widget all go through it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from napari_stgen.errors import StgenError

if TYPE_CHECKING:  # type names only
    from napari_stgen.inference.stmdit_model import STMDiTModel

__all__ = ["SamplerSettings", "SAMPLER_KIND", "resolve_sampler"]

SAMPLER_KIND = "rectified-flow Euler"


@dataclass(frozen=True)
class SamplerSettings:
    """Steps, guidance scales and expression-guide options of the STMDiT sampler."""

    steps: int = 16
    guidance_genes: float = 2.0
    guidance_morph: float = 1.0
    guidance_expr: float = 0.0  # GenST expression guidance (0: off)
    shift: float = 1.0  # time-grid shift towards t = 1
    guide: str = "default"  # GenST checkpoint of the expression guidance
    guide_tta: int = 1
    guide_t_min: float = 0.0

    @classmethod
    def from_card(cls, card: dict | None) -> SamplerSettings:
        """The settings recorded in a model card's ``sampler`` block (defaults where absent)."""
        s = {k: v for k, v in ((card or {}).get("sampler") or {}).items() if v is not None}
        d = cls()
        return cls(
            steps=int(s.get("steps", d.steps)),
            guidance_genes=float(s.get("guidance_genes", d.guidance_genes)),
            guidance_morph=float(s.get("guidance_morph", d.guidance_morph)),
            guidance_expr=float(s.get("guidance_expr", d.guidance_expr)),
            shift=float(s.get("shift", d.shift)),
            guide=str(s.get("guide", d.guide)),
            guide_tta=int(s.get("guide_tta", d.guide_tta)),
            guide_t_min=float(s.get("guide_t_min", d.guide_t_min)),
        )

    def resolve(self, **overrides: Any) -> SamplerSettings:
        """A copy with the non-None ``overrides`` (field names) applied; steps must be ≥ 1."""
        fields = {f.name: f.type for f in dataclasses.fields(self)}
        unknown = [k for k in overrides if k not in fields]
        if unknown:
            raise TypeError(f"unknown sampler setting(s): {', '.join(unknown)}")
        kw: dict[str, Any] = {}
        for k, v in overrides.items():
            if v is None:
                continue
            cast = type(getattr(self, k))
            kw[k] = cast(v)
        out = dataclasses.replace(self, **kw)
        if out.steps < 1:
            raise StgenError(f"steps must be ≥ 1, got {out.steps}")
        return out

    @property
    def guidance(self) -> tuple[float, float]:
        """(gene, morphology) classifier-free guidance scales."""
        return self.guidance_genes, self.guidance_morph

    @staticmethod
    def card_block() -> dict[str, Any]:
        """The ``sampler`` block a freshly trained model's card records."""
        d = SamplerSettings()
        return {
            "kind": SAMPLER_KIND,
            "steps": d.steps,
            "shift": d.shift,
            "guidance_genes": d.guidance_genes,
            "guidance_morph": d.guidance_morph,
        }


def resolve_sampler(
    model: STMDiTModel, settings: SamplerSettings | None = None, **overrides: Any
) -> SamplerSettings:
    """``settings`` (default: ``model.sampler``, the card's) with the non-None ``overrides``."""
    base = model.sampler if settings is None else settings
    return base.resolve(**overrides)
