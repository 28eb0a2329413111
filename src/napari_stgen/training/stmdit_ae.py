"""Tile autoencoder v2 for STMDiT: resumable training (CPU, or CUDA bf16); reconstruction figures.

Recipe of latent-diffusion autoencoders without a pretrained perceptual network: L1 + a
multi-scale gradient loss + a Fourier-amplitude loss + a KL term, and a PatchGAN hinge
adversarial term (adaptive weight) switched on after ``disc_start`` steps. Random tissue crops
of the training sections at ``mpp`` µm/px, all 8 dihedral transforms, stain jitter in HED space.

Every batch and noise draw comes from ``rng(seed, step)``, so a run resumed from its state
file (weights, discriminator, both Adam states, step) continues bit-identically.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from napari_stgen.inference.device import safe_cpu_training
from napari_stgen.io.atomic import atomic_path
from napari_stgen.io.her2st import read_sections
from napari_stgen.models.checkpoint import resolve_checkpoint
from napari_stgen.models.stmdit import (
    AE2Config,
    AEConfig,
    PatchDiscriminator,
    TileAutoencoder,
    TileAutoencoderV2,
    autoencoder_from_config,
    images_to_tensor,
    tensor_to_images,
)
from napari_stgen.training.stmdit_data import (
    DEFAULT_CACHE,
    TILE_MPP,
    dihedral,
    lr_factor,
    random_tissue_crops,
    save_state,
    section_image,
)

AE2_MPP = 0.875  # µm per pixel of the v2 autoencoder (128 px per 112 µm)

_LOG_EPS = np.log(1e-6)
_EMAS = ("ema_real", "ema_fake")  # LeCam EMAs of D's mean logits


def hed_jitter_uint8(
    tiles: np.ndarray, rng: np.random.Generator, sigma: float = 0.05, bias: float = 0.01
) -> np.ndarray:
    """Stain augmentation (Tellez et al.): per tile and stain, HED → α·HED + β → RGB.

    α ~ U(1−σ, 1+σ), β ~ U(−bias, bias); uint8 (N, H, W, 3) in and out. The identity jitter
    reproduces the input (no clipping in HED space)."""
    from skimage.color.colorconv import hed_from_rgb, rgb_from_hed

    x = np.maximum(np.asarray(tiles, np.float64) / 255.0, 1e-6)
    hed = (np.log(x) / _LOG_EPS) @ hed_from_rgb
    n = len(x)
    a = rng.uniform(1 - sigma, 1 + sigma, (n, 1, 1, 3))
    b = rng.uniform(-bias, bias, (n, 1, 1, 3))
    rgb = np.exp((hed * a + b) @ rgb_from_hed * _LOG_EPS)
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


@dataclass
class AE2TrainConfig:
    """Training hyper-parameters of the v2 autoencoder (stored with the weights)."""

    steps: int = 20000
    batch: int = 8
    crop_px: int = 64  # training crops (fully convolutional: tiles are 128 px)
    lr: float = 2e-4
    disc_lr: float = 2e-4
    kl_weight: float = 1e-6
    grad_weight: float = 0.5
    freq_weight: float = 0.1
    disc_start: int = 2000
    disc_weight: float = 0.5
    disc_norm: str = "group"  # PatchDiscriminator norm: "spectral" or "group" (the first)
    disc_schedule: bool = False  # apply the generator's lr schedule to D too (the first runs)
    adaptive_max: float = 1.0  # clamp of the adaptive adversarial weight (1e4 in LDM)
    lecam_weight: float = 0.0  # LeCam regulariser of D (Tseng et al. 2021), EMA decay 0.99
    disc_warmup: int = 100  # steps a new D trains alone, then as many of ramping its G weight
    disc_gate: float = 0.2  # G's adversarial weight × clamp(D's EMA logit gap / this, 0, 1)
    seed: int = 0
    threads: int = 1
    save_every_s: float = 240.0
    mpp: float = AE2_MPP
    ch: tuple[int, ...] = (32, 64, 128, 192)
    z_ch: int = 8
    disc_ch: int = 32
    sections: tuple[str, ...] = ()
    holdout: tuple[str, ...] = ("C3",)
    extra: dict = field(default_factory=dict)


def gradient_loss(rec, x, scales: int = 3):
    """Mean L1 difference of horizontal and vertical finite differences over ``scales``
    dyadic scales (average-pooled)."""
    import torch.nn.functional as F

    loss = 0.0
    for s in range(scales):
        if s:
            rec, x = F.avg_pool2d(rec, 2), F.avg_pool2d(x, 2)
        for d in (-1, -2):
            loss = loss + (rec.diff(dim=d) - x.diff(dim=d)).abs().mean()
    return loss / scales


def frequency_loss(rec, x):
    """L1 between log(1 + |FFT|) amplitude spectra (orthonormal FFT), per channel."""
    import torch

    fa = torch.fft.rfft2(rec.float(), norm="ortho").abs()
    fb = torch.fft.rfft2(x.float(), norm="ortho").abs()
    return (torch.log1p(fa) - torch.log1p(fb)).abs().mean()


def training_device():
    """CUDA when a GPU is present, else the CPU (the trainers' device)."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _opt_tensors(opt, params, prefix: str) -> dict:
    out = {}
    for i, p in enumerate(params):
        s = opt.state.get(p)
        if s:
            out[f"{prefix}.{i}.exp_avg"] = s["exp_avg"].detach().cpu()
            out[f"{prefix}.{i}.exp_avg_sq"] = s["exp_avg_sq"].detach().cpu()
            out[f"{prefix}.{i}.step"] = s["step"].detach().cpu().reshape(1).float()
    return out


def _load_opt(opt, params, t: dict, prefix: str, device) -> None:
    import torch

    for i, p in enumerate(params):
        if f"{prefix}.{i}.exp_avg" in t:
            opt.state[p] = {
                "exp_avg": t[f"{prefix}.{i}.exp_avg"].to(device),
                "exp_avg_sq": t[f"{prefix}.{i}.exp_avg_sq"].to(device),
                "step": torch.tensor(float(t[f"{prefix}.{i}.step"][0])),
            }


def discriminator_step(disc, dopt, real, fake, amp: bool = False, lecam=None) -> dict:
    """One hinge-loss update of the PatchGAN ``disc`` on ``real`` vs ``fake`` (detached) crops.

    ``lecam``: None, or a dict ``{"weight": w, "ema_real": tensor, "ema_fake": tensor}`` (EMAs
    of the mean logits, decay 0.99, updated in place; the trainer gates G's adversarial term
    on their gap): with ``w > 0`` adds ``w·(‖D(real) − ema_fake‖² + ‖D(fake) − ema_real‖²)``
    (LeCam), which keeps the logits from drifting apart or collapsing.
    Returns the hinge loss and the mean real and fake logits (floats)."""
    import torch
    import torch.nn.functional as F

    with torch.autocast(real.device.type, dtype=torch.bfloat16, enabled=amp):
        lr_ = disc(real).float()
        lf_ = disc(fake.detach()).float()
    hinge = 0.5 * (F.relu(1 - lr_).mean() + F.relu(1 + lf_).mean())
    loss = hinge
    if lecam is not None:
        er, ef = lecam["ema_real"], lecam["ema_fake"]
        er.mul_(0.99).add_(0.01 * lr_.mean().detach())
        ef.mul_(0.99).add_(0.01 * lf_.mean().detach())
    if lecam is not None and lecam["weight"] > 0:
        reg = F.relu(lr_ - ef).pow(2).mean() + F.relu(er - lf_).pow(2).mean()
        loss = loss + lecam["weight"] * reg
    dopt.zero_grad(set_to_none=True)
    loss.backward()
    dopt.step()
    return {"d": hinge.item(), "d_real": lr_.mean().item(), "d_fake": lf_.mean().item()}


def adversarial_ramp(step: int, disc_born: int, warmup: int) -> float:
    """Factor of the generator's adversarial term: 0 before D has trained ``warmup`` steps
    since it was created at ``disc_born``, then a linear ramp to 1 over ``warmup`` steps.

    A new D needs that head start: a frozen step-5176 autoencoder's reconstructions are told
    from real crops within ~100 D steps, but when the generator chases it from the first step
    the two logits never part (training_state/README.md)."""
    if step < disc_born + warmup:
        return 0.0
    return min(1.0, (step - disc_born - warmup + 1) / max(1, warmup))


def _lr(step: int, total: int, warm: int = 200) -> float:
    """Linear warm-up then cosine to 10 %."""
    w = min(1.0, (step + 1) / max(1, min(warm, total // 10)))
    return w * (0.1 + 0.45 * (1 + float(np.cos(np.pi * min(step / max(total, 1), 1.0)))))


def write_ae2(path: Path, ae, meta: dict) -> Path:
    """Autoencoder weights (``ae.*``) + metadata (``ae_config``, training record), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {f"ae.{k}": v.detach().float().cpu().contiguous() for k, v in ae.state_dict().items()}
    md = {"ae_config": json.dumps(ae.cfg.to_dict())}
    md.update({k: json.dumps(v) for k, v in meta.items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=md)
    return path


def train_autoencoder_v2(
    data_dir: str | Path,
    out: str | Path,
    cfg: AE2TrainConfig | None = None,
    resume: str | Path | None = None,
    cache_dir: str | Path | None = None,
    stop_after: int | None = None,
    log=print,
    command: str = "",
) -> Path:
    """Train the v2 tile autoencoder on random tissue crops; write ``out`` and ``<out>.state``.

    ``resume``: a state file written by a previous run (``<out>.state``) to continue from.
    The weights file ``out`` is rewritten at every checkpoint (an intermediate until the
    last step; its metadata records ``step`` and ``steps``). ``stop_after``: stop after that
    step (state saved). Runs on CUDA with bf16 autocast when available, else CPU float32.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    cfg = cfg or AE2TrainConfig()
    torch.set_num_threads(cfg.threads)
    safe_cpu_training()
    dev = training_device()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    secs = [
        s for s in read_sections(data_dir, list(cfg.sections) or None) if s.name not in cfg.holdout
    ]
    if not secs:
        raise ValueError("no training section left after the hold-out")
    imgs = [section_image(s, cfg.mpp, Path(cache_dir or DEFAULT_CACHE)) for s in secs]
    torch.manual_seed(cfg.seed)
    ae = TileAutoencoderV2(AE2Config(ch=tuple(cfg.ch), z_ch=cfg.z_ch)).to(dev)
    disc = PatchDiscriminator(cfg.disc_ch, norm=cfg.disc_norm).to(dev)
    lecam = {"weight": cfg.lecam_weight, **{k: torch.zeros((), device=dev) for k in _EMAS}}
    opt = torch.optim.Adam(ae.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    dopt = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9))
    state_path = Path(str(out) + ".state")
    start, hist, wall = 0, [], 0.0
    disc_born = cfg.disc_start  # the step the current discriminator started training
    if resume:
        t = load_file(str(resume))
        ae.load_state_dict({k[3:]: v.float() for k, v in t.items() if k.startswith("ae.")})
        if any(k.startswith("disc.") for k in t):  # a state file: bit-identical resume
            disc.load_state_dict({k[5:]: v for k, v in t.items() if k.startswith("disc.")})
            for k in _EMAS:
                if f"lecam.{k}" in t:
                    lecam[k] = t[f"lecam.{k}"].reshape(()).to(dev)
            _load_opt(opt, list(ae.parameters()), t, "opt", dev)
            _load_opt(dopt, list(disc.parameters()), t, "dopt", dev)
            meta = json.loads(Path(resume).with_suffix(".json").read_text())
            log(f"resumed from {resume} at step {int(meta['step'])}")
            disc_born = int(meta.get("disc_born", cfg.disc_start))
        else:  # an intermediate weights file (the committed one): warm start
            with safe_open(str(resume), "pt") as f:
                meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            log(
                f"warm start from the weights {resume} at step {int(meta['step'])}: Adam moments "
                "and the discriminator restart (not bit-identical to an unbroken run)"
            )
            disc_born = max(int(meta["step"]), cfg.disc_start)  # a fresh D from here
        start, hist, wall = int(meta["step"]), meta["hist"], float(meta.get("wall_s", 0.0))
    amp = dev.type == "cuda"
    names = [s.name for s in secs]

    def save(step: int) -> None:
        t = {f"ae.{k}": v.detach().cpu() for k, v in ae.state_dict().items()}
        t.update({f"disc.{k}": v.detach().cpu() for k, v in disc.state_dict().items()})
        t.update(_opt_tensors(opt, list(ae.parameters()), "opt"))
        t.update(_opt_tensors(dopt, list(disc.parameters()), "dopt"))
        t.update({f"lecam.{k}": lecam[k].detach().cpu().reshape(1) for k in _EMAS})
        meta = {"step": step, "hist": hist, "wall_s": round(wall, 1), "disc_born": disc_born}
        save_state(state_path, t, meta)
        rec = {
            **meta,
            "steps": cfg.steps,
            "sections": names,
            "device": dev.type,
            "train": {k: v for k, v in asdict(cfg).items() if k != "extra"},
            "command": command,
            "intermediate": step < cfg.steps,
        }
        write_ae2(out, ae, rec)

    t_last = time.time()
    run: dict[str, float] = {}
    for step in range(start, cfg.steps):
        t0 = time.time()
        rng = np.random.default_rng([cfg.seed, step])
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        crops = hed_jitter_uint8(random_tissue_crops(imgs, cfg.batch, cfg.crop_px, rng), rng)
        x = dihedral(images_to_tensor(crops), int(rng.integers(8))).contiguous().to(dev)
        f = _lr(step, cfg.steps)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * f
        for g in dopt.param_groups:
            g["lr"] = cfg.disc_lr * (f if cfg.disc_schedule else 1.0)
        gan = step >= cfg.disc_start
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            m, lv = ae.encode(x)
            eps = torch.randn(m.shape, generator=gen).to(dev)
            rec = ae.decode(m + eps * torch.exp(0.5 * lv))
        rec = rec.float()
        l1 = (rec - x).abs().mean()
        gl = gradient_loss(rec, x)
        fl = frequency_loss(rec, x)
        kl = 0.5 * (m.float().pow(2) + lv.float().exp() - 1 - lv.float()).sum((1, 2, 3)).mean()
        nll = l1 + cfg.grad_weight * gl + cfg.freq_weight * fl
        loss = nll + cfg.kl_weight * kl
        g_adv, ramp = torch.zeros(()), adversarial_ramp(step, disc_born, cfg.disc_warmup)
        w = torch.zeros(())
        gap = float(lecam["ema_real"] - lecam["ema_fake"])  # D's health: push G only if it sees
        ramp *= min(1.0, max(0.0, gap / cfg.disc_gate)) if cfg.disc_gate > 0 else 1.0
        if gan and ramp > 0:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                g_adv = -disc(rec).float().mean()
            last = ae.last_layer
            gn = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
            ga = torch.autograd.grad(g_adv, last, retain_graph=True)[0].norm()
            w = (gn / (ga + 1e-4)).clamp(0.0, cfg.adaptive_max).detach() * ramp
            loss = loss + cfg.disc_weight * w * g_adv
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        dv = {"d": 0.0, "d_real": 0.0, "d_fake": 0.0, "adv_w": 0.0}
        if gan:
            dv.update(discriminator_step(disc, dopt, x, rec, amp, lecam), adv_w=w.item())
        wall += time.time() - t0
        vals = {"l1": l1.item(), "grad": gl.item(), "freq": fl.item(), "g_adv": g_adv.item()}
        vals.update(dv)
        run = vals if not run else {k: 0.98 * run[k] + 0.02 * v for k, v in vals.items()}
        done = step + 1
        if done % 50 == 0 or done == cfg.steps:
            hist.append([done, round(wall, 1), *(round(run[k], 5) for k in vals)])
            log(
                f"step {done}/{cfg.steps} wall {wall:.0f}s "
                + " ".join(f"{k}={v:.4f}" for k, v in run.items())
            )
        last_step = done == cfg.steps or (stop_after is not None and done >= stop_after)
        if last_step or time.time() - t_last >= cfg.save_every_s:
            save(done)
            t_last = time.time()
        if stop_after is not None and done >= stop_after:
            break
    return out


# ----------------------------------------------------------------------------- evaluation


def psnr_ssim(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean PSNR (dB) and SSIM (skimage, RGB) of uint8 tile pairs (N, H, W, 3)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ps = [peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(a, b, strict=True)]
    ss = [
        structural_similarity(x, y, channel_axis=-1, data_range=255)
        for x, y in zip(a, b, strict=True)
    ]
    return {"psnr_db": round(float(np.mean(ps)), 2), "ssim": round(float(np.mean(ss)), 4)}


def reconstruct(ae, tiles: np.ndarray, batch: int = 32) -> np.ndarray:
    """Autoencoder reconstructions (posterior mean) of uint8 tiles."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(tiles), batch):
            x = images_to_tensor(np.ascontiguousarray(tiles[i : i + batch]))
            out.append(tensor_to_images(ae.decode(ae.encode(x)[0])))
    return np.concatenate(out, 0)


# ----------------------------------------------------------------------------- v1 autoencoder


@dataclass(frozen=True)
class AETrainConfig:
    """Hyper-parameters of the v1 tile autoencoder (``train_autoencoder``)."""

    steps: int = 1500
    batch: int = 16
    tile_px: int = 64  # crop edge (px at TILE_MPP)
    seed: int = 0
    lr: float = 1e-3
    kl_weight: float = 1e-6  # weight of the KL term next to L1 + gradient
    threads: int = 1  # torch CPU threads
    log_every: int = 50  # steps between loss records and saved states


def train_autoencoder(
    data_dir: str | Path,
    out: str | Path,
    cache_dir: str | Path | None = None,
    sections: list[str] | None = None,
    progress: bool = True,
    **hparams: Any,
) -> Path:
    """Train the tile autoencoder on random tissue crops of every section (no labels).

    ``hparams``: fields of :class:`AETrainConfig` (steps, batch, tile_px, seed, lr, ...).
    Saves ``out`` (safetensors: ``ae.*`` tensors; metadata: config and losses). Resumes from
    ``out + '.state'`` when present.
    """
    import torch
    from safetensors.torch import load_file, save_file

    cfg = AETrainConfig(**hparams)
    steps, batch, tile_px, seed, threads = cfg.steps, cfg.batch, cfg.tile_px, cfg.seed, cfg.threads
    lr, kl_weight, log_every = cfg.lr, cfg.kl_weight, cfg.log_every
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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s + start, steps))
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
            save_state(state_path, st, {"step": step + 1, "hist": hist})
    tensors = {f"ae.{k}": v.detach().contiguous() for k, v in ae.state_dict().items()}
    meta = {"ae_config": json.dumps(AEConfig().to_dict()), "hist": json.dumps(hist)}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return out


def load_ae(path: str | Path):
    """The tile autoencoder saved by ``train_autoencoder`` (or inside an STMDiT checkpoint)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

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
        return AE2_MPP, int(round(112.0 / AE2_MPP))
    return TILE_MPP, int(round(112.0 / TILE_MPP))


def resolve_ae(name_or_path: str | Path) -> Path:
    """A tile-autoencoder file: a path (``train_autoencoder`` output or any STMDiT checkpoint),
    or an STMDiT checkpoint name such as ``default`` (its ``ae.*`` tensors)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    return resolve_checkpoint(str(name_or_path), "stmdit")
