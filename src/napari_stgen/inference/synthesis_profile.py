"""What a synthesis request is conditioned on: the region's predicted profile and the tiles'.

:func:`iter_region_profile` averages GenST's predictions (from the prediction store where
known, else through the prediction engine) over the region and each tile;
:func:`conditioning` applies slider values as offsets; :func:`read_contexts` reads each tile's
morphology neighbourhood; :func:`informative_genes` / :func:`slider_range` set up sliders.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_stgen.coords import Grid
from napari_stgen.errors import StgenError
from napari_stgen.inference.cache import slide_key
from napari_stgen.inference.cancel import as_token
from napari_stgen.inference.engine import collect as collect_parts
from napari_stgen.inference.engine import predict_tiles
from napari_stgen.inference.stmdit_model import median_profile
from napari_stgen.inference.synthesis_plan import SynthesisPlan, overlap_weights
from napari_stgen.inference.tiles import read_tiles, slide_grid, tile_um_of

if TYPE_CHECKING:  # type names only
    from napari_stgen.inference.contract import Predictor
    from napari_stgen.inference.stmdit_model import STMDiTModel
    from napari_stgen.inference.store import PredictionStore
    from napari_stgen.io.slide_handle import Slide

__all__ = [
    "RegionProfile",
    "Conditioning",
    "known_from_store",
    "iter_region_profile",
    "conditioning",
    "read_contexts",
    "informative_genes",
    "slider_range",
]


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
    store: PredictionStore | None,
    slide: Slide,
    predictor: Predictor,
    cells: np.ndarray | SynthesisPlan | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """(cells, expr) a PredictionStore already holds for this slide and model (or None).

    Call it on the thread that writes the store (the GUI thread), then hand the copies to a
    worker. ``cells`` (grid cells, or a plan: the cells under its region and tiles)
    restricts the lookup.
    """
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
    slide: Slide,
    model: STMDiTModel,
    predictor: Predictor,
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
            slide,
            predictor,
            cells[todo],
            grid=grid,
            cancel=as_token(cancel, "synthesis cancelled"),
            batch_size=batch_size,
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


def read_contexts(slide: Slide, model: STMDiTModel, plan: SynthesisPlan) -> np.ndarray:
    """Each tile's 3×3-tile neighbourhood on the slide at ``model.mpp``: uint8 (N, 3t, 3t, 3).

    One block read for all tiles (``napari_stgen.inference.tiles.read_tiles`` on the grid of
    tile centres).
    """
    if plan.n_tiles == 0:
        return np.zeros((0, 3 * plan.tile_px, 3 * plan.tile_px, 3), np.uint8)
    stride_um = plan.stride_px * plan.px_um
    cy, cx = plan.canvas_origin_yx_um
    h = plan.tile_um / 2.0 - stride_um / 2.0
    rows, cols = plan.grid_shape
    g = Grid(origin_um=(cy + h, cx + h), tile_um=stride_um, shape=(rows, cols))
    cells = plan.tile_yx // max(plan.stride_px, 1)
    return read_tiles(slide, g, cells, 3 * model.tile_px, 3 * model.tile_um)


# ----------------------------------------------------------------------------- sliders
def informative_genes(
    model: STMDiTModel, n: int = 8, first: Sequence[str] = ("ERBB2",)
) -> list[str]:
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


def slider_range(
    model: STMDiTModel, gene: str, predicted: float | None = None
) -> tuple[float, float]:
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
