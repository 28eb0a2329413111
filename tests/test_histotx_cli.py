"""``stgen predict --model histotx --measured SPOTS.h5ad`` on the sample slide."""

from __future__ import annotations

import numpy as np
import pytest


def _write_h5ad(path, counts, genes, xy, names):
    import anndata

    a = anndata.AnnData(X=np.asarray(counts, np.float32))
    a.var_names = list(genes)
    a.obs_names = list(names)
    a.obsm["spatial"] = np.asarray(xy, np.float64)
    a.write_h5ad(path)
    return path


@pytest.fixture
def predict_parser_has_measured():
    from napari_stgen.cli.main import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse
    if "predict" not in sub or "--measured" not in sub["predict"]._option_string_actions:
        pytest.skip("stgen predict has no --measured yet (HistoTx integration pending)")


def test_predict_with_measured_spots(
    predict_parser_has_measured,
    her2st_c3_dir,
    sample_slide_path,
    sample_spots_path,
    tmp_path,
    capsys,
):
    import anndata
    import torch

    from napari_stgen.cli.main import main
    from napari_stgen.io.her2st import read_her2st_section

    torch.set_num_threads(1)
    sec = read_her2st_section(her2st_c3_dir, "C3")
    idx = np.arange(0, sec.n_spots, 2)
    h5 = _write_h5ad(
        tmp_path / "measured.h5ad",
        sec.counts[idx],
        sec.genes,
        sec.xy_px[idx],
        [sec.barcodes[i] for i in idx],
    )
    common = [str(sample_slide_path), "--spots", str(sample_spots_path), "--quiet"]
    out = tmp_path / "fused.h5ad"
    rc = main(
        ["predict", *common, "--model", "histotx", "--measured", str(h5)]
        + ["--adapt-steps", "5", "--out", str(out)]
    )
    assert rc == 0
    a = anndata.read_h5ad(out)
    assert a.shape == (180, 250) and np.isfinite(a.X).all()
    info = a.uns["stgen"]["histotx"]
    assert int(info["measured_spots"]) == len(idx) and not bool(info["image_only"])
    out2 = tmp_path / "image_only.h5ad"
    rc = main(
        ["predict", *common, "--model", "histotx", "--measured", str(h5), "--image-only"]
        + ["--out", str(out2)]
    )
    assert rc == 0
    b = anndata.read_h5ad(out2)
    assert not np.allclose(a.X, b.X)

    # errors: GenST with --measured; a measured file sharing no gene with the panel
    capsys.readouterr()
    rc = main(["predict", *common, "--measured", str(h5), "--out", str(tmp_path / "x.h5ad")])
    assert rc == 2 and "HistoTx" in capsys.readouterr().err
    bad = _write_h5ad(
        tmp_path / "nogenes.h5ad", np.ones((2, 3)), ["A1", "B2", "C3X"], sec.xy_px[:2], ["a", "b"]
    )
    rc = main(
        ["predict", *common, "--model", "histotx", "--measured", str(bad)]
        + ["--out", str(tmp_path / "y.h5ad")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "nogenes.h5ad" in err and "none of its 3 genes" in err
