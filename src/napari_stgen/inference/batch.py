"""Predict a whole slide (at spots or on a tissue tile grid) and write the h5ad.

``predict_slide`` is what ``stgen predict`` runs and what each ``stgen predict-batch`` task
runs (``inference.cohort``), so the CLI, the cohort runner and the tests share one code
path; the predictor (``inference.registry``) computes the spots (``Predictor.predict_spots``).
No napari here; torch is imported by the predictor only. Error messages name the
parameters (``region_um``, ``overwrite=True``, ...); the CLI maps them to its flags.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_stgen.coords import Grid
from napari_stgen.errors import StgenError
from napari_stgen.inference.confidence import uncertainty_record
from napari_stgen.inference.contract import BATCH_SIZE, DEFAULT_ADAPT_STEPS, Predictor, SpotRequest
from napari_stgen.inference.export import StoreExtras, store_to_anndata, tile_store
from napari_stgen.inference.registry import load_predictor
from napari_stgen.inference.tiles import filter_tissue, slide_grid, tile_um_of, tiles_in_region
from napari_stgen.io.anndata import predictions_to_anndata, write_h5ad
from napari_stgen.io.slide import Slide, open_slide
from napari_stgen.io.spatialdata import export_spatialdata, require_spatialdata
from napari_stgen.io.validate import check_prediction

SPOT_COLUMNS = ("barcode", "x", "y")


def read_spots_csv(path: str | os.PathLike) -> pd.DataFrame:
    """The spots table (``barcode,x,y`` in level-0 px, extra columns kept) as a DataFrame.

    Raises StgenError naming the file for a missing file, missing columns, non-numeric or
    non-finite coordinates, duplicate barcodes or an empty table.
    """
    path = Path(path)
    if not path.is_file():
        raise StgenError(f"{path}: spots file not found")
    try:
        df = pd.read_csv(path, dtype={"barcode": str})
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise StgenError(f"{path}: not a readable CSV ({e})") from e
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in SPOT_COLUMNS if c not in df.columns]
    if missing:
        raise StgenError(
            f"{path}: missing column(s) {', '.join(missing)} (need barcode,x,y in level-0 px)"
        )
    if len(df) == 0:
        raise StgenError(f"{path}: no spots")
    for c in ("x", "y"):
        v = pd.to_numeric(df[c], errors="coerce")
        if v.isna().any() or not np.isfinite(v.to_numpy(np.float64)).all():
            bad = int(np.flatnonzero(v.isna().to_numpy() | ~np.isfinite(v.to_numpy()))[0])
            raise StgenError(f"{path}: column {c!r} is not numeric at row {bad + 2}")
        df[c] = v.astype(np.float64)
    df["barcode"] = df["barcode"].astype(str)
    if df["barcode"].duplicated().any():
        dup = df["barcode"][df["barcode"].duplicated()].iloc[0]
        raise StgenError(f"{path}: duplicate barcode {dup!r}")
    return df


def check_region(region_um: Sequence[float] | None) -> tuple[float, float, float, float] | None:
    """``region_um`` (x0, y0, x1, y1) µm as four floats (None stays None); StgenError when
    it is not four finite numbers or is empty."""
    if region_um is None:
        return None
    r = [float(v) for v in region_um]
    if len(r) != 4 or not np.all(np.isfinite(r)):
        raise StgenError(f"region_um needs four finite numbers x0 y0 x1 y1 (µm), got {region_um}")
    x0, y0, x1, y1 = r
    if x1 <= x0 or y1 <= y0:
        raise StgenError(f"region_um is empty: x1 must exceed x0 and y1 exceed y0 (got {r})")
    return (x0, y0, x1, y1)


def open_for_prediction(slide_path: str | os.PathLike, mpp: float | None = None) -> Slide:
    """Open a slide and insist on a µm/px (``mpp`` overrides the file's)."""
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise StgenError(f"mpp= must be a positive number of µm per pixel, got {mpp}")
    slide = open_slide(slide_path, mpp=mpp)
    if not slide.mpp:
        slide.close()
        raise StgenError(
            f"{slide_path}: the slide has no µm/px resolution metadata; pass mpp= (µm/px)"
        )
    return slide


def grid_centres(
    slide: Slide, tile_um: float, region_um: Sequence[float] | None = None, min_tissue: float = 0.1
) -> tuple[np.ndarray, np.ndarray, Grid]:
    """Tissue cells of the slide-global tile grid: (tiles (N, 2) row/col, xy_px (N, 2), Grid).

    Same grid as the Predict widget (anchored at world (0, 0), cells of ``tile_um``), tissue
    from a coarse thumbnail; ``region_um`` (x0, y0, x1, y1) limits it to overlapping cells.
    """
    grid = slide_grid(slide, tile_um)
    r = check_region(region_um)
    if r is None:
        r = (0.0, 0.0, slide.width * slide.mpp, slide.height * slide.mpp)
    tiles = filter_tissue(slide, grid, tiles_in_region(grid, r), min_fraction=min_tissue)
    yx = np.asarray(grid.origin_um) + (tiles + 0.5) * grid.tile_um
    return tiles, yx[:, ::-1] / slide.mpp, grid


def _spot_rows(
    table: pd.DataFrame, slide: Slide, r: tuple | None, spots: Any
) -> tuple[pd.DataFrame, np.ndarray]:
    """The spots of ``table`` inside ``r`` (µm) and their level-0 (x, y); StgenError when
    some or all lie off the slide."""
    xy = table[["x", "y"]].to_numpy(np.float64)
    if r is not None:
        um = xy * slide.mpp
        keep = (um[:, 0] >= r[0]) & (um[:, 0] < r[2]) & (um[:, 1] >= r[1]) & (um[:, 1] < r[3])
        table, xy = table[keep].reset_index(drop=True), xy[keep]
    outside = (
        (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= slide.width) | (xy[:, 1] >= slide.height)
    )
    if outside.any() and not outside.all():
        i = int(np.flatnonzero(outside)[0])
        raise StgenError(
            f"{spots}: {int(outside.sum())} spots lie off the slide ({slide.width}×"
            f"{slide.height} px), e.g. {table['barcode'][i]!r} at {xy[i].tolist()}"
        )
    if outside.all():
        raise StgenError(
            f"{spots}: no spot lies on the slide ({slide.width}×{slide.height} px)"
            + (" inside region_um" if r is not None else "")
        )
    return table, xy


def _rows(
    slide: Slide, predictor: Predictor, table: pd.DataFrame | None, r: tuple | None, where: Any
) -> dict[str, Any]:
    """What the AnnData's rows are: the spots of ``table`` (already inside ``r``), else the
    tissue cells of the grid inside ``r``."""
    if table is not None:
        xy = table[["x", "y"]].to_numpy(np.float64)
        obs = table.drop(columns=["barcode", "x", "y"])
        panel = set(predictor.genes)  # keep CSV columns apart from predicted genes
        obs = obs.rename(columns={c: f"{c}_csv" for c in obs.columns if c in panel})
        return dict(xy=xy, obs_names=table["barcode"].tolist(), obs=obs, kind="spots",
                    grid=None, tiles=None, grid_rec=None, diam=None)  # fmt: skip
    # the cell a model predicts for (the centre of a multiscale model's context window)
    tiles, xy, g = grid_centres(slide, tile_um_of(predictor), r)
    if len(tiles) == 0:
        raise StgenError(f"{where}: no tissue found" + (" in region_um" if r else ""))
    grid_rec = g.to_record()
    obs = pd.DataFrame({"grid_row": tiles[:, 0], "grid_col": tiles[:, 1]})
    return dict(xy=xy, obs_names=[f"tile_{a}_{b}" for a, b in tiles], obs=obs, kind="tiles",
                grid=g, tiles=tiles, grid_rec=grid_rec, diam=float(g.tile_um))  # fmt: skip


# PLR0913 allowed: the keyword API of ``stgen predict`` (tests, scripts and cohorts call it
# by keyword); a request object would only rename the same fields
def predict_slide(  # noqa: PLR0913
    slide_path: str | os.PathLike,
    out: str | os.PathLike,
    spots: str | os.PathLike | None = None,
    grid: bool = False,
    *,
    mpp: float | None = None,
    model: str = "default",
    region_um: Sequence[float] | None = None,
    device: str = "auto",
    overwrite: bool = False,
    batch_size: int = BATCH_SIZE,
    predictor: Predictor | None = None,
    code_names: dict[int, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    measured: str | os.PathLike | None = None,
    image_only: bool = False,
    adapt_steps: int = DEFAULT_ADAPT_STEPS,
    skip_unreadable: bool = False,
) -> Path:
    """Predict expression over a slide and write ``out``; returns its path.

    ``out`` ends in ``.h5ad`` (AnnData, Visium layout) or ``.zarr`` (SpatialData: slide image,
    spot circles / tile squares and the same AnnData as the table; ``io/spatialdata.py``).

    Exactly one of ``spots`` (CSV ``barcode,x,y`` level-0 px; extra columns go to ``obs``,
    renamed ``<col>_csv`` when they clash with a gene) or ``grid`` (tissue cells of the
    model-patch grid). ``region_um`` (x0, y0, x1, y1) keeps spots / cells inside it.
    ``predictor`` reuses a loaded model instead of ``load_predictor(model, device)``;
    ``measured`` / ``image_only`` / ``adapt_steps``: HistoTx (``SpotRequest``).
    """
    out = Path(out)
    if (spots is None) == (not grid):
        raise StgenError("give exactly one of spots= (a CSV of barcode,x,y) or grid=True")
    fmt = output_format(out)
    if fmt == "spatialdata":
        require_spatialdata()  # fail before the model when spatialdata is missing
    if out.exists() and not overwrite:
        raise StgenError(f"{out} already exists; pass overwrite=True to replace it")
    r = check_region(region_um)
    table = read_spots_csv(spots) if spots is not None else None
    with open_for_prediction(slide_path, mpp) as slide:  # bad input fails before the model
        if table is not None:
            table, _ = _spot_rows(table, slide, r, spots)
        predictor = predictor or load_predictor(model, device=device)
        rows = _rows(slide, predictor, table, r, slide_path)
        request = SpotRequest(
            batch_size=batch_size,
            progress=progress,
            grid=rows["grid"],
            tiles=rows["tiles"],
            skip_unreadable=skip_unreadable,
            measured=measured,
            image_only=image_only,
            adapt_steps=adapt_steps,
        )
        res = predictor.predict_spots(slide, rows["xy"], request)
        extra: dict[str, Any] = {}
        if table is not None:
            extra["spots_csv"] = str(Path(spots).resolve())
        extra.update(res.info)
        obs = rows["obs"]
        skipped = np.isnan(res.expr).all(axis=1) if skip_unreadable else None
        check_prediction(res.expr, str(slide_path), None if skipped is None else ~skipped)
        if skipped is not None:
            obs["unreadable"] = skipped
            extra["n_unreadable"] = int(skipped.sum())
        unc = res.uncertainty
        if code_names is None:
            code_names = {}
        if grid and res.code is not None:  # GenST tiles: written from a store, as the widgets do
            store = tile_store(
                rows["grid"], predictor, slide, rows["tiles"], res.expr, res.code, unc
            )
            cols = {c: obs[c].to_numpy() for c in obs.columns if c not in ("grid_row", "grid_col")}
            extras = StoreExtras(uns=extra, obs=cols, region_um=r)
            adata = store_to_anndata(store, slide, predictor, code_names, None, extras)
        else:
            adata = predictions_to_anndata(
                res.expr,
                predictor.genes,
                rows["xy"],
                slide=slide,
                codes=res.code,
                code_names=code_names or None,
                obs_names=rows["obs_names"],
                model=predictor,
                region_um=r,
                obs=obs if len(obs.columns) else None,
                spot_diameter_um=rows["diam"],
                obs_kind=rows["kind"],
                grid=rows["grid_rec"],
                extra_uns=extra or None,
                uncertainty=unc,
                uncertainty_info=uncertainty_record(predictor) if unc is not None else None,
            )
        adata.uns["stgen"]["device"] = str(getattr(predictor, "device", device))
        if fmt == "spatialdata":
            return export_spatialdata(adata, out, list(slide.levels), overwrite=overwrite)
    return write_h5ad(adata, out, overwrite=overwrite)


OUTPUT_FORMATS = {".h5ad": "h5ad", ".zarr": "spatialdata"}


def output_format(path: str | os.PathLike) -> str:
    """'h5ad' or 'spatialdata' from the output's suffix (StgenError for anything else)."""
    fmt = OUTPUT_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise StgenError(f"{path}: output must end in .h5ad (AnnData) or .zarr (SpatialData)")
    return fmt
