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

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_stgen.errors import CheckpointError, StgenError
from napari_stgen.inference.confidence import Confidence, code_entropy, combination
from napari_stgen.inference.context import context_latent, lattice_step
from napari_stgen.inference.contract import Kind, SpotRequest, SpotResult, TileRequest
from napari_stgen.inference.engine import (
    CancelToken,
    PartialResult,
    predict_cells,
    predict_genst_tiles,
)
from napari_stgen.inference.loaded import LoadedPredictor, open_model
from napari_stgen.inference.patches import read_patches
from napari_stgen.inference.tiles import read_or_skip
from napari_stgen.io.slide import Slide
from napari_stgen.models.checkpoint import check_panel, load_weights

if TYPE_CHECKING:  # torch at import: type names only
    from napari_stgen.models.genst import GenST


@dataclass
class Prediction:
    """Output of ``GenSTPredictor.predict``."""

    expr: np.ndarray  # (N, G) float32 log1p CP10k
    code: np.ndarray  # (N,) int64
    image_codes: np.ndarray | None = None  # (N, h, w) int64
    feat: np.ndarray | None = None  # (R, N, F) float32 pooled features per transform (tokens)
    zhat: np.ndarray | None = None  # (R, N, D) float32 aligned latent per transform (tokens)
    uncertainty: np.ndarray | None = None  # (N,) float32 (inference/confidence.py)


class GenSTPredictor(LoadedPredictor):
    """A loaded GenST model with the contract's attributes and ``predict``."""

    kind = Kind.GENST.value

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
        super().__init__(model, card, path, checksum, device)
        self.confidence = confidence
        self.tta = tta
        self.patch_px: int = int(card["patch_px"])
        self.patch_um: float = float(card["patch_um"])
        self.mpp: float = float(card["mpp"])
        self.n_codes: int = int(card.get("n_codes", model.cfg.gene_codes))

    def __repr__(self) -> str:
        return (
            f"GenSTPredictor({self.name!r}, genes={len(self.genes)}, {self.patch_px} px @ "
            f"{self.mpp:.3g} µm/px, device={self.device!r})"
        )

    def _autocast(self) -> Any:
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

        from napari_stgen.models.genst import to_input  # torch at import

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
        cancel: CancelToken | None = None,
    ) -> Prediction:
        """Expression + gene code of sites (all or ``query``) from all sites' tokens
        (``predict(..., tokens=True)``) and centres ``xy_um`` (N, 2) (x, y) µm; on a tile grid
        pass its ``cells`` (N, 2) and ``tile_um``. Without a context head: the tiles alone."""
        import torch

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

    def predict_tiles(self, slide: Slide, request: TileRequest) -> Iterator[PartialResult]:
        """Cached, progressive, centre-out tile prediction (``engine.predict_genst_tiles``)."""
        return predict_genst_tiles(slide, self, request)

    def predict_spots(self, slide: Slide, xy_px: np.ndarray, request: SpotRequest) -> SpotResult:
        """Expression, gene code and uncertainty at level-0 ``xy_px`` (``predict_centres``)."""
        if request.measured is not None:
            raise StgenError("measured spots need a HistoTx model (model='histotx')")
        if request.grid is not None and request.tiles is not None:  # grid cells: the engine
            cells = TileRequest(
                request.tiles,
                grid=request.grid,
                batch_size=request.batch_size,
                skip_unreadable=request.skip_unreadable,
            )
            res = predict_cells(slide, self, cells, progress=request.progress)
            return SpotResult(res.expr, res.code, res.uncertainty)
        expr, code, unc = predict_centres(slide, self, xy_px, request)
        return SpotResult(expr, code, unc)


def predict_centres(
    slide: Slide, predictor: GenSTPredictor, xy_px: np.ndarray, request: SpotRequest
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(expr (N, G) float32, code (N,) int64, uncertainty (N,) float32) for patches centred
    on level-0 ``xy_px`` (uncertainty: ``inference/confidence.py``, NaN where none).

    Reads and predicts about ``batch_size`` patches at a time so memory stays bounded. A
    model with a spatial context head then predicts each centre from its window of the other
    centres' tokens (``inference.context``). ``skip_unreadable``: rows whose pixels cannot be
    read get NaN expression (``inference.tiles.read_or_skip``) instead of an error. Grid
    cells go through the engine instead (``GenSTPredictor.predict_spots``).
    """
    batch_size, progress, skip_unreadable = (
        request.batch_size,
        request.progress,
        request.skip_unreadable,
    )
    xy = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
    n, g = len(xy), len(predictor.genes)
    expr = np.empty((n, g), dtype=np.float32)
    code = np.empty(n, dtype=np.int64)
    unc = np.full(n, np.nan, dtype=np.float32)
    bs = max(1, int(batch_size))
    jobs = [(np.arange(i, min(i + bs, n)), None) for i in range(0, n, bs)]

    def read(idx: np.ndarray) -> np.ndarray:
        return read_patches(slide, xy[idx], predictor.patch_um, predictor.patch_px)

    done = 0
    ctx = predictor.has_context
    feat = zhat = None
    bad = np.zeros(n, dtype=bool)
    for job in jobs:
        px = read_or_skip(read, job[0], skip_unreadable, bad, predictor.patch_px)
        out = predictor.predict(px, tokens=True) if ctx else predictor.predict(px)
        expr[job[0]] = np.asarray(out.expr, dtype=np.float32)
        code[job[0]] = np.asarray(out.code, dtype=np.int64)
        if out.uncertainty is not None:
            unc[job[0]] = out.uncertainty
        if ctx:
            if feat is None:
                feat = np.empty((out.feat.shape[0], n, out.feat.shape[2]), np.float32)
                zhat = np.empty((out.zhat.shape[0], n, out.zhat.shape[2]), np.float32)
            feat[:, job[0]], zhat[:, job[0]] = out.feat, out.zhat
        done += len(job[0])
        if progress is not None:
            progress(done, n)
    if ctx and n:
        # every site's window of neighbouring sites (spatial context head)
        out = predictor.predict_in_context(feat, zhat, xy * slide.mpp)
        expr, code = out.expr, out.code
        if out.uncertainty is not None:
            unc = np.asarray(out.uncertainty, dtype=np.float32)
    if bad.any():
        expr = np.array(expr, dtype=np.float32)
        expr[bad] = np.nan
        unc = np.array(unc, dtype=np.float32)
        unc[bad] = np.nan
    return expr, code, unc


def build_genst(tensors: dict, card: dict, path: Path) -> GenST:
    """A GenST module from checkpoint tensors + card; CheckpointError on any mismatch."""
    from napari_stgen.models.genst import GenST, GenSTConfig  # torch at import

    try:
        cfg = GenSTConfig.from_dict(card["architecture"])
        genes = card["genes"]
        for k in ("patch_px", "patch_um", "mpp"):
            float(card[k])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: model card lacks a valid {e}") from e
    check_panel(path, genes, cfg.n_genes)
    if int(card["patch_px"]) != cfg.patch_px or abs(float(card["patch_um"]) - cfg.patch_um) > 1e-6:
        raise CheckpointError(f"{path}: patch size in the card disagrees with the architecture")
    tensors = {k: v for k, v in tensors.items() if not k.startswith("confidence.")}
    model = load_weights(GenST(cfg), tensors, path)
    model.histo.vq.initted.fill_(1)
    model.gene.vq.initted.fill_(1)
    return model


def load_genst(
    name_or_path: str | Path = "default", device: str = "auto", tta: int | None = None
) -> GenSTPredictor:
    """Load a GenST checkpoint by name (``"default"``) or path → ``GenSTPredictor``."""
    ck = open_model(name_or_path, GenSTPredictor.kind, build_genst, device)
    conf = Confidence.from_tensors(dict(ck.tensors))
    t = int(ck.card.get("tta", 1) if tta is None else tta)
    return GenSTPredictor(ck.model, ck.card, ck.path, ck.checksum, ck.device, t, confidence=conf)


def load_genst_module(name_or_path: str | Path = "default") -> tuple[GenST, dict, Path, str]:
    """(GenST torch module on the CPU, card, path, sha256) of a GenST checkpoint: the one
    strict loader (``build_genst``), for code that drives the module itself (STMDiT)."""
    ck = open_model(name_or_path, GenSTPredictor.kind, build_genst, device="cpu")
    return ck.model, ck.card, ck.path, ck.checksum
