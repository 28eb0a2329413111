"""HistoTx training by masking on HER2ST sections, and its checkpoint.

A sample is a window of up to ``max_tokens`` spots of one section nearest a random spot
(within ``radius_um``), randomly rotated/flipped. Every spot gives an image token. Fused
batches hide a random fraction (``hide_lo``–``hide_hi``) of the window's transcripts; the
visible spots also give transcript tokens (sometimes with a random part of the panel
dropped, so partial gene overlap at inference is seen in training); the loss is the MSE of
standardized log1p CP10k on the hidden spots (+ ``w_visible`` × on the visible ones).
Image-only batches (``p_image_only``) have no transcript tokens and a loss on every spot.

Per-spot image features (``inference.histotx.image_features``) are computed once per
section and cached under ``cache_dir`` (default: ``training.data.cache_dir``).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..inference.histotx import FEATURES, KIND, PATCH_PX, PATCH_UM, image_features
from .data import cache_dir

DEFAULT_CACHE = cache_dir("histotx", "STGEN_HISTOTX_CACHE")


@dataclass
class SpotSet:
    """One section: spot positions (µm), panel targets and image features (``None`` for an
    expression-only section: its image tokens are withheld, i.e. the "no image" embedding)."""

    name: str
    xy_px: np.ndarray  # (N, 2)
    xy_um: np.ndarray  # (N, 2)
    y: np.ndarray  # (N, G) log1p CP10k on the panel
    feats: np.ndarray | None  # (N, F)
    mpp: float
    present: np.ndarray | None = None  # (G,) bool: panel genes the section measured (None: all)

    @property
    def patient(self) -> str:
        return self.name[:1]

    @property
    def has_image(self) -> bool:
        return self.feats is not None

    def gene_present(self) -> np.ndarray:
        g = self.y.shape[1]
        return np.ones(g, bool) if self.present is None else np.asarray(self.present, bool)


@dataclass
class TrainConfig:
    """Training hyper-parameters (stored in the model card)."""

    steps: int = 500
    batch: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    max_tokens: int = 48
    radius_um: float = 1500.0
    hide_lo: float = 0.3
    hide_hi: float = 0.7
    p_image_only: float = 0.25
    p_gene_drop: float = 0.3
    w_visible: float = 0.1
    p_no_image: float = 0.15  # fused windows whose image tokens are all withheld
    p_drop_image: float = 0.15  # per-token image dropout in the other fused windows
    feat_noise: float = 0.5  # Gaussian noise on standardized image features (anti-memorizing)
    dim: int = 64
    depth: int = 3
    seed: int = 0
    threads: int = 1
    knn_k: int = 8  # > 0: the model is a residual on kNN interpolation (HistoTxConfig.knn_k)
    extra: dict = field(default_factory=dict)


def _feature_cache(sec, cache_dir: Path) -> Path:
    st = Path(sec.image_path).stat()
    key = f"{FEATURES}|{PATCH_UM}|{PATCH_PX}|{sec.image_path}|{st.st_size}|{len(sec.xy_px)}"
    h = hashlib.sha1(key.encode()).hexdigest()[:10]
    return cache_dir / f"{sec.name}_{h}.npy"


def section_features(sec, cache_dir: str | Path | None = None) -> np.ndarray:
    """Image features of every spot of a ``io.her2st.Section`` (cached .npy)."""
    from PIL import Image

    from ..inference.patches import patches_from_array

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
    tmp = path.with_name(f".{path.name}.partial.npy")
    np.save(tmp, f)
    os.replace(tmp, path)
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
    from ..io.her2st import benchmark_genes, gene_panel, read_sections

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
                feats=section_features(s, cache_dir),
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
    from ..io.her2st import ST_PITCH_UM, list_expression_sections, read_expression_section

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


# ----------------------------------------------------------------------------- batches
class WindowSampler:
    """Random masked windows over SpotSets (numpy); ``batch(rng)`` → dict of arrays."""

    def __init__(self, sets: list[SpotSet], y_mean, y_std, tcfg: TrainConfig):
        from ..inference.histotx import neighbour_order

        self.sets, self.t = sets, tcfg
        self.ys = [((s.y - y_mean) / y_std).astype(np.float32) for s in sets]
        self.nbr = [
            neighbour_order(s.xy_um, s.xy_um, min(tcfg.max_tokens, len(s.xy_um)), tcfg.radius_um)
            for s in sets
        ]
        w = np.array([len(s.xy_um) for s in sets], np.float64)
        self.p = w / w.sum()
        wi = w * np.array([s.has_image for s in sets])
        self.p_img = wi / wi.sum() if wi.sum() > 0 else None  # image-only batches: imaged sets
        self.fdim = next((s.feats.shape[1] for s in sets if s.has_image), 120)

    def batch(self, rng: np.random.Generator, b: int | None = None) -> dict:
        t = self.t
        b = b or t.batch
        n, g = t.max_tokens, self.ys[0].shape[1]
        fdim = self.fdim
        out = {
            "img_feat": np.zeros((b, n, fdim), np.float32),
            "img_pos": np.zeros((b, n, 2), np.float32),
            "img_valid": np.zeros((b, n), bool),
            "img_present": np.ones((b, n), bool),
            "tx": np.zeros((b, n, g), np.float32),
            "tx_mask": np.zeros((b, n, g), np.float32),
            "tx_pos": np.zeros((b, n, 2), np.float32),
            "tx_valid": np.zeros((b, n), bool),
            "target": np.zeros((b, n, g), np.float32),
            "weight": np.zeros((b, n), np.float32),
            "gene_w": np.ones((b, g), np.float32),
        }
        # whole batch one mode; image-only batches draw imaged sections only
        image_only = self.p_img is not None and rng.random() < t.p_image_only
        for i in range(b):
            k = rng.choice(len(self.sets), p=self.p_img if image_only else self.p)
            s, ys = self.sets[k], self.ys[k]
            pres = s.gene_present().astype(np.float32)
            out["gene_w"][i] = pres
            c = rng.integers(len(s.xy_um))
            idx = self.nbr[k][c]
            idx = idx[idx >= 0]
            m = len(idx)
            rel = s.xy_um[idx] - s.xy_um[c]
            a = rng.uniform(0, 2 * np.pi)
            rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
            if rng.random() < 0.5:
                rot = rot @ np.diag([1.0, -1.0])
            rel = rel @ rot.T
            if s.has_image:
                out["img_feat"][i, :m] = s.feats[idx]
            out["img_pos"][i, :m] = rel
            out["img_valid"][i, :m] = True
            out["target"][i, :m] = ys[idx]
            if image_only:
                out["weight"][i, :m] = 1.0
                continue
            frac = rng.uniform(t.hide_lo, t.hide_hi)
            hidden = rng.random(m) < frac
            if hidden.all() or not hidden.any():
                hidden[rng.integers(m)] = not hidden.all()
                if hidden.all():
                    hidden[rng.integers(m)] = False
            vis = np.flatnonzero(~hidden)
            gm = pres.copy()
            if rng.random() < t.p_gene_drop:
                gm *= (rng.random(g) >= rng.uniform(0.1, 0.9)).astype(np.float32)
                if gm.sum() == 0:
                    gm[np.flatnonzero(pres)[rng.integers(int(pres.sum()))]] = 1.0
            out["tx"][i, : len(vis)] = ys[idx[vis]] * gm
            out["tx_mask"][i, : len(vis)] = gm
            out["tx_pos"][i, : len(vis)] = rel[vis]
            out["tx_valid"][i, : len(vis)] = True
            out["weight"][i, :m] = np.where(hidden, 1.0, t.w_visible)
            if not s.has_image or rng.random() < t.p_no_image:
                out["img_present"][i] = False
            else:
                out["img_present"][i] = rng.random(n) >= t.p_drop_image
        out["image_only"] = image_only
        m_tx = max(1, int(out["tx_valid"].sum(1).max()))
        for k in ("tx", "tx_mask", "tx_pos", "tx_valid"):
            out[k] = np.ascontiguousarray(out[k][:, :m_tx])
        return out


def _cosine(step: int, total: int, warm: int = 100) -> float:
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + np.cos(np.pi * (step - warm) / max(1, total - warm)))


def train_histotx(
    sets: list[SpotSet],
    panel: list[str],
    cfg=None,
    tcfg: TrainConfig | None = None,
    log=None,
) -> tuple[object, dict]:
    """Train a HistoTx model on ``sets``; returns (model in eval mode, history)."""
    import torch

    from ..models.histotx import HistoTx, HistoTxConfig

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
    return _fit(model, sets, tcfg, log=log)


def _fit(model, sets: list[SpotSet], tcfg: TrainConfig, log=None, warm: int = 100):
    """Masked training of ``model`` on ``sets`` (normalization buffers already set)."""
    import torch

    torch.set_num_threads(max(1, tcfg.threads))
    torch.manual_seed(tcfg.seed)
    rng = np.random.default_rng(tcfg.seed)
    y_mean, y_std = model.y_mean.numpy(), model.y_std.numpy()
    sampler = WindowSampler(sets, y_mean, y_std, tcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    hist: dict = {"loss": [], "loss_fused": [], "loss_image": []}
    t0 = time.time()
    model.train()
    run = {"fused": [], "image": []}
    for step in range(tcfg.steps):
        bt = sampler.batch(rng)
        tens = {k: torch.from_numpy(v) for k, v in bt.items() if isinstance(v, np.ndarray)}
        if tcfg.feat_noise > 0:
            noise = torch.randn_like(tens["img_feat"]) * tcfg.feat_noise * model.feat_std
            tens["img_feat"] = tens["img_feat"] + noise
        if bt["image_only"]:
            pred = model(tens["img_feat"], tens["img_pos"], tens["img_valid"])
        else:
            pred = model(
                tens["img_feat"],
                tens["img_pos"],
                tens["img_valid"],
                tens["tx"],
                tens["tx_mask"],
                tens["tx_pos"],
                tens["tx_valid"],
                tens["img_present"],
            )
        w, gw = tens["weight"], tens["gene_w"][:, None, :]
        se = (((pred - tens["target"]) ** 2) * gw).sum(-1) / gw.sum(-1).clamp_min(1.0)
        loss = (se * w).sum() / w.sum().clamp_min(1e-6)
        for pg in opt.param_groups:
            pg["lr"] = tcfg.lr * _cosine(step, tcfg.steps, warm)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lv = float(loss.detach())
        hist["loss"].append(lv)
        run["image" if bt["image_only"] else "fused"].append(lv)
        if log is not None and (step + 1) % 250 == 0:
            f = np.mean(run["fused"][-50:]) if run["fused"] else float("nan")
            im = np.mean(run["image"][-50:]) if run["image"] else float("nan")
            log(
                f"step {step + 1}/{tcfg.steps} fused {f:.4f} image-only {im:.4f} "
                f"({time.time() - t0:.0f}s)"
            )
    hist["loss_fused"] = run["fused"]
    hist["loss_image"] = run["image"]
    hist["train_seconds"] = time.time() - t0
    model.eval()
    return model, hist


def adapt_to_measured(
    model,
    feats: np.ndarray,
    xy_um: np.ndarray,
    y: np.ndarray,
    steps: int = 200,
    lr: float = 3e-4,
    tcfg: TrainConfig | None = None,
    seed: int = 0,
    log=None,
):
    """Test-time adaptation: a copy of ``model`` fine-tuned by masking on the measured spots
    of one slide (their image features, µm positions and log1p CP10k panel profiles ``y``).

    Only measured spots are used (a window hides some of them and predicts them from the
    others and the image), so nothing unmeasured is seen. Normalization statistics are kept.
    """
    import copy

    tcfg = copy.copy(tcfg or TrainConfig())
    tcfg.steps, tcfg.lr, tcfg.seed = steps, lr, seed
    tcfg.batch = min(tcfg.batch, max(2, len(y) // 8))
    m = copy.deepcopy(model)
    if steps <= 0 or len(y) < 4:
        return m.eval()
    s = SpotSet(
        "measured",
        np.asarray(xy_um, np.float64),
        np.asarray(xy_um, np.float64),
        y,
        np.asarray(feats, np.float32),
        1.0,
    )
    return _fit(m, [s], tcfg, log=log, warm=min(20, steps // 5))[0]


# ----------------------------------------------------------------------------- checkpoint
def model_card(model, panel: list[str], bench: list[str], tcfg: TrainConfig, **extra) -> dict:
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


def save_model(path: str | Path, model, card: dict) -> Path:
    from ..models.checkpoint import save_checkpoint

    return save_checkpoint(path, model.state_dict(), card)


def train_and_save(
    data_dir: str | Path,
    out: str | Path,
    tcfg: TrainConfig | None = None,
    holdout: str | None = None,
    cache_dir: str | Path | None = None,
    name: str | None = None,
    evaluation: dict | None = None,
    command: str | None = None,
    log=print,
    expression_dir: str | Path | None = None,
    holdout_patient: str | None = None,
) -> Path:
    """Train on the sections of ``data_dir`` (+ the expression-only sections of
    ``expression_dir``), minus ``holdout`` / every section of ``holdout_patient``, and write
    checkpoint + card."""
    import datetime
    import platform

    from .data import split_holdout

    tcfg = tcfg or TrainConfig()
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
    card = model_card(
        model,
        panel,
        bench,
        tcfg,
        name=name or out.stem,
        data={
            "dir": str(data_dir),
            "expression_dir": None if expression_dir is None else str(expression_dir),
            "sections": [s.name for s in train],
            "imaged_sections": [s.name for s in train if s.has_image],
            "patients": sorted({s.patient for s in train}),
            "n_spots": int(sum(len(s.y) for s in train)),
            "source": src,
        },
        command=command
        or f"stgen train histotx --data {data_dir} --out {out} --steps {tcfg.steps} "
        f"--seed {tcfg.seed} --knn-k {tcfg.knn_k}"
        + (f" --expression-data {expression_dir}" if expression_dir else "")
        + (f" --holdout {holdout}" if holdout else "")
        + (f" --holdout-patient {holdout_patient}" if holdout_patient else ""),
        training={
            "seconds": round(hist["train_seconds"], 1),
            "threads": tcfg.threads,
            "machine": f"{platform.machine()} CPU",
            "final_loss_fused": round(float(np.mean(hist["loss_fused"][-100:])), 4),
            "final_loss_image_only": round(
                float(np.mean(hist["loss_image"][-100:] or [np.nan])), 4
            ),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        evaluation=evaluation,
    )
    return save_model(out, model, card)


def attach_evaluation(
    src: str | Path, dest: str | Path, evaluation: dict, command: str | None = None
) -> Path:
    """Copy a HistoTx checkpoint to ``dest`` with ``evaluation`` (and ``command``) in its card
    (fold figures are measured after the default model is trained)."""
    from ..models.checkpoint import load_checkpoint, save_checkpoint

    tensors, card = load_checkpoint(src, KIND)
    card["evaluation"] = evaluation
    if command:
        card["command"] = command
    return save_checkpoint(dest, tensors, card)
