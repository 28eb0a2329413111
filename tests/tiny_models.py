"""Tiny real models for tests: trained a few steps on real HER2ST data through the public
training functions (never random weights). Shared by test_genst, test_stmdit, test_synthesize."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_genst_config(n_genes: int) -> Any:
    """A GenST architecture small enough to train in seconds on one core."""
    from napari_stgen.models.genst import GenSTConfig

    return GenSTConfig(
        n_genes=n_genes,
        patch_px=32,
        patch_um=224.0,
        view_px=16,
        channels=(8, 8, 16, 16),
        img_latent=8,
        img_codes=16,
        gene_hidden=32,
        gene_latent=8,
        gene_codes=8,
        align_hidden=32,
        dropout=0.0,
        ctx_dim=16,
        ctx_heads=2,
        ctx_tokens=8,
    )


def tiny_stmdit_parts(her2st_dir: Path, d: Path) -> tuple[Any, list[str], Any, Any]:
    """(autoencoder, panel, condition encoder, C3 tile features) for a tiny STMDiT: a 30-step
    autoencoder on real C3 tissue, a 40-gene panel containing ERBB2, PCA-style own encoders."""
    from napari_stgen.io.her2st import gene_panel, read_sections
    from napari_stgen.models.stmdit import OwnCondition
    from napari_stgen.training.stmdit import load_ae, section_features, train_autoencoder

    ae_path = train_autoencoder(
        her2st_dir,
        d / "ae.safetensors",
        steps=30,
        batch=8,
        sections=["C3"],
        cache_dir=d,
        progress=False,
    )
    ae = load_ae(ae_path)
    sec = read_sections(her2st_dir, ["C3"])[0]
    panel = gene_panel([sec], 40)
    if "ERBB2" not in panel:
        panel = panel[:-1] + ["ERBB2"]
    enc = OwnCondition.fit(sec.target(panel), ae, 8)
    feats = section_features(sec, panel, enc, None, tile_px=64, cache_dir=d)
    return ae, panel, enc, feats


def tiny_stmdit_config(save_every: int) -> Any:
    """Training settings of the tiny STMDiT."""
    from napari_stgen.training.stmdit import STMDiTTrainConfig

    return STMDiTTrainConfig(
        steps=40,
        batch=16,
        dim=64,
        depth=2,
        heads=2,
        n_gene_tokens=4,
        labels="real",
        save_every=save_every,
        lr=1e-3,
    )
