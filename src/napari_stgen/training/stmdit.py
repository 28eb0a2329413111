"""Training STMDiT: condition features (GenST), the DiT with EMA, fold models.

The data (``napari_stgen.training.stmdit_data``, cached so folds and the default model
reuse it):

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

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from napari_stgen.errors import StgenError
from napari_stgen.inference.device import safe_cpu_training
from napari_stgen.inference.predictor import load_genst_module
from napari_stgen.inference.sampler_settings import SamplerSettings
from napari_stgen.io.her2st import read_sections
from napari_stgen.models.checkpoint import (
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from napari_stgen.models.stmdit import DiTConfig, GenSTCondition, STMDiT
from napari_stgen.training.stmdit_ae import (
    ae_geometry,
    load_ae,
    resolve_ae,
    train_autoencoder,
    training_device,
)
from napari_stgen.training.stmdit_data import (
    DEFAULT_CACHE,
    TILE_MPP,
    ae_tensor_sha,
    assemble,
    crop,
    dihedral,
    encode_latents,
    fp16_where_exact,
    genst_label_key,
    genst_patches_for_tiles,
    genst_predict,
    lattice_centres,
    lr_factor,
    random_tissue_crops,
    save_state,
    section_features,
    section_image,
    tensors_sha,
    tissue_mask,
)

__all__ = [  # the data and autoencoder helpers are re-exported for existing callers
    "DEFAULT_CACHE",
    "TILE_MPP",
    "STMDiTTrainConfig",
    "ae_geometry",
    "ae_tensor_sha",
    "assemble",
    "crop",
    "dihedral",
    "encode_latents",
    "fold_command",
    "fold_recipe",
    "genst_label_key",
    "genst_patches_for_tiles",
    "genst_predict",
    "lattice_centres",
    "load_ae",
    "load_genst_model",
    "random_tissue_crops",
    "resolve_ae",
    "section_features",
    "section_image",
    "tensors_sha",
    "tissue_mask",
    "train_autoencoder",
    "train_dit",
    "train_fold",
    "train_stmdit",
]

# ----------------------------------------------------------------------------- GenST access


def load_genst_model(name_or_path: str | Path = "default"):
    """(GenST torch model, card, path, sha256) from a GenST checkpoint (no pickle; strict:
    the predictor's loader, ``inference.predictor.load_genst_module``)."""
    return load_genst_module(name_or_path)


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


def train_dit(  # noqa: PLR0913 - the checkpoint's inputs plus run switches tests pass by name
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
    ``rng(seed, step)`` so a resumed run sees the same batches as an uninterrupted one. Runs on
    CUDA with bf16 autocast when a GPU is present, else CPU float32 (same command).
    ``stop_after``: stop (state saved, no checkpoint written, returns None) after that step.
    """
    import torch

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
    dev = training_device()
    amp = dev.type == "cuda"
    dit = STMDiT(cfg).to(dev)
    ema = copy.deepcopy(dit).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(dit.parameters(), lr=tcfg.lr, weight_decay=0.0)
    state_path = Path(str(out) + ".state")
    start, hist = 0, []
    if resume and state_path.exists():
        start, hist = _load_dit_state(state_path, dit, ema, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s + start, tcfg.steps))
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
        x0, t, noise = x0.to(dev), t.to(dev), noise.to(dev)
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
        use_g = (torch.rand(b, generator=gen) >= tcfg.p_drop_gene).to(dev)
        use_m = (torch.rand(b, generator=gen) >= tcfg.p_drop_morph).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            v = dit(xt, t, g_pool.to(dev), g_z.to(dev), morph_t[idx_t].to(dev), use_g, use_m)
        loss = (v.float() - (noise - x0)).pow(2).mean()
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
    tensors = fp16_where_exact(tensors, "ae.")
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
        "sampler": SamplerSettings.card_block(),
        "train": {k: (list(v) if isinstance(v, tuple) else v) for k, v in tcfg.__dict__.items()},
        "train_device": dev.type,
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
    t = {f"dit.{k}": v.detach().cpu().clone() for k, v in dit.state_dict().items()}
    t.update({f"ema.{k}": v.detach().cpu().clone() for k, v in ema.state_dict().items()})
    for i, p in enumerate(dit.parameters()):
        s = opt.state.get(p)
        if s:
            t[f"opt.{i}.exp_avg"] = s["exp_avg"].cpu()
            t[f"opt.{i}.exp_avg_sq"] = s["exp_avg_sq"].cpu()
            t[f"opt.{i}.step"] = torch_tensor(float(s["step"]))
    save_state(path, t, {"step": step, "hist": hist})


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
                "exp_avg": t[f"opt.{i}.exp_avg"].to(p.device),
                "exp_avg_sq": t[f"opt.{i}.exp_avg_sq"].to(p.device),
                "step": torch.tensor(float(t[f"opt.{i}.step"][0])),
            }
    meta = json.loads(path.with_suffix(".json").read_text())
    return int(meta["step"]), meta["hist"]


# ----------------------------------------------------------------------------- entry point


@dataclass(frozen=True)
class RunInfo:
    """Provenance a training run records in its card."""

    command: str = ""  # the command line that ran it
    note: str = ""  # recorded as ``training_note``
    name: str | None = None  # the model's name (default: the output's stem)


def _training_sections(data_dir: str | Path, holdout: tuple[str, ...]) -> list:
    secs = read_sections(data_dir)
    names = [s.name for s in secs]
    bad = [h for h in holdout if h not in names]
    if bad:
        raise StgenError(f"{data_dir}: hold-out section(s) {bad} not found; available: {names}")
    train_secs = [s for s in secs if s.name not in holdout]
    if not train_secs:
        raise StgenError("no training section left after the hold-out")
    return train_secs


def train_stmdit(
    data_dir: str | Path,
    out: str | Path,
    genst: str | Path | None = "default",
    ae_path: str | Path | None = None,
    ae_steps: int = 1500,
    cache_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    info: RunInfo | None = None,
    **overrides: Any,
) -> Path:
    """Train STMDiT end to end on a HER2ST directory and write the checkpoint ``out``.

    ``overrides``: :class:`STMDiTTrainConfig` fields (steps, seed, threads, holdout, labels,
    batch, ...; ``tile_px`` defaults to the autoencoder's).

    1. tile autoencoder (``ae_path`` reused when given, else trained: ``<out>.ae.safetensors``);
    2. frozen condition encoders copied from the GenST checkpoint ``genst``;
    3. features: measured spots (+ GenST pseudo-labels on every tissue tile when ``labels`` is
       "ptpl" or "both"), sections in ``holdout`` excluded;
    4. the DiT with independent condition dropout and EMA weights.
    """
    import torch

    info = info or RunInfo()
    holdout = tuple(overrides.pop("holdout", ()))
    labels = overrides.get("labels", "both")
    seed, threads = overrides.get("seed", 0), overrides.get("threads", 1)
    torch.set_num_threads(threads)

    safe_cpu_training()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if labels not in ("real", "ptpl", "both"):
        raise StgenError(f"labels must be real, ptpl or both, got {labels!r}")
    train_secs = _training_sections(data_dir, holdout)
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
    tcfg = STMDiTTrainConfig(**{**overrides, "holdout": holdout, "tile_px": tile_px})
    extra = {
        "data": {
            "dir": str(data_dir),
            "sections": [s.name for s in train_secs],
            "held_out": list(holdout),
            "note": "sections the DiT trained on; the tile autoencoder's own data are in the "
            "autoencoder block (no expression)",
        },
        "command": info.command,
        "genst": {
            "path": gpath.name,
            "sha256": gsha,
            "name": gcard.get("name", ""),
            "decode": str(gmodel.cfg.decode),
            "label_key": genst_label_key(gmodel),
        },
        "autoencoder": {"path": Path(ae_path).name, "ae_sha256": ae_tensor_sha(ae)},
    }
    if info.note:
        extra["training_note"] = info.note
    if info.name:
        extra["name"] = info.name
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
    command = fold_command(card, data_dir, holdout, out).replace("MODEL", str(path))
    res = train_stmdit(
        data_dir,
        out,
        genst=genst,
        ae_path=path,
        resume=True,
        progress=progress,
        info=RunInfo(command=command, name=f"stmdit_fold_{holdout}"),
        **{**recipe, "holdout": [holdout]},
    )
    return Path(res)
