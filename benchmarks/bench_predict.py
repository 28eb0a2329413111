"""Benchmark: visible-region prediction latency, Qt event-loop stalls, pan/zoom soak.

Run under a display (``xvfb-run -a python3 benchmarks/bench_predict.py``). Parts:

1. latency: a 1920×1080 viewport at the model's grid resolution (1 µm per screen pixel,
   i.e. 1920×1080 µm ≈ 17×10 cells of 112 µm) on the sample slide; the engine (one block
   read, batched model calls) against the naive loop a user would write (read each tile
   with ``read_patches``, predict one at a time), same tiles, same run; prints the ratio.
   Also the time to the first batch and a cached re-visit (panning back).
2. stall: the Predict widget in a viewer predicting that viewport while a 5 ms QTimer
   heartbeat measures the longest gap of the Qt event loop.
3. soak: N scripted pan/zoom moves with live prediction on (debounced); resident memory
   growth after warm-up and Python/OS thread counts after the viewer closes.

Options: --threads (torch threads, default 2), --moves (default 1000), --skip-soak, --model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import threading
import time

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def os_threads() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return -1


def viewport_region(slide, pred, w_px=1920, h_px=1080):
    """1920×1080 screen px at 1 µm/px (the 112 µm grid drawn at ~112 px per cell), on tissue."""
    from napari_stgen.inference import engine

    grid, tissue = engine.plan_whole_slide(slide, pred)
    cy, cx = np.median(tissue, axis=0) * grid.tile_um
    return (cx - w_px / 2, cy - h_px / 2, cx + w_px / 2, cy + h_px / 2)


def bench_latency(slide, pred, region, repeats=3, naive_tiles=None):
    from napari_stgen.inference import engine
    from napari_stgen.inference.cache import TileCache
    from napari_stgen.inference.patches import read_patches

    out = {}
    for tissue_only in (False, True):
        grid, tiles = engine.plan_prediction_region(slide, pred, region, tissue_only=tissue_only)
        times, first = [], []
        for _ in range(repeats):
            cache = TileCache()
            t0 = time.perf_counter()
            gen = engine.predict_tiles(
                slide,
                pred,
                tiles,
                grid=grid,
                cache=cache,
                centre_um=((region[1] + region[3]) / 2, (region[0] + region[2]) / 2),
            )
            next(gen)
            first.append(time.perf_counter() - t0)
            for _ in gen:
                pass
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine.collect(engine.predict_tiles(slide, pred, tiles, grid=grid, cache=cache))
        cached = time.perf_counter() - t0
        key = "tissue_only" if tissue_only else "all_tiles"
        out[key] = {
            "tiles": int(len(tiles)),
            "engine_s": statistics.median(times),
            "first_batch_s": statistics.median(first),
            "cached_revisit_s": cached,
        }
    # naive loop: read each tile, predict it alone (on every tile, or an evenly spread subset
    # of naive_tiles of them, timed per tile and scaled to the viewport)
    grid, tiles = engine.plan_prediction_region(slide, pred, region, tissue_only=False)
    if naive_tiles and naive_tiles < len(tiles):
        tiles_n = tiles[np.linspace(0, len(tiles) - 1, naive_tiles).round().astype(int)]
    else:
        tiles_n = tiles
    xy = (tiles_n + 0.5)[:, ::-1] * grid.tile_um / slide.mpp
    t0 = time.perf_counter()
    for p in xy:
        patch = read_patches(slide, p[None], pred.patch_um, pred.patch_px)
        pred.predict(patch)
    per_tile = (time.perf_counter() - t0) / len(xy)
    out["naive_tiles_timed"] = int(len(xy))
    out["naive_per_tile_s"] = per_tile
    out["naive_all_tiles_s"] = per_tile * len(tiles)
    out["engine_per_tile_s"] = out["all_tiles"]["engine_s"] / len(tiles)
    out["speedup_vs_naive"] = out["naive_all_tiles_s"] / out["all_tiles"]["engine_s"]
    return out


def _process(app, seconds):
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        app.processEvents()
        time.sleep(0.002)


def bench_gui(slide_path, n_moves, do_soak, dask_cache_mb=None, live=True):
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_stgen.inference.cache import default_cache
    from napari_stgen.widgets.predict import camera_of

    viewer = napari.Viewer(show=True)
    viewer.open(str(slide_path), plugin="napari-stgen")
    if dask_cache_mb is not None:
        # napari caches computed dask chunks (25 % of RAM by default) while you browse: bound
        # it to tell napari's cache from growth of our own
        from napari.utils import resize_dask_cache

        resize_dask_cache(int(dask_cache_mb * 2**20))  # after adding the dask layer, which
        # resizes napari's cache to its default
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-stgen", "Predict expression")
    app = QApplication.instance()

    def wait_idle(timeout=600):
        t0 = time.perf_counter()
        while widget.workers and time.perf_counter() - t0 < timeout:
            app.processEvents()
            time.sleep(0.002)

    wait_idle()
    st = widget.state
    slide = st.set_slide_layer(viewer.layers[0])
    pred = st.predictor()
    x0, y0, x1, y1 = viewport_region(slide, pred)
    cam = camera_of(viewer)
    _process(app, 0.5)
    h, w = viewer.canvas.size
    cam.center = ((y0 + y1) / 2, (x0 + x1) / 2)
    cam.zoom = min(w / (x1 - x0), h / (y1 - y0))  # whole 1920×1080 µm viewport on screen
    _process(app, 0.5)
    default_cache().clear()

    # heartbeat: the largest gap between 5 ms timer ticks while the worker runs
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(5)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    _process(app, 0.3)
    # peer in the same run: the same heartbeat with nothing predicting (machine noise)
    ticks.clear()
    _process(app, 3.0)
    idle_gaps = np.diff(ticks) if len(ticks) > 1 else np.array([np.nan])
    ticks.clear()
    t0 = time.perf_counter()
    widget.predict()
    wait_idle()
    gui_latency = time.perf_counter() - t0
    timer.stop()
    gaps = np.diff(ticks) if len(ticks) > 1 else np.array([np.nan])
    gui = {
        "tiles": len(st.store),
        "widget_latency_s": gui_latency,
        "max_event_loop_stall_ms": float(np.max(gaps) * 1000),
        "idle_max_gap_ms": float(np.max(idle_gaps) * 1000),
        "idle_p99_gap_ms": float(np.percentile(idle_gaps, 99) * 1000),
        "p99_gap_ms": float(np.percentile(gaps, 99) * 1000),
        "heartbeats": len(ticks),
    }
    soak = None
    if do_soak:
        soak = _soak(app, viewer, widget, slide, pred, n_moves, wait_idle, live)
    py_before, os_before = threading.active_count(), os_threads()
    viewer.close()
    _process(app, 1.0)
    from qtpy.QtCore import QThreadPool

    QThreadPool.globalInstance().waitForDone(30_000)
    gc.collect()
    _process(app, 0.5)
    py_closed, os_closed = threading.active_count(), os_threads()
    _process(app, 35.0)  # Qt expires idle pool threads after 30 s
    gui["after_close"] = {
        "python_threads_just_after_close": py_closed,
        "os_threads_just_after_close": os_closed,
        "qt_pool_active": QThreadPool.globalInstance().activeThreadCount(),
        "python_threads_before_close": py_before,
        "python_threads_35s_after_close": threading.active_count(),
        "os_threads_before_close": os_before,
        "os_threads_35s_after_close": os_threads(),
    }
    return gui, soak


def _soak(app, viewer, widget, slide, pred, n_moves, wait_idle, live=True):
    from napari_stgen.widgets.predict import camera_of

    cam = camera_of(viewer)
    rng = np.random.default_rng(0)
    from napari_stgen.inference import engine

    grid, tissue = engine.plan_whole_slide(slide, pred)
    cells = tissue[rng.integers(0, len(tissue), n_moves)]
    widget.live_check.setChecked(live)
    h, w = viewer.canvas.size
    zooms = rng.uniform(w / 4000.0, w / 700.0, n_moves)  # 0.7–4 mm across the canvas
    rss0 = None
    t0 = time.perf_counter()
    started = 0
    for i in range(n_moves):
        cy, cx = (cells[i] + 0.5) * grid.tile_um
        # a move = pan + zoom; most moves come faster than the 300 ms debounce (no request),
        # every 10th settles so live prediction runs (and the next move may cancel it)
        cam.center = (cy, cx)
        cam.zoom = float(zooms[i])
        n_before = len(widget.workers)
        _process(app, 0.35 if i % 10 == 9 else 0.02)
        started += len(widget.workers) > n_before
        if i == max(1, min(100, n_moves // 5)):
            wait_idle()
            gc.collect()
            rss0 = rss_mb()
    wait_idle()
    widget.live_check.setChecked(False)
    gc.collect()
    rss1 = rss_mb()
    return {
        "moves": n_moves,
        "seconds": time.perf_counter() - t0,
        "predictions_started": started,
        "tiles_in_store": len(widget.state.store),
        "rss_after_warmup_mb": rss0,
        "rss_end_mb": rss1,
        "rss_growth_mb": rss1 - (rss0 or rss1),
    }


def print_latency(lat: dict) -> None:
    print(
        f"viewport 1920x1080 µm: {lat['all_tiles']['tiles']} tiles "
        f"({lat['tissue_only']['tiles']} tissue)"
    )
    print(
        f"engine {lat['all_tiles']['engine_s']:.2f} s, naive loop "
        f"{lat['naive_all_tiles_s']:.2f} s ({lat['naive_tiles_timed']} tiles timed) -> "
        f"{lat['speedup_vs_naive']:.1f}x faster"
    )
    print(
        f"tissue-only {lat['tissue_only']['engine_s']:.2f} s, first batch "
        f"{lat['tissue_only']['first_batch_s']:.2f} s, cached revisit "
        f"{lat['tissue_only']['cached_revisit_s'] * 1000:.1f} ms"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--moves", type=int, default=1000)
    ap.add_argument("--skip-soak", action="store_true")
    ap.add_argument("--skip-gui", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--no-live", action="store_true", help="soak without live prediction (peer)")
    ap.add_argument(
        "--napari-dask-cache-mb",
        type=float,
        default=None,
        help="resize napari's opportunistic dask chunk cache (0 = off); default: napari's",
    )
    ap.add_argument("--model", default="default")
    ap.add_argument("--repeats", type=int, default=3, help="engine runs (median)")
    ap.add_argument(
        "--naive-tiles",
        type=int,
        default=0,
        help="time the naive loop on this many tiles (0 = all) and scale",
    )
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from napari_stgen.inference.device import describe_device
    from napari_stgen.inference.predictor import load_genst
    from napari_stgen.io.sample import sample_slide_path
    from napari_stgen.io.slide import open_slide

    pred = load_genst(args.model)
    slide = open_slide(sample_slide_path())
    region = viewport_region(slide, pred)
    pred.predict(np.full((8, pred.patch_px, pred.patch_px, 3), 200, np.uint8))  # warm-up
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": describe_device(pred.device),
            "gpu": torch.cuda.is_available(),
            "load_avg_1min": os.getloadavg()[0],
            "python": platform.python_version(),
        },
        "model": {
            "name": pred.name,
            "patch_um": pred.patch_um,
            "patch_px": pred.patch_px,
            "tta": getattr(pred, "tta", None),
        },
        "viewport_um": [round(v, 1) for v in region],
    }
    if not args.skip_latency:
        report["latency"] = bench_latency(slide, pred, region, args.repeats, args.naive_tiles)
        print_latency(report["latency"])
    if not args.skip_gui:
        gui, soak = bench_gui(
            sample_slide_path(),
            args.moves,
            not args.skip_soak,
            args.napari_dask_cache_mb,
            not args.no_live,
        )
        report["napari_dask_cache_mb"] = args.napari_dask_cache_mb
        report["gui"], report["soak"] = gui, soak
        print(
            f"widget: {gui['tiles']} tiles in {gui['widget_latency_s']:.2f} s, longest "
            f"event-loop stall {gui['max_event_loop_stall_ms']:.0f} ms (same heartbeat, "
            f"idle, same run: {gui['idle_max_gap_ms']:.0f} ms)"
        )
        if soak:
            print(f"soak: {soak['moves']} moves, RSS growth {soak['rss_growth_mb']:.1f} MB")
        print(f"after close: {gui['after_close']}")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
