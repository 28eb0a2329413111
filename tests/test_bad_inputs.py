"""Hostile and broken inputs (issue 19): never hang, never blow up memory, never predict on
tiles that are not there, never raise inside napari.

Each numbered finding of the issue has its tests here (``test_f1_…`` … ``test_f6_…``), then a
sampled corpus of mutations (``benchmarks/fuzz_inputs.py`` holds the mutators and the full run)
whose outcome class is asserted per entry point.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from napari_stgen.cli.main import main
from napari_stgen.errors import CheckpointError, SlideReadError, StgenError
from napari_stgen.io.slide import open_slide

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fuzz_inputs as fz  # noqa: E402 - the corpus mutators live with the full fuzz run

MPP1 = 0.6873763764046317 * 2  # µm/px of the sample's level 1 (the tissue_rgb crop)


def _limit_memory() -> None:  # subprocess preexec: a runaway allocation fails, not the machine
    resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))


def stgen(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process, under a 6 GiB address-space limit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "napari_stgen.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        preexec_fn=_limit_memory,
    )


def assert_one_line_error(p: subprocess.CompletedProcess, path: Path | str, *words: str) -> None:
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, err[-2000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert str(path) in err, err
    for w in words:
        assert w in err, err


@pytest.fixture(scope="module")
def sample_bytes(sample_slide_path: Path) -> bytes:
    return sample_slide_path.read_bytes()


@pytest.fixture(scope="module")
def spots_few(tmp_path_factory: pytest.TempPathFactory, sample_spots_path: Path) -> Path:
    import pandas as pd

    p = tmp_path_factory.mktemp("spots") / "few.csv"
    pd.read_csv(sample_spots_path, dtype={"barcode": str}).iloc[::30, :4].to_csv(p, index=False)
    return p


@pytest.fixture(scope="module")
def zlib_tiff(tmp_path_factory: pytest.TempPathFactory, tissue_rgb: np.ndarray) -> Path:
    """A real H&E crop as a zlib-tiled TIFF with mpp, whose tile (row 1, col 2) is corrupt."""
    d = tmp_path_factory.mktemp("ztiff")
    p = d / "corrupt_tile.tif"
    tifffile.imwrite(
        p, tissue_rgb, tile=(256, 256), compression="zlib",
        description=json.dumps({"mpp": MPP1}), metadata=None,
    )  # fmt: skip
    with tifffile.TiffFile(p) as tf:
        page = tf.pages[0]
        per_row = -(-page.shape[1] // 256)
        i = 1 * per_row + 2
        off, n = int(page.dataoffsets[i]), int(page.databytecounts[i])
    b = bytearray(p.read_bytes())
    for k in range(off + 20, off + n - 4, 5):
        b[k] ^= 0xA5
    p.write_bytes(bytes(b))
    return p


# ----------------------------------------------------------------------------------- 1
BOMBS = {
    "ImageWidth=0xFFFFFFFF": (256, 0xFFFFFFFF, "declares"),
    "ImageWidth=0x7FFFFFFF": (256, 0x7FFFFFFF, "declares"),
    "ImageWidth=1000000": (256, 1_000_000, "tile table"),
    "ImageLength=1000000": (257, 1_000_000, "tile table"),
    "TileWidth=0xFFFFFFFF": (322, 0xFFFFFFFF, "tile size"),
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_f1_bombs_refused_at_open_before_allocation(
    name: str, sample_bytes: bytes, tmp_path: Path
) -> None:
    tag, value, words = BOMBS[name]
    p = tmp_path / "bomb.tif"
    p.write_bytes(fz.set_tag(sample_bytes, 0, tag, value))
    # the real CLI, under a 6 GiB address-space limit and 60 s: one line, exit 2
    assert_one_line_error(stgen("info", str(p), timeout=60), p, words)
    with pytest.raises(SlideReadError, match="level 0"):
        open_slide(p)


def test_f1_limits_are_configurable(
    sample_slide_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STGEN_MAX_SIDE_PX", "5000")
    with pytest.raises(SlideReadError, match="past the limit of 5,000 px"):
        open_slide(sample_slide_path)
    monkeypatch.delenv("STGEN_MAX_SIDE_PX")
    with open_slide(sample_slide_path) as s:
        assert s.width == 9270


# ----------------------------------------------------------------------------------- 2
@pytest.mark.parametrize("cut", [1000, 3328, 5_262_600, 7_000_000])
def test_f2_truncated_sample_is_refused(
    cut: int, sample_bytes: bytes, spots_few: Path, tmp_path: Path
) -> None:
    p = tmp_path / "cut.tif"
    p.write_bytes(sample_bytes[:cut])
    with pytest.raises(SlideReadError) as ei:
        open_slide(p)
    assert str(p) in str(ei.value) and ("truncated" in str(ei.value) or "corrupt" in str(ei.value))
    if cut == 5_262_600:  # the 5.26 MB cut used to be predicted as if the tiles were there
        out = tmp_path / "pred.h5ad"
        assert_one_line_error(
            stgen("predict", str(p), "--spots", str(spots_few), "--out", str(out)), p
        )
        assert not out.exists() and not list(tmp_path.glob(".*partial"))


def test_f2_corrupt_tile_raises_naming_file_level_tile(zlib_tiff: Path) -> None:
    with open_slide(zlib_tiff) as s:  # opening only probes: the structure is sound
        ok = s.levels[0][:256, :256].compute()
        assert ok.std() > 5  # real tissue
        with pytest.raises(SlideReadError) as ei:
            s.levels[0][256:512, 512:768].compute()
        msg = str(ei.value)
        assert str(zlib_tiff) in msg and "level 0" in msg and "row 1, col 2" in msg
        with pytest.raises(SlideReadError, match="row 1, col 2"):  # computed levels too
            s.levels[1].compute()


def test_f2_predict_stops_or_skips_unreadable_tiles(zlib_tiff: Path, tmp_path: Path) -> None:
    import anndata as ad
    import pandas as pd

    from napari_stgen.inference.batch import predict_slide

    # spot 'bad' sits on the corrupt tile (x 512..768, y 256..512 px), the others do not
    spots = tmp_path / "spots.csv"
    pd.DataFrame(
        {"barcode": ["a", "bad", "c"], "x": [150.0, 640.0, 1050.0], "y": [800.0, 384.0, 800.0]}
    ).to_csv(spots, index=False)
    out = tmp_path / "p.h5ad"
    with pytest.raises(SlideReadError, match="row 1, col 2"):
        predict_slide(zlib_tiff, out, spots=spots)
    assert not out.exists()
    # the explicit option: predict around it, flag it, count it
    rc = main(["predict", str(zlib_tiff), "--spots", str(spots), "--out", str(out), "--quiet",
               "--skip-unreadable"])  # fmt: skip
    assert rc == 0
    a = ad.read_h5ad(out)
    assert a.obs["unreadable"].tolist() == [False, True, False]
    assert a.uns["stgen"]["n_unreadable"] == 1
    assert np.isnan(a["bad"].X).all() and np.isfinite(a[["a", "c"]].X).all()

    # grid cells (the engine's path, as `stgen predict --grid`): cells over the corrupt tile
    # are NaN, the others predicted; without the option the read error names the tile
    from napari_stgen.inference.contract import SpotRequest
    from napari_stgen.inference.registry import load_predictor
    from napari_stgen.inference.tiles import slide_grid, tile_centres_um, tile_um_of

    pred = load_predictor("default", device="cpu")
    with open_slide(zlib_tiff) as sl:
        grid = slide_grid(sl, tile_um_of(pred))
        cells = np.argwhere(np.ones(grid.shape, dtype=bool))
        xy_px = tile_centres_um(grid, cells)[:, ::-1] / sl.mpp
        with pytest.raises(SlideReadError, match="row 1, col 2"):
            pred.predict_spots(sl, xy_px, SpotRequest(grid=grid, tiles=cells))
        res = pred.predict_spots(
            sl, xy_px, SpotRequest(grid=grid, tiles=cells, skip_unreadable=True)
        )
    bad = np.isnan(res.expr).all(1)
    assert 0 < bad.sum() < len(bad) and np.isfinite(res.expr[~bad]).all()
    assert np.isnan(res.uncertainty[bad]).all()
    y0, x0 = tile_centres_um(grid, cells[bad]).min(0) / MPP1  # within reach of the bad tile
    assert 256 - grid.tile_um / MPP1 <= y0 < 512 and 512 - grid.tile_um / MPP1 <= x0 < 768


@pytest.mark.parametrize("delta", [-256, -16384])
def test_f2_jpeg_tile_with_wrong_byte_count_is_an_error(
    delta: int, sample_bytes: bytes, tmp_path: Path
) -> None:
    """The two silent cases of the fuzz run: a bit flip in TileByteCounts shortens a JPEG
    tile, which libjpeg decodes (grey-filled) without complaint."""
    ifd = fz.tiff_ifds(sample_bytes)[2]
    _e, _t, _c, vf = ifd["entries"][325]
    import struct

    (arr,) = struct.unpack_from("<I", sample_bytes, vf)
    (n,) = struct.unpack_from("<I", sample_bytes, arr + 4 * 44)
    p = tmp_path / "short.tif"
    p.write_bytes(fz.set_array_item(sample_bytes, 2, 325, 44, n + delta))
    with open_slide(p) as s:
        with pytest.raises(SlideReadError, match="level 2 tile .* no end marker"):
            s.levels[2].compute()


# ----------------------------------------------------------------------------------- 3
def test_f3_failing_tile_draws_blank_with_one_notification(
    make_napari_viewer, zlib_tiff: Path, qtbot, monkeypatch: pytest.MonkeyPatch
) -> None:
    from napari_stgen.io import napari_reader
    from napari_stgen.widgets.state import slide_from_layer

    told: list[str] = []
    monkeypatch.setattr(napari_reader, "_notify", lambda msg: told.append(msg))
    viewer = make_napari_viewer(show=True)
    viewer.open(str(zlib_tiff), plugin="napari-stgen")
    layer = viewer.layers[0]
    # zoom onto the corrupt tile so napari draws level 0 there, then pan across it twice
    centre = np.array([384.0, 640.0]) * MPP1
    viewer.camera.zoom = 4.0 / MPP1
    for dx in (0.0, 300.0, 0.0):
        viewer.camera.center = tuple(centre + [0.0, dx])
        qtbot.wait(300)
    assert layer.data_level == 0
    assert len(told) == 1 and zlib_tiff.name in told[0] and "blank" in told[0]
    bad = np.asarray(layer.data[0][256:512, 512:768])
    good = np.asarray(layer.data[0][256:512, 256:512])
    assert (bad == 255).all() and good.std() > 5  # exactly that tile is blank
    # the strict levels (what prediction reads) still raise
    with pytest.raises(SlideReadError):
        slide_from_layer(layer).levels[0][256:512, 512:768].compute()


@pytest.mark.parametrize(
    "edit",
    ["ImageWidth=1000000", "TileWidth=1", "TileWidth=255", "Compression=65535", "TileLength=0"],
)
def test_f3_reader_refuses_what_it_cannot_draw(
    make_napari_viewer, edit: str, sample_bytes: bytes, tmp_path: Path
) -> None:
    name, value = edit.split("=")
    p = tmp_path / f"{name}.tif"
    p.write_bytes(fz.set_tag(sample_bytes, 0, fz.TAGS[name], int(value)))
    viewer = make_napari_viewer()
    with pytest.raises(Exception) as ei:
        viewer.open(str(p), plugin="napari-stgen")
    chain = [ei.value, ei.value.__cause__, ei.value.__context__]
    err = next(e for e in chain if isinstance(e, SlideReadError))
    assert str(p) in str(err) and "\n" not in str(err)
    assert len(viewer.layers) == 0


# ----------------------------------------------------------------------------------- 4
@pytest.fixture(scope="module")
def small_rgb(sample_slide_path: Path) -> np.ndarray:
    with open_slide(sample_slide_path) as s:
        return np.ascontiguousarray(s.levels[3].compute())  # 1242 x 1159 real H&E


def test_f4_plain_images_past_the_limit_are_refused(
    small_rgb: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(small_rgb).save(buf, format="JPEG", quality=90)
    jpg = buf.getvalue()
    png = fz.png_bytes(64, 64)
    cases = {
        "sof.jpg": (fz.jpeg_set_sof(jpg, 65500, 65500), "1e+08-pixel limit"),
        "ihdr.png": (fz.png_set_ihdr(png, 2**31 - 1, 10), "declares 2147483647"),
        "big.png": (fz.png_set_ihdr(png, 40000, 40000), "1e+08-pixel limit"),
    }
    for name, (data, words) in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        assert_one_line_error(stgen("info", str(p), timeout=60), p, words)
    # a valid image past a (lowered) limit is refused from its header, below it is read
    p = tmp_path / "valid.png"
    Image.fromarray(small_rgb).save(p)
    monkeypatch.setenv("STGEN_MAX_IMAGE_PIXELS", str(10**6))
    with pytest.raises(SlideReadError, match="pixel limit"):
        open_slide(p)
    monkeypatch.delenv("STGEN_MAX_IMAGE_PIXELS")
    with open_slide(p) as s:
        assert (s.height, s.width) == small_rgb.shape[:2]


def test_f4_implausible_resolution_refused_and_mpp_overrides(
    small_rgb: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    p = tmp_path / "dpi.png"
    h, w = small_rgb.shape[:2]
    p.write_bytes(fz.png_bytes(w, h, (b"\x00" + r.tobytes() for r in small_rgb), dpi=1e8))
    with pytest.raises(SlideReadError) as ei:
        open_slide(p)
    msg = str(ei.value)  # the library names its parameter, the CLI its flag
    assert "outside the plausible 0.05–50 µm/px" in msg and "mpp=" in msg and "--mpp" not in msg
    r = stgen("info", str(p), timeout=60)
    assert r.returncode == 2 and "pass --mpp MPP" in r.stderr and "mpp=" not in r.stderr
    assert main(["info", str(p)]) == 2
    assert main(["info", str(p), "--mpp", "2.75"]) == 0
    assert json.loads(capsys.readouterr().out)["mpp"] == 2.75
    with open_slide(p, mpp=2.75) as s:
        assert s.mpp_source == "argument"
    with pytest.raises(SlideReadError, match="outside the plausible"):
        open_slide(p, mpp=1e-5)


@pytest.fixture(scope="module")
def zarr_cases(small_rgb: np.ndarray) -> dict[str, fz.Mutation]:
    return {m.name: m for m in fz.zarr_mutations(small_rgb)}


@pytest.mark.parametrize(
    "name, words",
    [
        ("zattrs-null", "not a JSON object"),
        ("zattrs-array", "not a JSON object"),
        ("zattrs-deep", "nested too deeply"),
        ("scale0", "not a positive number"),
        ("scaleNaN", "not a positive number"),
        ("scaleInfinity", "not a positive number"),
        ("L0.chunks=[1, 1, 3]", "too small"),
        ("L0.shape=[1000000, 1000000, 3]", "past the limit"),
        ("L0.chunk-delete", "missing 1 of"),
    ],
)
def test_f4_ome_zarr_broken_metadata(
    name: str, words: str, zarr_cases: dict, tmp_path: Path
) -> None:
    from napari_stgen.io.napari_reader import get_reader

    p = zarr_cases[name].build(tmp_path)
    reader = get_reader(str(p))
    assert reader is not None  # claimed, so the user gets the reason rather than "no reader"
    with pytest.raises(SlideReadError) as ei:
        reader(str(p))
    assert str(p) in str(ei.value) and words in str(ei.value)


@pytest.mark.parametrize("how", ["empty", "corrupt"])
def test_f4_ome_zarr_bad_chunk_is_a_slide_read_error(
    how: str, zarr_cases: dict, tmp_path: Path
) -> None:
    p = zarr_cases[f"L0.chunk-{how}"].build(tmp_path)
    with open_slide(p) as s:  # the coarse level is fine; the bad chunk is in level 0
        with pytest.raises(SlideReadError, match=r"level 0 chunk at rows \d+:\d+, cols \d+:\d+"):
            s.levels[0].compute()


# ----------------------------------------------------------------------------------- 5
@pytest.fixture(scope="module")
def pred_h5ad(tmp_path_factory: pytest.TempPathFactory, sample_slide_path, spots_few) -> Path:
    out = tmp_path_factory.mktemp("h5") / "pred.h5ad"
    assert main(["predict", str(sample_slide_path), "--spots", str(spots_few),
                 "--out", str(out), "--quiet"]) == 0  # fmt: skip
    return out


@pytest.fixture(scope="module")
def h5ad_cases(pred_h5ad: Path) -> dict[str, fz.Mutation]:
    return {m.name: m for m in fz.h5ad_mutations(pred_h5ad)}


@pytest.mark.parametrize("name", ["sparse-indptr-short", "sparse-indices-range"])
def test_f5_sparse_h5ad_that_crashed_is_refused(
    name: str, h5ad_cases: dict, tmp_path: Path, sample_slide_path: Path, spots_few: Path
) -> None:
    p = h5ad_cases[name].build(tmp_path)
    # the plugin's reader, in a fresh process (a SIGSEGV would show as a negative code)
    code = f"from napari_stgen.io.anndata import read_h5ad_layers; read_h5ad_layers({str(p)!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "StgenError" in r.stderr and str(p) in r.stderr
    # the measured-spots path (HistoTx) through the CLI
    out = tmp_path / "o.h5ad"
    res = stgen("predict", str(sample_slide_path), "--model", "histotx", "--measured", str(p),
                "--out", str(out), "--spots", str(spots_few))  # fmt: skip
    assert_one_line_error(res, p, "sparse X")


@pytest.mark.parametrize(
    "name, words",
    [
        ("mpp=-1.0", "finite positive"),
        ("mpp=inf", "finite positive"),
        ("mpp=nan", "finite positive"),
        ("mpp=b'abc'", "not a readable"),
        ("spatial-nan", "finite"),
        ("spatial-inf", "finite"),
        ("spatial-1col", "obsm['spatial']"),
        ("spatial-rows", "obsm['spatial']"),
        ("no-spatial", "obsm['spatial']"),
        ("X-string", "not numbers"),
        ("X-shape", "shape"),
        ("obs-index-short", "rows"),
        ("sparse-shape-huge", "shape"),
        ("no-X", ""),
        ("trunc", "not a readable"),
    ],
)
def test_f5_h5ad_schema_errors_are_one_line(
    name: str, words: str, h5ad_cases: dict, tmp_path: Path
) -> None:
    from napari_stgen.io.anndata import read_h5ad_layers

    m = h5ad_cases.get(name) or next(v for k, v in h5ad_cases.items() if k.startswith(name))
    p = m.build(tmp_path)
    with pytest.raises(StgenError) as ei:
        read_h5ad_layers(p)
    msg = str(ei.value)
    assert str(p) in msg and words in msg and "\n" not in msg


def test_f5_h5ad_grid_too_large_refused(pred_h5ad: Path, tmp_path: Path) -> None:
    from napari_stgen.io.anndata import read_h5ad_layers

    p = tmp_path / "grid.h5ad"
    p.write_bytes(pred_h5ad.read_bytes())
    with h5py.File(p, "r+") as f:
        st = f["uns/stgen"]
        g = st.create_group("grid")
        g["shape"] = np.array([10**6, 10**6])
        g["tile_um"] = 112.0
        g["origin_yx_um"] = np.zeros(2)
        cols = list(f["obs"].attrs["column-order"])
        for c in ("genst_code", "grid_row", "grid_col"):
            if c not in f["obs"]:
                f[f"obs/{c}"] = np.zeros(f["X"].shape[0], np.int64)
                cols.append(c)
        f["obs"].attrs["column-order"] = cols
    with pytest.raises(StgenError, match="not a plausible tile grid"):
        read_h5ad_layers(p)


@pytest.fixture(scope="module")
def ckpt_cases() -> dict[str, fz.Mutation]:
    from napari_stgen.models.checkpoint import WEIGHTS_DIR

    return {m.name: m for m in fz.checkpoint_mutations(WEIGHTS_DIR / "genst_default.safetensors")}


@pytest.mark.parametrize(
    "name, words",
    [
        ("all-nan", "non-finite values"),
        ("one-nan", "non-finite values"),
        ("card.tta=0", "'tta'"),
        ("card.tta=1000000000", "'tta'"),
        ("card.architecture.channels=[1000000, 1000000, 1000000, 1000000]", "channels"),
        ("card.architecture.img_codes=1000000000", "img_codes"),
        ("card.mpp=-1", "'mpp'"),
        ("card.genes=[]", "'genes'"),
        ("shape-mismatch", "shape"),
        ("trunc8", "not a readable"),
    ],
)
def test_f5_checkpoints_validated_on_load(
    name: str, words: str, ckpt_cases: dict, tmp_path: Path
) -> None:
    from napari_stgen.models.checkpoint import load_checkpoint

    p = ckpt_cases[name].build(tmp_path)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(p)
    assert str(p) in str(ei.value) and words in str(ei.value)


def test_f5_broken_weights_never_write_a_prediction(
    ckpt_cases: dict, sample_slide_path: Path, spots_few: Path, tmp_path: Path
) -> None:
    for name, words in (("all-nan", "non-finite"), ("scaled-1e38", "non-finite")):
        d = tmp_path / name
        d.mkdir()
        p = ckpt_cases[name].build(d)
        out = d / "o.h5ad"
        r = stgen("predict", str(sample_slide_path), "--spots", str(spots_few), "--model",
                  str(p), "--out", str(out))  # fmt: skip
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr
        assert not out.exists()


def test_f5_stmdit_card_without_mpp(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from napari_stgen.models.checkpoint import WEIGHTS_DIR, load_checkpoint

    src = WEIGHTS_DIR / "stmdit_default.safetensors"
    with safe_open(str(src), framework="np") as f:
        card = json.loads(f.metadata()["stgen_card"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del card["mpp"]
    p = tmp_path / "stmdit.safetensors"
    save_file(tensors, str(p), metadata={"stgen_card": json.dumps(card)})
    with pytest.raises(CheckpointError, match="'mpp' is missing"):
        load_checkpoint(p)


def test_f5_synthesis_from_absurd_profile_refused(pred_h5ad: Path, tmp_path: Path) -> None:
    p = tmp_path / "neg.h5ad"
    p.write_bytes(pred_h5ad.read_bytes())
    with h5py.File(p, "r+") as f:
        x = f["X"][()]
        f["X"][...] = np.full_like(x, -1e30)
        obs0 = f["obs/_index"][0].decode()
    out = tmp_path / "tile.png"
    r = stgen("synthesize", "--from-h5ad", str(p), "--obs", obs0, "--out", str(out))
    assert r.returncode == 2 and "conditioning value -1e+30" in r.stderr
    assert not out.exists()


def test_f5_spots_csv_index_column_and_off_slide(
    sample_slide_path: Path, spots_few: Path, tmp_path: Path
) -> None:
    import anndata as ad
    import pandas as pd

    df = pd.read_csv(spots_few, dtype={"barcode": str})
    p = tmp_path / "idx.csv"
    df.assign(_index=range(len(df))).to_csv(p, index=False)
    out = tmp_path / "o.h5ad"
    assert main(["predict", str(sample_slide_path), "--spots", str(p), "--out", str(out),
                 "--quiet"]) == 0  # fmt: skip
    assert ad.read_h5ad(out).obs["_index_csv"].tolist() == list(range(len(df)))
    for name, col, v in (("neg.csv", "x", -500.0), ("far.csv", "y", 1e7), ("nan.csv", "x", None)):
        q = tmp_path / name
        d2 = df.copy()
        d2.loc[1, col] = np.nan if v is None else v
        d2.to_csv(q, index=False)
        r = main(["predict", str(sample_slide_path), "--spots", str(q), "--out",
                  str(tmp_path / "x.h5ad"), "--quiet"])  # fmt: skip
        assert r == 2
    q = tmp_path / "latin1.csv"
    q.write_bytes(spots_few.read_bytes().replace(b"barcode", b"b\xe9rcode", 1))
    assert main(["predict", str(sample_slide_path), "--spots", str(q), "--out",
                 str(tmp_path / "y.h5ad"), "--quiet"]) == 2  # fmt: skip


# ----------------------------------------------------------------------------------- 6
def test_f6_failed_synthesis_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from PIL import Image

    real_save = Image.Image.save

    def disk_full(self, fp, *a, **k):  # writes a little, then the disk is full
        real_save(self, fp, *a, **k)
        with open(fp, "r+b") as fh:
            fh.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    out = tmp_path / "tile.png"
    rc = main(["synthesize", "--genes", "ERBB2=4", "--steps", "2", "--out", str(out),
               "--guidance-expr", "0"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err and str(out) in err
    assert list(tmp_path.iterdir()) == []  # no tile, no sidecar, no .partial


# ----------------------------------------------------------------------------------- corpus
OK, REFUSED = "ok", "refused"


def _open_outcome(p: Path) -> str:
    """'refused' (a one-line SlideReadError naming the file) or 'ok' (opens, and every level's
    display data and strict coarse level read without an exception other than SlideReadError)."""
    try:
        s = open_slide(p)
    except SlideReadError as e:
        assert str(p) in str(e) and "\n" not in str(e), str(e)
        return REFUSED
    with s:
        for lv in s.display_levels():  # what napari draws never raises
            h, w = lv.shape[:2]
            np.asarray(lv[h // 2 : h // 2 + 512, w // 2 : w // 2 + 512])
        try:
            s.levels[-1].compute()
        except SlideReadError as e:
            assert "level" in str(e)
    return OK


def test_corpus_sample_tiff(sample_slide_path: Path, tmp_path: Path) -> None:
    """60 sampled TIFF mutations (truncations, IFD flips, tag edits, tile-table edits)."""
    rng = random.Random(19)
    muts = fz.tiff_mutations(sample_slide_path, rng, n_trunc=15, n_flip=25)
    muts = rng.sample(muts, 60)
    seen = {OK: 0, REFUSED: 0}
    for m in muts:
        p = m.build(tmp_path)
        seen[_open_outcome(p)] += 1
        if m.family == "tiff-trunc":
            with pytest.raises(SlideReadError):  # every truncation is detected at open
                open_slide(p)
    assert seen[REFUSED] > 0


def test_corpus_sample_images_and_zarr(small_rgb: np.ndarray, tmp_path: Path) -> None:
    rng = random.Random(7)
    muts = [m for m in fz.image_mutations(small_rgb, rng, n_flip=8) if "valid40000" not in m.name]
    muts += fz.zarr_mutations(small_rgb)
    for i, m in enumerate(muts):
        d = tmp_path / str(i)
        d.mkdir()
        outcome = _open_outcome(m.build(d))
        big = ("sof65500", "sof40000", "sof20000", "sof0x", "ihdr2147", "ihdr40000", "ihdr0x")
        if m.name.startswith((*big, "zattrs", "scale")):
            assert outcome == REFUSED, m.id
        if "trunc" in m.name and m.family == "png":
            assert outcome == REFUSED, m.id


def test_corpus_sample_info_entry_point(
    sample_bytes: bytes, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`stgen info` in-process: exit 0 or 2 and one line, never an internal error."""
    rng = random.Random(3)
    src = tmp_path / "src.tif"
    src.write_bytes(sample_bytes)
    muts = rng.sample(fz.tiff_mutations(src, rng, n_trunc=10, n_flip=20), 30)
    for m in muts:
        p = m.build(tmp_path)
        rc = main(["info", str(p)])
        err = capsys.readouterr().err.strip()
        assert rc in (0, 2), (m.id, err)
        assert rc == 0 or (len(err.splitlines()) == 1 and str(p) in err), (m.id, err)
