r"""Truncated SVDs for the spectral starts of the problems (NumPy / scipy, host only).

* :func:`top_svd`: the top-k singular triplets of a sparse matrix or linear operator, by
  PROPACK (with ARPACK as its fallback), ARPACK, or the randomized SVD;
* :func:`randomized_range_finder`, :func:`randomized_svd`: Halko, Martinsson & Tropp (2011),
  Alg. 4.4 with re-orthonormalized power iterations;
* :func:`lowrank_svd`: the SVD of a factored product ``A B^T`` through QR of both factors;
* :func:`orthonormal_svd`: re-orthonormalizes the factors an iterative SVD returns.

Used by :meth:`MatrixCompletion.spectral_init <rankopt.problems.MatrixCompletion.spectral_init>`
(:mod:`rankopt.problems._spectral`) and :meth:`MatrixSensing.spectral_init
<rankopt.problems.MatrixSensing.spectral_init>` (sparse adjoints). Every product with ``Y``
costs O(nnz) per vector for a sparse ``Y``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._backend import as_rng

__all__ = [
    "ORTH_TOL",
    "top_svd",
    "randomized_range_finder",
    "randomized_svd",
    "lowrank_svd",
    "orthonormal_svd",
]

#: Largest ``max |U^T U - I|`` accepted from an iterative SVD before re-orthonormalizing
#: (Lanczos loses orthogonality for singular values near round-off, e.g. data of rank < r).
ORTH_TOL = 1e-12

Triplets = tuple[np.ndarray, np.ndarray, np.ndarray]


def top_svd(
    Y: Any,
    rank: int,
    random_state: Any,
    method: str = "propack",
    maxiter: int | None = None,
    fallback: bool = True,
) -> Triplets:
    """``(u, s, v)``: the top ``rank`` singular triplets of ``Y``, in descending order.

    Parameters
    ----------
    Y : scipy sparse matrix or ``LinearOperator`` (m x n)
    rank : int
    random_state : int, Generator or None
        Seeds PROPACK's start vector (as given) and ARPACK's (through a Generator).
    method : {"propack", "arpack", "randomized"}
        ``scipy.sparse.linalg.svds`` with PROPACK (ARPACK if its Lanczos process raises
        ``LinAlgError``), with ARPACK, or :func:`randomized_svd`.
    maxiter : int, optional
        Size of PROPACK's Lanczos basis (scipy's default, ``10 rank``, when None).
    fallback : bool
        ARPACK when PROPACK does not converge in its basis (default); False re-raises its
        ``LinAlgError`` (the top ``rank`` values are not separated from the next ones within
        ``maxiter`` Lanczos steps).

    Returns
    -------
    u : (m, rank), s : (rank,), v : (n, rank)
    """
    import scipy.sparse.linalg as sla

    m, n = Y.shape
    if method == "propack":
        try:
            u, s, vt = sla.svds(
                Y, k=rank, solver="propack", random_state=random_state, maxiter=maxiter
            )
        except np.linalg.LinAlgError:
            if not fallback:
                raise
            method = "arpack"
    if method == "arpack":
        v0 = as_rng(random_state).standard_normal(min(m, n))
        u, s, vt = sla.svds(Y, k=rank, solver="arpack", v0=v0)
    elif method == "randomized":
        u, s, vt = randomized_svd(Y, rank, as_rng(random_state))
    order = np.argsort(s)[::-1]
    return u[:, order], s[order], vt[order].T


def randomized_range_finder(
    Y: Any, size: int, rng: np.random.Generator, power_iters: int = 4
) -> np.ndarray:
    """An orthonormal m x ``size`` basis ``Q`` whose range approximates the top of ``Y``'s.

    ``Q = qr(Y G)`` for a Gaussian n x size ``G``, then ``power_iters`` power iterations
    ``Q <- qr(Y qr(Y^T Q))`` with re-orthonormalization (Halko, Martinsson, Tropp 2011, Alg.
    4.4). O(power_iters nnz size + (m + n) size^2) for a sparse ``Y``.
    """
    m, n = Y.shape
    Q, _ = np.linalg.qr(Y @ rng.standard_normal((n, size)))
    for _ in range(power_iters):
        W, _ = np.linalg.qr(Y.T @ Q)
        Q, _ = np.linalg.qr(Y @ W)
    return Q


def randomized_svd(Y: Any, k: int, rng: np.random.Generator, p: int = 10, q: int = 4) -> Triplets:
    """Randomized SVD: ``k`` triplets from a range of ``k + p`` columns found with ``q`` power
    iterations (:func:`randomized_range_finder`), then the SVD of ``Q^T Y``.
    O(q nnz (k + p) + (m + n) (k + p)^2). Returns ``(u, s, vt)`` like ``svds``."""
    m, n = Y.shape
    ell = min(k + p, m, n)
    Q = randomized_range_finder(Y, ell, rng, q)
    u, s, vt = np.linalg.svd(np.asarray((Y.T @ Q).T), full_matrices=False)
    return Q @ u[:, :k], s[:k], vt[:k]


def lowrank_svd(A: np.ndarray, B: np.ndarray) -> Triplets:
    """SVD ``(U, s, V)`` of ``A B^T`` through QR of both factors: O((m + n) k^2)."""
    qa, ra = np.linalg.qr(A)
    qb, rb = np.linalg.qr(B)
    a, s, bt = np.linalg.svd(ra @ rb.T)
    return qa @ a, s, qb @ bt.T


def orthonormal_svd(u: np.ndarray, s: np.ndarray, v: np.ndarray) -> Triplets:
    """``(U, s, V)`` with orthonormal factors and the same product ``u diag(s) v^T``.

    A no-op when ``u`` and ``v`` are orthonormal to ``ORTH_TOL``; otherwise QR of both factors
    and an SVD of the r x r core ``R_u diag(s) R_v^T``: O((m + n) r^2).
    """
    r = len(s)
    eye = np.eye(r)
    if max(np.abs(u.T @ u - eye).max(), np.abs(v.T @ v - eye).max()) <= ORTH_TOL:
        return u, s, v
    qu, ru = np.linalg.qr(u)
    qv, rv = np.linalg.qr(v)
    a, s2, bt = np.linalg.svd((ru * s[None, :]) @ rv.T)
    return qu @ a, s2, qv @ bt.T
