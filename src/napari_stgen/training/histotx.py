"""HistoTx training by masking on HER2ST sections, and its checkpoint.

A sample is a window of up to ``max_tokens`` spots of one section nearest a random spot
(within ``radius_um``), randomly rotated/flipped. Every spot gives an image token. Fused
batches hide a random fraction (``hide_lo``–``hide_hi``) of the window's transcripts; the
visible spots also give transcript tokens (sometimes with a random part of the panel
dropped, so partial gene overlap at inference is seen in training); the loss is the MSE of
standardized log1p CP10k on the hidden spots (+ ``w_visible`` × on the visible ones).
Image-only batches (``p_image_only``) have no transcript tokens and a loss on every spot.

Per-spot image features (``inference.features.image_features``) are computed once per
section and cached under ``cache_dir`` (default: ``training.data.cache_dir``).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from napari_stgen.inference.adapt import (
    SpotSet,
    TrainConfig,
    WindowSampler,
    adapt_to_measured,
    fit_masked,
)
from napari_stgen.inference.contract import Kind
from napari_stgen.inference.features import FEATURES, PATCH_PX, PATCH_UM, image_features
from napari_stgen.inference.patches import patches_from_array
from napari_stgen.io.atomic import atomic_path
from napari_stgen.io.her2st import (
    ST_PITCH_UM,
    benchmark_genes,
    gene_panel,
    list_expression_sections,
    read_expression_section,
    read_sections,
)
from napari_stgen.models.checkpoint import load_checkpoint, save_checkpoint
from napari_stgen.models.histotx import HistoTx, HistoTxConfig
from napari_stgen.training.data import (
    CardNotes,
    cache_dir,
    data_entry,
    split_holdout,
    training_entry,
)

KIND = Kind.HISTOTX.value
__all__ = ["SpotSet", "TrainConfig", "WindowSampler", "adapt_to_measured", "train_histotx"]

DEFAULT_CACHE = cache_dir("histotx", "STGEN_HISTOTX_CACHE")


def _feature_cache(sec, cache_dir: Path) -> Path:
    st = Path(sec.image_path).stat()
    key = f"{FEATURES}|{PATCH_UM}|{PATCH_PX}|{sec.image_path}|{st.st_size}|{len(sec.xy_px)}"
    h = hashlib.sha1(key.encode()).hexdigest()[:10]
    return cache_dir / f"{sec.name}_{h}.npy"


def spot_image_features(sec, cache_dir: str | Path | None = None) -> np.ndarray:
    """Image features of every spot of a ``io.her2st.Section`` (cached .npy)."""
    cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    path = _feature_cache(sec, cache_dir)
    if path.exists():
        return np.load(path)
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(sec.image_path) as im:
        img = np.asarray(im.convert("RGB"))
    patches = patches_from_array(img, sec.xy_px, PATCH_UM / sec.mpp, PATCH_PX)
    f = image_features(patches)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        np.save(tmp, f)
    return f


def load_spotsets(
    data_dir: str | Path,
    names: list[str] | None = None,
    panel: list[str] | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[list[SpotSet], list[str], list[str]]:
    """Sections (all or ``names``) as SpotSets, the panel and the 50 benchmark genes.

    Panel and benchmark genes are computed over the sections read (all of the directory when
    ``names`` is None): ``io.her2st.gene_panel`` (250 genes, benchmark genes first).
    """

    secs = read_sections(data_dir, names)
    bench = benchmark_genes(secs, 50)
    if panel is None:
        panel = gene_panel(secs)
    out = []
    for s in secs:
        out.append(
            SpotSet(
                name=s.name,
                xy_px=s.xy_px,
                xy_um=s.xy_px * s.mpp,
                y=s.target(panel),
                feats=spot_image_features(s, cache_dir),
                mpp=s.mpp,
            )
        )
    return out, list(panel), bench


def load_expression_spotsets(
    data_dir: str | Path, panel: list[str], names: list[str] | None = None
) -> list[SpotSet]:
    """Expression-only sections (``io.her2st.read_expression_section``; no image) as SpotSets
    on ``panel``: µm positions = array position × 200 µm pitch, ``feats`` None, and the panel
    genes a section lacks marked absent (``present``)."""

    out = []
    for n in names if names is not None else list_expression_sections(data_dir):
        e = read_expression_section(data_dir, n)
        have = set(e.genes)
        xy = e.array_xy.astype(np.float64)
        out.append(
            SpotSet(
                name=n,
                xy_px=xy,
                xy_um=xy * ST_PITCH_UM,
                y=e.target(panel),
                feats=None,
                mpp=ST_PITCH_UM,
                present=np.array([g in have for g in panel]),
            )
        )
    return out


# ----------------------------------------------------------------------------- checkpoint
# ----------------------------------------------------------------------------- training
def train_histotx(
    sets: list[SpotSet],
    panel: list[str],
    cfg=None,
    tcfg: TrainConfig | None = None,
    log=None,
) -> tuple[object, dict]:
    """Train a HistoTx model on ``sets``; returns (model in eval mode, history)."""
    import torch

    tcfg = tcfg or TrainConfig()
    torch.manual_seed(tcfg.seed)
    imaged = [s.feats for s in sets if s.has_image]
    feats = np.concatenate(imaged) if imaged else np.zeros((2, 120), np.float32)
    y = np.concatenate([s.y for s in sets])
    yp = np.concatenate([np.broadcast_to(s.gene_present(), s.y.shape) for s in sets])
    cfg = cfg or HistoTxConfig(
        n_genes=len(panel),
        img_dim=feats.shape[1],
        dim=tcfg.dim,
        depth=tcfg.depth,
        knn_k=tcfg.knn_k,
        knn_bw_um=tcfg.knn_bw_um,
    )
    model = HistoTx(cfg)
    with torch.no_grad():
        model.feat_mean.copy_(torch.from_numpy(feats.mean(0)))
        model.feat_std.copy_(torch.from_numpy(feats.std(0) + 1e-4))
        # per gene over the spots that measured it
        cnt = np.maximum(yp.sum(0), 1)
        mu = (y * yp).sum(0) / cnt
        sd = np.sqrt((((y - mu) * yp) ** 2).sum(0) / cnt)
        model.y_mean.copy_(torch.from_numpy(mu.astype(np.float32)))
        model.y_std.copy_(torch.from_numpy((sd + 1e-3).astype(np.float32)))
    return fit_masked(model, sets, tcfg, log=log)


def histotx_card(
    model: HistoTx, panel: list[str], bench: list[str], tcfg: TrainConfig, **extra
) -> dict:
    """Model card (checkpoint contract) of a trained HistoTx."""
    card = {
        "kind": KIND,
        "name": extra.pop("name", "histotx"),
        "architecture": model.cfg.to_dict(),
        "genes": list(panel),
        "benchmark_genes": list(bench),
        "patch_px": PATCH_PX,
        "patch_um": PATCH_UM,
        "mpp": PATCH_UM / PATCH_PX,
        "tile_um": PATCH_UM / 2,  # the spot-sized centre a prediction is for
        "image_features": FEATURES,
        "normalization": "log1p(counts / total * 1e4) per spot (CP10k over all genes)",
        "window": {
            "max_img": tcfg.max_tokens,
            "max_tx": tcfg.max_tokens,
            "radius_um": tcfg.radius_um,
        },
        "inputs": "image tokens (224 µm patch features) + transcript tokens (measured "
        "log1p CP10k on the panel, absent genes masked) with µm positions",
        "train_config": asdict(tcfg),
        "tensor_shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
    }
    card.update(extra)
    return card


def save_model(path: str | Path, model: HistoTx, card: dict) -> Path:
    return save_checkpoint(path, model.state_dict(), card)


def train_and_save_histotx(
    data_dir: str | Path,
    out: str | Path,
    tcfg: TrainConfig | None = None,
    holdout: str | None = None,
    cache_dir: str | Path | None = None,
    notes: CardNotes | None = None,
    log=print,
    expression_dir: str | Path | None = None,
    holdout_patient: str | None = None,
) -> Path:
    """Train on the sections of ``data_dir`` (+ the expression-only sections of
    ``expression_dir``), minus ``holdout`` / every section of ``holdout_patient``, and write
    checkpoint + card (``notes``: name, command, evaluation)."""
    tcfg = tcfg or TrainConfig()
    notes = notes or CardNotes()
    out = Path(out)
    sets, panel, bench = load_spotsets(data_dir, cache_dir=cache_dir)
    if expression_dir is not None:
        sets = sets + load_expression_spotsets(expression_dir, panel)
    _, train = split_holdout(sets, holdout, data_dir)
    if holdout_patient is not None:
        train = [s for s in train if s.patient != holdout_patient]
    model, hist = train_histotx(train, panel, None, tcfg, log=log)
    src = "HER2ST (Andersson et al. 2021): imaged sections B4, C2-C5"
    if expression_dir is not None:
        src += " + expression-only sections of patients A-F (no image: image tokens withheld)"
    command = (
        f"stgen train histotx --data {data_dir} --out {out} --steps {tcfg.steps} "
        f"--seed {tcfg.seed} --knn-k {tcfg.knn_k} --knn-bw-um {tcfg.knn_bw_um:g}"
        + (f" --expression-data {expression_dir}" if expression_dir else "")
        + (f" --holdout {holdout}" if holdout else "")
        + (f" --holdout-patient {holdout_patient}" if holdout_patient else "")
    )
    card = histotx_card(
        model,
        panel,
        bench,
        tcfg,
        **notes.card_entries(out, command),
        data=data_entry(
            data_dir,
            train,
            expression_dir=None if expression_dir is None else str(expression_dir),
            imaged_sections=[s.name for s in train if s.has_image],
            patients=sorted({s.patient for s in train}),
            source=src,
        ),
        training=training_entry(
            hist["train_seconds"],
            tcfg.threads,
            final_loss_fused=round(float(np.mean(hist["loss_fused"][-100:])), 4),
            final_loss_image_only=round(float(np.mean(hist["loss_image"][-100:] or [np.nan])), 4),
        ),
    )
    return save_model(out, model, card)


def attach_evaluation(
    src: str | Path, dest: str | Path, evaluation: dict, command: str | None = None
) -> Path:
    """Copy a HistoTx checkpoint to ``dest`` with ``evaluation`` (and ``command``) in its card
    (fold figures are measured after the default model is trained)."""

    tensors, card = load_checkpoint(src, KIND)
    card["evaluation"] = evaluation
    if command:
        card["command"] = command
    return save_checkpoint(dest, tensors, card)
