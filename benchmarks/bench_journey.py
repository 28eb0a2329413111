"""Benchmark: the user journey of tests/test_journey.py with the shipped models, timed.

    xvfb-run -a -s "-screen 0 1920x1200x24" nice -n 10 python benchmarks/bench_journey.py

One real napari viewer on the bundled sample (HER2ST C3), the shipped GenST and STMDiT, the
widgets' default thread policy. Measured, with the machine's load average before and after:

- the longest Qt event-loop gap while opening each widget (a 5 ms timer on the UI thread;
  target ≤ 200 ms) and while panning the camera during a prediction, against the same pans
  with no prediction in the same run (target ≤ 1.5×);
- a view of ≈ 180 tissue tiles, cold cache: time to the first heatmap values, to every tile of
  the view shown (quick look, no TTA) and to the full-quality result (targets ≤ 1 s and
  ≤ 2.5 s), against the same view predicted without the quick look (the peer);
- one synthesized tile in the widget (card's steps) against ``stgen synthesize`` on the same
  tile in a subprocess of the same run (target ≤ 1.5×).

Prints JSON (also written to --out).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


class GapMonitor:
    """Longest interval between ticks of a 5 ms timer on the UI thread (event-loop freezes)."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.ticks: list[float] = []
        self.timer = QTimer()
        self.timer.setInterval(5)
        self.timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))

    def start(self) -> None:
        self.ticks = [time.perf_counter()]
        self.timer.start()

    def stop(self) -> float:
        """Stop; the longest gap in ms."""
        self.timer.stop()
        self.ticks.append(time.perf_counter())
        return float(np.max(np.diff(self.ticks)) * 1000.0) if len(self.ticks) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:  # noqa: C901 - the journey, step by step
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--view-tiles", type=int, default=180, help="tissue tiles in the view")
    args = ap.parse_args(argv)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_stgen.inference import engine
    from napari_stgen.inference.cache import default_cache
    from napari_stgen.inference.device import default_threads, usable_cores
    from napari_stgen.widgets.predict import camera_of

    res: dict = {
        "machine": f"{platform.machine()}, {usable_cores()} usable CPU cores, no GPU, "
        "Mesa llvmpipe under Xvfb",
        "load_avg_before": [round(v, 2) for v in os.getloadavg()],
        "torch_threads_policy": default_threads(),
    }
    app = QApplication.instance() or QApplication([])
    mon = GapMonitor()

    def pump(seconds: float) -> None:
        t = time.perf_counter() + seconds
        while time.perf_counter() < t:
            app.processEvents()
            time.sleep(0.002)

    def until(cond, timeout: float = 300.0) -> float:
        t0 = time.perf_counter()
        while not cond():
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError("benchmark step did not finish")
            app.processEvents()
            time.sleep(0.002)
        return time.perf_counter() - t0

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1920, 1150)
    viewer.open_sample("napari-stgen", "her2st_c3")
    pump(1.0)

    # ---- opening each widget: longest event-loop gap until its start-up work is done, and
    # how much of it is the widget's own constructor (the rest: napari's dock insertion,
    # its settings save and the canvas repaint)
    from napari_stgen.widgets import codebook, export, predict, synthesize

    ctor_ms: dict[str, float] = {}
    for cls in (predict.PredictWidget, codebook.CodebookWidget, synthesize.SynthesizeWidget,
                export.ExportWidget):  # fmt: skip

        @functools.wraps(cls.__init__)  # napari reads the signature to pass the viewer
        def timed(self, *a, _init=cls.__init__, _name=cls.__name__, **k) -> None:
            t = time.perf_counter()
            _init(self, *a, **k)
            ctor_ms[_name] = round(1000 * (time.perf_counter() - t), 1)

        cls.__init__ = timed
    opening = {}
    widgets = {}
    for name in ("Predict expression", "Codebook", "Synthesize", "Export to h5ad"):
        mon.start()
        t0 = time.perf_counter()
        _d, w = viewer.window.add_plugin_dock_widget("napari-stgen", name)
        t_dock = time.perf_counter() - t0
        until(lambda w=w: not getattr(w, "workers", []) and not getattr(w, "worker", None))
        pump(0.5)
        gap = mon.stop()
        opening[name] = {
            "dock_call_ms": round(t_dock * 1000, 1),
            "widget_constructor_ms": ctor_ms.get(type(w).__name__),
            "max_gap_ms": round(gap, 1),
        }
        widgets[name] = w
    res["open_widget"] = opening
    pw = widgets["Predict expression"]
    sw = widgets["Synthesize"]
    st = pw.state
    pred = st.predictor()
    grid, tissue = engine.plan_whole_slide(st.slide, pred)
    centre = np.median(tissue, axis=0) * grid.tile_um
    cam = camera_of(viewer)

    def view(width_tiles: float) -> None:
        cam.center = tuple(centre)
        cam.zoom = max(viewer.canvas.size) / (width_tiles * grid.tile_um)
        pump(0.3)

    def n_view_tiles() -> int:
        return len(engine.plan_prediction_region(st.slide, pred, pw.visible_region_um())[1])

    # ---- a view of ≈ N tissue tiles: first values, all shown (quick look), full quality
    lo, hi = 4.0, 80.0
    for _ in range(20):  # bisect the zoom to about --view-tiles tissue tiles
        mid = (lo + hi) / 2
        view(mid)
        if n_view_tiles() < args.view_tiles:
            lo = mid
        else:
            hi = mid
    view(hi)
    planned = engine.plan_prediction_region(st.slide, pred, pw.visible_region_um())[1]
    n_tiles = len(planned)
    h, w = viewer.canvas.size
    first_view = {"canvas_px": [int(w), int(h)], "tiles": n_tiles}
    for label, progressive in (("quick_look", True), ("no_quick_look", False)):
        default_cache().clear()
        st.store.reset()
        pw.progressive_check.setChecked(progressive)
        counts: list[tuple[float, int]] = []
        t0 = time.perf_counter()

        def cb(*_, counts=counts, t0=t0) -> None:
            shown = int((st.store.rows_of(planned) >= 0).sum()) if st.store.grid else 0
            counts.append((time.perf_counter() - t0, shown))

        st.store.changed.connect(cb)
        pw.predict()
        t_full = until(lambda: not pw.workers)
        st.store.changed.disconnect(cb)
        firsts = [t for t, n in counts if n > 0]
        alls = [t for t, n in counts if n >= n_tiles]
        first_view[label] = {
            "first_values_s": round(firsts[0], 2) if firsts else None,
            "all_tiles_shown_s": round(alls[0], 2) if alls else None,
            "full_quality_s": round(t_full, 2),
        }
    pw.progressive_check.setChecked(True)
    res["view_prediction"] = first_view

    # ---- panning: longest gap with no prediction, then during a prediction
    def pans() -> float:
        mon.start()
        for k in range(12):
            cam.center = (centre[0] + (k % 3) * grid.tile_um, centre[1] + k * grid.tile_um)
            pump(0.08)
        return mon.stop()

    view(40)
    pump(0.5)
    idle_gap = pans()
    default_cache().clear()
    st.store.reset()
    pw.predict()
    pump(0.2)
    busy_gap = pans()
    until(lambda: not pw.workers)
    res["pan"] = {
        "max_gap_no_prediction_ms": round(idle_gap, 1),
        "max_gap_during_prediction_ms": round(busy_gap, 1),
        "ratio": round(busy_gap / max(idle_gap, 1e-6), 2),
    }

    # ---- one synthesized tile: widget vs stgen synthesize (same tile, steps, seed)
    view(6)
    pts = viewer.add_points(name="click", size=20, units="um")
    sw.region_combo.setCurrentText("click")
    t0 = time.perf_counter()
    pts.add(list(centre))
    until(lambda: sw.profile is not None and not sw.workers)
    t_profile = time.perf_counter() - t0
    model = sw.model
    t0 = time.perf_counter()
    sw.generate()
    until(lambda: sw.result is not None and not sw.workers)
    t_widget = time.perf_counter() - t0
    at = (float(centre[1]), float(centre[0]))
    from napari_stgen.io.sample import sample_slide_path

    cmd = [sys.executable, "-m", "napari_stgen.cli.main", "synthesize", "--out",
           "/tmp/stgen_bench_journey_tile.png", "--context", str(sample_slide_path()),
           "--at", str(at[0]), str(at[1]), "--seed", "0"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ})
    t_cli = time.perf_counter() - t0
    res["synthesize_one_tile"] = {
        "steps": int(sw.steps_spin.value()),
        "card_steps": int(model.default_steps),
        "widget_region_profile_s": round(t_profile, 2),
        "widget_generate_s": round(t_widget, 2),
        "cli_total_s": round(t_cli, 2),
        "ratio_widget_vs_cli": round(t_widget / t_cli, 2),
    }
    res["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
    viewer.close()
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
