"""Checks on what the package writes and on the tables users hand it (no napari, no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from napari_stgen.errors import StgenError

#: obs column names AnnData reserves (writing them fails inside h5py).
RESERVED_OBS = ("_index",)


def check_prediction(expr: Any, where: str, valid: np.ndarray | None = None) -> None:
    """Refuse a prediction that is non-finite or constant (a broken model, not a result).

    ``valid`` (N,) bool marks rows that were predicted (skipped rows hold NaN on purpose).
    """
    x = np.asarray(expr, dtype=np.float32)
    if valid is not None:
        x = x[np.asarray(valid, bool)]
    if x.size == 0:
        return
    bad = ~np.isfinite(x)
    if bad.any():
        raise StgenError(
            f"{where}: the model predicted {int(bad.sum())} non-finite values "
            f"({bad.any(axis=1).sum()} of {x.shape[0]} rows); its weights are broken"
        )
    if x.size > 1 and x.shape[0] > 1 and float(x.max() - x.min()) == 0.0:
        raise StgenError(
            f"{where}: the model predicted the same value {float(x.flat[0]):g} everywhere; "
            "its weights are broken"
        )


def check_tile_image(tile: Any, where: str) -> None:
    """Refuse a generated RGB tile that is constant (all one colour): a broken sample."""
    t = np.asarray(tile)
    if t.size and int(t.max()) == int(t.min()):
        raise StgenError(
            f"{where}: the generated tile is a single colour ({int(t.flat[0])}); "
            "the conditioning or the model is broken"
        )


# ----------------------------------------------------------------------------- .h5ad
MAX_OBS = 50_000_000
MAX_VARS = 1_000_000
_READ_STEP = 1 << 22  # elements per read when scanning sparse indices


def validate_h5ad(path: Any, need_x: bool = False) -> None:
    """Check an .h5ad's structure with h5py before anndata (and its native code) reads it.

    Sizes of obs/var, X and layers (dense: numeric and (n_obs, n_vars); sparse: CSR/CSC
    ``indptr`` of the right length, starting at 0, non-decreasing, ending at ``len(indices)``
    and indices inside the matrix), obsm/obsp rows. Raises StgenError naming the file and the
    element; a too-short ``indptr`` or an out-of-range index would otherwise crash the process.
    ``need_x``: an absent ``X`` is an error too (readers of the expression matrix).
    """

    p = Path(path)
    if not p.is_file():
        raise StgenError(f"{p}: no such file")
    try:
        f = h5py.File(p, "r")
    except Exception as e:  # noqa: BLE001 - OSError for non-HDF5, others for damage
        raise StgenError(f"{p}: not a readable .h5ad (HDF5) file ({e})") from None
    try:
        with f:
            n_obs = _axis_len(f, "obs", p)
            n_vars = _axis_len(f, "var", p)
            if n_obs > MAX_OBS or n_vars > MAX_VARS:
                raise StgenError(f"{p}: {n_obs:,} obs × {n_vars:,} vars is past the limits")
            if "X" in f:
                _check_matrix(f["X"], (n_obs, n_vars), p, "X")
            elif need_x:
                raise StgenError(f"{p}: no X (expression matrix)")
            for group, rows in (("layers", None), ("obsm", n_obs), ("varm", n_vars)):
                for k, el in _items(f, group):
                    if rows is None:
                        _check_matrix(el, (n_obs, n_vars), p, f"layers['{k}']")
                    else:
                        _check_rows(el, rows, p, f"{group}['{k}']")
            for group, n in (("obsp", n_obs), ("varp", n_vars)):
                for k, el in _items(f, group):
                    _check_matrix(el, (n, n), p, f"{group}['{k}']")
    except StgenError:
        raise
    except Exception as e:  # noqa: BLE001 - h5py raises KeyError/OSError/TypeError on damage
        raise StgenError(f"{p}: damaged .h5ad ({type(e).__name__}: {e})") from None


def _items(f: Any, group: str) -> list:
    g = f.get(group)
    return list(g.items()) if g is not None and hasattr(g, "items") else []


def _axis_len(f: Any, name: str, p: Any) -> int:
    g = f.get(name)
    if g is None:
        raise StgenError(f"{p}: no '{name}' table; not an AnnData file")
    if isinstance(g, h5py.Dataset):  # old anndata: a structured array
        return int(g.shape[0]) if g.shape else 0
    key = g.attrs.get("_index", "_index")
    key = key.decode() if isinstance(key, bytes) else str(key)
    if key not in g:
        raise StgenError(f"{p}: '{name}' has no index ('{key}')")
    idx = g[key]
    if not isinstance(idx, h5py.Dataset) or len(idx.shape) != 1:
        raise StgenError(f"{p}: '{name}' index is not a 1-D array")
    n = int(idx.shape[0])
    for col, el in g.items():
        if isinstance(el, h5py.Dataset) and el.shape and int(el.shape[0]) != n:
            raise StgenError(f"{p}: {name}['{col}'] has {el.shape[0]} rows, expected {n}")
        if isinstance(el, h5py.Group) and "codes" in el:  # categorical
            c = el["codes"]
            if c.shape and int(c.shape[0]) != n:
                raise StgenError(f"{p}: {name}['{col}'] has {c.shape[0]} rows, expected {n}")
            cats = el.get("categories")
            if cats is not None and len(c.shape) == 1 and c.shape[0]:
                codes = np.asarray(c[()])
                if codes.size and (codes.max() >= cats.shape[0] or codes.min() < -1):
                    raise StgenError(f"{p}: {name}['{col}'] has category codes out of range")
    return n


def _enc(el: Any) -> str:
    v = el.attrs.get("encoding-type", "")
    return v.decode() if isinstance(v, bytes) else str(v)


def _check_rows(el: Any, rows: int, p: Any, what: str) -> None:
    if isinstance(el, h5py.Dataset):
        if not el.shape or int(el.shape[0]) != rows:
            raise StgenError(f"{p}: {what} has shape {el.shape}, expected {rows} rows")
        if el.dtype.kind not in "biuf":
            return  # e.g. a dataframe-like of strings; anndata keeps it as is
        if el.size and el.size <= 50_000_000 and el.dtype.kind == "f":
            if not np.isfinite(np.asarray(el[()], np.float64)).all():
                raise StgenError(f"{p}: {what} holds NaN or infinite values")
    elif _enc(el) in ("csr_matrix", "csc_matrix"):
        _check_matrix(el, None, p, what, rows=rows)


def _check_matrix(
    el: Any, shape: tuple[int, int] | None, p: Any, what: str, rows: int | None = None
) -> None:
    if isinstance(el, h5py.Dataset):
        if el.dtype.kind not in "biuf":
            raise StgenError(f"{p}: {what} holds {el.dtype} values, not numbers")
        if len(el.shape) != 2 or (shape is not None and tuple(el.shape) != tuple(shape)):
            raise StgenError(f"{p}: {what} has shape {el.shape}, expected {shape}")
        return
    enc = _enc(el)
    if enc not in ("csr_matrix", "csc_matrix"):
        raise StgenError(f"{p}: {what} is a group of unknown encoding {enc!r}")
    for k in ("data", "indices", "indptr"):
        if k not in el or not isinstance(el[k], h5py.Dataset) or len(el[k].shape) != 1:
            raise StgenError(f"{p}: sparse {what} lacks a 1-D '{k}' array")
    sh = tuple(int(v) for v in np.asarray(el.attrs.get("shape", ())).ravel())
    if len(sh) != 2 or min(sh) < 0:
        raise StgenError(f"{p}: sparse {what} has no valid 'shape' attribute ({sh})")
    if shape is not None and sh != tuple(shape):
        raise StgenError(f"{p}: sparse {what} has shape {sh}, expected {tuple(shape)}")
    if rows is not None and sh[0] != rows:
        raise StgenError(f"{p}: sparse {what} has {sh[0]} rows, expected {rows}")
    _check_sparse_index(el, p, what, sh, enc)


def _check_sparse_index(el: Any, p: Any, what: str, sh: tuple[int, ...], enc: str) -> None:
    """The values, indices and indptr of a CSR/CSC group are one consistent sparse matrix."""
    major, minor = (sh[0], sh[1]) if enc == "csr_matrix" else (sh[1], sh[0])
    data, indices, indptr = el["data"], el["indices"], el["indptr"]
    if data.dtype.kind not in "biuf":
        raise StgenError(f"{p}: sparse {what} holds {data.dtype} values, not numbers")
    if indices.dtype.kind not in "iu" or indptr.dtype.kind not in "iu":
        raise StgenError(f"{p}: sparse {what} has non-integer indices")
    if indptr.shape[0] != major + 1:
        raise StgenError(
            f"{p}: sparse {what} indptr has {indptr.shape[0]} entries, expected {major + 1}"
        )
    ptr = np.asarray(indptr[()], dtype=np.int64)
    nnz = int(indices.shape[0])
    if data.shape[0] != nnz:
        raise StgenError(f"{p}: sparse {what} has {data.shape[0]} values but {nnz} indices")
    if ptr[0] != 0 or ptr[-1] != nnz or (np.diff(ptr) < 0).any():
        raise StgenError(
            f"{p}: sparse {what} indptr is not a valid index (starts {ptr[0]}, ends "
            f"{ptr[-1]} for {nnz} stored values, must not decrease)"
        )
    for a in range(0, nnz, _READ_STEP):
        chunk = np.asarray(indices[a : a + _READ_STEP], dtype=np.int64)
        if chunk.size and (chunk.min() < 0 or chunk.max() >= minor):
            raise StgenError(
                f"{p}: sparse {what} has column indices outside 0..{minor - 1} "
                f"(found {int(chunk.min())}..{int(chunk.max())})"
            )
