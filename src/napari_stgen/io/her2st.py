"""Read spatial-transcriptomics sections: the HER2ST layout and AnnData + image pairs.

HER2ST section ``S`` in a directory: ``S.jpg`` (H&E), ``S.tsv.gz`` (raw UMI counts, rows
``XxY`` array positions, columns genes) and ``S_selection.tsv`` (array ``x, y``, corrected
``new_x, new_y``, spot centre ``pixel_x, pixel_y``). µm/px is derived from the spot pitch
(200 µm centre to centre) by a least-squares fit of pixel against array position.

No torch, no napari here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from napari_stgen.errors import StgenError

ST_PITCH_UM = 200.0  # ST array: 100 µm spots on a 200 µm centre-to-centre grid


@dataclass
class Section:
    """One section: spots with positions, raw counts and the image they sit on."""

    name: str
    image_path: Path
    barcodes: list[str]
    xy_px: np.ndarray  # (N, 2) float64 spot centres (x, y) in image level-0 pixels
    array_xy: np.ndarray  # (N, 2) array positions (x, y); float (corrected) or int
    counts: np.ndarray  # (N, G) float32 raw counts
    genes: list[str]
    mpp: float  # µm per pixel
    pitch_um: float = ST_PITCH_UM
    meta: dict = field(default_factory=dict)

    @property
    def n_spots(self) -> int:
        return len(self.barcodes)

    def gene_index(self, genes: list[str]) -> np.ndarray:
        """Column indices of ``genes`` in this section (StgenError if any is absent)."""
        pos = {g: i for i, g in enumerate(self.genes)}
        missing = [g for g in genes if g not in pos]
        if missing:
            raise StgenError(
                f"section {self.name}: {len(missing)} genes missing, e.g. {missing[:5]}"
            )
        return np.array([pos[g] for g in genes], dtype=np.int64)

    def target(self, genes: list[str]) -> np.ndarray:
        """log1p(CP10k) of ``genes`` (totals over *all* genes of the section)."""
        return normalize_log1p_cp10k(self.counts)[:, self.gene_index(genes)]


def normalize_log1p_cp10k(counts: np.ndarray) -> np.ndarray:
    """log1p(counts / total × 10,000) per spot (row); empty spots stay 0. float32."""
    c = np.asarray(counts, dtype=np.float64)
    tot = c.sum(axis=1, keepdims=True)
    tot[tot == 0] = 1.0
    return np.log1p(c / tot * 1e4).astype(np.float32)


def mpp_from_pitch(array_xy: np.ndarray, xy_px: np.ndarray, pitch_um: float = ST_PITCH_UM) -> float:
    """µm/px from a linear fit of pixel position against array position (per axis)."""
    a = np.asarray(array_xy, dtype=np.float64)
    p = np.asarray(xy_px, dtype=np.float64)
    slopes = []
    for k in range(2):
        if np.ptp(a[:, k]) <= 0:
            continue
        A = np.stack([a[:, k], np.ones(len(a))], axis=1)
        coef, *_ = np.linalg.lstsq(A, p[:, k], rcond=None)
        slopes.append(abs(coef[0]))
    if not slopes or min(slopes) <= 0:
        raise StgenError("cannot derive µm/px: spots do not span the array")
    return float(pitch_um / np.mean(slopes))


def list_sections(data_dir: str | Path) -> list[str]:
    """Names of the HER2ST sections in ``data_dir`` (those with jpg, tsv.gz and selection)."""
    d = Path(data_dir)
    if not d.is_dir():
        raise StgenError(f"{d}: not a directory")
    names = []
    for f in sorted(d.glob("*_selection.tsv")):
        s = f.name[: -len("_selection.tsv")]
        if (d / f"{s}.tsv.gz").exists() and _image_for(d, s) is not None:
            names.append(s)
    return names


def _image_for(d: Path, name: str) -> Path | None:
    for ext in (".jpg", ".jpeg", ".png", ".tif", ".tiff"):
        p = d / f"{name}{ext}"
        if p.exists():
            return p
    return None


def _read_tables(d: Path, name: str, need: set[str]) -> tuple:
    """(counts, selection, counts path, selection path) of section ``name`` in ``d``."""
    counts_path, sel_path = d / f"{name}.tsv.gz", d / f"{name}_selection.tsv"
    for p in (counts_path, sel_path):
        if not p.exists():
            raise StgenError(f"{p}: missing HER2ST file for section {name}")
    try:
        counts = pd.read_csv(counts_path, sep="\t", index_col=0)
        sel = pd.read_csv(sel_path, sep="\t")
    except Exception as e:  # noqa: BLE001 - pandas raises many types
        raise StgenError(f"{counts_path}: cannot read HER2ST tables: {e}") from e
    if not need.issubset(sel.columns):
        raise StgenError(f"{sel_path}: needs columns {sorted(need)}, has {list(sel.columns)}")
    return counts, sel, counts_path, sel_path


def read_her2st_section(data_dir: str | Path, name: str) -> Section:
    """Read section ``name`` of a HER2ST directory; spots present in both tables."""

    d = Path(data_dir)
    img = _image_for(d, name)
    counts, sel, counts_path, sel_path = _read_tables(d, name, {"x", "y", "pixel_x", "pixel_y"})
    if img is None:
        raise StgenError(f"{d}: no image {name}.jpg for section {name}")
    bc = [f"{int(x)}x{int(y)}" for x, y in zip(sel["x"], sel["y"], strict=True)]
    sel = sel.assign(barcode=bc)
    sel = sel.drop_duplicates("barcode").set_index("barcode")
    common = [b for b in sel.index if b in counts.index]
    if not common:
        raise StgenError(f"{sel_path}: no spot matches a row of {counts_path.name}")
    sel = sel.loc[common]
    c = counts.loc[common].to_numpy(dtype=np.float32)
    xy = sel[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    if {"new_x", "new_y"}.issubset(sel.columns):
        arr = sel[["new_x", "new_y"]].to_numpy(np.float64)
    else:
        arr = sel[["x", "y"]].to_numpy(np.float64)
    mpp = mpp_from_pitch(arr, xy)
    return Section(
        name=name,
        image_path=img,
        barcodes=list(common),
        xy_px=xy,
        array_xy=sel[["x", "y"]].to_numpy(np.int64),
        counts=c,
        genes=[str(g) for g in counts.columns],
        mpp=mpp,
        meta={"format": "her2st", "corrected_array": arr},
    )


def read_anndata_section(
    h5ad: str | Path, image: str | Path, name: str | None = None, mpp: float | None = None
) -> Section:
    """Read a Visium-style AnnData (``obsm['spatial']`` = image px x, y) + its image.

    Uses ``layers['counts']`` or ``raw`` when present, else ``X`` (which may already be
    normalized; ``meta['x_is_counts']`` says which). µm/px: ``mpp`` or, failing that, from
    ``uns['spatial'][lib]['scalefactors']['spot_diameter_fullres']`` (Visium spots: 55 µm).
    """
    import anndata

    h5ad, image = Path(h5ad), Path(image)
    for p in (h5ad, image):
        if not p.exists():
            raise StgenError(f"{p}: file not found")
    try:
        a = anndata.read_h5ad(h5ad)
    except Exception as e:  # noqa: BLE001 - h5py/anndata raise many types on damage
        raise StgenError(f"{h5ad}: cannot read AnnData: {e}") from e
    if "spatial" not in a.obsm:
        raise StgenError(f"{h5ad}: no obsm['spatial'] spot coordinates")
    is_counts = False
    if "counts" in a.layers:
        X, is_counts = a.layers["counts"], True
    elif a.raw is not None and a.raw.shape[1] == a.shape[1]:
        X, is_counts = a.raw.X, True
    else:
        X = a.X
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    if mpp is None:
        try:
            lib = next(iter(a.uns["spatial"]))
            d = float(a.uns["spatial"][lib]["scalefactors"]["spot_diameter_fullres"])
            mpp = 55.0 / d
        except (KeyError, StopIteration, TypeError) as e:
            raise StgenError(f"{h5ad}: no µm/px: pass mpp= (no Visium scalefactors)") from e
    xy = np.asarray(a.obsm["spatial"], dtype=np.float64)[:, :2]
    return Section(
        name=name or h5ad.stem,
        image_path=image,
        barcodes=[str(b) for b in a.obs_names],
        xy_px=xy,
        array_xy=np.round(xy / (100.0 / mpp)).astype(np.int64),
        counts=X.astype(np.float32),
        genes=[str(g) for g in a.var_names],
        mpp=float(mpp),
        pitch_um=100.0,
        meta={"format": "anndata", "x_is_counts": is_counts},
    )


def read_sections(data_dir: str | Path, names: list[str] | None = None) -> list[Section]:
    """All (or the named) HER2ST sections of a directory, in name order."""
    avail = list_sections(data_dir)
    if not avail:
        raise StgenError(f"{data_dir}: no HER2ST sections (S.jpg + S.tsv.gz + S_selection.tsv)")
    names = avail if names is None else list(names)
    bad = [n for n in names if n not in avail]
    if bad:
        raise StgenError(f"{data_dir}: unknown section(s) {bad}; available: {avail}")
    return [read_her2st_section(data_dir, n) for n in names]


def common_genes(sections: list[Section]) -> list[str]:
    """Genes present in every section, in the first section's order."""
    s = set(sections[0].genes)
    for sec in sections[1:]:
        s &= set(sec.genes)
    return [g for g in sections[0].genes if g in s]


def _gene_variance(sections: list[Section]) -> tuple[list[str], np.ndarray, np.ndarray]:
    genes = common_genes(sections)
    y = np.concatenate([sec.target(genes) for sec in sections], axis=0)
    return genes, y.var(axis=0), y.mean(axis=0)


def benchmark_genes(sections: list[Section], n: int = 50) -> list[str]:
    """BENCHMARKS.md genes: highest variance of log1p(CP10k) over all spots of all sections,
    among genes present in every section; ordered by decreasing variance (ties by name)."""
    genes, var, _ = _gene_variance(sections)
    order = sorted(range(len(genes)), key=lambda i: (-float(var[i]), genes[i]))
    return [genes[i] for i in order[:n]]


def gene_panel(sections: list[Section], n: int = 250, n_bench: int = 50) -> list[str]:
    """Model panel: the ``n_bench`` benchmark genes first, then the next most variable genes
    (by log1p CP10k variance) up to ``n`` in all."""
    genes, var, _ = _gene_variance(sections)
    order = sorted(range(len(genes)), key=lambda i: (-float(var[i]), genes[i]))
    bench = [genes[i] for i in order[:n_bench]]
    rest = [genes[i] for i in order[n_bench:] if not genes[i].startswith(("MT-", "RPL", "RPS"))]
    return bench + rest[: max(0, n - n_bench)]


def spot_neighbours(array_xy: np.ndarray, radius: float = 1.5) -> list[np.ndarray]:
    """Indices of each spot's array neighbours (Chebyshev-like distance ≤ ``radius``)."""
    a = np.asarray(array_xy, dtype=np.float64)
    d = np.sqrt(((a[:, None, :] - a[None, :, :]) ** 2).sum(-1))
    return [np.flatnonzero((d[i] <= radius) & (d[i] > 0)) for i in range(len(a))]


def smooth_over_neighbours(
    values: np.ndarray, neighbours: list[np.ndarray], self_weight: float = 0.5
) -> np.ndarray:
    """Each row mixed with the mean of its neighbours' rows: w·self + (1-w)·mean(nbrs)."""
    v = np.asarray(values, dtype=np.float32)
    out = v.copy()
    for i, nb in enumerate(neighbours):
        if len(nb):
            out[i] = self_weight * v[i] + (1 - self_weight) * v[nb].mean(axis=0)
    return out


@dataclass
class ExpressionSection:
    """An expression-only ST section (counts + array positions, no image)."""

    name: str
    barcodes: list[str]
    array_xy: np.ndarray  # (N, 2) int array positions
    counts: np.ndarray  # (N, G) float32 raw counts
    genes: list[str]

    @property
    def patient(self) -> str:
        return self.name[:1]

    def target(self, genes: list[str]) -> np.ndarray:
        """log1p(CP10k) of ``genes``; a gene absent from the table has no counts (0)."""
        y = normalize_log1p_cp10k(self.counts)
        pos = {g: i for i, g in enumerate(self.genes)}
        out = np.zeros((len(y), len(genes)), np.float32)
        for j, g in enumerate(genes):
            if g in pos:
                out[:, j] = y[:, pos[g]]
        return out

    def neighbours(self) -> list[np.ndarray]:
        return spot_neighbours(self.array_xy)


def list_expression_sections(data_dir: str | Path) -> list[str]:
    """Names of the sections of ``data_dir`` with counts and a spot table (image or not)."""
    d = Path(data_dir)
    if not d.is_dir():
        raise StgenError(f"{d}: not a directory")
    return [
        f.name[: -len("_selection.tsv")]
        for f in sorted(d.glob("*_selection.tsv"))
        if (d / f"{f.name[: -len('_selection.tsv')]}.tsv.gz").exists()
    ]


def read_expression_section(data_dir: str | Path, name: str) -> ExpressionSection:
    """Counts and array positions of section ``name`` (spots in both tables, selected)."""
    counts, sel, counts_path, sel_path = _read_tables(Path(data_dir), name, {"x", "y"})
    bc = [f"{int(x)}x{int(y)}" for x, y in zip(sel["x"], sel["y"], strict=True)]
    sel = sel.assign(barcode=bc).drop_duplicates("barcode").set_index("barcode")
    common = [b for b in sel.index if b in counts.index]
    if not common:
        raise StgenError(f"{sel_path}: no spot matches a row of {counts_path.name}")
    return ExpressionSection(
        name=name,
        barcodes=common,
        array_xy=sel.loc[common, ["x", "y"]].to_numpy(np.int64),
        counts=counts.loc[common].to_numpy(np.float32),
        genes=[str(g) for g in counts.columns],
    )


def read_labelled_regions(data_dir: str | Path, sec: ExpressionSection) -> np.ndarray:
    """Pathologist region label of each spot of ``sec`` (``pathologist/S_labeled_coordinates
    .tsv``, matched by nearest array position), object array; StgenError if absent."""
    p = Path(data_dir) / "pathologist" / f"{sec.name}_labeled_coordinates.tsv"
    if not p.exists():
        raise StgenError(f"{p}: no pathologist labels for section {sec.name}")
    lab = pd.read_csv(p, sep="\t").dropna(subset=["x", "y"])
    pos = np.round(lab[["x", "y"]].to_numpy(np.float64)).astype(np.int64)
    table = {(int(x), int(y)): str(v) for (x, y), v in zip(pos, lab["label"], strict=True)}
    return np.array([table.get((int(x), int(y)), "") for x, y in sec.array_xy], dtype=object)
