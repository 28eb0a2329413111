"""Make the bundled sample: HER2ST section C3 as a tiled JPEG pyramidal TIFF + its spot table.

    python3 scripts/make_sample.py [--data ../shared/data/her2st] [--out sample_data]

Writes ``her2st_C3.tif``: 256-px JPEG tiles, level 0 = the section's H&E at its native
resolution, reduced levels (2×, 4×, …) as further pages flagged reduced-resolution, µm/px in
the resolution tags (pixels per cm) and in the ImageDescription (JSON ``{"mpp": …}``, read by
``napari_stgen.open_slide``). µm/px comes from the spot pitch: a least-squares fit of spot pixel
centres against array positions, 200 µm per array step.

Writes ``her2st_C3_spots.csv``: ``barcode,x,y`` (spot centre in level-0 px) and the measured
raw UMI counts of the genes of interest: the 50 most variable genes of log1p(CP10k) over this
section, the BENCHMARKS.md top-50 over all five sections (when present), and ERBB2.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PITCH_UM = 200.0
SECTION = "C3"
TILE = 256
QUALITY = 70


def log1p_cp10k(counts: np.ndarray) -> np.ndarray:
    tot = counts.sum(axis=1, keepdims=True)
    tot[tot == 0] = 1
    return np.log1p(counts / tot * 1e4)


def mpp_from_pitch(array_xy: np.ndarray, xy_px: np.ndarray) -> tuple[float, float]:
    """µm/px from the fitted px per array step (mean of x and y); also the fit's RMS residual."""
    slopes, resid = [], []
    for k in range(2):
        a = np.stack([array_xy[:, k], np.ones(len(array_xy))], axis=1)
        coef, *_ = np.linalg.lstsq(a, xy_px[:, k], rcond=None)
        slopes.append(abs(coef[0]))
        resid.append(np.sqrt(np.mean((a @ coef - xy_px[:, k]) ** 2)))
    return PITCH_UM / float(np.mean(slopes)), float(np.mean(resid))


def read_section(d: Path, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    counts = pd.read_csv(d / f"{name}.tsv.gz", sep="\t", index_col=0)
    sel = pd.read_csv(d / f"{name}_selection.tsv", sep="\t")
    sel.index = [f"{int(x)}x{int(y)}" for x, y in zip(sel["x"], sel["y"], strict=True)]
    sel = sel[~sel.index.duplicated()]
    common = [b for b in sel.index if b in counts.index]
    return counts.loc[common], sel.loc[common]


def top_variance(counts: pd.DataFrame, n: int) -> list[str]:
    v = log1p_cp10k(counts.to_numpy(np.float64)).var(axis=0)
    order = sorted(range(len(v)), key=lambda i: (-v[i], counts.columns[i]))
    return [str(counts.columns[i]) for i in order[:n]]


def benchmark_genes(d: Path, n: int = 50) -> list[str]:
    """Top-n variance of log1p CP10k over all spots of all sections (genes in every section)."""
    tables = [read_section(d, s)[0] for s in ("B4", "C2", "C3", "C4", "C5")]
    genes = sorted(set.intersection(*(set(t.columns) for t in tables)))
    y = np.concatenate(
        [log1p_cp10k(t.to_numpy(np.float64))[:, t.columns.get_indexer(genes)] for t in tables]
    )
    v = y.var(axis=0)
    order = sorted(range(len(genes)), key=lambda i: (-v[i], genes[i]))
    return [genes[i] for i in order[:n]]


def pyramid(img: np.ndarray, min_px: int = 512) -> list[np.ndarray]:
    levels = [img]
    while max(levels[-1].shape[:2]) > min_px:
        a = levels[-1]
        h, w = a.shape[:2]
        levels.append(np.asarray(Image.fromarray(a).reduce(2)) if h > 1 else a)
        assert levels[-1].shape[:2] == ((h + 1) // 2, (w + 1) // 2)
    return levels


def write_tiff(levels: list[np.ndarray], mpp: float, path: Path, meta: dict) -> None:
    res = (1e4 / mpp, 1e4 / mpp)  # pixels per centimetre
    fd, tmp = tempfile.mkstemp(suffix=".tif", dir=path.parent)
    os.close(fd)
    try:
        with tifffile.TiffWriter(tmp) as tw:
            for k, lv in enumerate(levels):
                tw.write(
                    lv,
                    tile=(TILE, TILE),
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": QUALITY},
                    resolution=res if k == 0 else (res[0] / 2**k, res[1] / 2**k),
                    resolutionunit="CENTIMETER",
                    subfiletype=0 if k == 0 else 1,
                    description=json.dumps({"mpp": mpp, **meta}) if k == 0 else None,
                    metadata=None,
                )
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "her2st")
    ap.add_argument("--out", type=Path, default=ROOT / "sample_data")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    counts, sel = read_section(args.data, SECTION)
    arr = sel[["new_x", "new_y"]].to_numpy(np.float64)
    xy = sel[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    mpp, rms = mpp_from_pitch(arr, xy)
    print(
        f"{SECTION}: {len(sel)} spots, {PITCH_UM / mpp:.2f} px per 200 µm step -> "
        f"{mpp:.4f} µm/px (fit RMS {rms:.1f} px)"
    )

    genes = top_variance(counts, 50)
    try:
        genes += [g for g in benchmark_genes(args.data) if g not in genes]
    except FileNotFoundError as e:
        print(f"benchmark genes skipped: {e}")
    if "ERBB2" not in genes:
        genes.append("ERBB2")
    spots = pd.DataFrame({"barcode": sel.index, "x": xy[:, 0].round(2), "y": xy[:, 1].round(2)})
    spots = pd.concat([spots, counts[genes].reset_index(drop=True).astype(np.int64)], axis=1)
    csv = args.out / f"her2st_{SECTION}_spots.csv"
    spots.to_csv(csv.with_suffix(".tmp"), index=False)
    os.replace(csv.with_suffix(".tmp"), csv)
    print(f"wrote {csv} ({len(spots)} spots, {len(genes)} genes)")

    img = np.asarray(Image.open(args.data / f"{SECTION}.jpg").convert("RGB"))
    meta = {
        "source": f"HER2ST section {SECTION} (Andersson et al. 2021, Zenodo 3957257)",
        "mpp_method": f"spot pitch {PITCH_UM:g} um, least-squares fit, RMS {rms:.1f} px",
    }
    tif = args.out / f"her2st_{SECTION}.tif"
    levels = pyramid(img)
    write_tiff(levels, mpp, tif, meta)
    print(
        f"wrote {tif} ({tif.stat().st_size / 1e6:.1f} MB, levels {[lv.shape[:2] for lv in levels]})"
    )
    (args.out / "README.md").write_text(
        "# Sample data shipped in the wheel (napari_stgen/sample_data)\n\n"
        f"Made by `scripts/make_sample.py` from HER2ST section {SECTION} "
        "(Andersson et al., Nat. Commun. 12, 6012 (2021); Zenodo 3957257).\n\n"
        f"- `her2st_{SECTION}.tif`: H&E, {img.shape[1]} x {img.shape[0]} px, tiled "
        f"({TILE} px) JPEG (q{QUALITY}) pyramid of {len(levels)} levels, "
        f"{mpp:.4f} µm/px (from the 200 µm spot pitch) in the resolution tags and the "
        "description.\n"
        f"- `her2st_{SECTION}_spots.csv`: {len(spots)} spots: `barcode` (array `XxY`), `x`, `y` "
        f"(spot centre, level-0 px), raw UMI counts of {len(genes)} genes (top-50 variance of "
        f"log1p CP10k in {SECTION}, the BENCHMARKS top-50 over five sections, ERBB2).\n"
        + json.dumps({"mpp": mpp, "genes": genes})
        + "\n"
    )


if __name__ == "__main__":
    main()
