"""GenST expression guidance of the STMDiT sampler (classifier guidance, GenST as classifier).

:func:`prepare_guidance` resolves the guide, targets and weights once per request;
:func:`guide_velocity` adds the guidance term at one sampler step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_stgen.errors import StgenError
from napari_stgen.inference.predictor import GenSTPredictor, load_genst
from napari_stgen.inference.stmdit_model import STMDiTModel, _check_context


@dataclass
class ExpressionGuide:
    """A frozen GenST that re-predicts expression from the sampler's clean-tile estimate.

    At each sampler step the current estimate of the clean latent, ``x̂₀ = x_t − t·v``, is decoded
    to a tile, placed in its 224 µm GenST patch (the real surroundings when a context patch is
    given, else reflect-padded) and re-predicted; the gradient of the standardised squared error
    to the conditioning profile is added to the velocity (classifier guidance, with GenST as the
    classifier). ``weights`` (G,) weigh the genes of the STMDiT panel in that error.
    """

    genst: Any
    model_idx: np.ndarray  # positions in the STMDiT panel
    guide_idx: np.ndarray  # the same genes' positions in GenST's panel
    patch_px: int
    name: str = ""
    sha256: str = ""
    sections: tuple[str, ...] = ()  # sections GenST was trained on
    tta: int = 1  # rotations averaged by the guide (1, 2 or 4)
    t_min: float = 0.0  # no guidance at flow times t < t_min (the last, fine-detail steps)
    zoom: int = 1  # STMDiT pixels per GenST pixel (tiles are area-averaged down to GenST's µm/px)


def load_guide(
    model: STMDiTModel,
    genst: str | Path | GenSTPredictor = "default",
    tta: int | None = None,
    t_min: float | None = None,
) -> ExpressionGuide:
    """GenST (a checkpoint name/path, or an already loaded ``GenSTPredictor``) as an
    ``ExpressionGuide`` for ``model``'s panel (``tta``, ``t_min``: default the card's
    ``sampler.guide_tta`` / ``sampler.guide_t_min``)."""
    pred = load_genst(genst, device=model.device) if isinstance(genst, str | Path) else genst
    net = pred.model
    for p in net.parameters():
        p.requires_grad_(False)
    pos = {g: i for i, g in enumerate(pred.genes)}
    mi = np.array([i for i, g in enumerate(model.genes) if g in pos], dtype=np.int64)
    if not len(mi):
        raise StgenError(f"{pred.path}: GenST panel shares no gene with the STMDiT panel")
    gi = np.array([pos[model.genes[i]] for i in mi], dtype=np.int64)
    mpp = pred.patch_um / pred.patch_px
    zoom = int(round(mpp / model.mpp))
    if zoom < 1 or abs(zoom * model.mpp - mpp) > 1e-3 or model.tile_px % zoom:
        raise StgenError(
            f"{pred.path}: GenST patch is {mpp:.3f} µm/px, the STMDiT tiles {model.mpp} µm/px "
            "(the guide needs an integer multiple of the tiles' µm/px)"
        )
    sampler = model.sampler
    return ExpressionGuide(
        genst=net,
        model_idx=mi,
        guide_idx=gi,
        patch_px=pred.patch_px,
        name=Path(pred.path).stem,
        sha256=pred.checksum,
        sections=tuple(pred.card.get("data", {}).get("sections", [])),
        tta=int(sampler.guide_tta if tta is None else tta),
        t_min=float(sampler.guide_t_min if t_min is None else t_min),
        zoom=zoom,
    )


def guide_weights(model: STMDiTModel, focus: list[str] | None = None, share: float = 0.5):
    """(G,) gene weights of the guidance error, summing to 1: uniform, or with the ``focus``
    genes (the sliders the user moved) holding ``share`` of the total."""
    g = len(model.genes)
    w = np.full(g, 1.0 / g, np.float32)
    upper = {x.upper(): i for i, x in enumerate(model.genes)}
    idx = sorted({upper[x.upper()] for x in (focus or []) if x.upper() in upper})
    if idx and len(idx) < g:
        rest = np.ones(g, bool)
        rest[idx] = False
        w[idx] = share / len(idx)
        w[rest] = (1.0 - share) / rest.sum()
    return w


def _guide_context(model: STMDiTModel, guide: ExpressionGuide, context_patches) -> Any:
    """Real surroundings (N, 3, P, P) in [0, 1] at GenST's µm/px for the guide's patch, or
    None."""
    import torch
    import torch.nn.functional as F

    if context_patches is None:
        return None
    ctx = _check_context(model, context_patches)
    size = guide.patch_px * guide.zoom
    o = (ctx.shape[1] - size) // 2
    c = ctx[:, o : o + size, o : o + size]
    c = torch.as_tensor(np.ascontiguousarray(c), device=model.device).permute(0, 3, 1, 2) / 255.0
    return F.avg_pool2d(c, guide.zoom) if guide.zoom > 1 else c


def expression_gradient(
    model: STMDiTModel, guide: ExpressionGuide, x0: Any, target: Any, weights: Any, ctx: Any
) -> Any:
    """∂/∂x̂₀ of Σ_g w_g·(GenST(decode(x̂₀))_g − target_g)² (standardised by GenST), per tile."""
    import torch
    import torch.nn.functional as F

    from napari_stgen.models.genst import to_input  # torch

    t = model.tile_px // guide.zoom
    with torch.enable_grad():
        z = x0.detach().requires_grad_(True)
        img = (model.ae.decode(z / model.latent_scale).clamp(-1, 1) + 1.0) / 2.0
        if guide.zoom > 1:
            img = F.avg_pool2d(img, guide.zoom)
        o = (guide.patch_px - t) // 2
        if ctx is None:
            patch = F.pad(img, (o, guide.patch_px - t - o) * 2, mode="reflect")
        else:
            patch = ctx.clone()
            patch[:, :, o : o + t, o : o + t] = img
        expr = guide.genst.predict(to_input(patch), tta=guide.tta)[0]
        pred = guide.genst.standardize(expr)[:, guide.guide_idx]
        loss = (weights * (pred - target) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, z)
    return grad


def prepare_guidance(
    model: STMDiTModel,
    genes: np.ndarray,
    context_patches: np.ndarray | None,
    guidance_expr: float | None,
    guide: ExpressionGuide | None = None,
    focus: list[str] | None = None,
) -> tuple[ExpressionGuide, float, Any, Any, Any] | None:
    """(guide, scale, standardised targets (N, G'), weights (G',), guide context or None) for
    ``guide_velocity``, or None when the scale is 0. The guide defaults to the card's GenST
    (``sampler.guide``, loaded once per model)."""
    import torch

    se = model.default_guidance_expr if guidance_expr is None else float(guidance_expr)
    if not np.isfinite(se) or se < 0:
        raise StgenError(f"expression guidance must be ≥ 0, got {se}")
    if se == 0:
        return None
    if guide is None:
        if model.guide is None:
            model.guide = load_guide(model, model.sampler.guide)
        guide = model.guide
    g = np.asarray(genes, np.float32)
    g = g.reshape(-1, g.shape[-1])[:, guide.model_idx]
    gi = torch.as_tensor(guide.guide_idx)
    mu, sd = guide.genst.y_mean[gi], guide.genst.y_std[gi]
    tgt = (torch.as_tensor(g, device=model.device) - mu) / sd
    w = torch.as_tensor(guide_weights(model, focus)[guide.model_idx], device=model.device)
    ctx = _guide_context(model, guide, context_patches)
    if ctx is not None and len(ctx) == 1 and len(g) > 1:
        ctx = ctx.expand(len(g), -1, -1, -1)
    return guide, se, tgt, w, ctx


def guide_velocity(model: STMDiTModel, eg: tuple, x: Any, v: Any, t: float) -> Any:
    """``v`` plus the expression-guidance term at flow time ``t`` (``eg`` from
    ``prepare_guidance``, already sliced to the rows of ``x``): the per-tile RMS-normalised
    gradient at the clean-latent estimate x̂₀ = x − t·v, times the scale."""
    import torch

    guide, scale, target, w, ctx = eg
    if t < guide.t_min:
        return v
    with torch.inference_mode(False):
        x0 = (x - t * v).clone()
        g = expression_gradient(model, guide, x0, target, w, ctx)
    rms = g.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)
    return v + scale * g / rms[:, None, None, None]


def slice_guidance(eg: tuple | None, sl: slice) -> tuple | None:
    """``prepare_guidance``'s tuple for the rows ``sl``."""
    if eg is None:
        return None
    guide, scale, target, w, ctx = eg
    return guide, scale, target[sl], w, None if ctx is None else ctx[sl]
