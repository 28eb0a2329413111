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

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import Cancelled, StgenError

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
    def context_px(self) -> int:
        """Edge of the context patch (3 × 3 tiles) at ``mpp`` that ``synthesize`` accepts."""
        return 3 * self.tile_px

    @property
    def default_steps(self) -> int:
        return int(self.card.get("sampler", {}).get("steps", 16))

    @property
    def default_guidance(self) -> tuple[float, float]:
        s = self.card.get("sampler", {})
        return float(s.get("guidance_genes", 2.0)), float(s.get("guidance_morph", 1.0))

    @property
    def default_guidance_expr(self) -> float:
        """Scale of the GenST expression guidance (0: off, as in cards that do not set it)."""
        return float(self.card.get("sampler", {}).get("guidance_expr", 0.0))


# ----------------------------------------------------------------------------- gene vectors


def median_profile(model: STMDiTModel) -> np.ndarray:
    """The training median profile (G,) float32 (log1p CP10k)."""
    return np.asarray(model.gene_median, dtype=np.float32).copy()


def parse_gene_overrides(items: list[str] | None) -> dict[str, float]:
    """``["ERBB2=3.5", ...]`` → {"ERBB2": 3.5}; StgenError on a malformed item."""
    out: dict[str, float] = {}
    for it in items or []:
        name, sep, val = it.partition("=")
        if not sep or not name.strip():
            raise StgenError(f"--genes: expected GENE=VALUE, got {it!r}")
        try:
            out[name.strip()] = float(val)
        except ValueError as e:
            raise StgenError(f"--genes: value of {name.strip()} is not a number: {val!r}") from e
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
        import difflib

        hint = difflib.get_close_matches(bad[0].upper(), list(upper), n=1)
        extra = f" (did you mean {upper[hint[0]]}?)" if hint else ""
        raise StgenError(
            f"gene(s) not in the STMDiT panel of {len(model.genes)} genes: {', '.join(bad)}{extra}"
        )
    for g, val in (overrides or {}).items():
        v[idx.get(g, idx.get(upper.get(g.upper(), ""), -1))] = float(val)
    return v


def predicted_profile(
    model: STMDiTModel, context_patches: np.ndarray, predictor: Any
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
    dit: Any,
    x: Any,
    t: Any,
    pool: Any,
    gz: Any,
    morph: Any,
    has_morph: bool,
    guidance_genes: float,
    guidance_morph: float,
) -> Any:
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


# ----------------------------------------------------------------------------- expression guidance


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


def load_guide(
    model: STMDiTModel,
    genst: Any = "default",
    tta: int | None = None,
    t_min: float | None = None,
) -> ExpressionGuide:
    """GenST (a checkpoint name/path, or an already loaded ``GenSTPredictor``) as an
    ``ExpressionGuide`` for ``model``'s panel (``tta``, ``t_min``: default the card's
    ``sampler.guide_tta`` / ``sampler.guide_t_min``)."""
    from .predictor import load_genst

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
    if abs(mpp - model.mpp) > 1e-3:
        raise StgenError(
            f"{pred.path}: GenST patch is {mpp:.3f} µm/px, the STMDiT tiles {model.mpp} µm/px"
        )
    sampler = model.card.get("sampler", {})
    return ExpressionGuide(
        genst=net,
        model_idx=mi,
        guide_idx=gi,
        patch_px=pred.patch_px,
        name=Path(pred.path).stem,
        sha256=pred.checksum,
        sections=tuple(pred.card.get("data", {}).get("sections", [])),
        tta=int(sampler.get("guide_tta", 1) if tta is None else tta),
        t_min=float(sampler.get("guide_t_min", 0.0) if t_min is None else t_min),
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
    """Real surroundings (N, 3, P, P) in [0, 1] for the guide's patch, or None."""
    import torch

    if context_patches is None:
        return None
    ctx = _check_context(model, context_patches)
    o = (ctx.shape[1] - guide.patch_px) // 2
    c = ctx[:, o : o + guide.patch_px, o : o + guide.patch_px]
    return torch.as_tensor(np.ascontiguousarray(c), device=model.device).permute(0, 3, 1, 2) / 255.0


def expression_gradient(
    model: STMDiTModel, guide: ExpressionGuide, x0: Any, target: Any, weights: Any, ctx: Any
) -> Any:
    """∂/∂x̂₀ of Σ_g w_g·(GenST(decode(x̂₀))_g − target_g)² (standardised by GenST), per tile."""
    import torch
    import torch.nn.functional as F

    from ..models.genst import to_input

    t = model.tile_px
    with torch.enable_grad():
        z = x0.detach().requires_grad_(True)
        img = (model.ae.decode(z / model.latent_scale).clamp(-1, 1) + 1.0) / 2.0
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
            model.guide = load_guide(model, model.card.get("sampler", {}).get("guide", "default"))
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


def time_grid(steps: int, shift: float = 1.0) -> np.ndarray:
    """Decreasing times 1 → 0 (``steps`` + 1 points), optionally shifted towards t = 1."""
    t = np.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def sample_latents(
    model: STMDiTModel,
    pool: Any,
    gz: Any,
    morph: Any,
    has_morph: bool,
    seed: int,
    steps: int,
    guidance_genes: float,
    guidance_morph: float,
    progress_cb: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | Any | None = None,
    expr_guide: tuple | None = None,
) -> Any:
    """Euler integration of the guided flow; returns latents (N, C, S, S) in AE scale.

    ``expr_guide``: ``prepare_guidance``'s tuple for these rows (expression guidance)."""
    import torch

    cfg = model.dit.cfg
    n = gz.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    x = torch.randn((n, cfg.latent_ch, cfg.latent_px, cfg.latent_px), generator=gen)
    x = x.to(model.device)
    ts = time_grid(int(steps), float(model.card.get("sampler", {}).get("shift", 1.0)))
    with torch.inference_mode():
        for i in range(int(steps)):
            if _cancelled(cancel):
                raise Cancelled("synthesis cancelled")
            t = torch.full((n,), float(ts[i]), device=model.device)
            v = guided_velocity(
                model.dit, x, t, pool, gz, morph, has_morph, guidance_genes, guidance_morph
            )
            if expr_guide is not None:
                v = guide_velocity(model, expr_guide, x, v, float(ts[i]))
            x = x + float(ts[i + 1] - ts[i]) * v
            if progress_cb is not None:
                progress_cb(i + 1, int(steps))
    return x / model.latent_scale


def _cancelled(cancel: Any) -> bool:
    if cancel is None:
        return False
    if callable(cancel):
        return bool(cancel())
    is_set = getattr(cancel, "is_set", None)
    return bool(is_set()) if callable(is_set) else bool(cancel)


def synthesize(
    model: STMDiTModel,
    genes: np.ndarray,
    context_patches: np.ndarray | None = None,
    seed: int = 0,
    steps: int | None = None,
    guidance_genes: float | None = None,
    guidance_morph: float | None = None,
    progress_cb: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | Any | None = None,
    batch_size: int = 32,
    guidance_expr: float | None = None,
    guide: ExpressionGuide | None = None,
    focus: list[str] | None = None,
) -> np.ndarray:
    """Generate tiles: uint8 (N, tile_px, tile_px, 3) at ``model.mpp`` µm/px.

    ``genes``: (N, G) or (G,) log1p CP10k in ``model.genes`` order (see ``gene_vector``).
    ``context_patches``: None, or uint8 (N or 1, 3·tile_px, 3·tile_px, 3) at ``model.mpp``
    centred on the tile's location (its eight neighbours condition the morphology; the centre
    is ignored). ``cancel``: a callable or threading.Event; raises ``Cancelled`` when set.
    ``progress_cb(done, total)`` is called once per sampler step and batch.
    ``guidance_expr`` (default: the card's): scale of the expression guidance by ``guide``
    (default: the GenST checkpoint ``model.card["sampler"]["guide"]``, loaded once per model);
    ``focus``: genes (the moved sliders) that hold half the weight of its error.
    """
    import torch

    steps = model.default_steps if steps is None else int(steps)
    dg, dm = model.default_guidance
    sg = dg if guidance_genes is None else float(guidance_genes)
    sm = dm if guidance_morph is None else float(guidance_morph)
    if steps < 1:
        raise StgenError(f"steps must be ≥ 1, got {steps}")
    pool, gz, morph, has_m = condition_features(model, genes, context_patches)
    n = gz.shape[0]
    g = np.asarray(genes, np.float32).reshape(n, -1)
    eg = prepare_guidance(model, g, context_patches, guidance_expr, guide, focus)
    gen_seed = int(seed)
    out = []
    nb = (n + batch_size - 1) // batch_size
    for bi in range(nb):
        sl = slice(bi * batch_size, (bi + 1) * batch_size)

        def cb(done, total, bi=bi):
            if progress_cb is not None:
                progress_cb(bi * total + done, nb * total)

        z = sample_latents(
            model,
            pool[sl],
            gz[sl],
            morph[sl],
            has_m,
            gen_seed + bi,
            steps,
            sg,
            sm,
            cb,
            cancel,
            slice_guidance(eg, sl),
        )
        with torch.inference_mode():
            out.append(_decode(model, z))
    return np.concatenate(out, 0)


def _decode(model: STMDiTModel, z: Any) -> np.ndarray:
    from ..models.stmdit import tensor_to_images

    return tensor_to_images(model.ae.decode(z))


# ----------------------------------------------------------------------------- loading


def load_stmdit(name_or_path: str | Path = "default", device: str = "cpu") -> STMDiTModel:
    """Load an STMDiT checkpoint ("default" or a path); CheckpointError on a bad file."""
    from ..errors import CheckpointError
    from ..models.stmdit import DiTConfig, STMDiT, autoencoder_from_config, encoders_from_tensors

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
        checksum=_sha256(path),
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


def _sha256(path: Path) -> str:
    from ..models.checkpoint import sha256_file

    return sha256_file(path)


def _sub(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _load_ckpt(name_or_path: str | Path) -> tuple[Path, dict, dict]:
    from ..models.checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(name_or_path, KIND)
    tensors, card = load_checkpoint(path, KIND)
    return Path(path), tensors, card


# ----------------------------------------------------------------------------- output


def save_tile_png(path: str | Path, tile: np.ndarray, mpp: float, meta: dict | None = None) -> Path:
    """Write an RGB PNG with µm/px in its text metadata (``stgen:mpp``, ``stgen``) and pHYs,
    plus a JSON sidecar ``<path>.json``; both written atomically."""
    from PIL import Image, PngImagePlugin

    path = Path(path)
    tile = np.asarray(tile)
    if tile.ndim != 3 or tile.shape[2] != 3 or tile.dtype != np.uint8:
        raise StgenError(f"{path}: tile must be uint8 (H, W, 3), got {tile.dtype} {tile.shape}")
    info = dict(meta or {})
    info.update({"mpp": float(mpp), "unit": "um", "tile_um": float(mpp) * tile.shape[0]})
    pi = PngImagePlugin.PngInfo()
    pi.add_text("stgen:mpp", f"{float(mpp):.6g}")
    pi.add_text("stgen", json.dumps(info))
    ppm = 1e6 / float(mpp)  # pixels per metre
    tmp = path.with_name(path.name + ".partial")
    Image.fromarray(tile).save(tmp, format="PNG", pnginfo=pi, dpi=(ppm * 0.0254, ppm * 0.0254))
    os.replace(tmp, path)
    side = path.with_name(path.name + ".json")
    tmpj = side.with_name(side.name + ".partial")
    tmpj.write_text(json.dumps(info, indent=1))
    os.replace(tmpj, side)
    return path


def read_tile_mpp(path: str | Path) -> float:
    """µm/px recorded in a tile PNG written by ``save_tile_png``."""
    from PIL import Image

    with Image.open(path) as im:
        v = im.text.get("stgen:mpp") if hasattr(im, "text") else None
    if v is None:
        raise StgenError(f"{path}: no stgen:mpp metadata")
    return float(v)
