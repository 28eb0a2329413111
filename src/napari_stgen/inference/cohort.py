"""``stgen predict-batch``: one ``predict_slide`` task per slide on dask.distributed.

Each worker process loads a model once (``inference.registry``); a failing slide becomes a
'failed' row of the summary and the others finish. Error messages name the parameters
(``spots_dir=``, ``workers=``, ...); the CLI maps them to its flags.
"""

from __future__ import annotations

import csv
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import dask
import h5py
from tqdm import tqdm

from napari_stgen.errors import StgenError
from napari_stgen.inference.batch import OUTPUT_FORMATS, check_region, predict_slide
from napari_stgen.inference.contract import BATCH_SIZE, Predictor
from napari_stgen.inference.registry import load_predictor

_PREDICTORS: dict[tuple[str, str], Predictor] = {}
SUMMARY_COLUMNS = ("slide", "status", "n_obs", "seconds", "output", "error")


def _cached_predictor(model: str, device: str) -> Predictor:
    """One loaded model per (model, device) per worker process."""
    key = (str(model), str(device))
    if key not in _PREDICTORS:
        _PREDICTORS[key] = load_predictor(model, device=device)
    return _PREDICTORS[key]


def _predict_in_task(
    slide: str, out: str, spots: str | None, options: dict, pred: Predictor
) -> Path:
    return predict_slide(
        slide,
        out,
        spots=spots,
        grid=bool(options.get("grid")) and spots is None,
        mpp=options.get("mpp"),
        region_um=options.get("region_um"),
        overwrite=bool(options.get("overwrite")),
        batch_size=int(options.get("batch_size", BATCH_SIZE)),
        predictor=pred,
    )


def _n_obs(path: Path) -> int:
    """Rows of a written output (.h5ad or SpatialData .zarr table)."""
    if path.suffix.lower() == ".zarr":
        import zarr

        x = zarr.open(path / "tables" / "table" / "X", mode="r")
        return int(x.shape[0] if hasattr(x, "shape") else x.attrs["shape"][0])
    with h5py.File(path, "r") as f:
        return int(f["X"].shape[0])


def predict_task(slide: str, out: str, spots: str | None, options: dict) -> dict:
    """One cohort task: predict one slide, never raise (the row says what happened)."""
    t0 = time.perf_counter()
    row = {"slide": slide, "status": "failed", "n_obs": 0, "seconds": 0.0, "output": out}
    try:
        threads = int(options.get("threads") or 0)
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        if spots is None and not options.get("grid"):
            raise StgenError(f"{slide}: no spots CSV found for this slide in spots_dir=")

        pred = _cached_predictor(options.get("model", "default"), options.get("device", "auto"))
        # inside a dask.distributed worker, slide reads must not go back to the cluster
        with dask.config.set(scheduler="threads"):
            path = _predict_in_task(slide, out, spots, options, pred)
        row["n_obs"] = _n_obs(Path(path))
        row["status"] = "ok"
        row["error"] = ""
    except Exception as e:  # noqa: BLE001 - isolate: one bad slide must not stop the cohort
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


# PLR0913 allowed: the keyword API of ``stgen predict-batch`` (tests and scripts call it by
# keyword); the options travel to the workers as one dict
def run_batch(  # noqa: PLR0913
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
    batch_size: int = BATCH_SIZE,
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
        raise StgenError("give exactly one of grid=True or spots_dir= (a folder of spots CSVs)")
    if spots_dir is not None and not Path(spots_dir).is_dir():
        raise StgenError(f"{spots_dir}: spots_dir= is not a directory")
    if not slides:
        raise StgenError("no slides given")
    if workers < 1:
        raise StgenError("workers= must be >= 1")
    check_region(region_um)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slides = [str(s) for s in slides]
    exts = {v: k for k, v in OUTPUT_FORMATS.items()}
    if fmt not in exts:
        raise StgenError(f"fmt= must be one of {sorted(exts)}, got {fmt!r}")
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
    spots_dir: str | os.PathLike | None,
    options: dict,
    scheduler: str | None,
    workers: int,
    processes: bool,
    progress: bool,
) -> dict[int, dict]:
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
            except Exception as e:  # distributed raises several types for a bad address
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
                it = tqdm(it, total=len(futs), unit="slide", desc="predict-batch")
            rows: dict[int, dict] = {}
            for f in it:
                i = futs[f]
                try:
                    row = f.result()
                except Exception as e:  # noqa: BLE001 - the worker died (e.g. a decoder crash)
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
