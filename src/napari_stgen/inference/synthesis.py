"""Tile synthesis with STMDiT: loading, conditioning vectors, dual-guidance sampler, output.

``synthesize(model, genes, context_patches, seed, steps, guidance_genes, guidance_morph)`` returns
uint8 (N, H, W, 3) tiles at ``model.mpp`` µm/px. The sampler integrates the rectified-flow ODE
from noise (t = 1) to data (t = 0) with Euler steps; at every step the three guidance branches
(∅,∅), (m,∅), (m,g) run as one batched forward and are combined as
``v = v(∅,∅) + s_m·[v(m,∅) − v(∅,∅)] + s_g·[v(m,g) − v(m,∅)]``.
Noise comes from a CPU ``torch.Generator`` seeded with ``seed``, so a seed gives the same tiles
on the same device.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_stgen.errors import StgenError
from napari_stgen.inference.cancel import as_token
from napari_stgen.inference.expression_guide import (
    ExpressionGuide,
    expression_gradient,
    guide_velocity,
    guide_weights,
    load_guide,
    prepare_guidance,
    slice_guidance,
)
from napari_stgen.inference.sampler_settings import SamplerSettings, resolve_sampler
from napari_stgen.inference.stmdit_model import (
    KIND,
    STMDiTModel,
    _check_context,
    load_stmdit,
    median_profile,
    ring_tiles,
)
from napari_stgen.inference.tile_png import read_tile_mpp, save_tile_png

if TYPE_CHECKING:  # type names only
    import torch

    from napari_stgen.inference.contract import Predictor
    from napari_stgen.models.stmdit import STMDiT

__all__ = [
    "KIND",
    "STMDiTModel",
    "SamplerSettings",
    "ExpressionGuide",
    "load_stmdit",
    "load_guide",
    "median_profile",
    "parse_gene_overrides",
    "gene_vector",
    "predicted_profile",
    "ring_tiles",
    "condition_features",
    "guided_velocity",
    "guide_weights",
    "expression_gradient",
    "prepare_guidance",
    "guide_velocity",
    "slice_guidance",
    "time_grid",
    "sample_latents",
    "synthesize",
    "save_tile_png",
    "read_tile_mpp",
]


# ----------------------------------------------------------------------------- gene vectors


def parse_gene_overrides(items: list[str] | None) -> dict[str, float]:
    """``["ERBB2=3.5", ...]`` → {"ERBB2": 3.5}; StgenError on a malformed item."""
    out: dict[str, float] = {}
    for it in items or []:
        name, sep, val = it.partition("=")
        if not sep or not name.strip():
            raise StgenError(f"gene override: expected GENE=VALUE, got {it!r}")
        try:
            out[name.strip()] = float(val)
        except ValueError as e:
            raise StgenError(
                f"gene override: value of {name.strip()} is not a number: {val!r}"
            ) from e
    return out


def gene_vector(
    model: STMDiTModel, overrides: Mapping[str, float] | None = None, base: np.ndarray | None = None
) -> np.ndarray:
    """A (G,) profile: ``base`` (default: training median) with ``overrides`` by gene name.

    Unknown gene names raise StgenError naming them (and a close match when there is one).
    """
    v = median_profile(model) if base is None else np.asarray(base, np.float32).copy()
    if v.shape != (len(model.genes),):
        raise StgenError(f"gene vector has shape {v.shape}, model panel has {len(model.genes)}")
    idx = {g: i for i, g in enumerate(model.genes)}
    upper = {g.upper(): g for g in model.genes}
    bad = [g for g in (overrides or {}) if g not in idx and g.upper() not in upper]
    if bad:
        hint = difflib.get_close_matches(bad[0].upper(), list(upper), n=1)
        extra = f" (did you mean {upper[hint[0]]}?)" if hint else ""
        raise StgenError(
            f"gene(s) not in the STMDiT panel of {len(model.genes)} genes: {', '.join(bad)}{extra}"
        )
    for g, val in (overrides or {}).items():
        v[idx.get(g, idx.get(upper.get(g.upper(), ""), -1))] = float(val)
    return v


def predicted_profile(
    model: STMDiTModel, context_patches: np.ndarray, predictor: Predictor
) -> np.ndarray:
    """GenST's prediction (N, G) at the centre of each context patch, in the STMDiT panel
    (genes GenST does not predict keep the training median). The predictor's patch
    (``predictor.patch_um``, usually 224 µm) is cut from the 336 µm context and resized."""
    ctx = _check_context(model, context_patches)
    size = min(int(round(float(predictor.patch_um) / model.mpp)), ctx.shape[1])
    o = (ctx.shape[1] - size) // 2
    patches = _resize_batch(ctx[:, o : o + size, o : o + size], int(predictor.patch_px))
    expr = np.asarray(predictor.predict(patches).expr, np.float32)
    pos = {g: i for i, g in enumerate(predictor.genes)}
    out = np.tile(median_profile(model), (len(ctx), 1))
    for j, g in enumerate(model.genes):
        if g in pos:
            out[:, j] = expr[:, pos[g]]
    return out


def _resize_batch(tiles: np.ndarray, px: int) -> np.ndarray:
    from PIL import Image

    if tiles.shape[1] == px:
        return np.ascontiguousarray(tiles)
    return np.stack(
        [
            np.asarray(Image.fromarray(np.ascontiguousarray(t)).resize((px, px), Image.BOX))
            for t in tiles
        ]
    )


# ----------------------------------------------------------------------------- features


def condition_features(
    model: STMDiTModel, genes: np.ndarray, context_patches: np.ndarray | None
) -> tuple[Any, Any, Any, bool]:
    """Standardised (gene_pool, gene_z, morph) torch tensors and whether morphology is given."""
    import torch

    g = np.asarray(genes, np.float32)
    if g.ndim == 1:
        g = g[None]
    if g.ndim != 2 or g.shape[1] != len(model.genes):
        raise StgenError(f"genes must be (N, {len(model.genes)}), got {g.shape}")
    if not np.isfinite(g).all():
        raise StgenError("gene values must be finite numbers")
    pool = model.enc.encode_genes(g)
    pool = (pool - model.pool_mean) / model.pool_std
    gz = (g - model.gene_mean) / model.gene_std
    if context_patches is None:
        morph = np.zeros((len(g), len(model.morph_mean)), np.float32)
        has_m = False
    else:
        ctx = _check_context(model, context_patches)
        if len(ctx) == 1 and len(g) > 1:
            ctx = np.repeat(ctx, len(g), 0)
        if len(ctx) != len(g):
            raise StgenError(f"{len(ctx)} context patches for {len(g)} gene vectors")
        morph = model.enc.encode_context(ring_tiles(ctx, model.tile_px))
        morph = (morph - model.morph_mean) / model.morph_std
        has_m = True
    dev = model.device

    def tt(a):
        return torch.as_tensor(np.asarray(a, np.float32), device=dev)

    return tt(pool), tt(gz), tt(morph), has_m


# ----------------------------------------------------------------------------- sampler


def guided_velocity(
    dit: STMDiT,
    x: torch.Tensor,
    t: torch.Tensor,
    pool: torch.Tensor,
    gz: torch.Tensor,
    morph: torch.Tensor,
    has_morph: bool,
    guidance_genes: float,
    guidance_morph: float,
) -> torch.Tensor:
    """Dual classifier-free guidance, the branches batched into one forward."""
    import torch

    b = x.shape[0]
    dev = x.device
    f, tr = (
        torch.zeros(b, dtype=torch.bool, device=dev),
        torch.ones(b, dtype=torch.bool, device=dev),
    )
    if has_morph:
        ug, um = torch.cat([f, f, tr]), torch.cat([f, tr, tr])
    else:
        ug, um = torch.cat([f, tr]), torch.cat([f, f])
    k = len(ug) // b
    v = dit(
        x.repeat(k, 1, 1, 1),
        t.repeat(k),
        pool.repeat(k, 1),
        gz.repeat(k, 1),
        morph.repeat(k, 1),
        ug,
        um,
    ).chunk(k)
    if has_morph:
        v00, vm0, vmg = v
        return v00 + guidance_morph * (vm0 - v00) + guidance_genes * (vmg - vm0)
    v00, v0g = v
    return v00 + guidance_genes * (v0g - v00)


# ----------------------------------------------------------------------------- sampler


def time_grid(steps: int, shift: float = 1.0) -> np.ndarray:
    """Decreasing times 1 → 0 (``steps`` + 1 points), optionally shifted towards t = 1."""
    t = np.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def sample_latents(
    model: STMDiTModel,
    cond: tuple[Any, Any, Any, bool],
    seed: int,
    sampler: SamplerSettings,
    progress_cb: Callable[[int, int], None] | None = None,
    cancel: Any = None,
    expr_guide: tuple | None = None,
) -> Any:
    """Euler integration of the guided flow; returns latents (N, C, S, S) in AE scale.

    ``cond``: ``condition_features``' (pool, gene_z, morph, has_morph) for these rows;
    ``expr_guide``: ``prepare_guidance``'s tuple for these rows (expression guidance)."""
    import torch

    pool, gz, morph, has_morph = cond
    cfg = model.dit.cfg
    n = gz.shape[0]
    steps = int(sampler.steps)
    tok = as_token(cancel, "synthesis cancelled")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    x = torch.randn((n, cfg.latent_ch, cfg.latent_px, cfg.latent_px), generator=gen)
    x = x.to(model.device)
    ts = time_grid(steps, sampler.shift)
    sg, sm = sampler.guidance
    with torch.inference_mode():
        for i in range(steps):
            tok.check()
            t = torch.full((n,), float(ts[i]), device=model.device)
            v = guided_velocity(model.dit, x, t, pool, gz, morph, has_morph, sg, sm)
            if expr_guide is not None:
                v = guide_velocity(model, expr_guide, x, v, float(ts[i]))
            x = x + float(ts[i + 1] - ts[i]) * v
            if progress_cb is not None:
                progress_cb(i + 1, steps)
    return x / model.latent_scale


def synthesize(
    model: STMDiTModel,
    genes: np.ndarray,
    context_patches: np.ndarray | None = None,
    seed: int = 0,
    progress_cb: Callable[[int, int], None] | None = None,
    cancel: Any = None,
    batch_size: int = 32,
    guide: ExpressionGuide | None = None,
    focus: list[str] | None = None,
    **sampler: Any,
) -> np.ndarray:
    """Generate tiles: uint8 (N, tile_px, tile_px, 3) at ``model.mpp`` µm/px.

    ``genes``: (N, G) or (G,) log1p CP10k in ``model.genes`` order (see ``gene_vector``).
    ``context_patches``: None, or uint8 (N or 1, 3·tile_px, 3·tile_px, 3) at ``model.mpp``
    centred on the tile's location (its eight neighbours condition the morphology; the centre
    is ignored). ``cancel``: a token, callable or threading.Event; raises ``Cancelled`` when
    set. ``progress_cb(done, total)`` is called once per sampler step and batch.
    ``sampler``: overrides of the card's :class:`SamplerSettings` (``steps``,
    ``guidance_genes``, ``guidance_morph``, ``guidance_expr``; None: the card's), or
    ``settings=`` a whole :class:`SamplerSettings`. The expression guidance uses ``guide``
    (default: the GenST checkpoint ``model.card["sampler"]["guide"]``, loaded once per model);
    ``focus``: genes (the moved sliders) that hold half the weight of its error.
    """
    import torch

    s = resolve_sampler(model, **sampler)
    pool, gz, morph, has_m = condition_features(model, genes, context_patches)
    n = gz.shape[0]
    g = np.asarray(genes, np.float32).reshape(n, -1)
    eg = prepare_guidance(model, g, context_patches, s.guidance_expr, guide, focus)
    out = []
    nb = (n + batch_size - 1) // batch_size
    for bi in range(nb):
        sl = slice(bi * batch_size, (bi + 1) * batch_size)

        def cb(done, total, bi=bi):
            if progress_cb is not None:
                progress_cb(bi * total + done, nb * total)

        cond = (pool[sl], gz[sl], morph[sl], has_m)
        z = sample_latents(model, cond, int(seed) + bi, s, cb, cancel, slice_guidance(eg, sl))
        with torch.inference_mode():
            out.append(_decode(model, z))
    return np.concatenate(out, 0)


def _decode(model: STMDiTModel, z: Any) -> np.ndarray:
    from napari_stgen.models.stmdit import tensor_to_images  # torch

    return tensor_to_images(model.ae.decode(z))
