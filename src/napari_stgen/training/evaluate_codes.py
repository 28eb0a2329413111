"""GenST's gene codes against a pathologist's regions (HER2ST sections A1, B1, C1, D1, E1, F1).

Each labelled spot gets a gene code from its *measured* expression (the gene VQ-VAE's encoder
and nearest code, no image), and the agreement of codes with the pathologist's region labels
is scored by normalized mutual information (NMI) and adjusted Rand index (ARI), next to
k-means on the same standardized expression with as many clusters as codes used on that
section (10 seeds, mean). Spots labelled ``undetermined`` are left out. The same table gives
each code's label co-occurrence, from which the Codebook widget suggests a region name.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from napari_stgen.inference.code_names import suggest_names
from napari_stgen.io.her2st import read_expression_section, read_labelled_regions
from napari_stgen.models.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["codes_vs_pathology", "profile_codes", "suggest_names", "update_card"]

LABELLED = ("A1", "B1", "C1", "D1", "E1", "F1")
SKIP_LABEL = "undetermined"


def profile_codes(predictor, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gene code (N,), standardized profiles (N, G)) of log1p CP10k profiles ``y`` in the
    predictor's panel order, from the gene VQ-VAE alone."""
    import torch

    net = predictor.model
    with torch.inference_mode():
        ys = net.standardize(torch.from_numpy(np.asarray(y, np.float32)))
        code = net.gene.vq.codes(net.gene.encode(ys))
    return code.numpy().astype(np.int64), ys.numpy()


def _scores(labels: np.ndarray, clusters: np.ndarray) -> dict:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {
        "nmi": round(float(normalized_mutual_info_score(labels, clusters)), 4),
        "ari": round(float(adjusted_rand_score(labels, clusters)), 4),
    }


def _kmeans(x: np.ndarray, k: int, seeds: int) -> list[np.ndarray]:
    from sklearn.cluster import KMeans

    return [KMeans(k, n_init=1, random_state=s).fit_predict(x) for s in range(seeds)]


def codes_vs_pathology(
    predictor, data_dir: str | Path, sections: tuple[str, ...] = LABELLED, seeds: int = 10
) -> dict:
    """NMI / ARI of gene codes vs pathologist labels per section and pooled, beside k-means;
    and per-code label counts (``code_labels``) over all labelled spots."""
    per: dict = {}
    cooc: dict[int, Counter] = {}
    all_lab, all_code = [], []
    for name in sections:
        sec = read_expression_section(data_dir, name)
        lab = read_labelled_regions(data_dir, sec)
        keep = (lab != SKIP_LABEL) & (lab != "")
        code, ys = profile_codes(predictor, sec.target(predictor.genes))
        lab, code, ys = lab[keep], code[keep], ys[keep]
        k = int(len(np.unique(code)))
        km = _kmeans(ys, k, seeds)
        kms = [_scores(lab, c) for c in km]
        per[name] = {
            "spots": int(keep.sum()),
            "regions": int(len(np.unique(lab))),
            "codes_used": k,
            "codes": _scores(lab, code),
            "kmeans": {m: round(float(np.mean([s[m] for s in kms])), 4) for m in ("nmi", "ari")},
        }
        for c, lb in zip(code, lab, strict=True):
            cooc.setdefault(int(c), Counter())[str(lb)] += 1
        all_lab.append(lab)
        all_code.append(code)
    mean = {
        src: {
            m: round(float(np.mean([p[src][m] for p in per.values()])), 4) for m in ("nmi", "ari")
        }
        for src in ("codes", "kmeans")
    }
    return {
        "protocol": "gene code of each spot from its measured expression (gene VQ-VAE encoder + "
        "nearest code, no image) vs the pathologist's region label; 'undetermined' spots left "
        f"out; k-means on the same standardized panel expression, k = codes used on the "
        f"section, mean of {seeds} seeds",
        "model": {"name": predictor.name, "sha256": predictor.checksum},
        "sections": list(sections),
        "per_section": per,
        "mean": mean,
        "pooled_codes": _scores(np.concatenate(all_lab), np.concatenate(all_code)),
        "code_labels": {str(c): dict(cnt.most_common()) for c, cnt in sorted(cooc.items())},
    }


def update_card(path: str | Path, res: dict, command: str) -> Path:
    """Re-save a GenST checkpoint (same tensors) with ``res`` (from :func:`codes_vs_pathology`)
    under ``codebook.pathology`` of its card, from which the Codebook widget suggests names."""
    tensors, card = load_checkpoint(path, "genst")
    card.setdefault("codebook", {})["pathology"] = {
        "command": command,
        "protocol": res["protocol"],
        "sections": res["sections"],
        "mean": res["mean"],
        "pooled_codes": res["pooled_codes"],
        "code_labels": res["code_labels"],
    }
    return save_checkpoint(path, tensors, card)
