r"""The adapters' first step: start points from the gradient sketches of ``X = 0``."""

from __future__ import annotations

import torch

from ..containers import FixedRankPoint, TangentVector

__all__ = ["adapter_start"]


def adapter_start(manifold, Y, C, Z) -> tuple[FixedRankPoint, TangentVector, torch.Tensor]:
    r"""Start points and tangent vectors of a stack of adapters from their gradient sketches.

    ``Y = G V``, ``C = U^T G V``, ``Z = G^T U`` (stacked) for the random orthonormal test
    matrices U, V. Generalized Nystrom (Nakatsukasa, arXiv 2009.11392, 2020):
    ``G_hat = Y C_eps^+ Z^T``, with the pseudo-inverse dropping singular values of C below
    ``r * eps(dtype) * ||C||_2`` (the stable eps-pseudo-inverse variant). ``G_hat = U0 diag(sig)
    V0^T`` by QR of ``Y C^+`` and ``Z`` and an r x r SVD. Returns ``X0 = U0 diag(0) V0^T``,
    ``xi = U0 diag(sig) V0^T`` (as ``TangentVector(diag(sig), 0, 0)``) and a boolean per item
    that is False where the sketch is zero (that layer got no gradient and stays unstarted).
    Exact (``G_hat = G``) when ``rank G <= r``. Cost O((m + n) r^2 + r^3) per layer.
    """
    be = manifold.backend
    r = int(C.shape[-1])
    uc, sc, vch = torch.linalg.svd(C)
    smax = sc[..., :1]
    keep = sc > r * be.eps * smax
    inv = torch.where(keep, 1.0 / torch.where(keep, sc, torch.ones_like(sc)), torch.zeros_like(sc))
    A = Y @ ((vch.mT * inv[..., None, :]) @ uc.mT)
    qa, ra = torch.linalg.qr(A)
    qz, rz = torch.linalg.qr(Z)
    a, sig, bh = torch.linalg.svd(ra @ rz.mT)
    x0 = FixedRankPoint(qa @ a, torch.zeros_like(sig), qz @ bh.mT)
    xi = TangentVector(torch.diag_embed(sig), torch.zeros_like(Y), torch.zeros_like(Z))
    return x0, xi, smax[..., 0] > 0
