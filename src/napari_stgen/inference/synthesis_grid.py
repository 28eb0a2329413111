"""Region synthesis: a world rectangle → a grid of STMDiT tiles, blended into one image.

The Synthesize widget's library (no Qt, no napari)::

    plan = plan_region(region_um, model.mpp, model.tile_px)      # snapped to model pixels
    prof = collect(iter_region_profile(slide, model, predictor, plan, known))
    cond = conditioning(prof, {"ERBB2": 4.2})                     # slider values → vectors
    res = collect(iter_synthesize(slide, model, prof, cond, seeds=[0, 1]))
    res.images[k]  # uint8 (H, W, 3) covering plan.region_um exactly at model.mpp µm/px

- **Grid.** A region larger than one tile is covered by tiles of ``tile_px`` overlapping by
  ``overlap_px`` (both multiples of the autoencoder's ×4 latent factor), centred on the region.
- **Conditioning per tile.** Each tile's gene vector is GenST's prediction on *its own*
  footprint (area-weighted mean of the slide-grid cells it covers, taken from the prediction
  store when known, else computed through the prediction engine) plus the user's offsets:
  offset = slider value − the region's predicted value. Morphology comes from each tile's own
  3×3-tile neighbourhood on the slide.
- **Seams.** All tiles are denoised together on one latent canvas (MultiDiffusion): at every
  sampler step each tile's guided velocity is computed and the overlapping velocities are
  averaged with feathered weights, so neighbouring tiles share one latent in their overlap.
  The canvas is then decoded in one piece (the decoder is convolutional), so the image has
  no seam at all; very large canvases are decoded tile by tile and feather-blended. A
  single-tile region gives exactly ``napari_stgen.inference.synthesis.synthesize``'s tile.
- **Record.** Every image carries a record accepted by ``napari_stgen.io.anndata.GeneratedTile``
  (region µm, gene vector, per-tile vectors, offsets, guidance, steps, seed, model checksum).

Long steps are generators yielding ``(done, total)`` so a GUI worker can report progress and
stop between steps; :func:`collect` runs one to the end and returns its result.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from napari_stgen.errors import StgenError
from napari_stgen.inference.cancel import as_token
from napari_stgen.inference.expression_guide import (
    guide_velocity,
    prepare_guidance,
    slice_guidance,
)
from napari_stgen.inference.sampler_settings import SamplerSettings, resolve_sampler
from napari_stgen.inference.stmdit_model import load_stmdit
from napari_stgen.inference.synthesis import condition_features, guided_velocity, time_grid
from napari_stgen.inference.synthesis_plan import (
    LATENT_FACTOR,
    SynthesisPlan,
    overlap_weights,
    plan_region,
    point_region,
    snap_region,
)
from napari_stgen.inference.synthesis_profile import (
    Conditioning,
    RegionProfile,
    conditioning,
    informative_genes,
    iter_region_profile,
    known_from_store,
    read_contexts,
    slider_range,
)
from napari_stgen.io.anndata import GeneratedTile
from napari_stgen.models.checkpoint import resolve_checkpoint, sha256_file

__all__ = [
    "load_generator",
    "LATENT_FACTOR",
    "SamplerSettings",
    "SynthesisPlan",
    "RegionProfile",
    "Conditioning",
    "SynthesisResult",
    "snap_region",
    "point_region",
    "plan_region",
    "overlap_weights",
    "known_from_store",
    "iter_region_profile",
    "conditioning",
    "read_contexts",
    "iter_generate",
    "iter_synthesize",
    "make_record",
    "seam_disagreement",
    "collect",
    "informative_genes",
    "slider_range",
]

R = TypeVar("R")
MAX_CANVAS_DECODE_PX = 1024 * 1024  # larger canvases are decoded tile by tile, feathered


# ----------------------------------------------------------------------------- model
def load_generator(name_or_path: str = "default", device: str = "cpu") -> Any:
    """``load_stmdit`` plus the checkpoint file's sha256 as ``checksum`` when the card lacks it
    (the record of every generated tile names the exact weights)."""
    model = load_stmdit(name_or_path, device=device)
    if not getattr(model, "checksum", ""):
        model.checksum = sha256_file(resolve_checkpoint(name_or_path, "stmdit"))
    return model


# ----------------------------------------------------------------------------- generation
def _ramp(n: int, ramp: int) -> np.ndarray:
    i = np.arange(n)
    d = np.minimum(i, n - 1 - i) + 1.0
    return np.clip(d / (ramp + 1.0), 1e-3, 1.0) if ramp > 0 else np.ones(n)


def _window(n: int, ramp: int) -> np.ndarray:
    r = _ramp(n, ramp)
    return np.outer(r, r).astype(np.float32)


@dataclass
class _Canvas:
    """The shared latent canvas of a plan and where each tile's latent crop lies on it."""

    x: Any  # (1, C, H/f, W/f) latents
    ly: np.ndarray  # (N,) latent rows of the tiles' top-left corners
    lx: np.ndarray
    lt: int  # latent tile edge
    wl: Any  # (lt, lt) feathering window
    wsum: Any  # (H/f, W/f) sum of the windows
    own: Any = None  # (N, C, lt, lt) per-tile latents when the overlap is not shared

    def crops(self, idx: Sequence[int]) -> Any:
        import torch

        lt = self.lt
        return torch.stack(
            [self.x[0, :, self.ly[i] : self.ly[i] + lt, self.lx[i] : self.lx[i] + lt] for i in idx]
        )


def _new_canvas(model: Any, plan: SynthesisPlan, seed: int, share_overlap: bool) -> _Canvas:
    import torch

    cfg = model.dit.cfg
    f = plan.tile_px // cfg.latent_px
    lt = cfg.latent_px
    ch, cw = plan.canvas_hw
    ly, lx = (plan.tile_yx // f).T
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    x = torch.randn((1, cfg.latent_ch, ch // f, cw // f), generator=gen).to(model.device)
    wl = torch.as_tensor(_window(lt, plan.overlap_px // f), device=model.device)
    wsum = torch.zeros((ch // f, cw // f), device=model.device)
    for i in range(plan.n_tiles):
        wsum[ly[i] : ly[i] + lt, lx[i] : lx[i] + lt] += wl
    canvas = _Canvas(x, ly, lx, lt, wl, wsum)
    if not share_overlap:
        canvas.own = canvas.crops(range(plan.n_tiles))
    return canvas


@dataclass
class _Step:
    """What every tile batch of one sampler step needs."""

    model: Any
    cond: tuple[Any, Any, Any, bool]  # condition_features' (pool, gene_z, morph, has_morph)
    sampler: SamplerSettings
    eg: tuple | None  # prepare_guidance's tuple (or None)
    batch_size: int


def _denoise(
    st: _Step, canvas: _Canvas, n: int, ts: np.ndarray, tok: Any
) -> Generator[None, None, None]:
    """Integrate the guided flow on the canvas; yields once per sampler step and tile batch."""
    import torch

    pool, gz, morph, has_m = st.cond
    sg, sm = st.sampler.guidance
    lt, ly, lx = canvas.lt, canvas.ly, canvas.lx
    for s in range(st.sampler.steps):
        tok.check()
        dt = float(ts[s + 1] - ts[s])
        acc = torch.zeros_like(canvas.x[0])
        for b0 in range(0, n, st.batch_size):
            idx = range(b0, min(b0 + st.batch_size, n))
            sl = slice(idx.start, idx.stop)
            crops = canvas.crops(idx) if canvas.own is None else canvas.own[sl]
            t = torch.full((len(crops),), float(ts[s]), device=st.model.device)
            v = guided_velocity(st.model.dit, crops, t, pool[sl], gz[sl], morph[sl], has_m, sg, sm)
            if st.eg is not None:
                v = guide_velocity(st.model, slice_guidance(st.eg, sl), crops, v, float(ts[s]))
            if canvas.own is not None:
                canvas.own[sl] = crops + dt * v
            elif n == 1:
                acc = v[0]
            else:
                for k, i in enumerate(idx):
                    acc[:, ly[i] : ly[i] + lt, lx[i] : lx[i] + lt] += v[k] * canvas.wl
            yield
        if canvas.own is None:
            canvas.x = canvas.x + dt * (acc[None] if n == 1 else (acc / canvas.wsum)[None])


def _decode_tiles(
    model: Any, plan: SynthesisPlan, canvas: _Canvas, batch_size: int, tok: Any, tiles_out: Any
) -> Generator[None, None, np.ndarray]:
    """Decode the canvas tile batch by tile batch, feather-blended; yields once per batch."""
    import torch

    from napari_stgen.models.stmdit import tensor_to_images  # torch

    n, th = plan.n_tiles, plan.tile_px
    ch, cw = plan.canvas_hw
    wp = torch.as_tensor(_window(th, plan.overlap_px), device=model.device)
    out = torch.zeros((3, ch, cw), device=model.device)
    psum = torch.zeros((ch, cw), device=model.device)
    decoded = []
    for b0 in range(0, n, batch_size):
        tok.check()
        idx = range(b0, min(b0 + batch_size, n))
        zc = canvas.crops(idx) if canvas.own is None else canvas.own[idx.start : idx.stop]
        dec = model.ae.decode(zc / model.latent_scale)
        decoded.append(dec)
        if n > 1:
            for k, i in enumerate(idx):
                py, px = int(plan.tile_yx[i, 0]), int(plan.tile_yx[i, 1])
                out[:, py : py + th, px : px + th] += dec[k].clamp(-1, 1) * wp
                psum[py : py + th, px : px + th] += wp
        yield
    dec_all = torch.cat(decoded)
    if tiles_out is not None:
        tiles_out.append(tensor_to_images(dec_all))
    return tensor_to_images(dec_all)[0] if n == 1 else tensor_to_images((out / psum)[None])[0]


def iter_generate(
    model: Any,
    plan: SynthesisPlan,
    genes: np.ndarray,
    contexts: np.ndarray | None,
    seed: int = 0,
    cancel: Any = None,
    batch_size: int = 32,
    share_overlap: bool = True,
    tiles_out: list | None = None,
    focus: Sequence[str] | None = None,
    **sampler: Any,
) -> Generator[tuple[int, int], None, np.ndarray]:
    """Denoise all tiles of ``plan`` on one latent canvas; returns uint8 (H, W, 3) = region.

    ``genes`` (N, G) per-tile vectors (model panel), ``contexts`` (N, 3t, 3t, 3) or None.
    Yields (done, total) per sampler step and tile batch, then per decoded batch; raises
    ``Cancelled`` at the next step after ``cancel`` is set. Noise is drawn for the whole
    latent canvas from a CPU generator seeded with ``seed``: same inputs → same pixels.
    ``share_overlap=False`` denoises every tile on its own (same initial noise; only the
    pixel feathering joins them) — for comparison. The shared latent canvas is decoded in
    one piece (up to ``MAX_CANVAS_DECODE_PX``; beyond, or when ``tiles_out`` is a list, tile
    by tile with feathered blending; ``tiles_out`` then receives the decoded tiles, uint8
    (N, t, t, 3)). ``sampler``: :class:`SamplerSettings` overrides (``steps``,
    ``guidance_genes``, ``guidance_morph``, ``guidance_expr``; None: the card's) or
    ``settings=``; ``focus`` (the moved genes): GenST expression guidance of each tile
    towards its own vector (see ``synthesis``).
    """
    import torch

    from napari_stgen.models.stmdit import tensor_to_images  # torch

    s = resolve_sampler(model, **sampler)
    if int(model.tile_px) != plan.tile_px:
        raise StgenError(f"plan tiles are {plan.tile_px} px, the model makes {model.tile_px} px")
    if plan.overlap_px % model.latent_factor:
        raise StgenError(
            f"plan overlap {plan.overlap_px} px is not a multiple of the model's latent factor "
            f"{model.latent_factor} (plan_region(..., latent_factor=model.latent_factor))"
        )
    g = np.asarray(genes, np.float32).reshape(plan.n_tiles, -1)
    cond = condition_features(model, g, contexts)
    eg = prepare_guidance(model, g, contexts, s.guidance_expr, None, list(focus or []))
    n = plan.n_tiles
    canvas = _new_canvas(model, plan, seed, share_overlap)
    ts = time_grid(s.steps, s.shift)
    nb = (n + batch_size - 1) // batch_size
    total = s.steps * nb + nb
    done = 0
    tok = as_token(cancel, "synthesis cancelled")
    with torch.inference_mode():
        for _ in _denoise(_Step(model, cond, s, eg, batch_size), canvas, n, ts, tok):
            done += 1
            yield (done, total)
        ch, cw = plan.canvas_hw
        whole = canvas.own is None and n > 1 and ch * cw <= MAX_CANVAS_DECODE_PX
        if whole and tiles_out is None:
            # one decode of the shared latent canvas: no seams in pixel space at all
            img = tensor_to_images(model.ae.decode(canvas.x / model.latent_scale))[0]
            done += nb
            yield (done, total)
        else:
            dec = _decode_tiles(model, plan, canvas, batch_size, tok, tiles_out)
            while True:
                try:
                    next(dec)
                except StopIteration as stop:
                    img = stop.value
                    break
                done += 1
                yield (done, total)
    oy, ox = plan.offset
    h, w = plan.out_hw
    return np.ascontiguousarray(img[oy : oy + h, ox : ox + w])


def seam_disagreement(tiles: np.ndarray, plan: SynthesisPlan) -> float:
    """Mean |difference| (0–255) of neighbouring decoded tiles over their shared overlap.

    0 means neighbours agree pixel for pixel where they overlap (no ghosting at the seams).
    """
    t = np.asarray(tiles, np.float32)
    pos = {(int(y), int(x)): i for i, (y, x) in enumerate(plan.tile_yx)}
    st, ov = plan.stride_px, plan.overlap_px
    diffs = []
    for (y, x), i in pos.items():
        j = pos.get((y, x + st))
        if j is not None and ov:
            diffs.append(np.abs(t[i][:, st:] - t[j][:, :ov]).mean())
        j = pos.get((y + st, x))
        if j is not None and ov:
            diffs.append(np.abs(t[i][st:] - t[j][:ov]).mean())
    return float(np.mean(diffs)) if diffs else 0.0


@dataclass
class SynthesisResult:
    """Generated variants of one request: images (H, W, 3) and their records, by seed."""

    plan: SynthesisPlan
    images: list[np.ndarray]
    records: list[dict]
    seeds: list[int]


def iter_synthesize(
    slide: Any,
    model: Any,
    profile: RegionProfile,
    cond: Conditioning,
    seeds: Sequence[int] = (0,),
    use_morphology: bool = True,
    cancel: Any = None,
    contexts: np.ndarray | None = None,
    **sampler: Any,
) -> Generator[tuple[int, int], None, SynthesisResult]:
    """Generate one image per seed for a profiled region; yields (done, total) steps.

    Morphology context is read from ``slide`` around each tile (unless ``use_morphology`` is
    False or ``contexts`` are given). Each image comes with its record (:func:`make_record`).
    ``sampler``: :class:`SamplerSettings` overrides (``steps``, ``guidance_genes``,
    ``guidance_morph``, ``guidance_expr``: GenST expression guidance, with the moved sliders
    (``cond.offsets``) holding half its weight; None: the card's) or ``settings=``.
    """
    plan = profile.plan
    s = resolve_sampler(model, **sampler)
    if contexts is None and use_morphology and slide is not None:
        contexts = read_contexts(slide, model, plan)
    if not use_morphology:
        contexts = None
    nb = (plan.n_tiles + 31) // 32
    per = s.steps * nb + nb
    total = per * len(seeds)
    images, records = [], []
    context = _context_text(slide, plan) if contexts is not None else ""
    for k, seed in enumerate(seeds):
        gen = iter_generate(
            model,
            plan,
            cond.tiles,
            contexts,
            int(seed),
            cancel,
            focus=list(cond.offsets),
            settings=s,
        )
        img = yield from _offset(gen, k * per, total)
        images.append(img)
        records.append(make_record(img, plan, model, cond, int(seed), s, context, k))
    return SynthesisResult(plan, images, records, [int(s) for s in seeds])


def _offset(gen: Generator, base: int, total: int) -> Generator[tuple[int, int], None, Any]:
    try:
        while True:
            done, _ = next(gen)
            yield (base + done, total)
    except StopIteration as stop:
        return stop.value


def _context_text(slide: Any, plan: SynthesisPlan) -> str:
    name = getattr(getattr(slide, "path", None), "name", "") or "slide"
    x0, y0, x1, y1 = plan.region_um
    return f"{name} @ ({(x0 + x1) / 2:.1f}, {(y0 + y1) / 2:.1f}) µm, each tile's 3×3 neighbourhood"


def make_record(
    image: np.ndarray,
    plan: SynthesisPlan,
    model: Any,
    cond: Conditioning,
    seed: int,
    sampler: SamplerSettings,
    context: str = "",
    variant: int = 0,
    tile_id: str | None = None,
) -> dict:
    """A generated image's ``GeneratedTile`` record (``layer.metadata['stgen']['tile']``)."""
    se = float(sampler.guidance_expr)
    gt = GeneratedTile(
        id=tile_id or f"syn-{uuid.uuid4().hex[:8]}",
        image=image,
        origin_yx_um=plan.origin_yx_um,
        px_um=plan.px_um,
        genes=list(cond.genes),
        condition=cond.region,
        guidance_genes=float(sampler.guidance_genes),
        guidance_morph=float(sampler.guidance_morph),
        steps=int(sampler.steps),
        seed=int(seed),
        model=str(getattr(model, "name", "")),
        model_checksum=str(getattr(model, "checksum", "")),
        context=context,
        extra={
            "region_um": np.asarray(plan.region_um, np.float64),
            "tile_px": int(plan.tile_px),
            "overlap_px": int(plan.overlap_px),
            "tile_origins_yx_um": plan.tile_boxes_um()[:, [1, 0]].astype(np.float64),
            "tile_conditions": np.asarray(cond.tiles, np.float32),
            "offset_genes": np.asarray(list(cond.offsets), dtype=object),
            "offset_values": np.asarray(list(cond.offsets.values()), np.float32),
            "variant": int(variant),
            "guidance_expr": se,
            "guide_sha256": str(getattr(getattr(model, "guide", None), "sha256", ""))
            if se > 0
            else "",
            "blend": "multidiffusion latent canvas, decoded whole"
            if plan.canvas_hw[0] * plan.canvas_hw[1] <= MAX_CANVAS_DECODE_PX
            else "multidiffusion latent canvas, tiles decoded and feathered",
        },
    )
    return gt.to_metadata()


def collect(
    gen: Iterator[tuple[int, int]] | Generator[Any, None, R],
    progress_cb: Callable[[int, int], None] | None = None,
) -> R:
    """Run a generator of this module to the end (calling ``progress_cb``) and return its value."""
    try:
        while True:
            item = next(gen)
            if progress_cb is not None:
                progress_cb(*item)
    except StopIteration as stop:
        return stop.value
