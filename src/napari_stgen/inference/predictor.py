"""Load a GenST checkpoint and predict expression for batches of patches.

::

    pred = load_genst("default")            # or a path; CheckpointError on a bad file
    out = pred.predict(patches)              # uint8 (N, patch_px, patch_px, 3) at pred.mpp
    out.expr  # (N, G) float32 log1p(CP10k), panel order = pred.genes
    out.code  # (N,) int64 gene-code index;  out.image_codes (N, h, w) int64 or None
    out.uncertainty  # (N,) float32 code-posterior entropy (nats): larger = less sure

Device ``"auto"`` picks cuda > mps > cpu. Batched; fp16/bf16 autocast on GPU;
``torch.inference_mode``; test-time augmentation (rotations) as the card recommends.
torch is imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, StgenError
from .confidence import Confidence, code_entropy, combination

KIND = "genst"


@dataclass
class Prediction:
    """Output of ``GenSTPredictor.predict``."""

    expr: np.ndarray  # (N, G) float32 log1p CP10k
    code: np.ndarray  # (N,) int64
    image_codes: np.ndarray | None = None  # (N, h, w) int64
    feat: np.ndarray | None = None  # (R, N, F) float32 pooled features per transform (tokens)
    zhat: np.ndarray | None = None  # (R, N, D) float32 aligned latent per transform (tokens)
    uncertainty: np.ndarray | None = None  # (N,) float32 (inference/confidence.py)


def pick_device(device: str = "auto") -> str:
    """``auto`` → cuda if available, else mps, else cpu; otherwise the name as given."""
    import torch

    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise StgenError(f"device {device!r} requested but CUDA is not available")
        return device
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


class GenSTPredictor:
    """A loaded GenST model with the contract's attributes and ``predict``."""

    def __init__(
        self,
        model,
        card: dict,
        path: Path,
        checksum: str,
        device: str,
        tta: int,
        confidence: Confidence | None = None,
    ):
        self.model = model
        self.confidence = confidence
        self.card = card
        self.path = path
        self.checksum = checksum
        self.device = device
        self.tta = tta
        self.genes: list[str] = list(card["genes"])
        self.patch_px: int = int(card["patch_px"])
        self.patch_um: float = float(card["patch_um"])
        self.mpp: float = float(card["mpp"])
        self.n_codes: int = int(card.get("n_codes", model.cfg.gene_codes))
        self.name: str = str(card.get("name", path.stem))
        self.batch_size = 64

    def __repr__(self) -> str:
        return (
            f"GenSTPredictor({self.name!r}, genes={len(self.genes)}, {self.patch_px} px @ "
            f"{self.mpp:.3g} µm/px, device={self.device!r})"
        )

    def _autocast(self):
        import contextlib

        import torch

        if self.device.startswith("cuda"):
            dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dt)
        return contextlib.nullcontext()

    @property
    def has_context(self) -> bool:
        """Whether the model has a spatial context head (windows of neighbouring tiles)."""
        return self.model.context is not None

    def predict(
        self,
        patches: np.ndarray,
        image_codes: bool = False,
        tta: int | None = None,
        batch_size: int | None = None,
        tokens: bool = False,
        given: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> Prediction:
        """Expression + gene code for uint8 (N, patch_px, patch_px, 3) patches at ``mpp``, each
        tile on its own. ``tokens`` also returns the per-transform features and ẑ that
        ``predict_in_context`` needs (same expression and codes). ``given``: the tokens
        (feat (r, N, F), ẑ (r, N, D)) of the first ``r`` transforms, computed before (e.g. by
        a ``tta=1`` quick pass); only the remaining transforms are run (same result)."""
        import torch

        from ..models.genst import to_input

        p = np.asarray(patches)
        if p.ndim == 3:
            p = p[None]
        if p.ndim != 4 or p.shape[-1] != 3 or p.shape[1:3] != (self.patch_px, self.patch_px):
            raise StgenError(
                f"patches must be (N, {self.patch_px}, {self.patch_px}, 3) uint8, got {p.shape}"
            )
        if p.dtype != np.uint8:
            raise StgenError(f"patches must be uint8 RGB, got {p.dtype}")
        n = len(p)
        g = len(self.genes)
        if n == 0:
            return Prediction(
                np.zeros((0, g), np.float32),
                np.zeros(0, np.int64),
                None,
                uncertainty=np.zeros(0, np.float32),
            )
        bs = batch_size or self.batch_size
        tta = self.tta if tta is None else tta
        expr, codes, icodes, feats, zs, unc = [], [], [], [], [], []
        with torch.inference_mode(), self._autocast():
            for i in range(0, n, bs):
                xb = torch.from_numpy(np.ascontiguousarray(p[i : i + bs])).to(self.device)
                x = to_input(xb)
                r0 = 0 if given is None or image_codes else min(len(given[0]), tta)
                grids: list = []
                if r0:
                    f, z = (
                        torch.from_numpy(np.ascontiguousarray(a[:r0, i : i + bs])).to(self.device)
                        for a in given
                    )
                    if r0 < tta:
                        f1, z1, _ = self.model.tile_tokens(x, tta, start=r0)
                        f, z = torch.cat([f.to(f1), f1], 0), torch.cat([z.to(z1), z1], 0)
                else:
                    f, z, grids = self.model.tile_tokens(x, tta)
                e, c = self.model.decode_latent(z.mean(0))
                e = self.model.unstandardize(e.float())
                unc.append(self._uncertainty(z.mean(0), f.mean(0)))
                ic = self.model.image_code_map(grids) if image_codes else None
                if tokens:
                    feats.append(f.float().cpu().numpy())
                    zs.append(z.float().cpu().numpy())
                expr.append(e.float().cpu().numpy())
                codes.append(c.cpu().numpy().astype(np.int64))
                if ic is not None:
                    icodes.append(ic.cpu().numpy().astype(np.int64))
        return Prediction(
            expr=np.concatenate(expr).astype(np.float32),
            code=np.concatenate(codes),
            image_codes=np.concatenate(icodes) if icodes else None,
            feat=np.concatenate(feats, 1) if feats else None,
            zhat=np.concatenate(zs, 1) if zs else None,
            uncertainty=np.concatenate(unc).astype(np.float32),
        )

    def predict_in_context(
        self,
        feat: np.ndarray,
        zhat: np.ndarray,
        xy_um: np.ndarray,
        query: np.ndarray | None = None,
        cells: np.ndarray | None = None,
        tile_um: float | None = None,
        cancel=None,
    ) -> Prediction:
        """Expression + gene code of sites (all or ``query``) from all sites' tokens
        (``predict(..., tokens=True)``) and centres ``xy_um`` (N, 2) (x, y) µm; on a tile grid
        pass its ``cells`` (N, 2) and ``tile_um``. Without a context head: the tiles alone."""
        import torch

        from .context import context_latent, lattice_step

        if self.has_context:
            step = 1
            if cells is not None and tile_um:
                step = lattice_step(tile_um, self.model.cfg.ctx_pitch_um)
            z = context_latent(
                self.model,
                feat,
                zhat,
                xy_um,
                query,
                device=self.device,
                cancel=cancel,
                cells=cells,
                step=step,
            )
        else:
            z = zhat.mean(0) if query is None else zhat.mean(0)[np.asarray(query)]
        with torch.inference_mode():
            zt = torch.from_numpy(np.asarray(z, np.float32)).to(self.device)
            e, c = self.model.decode_latent(zt)
            e = self.model.unstandardize(e.float())
            f = feat.mean(0) if query is None else feat.mean(0)[np.asarray(query)]
            u = self._uncertainty(zt, f)
        return Prediction(
            e.cpu().numpy().astype(np.float32),
            c.cpu().numpy().astype(np.int64),
            uncertainty=u.astype(np.float32),
        )

    def _uncertainty(self, z, feat_mean) -> np.ndarray:
        """(N,) per-tile uncertainty (inference/confidence.py) of final latents ``z`` (torch,
        N × D) with pooled features ``feat_mean`` (N × F, torch or numpy)."""
        ent = code_entropy(self.model.gene.vq.distances(z.float())).cpu().numpy()
        if self.confidence is None:
            return ent
        f = feat_mean.float().cpu().numpy() if hasattr(feat_mean, "cpu") else feat_mean
        return self.confidence.score(ent, np.asarray(f, np.float32), combination(self.card))

    def code_profiles(self) -> np.ndarray:
        """Decoded profile (log1p CP10k) of each gene code, (n_codes, G) float32."""
        import torch

        with torch.inference_mode():
            return self.model.code_profiles().float().cpu().numpy()


def build_model(tensors: dict, card: dict, path: Path):
    """A GenST module from checkpoint tensors + card; CheckpointError on any mismatch."""
    from ..models.genst import GenST, GenSTConfig

    try:
        cfg = GenSTConfig.from_dict(card["architecture"])
        genes = card["genes"]
        for k in ("patch_px", "patch_um", "mpp"):
            float(card[k])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: model card lacks a valid {e}") from e
    if len(genes) != cfg.n_genes:
        raise CheckpointError(
            f"{path}: gene panel has {len(genes)} genes but the model predicts {cfg.n_genes}"
        )
    if int(card["patch_px"]) != cfg.patch_px or abs(float(card["patch_um"]) - cfg.patch_um) > 1e-6:
        raise CheckpointError(f"{path}: patch size in the card disagrees with the architecture")
    model = GenST(cfg)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("confidence.")}
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise CheckpointError(f"{path}: weights do not match the architecture: {first}") from e
    model.histo.vq.initted.fill_(1)
    model.gene.vq.initted.fill_(1)
    model.eval()
    return model


def load_genst(
    name_or_path: str | Path = "default", device: str = "auto", tta: int | None = None
) -> GenSTPredictor:
    """Load a GenST checkpoint by name (``"default"``) or path → ``GenSTPredictor``."""
    import torch

    from ..models.checkpoint import load_checkpoint, resolve_checkpoint, sha256_file

    path = resolve_checkpoint(name_or_path, KIND)
    tensors, card = load_checkpoint(path, KIND)
    conf = Confidence.from_tensors(dict(tensors))
    model = build_model(tensors, card, path)
    dev = pick_device(device)
    model.to(dev)
    if dev == "cpu" and torch.get_num_threads() > 4:
        pass  # leave the caller's thread setting alone
    t = int(card.get("tta", 1) if tta is None else tta)
    return GenSTPredictor(model, card, path, sha256_file(path), dev, t, confidence=conf)
