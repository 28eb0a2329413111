"""GenST training: gene VQ-VAE, then alignment + histology VQ-VAE jointly; checkpointing.

Stage A (gene VQ-VAE): standardized log1p CP10k profiles of the training spots → MLP
encoder → EMA VQ → MLP decoder; loss = quantized + continuous reconstruction + commitment.
Stage B (alignment): spot patch (augmented) → multi-scale conv encoder → aligner → ẑ.
  L = MSE(decoder(ẑ), y) + a·MSE(ẑ, z_gene) + b·InfoNCE(ẑ, z_gene) + c·CE(code logits, code)
and, every ``recon_every`` steps, the histology VQ-VAE loss (reconstruction + commitment) on a
batch of unlabelled tissue tiles (self-supervision of the same encoder, fills the image
codebook). The gene encoder and codebook are frozen in stage B; the decoder is fine-tuned.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from napari_stgen.inference.confidence import K_NOVELTY, SHIPPED, fit_confidence
from napari_stgen.inference.contract import BATCH_SIZE
from napari_stgen.inference.device import safe_cpu_training
from napari_stgen.inference.predictor import load_genst
from napari_stgen.io.her2st import (
    list_expression_sections,
    read_expression_section,
    smooth_over_neighbours,
)
from napari_stgen.models.checkpoint import load_checkpoint, save_checkpoint
from napari_stgen.models.genst import GenST, GenSTConfig, code_logits, to_input, views
from napari_stgen.training.data import (
    CardNotes,
    SectionData,
    data_entry,
    load_dataset,
    split_holdout,
    training_entry,
)
from napari_stgen.training.genst_context import ContextConfig, train_context


@dataclass
class TrainConfig:
    """Training hyper-parameters (stored in the model card)."""

    epochs: int = 20
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    gene_steps: int = 600
    label_self_weight: float = 0.5  # label denoising: w·self + (1-w)·mean(array neighbours)
    w_latent: float = 0.5
    w_nce: float = 0.1
    w_code: float = 0.1
    decoder_lr_scale: float = 0.3
    recon_every: int = 4
    recon_batch: int = 16
    w_recon: float = 0.5
    colour_jitter: float = 0.05
    stain_aug: str = "rgb"  # "rgb": per-channel RGB jitter; "hed": H/E/DAB-space jitter
    hed_sigma: float = 0.1  # with stain_aug "hed": per-stain scale U(1±σ), shift U(±σ/10)
    gene_data: str | None = None  # expression-only sections for stage A (held-out patient out)
    decode: str = "soft"  # inference decoding written to the card (see docs/models.md)
    context_steps: int = 1500  # stage C (spatial context head, genst_context.py); 0: none
    weight_avg_from: float = 0.0  # >0: uniform average of stage-B iterates from this fraction on
    w_consist: float = 0.0  # >0: second augmented view per batch, MSE between the two ẑ
    seed: int = 0
    threads: int = 1
    extra: dict = field(default_factory=dict)


def hed_jitter(x, rng: np.random.Generator, sigma: float):
    """Stain augmentation in H/E/DAB optical-density space (Tellez et al. 2018): each stain of
    each patch scaled by U(1 - σ, 1 + σ) and shifted by U(-σ/10, σ/10); x float (N, 3, H, W)
    in [0, 1] → same. Colour deconvolution matrices of skimage.color (Ruifrok & Johnston)."""
    import torch
    from skimage.color import hed_from_rgb, rgb_from_hed

    n = x.shape[0]
    log_adj = float(np.log(1e-6))
    m_in = torch.from_numpy(np.asarray(hed_from_rgb, np.float32))
    m_out = torch.from_numpy(np.asarray(rgb_from_hed, np.float32))
    od = torch.log(x.clamp_min(1e-6)).permute(0, 2, 3, 1) / log_adj  # (N, H, W, 3)
    hed = od @ m_in  # not clipped at 0 (as skimage does), so σ = 0 is the identity
    a = torch.from_numpy(rng.uniform(1 - sigma, 1 + sigma, (n, 1, 1, 3))).float()
    b = torch.from_numpy(rng.uniform(-sigma / 10, sigma / 10, (n, 1, 1, 3))).float()
    hed = hed * a + b
    rgb = torch.exp((hed * log_adj) @ m_out).clamp(0, 1)
    return rgb.permute(0, 3, 1, 2).contiguous()


def augment(
    batch: np.ndarray,
    rng: np.random.Generator,
    jitter: float,
    stain: str = "rgb",
    hed_sigma: float = 0.1,
):
    """uint8 (N, H, W, 3) → normalized float tensor (N, 3, H, W) with flips, 90° rotations and
    colour (stain) jitter: per-channel RGB scale/shift (``stain="rgb"``) or H/E/DAB-space
    (``stain="hed"``, then brightness only in RGB)."""
    import torch

    out = np.empty_like(batch)
    for i, p in enumerate(batch):
        q = np.rot90(p, int(rng.integers(4)))
        if rng.random() < 0.5:
            q = q[:, ::-1]
        out[i] = q
    x = torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0
    if stain == "hed":
        x = hed_jitter(x, rng, hed_sigma)
        if jitter > 0:
            bright = 1 + jitter * torch.from_numpy(rng.standard_normal((len(x), 1, 1, 1))).float()
            x = ((x - 0.5) * bright + 0.5).clamp(0, 1)
    elif jitter > 0:
        n = len(batch)
        scale = 1 + jitter * torch.from_numpy(rng.standard_normal((n, 3, 1, 1))).float()
        shift = jitter * torch.from_numpy(rng.standard_normal((n, 3, 1, 1))).float()
        bright = 1 + jitter * torch.from_numpy(rng.standard_normal((n, 1, 1, 1))).float()
        x = ((x - 0.5) * scale * bright + 0.5 + shift).clamp(0, 1)
    return to_input(x)


def denoised_targets(sections: list[SectionData], self_weight: float) -> np.ndarray:
    """Targets of all spots, each mixed with its array neighbours' mean (label denoising)."""
    ys = []
    for s in sections:
        if self_weight >= 1.0:
            ys.append(s.y)
        else:
            ys.append(smooth_over_neighbours(s.y, s.neighbours(), self_weight))
    return np.concatenate(ys, 0).astype(np.float32)


def per_section(sections: list[SectionData], rows: np.ndarray) -> list[np.ndarray]:
    """Split rows stacked over ``sections`` (in order) back into one array per section."""
    return np.split(rows, np.cumsum([len(s.y) for s in sections])[:-1])


def _cosine(step: int, total: int, warm: int = 50) -> float:
    warm = max(1, min(warm, total // 10))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def train_gene_vqvae(model: GenST, y_std: np.ndarray, steps: int, rng, batch: int = 128, log=None):
    """Stage A on standardized profiles; returns the final losses."""
    import torch

    g = model.gene
    g.train()
    opt = torch.optim.AdamW(g.parameters(), lr=2e-3, weight_decay=1e-4)
    Y = torch.from_numpy(y_std)
    last = {}
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(Y), min(batch, len(Y))))
        y = Y[idx]
        y_in = y + 0.1 * torch.randn_like(y)
        z = g.encode(y_in)
        q, code, commit = g.vq(z)
        loss_q = torch.nn.functional.mse_loss(g.decoder(q), y)
        loss_s = torch.nn.functional.mse_loss(g.decoder(z), y)
        loss = loss_q + loss_s + commit
        for pg in opt.param_groups:
            pg["lr"] = 2e-3 * _cosine(step, steps, 30)
        opt.zero_grad()
        loss.backward()
        opt.step()
        last = {k: float(v.detach()) for k, v in (("rec_q", loss_q), ("rec_soft", loss_s))}
    if log:
        log(f"gene VQ-VAE: {last}")
    return last


def extra_gene_profiles(
    data_dir: str | Path, panel: list[str], exclude_patients: set[str], self_weight: float
) -> tuple[np.ndarray, list[str]]:
    """Label-denoised log1p CP10k profiles (panel order) of the expression-only sections of
    ``data_dir`` whose patient (first letter) is not in ``exclude_patients``, and their names."""

    ys, names = [], []
    for name in list_expression_sections(data_dir):
        if name[:1] in exclude_patients:
            continue
        sec = read_expression_section(data_dir, name)
        y = sec.target(panel)
        if self_weight < 1.0:
            y = smooth_over_neighbours(y, sec.neighbours(), self_weight)
        ys.append(y)
        names.append(name)
    if not ys:
        return np.zeros((0, len(panel)), np.float32), []
    return np.concatenate(ys, 0).astype(np.float32), names


def spot_loss(model: GenST, patches: np.ndarray, y, zg, code, rng, tcfg: TrainConfig):
    """Stage B's loss on one batch of labelled spots (uint8 patches, standardized targets,
    gene latents and codes): expression + latent MSE, InfoNCE, code CE, and with
    ``tcfg.w_consist`` a second augmented view's latent pulled to the first; → (loss, parts)."""
    import torch
    import torch.nn.functional as F

    x = augment(patches, rng, tcfg.colour_jitter, tcfg.stain_aug, tcfg.hed_sigma)
    zhat, _ = model.image_to_gene_latent(x)
    l_expr = F.mse_loss(model.gene.decoder(zhat), y)
    l_lat = F.mse_loss(zhat, zg)
    l_cons = None
    if tcfg.w_consist > 0:  # a second stain/geometry view of the same spots
        x2 = augment(patches, rng, tcfg.colour_jitter, tcfg.stain_aug, tcfg.hed_sigma)
        zhat2, _ = model.image_to_gene_latent(x2)
        l_expr = 0.5 * (l_expr + F.mse_loss(model.gene.decoder(zhat2), y))
        l_cons = F.mse_loss(zhat, zhat2)
    a = F.normalize(zhat, dim=1)
    bvec = F.normalize(zg, dim=1)
    logits = model.logit_scale.exp().clamp(max=100) * a @ bvec.t()
    tgt = torch.arange(len(patches))
    l_nce = 0.5 * (F.cross_entropy(logits, tgt) + F.cross_entropy(logits.t(), tgt))
    l_code = F.cross_entropy(code_logits(model.gene.vq.distances(zhat)), code)
    loss = l_expr + tcfg.w_latent * l_lat + tcfg.w_nce * l_nce + tcfg.w_code * l_code
    parts = {"expr": l_expr, "lat": l_lat, "nce": l_nce, "code": l_code}
    if l_cons is not None:
        loss = loss + tcfg.w_consist * l_cons
        parts["consist"] = l_cons
    return loss, parts


def train_genst(
    train: list[SectionData],
    panel: list[str],
    cfg=None,
    tcfg: TrainConfig | None = None,
    resume_path: str | Path | None = None,
    progress: bool = True,
    log=print,
    exclude_patients: set[str] | None = None,
):
    """Train a GenST model on ``train`` sections; returns (model, history dict).

    With ``tcfg.gene_data`` the gene VQ-VAE (stage A) also sees the expression-only sections
    there, minus those of ``exclude_patients`` (a held-out section's patient)."""
    import torch
    from torch.optim.swa_utils import AveragedModel
    from tqdm import tqdm

    tcfg = tcfg or TrainConfig()
    torch.set_num_threads(max(1, tcfg.threads))
    safe_cpu_training()
    torch.manual_seed(tcfg.seed)
    rng = np.random.default_rng(tcfg.seed)
    cfg = cfg or GenSTConfig(n_genes=len(panel))
    cfg.n_genes = len(panel)
    model = GenST(cfg)

    Y = denoised_targets(train, tcfg.label_self_weight)
    mu, sd = Y.mean(0), Y.std(0) + 1e-3
    model.y_mean.copy_(torch.from_numpy(mu))
    model.y_std.copy_(torch.from_numpy(sd))
    Ys = (Y - mu) / sd
    X = np.concatenate([s.patches for s in train], 0)
    tiles = np.concatenate([s.tiles for s in train], 0)
    hist: dict = {"n_spots": int(len(X)), "n_tiles": int(len(tiles))}
    t0 = time.time()

    steps_per_epoch = max(1, len(X) // tcfg.batch)
    total = steps_per_epoch * tcfg.epochs
    start_epoch = 0
    state = None
    if resume_path is not None and Path(resume_path).exists():
        state = load_resume(resume_path, model)
        start_epoch = int(state["epoch"])
        rng = np.random.default_rng(tcfg.seed + 1000 * start_epoch)
        log(f"resumed from {resume_path} at epoch {start_epoch}")
    else:
        Ya = Ys
        if tcfg.gene_data:
            extra, names = extra_gene_profiles(
                tcfg.gene_data, panel, set(exclude_patients or ()), tcfg.label_self_weight
            )
            hist["gene_data_sections"] = names
            hist["gene_data_spots"] = int(len(extra))
            Ya = np.concatenate([Ys, (extra - mu) / sd], 0).astype(np.float32)
            log(f"gene VQ-VAE on {len(Ya)} spots ({len(names)} expression-only sections)")
        train_gene_vqvae(model, Ya, tcfg.gene_steps, rng, log=log)

    # stage B: gene encoder + codebook frozen; decoder fine-tuned slowly
    for p in model.gene.encoder.parameters():
        p.requires_grad_(False)
    dec_params = list(model.gene.decoder.parameters())
    other = [
        p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("gene.")
    ]
    opt = torch.optim.AdamW(
        [
            {"params": other, "lr_scale": 1.0},
            {"params": dec_params, "lr_scale": tcfg.decoder_lr_scale},
        ],
        lr=tcfg.lr,
        weight_decay=tcfg.weight_decay,
    )
    if state is not None and "optimizer" in state:
        _load_opt(opt, state["optimizer"])
    Yt = torch.from_numpy(Ys)
    with torch.no_grad():
        model.gene.eval()
        Zg = model.gene.encode(Yt)
        code_g = model.gene.vq.codes(Zg)
    hist["gene_codes_train"] = model.gene.vq.health(code_g)

    step = start_epoch * steps_per_epoch
    avg_start = int(tcfg.weight_avg_from * total)
    # uniform mean of the late iterates (SWA, Izmailov et al. 2018; dense as SWAD); buffers
    # (the VQ codebooks' EMA statistics) stay the live model's
    avg = AveragedModel(model) if tcfg.weight_avg_from > 0 else None
    bar = tqdm(range(start_epoch, tcfg.epochs), desc="GenST", disable=not progress, unit="epoch")
    for epoch in bar:
        model.train()
        model.gene.eval()  # frozen gene VQ (no EMA updates)
        perm = rng.permutation(len(X))
        sums: dict[str, float] = {}
        for b in range(steps_per_epoch):
            idx = perm[b * tcfg.batch : (b + 1) * tcfg.batch]
            loss, parts = spot_loss(model, X[idx], Yt[idx], Zg[idx], code_g[idx], rng, tcfg)
            if tcfg.recon_every and b % tcfg.recon_every == 0 and len(tiles):
                tix = rng.integers(0, len(tiles), tcfg.recon_batch)
                xt = augment(tiles[tix], rng, tcfg.colour_jitter, tcfg.stain_aug, tcfg.hed_sigma)
                v = views(xt, cfg)[0]
                _, _, lv = model.histo(v)
                l_rec = lv["rec"] + lv["commit"]
                loss = loss + tcfg.w_recon * l_rec
                parts["recon"] = lv["rec"]
            lr = tcfg.lr * _cosine(step, total)
            for pg in opt.param_groups:
                pg["lr"] = lr * pg["lr_scale"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if avg is not None and step > avg_start:
                avg.update_parameters(model)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        ep = {k: v / steps_per_epoch for k, v in sums.items()}
        hist.setdefault("epochs", []).append(ep)
        bar.set_postfix({k: f"{v:.3f}" for k, v in ep.items()})
        if resume_path is not None:
            save_resume(resume_path, model, opt, epoch + 1, tcfg)
    if avg is not None and int(avg.n_averaged):
        with torch.no_grad():
            for p_avg, p in zip(avg.module.parameters(), model.parameters(), strict=True):
                p.copy_(p_avg)
        hist["weight_average"] = {"from_step": avg_start, "iterates": int(avg.n_averaged)}
    if tcfg.context_steps > 0:
        targets = per_section(train, Ys)
        ccfg = ContextConfig(steps=tcfg.context_steps, seed=tcfg.seed)
        hist["context"] = train_context(model, train, targets, ccfg, progress=progress, log=log)
        hist["context_config"] = dict(ccfg.__dict__)
    hist["train_seconds"] = time.time() - t0
    model.cfg.decode = tcfg.decode
    hist["image_codes"] = model.histo.vq.health()
    model.eval()
    return model, hist


# ----------------------------------------------------------------- resumable state (no pickle)
def _opt_tensors(opt) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": [], "scalars": {}}
    for g in sd["param_groups"]:
        meta["param_groups"].append({k: v for k, v in g.items()})
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if hasattr(v, "shape"):
                tensors[f"opt.{pid}.{k}"] = v
            else:
                meta["scalars"][f"{pid}.{k}"] = float(v)
    return tensors, meta


def _load_opt(opt, packed: tuple[dict, dict]) -> None:
    tensors, meta = packed
    state: dict = {}
    for key, v in tensors.items():
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_resume(path: str | Path, model: GenST, opt, epoch: int, tcfg: TrainConfig) -> None:
    """Resumable training state (model + optimizer + epoch) as a safetensors checkpoint."""

    t, meta = _opt_tensors(opt)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(t)
    card = {
        "kind": "genst_resume",
        "epoch": epoch,
        "optimizer": meta,
        "config": model.cfg.to_dict(),
        "train": tcfg.__dict__,
    }
    save_checkpoint(path, tensors, card)


def load_resume(path: str | Path, model: GenST) -> dict:
    import torch

    tensors, card = load_checkpoint(path, "genst_resume")
    msd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(msd)
    model.histo.vq.initted.fill_(1)
    opt_t = {k: v for k, v in tensors.items() if k.startswith("opt.")}
    del torch
    return {"epoch": card["epoch"], "optimizer": (opt_t, card["optimizer"])}


def predict_patches(
    model: GenST, patches: np.ndarray, tta: int = 4, batch: int = BATCH_SIZE, mode=None
):
    """(expr (N, G) log1p CP10k, gene codes (N,)) for uint8 patches, on CPU, no grad."""
    import torch

    model.eval()
    outs, codes = [], []
    with torch.inference_mode():
        for i in range(0, len(patches), batch):
            x = to_input(torch.from_numpy(np.ascontiguousarray(patches[i : i + batch])))
            e, c, _ = model.predict(x, mode=mode, tta=tta)
            outs.append(e.numpy())
            codes.append(c.numpy())
    return np.concatenate(outs, 0), np.concatenate(codes, 0)


def genst_card(
    model: GenST, panel: list[str], bench: list[str], tcfg: TrainConfig, **extra
) -> dict:
    """The GenST model card (without sha256, which the sidecar adds)."""
    cfg = model.cfg
    card = {
        "kind": "genst",
        "name": extra.pop("name", "genst"),
        "architecture": {"class": "GenST", **cfg.to_dict()},
        "genes": list(panel),
        "benchmark_genes": list(bench),
        "mpp": cfg.mpp,
        "patch_px": cfg.patch_px,
        "patch_um": cfg.patch_um,
        "normalization": "log1p(counts / total * 10000) per spot",
        "input": "uint8 RGB patch centred on the spot, patch_um µm at mpp µm/px",
        "train": {k: v for k, v in tcfg.__dict__.items()},
        "tensor_shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
        "n_codes": cfg.gene_codes,
    }
    card.update(extra)
    return json.loads(json.dumps(card, default=str))


def codebook_card(model: GenST, sections: list[SectionData], tta: int = 1) -> dict:
    """Gene codebook usage by the training profiles and by the images (aligned), and the
    image codebook's running usage."""
    import torch

    Y = np.concatenate([s.y for s in sections], 0)
    with torch.inference_mode():
        zg = model.gene.encode(model.standardize(torch.from_numpy(Y)))
        prof = model.gene.vq.health(model.gene.vq.codes(zg))
    X = np.concatenate([s.patches for s in sections], 0)
    _, codes = predict_patches(model, X, tta=tta)
    img = model.gene.vq.health(torch.from_numpy(codes))
    for d in (prof, img):
        d.pop("restarts", None)
        d["perplexity"] = round(d["perplexity"], 2)
    hist = model.histo.vq.health()
    hist["perplexity"] = round(hist["perplexity"], 2)
    return {"gene_codes_profiles": prof, "gene_codes_images": img, "image_codebook": hist}


def confidence_card(conf, sections: list[str]) -> dict:
    """Model-card entry for the per-tile uncertainty the checkpoint carries."""
    return {
        "uncertainty": SHIPPED,
        "definition": "standardized feature novelty (mean distance to the "
        f"{K_NOVELTY} nearest training-spot image features) + the standardized code-posterior "
        "entropy's excess over its training mean (max(z_entropy, 0)); inference/confidence.py",
        "bank_spots": int(len(conf.bank)),
        "bank_sections": sections,
        "stats": [round(float(v), 6) for v in conf.stats],
    }


def attach_confidence(path: str | Path, data_dir: str | Path, cache_dir=None) -> Path:
    """Re-save a GenST checkpoint (same model tensors) with the confidence bank of its
    training sections (those its card names) added."""

    tensors, card = load_checkpoint(path, "genst")
    for k in [k for k in tensors if k.startswith("confidence.")]:
        tensors.pop(k)
    names = card["data"]["sections"]
    sections, _, _ = load_dataset(data_dir, cache_dir=cache_dir, names=names)
    model = load_genst(path, device="cpu").model
    conf = fit_confidence(model, np.concatenate([s.patches for s in sections], 0))
    tensors.update(conf.tensors())
    card["tensor_shapes"] = {k: list(v.shape) for k, v in tensors.items()}
    card["confidence"] = confidence_card(conf, names)
    card.pop("sha256", None)
    card.pop("size_bytes", None)
    return save_checkpoint(path, tensors, card)


def train_and_save_genst(
    data_dir,
    out,
    tcfg: TrainConfig | None = None,
    holdout: str | None = None,
    resume: bool = False,
    cache_dir=None,
    notes: CardNotes | None = None,
    folds_json=None,
    progress: bool = True,
    cfg=None,
) -> Path:
    """Train on the sections of ``data_dir`` (minus ``holdout``) and write checkpoint + card
    (``notes``: name, command; the evaluation is read from ``folds_json`` when given)."""
    tcfg = tcfg or TrainConfig()
    notes = notes or CardNotes()
    out = Path(out)
    sections, panel, bench = load_dataset(data_dir, cache_dir=cache_dir)
    _, train = split_holdout(sections, holdout, data_dir)
    resume_path = out.with_name(out.stem + ".resume.safetensors")
    if not resume and resume_path.exists():
        resume_path.unlink()
    model, hist = train_genst(
        train,
        panel,
        cfg,
        tcfg,
        resume_path=resume_path,
        progress=progress,
        exclude_patients={holdout[:1]} if holdout else None,
    )
    if folds_json is not None:
        notes = replace(notes, evaluation=json.loads(Path(folds_json).read_text()))
    command = (
        f"stgen train genst --data {data_dir} --out {out} --epochs {tcfg.epochs} "
        f"--seed {tcfg.seed}" + (f" --holdout {holdout}" if holdout else "")
    )
    card = genst_card(
        model,
        panel,
        bench,
        tcfg,
        **notes.card_entries(out, command),
        tta=4,
        data=data_entry(
            data_dir,
            train,
            n_unlabelled_tiles=int(sum(len(s.tiles) for s in train)),
            source="HER2ST (Andersson et al. 2021), sections B4, C2-C5",
            gene_data_sections=hist.get("gene_data_sections", []),
            label_denoising=f"target = {tcfg.label_self_weight}*self + "
            f"{1 - tcfg.label_self_weight:.2f}*mean(array neighbours)",
        ),
        codebook=codebook_card(model, train),
        context_head=None
        if "context" not in hist
        else {
            "config": hist["context_config"],
            "losses": hist["context"]["losses"],
            "seconds": hist["context"]["seconds"],
            "n_windows": hist["context"]["n_windows"],
        },
        training=training_entry(
            hist["train_seconds"],
            tcfg.threads,
            final_losses=hist["epochs"][-1] if hist.get("epochs") else {},
        ),
    )
    tensors = dict(model.state_dict())
    conf = fit_confidence(model, np.concatenate([s.patches for s in train], 0))
    tensors.update(conf.tensors())
    card["tensor_shapes"] = {k: list(v.shape) for k, v in tensors.items()}
    card["confidence"] = confidence_card(conf, [s.name for s in train])
    save_checkpoint(out, tensors, card)
    if resume_path.exists():
        resume_path.unlink()
    resume_side = resume_path.with_suffix(".json")
    if resume_side.exists():
        resume_side.unlink()
    return out
