r"""Generators of the standard synthetic benchmarks.

The ground truth is ``X* = U diag(s) V^T`` with ``U``, ``V`` the Q factors of Gaussian
matrices (Haar-distributed orthonormal columns) and singular values from 1 down to
``1/kappa`` (condition number ``kappa``), spaced geometrically (``s_i = kappa^{-i/(r-1)}``,
the usual test in e.g. Tong, Ma, Chi, JMLR 2021; Bian, Cai, Zhang 2023) or linearly.

Completion samples ``|Omega| = round(oversampling * r (m + n - r))`` distinct entries uniformly
(``oversampling`` is relative to the manifold dimension ``r (m + n - r)``); sensing uses
``k`` Gaussian measurement matrices with i.i.d. ``N(0, 1/k)`` entries, so that
``E[A^* A] = I`` (the restricted-isometry normalization).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._backend import as_rng, make_backend
from ..containers import FixedRankPoint
from ._kernels import sample_lowrank
from .completion import MatrixCompletion
from .sensing import MatrixSensing

__all__ = [
    "low_rank_truth",
    "random_completion",
    "random_sensing",
    "spectrum_values",
    "powerlaw_weights",
    "sample_entries_weighted",
]


def _check_dims(m: Any, n: Any, r: Any) -> tuple[int, int, int]:
    for name, v in (("m", m), ("n", n), ("r", r)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if r > min(m, n):
        raise ValueError(f"rank r={r} exceeds min(m, n) = {min(m, n)}")
    return int(m), int(n), int(r)


def spectrum_values(r: int, kappa: float = 1.0, spectrum: str = "geometric") -> np.ndarray:
    """``r`` singular values from 1 down to ``1/kappa``, descending.

    ``"geometric"``: ``kappa^{-i/(r-1)}``; ``"linear"``: evenly spaced. ``r = 1`` gives ``[1]``.
    """
    kappa = float(kappa)
    if not (kappa >= 1.0 and np.isfinite(kappa)):
        raise ValueError(f"kappa (condition number) must be finite and >= 1, got {kappa!r}")
    if spectrum == "geometric":
        return np.geomspace(1.0, 1.0 / kappa, r) if r > 1 else np.ones(1)
    if spectrum == "linear":
        return np.linspace(1.0, 1.0 / kappa, r) if r > 1 else np.ones(1)
    raise ValueError(f"spectrum must be 'geometric' or 'linear', got {spectrum!r}")


def low_rank_truth(
    m: int,
    n: int,
    r: int,
    kappa: float = 1.0,
    spectrum: str = "geometric",
    seed: Any = None,
    *,
    backend: str = "numpy",
    dtype: Any = None,
    device: Any = None,
) -> FixedRankPoint:
    r"""A random rank-r point with prescribed singular values (condition number ``kappa``).

    ``U = qr(G_1).Q``, ``V = qr(G_2).Q`` for Gaussian ``G_1`` (m x r), ``G_2`` (n x r);
    ``s`` from :func:`spectrum_values`. O((m + n) r^2). Drawn in NumPy, then moved to
    ``backend`` (the same seed gives the same matrix on every backend).
    """
    m, n, r = _check_dims(m, n, r)
    s = spectrum_values(r, kappa, spectrum)
    rng = as_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, r)))
    V, _ = np.linalg.qr(rng.standard_normal((n, r)))
    be = make_backend(backend, dtype, device)
    return FixedRankPoint(be.asarray(U), be.asarray(s), be.asarray(V))


def sample_entries(m: int, n: int, size: int, seed: Any = None) -> tuple[np.ndarray, np.ndarray]:
    r"""``size`` distinct positions of an m x n matrix, uniformly at random, sorted row-major.

    Uses ``Generator.choice(m n, size, replace=False)`` on linear indices, which draws
    without replacement in O(size) memory (a hash set; no array of length ``m n``), so it
    works for ``m = n = 1e5`` (about 1.3 s for 6e6 entries). Returns int64 ``(rows, cols)``.
    """
    total = int(m) * int(n)
    if not 1 <= size <= total:
        raise ValueError(f"cannot sample {size} distinct entries of a {m} x {n} matrix")
    lin = np.sort(as_rng(seed).choice(total, size=int(size), replace=False))
    return lin // n, lin % n


def powerlaw_weights(size: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    r"""Sampling probabilities ``w_k proportional to k^{-exponent}`` (Zipf), randomly permuted.

    ``exponent = 0`` is uniform; a Zipf exponent ``a`` gives counts with a power-law tail
    ``P(count > d) ~ d^{-1/a}`` (exponent 0.5: tail index 2, as in rating data; the largest
    row then gets about ``sqrt(m) / 2`` times the mean count). O(size).
    """
    w = np.arange(1, size + 1, dtype=np.float64) ** (-float(exponent))
    return rng.permutation(w / w.sum())


def sample_entries_weighted(
    m: int, n: int, size: int, row_p: np.ndarray, col_p: np.ndarray, seed: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    r"""``size`` distinct positions drawn with probability proportional to ``row_p[i] col_p[j]``.

    Draws pairs with replacement from the product distribution in batches and keeps the
    distinct ones until ``size`` are found; then keeps a uniformly random ``size`` of them.
    Entries whose expected count exceeds one saturate (a heavy row can be fully observed).
    O(size log size) time, O(size) memory. Returns sorted int64 ``(rows, cols)``.

    Raises
    ------
    ValueError
        If ``size > m n``, or if 200 batches do not find enough distinct entries (the
        weights concentrate on fewer than ``size`` positions).
    """
    total = int(m) * int(n)
    if not 1 <= size <= total:
        raise ValueError(f"cannot sample {size} distinct entries of a {m} x {n} matrix")
    rng = as_rng(seed)
    found = np.empty(0, dtype=np.int64)
    for _ in range(200):
        need = size - found.size
        if need <= 0:
            break
        k = int(1.25 * need) + 64
        lin = rng.choice(m, size=k, p=row_p) * np.int64(n) + rng.choice(n, size=k, p=col_p)
        found = np.union1d(found, lin)
    else:
        raise ValueError(
            f"could not draw {size} distinct entries of a {m} x {n} matrix with these weights "
            f"({found.size} found): use a smaller exponent or fewer observations"
        )
    if found.size > size:
        found = np.sort(rng.choice(found, size=size, replace=False))
    return found // n, found % n


def _completion_args(
    m: int, n: int, r: int, oversampling: Any, noise: Any, sampling: str, exponent: Any
) -> tuple[int, float, float]:
    """``(|Omega|, noise, exponent)`` of :func:`random_completion`, checked (ValueError)."""
    oversampling = float(oversampling)
    if not (oversampling > 0 and np.isfinite(oversampling)):
        raise ValueError(f"oversampling must be positive and finite, got {oversampling!r}")
    noise = float(noise)
    if not (noise >= 0 and np.isfinite(noise)):
        raise ValueError(f"noise must be finite and >= 0, got {noise!r}")
    size = int(round(oversampling * r * (m + n - r)))
    if size > m * n:
        raise ValueError(
            f"oversampling {oversampling} asks for {size} entries but the matrix has only {m * n}"
        )
    if sampling not in ("uniform", "powerlaw"):
        raise ValueError(f"sampling must be 'uniform' or 'powerlaw', got {sampling!r}")
    exponent = float(exponent)
    if not (exponent >= 0 and np.isfinite(exponent)):
        raise ValueError(f"exponent must be finite and >= 0, got {exponent!r}")
    return size, noise, exponent


def random_completion(
    m: int,
    n: int,
    r: int,
    kappa: float = 1.0,
    oversampling: float = 3.0,
    spectrum: str = "geometric",
    seed: Any = None,
    *,
    noise: float = 0.0,
    sampling: str = "uniform",
    exponent: float = 0.5,
    weight_decay: float = 0.0,
    backend: str = "numpy",
    dtype: Any = None,
    device: Any = None,
) -> MatrixCompletion:
    r"""A synthetic completion problem with a known rank-r truth.

    Parameters
    ----------
    m, n, r : int
    kappa : float
        Condition number of the truth (``s_1 / s_r``).
    oversampling : float
        ``|Omega| = round(oversampling * r (m + n - r))`` distinct entries.
    spectrum : {"geometric", "linear"}
    seed : int, Generator or None
    noise : float
        Standard deviation of Gaussian noise added to the observations (0: exact data).
    sampling : {"uniform", "powerlaw"}
        ``"uniform"``: every entry equally likely. ``"powerlaw"``: entry ``(i, j)`` drawn with
        probability proportional to ``w_i w'_j``, Zipf weights with ``exponent``
        (:func:`powerlaw_weights`, randomly permuted), so that row and column counts have
        power-law tails as in rating data (:func:`sample_entries_weighted`).
    exponent : float
        Zipf exponent of ``sampling="powerlaw"`` (0.5 by default; 0 is uniform).
    weight_decay : float
        Ridge weight of the problem.
    backend, dtype, device : where the problem's arrays live.

    Returns
    -------
    MatrixCompletion
        With ``truth`` set, so ``relative_error`` works. Memory O(|Omega| + (m + n) r):
        m = n = 1e5, r = 10 (|Omega| = 6e6) takes about 0.5 GB.
    """
    m, n, r = _check_dims(m, n, r)
    spectrum_values(r, kappa, spectrum)  # validates kappa and spectrum before any work
    size, noise, exponent = _completion_args(m, n, r, oversampling, noise, sampling, exponent)
    rng = as_rng(seed)
    truth = low_rank_truth(m, n, r, kappa, spectrum, rng)
    if sampling == "uniform":
        rows, cols = sample_entries(m, n, max(size, 1), rng)
    else:
        row_p, col_p = powerlaw_weights(m, exponent, rng), powerlaw_weights(n, exponent, rng)
        rows, cols = sample_entries_weighted(m, n, max(size, 1), row_p, col_p, rng)
    if max(m, n) <= np.iinfo(np.int32).max:  # the index type MatrixCompletion samples with
        rows, cols = rows.astype(np.int32), cols.astype(np.int32)
    vals = sample_lowrank(truth.U * truth.s[None, :], truth.V, rows, cols)
    if noise > 0:
        vals += noise * rng.standard_normal(vals.shape[0])
    be = make_backend(backend, dtype, device)
    truth_b = FixedRankPoint(be.asarray(truth.U), be.asarray(truth.s), be.asarray(truth.V))
    if be.name != "numpy":
        xp = be.xp
        rows, cols = xp.asarray(rows, device=be.device), xp.asarray(cols, device=be.device)
    return MatrixCompletion(
        rows,
        cols,
        be.asarray(vals),
        (m, n),
        weight_decay,
        dtype=be.dtype,
        backend=be.name,
        device=be.device,
        truth=truth_b,
    )


def random_sensing(
    m: int,
    n: int,
    r: int,
    kappa: float = 1.0,
    k: int | None = None,
    seed: Any = None,
    *,
    spectrum: str = "geometric",
    noise: float = 0.0,
    backend: str = "numpy",
    dtype: Any = None,
    device: Any = None,
) -> MatrixSensing:
    r"""A synthetic sensing problem with Gaussian measurements and a known rank-r truth.

    ``A_i`` has i.i.d. ``N(0, 1/k)`` entries, ``b_i = <A_i, X*>`` (+ noise). ``k`` defaults to
    ``5 r (m + n - r)``. Memory ``8 k m n`` bytes (m = n = 50, r = 5: 48 MB).
    """
    m, n, r = _check_dims(m, n, r)
    spectrum_values(r, kappa, spectrum)
    if k is None:
        k = 5 * r * (m + n - r)
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (number of measurements) must be a positive integer, got {k!r}")
    noise = float(noise)
    if not (noise >= 0 and np.isfinite(noise)):
        raise ValueError(f"noise must be finite and >= 0, got {noise!r}")
    rng = as_rng(seed)
    truth = low_rank_truth(m, n, r, kappa, spectrum, rng)
    A = rng.standard_normal((int(k), m, n)) / np.sqrt(k)
    b = A.reshape(k, m * n) @ truth.to_dense().reshape(-1)
    if noise > 0:
        b += noise * rng.standard_normal(int(k))
    be = make_backend(backend, dtype, device)
    truth_b = FixedRankPoint(be.asarray(truth.U), be.asarray(truth.s), be.asarray(truth.V))
    return MatrixSensing(be.asarray(A), be.asarray(b), truth=truth_b)
