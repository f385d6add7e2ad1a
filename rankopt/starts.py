r"""Starting points computed from a gradient: the locally optimal start of Riemannion's paper.

Bogachev et al. (arXiv 2507.12142, ICLR 2026) start a zero-initialized adapter not at 0 (which is
off the manifold of rank-r matrices) but at the rank-r point whose tangent space captures most of
the first gradient ``G``: with ``G = sum_i sigma_i u_i v_i^T``, the tangent space at
``X = U_1 R V_2^T`` (``U_1 = [u_1 .. u_r]``, ``V_2 = [v_{r+1} .. v_{2r}]``, any invertible
``R``) contains ``U_1 U_1^T G + G V_2 V_2^T``, so the norm of the projected gradient is
``sqrt(sigma_1^2 + ... + sigma_{2r}^2)``, the largest any rank-r point allows (their "locally
optimal initialization", LOI). The start is ``X_0 = alpha U_1 V_2^T`` with a small ``alpha``:
the model moves by ``alpha`` in spectral norm, and the first Riemannian step sees the top 2r
directions of the gradient.

Choices rankopt makes where the paper leaves them open: the sign of each pair ``(u_i,
v_{r+i})`` is fixed by making the largest-magnitude entry of each vector positive, so the start
does not depend on the signs LAPACK returns; and a gradient of numerical rank below 2r (a batch
smaller than 2r, a pooled output) raises a warning, because the columns of ``V_2`` beyond the
gradient's range are then arbitrary (there the start depends on the SVD's choice). Cost: one SVD
of ``G``, O(m n min(m, n)).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from .containers import FixedRankPoint

__all__ = ["locally_optimal_start", "LOIWarning"]


class LOIWarning(UserWarning):
    """The gradient given to :func:`locally_optimal_start` has numerical rank below 2r."""


def locally_optimal_start(manifold: Any, G: Any, scale: float) -> FixedRankPoint:
    r"""The locally optimal rank-r start ``X_0 = scale U_{1..r} V_{r+1..2r}^T`` of gradient ``G``.

    Parameters
    ----------
    manifold : rankopt.FixedRankManifold
        The manifold of the start (its backend, shape ``m x n`` and rank ``r``; ``2 r <=
        min(m, n)``).
    G : array of shape (..., m, n)
        The Euclidean gradient at the zero matrix (a stack gives a stack of starts).
    scale : float
        The start's singular values (all equal): ``|alpha|`` of the paper; a negative value
        flips the sign of ``V``. Nonzero and finite.

    Returns
    -------
    FixedRankPoint
        ``U = [u_1 .. u_r]``, ``s = |scale|``, ``V = sign(scale) [v_{r+1} .. v_{2r}]``, each
        singular vector with its largest-magnitude entry positive.

    Raises
    ------
    ValueError
        ``2 r > min(m, n)``, a gradient of another shape, non-finite entries, a zero gradient or
        a zero or non-finite ``scale``.

    Warns
    -----
    LOIWarning
        When ``sigma_{2r} <= 64 eps max(m, n) sigma_1`` (numerical rank below 2r).
    """
    be, m, n, r = manifold.backend, manifold.m, manifold.n, manifold.r
    if 2 * r > min(m, n):
        raise ValueError(f"the locally optimal start needs 2 r <= min(m, n); got r={r}, {m} x {n}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale != 0):
        raise ValueError(f"scale must be a finite nonzero number, got {scale!r}")
    G = be.asarray(G)
    if tuple(G.shape[-2:]) != (m, n):
        raise ValueError(f"gradient of shape {tuple(G.shape)}; expected (..., {m}, {n})")
    if not bool(be.xp.all(be.xp.isfinite(G))):
        raise ValueError("the gradient has non-finite entries")
    u, sv, vh = be.svd(G)
    s_host = be.to_numpy(sv).reshape(-1, sv.shape[-1])
    if not np.all(s_host[:, 0] > 0):
        raise ValueError("the gradient is zero: no direction to start from")
    if np.any(s_host[:, 2 * r - 1] <= 64 * be.eps * max(m, n) * s_host[:, 0]):
        warnings.warn(
            f"the gradient has numerical rank below 2r = {2 * r}: the start's V columns beyond "
            "its range are arbitrary (use a larger batch for the gradient)",
            LOIWarning,
            stacklevel=2,
        )
    U = _positive_largest(be, u[..., :, :r])
    V = _positive_largest(be, vh[..., r : 2 * r, :].swapaxes(-1, -2))
    s = be.xp.ones_like(sv[..., :r]) * abs(float(scale))
    return FixedRankPoint(U, s, V if scale > 0 else -V)


def _positive_largest(be: Any, Q: Any) -> Any:
    """``Q`` with each column's sign chosen so that its largest-magnitude entry is positive."""
    host = be.to_numpy(Q)
    idx = np.argmax(np.abs(host), axis=-2)[..., None, :]
    sign = np.where(np.take_along_axis(host, idx, axis=-2) < 0, -1.0, 1.0)
    return Q * be.asarray(sign)
