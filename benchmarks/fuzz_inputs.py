"""Hostile-input fuzzing: mutated copies of the sample slide and of the package's own files,
each through ``stgen info``, ``stgen predict`` and the napari reader (+ layer + draw).

    nice -n 15 python benchmarks/fuzz_inputs.py --n 1000 --out scratch/fuzz [--timeout 60]

Every case runs in its own process (forked from a parent that has imported the package, so a
case costs its work, not the imports) under a wall-clock limit and an RSS limit (2 GiB by
default, polled every 50 ms; RLIMIT_AS cannot be used with torch's address-space reservations).
Outcome classes:

- ``ok``: accepted, and what it gives equals the intact input's (harmless mutation);
- ``ok-changed``: accepted with different *reported metadata* (size, µm/px…): the file says
  something else, and the tool says so;
- ``refused``: a one-line ``StgenError`` (exit 2 on the CLI, no traceback);
- ``blank-tile``: (napari only) a tile that cannot be read drew blank with one notification;
- ``traceback``: any other exception (a bug); ``crash``: killed by a signal;
- ``hang``: past the time limit; ``memory``: past the RSS limit;
- ``silent``: accepted with the same metadata as the intact input but different pixels or
  predictions (a corruption nobody was told about).

``stgen predict`` runs on every slide mutation that ``stgen info`` accepts, and on 1 in 10 of
those it refuses (the rest are counted ``refused`` with ``inferred``: predict calls the same
``open_slide`` before loading a model, so it cannot do otherwise).

The mutators (``tiff_mutations`` …) are also used by ``tests/test_bad_inputs.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# TIFF tag codes used by the semantic mutations
TAGS = {
    "ImageWidth": 256,
    "ImageLength": 257,
    "BitsPerSample": 258,
    "Compression": 259,
    "Photometric": 262,
    "SamplesPerPixel": 277,
    "RowsPerStrip": 278,
    "PlanarConfig": 284,
    "TileWidth": 322,
    "TileLength": 323,
    "TileOffsets": 324,
    "TileByteCounts": 325,
}


@dataclass
class Mutation:
    """A named mutated copy of an input: ``write(dir) -> path`` makes the file."""

    family: str  # 'tiff-trunc', 'tiff-flip', 'tiff-tag', 'jpeg', 'png', 'zarr', 'h5ad', ...
    name: str
    build: Callable[[Path], Path]

    @property
    def id(self) -> str:
        return f"{self.family}:{self.name}"


# ------------------------------------------------------------------------------- TIFF
def tiff_ifds(data: bytes) -> list[dict]:
    """Classic little-endian TIFF IFDs: [{'offset', 'entries': {tag: (entry_off, type, count,
    value_field_off)}}] following the chain (no SubIFDs)."""
    assert data[:4] == b"II*\x00", "classic little-endian TIFF expected"
    out = []
    (off,) = struct.unpack_from("<I", data, 4)
    seen = set()
    while off and off + 2 <= len(data) and off not in seen:
        seen.add(off)
        (n,) = struct.unpack_from("<H", data, off)
        entries = {}
        for i in range(n):
            e = off + 2 + 12 * i
            tag, typ, count = struct.unpack_from("<HHI", data, e)
            entries[tag] = (e, typ, count, e + 8)
        out.append({"offset": off, "n": n, "entries": entries})
        (off,) = struct.unpack_from("<I", data, off + 2 + 12 * n)
    return out


def set_tag(data: bytes, ifd: int, tag: int, value: int) -> bytes:
    """Copy of ``data`` with a scalar tag of IFD ``ifd`` set to ``value`` (as LONG)."""
    b = bytearray(data)
    e, _typ, _count, _v = tiff_ifds(data)[ifd]["entries"][tag]
    struct.pack_into("<HHII", b, e, tag, 4, 1, value & 0xFFFFFFFF)
    return bytes(b)


def set_array_item(data: bytes, ifd: int, tag: int, index: int, value: int) -> bytes:
    """Copy with item ``index`` of a LONG array tag (TileOffsets…) set to ``value``."""
    b = bytearray(data)
    _e, typ, count, vf = tiff_ifds(data)[ifd]["entries"][tag]
    assert typ == 4 and count > 1
    (arr,) = struct.unpack_from("<I", data, vf)
    struct.pack_into("<I", b, arr + 4 * index, value & 0xFFFFFFFF)
    return bytes(b)


def _writer(data: bytes, suffix: str = ".tif") -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        p = d / f"case{suffix}"
        p.write_bytes(data)
        return p

    return build


def _lazy(make: Callable[[], bytes], suffix: str = ".tif") -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        p = d / f"case{suffix}"
        p.write_bytes(make())
        return p

    return build


def tiff_mutations(src: Path, rng: random.Random, n_trunc: int, n_flip: int) -> list[Mutation]:
    """Truncations, IFD byte flips and semantic tag edits of the sample TIFF."""
    data = src.read_bytes()
    size = len(data)
    ifds = tiff_ifds(data)
    muts: list[Mutation] = []
    # truncation: fixed offsets from the issue plus log-spread and random ones
    cuts = {8, 16, 200, 1000, 3328, 6000, 12048, 5_262_550, 5_262_700, 5_265_000, size - 1}
    cuts |= {int(size * f) for f in (0.01, 0.1, 0.25, 0.5, 0.68, 0.9, 0.99, 0.999)}
    while len(cuts) < n_trunc:
        cuts.add(rng.randrange(8, size))
    for c in sorted(cuts)[:n_trunc]:
        muts.append(Mutation("tiff-trunc", str(c), _lazy(lambda c=c: data[:c])))
    # byte flips inside the IFDs and their tag arrays (headers, not compressed tile data)
    regions = [(0, 16)] + [(f["offset"], f["offset"] + 2 + 12 * f["n"] + 4) for f in ifds]
    for f in ifds:
        for tag in (324, 325):
            e, typ, count, vf = f["entries"][tag]
            (arr,) = struct.unpack_from("<I", data, vf)
            regions.append((arr, arr + 4 * count))
    for _ in range(n_flip):
        a, b = rng.choice(regions)
        pos = rng.randrange(a, b)
        bit = 1 << rng.randrange(8)

        def make(pos=pos, bit=bit) -> bytes:
            m = bytearray(data)
            m[pos] ^= bit
            return bytes(m)

        muts.append(Mutation("tiff-flip", f"{pos}^{bit}", _lazy(make)))
    # semantic tag edits, on level 0 and on the coarsest level
    values = {
        "ImageWidth": [0, 1, 255, 1_000_000, 0x7FFFFFFF, 0xFFFFFFFF],
        "ImageLength": [0, 1, 1_000_000, 0xFFFFFFFF],
        "TileWidth": [0, 1, 16, 255, 512, 65535, 0xFFFFFFFF],
        "TileLength": [0, 1, 255, 4096],
        "Compression": [0, 1, 5, 8, 34712, 50000, 65535],
        "BitsPerSample": [1, 16, 32],
        "SamplesPerPixel": [0, 1, 4, 255],
        "Photometric": [0, 1, 5, 65535],
        "PlanarConfig": [2, 7],
    }
    for lv in (0, len(ifds) - 1):
        for name, vals in values.items():
            if TAGS[name] not in ifds[lv]["entries"]:
                continue
            for v in vals:
                muts.append(
                    Mutation(
                        "tiff-tag",
                        f"L{lv}.{name}={v}",
                        _lazy(lambda lv=lv, t=TAGS[name], v=v: set_tag(data, lv, t, v)),
                    )
                )
    # tile table edits: an offset past EOF, a tile pointing into another, a zero byte count
    for lv in (0, len(ifds) - 1):
        muts += [
            Mutation(
                "tiff-tiles",
                f"L{lv}.offset0=EOF",
                _lazy(lambda lv=lv: set_array_item(data, lv, 324, 0, size + 10)),
            ),
            Mutation(
                "tiff-tiles",
                f"L{lv}.offset1=offset0+7",
                _lazy(lambda lv=lv: _overlap(data, lv)),
            ),
            Mutation(
                "tiff-tiles",
                f"L{lv}.count0=0",
                _lazy(lambda lv=lv: set_array_item(data, lv, 325, 0, 0)),
            ),
            Mutation(
                "tiff-tiles",
                f"L{lv}.count0=2^31",
                _lazy(lambda lv=lv: set_array_item(data, lv, 325, 0, 2**31)),
            ),
        ]
    return muts


def _overlap(data: bytes, lv: int) -> bytes:
    f = tiff_ifds(data)[lv]
    _e, _t, _c, vf = f["entries"][324]
    (arr,) = struct.unpack_from("<I", data, vf)
    (o0,) = struct.unpack_from("<I", data, arr)
    return set_array_item(data, lv, 324, 1, o0 + 7)


# ------------------------------------------------------------------------------- PNG / JPEG
def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bytes(
    w: int, h: int, rows: Iterator[bytes] | None = None, dpi: float | None = None
) -> bytes:
    """A valid RGB PNG of w × h (constant grey rows unless ``rows``), streamed through zlib."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    co = zlib.compressobj(1)
    row = b"\x00" + b"\xc8" * (3 * w)
    parts = []
    for _ in range(h):
        parts.append(co.compress(next(rows) if rows is not None else row))
    parts.append(co.flush())
    out = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
    if dpi:
        ppm = int(round(dpi / 0.0254))
        out += png_chunk(b"pHYs", struct.pack(">IIB", ppm, ppm, 1))
    return out + png_chunk(b"IDAT", b"".join(parts)) + png_chunk(b"IEND", b"")


def png_set_ihdr(data: bytes, w: int, h: int) -> bytes:
    """Copy of a PNG with its IHDR width/height patched (CRC fixed, so only sizes lie)."""
    assert data[12:16] == b"IHDR"
    body = bytearray(data[16:29])
    struct.pack_into(">II", body, 0, w, h)
    return data[:8] + png_chunk(b"IHDR", bytes(body)) + data[33:]


def jpeg_set_sof(data: bytes, w: int, h: int) -> bytes:
    """Copy of a JPEG with its SOF0/SOF2 frame size patched."""
    b = bytearray(data)
    i = 2
    while i < len(b) - 9:
        if b[i] != 0xFF:
            raise ValueError("bad JPEG marker walk")
        m = b[i + 1]
        (ln,) = struct.unpack_from(">H", b, i + 2)
        if m in (0xC0, 0xC1, 0xC2):
            struct.pack_into(">HH", b, i + 5, h, w)
            return bytes(b)
        i += 2 + ln
    raise ValueError("no SOF marker")


def jpeg_with_dpi(data: bytes, dpi: int) -> bytes:
    """Copy of a JFIF JPEG with its APP0 density set to ``dpi`` (unit: inch)."""
    b = bytearray(data)
    assert b[6:11] == b"JFIF\x00"
    b[13] = 1
    struct.pack_into(">HH", b, 14, min(dpi, 65535), min(dpi, 65535))
    return bytes(b)


# ------------------------------------------------------------------------------- other inputs
def image_mutations(rgb, rng: random.Random, n_flip: int) -> list[Mutation]:
    """JPEG and PNG of a real H&E crop: truncations, header flips, lying sizes, absurd dpi."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90, dpi=(25400 / 2.75,) * 2)
    jpg = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    png = buf.getvalue()
    muts: list[Mutation] = []
    for kind, data, ext in (("jpeg", jpg, ".jpg"), ("png", png, ".png")):
        for f in (0.02, 0.1, 0.3, 0.5, 0.9, 0.999):
            c = int(len(data) * f)
            muts.append(Mutation(kind, f"trunc{c}", _writer(data[:c], ext)))
        for _ in range(n_flip):
            pos = rng.randrange(2, min(len(data), 700))
            m = bytearray(data)
            m[pos] ^= 1 << rng.randrange(8)
            muts.append(Mutation(kind, f"flip{pos}", _writer(bytes(m), ext)))
    for w, h in ((65500, 65500), (40000, 40000), (1, 1), (0, 10), (20000, 20000)):
        muts.append(Mutation("jpeg", f"sof{w}x{h}", _writer(jpeg_set_sof(jpg, w, h), ".jpg")))
    for w, h in ((2**31 - 1, 10), (2**31 - 1, 2**31 - 1), (40000, 40000), (0, 5), (1, 1)):
        muts.append(Mutation("png", f"ihdr{w}x{h}", _writer(png_set_ihdr(png, w, h), ".png")))
    for dpi in (1, 72, 1e8):
        muts.append(
            Mutation("png", f"dpi{dpi:g}", _lazy(lambda dpi=dpi: _png_with_dpi(rgb, dpi), ".png"))
        )
    muts.append(Mutation("jpeg", "dpi65535", _writer(jpeg_with_dpi(jpg, 65535), ".jpg")))
    muts.append(Mutation("png", "valid40000x40000", _big_png))
    return muts


def _png_with_dpi(rgb, dpi: float) -> bytes:
    h, w = rgb.shape[:2]
    rows = (b"\x00" + rgb[i].tobytes() for i in range(h))
    return png_bytes(w, h, rows, dpi=dpi)


def _big_png(d: Path) -> Path:
    cache = d.parent / "big40000.png"
    if not cache.is_file():
        tmp = cache.with_suffix(".partial")
        tmp.write_bytes(png_bytes(40000, 40000))
        os.replace(tmp, cache)
    p = d / "case.png"
    os.symlink(cache, p)
    return p


def zarr_mutations(rgb) -> list[Mutation]:  # noqa: C901 - a table; its builders nest
    """A two-level OME-Zarr (v2) of a real crop, with broken metadata and chunks."""
    import numpy as np

    def base(d: Path) -> Path:
        import zarr

        p = d / "case.zarr"
        g = zarr.open_group(str(p), mode="w", zarr_format=2)
        lv1 = rgb[::2, ::2]
        for k, a in enumerate((rgb, lv1)):
            z = g.create_array(str(k), shape=a.shape, chunks=(256, 256, 3), dtype=np.uint8)
            z[...] = a
        g.attrs["multiscales"] = [
            {
                "version": "0.4",
                "axes": [
                    {"name": "y", "type": "space", "unit": "micrometer"},
                    {"name": "x", "type": "space", "unit": "micrometer"},
                    {"name": "c", "type": "channel"},
                ],
                "datasets": [
                    {"path": str(k), "coordinateTransformations": [
                        {"type": "scale", "scale": [2.75 * 2**k, 2.75 * 2**k, 1.0]}]}
                    for k in range(2)
                ],
            }
        ]  # fmt: skip
        return p

    def edit(fn: Callable[[Path], None]) -> Callable[[Path], Path]:
        def build(d: Path) -> Path:
            p = base(d)
            fn(p)
            return p

        return build

    def attrs(value: str) -> Callable[[Path], None]:
        return lambda p: (p / ".zattrs").write_text(value)

    def scale(v: str) -> Callable[[Path], None]:
        def f(p: Path) -> None:
            t = (p / ".zattrs").read_text().replace("2.75,", f"{v},", 1)
            (p / ".zattrs").write_text(t)

        return f

    def zarray(level: str, key: str, value) -> Callable[[Path], None]:
        def f(p: Path) -> None:
            meta = json.loads((p / level / ".zarray").read_text())
            meta[key] = value
            (p / level / ".zarray").write_text(json.dumps(meta))

        return f

    def chunk(level: str, how: str) -> Callable[[Path], None]:
        def f(p: Path) -> None:
            c = sorted(x for x in (p / level).iterdir() if not x.name.startswith("."))[3]
            if how == "delete":
                c.unlink()
            elif how == "empty":
                c.write_bytes(b"")
            else:
                b = bytearray(c.read_bytes())
                for i in range(16, min(len(b), 400), 7):
                    b[i] ^= 0x5A
                c.write_bytes(bytes(b))

        return f

    deep = "[" * 200_000 + "]" * 200_000
    muts = [Mutation("zarr", "intact", base)]
    for name, v in (
        ("null", "null"), ("array", "[1, 2]"), ("string", '"x"'), ("empty", "{}"),
        ("bad-json", "{'multiscales':"), ("deep", '{"multiscales": ' + deep + "}"),
        ("ms-dict", '{"multiscales": {"datasets": []}}'), ("ms-str", '{"multiscales": ["a"]}'),
        ("no-datasets", '{"multiscales": [{}]}'),
        ("ds-nopath", '{"multiscales": [{"datasets": [{}]}]}'),
        ("ds-missing", '{"multiscales": [{"datasets": [{"path": "9"}]}]}'),
        ("axes-str", '{"multiscales": [{"axes": "yxc", "datasets": [{"path": "0"}]}]}'),
    ):  # fmt: skip
        muts.append(Mutation("zarr", f"zattrs-{name}", edit(attrs(v))))
    for v in ("0", "NaN", "Infinity", "-1", '"a"', "1e-9", "1e9"):
        muts.append(Mutation("zarr", f"scale{v}", edit(scale(v))))
    for key, val in (
        ("shape", [1_000_000, 1_000_000, 3]), ("shape", [0, 0, 3]), ("shape", [10**9, 10, 3]),
        ("chunks", [1, 1, 3]), ("chunks", [1_000_000, 1_000_000, 3]), ("chunks", [0, 256, 3]),
        ("dtype", "<f8"), ("dtype", "|S4"), ("compressor", {"id": "nope"}),
        ("shape", [2484, 2318, 3]),
    ):  # fmt: skip
        muts.append(Mutation("zarr", f"L0.{key}={val}", edit(zarray("0", key, val))))
    muts.append(Mutation("zarr", "L1.shape=bigger", edit(zarray("1", "shape", [5000, 5000, 3]))))
    for lv in ("0", "1"):
        for how in ("delete", "empty", "corrupt"):
            muts.append(Mutation("zarr", f"L{lv}.chunk-{how}", edit(chunk(lv, how))))
    return muts


def h5ad_mutations(base: Path) -> list[Mutation]:  # noqa: C901 - a table; its builders nest
    """Edits of a ``stgen predict`` output (dense X, and a sparse-X copy) with h5py."""
    import h5py
    import numpy as np

    def sparse_copy(d: Path) -> Path:
        import anndata as ad
        import scipy.sparse as sp

        a = ad.read_h5ad(base)
        a.X = sp.csr_matrix(np.where(a.X > 2.0, a.X, 0.0).astype(np.float32))
        p = d / "case.h5ad"
        a.write_h5ad(p)
        return p

    def dense_copy(d: Path) -> Path:
        p = d / "case.h5ad"
        p.write_bytes(base.read_bytes())
        return p

    def edit(fn: Callable[[h5py.File], None], sparse: bool = False) -> Callable[[Path], Path]:
        def build(d: Path) -> Path:
            p = (sparse_copy if sparse else dense_copy)(d)
            with h5py.File(p, "r+") as f:
                fn(f)
            return p

        return build

    def replace(key: str, value) -> Callable[[h5py.File], None]:
        def f(h: h5py.File) -> None:
            attrs = dict(h[key].attrs) if isinstance(h[key], h5py.Dataset) else {}
            del h[key]
            h[key] = value
            for k, v in attrs.items():
                h[key].attrs[k] = v

        return f

    def sp_edit(what: str) -> Callable[[h5py.File], None]:
        def f(h: h5py.File) -> None:
            ptr = h["X/indptr"][()]
            ind = h["X/indices"][()]
            if what == "indptr-short":
                replace("X/indptr", ptr[: len(ptr) // 2])(h)
            elif what == "indptr-big":
                ptr = ptr.copy()
                ptr[-1] += 10**6
                replace("X/indptr", ptr)(h)
            elif what == "indptr-decreasing":
                ptr = ptr.copy()
                ptr[1] = ptr[-1]
                replace("X/indptr", ptr)(h)
            elif what == "indices-range":
                ind = ind.copy()
                ind[len(ind) // 2] = 10**6
                replace("X/indices", ind)(h)
            elif what == "indices-negative":
                ind = ind.astype(np.int64)
                ind[0] = -5
                replace("X/indices", ind)(h)
            elif what == "shape-huge":
                h["X"].attrs["shape"] = np.array([10**9, 10**7])
            elif what == "data-short":
                replace("X/data", h["X/data"][:10])(h)

        return f

    def uns_mpp(v) -> Callable[[h5py.File], None]:
        return replace("uns/stgen/mpp", v)

    n = None
    with h5py.File(base, "r") as f:
        n = f["X"].shape[0]
        has_grid = "grid" in f["uns/stgen"]
    rng = np.random.default_rng(0)
    sp_nan = rng.random((n, 2)) * 1000
    sp_nan[3, 0] = np.nan
    sp_inf = rng.random((n, 2)) * 1000
    sp_inf[0, 1] = np.inf
    muts = [Mutation("h5ad", "intact", dense_copy), Mutation("h5ad", "sparse-intact", sparse_copy)]
    for what in (
        "indptr-short", "indptr-big", "indptr-decreasing", "indices-range", "indices-negative",
        "shape-huge", "data-short",
    ):  # fmt: skip
        muts.append(Mutation("h5ad", f"sparse-{what}", edit(sp_edit(what), sparse=True)))
    muts += [
        Mutation("h5ad", "no-spatial", edit(lambda h: h.__delitem__("obsm/spatial"))),
        Mutation("h5ad", "spatial-nan", edit(replace("obsm/spatial", sp_nan))),
        Mutation("h5ad", "spatial-inf", edit(replace("obsm/spatial", sp_inf))),
        Mutation("h5ad", "spatial-1col", edit(replace("obsm/spatial", np.zeros((n, 1))))),
        Mutation("h5ad", "spatial-rows", edit(replace("obsm/spatial", np.zeros((n + 3, 2))))),
        Mutation("h5ad", "X-string", edit(replace("X", np.full((n, 250), b"ab")))),
        Mutation("h5ad", "X-shape", edit(replace("X", np.zeros((n, 7), np.float32)))),
        Mutation("h5ad", "X-1d", edit(replace("X", np.zeros(n, np.float32)))),
        Mutation("h5ad", "no-X", edit(lambda h: h.__delitem__("X"))),
        Mutation("h5ad", "obs-index-short", edit(replace("obs/_index", np.array([b"a", b"b"])))),
        Mutation("h5ad", "var-index-huge-short", edit(replace("var/_index", np.array([b"g"])))),
        Mutation("h5ad", "no-obs", edit(lambda h: h.__delitem__("obs"))),
        Mutation("h5ad", "no-uns", edit(lambda h: h.__delitem__("uns"))),
    ]
    for v in (-1.0, np.inf, np.nan, 0.0, b"abc", 1e300):
        muts.append(Mutation("h5ad", f"mpp={v!r}", edit(uns_mpp(v))))
    muts.append(
        Mutation("h5ad", "origin-nan", edit(replace("uns/stgen/origin_yx_um", [np.nan, 0.0])))
    )
    if has_grid:
        for v in ([10**6, 10**6], [0, 5], [-3, 2]):
            muts.append(
                Mutation("h5ad", f"grid-shape={v}", edit(replace("uns/stgen/grid/shape", v)))
            )
    data = base.read_bytes()
    for f_ in (0.01, 0.2, 0.5, 0.9, 0.99):
        c = int(len(data) * f_)
        muts.append(Mutation("h5ad", f"trunc{c}", _writer(data[:c], ".h5ad")))
    return muts


def checkpoint_mutations(src: Path) -> list[Mutation]:
    """Edits of the default GenST checkpoint through safetensors' numpy API (no torch)."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(src), framework="np") as f:
        meta = f.metadata()
        names = list(f.keys())
    card = json.loads(meta["stgen_card"])

    def tensors() -> dict:
        with safe_open(str(src), framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def save(d: Path, t: dict, c: dict) -> Path:
        p = d / "case.safetensors"
        save_file(t, str(p), metadata={"stgen_card": json.dumps(c)})
        return p

    def weights(fn: Callable[[dict], None]) -> Callable[[Path], Path]:
        def build(d: Path) -> Path:
            t = tensors()
            fn(t)
            return save(d, t, card)

        return build

    def card_edit(path: str, value) -> Callable[[Path], Path]:
        def build(d: Path) -> Path:
            c = json.loads(json.dumps(card))
            keys = path.split(".")
            node = c
            for k in keys[:-1]:
                node = node[k]
            if value is _DELETE:
                del node[keys[-1]]
            else:
                node[keys[-1]] = value
            return save(d, tensors(), c)

        return build

    t0 = tensors()
    shapes = {k: v.shape for k, v in t0.items()}
    first_float = next(k for k in names if t0[k].dtype.kind == "f")
    big = max(names, key=lambda k: int(np.prod(shapes[k])))

    def set_nan_one(t: dict) -> None:
        t[first_float] = t[first_float].copy()
        t[first_float].flat[0] = np.nan

    muts = [
        Mutation(
            "ckpt",
            "all-nan",
            weights(
                lambda t: t.update(
                    {k: np.full_like(v, np.nan) for k, v in t.items() if v.dtype.kind == "f"}
                )
            ),
        ),  # fmt: skip
        Mutation("ckpt", "one-nan", weights(set_nan_one)),
        Mutation(
            "ckpt",
            "scaled-1e38",
            weights(
                lambda t: t.update(
                    {k: np.full_like(v, 1e38) for k, v in t.items() if v.dtype.kind == "f"}
                )
            ),
        ),  # fmt: skip
        Mutation(
            "ckpt",
            "zeros",
            weights(
                lambda t: t.update(
                    {k: np.zeros_like(v) for k, v in t.items() if v.dtype.kind == "f"}
                )
            ),
        ),  # fmt: skip
        Mutation("ckpt", "shape-mismatch", weights(lambda t: t.update({big: t[big].ravel()[:-1]}))),
        Mutation("ckpt", "missing-tensor", weights(lambda t: t.pop(big))),
    ]
    for path, value in (
        ("tta", 0), ("tta", 10**9), ("tta", "x"), ("mpp", _DELETE), ("mpp", -1), ("mpp", 1e-9),
        ("genes", _DELETE), ("genes", []), ("genes", ["A"] * 250), ("patch_px", 0),
        ("patch_px", 10**6), ("patch_um", float("nan")), ("architecture.channels", [10**6] * 4),
        ("architecture.img_codes", 10**9), ("architecture", "x"), ("kind", 5),
        ("architecture.n_genes", 3), ("tensor_shapes", _DELETE),
    ):  # fmt: skip
        muts.append(Mutation("ckpt", f"card.{path}={value!r}", card_edit(path, value)))
    data = src.read_bytes()
    for c in (4, 8, 100, len(data) // 2, len(data) - 10):
        muts.append(Mutation("ckpt", f"trunc{c}", _writer(data[:c], ".safetensors")))
    for pos in (0, 3, 7, 20, 200):
        m = bytearray(data)
        m[pos] ^= 0x40
        muts.append(Mutation("ckpt", f"flip{pos}", _writer(bytes(m), ".safetensors")))
    return muts


_DELETE = object()


def spots_mutations(spots: Path) -> list[Mutation]:
    """Edits of the spot table used by the predict entry point."""
    import pandas as pd

    df = pd.read_csv(spots, dtype={"barcode": str}).iloc[:, :5]

    def csv(fn: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], Path]:
        def build(d: Path) -> Path:
            p = d / "spots.csv"
            fn(df.copy()).to_csv(p, index=False)
            return p

        return build

    def setv(col: str, i: int, v) -> Callable[[pd.DataFrame], pd.DataFrame]:
        def f(x: pd.DataFrame) -> pd.DataFrame:
            x[col] = x[col].astype(object)
            x.loc[i, col] = v
            return x

        return f

    def raw(b: bytes) -> Callable[[Path], Path]:
        def build(d: Path) -> Path:
            p = d / "spots.csv"
            p.write_bytes(b)
            return p

        return build

    text = df.to_csv(index=False).encode()
    return [
        Mutation("spots", "intact", csv(lambda x: x)),
        Mutation("spots", "no-x", csv(lambda x: x.drop(columns=["x"]))),
        Mutation("spots", "no-barcode", csv(lambda x: x.drop(columns=["barcode"]))),
        Mutation("spots", "x-nan", csv(setv("x", 2, float("nan")))),
        Mutation("spots", "y-inf", csv(setv("y", 2, float("inf")))),
        Mutation("spots", "x-text", csv(setv("x", 2, "abc"))),
        Mutation("spots", "x-negative", csv(setv("x", 2, -500.0))),
        Mutation("spots", "x-off-slide", csv(setv("x", 2, 1e7))),
        Mutation("spots", "x-1e300", csv(setv("x", 2, 1e300))),
        Mutation("spots", "all-off-slide", csv(lambda x: x.assign(x=x["x"] + 1e6))),
        Mutation("spots", "dup-barcode", csv(setv("barcode", 3, df["barcode"][2]))),
        Mutation("spots", "_index-col", csv(lambda x: x.assign(_index=range(len(x))))),
        Mutation("spots", "empty", csv(lambda x: x.iloc[:0])),
        Mutation("spots", "header-only-bytes", raw(b"barcode,x,y\n")),
        Mutation("spots", "latin1", raw(text.replace(b"barcode", b"b\xe9rcode", 1))),
        Mutation("spots", "binary", raw(bytes(range(256)) * 10)),
        Mutation("spots", "empty-file", raw(b"")),
    ]


# ------------------------------------------------------------------------------- entry points
def _quiet_main(argv: list[str]) -> tuple[int, str, str]:
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from napari_stgen.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(argv)
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    return rc, out.getvalue(), (lines[-1] if lines else "")


def _slide_meta(path: Path) -> dict | None:
    from napari_stgen.errors import StgenError
    from napari_stgen.io.slide import open_slide

    try:
        with open_slide(path) as s:
            return _no_path(s.info())
    except StgenError:
        return None


def _no_path(meta: dict) -> dict:
    """Slide metadata without its path (cases live in different folders)."""
    return {k: v for k, v in meta.items() if k != "path"}


def entry_info(case: dict) -> dict:
    rc, out, err = _quiet_main(["info", case["slide"]])
    res = {"rc": rc, "err": err, "n_err_lines": err.count("\n") + bool(err)}
    if rc == 0:
        res["meta"] = _no_path(json.loads(out))
    return res


def entry_predict(case: dict) -> dict:
    import h5py
    import numpy as np

    out = Path(case["work"]) / "pred.h5ad"
    argv = ["predict", case["slide"], "--spots", case["spots"], "--out", str(out), "--quiet"]
    argv += ["--overwrite"] + case.get("predict_args", [])
    rc, _, err = _quiet_main(argv)
    res: dict = {"rc": rc, "err": err}
    if rc == 0:
        with h5py.File(out, "r") as f:
            x = np.asarray(f["X"][()], np.float64)
        res["x_sum"] = float(np.nansum(x))
        res["x"] = np.round(x, 4).tolist()
        res["meta"] = _slide_meta(Path(case["slide"]))
    return res


def entry_napari(case: dict) -> dict:
    import hashlib

    import napari.layers
    import numpy as np

    from napari_stgen.errors import StgenError
    from napari_stgen.io import napari_reader

    told: list[str] = []
    napari_reader._notify = lambda msg: told.append(str(msg))  # count notifications
    reader = napari_reader.get_reader(case["slide"])
    if reader is None:
        return {"declined": True}
    try:
        layers = reader(case["slide"])
    except StgenError as e:
        return {"refused": str(e)}
    digest = hashlib.sha256()
    meta = None
    for data, kw, typ in layers:
        layer = getattr(napari.layers, typ.capitalize())(data, **kw)  # what add_layer builds
        layer.refresh()
        if typ == "image" and kw.get("multiscale"):
            meta = {k: v for k, v in kw["metadata"]["stgen"].items() if k != "path"}
            for lv in data:  # draw a central window of every level
                h, w = lv.shape[:2]
                y0, x0 = max(0, h // 2 - 384), max(0, w // 2 - 384)
                digest.update(np.ascontiguousarray(np.asarray(lv[y0 : y0 + 768, x0 : x0 + 768])))
        else:
            a = np.asarray(data[0] if typ == "shapes" else data)
            digest.update(np.ascontiguousarray(a).tobytes() if a.dtype != object else b"")
    return {"ok": True, "told": told, "digest": digest.hexdigest(), "meta": meta}


ENTRIES = {"info": entry_info, "predict": entry_predict, "napari": entry_napari}


# ------------------------------------------------------------------------------- runner
def run_forked(fn: Callable, arg, timeout: float, mem_bytes: int, log: Path) -> dict:  # noqa: C901 - fork, watchdog, result pipe: one place
    """``fn(arg)`` in a forked child under a wall-clock and an RSS limit; its dict result
    plus 'killed' ('time' | 'memory'), 'signal', 'seconds' and 'peak_rss_mb'."""
    import time

    res_path = log.with_suffix(".json")
    res_path.unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            try:
                res = fn(arg)
            except BaseException as e:  # noqa: BLE001 - the outcome we measure
                import traceback

                traceback.print_exc()
                res = {"exc": type(e).__name__, "msg": " ".join(str(e).split())[:300]}
            res_path.write_text(json.dumps(res, default=str))
        except BaseException:  # noqa: BLE001
            code = 3
        os._exit(code)
    t0 = time.monotonic()
    peak = 0
    killed = None
    while True:
        wpid, status, ru = os.wait4(pid, os.WNOHANG)
        if wpid:
            break
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        if killed is None and peak > mem_bytes:
            killed = "memory"
        elif killed is None and time.monotonic() - t0 > timeout:
            killed = "time"
        if killed:
            os.kill(pid, 9)
            _, status, ru = os.wait4(pid, 0)
            break
        time.sleep(0.05)
    out: dict = {}
    if res_path.is_file() and not killed:
        try:
            out = json.loads(res_path.read_text())
        except ValueError:
            out = {}
    out["seconds"] = round(time.monotonic() - t0, 2)
    out["peak_rss_mb"] = round(max(peak, ru.ru_maxrss * 1024) / 2**20, 1)
    if killed:
        out["killed"] = killed
    elif os.WIFSIGNALED(status):
        out["signal"] = os.WTERMSIG(status)
    return out


def classify(entry: str, res: dict, ref: dict | None, family: str) -> str:
    """The outcome class of one run (see the module docstring)."""
    if res.get("killed") == "time":
        return "hang"
    if res.get("killed") == "memory":
        return "memory"
    if "signal" in res:
        return "crash"
    if "exc" in res:
        return "traceback"
    if entry == "napari":
        if res.get("declined") or "refused" in res:
            return "refused"
        if not res.get("ok"):
            return "traceback"
        same = ref is not None and res.get("digest") == ref.get("digest")
        if any("drawn blank" in t for t in res.get("told", [])):
            return "blank-tile"
    else:
        rc = res.get("rc")
        if rc == 2:
            return "refused"
        if rc != 0:
            return "traceback"
        if entry == "info":
            return "ok" if ref is not None and res.get("meta") == ref.get("meta") else "ok-changed"
        same = ref is not None and _close(res.get("x"), ref.get("x"))
    if same:
        return "ok"
    if family in ("ckpt",):
        return "silent"  # a damaged model whose output changed without a word
    if family in ("spots", "h5ad"):
        return "ok-changed"
    meta_same = ref is not None and res.get("meta") == ref.get("meta")
    return "silent" if meta_same else "ok-changed"


def _close(a, b) -> bool:
    import numpy as np

    if a is None or b is None:
        return False
    a, b = np.asarray(a, float), np.asarray(b, float)
    return a.shape == b.shape and bool(np.allclose(a, b, atol=1e-3, equal_nan=True))


def info_rss_mb(path: Path) -> tuple[int, float]:
    """(exit code, peak RSS MiB) of a real ``python -m napari_stgen.cli.main info PATH``,
    measured by GNU time (a child forked from this big process would inherit its RSS)."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "napari_stgen.cli.main", "info", str(path)]
    p = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, env=env)
    kb = float(p.stderr.strip().splitlines()[-1])
    return p.returncode, round(kb / 1024, 1)


def build_corpus(work: Path, rng: random.Random, n_trunc: int, n_flip: int, n_img_flip: int):
    """(cases, groups): every Mutation with the entry points it goes through and the family
    group whose intact case is its reference."""
    import numpy as np
    import pandas as pd

    sys.path.insert(0, str(REPO / "src"))
    from napari_stgen.io.sample import sample_slide_path, sample_spots_path
    from napari_stgen.io.slide import open_slide

    src = sample_slide_path()
    spots = pd.read_csv(sample_spots_path(), dtype={"barcode": str}).iloc[::15, :5]
    spots_tiff = work / "spots_tiff.csv"
    spots.to_csv(spots_tiff, index=False)
    with open_slide(src) as s:
        rgb = np.ascontiguousarray(s.levels[2].compute(scheduler="synchronous"))
    h, w = rgb.shape[:2]
    yy, xx = np.meshgrid(np.linspace(300, h - 300, 3), np.linspace(300, w - 300, 4))
    spots_img = work / "spots_img.csv"
    pd.DataFrame(
        {"barcode": [f"s{i}" for i in range(yy.size)], "x": xx.ravel(), "y": yy.ravel()}
    ).to_csv(spots_img, index=False)
    slide_entries = ["info", "predict", "napari"]
    cases = [
        (Mutation("tiff", "intact", lambda d: src), "tiff", slide_entries, {"spots": spots_tiff})
    ]
    for m in tiff_mutations(src, rng, n_trunc, n_flip):
        cases.append((m, "tiff", slide_entries, {"spots": spots_tiff}))
    import io

    from PIL import Image

    for kind, fmt, ext in (("jpeg", "JPEG", ".jpg"), ("png", "PNG", ".png")):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format=fmt, dpi=(25400 / 2.75,) * 2)
        cases.append(
            (Mutation(kind, "intact", _writer(buf.getvalue(), ext)), kind, slide_entries,
             {"spots": spots_img})
        )  # fmt: skip
    for m in image_mutations(rgb, rng, n_img_flip):
        cases.append((m, m.family, slide_entries, {"spots": spots_img}))
    for m in zarr_mutations(rgb):
        cases.append((m, "zarr", slide_entries, {"spots": spots_img}))
    base = work / "base.h5ad"
    h5 = h5ad_mutations(base)
    measured = {"slide": str(src), "spots": spots_tiff}
    for m in h5:
        cases.append((m, "h5ad", ["napari", "predict"], {**measured, "measured": True}))
    from napari_stgen.models.checkpoint import WEIGHTS_DIR

    for m in checkpoint_mutations(WEIGHTS_DIR / "genst_default.safetensors"):
        cases.append((m, "ckpt", ["predict"], {"slide": str(src), "spots": spots_tiff, "ckpt": 1}))
    cases.append(
        (Mutation("ckpt", "intact", lambda d: WEIGHTS_DIR / "genst_default.safetensors"),
         "ckpt", ["predict"], {"slide": str(src), "spots": spots_tiff, "ckpt": 1})
    )  # fmt: skip
    for m in spots_mutations(spots_tiff):
        cases.append((m, "spots", ["predict"], {"slide": str(src), "spots_case": 1}))
    return cases


def _case_args(path: Path, opts: dict, work: Path) -> dict:
    case = {"work": str(work), "slide": str(path), "spots": str(opts.get("spots", ""))}
    if opts.get("measured"):
        case["slide"] = opts["slide"]
        case["predict_args"] = ["--model", "histotx", "--measured", str(path)]
        case["predict_args"] += ["--adapt-steps", "0"]
        case["napari_path"] = str(path)
    if opts.get("ckpt"):
        case["slide"] = opts["slide"]
        case["predict_args"] = ["--model", str(path)]
    if opts.get("spots_case"):
        case["slide"] = opts["slide"]
        case["spots"] = str(path)
    return case


def _build(m: Mutation, d: Path) -> dict:
    return {"path": str(m.build(d))}


def main(argv: list[str] | None = None) -> int:
    import shutil
    import time

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="scratch/fuzz")
    ap.add_argument("--trunc", type=int, default=60, help="TIFF truncation offsets")
    ap.add_argument("--flips", type=int, default=600, help="TIFF header/IFD byte flips")
    ap.add_argument("--img-flips", type=int, default=50, help="JPEG/PNG header flips (each)")
    ap.add_argument("--sample", type=int, default=0, help="run only this many mutations")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--mem-gb", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", nargs="*", default=None, help="only these families")
    ap.add_argument("--ids", nargs="*", default=None, help="only these mutation ids")
    args = ap.parse_args(argv)

    # import what the children use once, here (they are forked from this process); nothing
    # here starts threads (no torch op, no zarr, no dask compute) so forking stays safe
    sys.path.insert(0, str(REPO / "src"))
    import napari.layers  # noqa: F401
    import torch  # noqa: F401

    import napari_stgen.cli.main  # noqa: F401
    import napari_stgen.io.napari_reader  # noqa: F401

    out = Path(args.out)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(args.seed)
    mem = int(args.mem_gb * 2**30)
    # the h5ad corpus starts from a real `stgen predict` output of the intact sample
    from napari_stgen.io.sample import sample_slide_path

    pre = run_forked(
        lambda _: entry_predict(
            {"work": str(work), "slide": str(sample_slide_path()), "spots": str(_spots(work))}
        ),
        None, 600, mem, work / "base.log",
    )  # fmt: skip
    assert pre.get("rc") == 0, pre
    shutil.copy(work / "pred.h5ad", work / "base.h5ad")
    corpus = build_corpus(work, random.Random(args.seed), args.trunc, args.flips, args.img_flips)
    intact = [c for c in corpus if c[0].name in ("intact", "sparse-intact")]
    rest = [c for c in corpus if c[0].name not in ("intact", "sparse-intact")]
    rng.shuffle(rest)
    if args.families:
        rest = [c for c in rest if c[0].family in args.families]
    if args.ids:
        rest = [c for c in rest if c[0].id in args.ids]
    if args.sample:
        rest = rest[: args.sample]
    print(f"{len(corpus)} mutations in the corpus; running {len(rest)} + intact", flush=True)
    refs: dict[tuple[str, str], dict] = {}
    results = []
    t_start = time.time()
    jl = (out / "results.jsonl").open("w")
    for i, (m, group, entries, opts) in enumerate(intact + rest):
        d = work / f"c{i}"
        d.mkdir()
        b = run_forked(lambda _, m=m, d=d: _build(m, d), None, 300, 8 * 2**30, d / "build.log")
        if "path" not in b:
            print(f"[build failed] {m.id}: {b}", flush=True)
            shutil.rmtree(d, ignore_errors=True)
            continue
        case = _case_args(Path(b["path"]), opts, d)
        info_refused = False
        for e in entries:
            if e == "predict" and info_refused and i % 10:
                # `stgen predict` opens the slide with the same open_slide call as `stgen info`
                # before it loads a model, so it refuses the same way; run 1 in 10 of these
                row = {"id": m.id, "family": m.family, "entry": e, "outcome": "refused",
                       "inferred": True, "seconds": 0.0, "peak_rss_mb": None,
                       "why": ""}  # fmt: skip
                results.append(row)
                jl.write(json.dumps(row) + "\n")
                continue
            arg = dict(case)
            if e == "napari" and "napari_path" in arg:
                arg["slide"] = arg["napari_path"]
            res = run_forked(ENTRIES[e], arg, args.timeout, mem, d / f"{e}.log")
            key = (group if m.name != "sparse-intact" else "h5ad-sparse", e)
            if m.name in ("intact", "sparse-intact"):
                refs.setdefault(key, res)
            outcome = classify(e, res, refs.get((group, e)), group)
            info_refused = info_refused or (e == "info" and outcome == "refused")
            row = {
                "id": m.id, "family": m.family, "entry": e, "outcome": outcome,
                "seconds": res.get("seconds"), "peak_rss_mb": res.get("peak_rss_mb"),
                "why": res.get("err") or res.get("refused") or res.get("msg") or "",
            }  # fmt: skip
            results.append(row)
            jl.write(json.dumps(row) + "\n")
            jl.flush()
            if outcome in ("hang", "memory", "crash", "traceback", "silent"):
                print(f"[{outcome}] {m.id} {e}: {row['why'][:160]}", flush=True)
        shutil.rmtree(d, ignore_errors=True)
        if i % 25 == 0:
            print(f"{i + 1}/{len(intact) + len(rest)} mutations, "
                  f"{time.time() - t_start:.0f} s", flush=True)  # fmt: skip
    jl.close()
    rss = _bomb_rss(work)
    summary = summarize(results, rss, time.time() - t_start, args)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(summary["table_md"])
    return 0


def _spots(work: Path) -> Path:
    import pandas as pd

    from napari_stgen.io.sample import sample_spots_path

    p = work / "spots_tiff.csv"
    pd.read_csv(sample_spots_path(), dtype={"barcode": str}).iloc[::15, :5].to_csv(p, index=False)
    return p


def _bomb_rss(work: Path) -> dict:
    """Peak RSS of a real `stgen info` on the intact sample and on size bombs."""
    from napari_stgen.io.sample import sample_slide_path

    src = sample_slide_path()
    data = src.read_bytes()
    bombs = {
        "ImageWidth=0xFFFFFFFF": set_tag(data, 0, 256, 0xFFFFFFFF),
        "ImageWidth=0x7FFFFFFF": set_tag(data, 0, 256, 0x7FFFFFFF),
        "ImageWidth=1000000": set_tag(data, 0, 256, 1_000_000),
        "ImageLength=1000000": set_tag(data, 0, 257, 1_000_000),
        "TileWidth=1": set_tag(data, 0, 322, 1),
        "TileWidth=0xFFFFFFFF": set_tag(data, 0, 322, 0xFFFFFFFF),
    }
    rows = {"intact": info_rss_mb(src)}
    for name, b in bombs.items():
        p = work / "bomb.tif"
        p.write_bytes(b)
        rows[name] = info_rss_mb(p)
    png = work / "bomb.png"
    png.write_bytes(png_set_ihdr(png_bytes(64, 64), 2**31 - 1, 2**31 - 1))
    rows["PNG IHDR 2^31-1 square"] = info_rss_mb(png)
    return {k: {"rc": v[0], "peak_rss_mb": v[1]} for k, v in rows.items()}


CLASSES = ("ok", "ok-changed", "refused", "blank-tile", "traceback", "crash", "hang", "memory",
           "silent")  # fmt: skip


def summarize(results: list[dict], rss: dict, seconds: float, args) -> dict:
    """Counts of outcome class × entry point (and × family), as JSON and a Markdown table."""
    entries = sorted({r["entry"] for r in results})
    table = {e: {c: 0 for c in CLASSES} for e in entries}
    fam: dict[str, dict[str, int]] = {}
    for r in results:
        table[r["entry"]][r["outcome"]] += 1
        fam.setdefault(r["family"], {c: 0 for c in CLASSES})[r["outcome"]] += 1
    head = "| entry point | " + " | ".join(CLASSES) + " | runs |"
    lines = [head, "|" + "---|" * (len(CLASSES) + 2)]
    for e in entries:
        row = table[e]
        lines.append(f"| {e} | " + " | ".join(str(row[c]) for c in CLASSES)
                     + f" | {sum(row.values())} |")  # fmt: skip
    lines += ["", "| family | " + " | ".join(CLASSES) + " | runs |",
              "|" + "---|" * (len(CLASSES) + 2)]  # fmt: skip
    for f_, row in sorted(fam.items()):
        lines.append(f"| {f_} | " + " | ".join(str(row[c]) for c in CLASSES)
                     + f" | {sum(row.values())} |")  # fmt: skip
    lines += ["", "| `stgen info` on | exit | peak RSS (MiB) |", "|---|---|---|"]
    lines += [f"| {k} | {v['rc']} | {v['peak_rss_mb']} |" for k, v in rss.items()]
    n_mut = len({r["id"] for r in results})
    inferred = sum(bool(r.get("inferred")) for r in results)
    return {
        "mutations": n_mut,
        "runs": len(results),
        "predict_inferred_from_info": inferred,
        "seconds": round(seconds),
        "limits": {"timeout_s": args.timeout, "mem_gb": args.mem_gb},
        "table": table,
        "families": fam,
        "info_rss": rss,
        "table_md": "\n".join(lines),
    }


if __name__ == "__main__":
    sys.exit(main())
