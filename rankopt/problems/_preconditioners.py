r"""Preconditioners of the Gauss-Newton operator of matrix completion, for the inner CG.

The Gauss-Newton operator ``P_x P_Omega P_x (+ lam)`` at ``x = U diag(s) V^T`` acts on row
``i`` of ``Up`` as the r x r matrix ``G_i = sum_{j in Omega_i} V_j V_j^T (+ lam I)`` (up to the
projections and the couplings between the blocks), on row ``j`` of ``Vp`` as
``H_j = sum_{i in Omega^j} U_i U_i^T (+ lam I)``, and on ``M`` roughly as
``|Omega| / (m n) + lam``. Both preconditioners apply inverses of these blocks and re-project
``Up``, ``Vp`` onto the complements of ``U``, ``V``:

* :class:`BlockJacobi` (``"block"``): the exact ``G_i^{-1}``, ``H_j^{-1}`` (numba kernels,
  O(|Omega| r^2 + (m + n) r^3) to set up, float32 storage of ``(m + n) r^2`` numbers; the
  column blocks use a CSC copy of the pattern, one index array of |Omega| entries built once),
  reused while the subspaces stay close (``BLOCK_REUSE``). Measured at 30000 x 30000, rank 10,
  oversampling 3: 38 CG iterations in total instead of 69 (same 7 Gauss-Newton iterations);
  worth its set-up from a few hundred thousand observations on (``BLOCK_MIN_NNZ``);
* :class:`DiagonalPreconditioner` (``"diagonal"``): ``G_i ~ (c_i / n + lam) I``,
  ``H_j ~ (d_j / m + lam) I`` (``c_i``, ``d_j`` the row and column counts: exact for
  incoherent factors), O((m + n) r^2) a call. 11-15% fewer CG iterations than none at
  oversampling 2-5.

Tried and not kept: the diagonal one for the loose first inner solves (relative tolerance >= 0.1
or 0.25): one block set-up saved, but 4-8 more CG iterations in total at 30000 x 30000 (the
rougher first steps cost later).

:meth:`MatrixCompletion.gn_preconditioner
<rankopt.problems.MatrixCompletion.gn_preconditioner>` chooses between them
(:func:`resolve_kind`) and documents the measurements.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..containers import FixedRankPoint, TangentVector
from ._kernels import csc_pattern, gram_inverses, resolve_parallel, rowwise_matmul

__all__ = [
    "BLOCK_MIN_NNZ",
    "BLOCK_REUSE",
    "KINDS",
    "check_kind",
    "resolve_kind",
    "BlockJacobi",
    "DiagonalPreconditioner",
    "block_side",
]

#: Observations from which ``preconditioner="auto"`` uses the block-Jacobi preconditioner.
BLOCK_MIN_NNZ = 200_000
#: The block preconditioner keeps the blocks of an earlier point while its subspaces are this
#: close: ``max |R^T R - I| <= BLOCK_REUSE`` for ``R = U_0^T U`` and ``V_0^T V`` (principal
#: angles up to about 0.45 rad; measured at 30000 x 30000: 2 set-ups instead of 7, 39 CG
#: iterations instead of 38; 0.1: 4 set-ups, 38 iterations).
BLOCK_REUSE = 0.2
#: Values of the ``preconditioner`` option of :class:`~rankopt.problems.MatrixCompletion`.
KINDS = ("auto", "diagonal", "block")

#: A preconditioner at one point: tangent vector in, tangent vector out.
Apply = Callable[[TangentVector], TangentVector]


def check_kind(kind: Any) -> str:
    """``kind`` if it is one of :data:`KINDS`, else ValueError."""
    if kind not in KINDS:
        raise ValueError(f"preconditioner must be 'auto', 'diagonal' or 'block', got {kind!r}")
    return kind


def resolve_kind(kind: str, nnz: int, numba_fast_path: bool) -> str:
    """``"block"`` or ``"diagonal"``: ``"auto"`` is ``"block"`` from ``BLOCK_MIN_NNZ``
    observations on the numba path. ValueError for ``"block"`` off that path."""
    if kind == "auto":
        kind = "block" if nnz >= BLOCK_MIN_NNZ and numba_fast_path else "diagonal"
    if kind == "block" and not numba_fast_path:
        raise ValueError("preconditioner='block' needs the numpy backend and numba; use 'diagonal'")
    return kind


def block_side(
    P: np.ndarray, F: np.ndarray, G: np.ndarray, rot: np.ndarray | None, s: np.ndarray, par: bool
) -> np.ndarray:
    """``(I - F F^T) H(P)`` with ``H`` the row blocks ``G`` (rotated by ``rot``: ``rot^T G_i
    rot``), using the scratch array ``s``; the result is a fresh array. O(rows r^2)."""
    if rot is None:
        out = rowwise_matmul(P, G, parallel=par)
        out -= np.matmul(F, F.T @ out, out=s)
        return out
    out = rowwise_matmul(np.matmul(P, rot.T, out=s), G, parallel=par)
    Y = np.matmul(out, rot, out=s)
    np.matmul(F, F.T @ Y, out=out)
    return np.subtract(Y, out, out=out)


class BlockJacobi:
    r"""Block-Jacobi preconditioner, with the blocks of an earlier point reused nearby.

    If ``U = U_0 R_u + E`` with ``R_u = U_0^T U`` nearly orthogonal, then ``H_j(U) ~ R_u^T
    H_j(U_0) R_u`` and ``H_j(U)^{-1} ~ R_u^T H_j(U_0)^{-1} R_u`` (likewise for ``V``): the
    rotation costs O((m + n) r^2) instead of the O(|Omega| r^2 + (m + n) r^3) set-up. Near
    convergence the subspaces barely move, so the blocks are computed once or twice per solve.

    Parameters
    ----------
    rows, cols, indptr : int arrays
        The CSR pattern of Omega (NumPy).
    shape : (int, int)
    nnz : int
        ``|Omega|``.
    weight_decay : float
    parallel : bool or None
        Threaded numba kernels; None: as the enclosing ``threads=`` setting
        (:func:`~rankopt.problems._kernels.resolve_parallel`, read at each call).

    Attributes
    ----------
    blocks : (U_0, V_0, G_r, G_c) or None
        The point whose blocks are held and the float32 stacks of ``G_i^{-1}`` (m x r x r) and
        ``H_j^{-1}`` (n x r x r).
    csc : (rows_by_column, col_ptr) or None
        Omega grouped by column (for ``H_j``), built once on first use: one index array of
        |Omega| entries.
    """

    def __init__(
        self,
        rows: np.ndarray,
        cols: np.ndarray,
        indptr: np.ndarray,
        shape: tuple[int, int],
        nnz: int,
        weight_decay: float,
        parallel: bool | None,
    ) -> None:
        self.rows, self.cols, self.indptr = rows, cols, indptr
        self.shape, self.nnz = shape, nnz
        self.weight_decay = weight_decay
        self._parallel = parallel
        self.blocks: tuple[Any, Any, np.ndarray, np.ndarray] | None = None
        self.csc: tuple[np.ndarray, np.ndarray] | None = None

    def rotations(self, U: np.ndarray, V: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``(R_u, R_v)`` when the held blocks can serve the point ``(U, V)``, else None."""
        if self.blocks is None or self.blocks[0].shape != U.shape:
            return None
        Ru, Rv = self.blocks[0].T @ U, self.blocks[1].T @ V
        eye = np.eye(U.shape[1])
        drift = max(np.abs(Ru.T @ Ru - eye).max(), np.abs(Rv.T @ Rv - eye).max())
        return (Ru, Rv) if drift <= BLOCK_REUSE else None

    @property
    def parallel(self) -> bool:
        """Whether the kernels run threaded now (the option, resolved at call time)."""
        return resolve_parallel(self._parallel)

    def compute_blocks(self, U: np.ndarray, V: np.ndarray) -> None:
        """The blocks at ``(U, V)``: O(|Omega| r^2 + (m + n) r^3)."""
        n = self.shape[1]
        lam, par = self.weight_decay, self.parallel
        if self.csc is None:
            self.csc = csc_pattern(self.rows, self.cols, n)
        Gr = gram_inverses(V, self.cols, self.indptr, lam, parallel=par)
        Gc = gram_inverses(U, self.csc[0], self.csc[1], lam, parallel=par)
        self.blocks = (U, V, Gr, Gc)

    def at(self, x: FixedRankPoint) -> Apply:
        """The preconditioner at ``x``: the held blocks, rotated, or new ones."""
        m, n = self.shape
        U, V = x.U, x.V
        rot = self.rotations(U, V)
        if rot is None:
            self.compute_blocks(U, V)
        Ru, Rv = rot if rot is not None else (None, None)
        _, _, Gr, Gc = self.blocks
        mw = self.nnz / (m * n) + self.weight_decay
        par = self.parallel
        # one scratch array per side, reused by every application (fresh 80 MB arrays at
        # n = 1e6 cost a page-faulting mapping each); each result is the kernel's fresh output
        su, sv = np.empty_like(U), np.empty_like(V)

        def apply(t: TangentVector) -> TangentVector:
            Up = block_side(t.Up, U, Gr, Rv, su, par)
            return TangentVector(t.M / mw, Up, block_side(t.Vp, V, Gc, Ru, sv, par))

        return apply


class DiagonalPreconditioner:
    r"""``G_i ~ (c_i / n + lam) I``, ``H_j ~ (d_j / m + lam) I``, ``M`` scaled by
    ``|Omega| / (m n) + lam``; O((m + n) r^2) a call, any backend.

    Parameters
    ----------
    row_counts, col_counts : NumPy int arrays (m,), (n,)
        Observations per row and per column.
    nnz : int
    weight_decay : float
    be : Backend
        The problem's backend (the weights are held as its arrays).
    """

    def __init__(
        self,
        row_counts: np.ndarray,
        col_counts: np.ndarray,
        nnz: int,
        weight_decay: float,
        be: Any,
    ) -> None:
        m, n = len(row_counts), len(col_counts)
        rw = be.asarray(row_counts / n + weight_decay)[:, None]
        cw = be.asarray(col_counts / m + weight_decay)[:, None]
        self.row_weights = be.xp.where(rw > 0, rw, 1.0)  # empty rows: no scaling
        self.col_weights = be.xp.where(cw > 0, cw, 1.0)
        self.core_weight = nnz / (m * n) + weight_decay

    def at(self, x: FixedRankPoint) -> Apply:
        """The preconditioner at ``x``."""
        U, V = x.U, x.V
        rw, cw, mw = self.row_weights, self.col_weights, self.core_weight

        def apply(t: TangentVector) -> TangentVector:
            Up = t.Up / rw
            Vp = t.Vp / cw
            return TangentVector(t.M / mw, Up - U @ (U.T @ Up), Vp - V @ (V.T @ Vp))

        return apply
