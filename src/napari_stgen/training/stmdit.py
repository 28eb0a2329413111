"""Training STMDiT: tile autoencoder, condition features (GenST), DiT with EMA.

Data (all cached under ``cache_dir`` so folds and the default model reuse it):

- every HER2ST section image resampled once to the model's µm/px (``TILE_MPP``);
- *spot tiles*: tiles centred on measured spots, with their measured log1p CP10k profile;
- *lattice tiles*: every tissue tile of a regular lattice (pitch = tile size) with GenST's
  prediction on it as a pseudo-label (PTPL);
- for every tile: the frozen GenST gene-encoder latent of its profile and the morphology feature
  (mean GenST image-encoder feature of its eight neighbouring tiles).

Training is seeded and resumable (state saved every ``save_every`` steps next to the output),
with independent dropout of the gene and morphology conditions and EMA weights.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import StgenError
from ..inference.device import safe_cpu_training
from ..inference.predictor import load_genst_module
from .data import cache_dir

TILE_MPP = 1.75  # µm per pixel of generated tiles
DEFAULT_CACHE = cache_dir("stmdit", "STGEN_CACHE_STMDIT")


# ----------------------------------------------------------------------------- images


def section_image(sec, mpp: float, cache_dir: Path) -> np.ndarray:
    """The section image resampled to ``mpp`` µm/px (cached .npy, memory-mapped)."""
    from PIL import Image

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{sec.name}_img_{mpp:.4f}.npy"
    if not path.exists():
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(sec.image_path) as im:
            im = im.convert("RGB")
            f = sec.mpp / mpp
            size = (max(int(round(im.width * f)), 1), max(int(round(im.height * f)), 1))
            arr = np.asarray(im.resize(size, Image.Resampling.BOX, reducing_gap=None))
        tmp = path.with_name(path.name + ".partial.npy")
        np.save(tmp, arr)
        os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def tissue_mask(img: np.ndarray) -> np.ndarray:
    """Boolean (H, W) tissue mask: saturated or dark pixels (as ``tissue_fraction``)."""
    p = np.asarray(img).astype(np.int16)
    return ((p.max(-1) - p.min(-1)) > 20) | (p.mean(-1) < 200)


def crop(img: np.ndarray, cx: float, cy: float, px: int) -> np.ndarray:
    """``px``×``px`` crop centred on (cx, cy) (pixels of ``img``), white outside."""
    from ..inference.patches import crop_padded

    x0, y0 = int(round(cx - px / 2)), int(round(cy - px / 2))
    return crop_padded(img, x0, y0, x0 + px, y0 + px)


def lattice_centres(img: np.ndarray, tile_px: int, min_frac: float = 0.5) -> np.ndarray:
    """(N, 2) (x, y) centres of the tissue tiles of a lattice of pitch ``tile_px`` covering
    ``img``, plus (rows, cols) grid indices (N, 2)."""
    m = tissue_mask(img)
    h, w = m.shape
    rows, cols = h // tile_px, w // tile_px
    mm = m[: rows * tile_px, : cols * tile_px].reshape(rows, tile_px, cols, tile_px).mean((1, 3))
    r, c = np.nonzero(mm >= min_frac)
    xy = np.stack([(c + 0.5) * tile_px, (r + 0.5) * tile_px], 1).astype(np.float64)
    return xy, np.stack([r, c], 1)


def random_tissue_crops(
    imgs: list[np.ndarray], n: int, px: int, rng: np.random.Generator
) -> np.ndarray:
    """``n`` random crops (uint8 (n, px, px, 3)) centred on tissue, from the given images."""
    out = np.empty((n, px, px, 3), np.uint8)
    i = 0
    while i < n:
        img = imgs[rng.integers(len(imgs))]
        h, w = img.shape[:2]
        x, y = rng.integers(px // 2, w - px // 2), rng.integers(px // 2, h - px // 2)
        t = np.asarray(img[y - px // 2 : y - px // 2 + px, x - px // 2 : x - px // 2 + px])
        if tissue_mask(t).mean() >= 0.5:
            out[i] = t
            i += 1
    return out


def dihedral(x, k: int):
    """One of the 8 dihedral transforms of the last two axes (torch or numpy)."""
    import torch

    if isinstance(x, torch.Tensor):
        y = torch.rot90(x, k % 4, dims=(-2, -1))
        return torch.flip(y, dims=(-1,)) if k >= 4 else y
    y = np.rot90(x, k % 4, axes=(-2, -1))
    return np.flip(y, axis=-1) if k >= 4 else y


# ----------------------------------------------------------------------------- autoencoder


def train_autoencoder(
    data_dir: str | Path,
    out: str | Path,
    steps: int = 1500,
    batch: int = 16,
    tile_px: int = 64,
    seed: int = 0,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    cache_dir: str | Path | None = None,
    threads: int = 1,
    log_every: int = 50,
    sections: list[str] | None = None,
    progress: bool = True,
) -> Path:
    """Train the tile autoencoder on random tissue crops of every section (no labels).

    Saves ``out`` (safetensors: ``ae.*`` tensors; metadata: config and losses). Resumes from
    ``out + '.state'`` when present.
    """
    import torch
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    from ..io.her2st import read_sections
    from ..models.stmdit import AEConfig, TileAutoencoder, images_to_tensor

    torch.set_num_threads(threads)

    safe_cpu_training()
    cache_dir = Path(cache_dir or DEFAULT_CACHE)
    secs = read_sections(data_dir, sections)
    imgs = [section_image(s, TILE_MPP, cache_dir) for s in secs]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    ae = TileAutoencoder(AEConfig())
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
    out = Path(out)
    state_path = Path(str(out) + ".state")
    start, hist = 0, []
    if state_path.exists():
        st = load_file(state_path)
        ae.load_state_dict({k[3:]: v for k, v in st.items() if k.startswith("ae.")})
        meta = json.loads(state_path.with_suffix(".json").read_text())
        start, hist = meta["step"], meta["hist"]
        rng = np.random.default_rng(seed + start)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s + start, steps))
    bar = tqdm(
        range(start, steps), desc="autoencoder", initial=start, total=steps, disable=not progress
    )
    run = 0.0
    for step in bar:
        x = images_to_tensor(random_tissue_crops(imgs, batch, tile_px, rng))
        x = dihedral(x, int(rng.integers(8)))
        rec, m, lv = ae(x)
        l1 = (rec - x).abs().mean()
        grad = (
            (rec[..., 1:, :] - rec[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])
        ).abs().mean() + ((rec[..., 1:] - rec[..., :-1]) - (x[..., 1:] - x[..., :-1])).abs().mean()
        kl = 0.5 * (m.pow(2) + lv.exp() - 1 - lv).sum((1, 2, 3)).mean()
        loss = l1 + 0.5 * grad + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        run = 0.98 * run + 0.02 * l1.item() if step > start else l1.item()
        bar.set_postfix(l1=f"{run:.4f}")
        if (step + 1) % log_every == 0 or step + 1 == steps:
            hist.append([step + 1, round(run, 5)])
            st = {f"ae.{k}": v.detach().clone() for k, v in ae.state_dict().items()}
            _save_state(state_path, st, {"step": step + 1, "hist": hist})
    tensors = {f"ae.{k}": v.detach().contiguous() for k, v in ae.state_dict().items()}
    meta = {"ae_config": json.dumps(AEConfig().to_dict()), "hist": json.dumps(hist)}
    tmp = out.with_name(out.name + ".partial")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out)
    return out


def _lr_factor(step: int, total: int, warm: int = 100) -> float:
    warm = max(1, min(warm, total // 10))
    return min(1.0, (step + 1) / warm) * 0.5 * (1 + float(np.cos(np.pi * min(step / total, 1.0))))


def _save_state(path: Path, tensors: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    jp = path.with_suffix(".json")
    tmpj = jp.with_name(jp.name + ".partial")
    tmpj.write_text(json.dumps(meta))
    os.replace(tmpj, jp)


# ----------------------------------------------------------------------------- GenST access


def load_genst_model(name_or_path: str | Path = "default"):
    """(GenST torch model, card, path, sha256) from a GenST checkpoint (no pickle; strict:
    the predictor's loader, ``inference.predictor.load_genst_module``)."""
    return load_genst_module(name_or_path)


def genst_predict(model, patches: np.ndarray, tta: int = 4, batch: int = 128) -> np.ndarray:
    """GenST expression (N, G) log1p CP10k on uint8 224 µm patches (resampled to GenST's
    patch size when they are at another µm/px)."""
    import torch
    import torch.nn.functional as F

    from ..models.genst import to_input

    out = []
    px = int(model.cfg.patch_px)
    with torch.inference_mode():
        for i in range(0, len(patches), batch):
            x = to_input(torch.from_numpy(np.ascontiguousarray(patches[i : i + batch])))
            if x.shape[-1] != px:  # patches at another µm/px than GenST's (same 224 µm)
                x = F.interpolate(x, size=(px, px), mode="area")
            out.append(model.predict(x, tta=tta)[0].numpy())
    return np.concatenate(out, 0).astype(np.float32) if out else np.zeros((0, model.cfg.n_genes))


def genst_patches_for_tiles(tiles: np.ndarray, genst_px: int, context: np.ndarray | None = None):
    """GenST input patches (224 µm) for 112 µm tiles at the same µm/px: the tile in the centre
    of its real ``context`` (N, 2t, 2t, 3) when given, else reflect-padded (tile content only).
    """
    tiles = np.asarray(tiles)
    t = tiles.shape[1]
    pad = (genst_px - t) // 2
    if context is not None:
        out = np.array(context, copy=True)
        out[:, pad : pad + t, pad : pad + t] = tiles
        return out
    return np.pad(
        tiles,
        ((0, 0), (pad, genst_px - t - pad), (pad, genst_px - t - pad), (0, 0)),
        mode="reflect",
    )


# ----------------------------------------------------------------------------- features


def _enc_key(enc) -> str:
    import hashlib

    h = hashlib.sha1()
    for k, v in sorted(enc.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:10]


def genst_label_key(genst) -> str:
    """Cache key of a GenST model's per-tile predictions: its per-tile tensors (the spatial
    ``context.*`` head, which per-tile prediction does not use, is left out) and decode mode."""
    import hashlib

    h = hashlib.sha1(str(genst.cfg.decode).encode())
    for k, v in sorted(genst.state_dict().items()):
        if k.startswith("context."):
            continue
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:8]


def section_features(
    sec,
    panel: list[str],
    enc,
    genst=None,
    tile_px: int = 64,
    cache_dir: Path | None = None,
    mpp: float = TILE_MPP,
) -> dict:
    """Tiles + conditions of one section (cached): measured spots and PTPL lattice tiles,
    at ``mpp`` µm/px (GenST reads its 224 µm patches resampled to its own size).

    Keys: ``spot_tiles`` (N, t, t, 3), ``spot_expr`` measured (N, G), ``spot_pool``, ``spot_morph``,
    ``spot_ctx`` (N, 2t, 2t, 3) real 224 µm surroundings, ``spot_genst`` GenST on the real spot
    patch (N, G) (if GenST is given); ``lat_tiles``, ``lat_expr`` (GenST pseudo-labels),
    ``lat_pool``, ``lat_morph`` (only with GenST).
    """
    cache_dir = Path(cache_dir or DEFAULT_CACHE)
    key = _enc_key(enc) + (f"_g{genst_label_key(genst)}" if genst is not None else "")
    key += "" if abs(mpp - TILE_MPP) < 1e-9 else f"_m{mpp:g}"
    path = cache_dir / f"{sec.name}_feat_{tile_px}_{key}.npz"
    if path.exists():
        z = np.load(path)
        return {k: z[k] for k in z.files}
    img = section_image(sec, mpp, cache_dir)
    t = tile_px
    xy = np.asarray(sec.xy_px) * sec.mpp / mpp
    spot_ctx3 = np.stack([crop(img, x, y, 3 * t) for x, y in xy])
    spot_tiles = spot_ctx3[:, t : 2 * t, t : 2 * t].copy()
    spot_ctx2 = np.stack([crop(img, x, y, 2 * t) for x, y in xy])
    from ..inference.synthesis import ring_tiles

    out = {
        "spot_tiles": spot_tiles,
        "spot_ctx": spot_ctx2,
        "spot_expr": sec.target(panel).astype(np.float32),
        "spot_morph": enc.encode_context(ring_tiles(spot_ctx3, t)),
        "spot_xy": xy.astype(np.float32),
    }
    out["spot_pool"] = enc.encode_genes(out["spot_expr"])
    if genst is not None:
        out["spot_genst"] = genst_predict(genst, spot_ctx2)
        cxy, rc = lattice_centres(img, t)
        rows, cols = img.shape[0] // t, img.shape[1] // t
        # features of every lattice cell that neighbours a tissue cell
        need = np.zeros((rows + 2, cols + 2), bool)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                need[rc[:, 0] + 1 + dr, rc[:, 1] + 1 + dc] = True
        nr, nc = np.nonzero(need)
        cells = np.stack(
            [crop(img, (c - 0.5) * t, (r - 0.5) * t, t) for r, c in zip(nr, nc, strict=True)]
        )
        feat = np.zeros((rows + 2, cols + 2, enc.morph_dim), np.float32)
        feat[nr, nc] = enc.tile_features(cells)
        ring = np.zeros((len(rc), enc.morph_dim), np.float32)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                if dr or dc:
                    ring += feat[rc[:, 0] + 1 + dr, rc[:, 1] + 1 + dc]
        lat_tiles = np.stack([crop(img, x, y, t) for x, y in cxy])
        lat_ctx2 = np.stack([crop(img, x, y, 2 * t) for x, y in cxy])
        out["lat_tiles"] = lat_tiles
        out["lat_expr"] = genst_predict(genst, lat_ctx2)
        out["lat_pool"] = enc.encode_genes(out["lat_expr"])
        out["lat_morph"] = ring / 8.0
        out["lat_xy"] = cxy.astype(np.float32)
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez(tmp, **out)
    os.replace(tmp, path)
    return out


# ----------------------------------------------------------------------------- DiT training


@dataclass
class STMDiTTrainConfig:
    """Training hyper-parameters (stored in the card)."""

    steps: int = 3000
    batch: int = 32
    lr: float = 3e-4
    p_drop_gene: float = 0.2
    p_drop_morph: float = 0.2
    ema: float = 0.999
    labels: str = "both"  # "real" (measured spots) | "ptpl" (GenST pseudo-labels) | "both"
    real_frac: float = 0.3  # share of measured spots in a batch when labels == "both"
    holdout: tuple[str, ...] = ()
    seed: int = 0
    threads: int = 1
    save_every: int = 100
    tile_px: int = 64
    # gene-subset conditioning: with probability ``p_gene_subset`` a training profile keeps only
    # a random subset of genes (keep fraction log-uniform in [1/G, 1], at least one gene) and
    # the others are set to the training median, so "median" learns to mean "not given" and a
    # single gene (a slider) can move the tile on its own
    p_gene_subset: float = 0.0
    # share of those subset rows that keep exactly one gene, drawn with probability ∝ its
    # training standard deviation (the genes a slider moves most)
    p_gene_single: float = 0.0
    dim: int = 128
    depth: int = 6
    heads: int = 4
    n_gene_tokens: int = 16


def assemble(feats: list[dict], labels: str) -> dict:
    """Concatenate sections' rows: tiles, expr, pool, morph, is_real."""
    keys = ("tiles", "expr", "pool", "morph")
    parts: dict[str, list] = {k: [] for k in keys}
    real = []
    for f in feats:
        if labels in ("real", "both"):
            for k in keys:
                parts[k].append(f[f"spot_{k}"])
            real.append(np.ones(len(f["spot_expr"]), bool))
        if labels in ("ptpl", "both"):
            if "lat_expr" not in f:
                raise StgenError("pseudo-labels need a GenST model (labels='ptpl'/'both')")
            for k in keys:
                parts[k].append(f[f"lat_{k}"])
            real.append(np.zeros(len(f["lat_expr"]), bool))
    out = {k: np.concatenate(v, 0) for k, v in parts.items()}
    out["is_real"] = np.concatenate(real)
    return out


def encode_latents(ae, tiles: np.ndarray, batch: int = 256) -> np.ndarray:
    """Posterior means of the tile autoencoder, (N, C, S, S) float32."""
    import torch

    from ..models.stmdit import images_to_tensor

    out = []
    with torch.inference_mode():
        for i in range(0, len(tiles), batch):
            out.append(ae.encode(images_to_tensor(tiles[i : i + batch]))[0].numpy())
    return np.concatenate(out, 0).astype(np.float32)


def tensors_sha(tensors: dict) -> str:
    """sha256 over named tensors (sorted names and values): identifies weights independently
    of a checkpoint file's metadata (whose card records wall-clock times)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(tensors.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def ae_tensor_sha(ae) -> str:
    """``tensors_sha`` of an autoencoder's state."""
    return tensors_sha(ae.state_dict())


def load_ae(path: str | Path):
    """The tile autoencoder saved by ``train_autoencoder`` (or inside an STMDiT checkpoint)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..models.stmdit import autoencoder_from_config

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "ae_config" in meta:
        cfg = json.loads(meta["ae_config"])
    else:
        cfg = json.loads(meta["stgen_card"])["ae"]
    ae = autoencoder_from_config(cfg)
    t = load_file(str(path))
    ae.load_state_dict({k[3:]: v for k, v in t.items() if k.startswith("ae.")})
    return ae.eval()


def ae_geometry(ae) -> tuple[float, int]:
    """(µm/px, px per 112 µm tile) of a tile autoencoder: 0.875 / 128 for v2, else 1.75 / 64."""
    if getattr(ae.cfg, "kind", "") == "v2":
        from .stmdit_ae import AE2_MPP

        return AE2_MPP, int(round(112.0 / AE2_MPP))
    return TILE_MPP, int(round(112.0 / TILE_MPP))


def resolve_ae(name_or_path: str | Path) -> Path:
    """A tile-autoencoder file: a path (``train_autoencoder`` output or any STMDiT checkpoint),
    or an STMDiT checkpoint name such as ``default`` (its ``ae.*`` tensors)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    from ..models.checkpoint import resolve_checkpoint

    return resolve_checkpoint(str(name_or_path), "stmdit")


def _stats(data: dict) -> dict:
    real = data["expr"][data["is_real"]] if data["is_real"].any() else data["expr"]
    return {
        "gene_mean": real.mean(0),
        "gene_std": real.std(0) + 0.05,
        "gene_median": np.median(real, 0),
        "gene_range": np.stack([np.percentile(real, 1, 0), np.percentile(real, 99, 0)], 1),
        "pool_mean": data["pool"].mean(0),
        "pool_std": data["pool"].std(0) + 1e-3,
        "morph_mean": data["morph"].mean(0),
        "morph_std": data["morph"].std(0) + 1e-3,
    }


def train_dit(
    data: dict,
    ae,
    enc,
    panel: list[str],
    out: str | Path,
    tcfg: STMDiTTrainConfig,
    card_extra: dict | None = None,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    mpp: float = TILE_MPP,
) -> Path | None:
    """Train the DiT on assembled rows (``assemble``, tiles at ``mpp`` µm/px) and write the
    STMDiT checkpoint.

    Resumable: state (weights, EMA, Adam moments, step) is saved every ``save_every`` steps to
    ``<out>.state``; with ``resume`` a run continues from it. Batches are drawn from
    ``rng(seed, step)`` so a resumed run sees the same batches as an uninterrupted one.
    ``stop_after``: stop (state saved, no checkpoint written, returns None) after that step.
    """
    import copy

    import torch
    from tqdm import tqdm

    from ..models.checkpoint import save_checkpoint
    from ..models.stmdit import DiTConfig, STMDiT

    torch.set_num_threads(tcfg.threads)

    safe_cpu_training()
    out = Path(out)
    lat = encode_latents(ae, data["tiles"])
    latent_scale = float(1.0 / lat.std())
    st = _stats(data)
    gz = ((data["expr"] - st["gene_mean"]) / st["gene_std"]).astype(np.float32)
    pool = ((data["pool"] - st["pool_mean"]) / st["pool_std"]).astype(np.float32)
    morph = ((data["morph"] - st["morph_mean"]) / st["morph_std"]).astype(np.float32)
    lat_t = torch.from_numpy(lat * latent_scale)
    gz_t, pool_t, morph_t = map(torch.from_numpy, (gz, pool, morph))
    real_idx = np.flatnonzero(data["is_real"])
    pseudo_idx = np.flatnonzero(~data["is_real"])
    cfg = DiTConfig(
        latent_ch=lat.shape[1],
        latent_px=lat.shape[2],
        patch=max(lat.shape[2] // 8, 1),
        dim=tcfg.dim,
        depth=tcfg.depth,
        heads=tcfg.heads,
        n_genes=len(panel),
        gene_dim=pool.shape[1],
        morph_dim=morph.shape[1],
        n_gene_tokens=tcfg.n_gene_tokens,
    )
    torch.manual_seed(tcfg.seed)
    dit = STMDiT(cfg)
    ema = copy.deepcopy(dit).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(dit.parameters(), lr=tcfg.lr, weight_decay=0.0)
    state_path = Path(str(out) + ".state")
    start, hist = 0, []
    if resume and state_path.exists():
        start, hist = _load_dit_state(state_path, dit, ema, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s + start, tcfg.steps))
    bar = tqdm(
        range(start, tcfg.steps),
        desc="stmdit",
        initial=start,
        total=tcfg.steps,
        disable=not progress,
    )
    run, t0 = None, time.time()
    for step in bar:
        rng = np.random.default_rng([tcfg.seed, step])
        gen = torch.Generator().manual_seed(tcfg.seed * 1_000_003 + step)
        if tcfg.labels == "both" and len(real_idx) and len(pseudo_idx):
            nr = int(round(tcfg.batch * tcfg.real_frac))
            idx = np.concatenate(
                [rng.choice(real_idx, nr), rng.choice(pseudo_idx, tcfg.batch - nr)]
            )
        else:
            idx = rng.integers(0, len(lat_t), tcfg.batch)
        idx_t = torch.from_numpy(idx)
        x0 = dihedral(lat_t[idx_t], int(rng.integers(8)))
        b = len(idx)
        t = torch.sigmoid(torch.randn(b, generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise
        g_pool, g_z = pool_t[idx_t], gz_t[idx_t]
        if tcfg.p_gene_subset > 0:
            g_pool, g_z = _gene_subset(
                data["expr"][idx],
                st,
                enc,
                tcfg.p_gene_subset,
                rng,
                g_pool,
                g_z,
                p_single=tcfg.p_gene_single,
            )
        use_g = torch.rand(b, generator=gen) >= tcfg.p_drop_gene
        use_m = torch.rand(b, generator=gen) >= tcfg.p_drop_morph
        v = dit(xt, t, g_pool, g_z, morph_t[idx_t], use_g, use_m)
        loss = (v - (noise - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(tcfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), dit.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        lv = loss.item()
        run = lv if run is None else 0.98 * run + 0.02 * lv
        bar.set_postfix(loss=f"{run:.4f}")
        if (step + 1) % tcfg.save_every == 0 or step + 1 == tcfg.steps:
            hist.append([step + 1, round(run, 5), round(time.time() - t0, 1)])
            _save_dit_state(state_path, dit, ema, opt, step + 1, hist)
        if stop_after is not None and step + 1 >= stop_after:
            _save_dit_state(state_path, dit, ema, opt, step + 1, hist)
            return None
    tensors = {f"ema.{k}": v for k, v in ema.state_dict().items()}
    tensors.update({f"ae.{k}": v for k, v in ae.state_dict().items()})
    tensors.update({f"cond.{k}": v for k, v in enc.state_dict().items()})
    tensors.update(
        {f"stats.{k}": torch.as_tensor(np.asarray(v, np.float32)) for k, v in st.items()}
    )
    card = {
        "weights_sha256": tensors_sha(tensors),
        "kind": "stmdit",
        "name": out.stem,
        "genes": list(panel),
        "mpp": mpp,
        "tile_px": int(data["tiles"].shape[1]),
        "tile_um": round(mpp * int(data["tiles"].shape[1]), 3),
        "normalization": "log1p(counts / total * 10000) per spot",
        "ae": ae.cfg.to_dict(),
        "dit": cfg.to_dict(),
        "cond": enc.config(),
        "latent_scale": latent_scale,
        "sampler": {
            "kind": "rectified-flow Euler",
            "steps": 16,
            "shift": 1.0,
            "guidance_genes": 2.0,
            "guidance_morph": 1.0,
        },
        "train": {k: (list(v) if isinstance(v, tuple) else v) for k, v in tcfg.__dict__.items()},
        "train_rows": {
            "measured_spots": int(data["is_real"].sum()),
            "pseudo_label_tiles": int((~data["is_real"]).sum()),
        },
        "loss_history": hist,
        "tensor_shapes": {k: list(v.shape) for k, v in tensors.items()},
    }
    card.update(card_extra or {})
    save_checkpoint(out, tensors, json.loads(json.dumps(card, default=_json_default)))
    return out


def _gene_subset(
    expr: np.ndarray, st: dict, enc, p: float, rng, g_pool, g_z, p_single: float = 0.0
):
    """Standardised (pool, z) condition tensors of ``expr`` rows where, with probability ``p``
    per row, only a random subset of genes keeps its value (others: the training median);
    a share ``p_single`` of those rows keeps one gene, drawn ∝ its training std."""
    import torch

    b, n_genes = expr.shape
    rows = np.flatnonzero(rng.random(b) < p)
    if not len(rows):
        return g_pool, g_z
    frac = np.exp(rng.uniform(np.log(1.0 / n_genes), 0.0, len(rows)))
    keep = rng.random((len(rows), n_genes)) < frac[:, None]
    keep[np.arange(len(rows)), rng.integers(0, n_genes, len(rows))] = True
    if p_single > 0:
        single = np.flatnonzero(rng.random(len(rows)) < p_single)
        w = np.asarray(st["gene_std"], np.float64)
        keep[single] = False
        keep[single, rng.choice(n_genes, len(single), p=w / w.sum())] = True
    raw = np.where(keep, expr[rows], st["gene_median"][None]).astype(np.float32)
    g_pool, g_z = g_pool.clone(), g_z.clone()
    g_z[rows] = torch.from_numpy(((raw - st["gene_mean"]) / st["gene_std"]).astype(np.float32))
    pool = (enc.encode_genes(raw) - st["pool_mean"]) / st["pool_std"]
    g_pool[rows] = torch.from_numpy(pool.astype(np.float32))
    return g_pool, g_z


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _save_dit_state(path: Path, dit, ema, opt, step: int, hist: list) -> None:
    t = {f"dit.{k}": v.detach().clone() for k, v in dit.state_dict().items()}
    t.update({f"ema.{k}": v.detach().clone() for k, v in ema.state_dict().items()})
    for i, p in enumerate(dit.parameters()):
        s = opt.state.get(p)
        if s:
            t[f"opt.{i}.exp_avg"] = s["exp_avg"]
            t[f"opt.{i}.exp_avg_sq"] = s["exp_avg_sq"]
            t[f"opt.{i}.step"] = torch_tensor(float(s["step"]))
    _save_state(path, t, {"step": step, "hist": hist})


def torch_tensor(x: float):
    import torch

    return torch.tensor([x], dtype=torch.float32)


def _load_dit_state(path: Path, dit, ema, opt) -> tuple[int, list]:
    import torch
    from safetensors.torch import load_file

    t = load_file(str(path))
    dit.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("dit.")})
    ema.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema.")})
    for i, p in enumerate(dit.parameters()):
        if f"opt.{i}.exp_avg" in t:
            opt.state[p] = {
                "exp_avg": t[f"opt.{i}.exp_avg"],
                "exp_avg_sq": t[f"opt.{i}.exp_avg_sq"],
                "step": torch.tensor(float(t[f"opt.{i}.step"][0])),
            }
    meta = json.loads(path.with_suffix(".json").read_text())
    return int(meta["step"]), meta["hist"]


# ----------------------------------------------------------------------------- entry point


def train_stmdit(
    data_dir: str | Path,
    out: str | Path,
    steps: int = 3000,
    seed: int = 0,
    resume: bool = False,
    threads: int = 1,
    holdout: list[str] | tuple[str, ...] = (),
    labels: str = "both",
    genst: str | Path | None = "default",
    ae_path: str | Path | None = None,
    ae_steps: int = 1500,
    cache_dir: str | Path | None = None,
    command: str = "",
    progress: bool = True,
    note: str = "",
    name: str | None = None,
    **overrides,
) -> Path:
    """Train STMDiT end to end on a HER2ST directory and write the checkpoint ``out``.

    1. tile autoencoder (``ae_path`` reused when given, else trained: ``<out>.ae.safetensors``);
    2. frozen condition encoders copied from the GenST checkpoint ``genst``;
    3. features: measured spots (+ GenST pseudo-labels on every tissue tile when ``labels`` is
       "ptpl" or "both"), sections in ``holdout`` excluded;
    4. the DiT with independent condition dropout and EMA weights.
    """
    import torch

    from ..io.her2st import read_sections
    from ..models.stmdit import GenSTCondition

    torch.set_num_threads(threads)

    safe_cpu_training()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if labels not in ("real", "ptpl", "both"):
        raise StgenError(f"--labels must be real, ptpl or both, got {labels!r}")
    secs = read_sections(data_dir)
    names = [s.name for s in secs]
    bad = [h for h in holdout if h not in names]
    if bad:
        raise StgenError(f"{data_dir}: hold-out section(s) {bad} not found; available: {names}")
    train_secs = [s for s in secs if s.name not in holdout]
    if not train_secs:
        raise StgenError("no training section left after the hold-out")
    if ae_path is None:
        ae_path = out.with_name(out.stem + ".ae.safetensors")
        if not ae_path.exists():
            train_autoencoder(
                data_dir, ae_path, steps=ae_steps, seed=seed, cache_dir=cache_dir, threads=threads
            )
    ae_path = resolve_ae(ae_path)
    ae = load_ae(ae_path)
    mpp, tile_px = ae_geometry(ae)
    tile_px = int(overrides.pop("tile_px", tile_px))
    gmodel, gcard, gpath, gsha = load_genst_model(genst or "default")
    enc = GenSTCondition.from_genst(gmodel)
    panel = list(gcard["genes"])
    feats = [
        section_features(
            s,
            panel,
            enc,
            gmodel if labels != "real" else None,
            cache_dir=cache_dir,
            tile_px=tile_px,
            mpp=mpp,
        )
        for s in train_secs
    ]
    data = assemble(feats, labels)
    tcfg = STMDiTTrainConfig(
        steps=steps,
        seed=seed,
        threads=threads,
        labels=labels,
        holdout=tuple(holdout),
        tile_px=tile_px,
        **overrides,
    )
    extra = {
        "data": {
            "dir": str(data_dir),
            "sections": [s.name for s in train_secs],
            "held_out": list(holdout),
            "note": "tile autoencoder trained on image tiles of all sections (no expression)",
        },
        "command": command,
        "genst": {
            "path": gpath.name,
            "sha256": gsha,
            "name": gcard.get("name", ""),
            "decode": str(gmodel.cfg.decode),
            "label_key": genst_label_key(gmodel),
        },
        "autoencoder": {"path": Path(ae_path).name, "ae_sha256": ae_tensor_sha(ae)},
    }
    if note:
        extra["training_note"] = note
    if name:
        extra["name"] = name
    return train_dit(
        data, ae, enc, panel, out, tcfg, card_extra=extra, resume=resume, progress=progress, mpp=mpp
    )


# ----------------------------------------------------------------------------- fold models

RECIPE_KEYS = tuple(k for k in STMDiTTrainConfig.__dataclass_fields__ if k != "holdout")


def fold_recipe(card: dict) -> dict:
    """The training hyper-parameters recorded in an STMDiT card, without its hold-out."""
    tr = dict(card.get("train", {}))
    missing = [k for k in ("steps", "seed", "labels") if k not in tr]
    if missing:
        raise StgenError(f"the model card records no training recipe ({missing} missing)")
    return {k: tr[k] for k in RECIPE_KEYS if k in tr}


def fold_command(card: dict, data_dir: str | Path, holdout: str, out: str | Path) -> str:
    """The ``stgen train stmdit`` command equivalent to ``train_fold``."""
    r = fold_recipe(card)
    cmd = (
        f"stgen train stmdit --data {data_dir} --out {out} --holdout {holdout} "
        f"--labels {r['labels']} --ae MODEL --steps {r['steps']} --batch {r.get('batch', 32)} "
        f"--seed {r['seed']} --threads {r.get('threads', 1)}"
    )
    if r.get("p_gene_subset", 0.0):
        cmd += f" --gene-subset {r['p_gene_subset']}"
    if r.get("p_gene_single", 0.0):
        cmd += f" --gene-single {r['p_gene_single']}"
    return cmd


def train_fold(
    model: str | Path,
    data_dir: str | Path,
    holdout: str,
    out: str | Path,
    genst: str | Path = "default",
    log=None,
    progress: bool = True,
) -> Path:
    """Train the fold model of ``model`` for ``holdout``: ``model``'s recorded recipe and its
    tile autoencoder, GenST ``genst`` for condition encoders and pseudo-labels, all sections
    of ``data_dir`` except ``holdout``. Seeded (same machine, 1 thread → same weights).

    An existing ``out`` trained with the same recipe and hold-out is reused; ``<out>.state``
    is resumed.
    """
    from ..models.checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(model, "stmdit")
    _, card = load_checkpoint(path, "stmdit")
    recipe = fold_recipe(card)
    out = Path(out)
    if out.is_file():
        _, fcard = load_checkpoint(out, "stmdit")
        if fold_recipe(fcard) == recipe and list(fcard["train"].get("holdout", [])) == [holdout]:
            if log:
                log(f"{out}: fold model with this recipe and hold-out {holdout} exists; reused")
            return out
        raise StgenError(f"{out} exists but was trained with another recipe or hold-out")
    if log:
        log(f"training the fold model {out} (hold-out {holdout}, {recipe['steps']} steps)")
    gsha = card.get("genst", {}).get("label_key")
    if gsha and log:
        gm, *_ = load_genst_model(genst)
        if genst_label_key(gm) != gsha:
            log(f"warning: GenST per-tile outputs differ from the ones {path.name} was trained on")
    steps, seed, labels = recipe.pop("steps"), recipe.pop("seed"), recipe.pop("labels")
    threads = recipe.pop("threads", 1)
    res = train_stmdit(
        data_dir,
        out,
        steps=steps,
        seed=seed,
        resume=True,
        threads=threads,
        holdout=[holdout],
        labels=labels,
        genst=genst,
        ae_path=path,
        command=fold_command(card, data_dir, holdout, out).replace("MODEL", str(path)),
        progress=progress,
        name=f"stmdit_fold_{holdout}",
        **recipe,
    )
    return Path(res)
