"""Per-tile uncertainty of a GenST prediction, from the tokens the prediction already made.

Candidates (each larger = less sure), computed without another encoder pass:

- ``rotation_spread``: the tile's profile decoded under each TTA rotation separately; the
  spread (SD over rotations, mean over genes, in standardized units). A tile whose reading
  depends on how it is turned is read unreliably.
- ``code_distance``: distance of the final latent to its nearest gene code (far from every
  profile the gene VQ-VAE knows).
- ``code_entropy``: entropy of the code posterior (softmax of the code-agreement logits).
- ``context_shift``: how far the spatial context head moved the tile's own latent.
- ``feature_novelty``: mean distance of the tile's pooled image features to their 8 nearest
  training-spot features (needs a feature bank: ``bank`` (M, F)).

- ``combined``: the larger of code entropy and feature novelty, each standardized by its
  distribution over the training spots (novelty of a training spot leaves the spot itself
  out). Entropy says the image sits between expression programmes; novelty says the image is
  unlike anything trained on (glass, folds, pen marks, another stain).

``docs/models.md`` ("Confidence") gives each one's held-out calibration; predictions carry
``combined`` as ``uncertainty`` when the checkpoint has a feature bank (``Confidence``,
stored as ``confidence.*`` tensors), else ``code_entropy``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_stgen.inference.contract import Kind
from napari_stgen.inference.measured import UNCERTAINTY_K

K_NOVELTY = 8


def candidates(
    model, feat: np.ndarray, zhat: np.ndarray, z_final: np.ndarray, bank: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Every candidate uncertainty (N,) float32 for tokens ``feat`` (R, N, F), ``zhat``
    (R, N, D) and the latent the prediction decoded, ``z_final`` (N, D)."""
    import torch

    out: dict[str, np.ndarray] = {"rotation_spread": rotation_spread(model, zhat)}
    with torch.inference_mode():
        dist = model.gene.vq.distances(torch.from_numpy(np.asarray(z_final, np.float32)))
        out["code_distance"] = dist.min(1).values.clamp_min(0).sqrt().numpy()
        out["code_entropy"] = code_entropy(dist).numpy()
    out["context_shift"] = np.linalg.norm(z_final - zhat.mean(0), axis=1)
    if bank is not None and len(bank):
        out["feature_novelty"] = feature_novelty(feat.mean(0), bank)
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


# the card's ``confidence.uncertainty`` name → the combination ``Confidence.score`` uses
COMBINATIONS = {"combined": "max", "combined_sum": "sum", "combined_sum_pos": "sum_pos"}
SHIPPED = "combined_sum_pos"


def combination(card: dict | None) -> str:
    """How a checkpoint's card says its two scores combine (``"max"`` for older cards)."""
    name = ((card or {}).get("confidence") or {}).get("uncertainty", "combined")
    return COMBINATIONS.get(name, "max")


@dataclass
class Confidence:
    """What a checkpoint stores to score uncertainty: the training spots' pooled image
    features (the bank) and the training distribution of entropy and novelty."""

    bank: np.ndarray  # (M, F) float32
    stats: np.ndarray  # (4,) entropy mean, SD; novelty mean, SD over the training spots

    def tensors(self) -> dict:
        import torch

        return {
            "confidence.bank": torch.from_numpy(self.bank.astype(np.float16)),
            "confidence.stats": torch.from_numpy(self.stats.astype(np.float32)),
        }

    @classmethod
    def from_tensors(cls, tensors: dict) -> Confidence | None:
        """Pop the ``confidence.*`` tensors of a checkpoint (None if it has none)."""
        if "confidence.bank" not in tensors:
            return None
        bank = tensors.pop("confidence.bank").float().numpy()
        stats = tensors.pop("confidence.stats").float().numpy()
        return cls(bank, stats)

    def score(self, entropy: np.ndarray, feat_mean: np.ndarray, how: str = "max") -> np.ndarray:
        """(N,) combined uncertainty of tiles with code entropy ``entropy`` (N,) and pooled
        features ``feat_mean`` (N, F) (mean over TTA transforms): the larger of the two
        standardized scores (``how="max"``), their sum (``"sum"``), or the novelty plus the
        entropy's excess over the training mean (``"sum_pos"``: glass, whose code posterior is
        sharper than tissue's, is not made surer by it)."""
        e_mu, e_sd, n_mu, n_sd = (float(v) for v in self.stats)
        if getattr(self, "_index", None) is None:  # the bank's k-d tree, built once
            self._index = _bank_index(self.bank)
        nov = feature_novelty(feat_mean, self.bank, index=self._index)
        ze, zn = (entropy - e_mu) / e_sd, (nov - n_mu) / n_sd
        if how == "max":
            u = np.maximum(ze, zn)
        elif how == "sum":
            u = ze + zn
        elif how == "sum_pos":
            u = np.maximum(ze, 0.0) + zn
        else:
            raise ValueError(f"confidence combination {how!r}: expected max, sum or sum_pos")
        return u.astype(np.float32)


def fit_confidence(model, patches: np.ndarray, tta: int = 4, batch: int = 128) -> Confidence:
    """The ``Confidence`` of a trained model from its training spots' uint8 patches."""
    import torch

    from napari_stgen.models.genst import to_input

    fs, es = [], []
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(patches), batch):
            x = to_input(torch.from_numpy(np.ascontiguousarray(patches[i : i + batch])))
            f, z, _ = model.tile_tokens(x, tta)
            fs.append(f.mean(0).float().numpy())
            es.append(code_entropy(model.gene.vq.distances(z.mean(0).float())).numpy())
    bank, ent = np.concatenate(fs), np.concatenate(es)
    nov = feature_novelty(bank, bank, leave_self_out=True)
    stats = np.array([ent.mean(), ent.std() + 1e-6, nov.mean(), nov.std() + 1e-6], np.float32)
    return Confidence(bank.astype(np.float32), stats)


def code_entropy(dist):
    """(N,) entropy (nats) of the code posterior softmax(code logits) from squared distances
    ``dist`` (N, K) torch tensor of latents to the gene codes: the shipped uncertainty."""
    import torch

    from napari_stgen.models.genst import code_logits

    p = torch.softmax(code_logits(dist.float()), dim=1)
    return -(p * p.clamp_min(1e-12).log()).sum(1)


def rotation_spread(model, zhat: np.ndarray) -> np.ndarray:
    """(N,) SD over the R rotations of the soft-decoded standardized profile, mean over
    genes; zeros when R = 1."""
    import torch

    r, n, d = zhat.shape
    if r < 2:
        return np.zeros(n, np.float32)
    with torch.inference_mode():
        e = model.gene.decoder(torch.from_numpy(np.asarray(zhat, np.float32).reshape(r * n, d)))
        e = e.reshape(r, n, -1)
        return e.std(0).mean(1).numpy().astype(np.float32)


def _bank_index(bank: np.ndarray) -> tuple[np.ndarray, np.ndarray, object]:
    """(mean, SD, k-d tree of the standardized bank) used by :func:`feature_novelty`."""
    from scipy.spatial import cKDTree

    mu, sd = bank.mean(0), bank.std(0) + 1e-6
    return mu, sd, cKDTree((bank - mu) / sd)


def feature_novelty(
    feat: np.ndarray,
    bank: np.ndarray,
    k: int = K_NOVELTY,
    leave_self_out: bool = False,
    index: tuple | None = None,
) -> np.ndarray:
    """(N,) mean Euclidean distance of each row of ``feat`` to its ``k`` nearest ``bank`` rows
    (both standardized by the bank's per-feature mean and SD); ``leave_self_out`` when
    ``feat`` is the bank itself; ``index``: ``_bank_index(bank)`` computed before."""
    mu, sd, tree = index if index is not None else _bank_index(bank)
    extra = 1 if leave_self_out else 0
    d, _ = tree.query((np.asarray(feat, np.float32) - mu) / sd, k=min(k + extra, len(bank)))
    d = d.reshape(len(feat), -1)[:, extra:]
    return d.mean(1).astype(np.float32)


def uncertainty_record(predictor: object) -> dict | None:
    """What a prediction's ``uncertainty`` is, for exports (``uns['stgen']['uncertainty']``):
    its definition, that larger means less sure, and the card's held-out calibration (the
    fold and the Spearman of uncertainty vs absolute error). None for a model that gives no
    uncertainty."""
    if getattr(predictor, "kind", Kind.GENST) == Kind.HISTOTX:
        return histotx_uncertainty_record(predictor)
    if getattr(predictor, "kind", Kind.GENST) != Kind.GENST or not hasattr(predictor, "confidence"):
        return None
    card = getattr(predictor, "card", None) or {}
    conf = card.get("confidence") or {}
    rec: dict = {"larger_means": "less sure", "source": "napari_stgen/inference/confidence.py"}
    if getattr(predictor, "confidence", None) is None:
        rec["definition"] = "entropy (nats) of the gene-code posterior (no feature bank)"
        return rec
    rec["definition"] = str(
        conf.get("definition")
        or "max(standardized code-posterior entropy, standardized feature novelty)"
    )
    cal = conf.get("calibration") or {}
    sp = (cal.get("spearman_uncertainty_vs_abs_error") or {}).get(conf.get("uncertainty", ""))
    if sp is not None:
        rec["calibration_fold"] = str(cal.get("fold", ""))
        rec["spearman_vs_abs_error"] = float(sp)
    return rec


def histotx_uncertainty_record(predictor: object) -> dict:
    """The export record of HistoTx's uncertainty (with measured spots): the spread of the
    nearest measured profiles, and the card's leave-one-patient-out Spearman with the error."""
    rec: dict = {
        "larger_means": "less sure",
        "source": "napari_stgen/inference/measured.py (measured_spread)",
        "definition": f"SD of the {UNCERTAINTY_K} nearest measured profiles around the tile, in "
        "units of each gene's SD, mean over the measured genes (needs measured spots)",
    }
    card = getattr(predictor, "card", None) or {}
    sp = (card.get("evaluation") or {}).get("uncertainty_spearman") or {}
    fused = {p: v["histotx:knn8_spread"] for p, v in sp.items() if "histotx:knn8_spread" in v}
    if fused:  # image + measured spots, as the widget and `stgen predict --measured` run it
        rec["calibration_fold"] = (
            "leave-one-patient-out, image + measured spots, mean over held-out patients "
            + ", ".join(sorted(fused))
        )
        rec["spearman_vs_abs_error"] = round(float(np.mean(list(fused.values()))), 4)
    return rec
