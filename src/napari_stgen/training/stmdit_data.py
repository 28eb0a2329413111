"""STMDiT training data: section images at the tiles' µm/px, spot and lattice tiles with
their conditions (cached), GenST pseudo-labels, and the resumable-state file helpers.

Everything is cached under ``cache_dir`` so folds and the default model reuse it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from napari_stgen.errors import StgenError
from napari_stgen.inference.patches import crop_padded
from napari_stgen.inference.synthesis import ring_tiles
from napari_stgen.io.atomic import atomic_path, write_text_atomic
from napari_stgen.models.genst import to_input
from napari_stgen.models.stmdit import images_to_tensor
from napari_stgen.training.data import cache_dir as _cache_dir

TILE_MPP = 1.75  # µm per pixel of generated tiles
DEFAULT_CACHE = _cache_dir("stmdit", "STGEN_CACHE_STMDIT")


# ----------------------------------------------------------------------------- images


def section_image(sec, mpp: float, cache_dir: Path) -> np.ndarray:
    """The section image resampled to ``mpp`` µm/px (cached .npy, memory-mapped)."""
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
        with atomic_path(path) as tmp:
            np.save(tmp, arr)
    return np.load(path, mmap_mode="r")


def tissue_mask(img: np.ndarray) -> np.ndarray:
    """Boolean (H, W) tissue mask: saturated or dark pixels (as ``tissue_fraction``)."""
    p = np.asarray(img).astype(np.int16)
    return ((p.max(-1) - p.min(-1)) > 20) | (p.mean(-1) < 200)


def crop(img: np.ndarray, cx: float, cy: float, px: int) -> np.ndarray:
    """``px``×``px`` crop centred on (cx, cy) (pixels of ``img``), white outside."""
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


# ----------------------------------------------------------------------------- resumable state


def lr_factor(step: int, total: int, warm: int = 100) -> float:
    """Linear warm-up then cosine decay of the learning rate."""
    warm = max(1, min(warm, total // 10))
    return min(1.0, (step + 1) / warm) * 0.5 * (1 + float(np.cos(np.pi * min(step / total, 1.0))))


def save_state(path: Path, tensors: dict, meta: dict) -> None:
    """Write a resumable state: tensors (safetensors) and its JSON metadata, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    write_text_atomic(path.with_suffix(".json"), json.dumps(meta))


# ----------------------------------------------------------------------------- GenST labels


def genst_predict(model, patches: np.ndarray, tta: int = 4, batch: int = 128) -> np.ndarray:
    """GenST expression (N, G) log1p CP10k on uint8 224 µm patches (resampled to GenST's
    patch size when they are at another µm/px)."""
    import torch
    import torch.nn.functional as F

    out = []
    px = int(model.cfg.patch_px)
    with torch.inference_mode():
        for i in range(0, len(patches), batch):
            x = to_input(torch.from_numpy(np.ascontiguousarray(patches[i : i + batch])))
            if x.shape[-1] != px:  # patches at another µm/px than GenST's (same 224 µm)
                x = F.interpolate(x, size=(px, px), mode="area")
            out.append(model.predict(x, tta=tta)[0].numpy())
    return np.concatenate(out, 0).astype(np.float32) if out else np.zeros((0, model.cfg.n_genes))


def genst_patches_for_tiles(tiles: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
    """GenST input patches (224 µm = 2 tiles) for 112 µm tiles, at the tiles' µm/px: the tile in
    the centre of its real ``context`` (N, 2t, 2t, 3) when given, else reflect-padded (tile
    content only). ``genst_predict`` resamples them to GenST's patch size when they differ.
    """
    tiles = np.asarray(tiles)
    t = tiles.shape[1]
    pad = t // 2
    if context is not None:
        out = np.array(context, copy=True)
        out[:, pad : pad + t, pad : pad + t] = tiles
        return out
    return np.pad(tiles, ((0, 0), (pad, t - pad), (pad, t - pad), (0, 0)), mode="reflect")


# ----------------------------------------------------------------------------- features


def _enc_key(enc) -> str:
    h = hashlib.sha1()
    for k, v in sorted(enc.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:10]


def genst_label_key(genst) -> str:
    """Cache key of a GenST model's per-tile predictions: its per-tile tensors (the spatial
    ``context.*`` head, which per-tile prediction does not use, is left out) and decode mode."""
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
    with atomic_path(path) as tmp:
        np.savez(tmp, **out)
    return out


# ----------------------------------------------------------------------------- rows


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

    out = []
    with torch.inference_mode():
        for i in range(0, len(tiles), batch):
            out.append(ae.encode(images_to_tensor(tiles[i : i + batch]))[0].numpy())
    return np.concatenate(out, 0).astype(np.float32)


def tensors_sha(tensors: dict) -> str:
    """sha256 over named tensors (sorted names and values): identifies weights independently
    of a checkpoint file's metadata (whose card records wall-clock times) and of the storage
    dtype (floating tensors are hashed as float32 values, so a lossless fp16 copy has the
    same checksum)."""
    h = hashlib.sha256()
    for k, v in sorted(tensors.items()):
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.float()
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


def fp16_where_exact(tensors: dict, prefix: str) -> dict:
    """``tensors`` with the float32 ones under ``prefix`` stored as float16 where that loses
    nothing (the v2 autoencoder's weights are fp16 values); loaders cast back to float32."""
    import torch

    out = dict(tensors)
    for k, v in tensors.items():
        if k.startswith(prefix) and v.dtype == torch.float32:
            h = v.half()
            if torch.equal(h.float(), v):
                out[k] = h
    return out


def ae_tensor_sha(ae) -> str:
    """``tensors_sha`` of an autoencoder's state."""
    return tensors_sha(ae.state_dict())
