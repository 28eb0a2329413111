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

import math
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from ..coords import Grid
from ..errors import Cancelled, StgenError

__all__ = [
    "load_generator",
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
    "seam_disagreement",
    "collect",
    "informative_genes",
    "slider_range",
]

R = TypeVar("R")
LATENT_FACTOR = 4  # the tile autoencoder downsamples ×4
MAX_CANVAS_DECODE_PX = 1024 * 1024  # larger canvases are decoded tile by tile, feathered


# ----------------------------------------------------------------------------- model
def load_generator(name_or_path: str = "default", device: str = "cpu") -> Any:
    """``load_stmdit`` plus the checkpoint file's sha256 as ``checksum`` when the card lacks it
    (the record of every generated tile names the exact weights)."""
    from ..models.checkpoint import resolve_checkpoint, sha256_file
    from .synthesis import load_stmdit

    model = load_stmdit(name_or_path, device=device)
    if not getattr(model, "checksum", ""):
        model.checksum = sha256_file(resolve_checkpoint(name_or_path, "stmdit"))
    return model


# ----------------------------------------------------------------------------- geometry
def snap_region(region_um: Sequence[float], px_um: float) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) µm, ordered and rounded to multiples of ``px_um`` (at least 1 px)."""
    x0, y0, x1, y1 = (float(v) for v in region_um)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise StgenError(f"region must be finite µm coordinates, got {tuple(region_um)}")
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    p = float(px_um)
    sx0, sy0 = round(x0 / p) * p, round(y0 / p) * p
    sx1 = max(round(x1 / p) * p, sx0 + p)
    sy1 = max(round(y1 / p) * p, sy0 + p)
    return (sx0, sy0, sx1, sy1)


def point_region(yx_um: Sequence[float], tile_um: float) -> tuple[float, float, float, float]:
    """The one-tile region (x0, y0, x1, y1) µm centred on a clicked world point (y, x)."""
    y, x = float(yx_um[-2]), float(yx_um[-1])
    h = float(tile_um) / 2.0
    return (x - h, y - h, x + h, y + h)


@dataclass(frozen=True)
class SynthesisPlan:
    """Tiles covering a region: pixel layout of the generation canvas at ``px_um`` µm/px.

    The canvas (``canvas_hw`` px) is at least the region (``out_hw`` px) and centred on it;
    ``offset`` (y, x) px is the region's top-left inside the canvas; tile ``i`` covers canvas
    pixels ``tile_yx[i] + [0, tile_px)``.
    """

    region_um: tuple[float, float, float, float]
    px_um: float
    tile_px: int
    overlap_px: int
    out_hw: tuple[int, int]
    canvas_hw: tuple[int, int]
    offset: tuple[int, int]
    tile_yx: np.ndarray  # (N, 2) int canvas px

    @property
    def n_tiles(self) -> int:
        return len(self.tile_yx)

    @property
    def tile_um(self) -> float:
        return self.tile_px * self.px_um

    @property
    def stride_px(self) -> int:
        return self.tile_px - self.overlap_px

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(rows, cols) of tiles."""
        ys, xs = np.unique(self.tile_yx[:, 0]), np.unique(self.tile_yx[:, 1])
        return (len(ys), len(xs))

    @property
    def origin_yx_um(self) -> tuple[float, float]:
        """World (y, x) µm of the region's top-left corner."""
        return (self.region_um[1], self.region_um[0])

    @property
    def canvas_origin_yx_um(self) -> tuple[float, float]:
        """World (y, x) µm of the canvas's top-left corner."""
        oy, ox = self.origin_yx_um
        return (oy - self.offset[0] * self.px_um, ox - self.offset[1] * self.px_um)

    def tile_boxes_um(self) -> np.ndarray:
        """(N, 4) world (x0, y0, x1, y1) µm footprint of each tile."""
        cy, cx = self.canvas_origin_yx_um
        y0 = cy + self.tile_yx[:, 0] * self.px_um
        x0 = cx + self.tile_yx[:, 1] * self.px_um
        t = self.tile_um
        return np.stack([x0, y0, x0 + t, y0 + t], axis=1)

    def tile_centres_um(self) -> np.ndarray:
        """(N, 2) world (y, x) µm of the tile centres."""
        b = self.tile_boxes_um()
        return np.stack([(b[:, 1] + b[:, 3]) / 2, (b[:, 0] + b[:, 2]) / 2], axis=1)

    def layer_transform(self) -> dict[str, tuple[float, float]]:
        """napari ``scale``/``translate`` placing an ``out_hw`` image exactly on the region."""
        s = self.px_um
        oy, ox = self.origin_yx_um
        return {"scale": (s, s), "translate": (oy + s / 2.0, ox + s / 2.0)}


def _axis(n_px: int, tile: int, stride: int) -> tuple[int, int, np.ndarray]:
    n = 1 if n_px <= tile else math.ceil((n_px - tile) / stride) + 1
    canvas = tile + (n - 1) * stride
    return canvas, (canvas - n_px) // 2, np.arange(n) * stride


def plan_region(
    region_um: Sequence[float],
    px_um: float,
    tile_px: int,
    overlap_px: int = 16,
    max_tiles: int = 400,
) -> SynthesisPlan:
    """Tiles of ``tile_px`` at ``px_um`` µm/px covering ``region_um`` (x0, y0, x1, y1) µm.

    The region is snapped to whole pixels (:func:`snap_region`). ``overlap_px`` is rounded to
    the latent factor and must leave a positive stride. StgenError above ``max_tiles`` tiles.
    """
    tile_px = int(tile_px)
    f = LATENT_FACTOR
    ov = int(round(overlap_px / f)) * f
    if tile_px % f or not 0 <= ov < tile_px:
        raise StgenError(f"overlap {overlap_px} px must be in [0, {tile_px}) (tile {tile_px} px)")
    reg = snap_region(region_um, px_um)
    h = int(round((reg[3] - reg[1]) / px_um))
    w = int(round((reg[2] - reg[0]) / px_um))
    ch, oy, ys = _axis(h, tile_px, tile_px - ov)
    cw, ox, xs = _axis(w, tile_px, tile_px - ov)
    if len(ys) * len(xs) > max_tiles:
        raise StgenError(
            f"region {w * px_um:.0f} × {h * px_um:.0f} µm needs {len(ys) * len(xs)} tiles "
            f"(limit {max_tiles}); draw a smaller region"
        )
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    tiles = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.int64)
    return SynthesisPlan(reg, float(px_um), tile_px, ov, (h, w), (ch, cw), (oy, ox), tiles)


def overlap_weights(grid: Grid, boxes_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grid cells overlapped by world boxes (K, 4) (x0, y0, x1, y1) and the overlap areas.

    Returns ``cells`` (M, 2) (row, col), unique, inside the grid, and ``w`` (K, M) µm².
    """
    boxes = np.asarray(boxes_um, dtype=np.float64).reshape(-1, 4)
    t = grid.tile_um
    oy, ox = grid.origin_um
    per: list[tuple[np.ndarray, np.ndarray]] = []
    for x0, y0, x1, y1 in boxes:
        r0 = max(0, math.floor((y0 - oy) / t))
        r1 = min(grid.shape[0], math.ceil((y1 - oy) / t))
        c0 = max(0, math.floor((x0 - ox) / t))
        c1 = min(grid.shape[1], math.ceil((x1 - ox) / t))
        if r1 <= r0 or c1 <= c0:
            per.append((np.zeros((0, 2), np.int64), np.zeros(0)))
            continue
        rr, cc = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
        rr, cc = rr.ravel(), cc.ravel()
        hy = np.minimum(y1, oy + (rr + 1) * t) - np.maximum(y0, oy + rr * t)
        hx = np.minimum(x1, ox + (cc + 1) * t) - np.maximum(x0, ox + cc * t)
        area = np.clip(hy, 0, None) * np.clip(hx, 0, None)
        keep = area > 0
        per.append((np.stack([rr[keep], cc[keep]], 1).astype(np.int64), area[keep]))
    allc = [c for c, _ in per if len(c)]
    if not allc:
        return np.zeros((0, 2), np.int64), np.zeros((len(boxes), 0))
    cells, inv = np.unique(np.concatenate(allc), axis=0, return_inverse=True)
    w = np.zeros((len(boxes), len(cells)))
    k = 0
    for i, (c, a) in enumerate(per):
        w[i, inv.ravel()[k : k + len(c)]] = a
        k += len(c)
    return cells, w


# ----------------------------------------------------------------------------- profiles
@dataclass
class RegionProfile:
    """GenST's predicted expression over a plan, in the STMDiT panel (log1p CP10k).

    ``region`` (G,) is the area-weighted mean over the region, ``tiles`` (N, G) over each
    tile's footprint. ``new`` holds the engine results computed here (cells not in
    ``known``) so the caller can add them to its prediction store; ``cells_known`` counts the
    cells taken from ``known``.
    """

    plan: SynthesisPlan
    genes: list[str]
    region: np.ndarray
    tiles: np.ndarray
    grid: Grid | None = None
    new: Any = None
    cells_total: int = 0
    cells_known: int = 0
    missing_genes: list[str] = field(default_factory=list)

    def value(self, gene: str) -> float:
        """Predicted region value of ``gene``."""
        return float(self.region[self.genes.index(gene)])


def known_from_store(
    store: Any, slide: Any, predictor: Any, cells: np.ndarray | SynthesisPlan | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """(cells, expr) a PredictionStore already holds for this slide and model (or None).

    Call it on the thread that writes the store (the GUI thread), then hand the copies to a
    worker. ``cells`` (grid cells, or a plan: the cells under its region and tiles)
    restricts the lookup.
    """
    from .cache import slide_key
    from .tiles import slide_grid, tile_um_of

    if store is None or len(store) == 0:
        return None
    grid = slide_grid(slide, tile_um_of(predictor))
    if not store.matches(slide_key(slide), predictor.checksum, grid):
        return None
    if isinstance(cells, SynthesisPlan):
        boxes = np.concatenate([np.asarray(cells.region_um)[None], cells.tile_boxes_um()])
        cells = overlap_weights(grid, boxes)[0]
    if cells is None:
        return store.tiles.copy(), store.expr.copy()
    cells = np.asarray(cells, np.int64).reshape(-1, 2)
    rows = store.rows_of(cells)
    ok = rows >= 0
    return cells[ok].copy(), store.expr[rows[ok]].copy()


def _to_panel(expr: np.ndarray, src: Sequence[str], dst: Sequence[str], fill: np.ndarray):
    pos = {g: i for i, g in enumerate(src)}
    out = np.tile(np.asarray(fill, np.float32), (len(expr), 1))
    missing = []
    for j, g in enumerate(dst):
        if g in pos:
            out[:, j] = expr[:, pos[g]]
        else:
            missing.append(g)
    return out, missing


def iter_region_profile(
    slide: Any,
    model: Any,
    predictor: Any,
    plan: SynthesisPlan,
    known: tuple[np.ndarray, np.ndarray] | None = None,
    cancel: Any = None,
    batch_size: int = 32,
) -> Generator[tuple[int, int], None, RegionProfile]:
    """Predicted profiles of a plan's region and tiles; yields (done, total) cells.

    Cells of the slide-wide prediction grid (``napari_stgen.inference.tiles.slide_grid``)
    under the region are taken from ``known`` (cells, expr) where present, the rest predicted
    through ``napari_stgen.inference.engine.predict_tiles`` (glass included: a tile's
    conditioning needs a value). Genes of the STMDiT panel that GenST lacks take the
    STMDiT training median.
    """
    from .engine import predict_tiles
    from .synthesis import median_profile
    from .tiles import slide_grid, tile_um_of

    grid = slide_grid(slide, tile_um_of(predictor))
    boxes = np.concatenate([np.asarray(plan.region_um)[None], plan.tile_boxes_um()])
    cells, w = overlap_weights(grid, boxes)
    g = len(predictor.genes)
    expr = np.full((len(cells), g), np.nan, np.float32)
    n_known = 0
    if known is not None and len(cells):
        kc, ke = known
        idx = {(int(r), int(c)): i for i, (r, c) in enumerate(np.asarray(kc))}
        for j, (r, c) in enumerate(cells):
            i = idx.get((int(r), int(c)))
            if i is not None:
                expr[j] = ke[i]
                n_known += 1
    todo = np.flatnonzero(np.isnan(expr[:, 0])) if len(cells) else np.zeros(0, np.int64)
    total = len(todo)
    yield (0, total)
    new_parts = []
    if total:
        pos = {(int(r), int(c)): j for j, (r, c) in enumerate(cells)}
        for part in predict_tiles(
            slide, predictor, cells[todo], grid=grid, cancel=_Token(cancel), batch_size=batch_size
        ):
            for (r, c), e in zip(part.tiles, part.expr, strict=True):
                expr[pos[(int(r), int(c))]] = e
            new_parts.append(part)
            yield (part.done, total)
    fill = median_profile(model)
    mexpr, missing = _to_panel(expr, predictor.genes, model.genes, fill)
    wsum = w.sum(1, keepdims=True)
    prof = np.where(wsum > 0, (w @ mexpr) / np.maximum(wsum, 1e-12), fill[None])
    new = None
    if new_parts:
        from .engine import collect as collect_parts

        new = collect_parts(iter(new_parts))
    return RegionProfile(
        plan=plan,
        genes=list(model.genes),
        region=prof[0].astype(np.float32),
        tiles=prof[1:].astype(np.float32),
        grid=grid,
        new=new,
        cells_total=len(cells),
        cells_known=n_known,
        missing_genes=missing,
    )


class _Token:
    """Adapts a callable / Event / CancelToken / None to the engine's ``check()`` protocol."""

    def __init__(self, cancel: Any) -> None:
        self._c = cancel

    @property
    def cancelled(self) -> bool:
        return _cancelled(self._c)

    def check(self) -> None:
        if _cancelled(self._c):
            raise Cancelled("synthesis cancelled")


def _cancelled(c: Any) -> bool:
    if c is None:
        return False
    if hasattr(c, "cancelled") and not callable(c.cancelled):
        return bool(c.cancelled)
    if callable(c):
        return bool(c())
    is_set = getattr(c, "is_set", None)
    return bool(is_set()) if callable(is_set) else bool(c)


@dataclass
class Conditioning:
    """Gene vectors for a generation: the region's and each tile's, plus the offsets used."""

    genes: list[str]
    region: np.ndarray  # (G,) predicted region profile + offsets
    tiles: np.ndarray  # (N, G) each tile's predicted profile + offsets, clipped at 0
    offsets: dict[str, float]  # gene → slider value − predicted region value (non-zero only)


def conditioning(profile: RegionProfile, values: Mapping[str, float] | None = None) -> Conditioning:
    """Apply slider values (absolute log1p CP10k per gene) as offsets to every tile.

    A gene set to its predicted region value has offset 0 (the tile keeps its own predicted
    value); unknown genes are a StgenError naming them.
    """
    idx = {g: i for i, g in enumerate(profile.genes)}
    bad = [g for g in (values or {}) if g not in idx]
    if bad:
        raise StgenError(f"gene(s) not in the STMDiT panel: {', '.join(bad)}")
    off = np.zeros(len(profile.genes), np.float32)
    offsets: dict[str, float] = {}
    for g, v in (values or {}).items():
        if not math.isfinite(float(v)):
            raise StgenError(f"value of {g} must be a finite number, got {v!r}")
        d = float(v) - float(profile.region[idx[g]])
        if abs(d) > 1e-6:
            off[idx[g]] = d
            offsets[g] = d
    region = np.clip(profile.region + off, 0.0, None).astype(np.float32)
    tiles = np.clip(profile.tiles + off[None], 0.0, None).astype(np.float32)
    return Conditioning(list(profile.genes), region, tiles, offsets)


def read_contexts(slide: Any, model: Any, plan: SynthesisPlan) -> np.ndarray:
    """Each tile's 3×3-tile neighbourhood on the slide at ``model.mpp``: uint8 (N, 3t, 3t, 3).

    One block read for all tiles (``napari_stgen.inference.tiles.read_tiles`` on the grid of
    tile centres).
    """
    from .tiles import read_tiles

    if plan.n_tiles == 0:
        return np.zeros((0, 3 * plan.tile_px, 3 * plan.tile_px, 3), np.uint8)
    stride_um = plan.stride_px * plan.px_um
    cy, cx = plan.canvas_origin_yx_um
    h = plan.tile_um / 2.0 - stride_um / 2.0
    rows, cols = plan.grid_shape
    g = Grid(origin_um=(cy + h, cx + h), tile_um=stride_um, shape=(rows, cols))
    cells = plan.tile_yx // max(plan.stride_px, 1)
    return read_tiles(slide, g, cells, 3 * model.tile_px, 3 * model.tile_um)


# ----------------------------------------------------------------------------- generation
def _ramp(n: int, ramp: int) -> np.ndarray:
    i = np.arange(n)
    d = np.minimum(i, n - 1 - i) + 1.0
    return np.clip(d / (ramp + 1.0), 1e-3, 1.0) if ramp > 0 else np.ones(n)


def _window(n: int, ramp: int) -> np.ndarray:
    r = _ramp(n, ramp)
    return np.outer(r, r).astype(np.float32)


def iter_generate(
    model: Any,
    plan: SynthesisPlan,
    genes: np.ndarray,
    contexts: np.ndarray | None,
    seed: int = 0,
    steps: int | None = None,
    guidance_genes: float | None = None,
    guidance_morph: float | None = None,
    cancel: Any = None,
    batch_size: int = 32,
    share_overlap: bool = True,
    tiles_out: list | None = None,
    guidance_expr: float | None = None,
    focus: Sequence[str] | None = None,
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
    (N, t, t, 3)). ``guidance_expr`` (default: the card's) and ``focus`` (the moved genes):
    GenST expression guidance of each tile towards its own vector (see ``synthesis``).
    """
    import torch

    from ..models.stmdit import tensor_to_images
    from .synthesis import (
        condition_features,
        guide_velocity,
        guided_velocity,
        prepare_guidance,
        slice_guidance,
        time_grid,
    )

    steps = model.default_steps if steps is None else int(steps)
    dg, dm = model.default_guidance
    sg = dg if guidance_genes is None else float(guidance_genes)
    sm = dm if guidance_morph is None else float(guidance_morph)
    if steps < 1:
        raise StgenError(f"steps must be ≥ 1, got {steps}")
    if int(model.tile_px) != plan.tile_px:
        raise StgenError(f"plan tiles are {plan.tile_px} px, the model makes {model.tile_px} px")
    g = np.asarray(genes, np.float32).reshape(plan.n_tiles, -1)
    pool, gz, morph, has_m = condition_features(model, g, contexts)
    eg = prepare_guidance(model, g, contexts, guidance_expr, None, list(focus or []))
    cfg = model.dit.cfg
    f = plan.tile_px // cfg.latent_px
    lt = cfg.latent_px
    ch, cw = plan.canvas_hw
    ly, lx = (plan.tile_yx // f).T
    n = plan.n_tiles
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    x = torch.randn((1, cfg.latent_ch, ch // f, cw // f), generator=gen).to(model.device)

    def crops_of(canvas: Any, idx: Sequence[int]) -> Any:
        return torch.stack([canvas[0, :, ly[i] : ly[i] + lt, lx[i] : lx[i] + lt] for i in idx])

    own = None if share_overlap else crops_of(x, range(n))  # per-tile latents
    wl = torch.as_tensor(_window(lt, plan.overlap_px // f), device=model.device)
    wsum = torch.zeros((ch // f, cw // f), device=model.device)
    for i in range(n):
        wsum[ly[i] : ly[i] + lt, lx[i] : lx[i] + lt] += wl
    ts = time_grid(steps, float(model.card.get("sampler", {}).get("shift", 1.0)))
    nb = (n + batch_size - 1) // batch_size
    total = steps * nb + nb
    done = 0
    tok = _Token(cancel)
    with torch.inference_mode():
        for s in range(steps):
            tok.check()
            dt = float(ts[s + 1] - ts[s])
            acc = torch.zeros_like(x[0])
            for b0 in range(0, n, batch_size):
                idx = range(b0, min(b0 + batch_size, n))
                sl = slice(idx.start, idx.stop)
                crops = crops_of(x, idx) if own is None else own[sl]
                t = torch.full((len(crops),), float(ts[s]), device=model.device)
                v = guided_velocity(model.dit, crops, t, pool[sl], gz[sl], morph[sl], has_m, sg, sm)
                if eg is not None:
                    v = guide_velocity(model, slice_guidance(eg, sl), crops, v, float(ts[s]))
                if own is not None:
                    own[sl] = crops + dt * v
                elif n == 1:
                    acc = v[0]
                else:
                    for k, i in enumerate(idx):
                        acc[:, ly[i] : ly[i] + lt, lx[i] : lx[i] + lt] += v[k] * wl
                done += 1
                yield (done, total)
            if own is None:
                x = x + dt * (acc[None] if n == 1 else (acc / wsum)[None])
        th = plan.tile_px
        whole = own is None and n > 1 and ch * cw <= MAX_CANVAS_DECODE_PX and tiles_out is None
        if whole:
            # one decode of the shared latent canvas: no seams in pixel space at all
            img = tensor_to_images(model.ae.decode(x / model.latent_scale))[0]
            done += nb
            yield (done, total)
        else:
            wp = torch.as_tensor(_window(th, plan.overlap_px), device=model.device)
            out = torch.zeros((3, ch, cw), device=model.device)
            psum = torch.zeros((ch, cw), device=model.device)
            decoded = []
            for b0 in range(0, n, batch_size):
                tok.check()
                idx = range(b0, min(b0 + batch_size, n))
                zc = crops_of(x, idx) if own is None else own[idx.start : idx.stop]
                dec = model.ae.decode(zc / model.latent_scale)
                decoded.append(dec)
                if n > 1:
                    for k, i in enumerate(idx):
                        py, px = int(plan.tile_yx[i, 0]), int(plan.tile_yx[i, 1])
                        out[:, py : py + th, px : px + th] += dec[k].clamp(-1, 1) * wp
                        psum[py : py + th, px : px + th] += wp
                done += 1
                yield (done, total)
            dec_all = torch.cat(decoded)
            if tiles_out is not None:
                tiles_out.append(tensor_to_images(dec_all))
            img = (
                tensor_to_images(dec_all)[0] if n == 1 else tensor_to_images((out / psum)[None])[0]
            )
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
    steps: int | None = None,
    guidance_genes: float | None = None,
    guidance_morph: float | None = None,
    use_morphology: bool = True,
    cancel: Any = None,
    contexts: np.ndarray | None = None,
    guidance_expr: float | None = None,
) -> Generator[tuple[int, int], None, SynthesisResult]:
    """Generate one image per seed for a profiled region; yields (done, total) steps.

    Morphology context is read from ``slide`` around each tile (unless ``use_morphology`` is
    False or ``contexts`` are given). Each image comes with its record (:func:`make_record`).
    ``guidance_expr``: GenST expression guidance (default: the card's), with the moved
    sliders (``cond.offsets``) holding half its weight.
    """
    plan = profile.plan
    steps = model.default_steps if steps is None else int(steps)
    dg, dm = model.default_guidance
    sg = dg if guidance_genes is None else float(guidance_genes)
    sm = dm if guidance_morph is None else float(guidance_morph)
    se = model.default_guidance_expr if guidance_expr is None else float(guidance_expr)
    if contexts is None and use_morphology and slide is not None:
        contexts = read_contexts(slide, model, plan)
    if not use_morphology:
        contexts = None
    nb = (plan.n_tiles + 31) // 32
    per = steps * nb + nb
    total = per * len(seeds)
    images, records = [], []
    for k, seed in enumerate(seeds):
        gen = iter_generate(
            model,
            plan,
            cond.tiles,
            contexts,
            int(seed),
            steps,
            sg,
            sm,
            cancel,
            guidance_expr=se,
            focus=list(cond.offsets),
        )
        img = yield from _offset(gen, k * per, total)
        images.append(img)
        records.append(
            make_record(
                img,
                plan,
                model,
                cond,
                int(seed),
                steps,
                sg,
                sm,
                context=_context_text(slide, plan) if contexts is not None else "",
                variant=k,
                guidance_expr=se,
            )
        )
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
    steps: int,
    guidance_genes: float,
    guidance_morph: float,
    context: str = "",
    variant: int = 0,
    tile_id: str | None = None,
    guidance_expr: float = 0.0,
) -> dict:
    """``layer.metadata['stgen_generated']`` for an image: a ``GeneratedTile`` record."""
    from ..io.anndata import GeneratedTile

    gt = GeneratedTile(
        id=tile_id or f"syn-{uuid.uuid4().hex[:8]}",
        image=image,
        origin_yx_um=plan.origin_yx_um,
        px_um=plan.px_um,
        genes=list(cond.genes),
        condition=cond.region,
        guidance_genes=float(guidance_genes),
        guidance_morph=float(guidance_morph),
        steps=int(steps),
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
            "guidance_expr": float(guidance_expr),
            "guide_sha256": str(getattr(getattr(model, "guide", None), "sha256", ""))
            if guidance_expr > 0
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


# ----------------------------------------------------------------------------- sliders
def informative_genes(model: Any, n: int = 8, first: Sequence[str] = ("ERBB2",)) -> list[str]:
    """Genes for the default sliders: ``first`` (if in the panel) then the highest-variance
    genes of the model's training profiles (``gene_std``)."""
    genes = list(model.genes)
    out = [g for g in first if g in genes]
    for i in np.argsort(-np.asarray(model.gene_std, np.float64), kind="stable"):
        if len(out) >= n:
            break
        if genes[i] not in out:
            out.append(genes[i])
    return out


def slider_range(model: Any, gene: str, predicted: float | None = None) -> tuple[float, float]:
    """Slider range of a gene: the observed training range (1st–99th percentile of measured
    spots, from the checkpoint) widened to include the predicted value."""
    if gene not in model.genes:
        raise StgenError(f"gene {gene!r} is not in the STMDiT panel")
    lo, hi = (float(v) for v in np.asarray(model.gene_range)[model.genes.index(gene)])
    if predicted is not None and math.isfinite(predicted):
        lo, hi = min(lo, float(predicted)), max(hi, float(predicted))
    lo = max(0.0, lo)
    if hi - lo < 1e-3:
        hi = lo + 1.0
    return lo, hi
