"""Predict a whole slide (at spots or on a tissue tile grid) and write the h5ad.

``predict_slide`` is what ``stgen predict`` runs and what each ``stgen predict-batch`` task
runs, so the CLI, the cohort runner and the tests share one code path. No napari here;
torch is imported by the predictor only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StgenError
from .confidence import uncertainty_record
from .export import StoreExtras, store_to_anndata, tile_store
from .histotx import DEFAULT_ADAPT_STEPS

SPOT_COLUMNS = ("barcode", "x", "y")


def read_spots_csv(path: str | os.PathLike) -> Any:
    """The spots table (``barcode,x,y`` in level-0 px, extra columns kept) as a DataFrame.

    Raises StgenError naming the file for a missing file, missing columns, non-numeric or
    non-finite coordinates, duplicate barcodes or an empty table.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise StgenError(f"{path}: spots file not found")
    try:
        df = pd.read_csv(path, dtype={"barcode": str})
    except Exception as e:
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


def _region(region_um: Sequence[float] | None) -> tuple[float, float, float, float] | None:
    if region_um is None:
        return None
    r = [float(v) for v in region_um]
    if len(r) != 4 or not np.all(np.isfinite(r)):
        raise StgenError(f"--region needs four finite numbers X0 Y0 X1 Y1 (µm), got {region_um}")
    x0, y0, x1, y1 = r
    if x1 <= x0 or y1 <= y0:
        raise StgenError(f"--region is empty: X1 must exceed X0 and Y1 exceed Y0 (got {r})")
    return (x0, y0, x1, y1)


def open_for_prediction(slide_path: str | os.PathLike, mpp: float | None = None) -> Any:
    """Open a slide and insist on a µm/px (``mpp`` overrides the file's)."""
    from ..io.slide import open_slide

    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise StgenError(f"--mpp must be a positive number of µm per pixel, got {mpp}")
    slide = open_slide(slide_path, mpp=mpp)
    if not slide.mpp:
        slide.close()
        raise StgenError(
            f"{slide_path}: the slide has no µm/px resolution metadata; pass --mpp MPP"
        )
    return slide


def grid_centres(
    slide: Any, tile_um: float, region_um: Sequence[float] | None = None, min_tissue: float = 0.1
) -> tuple[np.ndarray, np.ndarray, Any]:
    """Tissue cells of the slide-global tile grid: (tiles (N, 2) row/col, xy_px (N, 2), Grid).

    Same grid as the Predict widget (anchored at world (0, 0), cells of ``tile_um``), tissue
    from a coarse thumbnail; ``region_um`` (x0, y0, x1, y1) limits it to overlapping cells.
    """
    from .tiles import filter_tissue, slide_grid, tiles_in_region

    grid = slide_grid(slide, tile_um)
    r = _region(region_um)
    if r is None:
        r = (0.0, 0.0, slide.width * slide.mpp, slide.height * slide.mpp)
    tiles = filter_tissue(slide, grid, tiles_in_region(grid, r), min_fraction=min_tissue)
    yx = np.asarray(grid.origin_um) + (tiles + 0.5) * grid.tile_um
    return tiles, yx[:, ::-1] / slide.mpp, grid


def predict_centres(
    slide: Any,
    predictor: Any,
    xy_px: np.ndarray,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    grid: Any = None,
    tiles: np.ndarray | None = None,
    skip_unreadable: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(expr (N, G) float32, code (N,) int64, uncertainty (N,) float32) for patches centred
    on level-0 ``xy_px`` (uncertainty: ``inference/confidence.py``, NaN where none).

    Reads and predicts about ``batch_size`` patches at a time so memory stays bounded. With
    ``grid`` and its cells ``tiles`` (matching ``xy_px``), patches are read block-wise
    (``inference.tiles.read_tiles``: pixel-identical to ``read_patches``, one read a block).
    A model with a spatial context head then predicts each centre from its window of the
    other centres' tokens (``inference.context``). ``skip_unreadable``: rows whose pixels
    cannot be read get NaN expression (``inference.tiles.read_or_skip``) instead of an error.
    """
    from .patches import read_patches
    from .tiles import read_or_skip

    xy = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
    n, g = len(xy), len(predictor.genes)
    expr = np.empty((n, g), dtype=np.float32)
    code = np.empty(n, dtype=np.int64)
    unc = np.full(n, np.nan, dtype=np.float32)
    bs = max(1, int(batch_size))
    if grid is not None and tiles is not None:
        from .tiles import read_tiles, split_blocks

        t = np.asarray(tiles, dtype=np.int64).reshape(-1, 2)
        row_of = {(int(r), int(c)): i for i, (r, c) in enumerate(t)}
        side = max(1, int(np.sqrt(bs)))
        jobs = [
            (np.array([row_of[(int(r), int(c))] for r, c in b]), b)
            for b in split_blocks(t, block=side)
        ]
        read = lambda idx: read_tiles(  # noqa: E731
            slide, grid, t[idx], predictor.patch_px, predictor.patch_um
        )
    else:
        jobs = [(np.arange(i, min(i + bs, n)), None) for i in range(0, n, bs)]
        read = lambda idx: read_patches(  # noqa: E731
            slide, xy[idx], predictor.patch_um, predictor.patch_px
        )
    done = 0
    ctx = bool(getattr(predictor, "has_context", False))
    feat = zhat = None
    bad = np.zeros(n, dtype=bool)
    for job in jobs:
        px = read_or_skip(read, job[0], skip_unreadable, bad, predictor.patch_px)
        out = predictor.predict(px, tokens=True) if ctx else predictor.predict(px)
        expr[job[0]] = np.asarray(out.expr, dtype=np.float32)
        code[job[0]] = np.asarray(out.code, dtype=np.int64)
        if getattr(out, "uncertainty", None) is not None:
            unc[job[0]] = out.uncertainty
        if ctx:
            if feat is None:
                feat = np.empty((out.feat.shape[0], n, out.feat.shape[2]), np.float32)
                zhat = np.empty((out.zhat.shape[0], n, out.zhat.shape[2]), np.float32)
            feat[:, job[0]], zhat[:, job[0]] = out.feat, out.zhat
        done += len(job[0])
        if progress is not None:
            progress(done, n)
    if ctx and n:
        # every site's window of neighbouring sites (spatial context head)
        cells = tiles if grid is not None else None
        tile_um = grid.tile_um if grid is not None else None
        out = predictor.predict_in_context(feat, zhat, xy * slide.mpp, cells=cells, tile_um=tile_um)
        expr, code = out.expr, out.code
        if out.uncertainty is not None:
            unc = np.asarray(out.uncertainty, dtype=np.float32)
    if bad.any():
        expr = np.array(expr, dtype=np.float32)
        expr[bad] = np.nan
        unc = np.array(unc, dtype=np.float32)
        unc[bad] = np.nan
    return expr, code, unc


def _load(model: str, device: str) -> Any:
    from .histotx import load_model  # GenST or HistoTx, by the checkpoint card's kind

    return load_model(model, device=device)


def predict_slide(
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
    batch_size: int = 64,
    predictor: Any = None,
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
    ``predictor`` reuses a loaded GenST model instead of ``load_genst(model, device)``.
    """
    from ..io.anndata import predictions_to_anndata, write_h5ad

    out = Path(out)
    if (spots is None) == (not grid):
        raise StgenError("give exactly one of --spots SPOTS.csv or --grid")
    fmt = output_format(out)
    if fmt == "spatialdata":
        from ..io.spatialdata import require_spatialdata

        require_spatialdata()  # fail before the model when spatialdata is missing
    if out.exists() and not overwrite:
        raise StgenError(f"{out} already exists; pass --overwrite to replace it")
    r = _region(region_um)
    table = read_spots_csv(spots) if spots is not None else None
    with open_for_prediction(slide_path, mpp) as slide:  # bad input fails before the model
        extra: dict[str, Any] = {}
        if table is not None:
            xy = table[["x", "y"]].to_numpy(np.float64)
            if r is not None:
                um = xy * slide.mpp
                keep = (
                    (um[:, 0] >= r[0]) & (um[:, 0] < r[2]) & (um[:, 1] >= r[1]) & (um[:, 1] < r[3])
                )
                table, xy = table[keep].reset_index(drop=True), xy[keep]
            outside = (
                (xy[:, 0] < 0)
                | (xy[:, 1] < 0)
                | (xy[:, 0] >= slide.width)
                | (xy[:, 1] >= slide.height)
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
                    + (" inside --region" if r is not None else "")
                )
            obs_names = table["barcode"].tolist()
            obs = table.drop(columns=["barcode", "x", "y"])
            predictor = predictor or _load(model, device)
            panel = set(predictor.genes)  # keep CSV columns apart from predicted genes
            obs = obs.rename(columns={c: f"{c}_csv" for c in obs.columns if c in panel})
            kind, grid_rec, diam = "spots", None, None
            extra["spots_csv"] = str(Path(spots).resolve())
        else:
            predictor = predictor or _load(model, device)
            from .tiles import tile_um_of

            # the cell a model predicts for (the centre of a multiscale model's context window)
            tiles, xy, g = grid_centres(slide, tile_um_of(predictor), r)
            if len(tiles) == 0:
                raise StgenError(f"{slide_path}: no tissue found" + (" in --region" if r else ""))
            obs_names = [f"tile_{a}_{b}" for a, b in tiles]
            import pandas as pd

            obs = pd.DataFrame({"grid_row": tiles[:, 0], "grid_col": tiles[:, 1]})
            kind, diam = "tiles", float(g.tile_um)
            grid_rec = g.to_record()
        from .histotx import is_histotx, predict_with_measurements

        if is_histotx(predictor):
            res = predict_with_measurements(
                slide,
                predictor,
                xy,
                None if measured is None else str(measured),
                image_only=image_only,
                progress=progress,
                batch=batch_size,
                adapt_steps=adapt_steps,
            )
            expr, code, unc = res.expr, None, None
            extra["histotx"] = res.info
        else:
            if measured is not None:
                raise StgenError("--measured needs a HistoTx model (--model histotx)")
            expr, code, unc = predict_centres(
                slide, predictor, xy, batch_size, progress, *((g, tiles) if grid else (None, None)),
                skip_unreadable=skip_unreadable,
            )  # fmt: skip
        from ..io.validate import check_prediction

        skipped = np.isnan(expr).all(axis=1) if skip_unreadable else None
        check_prediction(expr, str(slide_path), None if skipped is None else ~skipped)
        if skipped is not None:
            obs["unreadable"] = skipped
            extra["n_unreadable"] = int(skipped.sum())
        if code_names is None:
            code_names = {}
        if grid and code is not None:  # GenST tiles: written from a store, as the widgets do
            store = tile_store(g, predictor, slide, tiles, expr, code, unc)
            cols = {c: obs[c].to_numpy() for c in obs.columns if c not in ("grid_row", "grid_col")}
            extras = StoreExtras(uns=extra, obs=cols, region_um=r)
            adata = store_to_anndata(store, slide, predictor, code_names, None, extras)
        else:
            adata = predictions_to_anndata(
                expr,
                predictor.genes,
                xy,
                slide=slide,
                codes=code,
                code_names=code_names or None,
                obs_names=obs_names,
                model=predictor,
                region_um=r,
                obs=obs if len(obs.columns) else None,
                spot_diameter_um=diam,
                obs_kind=kind,
                grid=grid_rec,
                extra_uns=extra or None,
                uncertainty=unc,
                uncertainty_info=uncertainty_record(predictor) if unc is not None else None,
            )
        adata.uns["stgen"]["device"] = str(getattr(predictor, "device", device))
        if fmt == "spatialdata":
            from ..io.spatialdata import export_spatialdata

            return export_spatialdata(adata, out, list(slide.levels), overwrite=overwrite)
    return write_h5ad(adata, out, overwrite=overwrite)


OUTPUT_FORMATS = {".h5ad": "h5ad", ".zarr": "spatialdata"}


def output_format(path: str | os.PathLike) -> str:
    """'h5ad' or 'spatialdata' from the output's suffix (StgenError for anything else)."""
    fmt = OUTPUT_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise StgenError(f"{path}: output must end in .h5ad (AnnData) or .zarr (SpatialData)")
    return fmt


# ----------------------------------------------------------------------------- cohorts
_PREDICTORS: dict[tuple[str, str], Any] = {}
SUMMARY_COLUMNS = ("slide", "status", "n_obs", "seconds", "output", "error")


def _cached_predictor(model: str, device: str) -> Any:
    """One loaded GenST model per (model, device) per worker process."""
    key = (str(model), str(device))
    if key not in _PREDICTORS:
        from .predictor import load_genst

        _PREDICTORS[key] = load_genst(model, device=device)
    return _PREDICTORS[key]


def _predict_in_task(slide: str, out: str, spots: str | None, options: dict, pred: Any) -> Path:
    return predict_slide(
        slide,
        out,
        spots=spots,
        grid=bool(options.get("grid")) and spots is None,
        mpp=options.get("mpp"),
        region_um=options.get("region_um"),
        overwrite=bool(options.get("overwrite")),
        batch_size=int(options.get("batch_size", 64)),
        predictor=pred,
    )


def _n_obs(path: Path) -> int:
    """Rows of a written output (.h5ad or SpatialData .zarr table)."""
    if path.suffix.lower() == ".zarr":
        import zarr

        x = zarr.open(path / "tables" / "table" / "X", mode="r")
        return int(x.shape[0] if hasattr(x, "shape") else x.attrs["shape"][0])
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["X"].shape[0])


def predict_task(slide: str, out: str, spots: str | None, options: dict) -> dict:
    """One cohort task: predict one slide, never raise (the row says what happened)."""
    import time

    t0 = time.perf_counter()
    row = {"slide": slide, "status": "failed", "n_obs": 0, "seconds": 0.0, "output": out}
    try:
        threads = int(options.get("threads") or 0)
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        if spots is None and not options.get("grid"):
            raise StgenError(f"{slide}: no spots CSV found for this slide in --spots-dir")
        import dask

        pred = _cached_predictor(options.get("model", "default"), options.get("device", "auto"))
        # inside a dask.distributed worker, slide reads must not go back to the cluster
        with dask.config.set(scheduler="threads"):
            path = _predict_in_task(slide, out, spots, options, pred)
        row["n_obs"] = _n_obs(Path(path))
        row["status"] = "ok"
        row["error"] = ""
    except Exception as e:  # isolate: one bad slide must not stop the cohort
        msg = str(e) if isinstance(e, StgenError) else f"{type(e).__name__}: {e}"
        row["error"] = " ".join(msg.split())
        row["output"] = ""
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def batch_outputs(
    slides: Sequence[str | os.PathLike], out_dir: str | os.PathLike, ext: str = ".h5ad"
) -> list[Path]:
    """Output path per slide: ``<out_dir>/<stem><ext>`` (``<stem>_2<ext>``... on clashes)."""
    seen: dict[str, int] = {}
    outs = []
    for s in slides:
        stem = Path(s).name.split(".")[0] or "slide"
        k = seen.get(stem, 0) + 1
        seen[stem] = k
        outs.append(Path(out_dir) / (f"{stem}{ext}" if k == 1 else f"{stem}_{k}{ext}"))
    return outs


def find_spots(slide: str | os.PathLike, spots_dir: str | os.PathLike) -> Path | None:
    """``<stem>_spots.csv`` or ``<stem>.csv`` beside the slide's name in ``spots_dir``."""
    stem = Path(slide).name.split(".")[0]
    for name in (f"{stem}_spots.csv", f"{stem}.csv"):
        p = Path(spots_dir) / name
        if p.is_file():
            return p
    return None


def write_summary(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """The per-slide summary as CSV (atomic)."""
    import csv
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(SUMMARY_COLUMNS), extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in SUMMARY_COLUMNS})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def format_summary(rows: Sequence[dict]) -> str:
    """A plain-text table of the rows (slide, status, n_obs, seconds, output or error)."""
    head = ("slide", "status", "n_obs", "seconds", "output / error")
    body = [
        (
            Path(r["slide"]).name,
            r["status"],
            str(r.get("n_obs", "")),
            f"{float(r.get('seconds', 0)):.1f}",
            r.get("error") or str(r.get("output", "")),
        )
        for r in rows
    ]
    widths = [
        max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)
    ]
    widths[-1] = 0
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head).rstrip()]
    lines += [fmt.format(*b).rstrip() for b in body]
    ok = sum(r["status"] == "ok" for r in rows)
    sk = sum(r["status"] == "skipped" for r in rows)
    lines.append(f"{ok} ok, {sk} skipped, {len(rows) - ok - sk} failed")
    return "\n".join(lines)


def run_batch(
    slides: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    grid: bool = False,
    spots_dir: str | os.PathLike | None = None,
    scheduler: str | None = None,
    workers: int = 1,
    processes: bool = True,
    overwrite: bool = False,
    mpp: float | None = None,
    model: str = "default",
    device: str = "auto",
    region_um: Sequence[float] | None = None,
    batch_size: int = 64,
    progress: bool = True,
    fmt: str = "h5ad",
) -> list[dict]:
    """Predict each slide as one dask.distributed task; returns one summary row per slide.

    ``fmt`` 'h5ad' writes ``<stem>.h5ad``, 'spatialdata' ``<stem>.zarr`` (SpatialData).

    Connects to ``scheduler`` (``tcp://host:8786``) or starts a ``LocalCluster`` of
    ``workers`` (processes unless ``processes=False``), one thread each. Slides whose output
    exists are skipped unless ``overwrite``. A failing slide becomes a 'failed' row; the
    others finish. ``summary.csv`` is written to ``out_dir``.
    """
    if (spots_dir is None) == (not grid):
        raise StgenError("give exactly one of --grid or --spots-dir DIR")
    if spots_dir is not None and not Path(spots_dir).is_dir():
        raise StgenError(f"{spots_dir}: --spots-dir is not a directory")
    if not slides:
        raise StgenError("no slides given")
    if workers < 1:
        raise StgenError("--workers must be >= 1")
    _region(region_um)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slides = [str(s) for s in slides]
    exts = {v: k for k, v in OUTPUT_FORMATS.items()}
    if fmt not in exts:
        raise StgenError(f"--format must be one of {sorted(exts)}, got {fmt!r}")
    outs = batch_outputs(slides, out_dir, exts[fmt])
    rows: dict[int, dict] = {}
    todo = []
    for i, (s, o) in enumerate(zip(slides, outs, strict=True)):
        if o.exists() and not overwrite:
            rows[i] = {
                "slide": s,
                "status": "skipped",
                "n_obs": "",
                "seconds": 0.0,
                "output": str(o),
                "error": "",
            }
        else:
            todo.append(i)
    cores = os.cpu_count() or 1
    options = {
        "grid": grid,
        "mpp": mpp,
        "model": model,
        "device": device,
        "region_um": list(region_um) if region_um is not None else None,
        "overwrite": overwrite,
        "batch_size": batch_size,
        "threads": max(1, cores // max(1, workers)) if scheduler is None else 0,
    }
    if todo:
        rows.update(
            _run_distributed(
                slides, outs, todo, spots_dir, options, scheduler, workers, processes, progress
            )
        )
    ordered = [rows[i] for i in range(len(slides))]
    write_summary(ordered, out_dir / "summary.csv")
    return ordered


def _run_distributed(
    slides: list[str],
    outs: list[Path],
    todo: list[int],
    spots_dir: Any,
    options: dict,
    scheduler: str | None,
    workers: int,
    processes: bool,
    progress: bool,
) -> dict[int, dict]:
    import logging

    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as e:
        raise StgenError(
            "predict-batch needs dask.distributed: pip install '.[distributed]' in the checkout"
        ) from e

    cluster = None
    try:
        if scheduler:
            try:
                client = Client(scheduler, timeout="20s")
            except Exception as e:
                raise StgenError(f"cannot connect to scheduler {scheduler}: {e}") from e
        else:
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=processes,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
            client = Client(cluster)
        with client:
            futs = {}
            for i in todo:
                sp = find_spots(slides[i], spots_dir) if spots_dir is not None else None
                f = client.submit(
                    predict_task,
                    str(Path(slides[i]).resolve()) if Path(slides[i]).exists() else slides[i],
                    str(outs[i].resolve()),
                    None if sp is None else str(sp.resolve()),
                    options,
                    pure=False,
                    key=f"stgen-predict-{i}-{Path(slides[i]).name}",
                )
                futs[f] = i
            it = as_completed(list(futs))
            if progress:
                from tqdm import tqdm

                it = tqdm(it, total=len(futs), unit="slide", desc="predict-batch")
            rows: dict[int, dict] = {}
            for f in it:
                i = futs[f]
                try:
                    row = f.result()
                except Exception as e:  # the worker died (e.g. a crash in a decoder)
                    row = {
                        "slide": slides[i],
                        "status": "failed",
                        "n_obs": 0,
                        "seconds": 0.0,
                        "output": "",
                        "error": f"{type(e).__name__}: {e}",
                    }
                row["slide"] = slides[i]
                rows[i] = row
            return rows
    finally:
        if cluster is not None:
            cluster.close()
