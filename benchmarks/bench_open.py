"""Benchmark: open a 50,000 x 50,000 JPEG-tiled pyramidal TIFF, add it to napari, draw a frame.

    xvfb-run -a -s "-screen 0 1280x1024x24" python3 benchmarks/bench_open.py [--reps 5]

The slide is written once (cached in /tmp/stgen_bench) from real tissue: the HER2ST C3 H&E
(../shared/data/her2st/C3.jpg, or the bundled sample when shared/ is absent) repeated to 50k²,
512-px JPEG tiles, 2x levels down to < 1024 px. Tiles are generated lazily; each distinct tile is
JPEG-encoded once and its bytes reused, so writing takes seconds, not minutes.

napari-stgen and napari-wsi (OpenSlide backend; ``pip install "napari-wsi[openslide]"``) run in
alternating child processes of this same run. Each child imports napari, creates a shown viewer
(not timed) with its scale bar on (napari-stgen's reader turns it on and drawing its label costs
~0.25 s here, so both get it), then times: reader call + add layer + first frame
(``viewer.screenshot``). The first open in a fresh process (cold: includes importing the plugin's
reader module, as napari does on first use) and the median of the following ones (warm) are
reported, with the ratio stgen / napari-wsi and peak RSS. Also timed without napari: a fresh
open + reading the level napari drew (the plugin's own share of the first frame).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path("/tmp/stgen_bench")
SIZE = 50_000
TILE = 512
QUALITY = 80
MPP = 0.6874


# ---------------------------------------------------------------------------------------------
# Writing the test slide


def _source_tissue() -> np.ndarray:
    """A tile-aligned block of real H&E (19 x 18 tiles of 512 px)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    jpg = ROOT.parent / "shared" / "data" / "her2st" / "C3.jpg"
    if jpg.is_file():
        a = np.asarray(Image.open(jpg).convert("RGB"))
    else:
        import tifffile

        a = tifffile.imread(ROOT / "sample_data" / "her2st_C3.tif")
    h, w = (a.shape[0] // TILE) * TILE, (a.shape[1] // TILE) * TILE
    return np.ascontiguousarray(a[:h, :w])


def write_big_tiff(path: Path, size: int = SIZE) -> None:
    """Pyramidal TIFF of ``size``² px: the tissue block repeated, 512-px JPEG tiles."""
    import imagecodecs
    import tifffile
    from PIL import Image

    src = _source_tissue()
    tmp = path.with_suffix(".tmp")
    n_levels = 1 + max(0, math.ceil(math.log2(size / 1024)))
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for k in range(n_levels):
            ds = 2**k
            h = w = math.ceil(size / ds)
            per = np.asarray(Image.fromarray(src).reduce(ds)) if ds > 1 else src
            ph, pw = per.shape[:2]
            ext = np.pad(per, ((0, TILE), (0, TILE), (0, 0)), mode="wrap")
            cache: dict[tuple[int, int], bytes] = {}

            def tiles(h=h, w=w, ph=ph, pw=pw, ext=ext, cache=cache):
                for ty in range(math.ceil(h / TILE)):
                    for tx in range(math.ceil(w / TILE)):
                        key = ((ty * TILE) % ph, (tx * TILE) % pw)
                        if key not in cache:
                            t = ext[key[0] : key[0] + TILE, key[1] : key[1] + TILE]
                            cache[key] = imagecodecs.jpeg8_encode(
                                np.ascontiguousarray(t), level=QUALITY
                            )
                        yield cache[key]

            res = 1e4 / (MPP * ds)
            tw.write(
                tiles(),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                compression="jpeg",
                photometric="rgb",
                subfiletype=0 if k == 0 else 1,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                description=json.dumps({"mpp": MPP}) if k == 0 else None,
                metadata=None,
            )
    os.replace(tmp, path)


def slide_path() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    p = CACHE / f"tissue_{SIZE}_{TILE}_q{QUALITY}.tif"
    if not p.is_file():
        t = time.perf_counter()
        write_big_tiff(p)
        print(f"wrote {p} ({p.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f} s")
    return p


# ---------------------------------------------------------------------------------------------
# One library, in a child process


def _reader(lib: str):
    if lib == "stgen":
        from napari_stgen.io.napari_reader import get_reader

        return get_reader
    from napari_wsi.reader import wsi_reader_openslide

    return wsi_reader_openslide


def _pink_fraction(img: np.ndarray) -> float:
    rgb = img[..., :3].astype(int)
    return float(((rgb[..., 0] > rgb[..., 1] + 20) & (rgb.mean(-1) < 235)).mean())


def child(lib: str, path: Path, reps: int) -> dict:
    import napari
    from napari.layers import Layer

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, opens, levels_shown, pink, data_times = [], [], [], [], []
    for _ in range(reps + 1):
        viewer = napari.Viewer(show=True)  # viewer creation is not timed (same for both)
        viewer.window.resize(1280, 900)  # same canvas for both
        viewer.scale_bar.visible = True  # napari-stgen's reader shows it: same frame for both
        napari.current_viewer()
        t0 = time.perf_counter()
        get_reader = _reader(lib)  # the first (cold) run includes importing the plugin
        layer_data = get_reader(str(path))(str(path))
        t_open = time.perf_counter() - t0
        for data, kwargs, ltype in layer_data:
            viewer.add_layer(Layer.create(data, kwargs, ltype))
        shot = viewer.screenshot(canvas_only=True, flash=False)
        times.append(time.perf_counter() - t0)
        opens.append(t_open)
        layer = viewer.layers[0]
        levels_shown.append(int(layer.data_level))
        pink.append(_pink_fraction(shot))
        n_levels = len(layer.data)
        viewer.close()
        # the plugin's own share: a fresh open + reading the level napari drew, no napari
        t1 = time.perf_counter()
        fresh = get_reader(str(path))(str(path))[0][0]
        np.asarray(fresh[levels_shown[-1]])
        data_times.append(time.perf_counter() - t1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "lib": lib,
        "cold_s": times[0],
        "warm_s": times[1:],
        "open_s": opens[1:],
        "data_s": data_times[1:],
        "levels": n_levels,
        "level_shown": levels_shown,
        "tissue_on_screen": min(pink),
        "rss_before_mb": rss0 / 1024,
        "peak_rss_mb": rss / 1024,
    }


def run_child(lib: str, path: Path, reps: int) -> dict:
    r = subprocess.run(
        [sys.executable, __file__, "--child", lib, "--path", str(path), "--reps", str(reps)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode != 0 or not line:
        raise RuntimeError(f"{lib} child failed:\n{r.stderr[-3000:]}")
    return json.loads(line[-1])


def machine() -> str:
    cpu = "?"
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), no GPU, Mesa llvmpipe under Xvfb"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="alternating child processes per lib")
    ap.add_argument("--child")
    ap.add_argument("--path", type=Path)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.path, args.reps)))
        return
    path = slide_path()
    try:
        import napari_wsi  # noqa: F401

        libs = ["stgen", "wsi"]
    except ImportError:
        print("napari-wsi is not installed (pip install 'napari-wsi[openslide]'): stgen only")
        libs = ["stgen"]
    res: dict[str, list[dict]] = {lib: [] for lib in libs}
    for _ in range(args.rounds):
        for lib in libs:
            res[lib].append(run_child(lib, path, args.reps))
    print(f"machine: {machine()}")
    print(f"slide: {path.name}, {SIZE} x {SIZE} px, {path.stat().st_size / 1e6:.0f} MB")
    summary = {}
    for lib in libs:
        warm = [t for r in res[lib] for t in r["warm_s"]]
        opens = [t for r in res[lib] for t in r["open_s"]]
        data = [t for r in res[lib] for t in r["data_s"]]
        cold = [r["cold_s"] for r in res[lib]]
        summary[lib] = {
            "warm_median_s": statistics.median(warm),
            "cold_median_s": statistics.median(cold),
            "reader_median_s": statistics.median(opens),
            "data_median_s": statistics.median(data),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in res[lib]),
            "rss_growth_mb": max(r["peak_rss_mb"] - r["rss_before_mb"] for r in res[lib]),
            "levels": res[lib][0]["levels"],
            "level_shown": res[lib][0]["level_shown"][-1],
            "tissue_on_screen": min(r["tissue_on_screen"] for r in res[lib]),
        }
        s = summary[lib]
        print(
            f"{lib:6s} open+add+first frame: warm median {s['warm_median_s']:.3f} s "
            f"(n={len(warm)}), cold {s['cold_median_s']:.3f} s; reader call "
            f"{s['reader_median_s'] * 1000:.1f} ms; open + read drawn level without napari "
            f"{s['data_median_s'] * 1000:.0f} ms; levels {s['levels']}, drawn from level "
            f"{s['level_shown']}; tissue on screen {s['tissue_on_screen']:.0%}; peak RSS "
            f"{s['peak_rss_mb']:.0f} MB (+{s['rss_growth_mb']:.0f} MB over napari)"
        )
    if "wsi" in summary:
        w = summary["stgen"]["warm_median_s"] / summary["wsi"]["warm_median_s"]
        c = summary["stgen"]["cold_median_s"] / summary["wsi"]["cold_median_s"]
        d = summary["stgen"]["data_median_s"] / summary["wsi"]["data_median_s"]
        print(
            f"ratio stgen / napari-wsi: warm {w:.2f}x, cold {c:.2f}x (goal <= 0.5x); "
            f"open + read drawn level {d:.2f}x"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
