r"""Observed entries ``(rows, cols, vals)`` as matrix completion takes them in.

Validation happens once, on the host (NumPy): positions are integers in range and distinct,
values finite; then the entries are sorted row-major (the CSR order, O(N log N)) and the index
arrays are converted to what each backend's kernels take (:func:`index_array`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._backend import backend_name_of

__all__ = [
    "INT32_MAX",
    "host_array",
    "host_entries",
    "check_indices",
    "check_values",
    "csr_order",
    "index_dtype",
    "index_array",
    "csr_layout",
    "positions",
]

INT32_MAX = np.iinfo(np.int32).max


def host_array(a: Any, what: str) -> np.ndarray:
    """Input data as a 1-D NumPy array on the host (validation and sorting happen there, once).

    Torch tensors are detached and copied to the CPU, CuPy arrays fetched; ValueError for
    anything that is not array-like or not 1-D.
    """
    if backend_name_of(a) == "torch":
        a = a.detach().cpu().numpy()
    elif backend_name_of(a) == "cupy":  # pragma: no cover - needs a GPU
        a = a.get()
    try:
        a = np.asarray(a)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be array-like: {e}") from None
    if a.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {a.shape}")
    return a


def host_entries(rows: Any, cols: Any, vals: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, cols, vals)`` as host arrays (:func:`host_array`) of one, nonzero length.

    Raises
    ------
    ValueError
        If the lengths differ or there are no entries.
    """
    r_h, c_h, v_h = host_array(rows, "rows"), host_array(cols, "cols"), host_array(vals, "vals")
    if not (len(r_h) == len(c_h) == len(v_h)):
        raise ValueError(
            f"rows, cols and vals must have the same length, got {len(r_h)}, {len(c_h)}, {len(v_h)}"
        )
    if len(v_h) == 0:
        raise ValueError("matrix completion needs at least one observed entry (vals is empty)")
    return r_h, c_h, v_h


def check_indices(a: np.ndarray, size: int, what: str) -> np.ndarray:
    """Integer positions in ``[0, size)`` as int64 (ValueError naming the range otherwise)."""
    if a.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integers, got dtype {a.dtype}")
    if a.size and (int(a.min()) < 0 or int(a.max()) >= size):
        raise ValueError(
            f"{what} out of range: values must lie in [0, {size}), got min {int(a.min())}, "
            f"max {int(a.max())}"
        )
    return a.astype(np.int64, copy=False)


def check_values(v: np.ndarray) -> np.ndarray:
    """The observed values as finite float64 (ValueError naming the first bad one)."""
    if v.dtype.kind not in "fiub":
        raise ValueError(f"vals must be real numbers, got dtype {v.dtype}")
    v = v.astype(np.float64, copy=False)
    if not np.all(np.isfinite(v)):
        bad = int(np.flatnonzero(~np.isfinite(v))[0])
        raise ValueError(f"vals must be finite; vals[{bad}] = {v[bad]}")
    return v


def csr_order(r: np.ndarray, c: np.ndarray, n: int) -> np.ndarray:
    """The permutation that sorts the entries row-major (the CSR order); ValueError for
    duplicate positions (they become neighbours there). O(N log N)."""
    lin = r * n + c
    order = np.argsort(lin, kind="stable")
    lin = lin[order]
    dup = np.flatnonzero(lin[1:] == lin[:-1])
    if dup.size:
        i, j = divmod(int(lin[dup[0]]), n)
        raise ValueError(
            f"duplicate observed entries: position ({i}, {j}) appears more than once "
            f"({dup.size} duplicates in total); aggregate them first"
        )
    return order


def index_dtype(m: int, n: int, size: int) -> type:
    """``np.int32`` when every row, column and entry index fits, else ``np.int64``."""
    return np.int32 if max(m, n, size) <= INT32_MAX else np.int64


def index_array(be: Any, a: np.ndarray, idx: Any) -> Any:
    """Host indices as the index array each backend's kernels take.

    NumPy: ``idx`` (int32 when every index and |Omega| fit, else int64: :func:`index_dtype`).
    Torch: int64 tensors on the problem's device (``torch.sparse_csr_tensor`` and indexing
    want int64). CuPy: int32 arrays on the device (``cupyx.scipy.sparse.csr_matrix`` supports
    int32 indices only; larger problems are refused with a clear error).
    """
    if be.name == "numpy":
        return a.astype(idx)
    if be.name == "torch":
        import torch

        return torch.as_tensor(a.astype(np.int64), device=be.device)
    if be.name == "cupy":
        if idx is not np.int32:
            raise ValueError(
                "the cupy backend supports at most 2^31 - 1 observed entries and rows/cols "
                "(cupyx.scipy.sparse uses int32 indices); use backend='torch' for larger problems"
            )
        import cupy as cp

        with cp.cuda.Device(be.device):
            return cp.asarray(a.astype(np.int32))
    raise ValueError(f"unknown backend {be.name!r}")  # pragma: no cover - make_backend checks


def csr_layout(
    be: Any, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]
) -> tuple[Any, Any, Any, Any]:
    """``(rows, cols, indptr, vals)``: validated host entries sorted row-major (CSR order,
    :func:`csr_order`) with the row pointer, as the backend ``be``'s arrays
    (:func:`index_array`, :func:`index_dtype`). O(N log N) for N entries."""
    m, n = shape
    order = csr_order(rows, cols, n)
    idx = index_dtype(m, n, len(order))
    r_s, c_s = rows[order], cols[order]
    indptr = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(np.bincount(r_s, minlength=m), out=indptr[1:])
    return (
        index_array(be, r_s, idx),
        index_array(be, c_s, idx),
        index_array(be, indptr, idx),
        be.asarray(vals[order]),
    )


def positions(be: Any, rows: Any, cols: Any, shape: tuple[int, int]) -> tuple[Any, Any]:
    """Positions ``(rows, cols)`` of an m x n matrix (any order, repeats allowed), validated
    (:func:`check_indices`, equal lengths) and as the backend ``be``'s index arrays. O(N)."""
    m, n = shape
    r = check_indices(host_array(rows, "rows"), m, "rows")
    c = check_indices(host_array(cols, "cols"), n, "cols")
    if len(r) != len(c):
        raise ValueError(f"rows and cols must have the same length, got {len(r)} and {len(c)}")
    idx = index_dtype(m, n, len(r))
    return index_array(be, r, idx), index_array(be, c, idx)
