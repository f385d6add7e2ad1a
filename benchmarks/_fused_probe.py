r"""A probe for ``python -m benchmarks.optimizer_step --floor``: would a fused per-layer CPU
kernel be faster?

The probe takes the largest single piece of the RAdamW step, the exact solve of the adaptive
metric (:meth:`rankopt.metrics.KroneckerDiagonal.solve`, ``solver="direct"``), and writes it
as ONE numba call over a stack of layers: a loop over the layers, each doing the same
products as the torch code with numba's BLAS-backed ``@`` on 2-D arrays (no torch operation
and no Python per product). It is a measurement, not a code path of rankopt: it serves to
split the solve's time into the cost of torch's ~35 operations (dispatch and Python) and the
cost of the arithmetic itself, which a fused kernel still pays.

Formulas (per layer, ``D_L = diag(dl)``, ``D_R = diag(dr)``; see ``_direct_solve``):
``A_L = U^T D_L U``, ``A_R = V^T D_R V``, ``L = M A_R^{-1}``,
``Z = D_L^{-1} (Up A_R^{-1} + U L)``, ``Up' = Z - U (U^T Z)``,
``K = L^T - (U^T Z)^T A_L``, ``Q = D_R^{-1} (Vp + V M^T)``, ``G = V^T Q``,
``M' = ((G - K) A_L^{-1})^T``, ``Vp' = (Q - V G) A_L^{-1}``. O((m + n) r^2 + r^3) per layer.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True)
def _solve_stack(U, V, dl, dr, eM, eUp, eVp, oM, oUp, oVp):  # pragma: no cover - numba
    for b in range(U.shape[0]):
        Ub, Vb = U[b], V[b]
        wl, wr = dl[b].reshape(-1, 1), dr[b].reshape(-1, 1)
        AL = Ub.T @ (wl * Ub)
        ALi, ARi = np.linalg.inv(AL), np.linalg.inv(Vb.T @ (wr * Vb))
        L = eM[b] @ ARi
        Z = (eUp[b] @ ARi + Ub @ L) / wl
        UtZ = Ub.T @ Z
        oUp[b] = Z - Ub @ UtZ
        K = L.T - UtZ.T @ AL
        Q = (eVp[b] + Vb @ np.ascontiguousarray(eM[b].T)) / wr
        G = Vb.T @ Q
        oM[b] = ((G - K) @ ALi).T
        oVp[b] = (Q - Vb @ G) @ ALi


def fused_solve(U, V, dl, dr, M, Up, Vp):
    """The direct solve of a stack (torch CPU tensors, contiguous) by one numba call; returns
    ``(M', Up', Vp')`` as new tensors (views of NumPy arrays, no copy either way)."""
    import torch

    out = (torch.empty_like(M), torch.empty_like(Up), torch.empty_like(Vp))
    args = [t.contiguous().numpy() for t in (U, V, dl, dr, M, Up, Vp)]
    _solve_stack(*args, *(t.numpy() for t in out))
    return out
