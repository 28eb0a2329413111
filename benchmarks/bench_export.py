"""Export speed: 100,000 spots × 250 genes to h5ad (goal ≤ 2 s), against plain anndata, and
100,000 tiles × 250 genes to SpatialData (goal ≤ 3 s and ≤ 2× a bare ``SpatialData.write``).

napari-stgen's export (``predictions_to_anndata`` + atomic ``write_h5ad``: obs ids, codes
and code names, spot diameter, uns provenance, temp file + fsync + rename) is timed against
the peer, a bare ``AnnData(X, obs, var, obsm).write_h5ad`` of the same data, in the same
run; also the napari import (``read_h5ad_layers``) against ``anndata.read_h5ad``. Prints a
table and the ratios. SpatialData: ``export_spatialdata`` (table from the same AnnData, one
square per tile, atomic temp folder + rename) against ``SpatialData.write`` of the very
elements it builds (no building, no rename). Usage:
``python benchmarks/bench_export.py [--spots N] [--genes G]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def best_of(fn, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spots", type=int, default=100_000)
    ap.add_argument("--genes", type=int, default=250)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import anndata as ad
    import pandas as pd

    from napari_stgen.io.anndata import predictions_to_anndata, read_h5ad_layers, write_h5ad

    rng = np.random.default_rng(0)
    n, g = args.spots, args.genes
    expr = rng.gamma(1.0, 1.0, (n, g)).astype(np.float32)
    genes = [f"GENE{i}" for i in range(g)]
    side = int(np.ceil(np.sqrt(n)))
    rc = np.stack(np.divmod(np.arange(n), side), axis=1)
    xy = (rc[:, ::-1] + 0.5) * 163.0  # a 112 µm grid at 0.687 µm/px
    ids = [f"tile_{r}_{c}" for r, c in rc]
    codes = rng.integers(0, 64, n)
    names = {k: f"code {k}" for k in range(64)}

    d = Path(tempfile.mkdtemp(prefix="bench_export_"))
    ours_path, peer_path = d / "ours.h5ad", d / "peer.h5ad"

    def ours() -> None:
        a = predictions_to_anndata(
            expr, genes, xy, codes=codes, code_names=names, obs_names=ids, mpp=0.687,
            obs_kind="tiles", spot_diameter_um=112.0,
        )  # fmt: skip
        write_h5ad(a, ours_path, overwrite=True)

    def peer() -> None:
        a = ad.AnnData(
            X=expr, obs=pd.DataFrame({"code": codes}, index=ids), var=pd.DataFrame(index=genes)
        )
        a.obsm["spatial"] = xy
        a.write_h5ad(peer_path)

    ours()
    peer()  # warm caches / imports
    t_ours = best_of(ours, args.repeat)
    t_peer = best_of(peer, args.repeat)
    t_imp = best_of(lambda: read_h5ad_layers(ours_path), args.repeat)
    t_read = best_of(lambda: ad.read_h5ad(peer_path), args.repeat)
    size = os.path.getsize(ours_path) / 2**20
    t_sd, t_sd_peer = bench_spatialdata(expr, genes, xy, ids, codes, names, side, d, args.repeat)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, no GPU used")
    print(f"data: {n:,} spots × {g} genes (float32, {expr.nbytes / 2**20:.0f} MiB), "
          f"file {size:.0f} MiB")  # fmt: skip
    print(f"{'step':<40}{'napari-stgen':>14}{'peer':>10}{'ratio':>8}")
    print(f"{'export (build + atomic write)':<40}{t_ours:>13.3f}s{t_peer:>9.3f}s"
          f"{t_ours / t_peer:>8.2f}")  # fmt: skip
    print(f"{'import (napari layers / read_h5ad)':<40}{t_imp:>13.3f}s{t_read:>9.3f}s"
          f"{t_imp / t_read:>8.2f}")  # fmt: skip
    if t_sd is not None:
        print(f"{'SpatialData export (build + atomic write)':<40}{t_sd:>13.3f}s{t_sd_peer:>9.3f}s"
              f"{t_sd / t_sd_peer:>8.2f}")  # fmt: skip
    print(f"goal export <= 2 s: {'met' if t_ours <= 2.0 else 'NOT met'} ({t_ours:.3f} s)")
    if t_sd is not None:
        ok = t_sd <= 3.0 and t_sd <= 2 * t_sd_peer
        print(f"goal SpatialData <= 3 s and <= 2x peer: {'met' if ok else 'NOT met'} "
              f"({t_sd:.3f} s, {t_sd / t_sd_peer:.2f}x)")  # fmt: skip
    for p in (ours_path, peer_path):
        p.unlink(missing_ok=True)
    d.rmdir()


def bench_spatialdata(expr, genes, xy, ids, codes, names, side, d: Path, repeat: int):
    """(ours, peer) seconds for the SpatialData export of the same tiles (None without it)."""
    try:
        import spatialdata  # noqa: F401
    except ImportError:
        print("spatialdata not installed: SpatialData rows skipped")
        return None, None
    import shutil
    import warnings

    from napari_stgen.io.anndata import predictions_to_anndata
    from napari_stgen.io.spatialdata import anndata_to_spatialdata, export_spatialdata

    grid = {"origin_yx_um": np.zeros(2), "tile_um": 112.0, "shape": np.array([side, side])}
    a = predictions_to_anndata(
        expr, genes, xy, codes=codes, code_names=names, obs_names=ids, mpp=0.687,
        obs_kind="tiles", spot_diameter_um=112.0, grid=grid,
    )  # fmt: skip
    built = anndata_to_spatialdata(a)
    runs = iter(range(10**6))  # a fresh output each run: no overwrite, no rmtree in the timing

    def ours() -> None:
        export_spatialdata(a, d / f"ours{next(runs)}.zarr")

    def peer() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built.write(d / f"peer{next(runs)}.zarr")

    ours()
    peer()
    t = best_of(ours, repeat), best_of(peer, repeat)
    for p in d.glob("*.zarr"):
        shutil.rmtree(p)
    return t


if __name__ == "__main__":
    main()
