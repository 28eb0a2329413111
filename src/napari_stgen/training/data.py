"""Paired (patch, expression) data for GenST: a patch cache built once per data directory.

For every section: spot-centred patches of ``patch_um`` µm at ``out_px`` px (resampled from
the section's own µm/px), the spots' array positions and raw-count targets, and unlabelled
tissue tiles on a regular grid (for self-supervised pretraining of the histology VQ-VAE).
The cache is an ``.npz`` per section under ``cache_dir`` keyed by the geometry, so folds and
the default model reuse it.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_stgen.errors import StgenError
from napari_stgen.inference.device import cpu_kernel_info
from napari_stgen.inference.patches import patches_from_array, stained_pixels
from napari_stgen.io.atomic import atomic_path
from napari_stgen.io.her2st import (
    Section,
    benchmark_genes,
    gene_panel,
    read_sections,
    spot_neighbours,
)


def cache_dir(kind: str, env: str) -> Path:
    """Training-data cache of ``kind``: ``$env`` if set, else ``kind`` under
    ``$STGEN_CACHE_ROOT`` or ``$XDG_CACHE_HOME/napari-stgen`` (default ``~/.cache``)."""
    if os.environ.get(env):
        return Path(os.environ[env])
    root = os.environ.get("STGEN_CACHE_ROOT") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "napari-stgen"
    )
    return Path(root) / kind


DEFAULT_CACHE = cache_dir("genst", "STGEN_CACHE")


@dataclass
class CardNotes:
    """What a training run writes into its model card besides the model itself: its name
    (default: the output's stem), the command that made it and held-out evaluation figures."""

    name: str | None = None
    command: str | None = None
    evaluation: dict | None = None

    def card_entries(self, out: Path, command: str) -> dict:
        """The card's ``name``, ``command`` and ``evaluation``; the name defaults to ``out``'s
        stem and the command to the run's own ``command``."""
        return {
            "name": self.name or Path(out).stem,
            "command": self.command or command,
            "evaluation": self.evaluation,
        }


def data_entry(data_dir: str | Path, sections: list, **extra: object) -> dict:
    """The card's ``data`` entry: the directory, the training sections (anything with
    ``.name`` and targets ``.y``) and their spot count, then ``extra``."""
    return {
        "dir": str(data_dir),
        "sections": [s.name for s in sections],
        "n_spots": int(sum(len(s.y) for s in sections)),
        **extra,
    }


def training_entry(seconds: float, threads: int, **extra: object) -> dict:
    """The card's ``training`` entry: wall seconds, threads, machine (CPU model and kernel
    instruction set), ``extra``, UTC date."""
    return {
        "seconds": round(seconds, 1),
        "threads": threads,
        "machine": f"{platform.machine()} CPU",
        **cpu_kernel_info(),
        **extra,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class SectionData:
    """One section's cached arrays (targets are for a given panel)."""

    name: str
    patches: np.ndarray  # (N, P, P, 3) uint8 spot patches
    y: np.ndarray  # (N, G) float32 log1p CP10k of the panel
    array_xy: np.ndarray  # (N, 2) int
    xy_px: np.ndarray  # (N, 2) float
    barcodes: list[str]
    tiles: np.ndarray  # (T, P, P, 3) uint8 unlabelled tissue tiles
    mpp: float

    def neighbours(self) -> list[np.ndarray]:
        return spot_neighbours(self.array_xy)


def split_holdout(sections: list, holdout: str | None, data_dir: str | Path) -> tuple:
    """(held-out section or None, the other sections); StgenError naming ``data_dir`` when
    ``holdout`` is not one of the sections (anything with a ``.name``)."""

    names = [s.name for s in sections]
    if holdout is not None and holdout not in names:
        raise StgenError(f"{data_dir}: no section {holdout!r}; sections: {names}")
    test = next((s for s in sections if s.name == holdout), None)
    return test, [s for s in sections if s.name != holdout]


def _load_image(path: Path) -> np.ndarray:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def tissue_grid_centres(
    img: np.ndarray, mpp: float, stride_um: float, thumb_um: float = 16.0, min_frac: float = 0.4
) -> np.ndarray:
    """Centres (x, y) px of a ``stride_um`` grid over tissue, from a cheap low-res mask."""
    step = max(int(round(thumb_um / mpp)), 1)
    small = img[::step, ::step]
    m = stained_pixels(small)
    h, w = img.shape[:2]
    s = stride_um / mpp
    xs = np.arange(s / 2, w - s / 2, s)
    ys = np.arange(s / 2, h - s / 2, s)
    out = []
    r = max(int(round(s / 2 / step)), 1)
    for y in ys:
        for x in xs:
            cy, cx = int(y / step), int(x / step)
            win = m[max(cy - r, 0) : cy + r, max(cx - r, 0) : cx + r]
            if win.size and win.mean() >= min_frac:
                out.append((x, y))
    return np.array(out, dtype=np.float64).reshape(-1, 2)


def cache_key(patch_um: float, out_px: int, tile_stride_um: float, max_tiles: int) -> str:
    s = f"v2|{patch_um}|{out_px}|{tile_stride_um}|{max_tiles}"
    return hashlib.sha1(s.encode()).hexdigest()[:10]


def build_section_cache(
    sec: Section,
    cache_dir: Path,
    patch_um: float,
    out_px: int,
    tile_stride_um: float = 112.0,
    max_tiles: int = 1500,
    seed: int = 0,
) -> Path:
    """Write (or reuse) ``<cache_dir>/<section>_<key>.npz``: spot patches, tiles, positions."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(patch_um, out_px, tile_stride_um, max_tiles)
    path = cache_dir / f"{sec.name}_{key}.npz"
    if path.exists():
        return path
    img = _load_image(sec.image_path)
    size_px = patch_um / sec.mpp
    spots = patches_from_array(img, sec.xy_px, size_px, out_px)
    centres = tissue_grid_centres(img, sec.mpp, tile_stride_um)
    rng = np.random.default_rng(seed)
    if len(centres) > max_tiles:
        centres = centres[np.sort(rng.choice(len(centres), max_tiles, replace=False))]
    tiles = patches_from_array(img, centres, size_px, out_px)
    with atomic_path(path) as tmp:
        np.savez(
            tmp,
            patches=spots,
            tiles=tiles,
            tile_xy_px=centres,
            xy_px=sec.xy_px,
            array_xy=sec.array_xy,
            mpp=np.float64(sec.mpp),
        )
    return path


def load_dataset(
    data_dir: str | Path,
    panel: list[str] | None = None,
    patch_um: float = 224.0,
    out_px: int = 128,
    cache_dir: str | Path | None = None,
    names: list[str] | None = None,
) -> tuple[list[SectionData], list[str], list[str]]:
    """Sections as ``SectionData`` (cache built on first use), the panel and benchmark genes.

    The panel defaults to ``gene_panel(all sections)`` and the benchmark genes are always
    computed over *all* sections of the directory (BENCHMARKS.md).
    """

    secs = read_sections(data_dir)
    bench = benchmark_genes(secs, 50)
    if panel is None:
        panel = gene_panel(secs)
    cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    out = []
    for sec in secs:
        if names is not None and sec.name not in names:
            continue
        p = build_section_cache(sec, cache_dir, patch_um, out_px)
        z = np.load(p)
        out.append(
            SectionData(
                name=sec.name,
                patches=z["patches"],
                y=sec.target(panel),
                array_xy=sec.array_xy,
                xy_px=sec.xy_px,
                barcodes=sec.barcodes,
                tiles=z["tiles"],
                mpp=sec.mpp,
            )
        )
    return out, panel, bench
