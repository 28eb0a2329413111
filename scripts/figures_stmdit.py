"""Figures for docs/synthesis.md: real vs generated tiles, slider sweeps (ERBB2 + an immune gene).

    python scripts/figures_stmdit.py --model PATH --holdout C3 [--data DIR] [--out-dir docs/images]

Real tiles are held-out spots of ``--holdout`` (use a fold model trained without it); each
generated tile is conditioned on that spot's measured expression. Slider sweeps
(``--slider-model``, e.g. the shipped default) vary one gene over the training 1st–99th
percentile, other genes at the training median, three seeds (one per row, shared by the row's
tiles, as the Synthesize slider keeps its seed); the number under each tile is
GenST's re-prediction of that gene on the generated tile.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IMMUNE = ("IGKC", "CD74", "PTPRC", "IGHG3", "IGLC2", "HLA-DRA")


def _save(fig, path: Path) -> None:
    import os

    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    print(path)


def real_vs_generated(
    m, gmodel, gcard, data, holdout, out: Path, n: int = 8, se: float = 0.0, guide=None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_stgen.inference.synthesis import synthesize
    from napari_stgen.io.her2st import read_sections
    from napari_stgen.training.evaluate_stmdit import _context3
    from napari_stgen.training.stmdit import (
        DEFAULT_CACHE,
        TILE_MPP,
        genst_patches_for_tiles,
        genst_predict,
        section_features,
        section_image,
    )

    sec = read_sections(data, [holdout])[0]
    f = section_features(sec, m.genes, m.enc, None, tile_px=m.tile_px)
    j = m.genes.index("ERBB2")
    # spots spanning the ERBB2 range, tissue-rich
    order = np.argsort(f["spot_expr"][:, j])
    pick = order[np.linspace(0, len(order) - 1, n).round().astype(int)]
    real = f["spot_tiles"][pick]
    g = f["spot_expr"][pick]
    img = section_image(sec, TILE_MPP, DEFAULT_CACHE)
    ctx = _context3(img, f["spot_xy"][pick], m.tile_px)
    rows = {
        "real": real,
        "genes": synthesize(m, g, None, seed=0, guidance_expr=0.0),
        "genes+morph": synthesize(m, g, ctx, seed=0, guidance_expr=0.0),
    }
    if se > 0:
        rows["genes+morph,\nexpr. guided"] = synthesize(
            m, g, ctx, seed=0, guidance_expr=se, guide=guide
        )
    rows["morph only"] = synthesize(m, g, ctx, seed=0, guidance_genes=0.0, guidance_expr=0.0)
    rows["unconditional"] = synthesize(
        m, g, None, seed=0, guidance_genes=0.0, guidance_morph=0.0, guidance_expr=0.0
    )
    gi = gcard["genes"].index("ERBB2")
    fig, ax = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.45 * len(rows)))
    for r, (name, tiles) in enumerate(rows.items()):
        pred = genst_predict(gmodel, genst_patches_for_tiles(tiles))[:, gi]
        for c in range(n):
            a = ax[r, c]
            a.imshow(tiles[c])
            a.set_xticks([])
            a.set_yticks([])
            a.set_xlabel(f"{pred[c]:.2f}", fontsize=7, labelpad=1)
            if c == 0:
                a.set_ylabel(name, fontsize=8)
            if r == 0:
                a.set_title(f"ERBB2 {g[c, j]:.2f}", fontsize=7)
    fig.suptitle(
        f"Held-out section {holdout}: real spot tiles (112 µm) and tiles generated from their "
        "measured expression\n(title: measured ERBB2; under each tile: GenST's re-predicted ERBB2)",
        fontsize=8,
    )
    _save(fig, out)
    plt.close(fig)


def slider(
    m, gmodel, gcard, gene: str, out: Path, seeds: int = 3, values: int = 7, se: float = 0.0
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_stgen.inference.synthesis import synthesize
    from napari_stgen.training.stmdit import genst_patches_for_tiles, genst_predict

    j = m.genes.index(gene)
    lo, hi = m.gene_range[j]
    vals = np.linspace(lo, hi, values)
    prof = np.tile(m.gene_median, (values, 1)).astype(np.float32)
    prof[:, j] = vals
    gi = gcard["genes"].index(gene)
    fig, ax = plt.subplots(seeds, values, figsize=(1.3 * values, 1.45 * seeds))
    for s in range(seeds):
        # one seed per row: every slider value starts from the same noise (as the widget)
        tiles = np.concatenate(
            [
                synthesize(m, prof[i : i + 1], None, seed=s, guidance_expr=se, focus=[gene])
                for i in range(values)
            ]
        )
        pred = genst_predict(gmodel, genst_patches_for_tiles(tiles))[:, gi]
        for c in range(values):
            a = ax[s, c]
            a.imshow(tiles[c])
            a.set_xticks([])
            a.set_yticks([])
            a.set_xlabel(f"{pred[c]:.2f}", fontsize=7, labelpad=1)
            if s == 0:
                a.set_title(f"{vals[c]:.2f}", fontsize=7)
            if c == 0:
                a.set_ylabel(f"seed {s}", fontsize=8)
    fig.suptitle(
        f"{gene} slider (title: conditioning value, log1p CP10k; other genes at the training "
        f"median)\nunder each tile: GenST's re-predicted {gene}; expression guidance {se:g}"
        + (
            " (guide = the re-predicting GenST: circular, see the CNN-oracle figures)" if se else ""
        ),
        fontsize=8,
    )
    _save(fig, out)
    plt.close(fig)


def sweep_row(ev: dict) -> dict:
    """The figures of one ``stgen evaluate stmdit`` JSON that the guidance sweep compares."""
    f, c, r = ev["fidelity"], ev["control"], ev.get("realism", {})
    return {
        "guidance_expr": ev.get("guidance_expr", 0.0),
        "guide_t_min": (ev.get("sampler") or {}).get("guide_t_min", 0.0),
        "fidelity_genst_tile_pct": {
            k: f[k]["tile_pct_of_ceiling"] for k in ("genes", "genes+morph")
        },
        "fidelity_cnn_oracle_pct": {
            k: f[k]["cnn_oracle_pct_of_ceiling"] for k in ("genes", "genes+morph")
        },
        "control_genst_pooled": c["mean_spearman_pooled"],
        "control_cnn_oracle_pooled": c["mean_spearman_pooled_cnn_oracle"],
        "kid": {k: r[k]["kid"] for k in ("genes", "genes+morph") if k in r},
    }


def sweep_plot(rows: list[dict], out: Path) -> None:
    """Fidelity, control and KID against the expression-guidance scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    line = sorted(
        (r for r in rows if r.get("guide_t_min") in (None, 0.3)), key=lambda r: r["guidance_expr"]
    )
    extra = [r for r in rows if r not in line]  # e.g. guidance at every step
    fig, ax = plt.subplots(1, 3, figsize=(11, 3.2))
    for data, mk, lab in ((line, "", ""), (extra, "none", ", every step")):
        if not data:
            continue
        x = [r["guidance_expr"] for r in data]
        st = "-" if mk == "" else ""
        for k, ls in (("genes", st), ("genes+morph", "--" if st else "")):
            for key, c, m, who in (
                ("fidelity_genst_tile_pct", "C0", "o", "GenST"),
                ("fidelity_cnn_oracle_pct", "C1", "s", "CNN oracle"),
            ):
                ax[0].plot(
                    x, [r[key][k] for r in data], m + ls, c=c, mfc=mk or c, label=f"{who}, {k}{lab}"
                )
            ax[2].plot(
                x,
                [r["kid"].get(k, np.nan) for r in data],
                "o" + ls,
                c="C2",
                mfc=mk or "C2",
                label=f"{k}{lab}",
            )
        for key, c, m, who in (
            ("control_genst_pooled", "C0", "o", "GenST"),
            ("control_cnn_oracle_pooled", "C1", "s", "CNN oracle"),
        ):
            ax[1].plot(x, [r[key] for r in data], m + st, c=c, mfc=mk or c, label=f"{who}{lab}")
    ax[0].axhline(90, c="grey", lw=0.8, ls=":")
    ax[0].set_ylabel("fidelity, % of the real-tile ceiling")
    ax[1].axhline(0.8, c="grey", lw=0.8, ls=":")
    ax[1].set_ylabel("control, pooled Spearman (top-10 genes)")
    ax[2].set_ylabel("KID vs real held-out tiles")
    for a in ax:
        a.set_xlabel("expression guidance scale s_e (from t = 0.3)")
        a.legend(fontsize=6)
    fig.suptitle(
        "Held-out C3, fold models; guide: GenST fold without C3; dotted: targets", fontsize=9
    )
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)


def main() -> None:
    import torch

    from napari_stgen.inference.synthesis import load_guide, load_stmdit
    from napari_stgen.training.stmdit import load_genst_model

    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--model",
        default="default",
        help="model for real vs generated (a fold model trained without --holdout)",
    )
    p.add_argument(
        "--slider-model", default=None, help="model for the slider sweeps (default: --model)"
    )
    p.add_argument("--holdout", default="C3")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "her2st"))
    p.add_argument("--genst", default="default")
    p.add_argument("--out-dir", default=str(ROOT / "docs" / "images"))
    p.add_argument(
        "--guide",
        default=None,
        help="GenST guide for the real-vs-generated row (trained without --holdout)",
    )
    p.add_argument("--guidance-expr", type=float, default=None, help="default: the card's")
    p.add_argument(
        "--sweep",
        nargs="*",
        default=None,
        metavar="EVAL.json",
        help="only plot the guidance sweep from these evaluation JSONs (writes "
        "docs/stmdit_guidance_sweep.json and stmdit_guidance_sweep.png)",
    )
    a = p.parse_args()
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if a.sweep is not None:
        import json

        summary = ROOT / "docs" / "stmdit_guidance_sweep.json"
        if a.sweep:
            rows = [sweep_row(json.loads(Path(f).read_text())) for f in a.sweep]
            summary.write_text(json.dumps(rows, indent=1) + "\n")
        sweep_plot(json.loads(summary.read_text()), out / "stmdit_guidance_sweep.png")
        return
    m = load_stmdit(a.model)
    gmodel, gcard, _, _ = load_genst_model(a.genst)
    ms = load_stmdit(a.slider_model) if a.slider_model else m
    # the fold model is sampled with the shipped model's sampler settings (as the evaluation does)
    m.card["sampler"] = {**m.card.get("sampler", {}), **ms.card.get("sampler", {})}
    se = ms.default_guidance_expr if a.guidance_expr is None else a.guidance_expr
    guide = load_guide(m, a.guide or "default") if se > 0 else None
    real_vs_generated(
        m,
        gmodel,
        gcard,
        a.data,
        a.holdout,
        out / "stmdit_real_vs_generated.png",
        se=se,
        guide=guide,
    )
    slider(ms, gmodel, gcard, "ERBB2", out / "stmdit_slider_ERBB2.png", se=se)
    immune = next(g for g in IMMUNE if g in ms.genes)
    slider(ms, gmodel, gcard, immune, out / f"stmdit_slider_{immune}.png", se=se)


if __name__ == "__main__":
    main()
