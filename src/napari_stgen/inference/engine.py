"""Batched, cached, cancellable tile prediction over a region, ROI or whole slide (no napari).

``predict_region`` / ``predict_tiles`` are generators: each ``next()`` does one batch of
work (one block read + one model call) and yields a :class:`PartialResult`, checking the
cancellation token between batches, so a GUI can show results as they arrive.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_stgen.coords import Grid
from napari_stgen.inference.cache import TileCache, slide_key
from napari_stgen.inference.cancel import CancelToken
from napari_stgen.inference.contract import BATCH_SIZE, Predictor, TileRequest
from napari_stgen.inference.tiles import (
    filter_tissue,
    read_or_skip,
    read_tiles,
    slide_grid,
    split_blocks,
    tile_centres_um,
    tile_um_of,
    tiles_in_labels,
    tiles_in_region,
    tiles_in_shapes,
    tissue_cells,
)
from napari_stgen.io.slide import Slide

__all__ = [
    "CancelToken",
    "PartialResult",
    "Estimate",
    "TileRequest",
    "predict_tiles",
    "predict_genst_tiles",
    "predict_region",
    "predict_roi",
    "plan_prediction_region",
    "plan_roi",
    "plan_whole_slide",
    "estimate",
    "measure_throughput",
    "collect",
]


@dataclass
class PartialResult:
    """One batch of predicted tiles of the slide-wide ``grid``.

    ``tiles`` (n, 2) grid (row, col); ``centres_um`` (n, 2) world (y, x) µm; ``expr`` (n, G)
    float32 in the model's normalization; ``code`` (n,) int64 gene-code index; ``done`` /
    ``total`` count tiles over the whole request; ``cached`` how many came from the cache.
    ``final``: the request's last result from a model with a spatial context head: every
    tile of the request, each predicted from its window of the request's tiles; it supersedes
    the tile-by-tile values of the earlier results. ``draft``: a quick-look value from the
    fast pass of a progressive request (no test-time augmentation, tile by tile), superseded
    by the full-quality result of the same tiles later in the same request.
    ``uncertainty`` (n,) float32 per tile, larger = less sure (GenST: see
    ``inference/confidence.py``); None when the model gives none (HistoTx).
    """

    grid: Grid
    tiles: np.ndarray
    centres_um: np.ndarray
    expr: np.ndarray
    code: np.ndarray
    done: int
    total: int
    cached: int = 0
    final: bool = False
    draft: bool = False
    uncertainty: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tiles)


@dataclass(frozen=True)
class Estimate:
    """Work estimate before a run: tissue tiles to predict, cached ones, seconds."""

    tiles: int
    cached: int
    seconds: float
    tiles_per_s: float


_throughput: dict[str, float] = {}  # model checksum + device -> measured tiles/s
PROGRESSIVE_MAX_TILES = 1024  # a progressive request keeps its patches for the second pass


def _tp_key(predictor: Predictor) -> str:
    return f"{predictor.checksum}|{predictor.device}"


def _keys(skey: str, predictor: Predictor, grid: Grid, tiles: np.ndarray) -> list[tuple]:
    # the TTA count is part of the key: values (and a context model's tokens) depend on it;
    # "u": rows end with the tile's uncertainty
    ck = (predictor.checksum, int(getattr(predictor, "tta", 1)), "u")
    t = (grid.tile_um, float(predictor.patch_um))
    return [(skey, ck, t, int(r), int(c)) for r, c in tiles]


def _has_context(predictor: Predictor) -> bool:
    return bool(getattr(predictor, "has_context", False))


def _pack(expr: np.ndarray, feat: np.ndarray, zhat: np.ndarray) -> np.ndarray:
    """Cache rows of a context model: [expr | feat per transform | ẑ per transform]."""
    n = len(expr)
    return np.concatenate(
        [expr, feat.transpose(1, 0, 2).reshape(n, -1), zhat.transpose(1, 0, 2).reshape(n, -1)], 1
    )


def _unpack(rows: np.ndarray, n_genes: int, n_rot: int, latent: int) -> tuple[np.ndarray, ...]:
    """Inverse of ``_pack``: (expr (n, G), feat (R, n, F), ẑ (R, n, D))."""
    n = len(rows)
    expr = rows[:, :n_genes]
    f_dim = (rows.shape[1] - n_genes) // n_rot - latent
    cut = n_genes + n_rot * f_dim
    feat = rows[:, n_genes:cut].reshape(n, n_rot, f_dim).transpose(1, 0, 2)
    zhat = rows[:, cut:].reshape(n, n_rot, latent).transpose(1, 0, 2)
    return expr, feat, zhat


def _centre_out(grid: Grid, tiles: np.ndarray, centre_yx: Sequence[float] | None) -> np.ndarray:
    if centre_yx is None or len(tiles) == 0:
        return tiles
    d = ((tile_centres_um(grid, tiles) - np.asarray(centre_yx, dtype=np.float64)) ** 2).sum(1)
    return tiles[np.argsort(d, kind="stable")]


def predict_tiles(
    slide: Slide,
    predictor: Predictor,
    request: TileRequest | np.ndarray,
    **options: Any,
) -> Iterator[PartialResult]:
    """The one tile-prediction entry point (widgets, CLI, cohorts): ``PartialResult`` per
    batch of the request's grid cells, by the predictor's own ``predict_tiles``.

    ``request``: a :class:`TileRequest`, or the cells (n, 2) with the request's other
    fields as keywords (``grid``, ``cancel``, ``batch_size``, ``cache``, ``centre_um``,
    ``block``, ``progressive``, ``measured``, ``image_only``).
    """
    req = request if isinstance(request, TileRequest) else TileRequest(request, **options)
    yield from predictor.predict_tiles(slide, req)


def _read_block(
    slide: Slide,
    grid: Grid,
    predictor: Predictor,
    cells: np.ndarray,
    bad: set[tuple[int, int]] | None,
) -> np.ndarray:
    """The block's patches (one read); with ``bad`` (skip_unreadable), cells that cannot be
    read become white patches and are added to ``bad`` instead of stopping the request."""
    flags = np.zeros(len(cells), dtype=bool)
    px = read_or_skip(
        lambda idx: read_tiles(slide, grid, cells[idx], predictor.patch_px, predictor.patch_um),
        np.arange(len(cells)),
        bad is not None,
        flags,
        predictor.patch_px,
    )
    if bad is not None:
        bad.update((int(r), int(c)) for r, c in cells[flags])
    return px


def _blank_unreadable(part: PartialResult, bad: set[tuple[int, int]] | None) -> PartialResult:
    """NaN expression and uncertainty on the result's unreadable cells (``bad``)."""
    if not bad:
        return part
    rows = np.array([(int(r), int(c)) in bad for r, c in part.tiles], dtype=bool)
    if rows.any():
        part.expr = np.array(part.expr, dtype=np.float32)
        part.expr[rows] = np.nan
        if part.uncertainty is not None:
            part.uncertainty = np.array(part.uncertainty, dtype=np.float32)
            part.uncertainty[rows] = np.nan
    return part


def predict_cells(
    slide: Slide,
    predictor: Predictor,
    request: TileRequest,
    progress: Callable[[int, int], None] | None = None,
) -> PartialResult:
    """Every cell of ``request`` at once, in the request's order (``stgen predict --grid``):
    :func:`predict_tiles` run to the end; ``progress(done, total)`` per batch."""
    def stream() -> Iterator[PartialResult]:
        for part in predict_tiles(slide, predictor, request):
            if progress is not None and not part.draft and not part.final:
                progress(part.done, part.total)
            yield part

    cells = np.asarray(request.tiles, dtype=np.int64).reshape(-1, 2)
    res = collect(stream())
    if res is None:  # no cells asked for
        g = len(predictor.genes)
        empty = np.zeros((0, g), np.float32)
        return PartialResult(request.grid, cells, np.zeros((0, 2)), empty, np.zeros(0, np.int64),
                             0, 0, uncertainty=np.zeros(0, np.float32))  # fmt: skip
    at = {(int(r), int(c)): i for i, (r, c) in enumerate(res.tiles)}
    order = np.array([at[(int(r), int(c))] for r, c in cells], dtype=np.int64)
    unc = None if res.uncertainty is None else res.uncertainty[order]
    return PartialResult(
        res.grid, cells, res.centres_um[order], res.expr[order], res.code[order], res.done,
        res.total, res.cached, uncertainty=unc,
    )  # fmt: skip


def predict_genst_tiles(
    slide: Slide, predictor: Predictor, request: TileRequest
) -> Iterator[PartialResult]:
    """GenST's ``predict_tiles``: the request's grid cells batch by batch.

    Cached cells are yielded first in one result. The rest are read in blocks of
    ``block``×``block`` cells (one read each), ordered by distance of the block to
    ``centre_um`` (y, x) if given (cells too, so results grow from the centre), and
    predicted ``batch_size`` at a time (the first batch smaller, for a quick first view). A
    model with a spatial context head yields each batch tile by tile, then one ``final``
    result for all cells, each seen in its window of the request's cells.

    ``progressive`` (a model with test-time augmentation, at most
    ``PROGRESSIVE_MAX_TILES`` uncached cells): first a fast pass without TTA yields
    ``draft`` results for every cell, then the full pass yields the model's values for the
    same cells (the patches are read once). Drafts are not cached. Raises
    :class:`Cancelled` at the first check after ``cancel`` is set.
    """
    grid = request.grid or slide_grid(slide, tile_um_of(predictor))
    tiles = np.asarray(request.tiles, dtype=np.int64).reshape(-1, 2)
    batch_size, cache, centre_um = request.batch_size, request.cache, request.centre_um
    if request.skip_unreadable:
        cache = None  # an unreadable cell's white patch must not be cached as its value
    total = len(tiles)
    cancel = request.cancel or CancelToken()
    cancel.check()
    done = 0
    ctx = _has_context(predictor)
    n_genes = len(predictor.genes)
    tok: dict[str, list[np.ndarray]] = {"tiles": [], "feat": [], "zhat": [], "expr": []}
    n_cached = 0
    if cache is not None and total:
        skey = slide_key(slide)
        keys = _keys(skey, predictor, grid, tiles)
        hit, items = cache.get_many(keys)
        if hit.any():
            ht = tiles[hit]
            done += len(ht)
            n_cached = len(ht)
            rows = np.stack([e for e, _ in items]).astype(np.float32)
            unc, rows = rows[:, -1], rows[:, :-1]
            if ctx:
                lat = predictor.model.cfg.gene_latent
                e, f, z = _unpack(rows, n_genes, predictor.tta, lat)
                tok["tiles"].append(ht)
                tok["feat"].append(f)
                tok["zhat"].append(z)
                rows = e
            yield PartialResult(
                grid,
                ht,
                tile_centres_um(grid, ht),
                rows,
                np.array([c for _, c in items], dtype=np.int64),
                done,
                total,
                cached=len(ht),
                uncertainty=unc,
            )
        tiles = tiles[~hit]
    blocks = split_blocks(tiles, request.block) if len(tiles) else []
    if centre_um is not None:
        c = np.asarray(centre_um, dtype=np.float64)
        dist = [((tile_centres_um(grid, b).mean(0) - c) ** 2).sum() for b in blocks]
        blocks = [blocks[i] for i in np.argsort(dist, kind="stable")]
    ordered = [_centre_out(grid, b, centre_um) for b in blocks]
    # skip_unreadable: cells whose pixels cannot be read (None: reading errors stop the request)
    bad: set[tuple[int, int]] | None = set() if request.skip_unreadable else None
    read = {}  # block index -> patches, kept between the passes of a progressive request
    quick: dict[int, tuple[list, list]] = {}  # block index -> the quick pass's tokens
    two_pass = request.progressive and int(getattr(predictor, "tta", 1)) > 1
    two_pass = two_pass and 0 < len(tiles) <= PROGRESSIVE_MAX_TILES
    if two_pass:
        n_draft = done
        for i, btiles in enumerate(ordered):
            cancel.check()
            read[i] = _read_block(slide, grid, predictor, btiles, bad)
            quick[i] = ([], [])
            for bt, out in _batches(predictor, btiles, read[i], batch_size, n_draft, cancel,
                                    tta=1, tokens=True):  # fmt: skip
                quick[i][0].append(out.feat)
                quick[i][1].append(out.zhat)
                n_draft += len(bt)
                yield _blank_unreadable(PartialResult(
                    grid,
                    bt,
                    tile_centres_um(grid, bt),
                    np.asarray(out.expr, dtype=np.float32),
                    np.asarray(out.code, dtype=np.int64),
                    n_draft,
                    total,
                    draft=True,
                    uncertainty=_unc(out, len(bt)),
                ), bad)
    for i, btiles in enumerate(ordered):
        cancel.check()
        patches = read.pop(i, None)
        if patches is None:
            patches = _read_block(slide, grid, predictor, btiles, bad)
        q = quick.pop(i, None)  # the quick pass's untransformed tokens: not computed again
        given = (np.concatenate(q[0], 1), np.concatenate(q[1], 1)) if q else None
        for bt, out in _batches(predictor, btiles, patches, batch_size, done, cancel,
                                tokens=ctx, rate=given is None, given=given):  # fmt: skip
            expr = np.asarray(out.expr, dtype=np.float32)
            code = np.asarray(out.code, dtype=np.int64)
            rows = expr
            if ctx:
                tok["tiles"].append(bt)
                tok["feat"].append(out.feat)
                tok["zhat"].append(out.zhat)
                rows = _pack(expr, out.feat, out.zhat)
            unc = _unc(out, len(bt))
            if cache is not None:
                rows = np.concatenate([rows, unc[:, None]], 1)
                cache.put_many(_keys(slide_key(slide), predictor, grid, bt), rows, code)
            done += len(bt)
            yield _blank_unreadable(PartialResult(
                grid, bt, tile_centres_um(grid, bt), expr, code, done, total, uncertainty=unc
            ), bad)
    if ctx and tok["tiles"]:
        cancel.check()
        at = np.concatenate(tok["tiles"])
        feat = np.concatenate(tok["feat"], 1)
        zhat = np.concatenate(tok["zhat"], 1)
        yx = tile_centres_um(grid, at)
        out = predictor.predict_in_context(
            feat, zhat, yx[:, ::-1], cells=at, tile_um=grid.tile_um, cancel=cancel
        )
        yield _blank_unreadable(PartialResult(
            grid, at, yx, out.expr, out.code, total, total, cached=n_cached, final=True,
            uncertainty=_unc(out, len(at)),
        ), bad)  # fmt: skip


def _unc(out: Any, n: int) -> np.ndarray:
    """A prediction's (n,) float32 uncertainty (NaN when the model gives none)."""
    u = getattr(out, "uncertainty", None)
    return np.full(n, np.nan, np.float32) if u is None else np.asarray(u, np.float32)


def _batches(
    predictor: Predictor,
    btiles: np.ndarray,
    patches: np.ndarray,
    batch_size: int,
    done: int,
    cancel: CancelToken,
    tta: int | None = None,
    tokens: bool = False,
    rate: bool = False,
    given: tuple[np.ndarray, np.ndarray] | None = None,
) -> Iterator[tuple[np.ndarray, Any]]:
    """(cells, prediction) per model batch of one block; the request's very first batch is
    small so the first results show quickly. ``rate`` records the measured tiles/s; ``given``
    the block's tokens of the first transforms (see ``GenSTPredictor.predict``)."""
    s = 0
    while s < len(btiles):
        cancel.check()
        n = batch_size if done > 0 else min(batch_size, max(8, batch_size // 4))
        t0 = time.perf_counter()
        bt = btiles[s : s + n]
        kw: dict[str, Any] = {"tokens": True} if tokens else {}
        if tta is not None:
            kw["tta"] = tta
        if given is not None:
            kw["given"] = (given[0][:, s : s + n], given[1][:, s : s + n])
        out = predictor.predict(patches[s : s + n], **kw)
        s += n
        done += len(bt)
        dt = time.perf_counter() - t0
        if rate and dt > 0 and len(bt) >= 8:
            k = _tp_key(predictor)
            prev = _throughput.get(k)
            r = len(bt) / dt
            _throughput[k] = r if prev is None else 0.7 * prev + 0.3 * r
        yield bt, out


def plan_prediction_region(
    slide: Slide, predictor: Predictor, region_um: Sequence[float], tissue_only: bool = True
) -> tuple[Grid, np.ndarray]:
    """Grid and cells to predict for a world region (x0, y0, x1, y1) µm."""
    grid = slide_grid(slide, tile_um_of(predictor))
    tiles = tiles_in_region(grid, region_um)
    if tissue_only:
        tiles = filter_tissue(slide, grid, tiles)
    return grid, tiles


def plan_roi(
    slide: Slide,
    predictor: Predictor,
    shapes: Sequence[tuple[str, np.ndarray]] | None = None,
    labels: tuple[np.ndarray, Sequence[float], Sequence[float]] | None = None,
    tissue_only: bool = False,
) -> tuple[Grid, np.ndarray]:
    """Grid and cells whose centre falls inside ROI shapes (world µm) or a labels image.

    ``labels`` is ``(array, scale, translate)`` of a labels layer in µm.
    """
    grid = slide_grid(slide, tile_um_of(predictor))
    parts = []
    if shapes:
        parts.append(tiles_in_shapes(grid, shapes))
    if labels is not None:
        arr, scale, translate = labels
        parts.append(tiles_in_labels(grid, arr, scale, translate))
    tiles = np.unique(np.concatenate(parts), axis=0) if parts else np.zeros((0, 2), np.int64)
    if tissue_only:
        tiles = filter_tissue(slide, grid, tiles)
    return grid, tiles


def plan_whole_slide(slide: Slide, predictor: Predictor) -> tuple[Grid, np.ndarray]:
    """Grid and every tissue cell of the slide."""
    grid = slide_grid(slide, tile_um_of(predictor))
    r, c = np.nonzero(_mask(slide, grid))
    return grid, np.stack([r, c], axis=1).astype(np.int64)


def _mask(slide: Slide, grid: Grid) -> np.ndarray:
    return tissue_cells(slide, grid)


def predict_region(
    slide: Slide,
    predictor: Predictor,
    region_um: Sequence[float],
    cancel: CancelToken | None = None,
    batch_size: int = BATCH_SIZE,
    cache: TileCache | None = None,
    tissue_only: bool = True,
) -> Iterator[PartialResult]:
    """Predict the tissue cells overlapping ``region_um`` (x0, y0, x1, y1) µm, centre first."""
    grid, tiles = plan_prediction_region(slide, predictor, region_um, tissue_only)
    x0, y0, x1, y1 = region_um
    yield from predict_tiles(
        slide,
        predictor,
        tiles,
        grid=grid,
        cancel=cancel,
        batch_size=batch_size,
        cache=cache,
        centre_um=((y0 + y1) / 2.0, (x0 + x1) / 2.0),
    )


def predict_roi(
    slide: Slide,
    predictor: Predictor,
    shapes: Sequence[tuple[str, np.ndarray]] | None = None,
    labels: tuple[np.ndarray, Sequence[float], Sequence[float]] | None = None,
    cancel: CancelToken | None = None,
    batch_size: int = BATCH_SIZE,
    cache: TileCache | None = None,
) -> Iterator[PartialResult]:
    """Predict every cell whose centre falls inside the ROI (see :func:`plan_roi`)."""
    grid, tiles = plan_roi(slide, predictor, shapes, labels)
    yield from predict_tiles(
        slide, predictor, tiles, grid=grid, cancel=cancel, batch_size=batch_size, cache=cache
    )


def measure_throughput(slide: Slide, predictor: Predictor, n: int = 32) -> float:
    """Tiles per second of read + predict, measured on ``n`` tissue cells of the slide."""
    grid, tiles = plan_whole_slide(slide, predictor)
    if len(tiles) == 0:
        grid = slide_grid(slide, tile_um_of(predictor))
        tiles = np.array([[0, 0]], dtype=np.int64)
    sel = tiles[np.linspace(0, len(tiles) - 1, min(n, len(tiles))).astype(int)]
    t0 = time.perf_counter()
    for _ in predict_tiles(slide, predictor, sel[:8], grid=grid):  # warm-up
        pass
    t0 = time.perf_counter()
    for _ in predict_tiles(slide, predictor, sel, grid=grid, batch_size=len(sel)):
        pass
    rate = len(sel) / max(time.perf_counter() - t0, 1e-6)
    _throughput[_tp_key(predictor)] = rate
    return rate


def estimate(
    slide: Slide,
    predictor: Predictor,
    tiles: np.ndarray,
    grid: Grid | None = None,
    cache: TileCache | None = None,
    tiles_per_s: float | None = None,
) -> Estimate:
    """Tiles left to compute and seconds, from ``tiles_per_s`` or the last measured rate."""
    grid = grid or slide_grid(slide, tile_um_of(predictor))
    tiles = np.asarray(tiles, dtype=np.int64).reshape(-1, 2)
    cached = 0
    if cache is not None and len(tiles):
        keys = _keys(slide_key(slide), predictor, grid, tiles)
        cached = sum(k in cache for k in keys)
    rate = tiles_per_s or _throughput.get(_tp_key(predictor))
    if rate is None:
        rate = measure_throughput(slide, predictor)
    todo = len(tiles) - cached
    return Estimate(len(tiles), cached, todo / rate, rate)


def collect(results: Iterator[PartialResult]) -> PartialResult | None:
    """Run a prediction generator to the end and concatenate its batches (or return its
    ``final`` result, which covers every tile); ``draft`` results are dropped."""
    parts = [p for p in results if not p.draft]
    if not parts:
        return None
    if parts[-1].final:
        return parts[-1]
    uncs = [p.uncertainty for p in parts]
    return PartialResult(
        parts[0].grid,
        np.concatenate([p.tiles for p in parts]),
        np.concatenate([p.centres_um for p in parts]),
        np.concatenate([p.expr for p in parts]),
        np.concatenate([p.code for p in parts]),
        parts[-1].done,
        parts[-1].total,
        sum(p.cached for p in parts),
        uncertainty=None if any(u is None for u in uncs) else np.concatenate(uncs),
    )
