r"""Low-rank matrix completion.

Given observed entries ``b_k = M[i_k, j_k]`` on a set ``Omega`` of distinct positions,

    f(X) = 1/2 sum_{(i,j) in Omega} (X_ij - b_ij)^2  +  lam/2 ||X||_F^2
         = 1/2 ||P_Omega(X) - b||^2 + lam/2 ||X||_F^2,

a quadratic (least-squares) cost with a linear operator ``P_Omega`` (sampling). Its pieces:

* cost: sample ``X = U diag(s) V^T`` at Omega (:func:`~rankopt.problems._kernels.sampled_residual`),
  O(|Omega| r); ``||X||_F^2 = ||s||^2`` for orthonormal ``U``, ``V``;
* gradient: the residual ``R = P_Omega(X) - b`` as a CSR matrix on a fixed pattern (Omega sorted
  row-major once, at construction; each call only fills a data array), plus the ridge term
  ``lam X`` as a :class:`~rankopt.LowRankMatrix`: returned as the tuple ``(R, lam X)``;
* Hessian: ``P_Omega^* P_Omega(D) + lam D = P_Omega(D) (+ lam D)``, the exact Gauss-Newton
  operator, independent of X; O(|Omega| k) for a rank-k factored direction;
* exact line search along an ambient direction D (f is quadratic in t):
  ``t* = -(<R, P_Omega(D)> + lam <X, D>) / (||P_Omega(D)||^2 + lam ||D||^2)``;
* spectral start (Keshavan, Montanari, Oh 2010; Candes & Recht 2009): the top-r SVD of the
  unbiased estimate ``(m n / |Omega|) P_Omega^*(b)`` of M.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np

from .._backend import as_rng, backend_name_of, make_backend
from ..containers import FixedRankPoint, LowRankMatrix, TangentVector
from . import _kernels
from .base import Problem, lowrank_inner, lowrank_sq_norm

__all__ = ["MatrixCompletion"]

_INT32_MAX = np.iinfo(np.int32).max
#: Coefficient of variation of the observation counts above which sampling is "non-uniform".
DISPERSED = 0.5
#: Row and column norms of the spectral start's data matrix are capped at TRIM x their median.
TRIM = 2.0
#: Observations from which ``preconditioner="auto"`` uses the block-Jacobi preconditioner.
BLOCK_MIN_NNZ = 200_000
#: The block preconditioner keeps the blocks of an earlier point while its subspaces are this
#: close: ``max |R^T R - I| <= BLOCK_REUSE`` for ``R = U_0^T U`` and ``V_0^T V`` (principal
#: angles up to about 0.45 rad; measured at 30000 x 30000: 2 set-ups instead of 7, 39 CG
#: iterations instead of 38; 0.1: 4 set-ups, 38 iterations).
BLOCK_REUSE = 0.2
#: The Gauss-Newton operator samples and projects in one pass
#: (:func:`~rankopt.problems._kernels.sample_project_csr`) once the rank-2r factors of the
#: longer side exceed this many bytes (the 2 MB L2 cache of the machine measured); below, the
#: factors stay in cache and three passes are as fast (at n = 1e4, r = 10: 22 ns per entry
#: against 25 fused; at 3e4: 38 against 34; at 1e5: 51 against 41).
FUSE_MIN_BYTES = 2 << 20


def _check_values(v: np.ndarray) -> np.ndarray:
    """The observed values as finite float64 (ValueError naming the first bad one)."""
    if v.dtype.kind not in "fiub":
        raise ValueError(f"vals must be real numbers, got dtype {v.dtype}")
    v = v.astype(np.float64, copy=False)
    if not np.all(np.isfinite(v)):
        bad = int(np.flatnonzero(~np.isfinite(v))[0])
        raise ValueError(f"vals must be finite; vals[{bad}] = {v[bad]}")
    return v


def _csr_order(r: np.ndarray, c: np.ndarray, n: int) -> np.ndarray:
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


def _host(a: Any, what: str) -> np.ndarray:
    """Input data as a NumPy array on the host (validation and sorting happen there, once)."""
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


def _index_array(be: Any, a: np.ndarray, idx: Any) -> Any:
    """Host indices as the index array each backend's kernels take.

    NumPy: ``idx`` (int32 when every index and |Omega| fit, else int64). Torch: int64 tensors
    on the problem's device (``torch.sparse_csr_tensor`` and indexing want int64). CuPy:
    int32 arrays on the device (``cupyx.scipy.sparse.csr_matrix`` supports int32 indices
    only; larger problems are refused with a clear error).
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


def _check_indices(a: np.ndarray, size: int, what: str) -> np.ndarray:
    if a.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integers, got dtype {a.dtype}")
    if a.size and (int(a.min()) < 0 or int(a.max()) >= size):
        raise ValueError(
            f"{what} out of range: values must lie in [0, {size}), got min {int(a.min())}, "
            f"max {int(a.max())}"
        )
    return a.astype(np.int64, copy=False)


class MatrixCompletion(Problem):
    r"""Matrix completion ``min 1/2 ||P_Omega(X) - b||^2 + lam/2 ||X||_F^2`` over rank-r X.

    Parameters
    ----------
    rows, cols : integer arrays (|Omega|,)
        Positions of the observed entries (NumPy, lists, or torch tensors). Must be distinct.
    vals : array (|Omega|,)
        Observed values (finite). A torch tensor selects the torch backend (on its device).
    shape : (int, int)
        ``(m, n)``.
    weight_decay : float
        Ridge weight ``lam >= 0``.
    dtype : optional
        float64 (default for integer or float64 values) or float32 (default for float32 values).
    backend, device : optional
        Override the backend inferred from ``vals`` (``"numpy"`` or ``"torch"``).
    truth : FixedRankPoint, optional
        The matrix the data came from (enables :meth:`relative_error`).
    parallel : bool, optional
        Threaded numba kernels (NumPy backend): sampling, the products of the Gauss-Newton
        operator and the block preconditioner. Off by default (see
        :func:`rankopt.problems._kernels.sample_lowrank`: it helps on an idle multi-core
        machine and hurts badly on a loaded one).
    preconditioner : {"auto", "diagonal", "block"}
        Preconditioner of the inner CG of Gauss-Newton (:meth:`gn_preconditioner`).
        ``"auto"``: ``"block"`` for NumPy problems with at least ``BLOCK_MIN_NNZ``
        observations (when numba is installed), ``"diagonal"`` otherwise.

    Attributes
    ----------
    rows, cols, vals : arrays
        The data sorted row-major (CSR order), in the problem's backend.
    indptr : array (m + 1,)
        CSR row pointer of the fixed pattern.
    nnz : int
        ``|Omega|``.

    Raises
    ------
    ValueError
        On mismatched lengths, non-integer or out-of-range indices, duplicate positions,
        non-finite values, an empty Omega, or a negative weight decay.

    Notes
    -----
    Setting up costs one sort, O(|Omega| log |Omega|). Evaluations are O(|Omega| r) with a
    compiled kernel (numba) for NumPy. Gradient values are written into a fresh array each
    call (so a gradient returned earlier stays valid; do not modify its values in place). The
    residual at the last point evaluated is kept (with a reference to the point), so that
    ``cost`` then ``cost_and_egrad`` then ``exact_step`` at the same point sample X once.
    Not thread-safe.
    """

    least_squares = True

    def __init__(
        self,
        rows: Any,
        cols: Any,
        vals: Any,
        shape: tuple[int, int],
        weight_decay: float = 0.0,
        *,
        dtype: Any = None,
        backend: str | None = None,
        device: Any = None,
        truth: FixedRankPoint | None = None,
        parallel: bool | None = None,
        preconditioner: str = "auto",
    ) -> None:
        if backend is None:
            backend = backend_name_of(vals) or "numpy"
        if device is None and backend_name_of(vals) == backend and backend != "numpy":
            device = make_backend(backend, None, None).device_of(vals)
        r_h, c_h, v_h = _host(rows, "rows"), _host(cols, "cols"), _host(vals, "vals")
        if not (len(r_h) == len(c_h) == len(v_h)):
            raise ValueError(
                f"rows, cols and vals must have the same length, got {len(r_h)}, {len(c_h)}, {len(v_h)}"
            )
        if len(v_h) == 0:
            raise ValueError("matrix completion needs at least one observed entry (vals is empty)")
        if dtype is None and v_h.dtype == np.float32:
            dtype = "float32"
        self._init_common(shape, backend, dtype, device, truth)
        m, n = self.shape
        r_h = _check_indices(r_h, m, "rows")
        c_h = _check_indices(c_h, n, "cols")
        v_h = _check_values(v_h)
        wd = float(weight_decay)
        if not (wd >= 0.0 and np.isfinite(wd)):
            raise ValueError(f"weight_decay must be finite and >= 0, got {weight_decay!r}")
        self.weight_decay = wd
        self._ehess_fn = None
        self._parallel = parallel
        if preconditioner not in ("auto", "diagonal", "block"):
            raise ValueError(
                f"preconditioner must be 'auto', 'diagonal' or 'block', got {preconditioner!r}"
            )
        self.preconditioner = preconditioner
        self._csc: tuple[np.ndarray, np.ndarray] | None = None
        self._block_cache: tuple[Any, Any, np.ndarray, np.ndarray] | None = None
        self._blocked: Any = None

        order = _csr_order(r_h, c_h, n)
        idx = np.int32 if max(m, n, len(order)) <= _INT32_MAX else np.int64
        r_s, c_s = r_h[order], c_h[order]
        indptr = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(np.bincount(r_s, minlength=m), out=indptr[1:])
        be = self._be
        self.nnz = int(len(order))
        self.rows = _index_array(be, r_s, idx)
        self.cols = _index_array(be, c_s, idx)
        self.indptr = _index_array(be, indptr, idx)
        self.vals = be.asarray(v_h[order])
        self._counts_host: tuple[np.ndarray, np.ndarray] | None = None
        self._scratch = be.zeros((self.nnz,))  # P_Omega(D) in exact_step (never returned)
        self._last: tuple[FixedRankPoint, Any, float] | None = None

    @property
    def has_hessian(self) -> bool:
        return True

    def __repr__(self) -> str:
        m, n = self.shape
        return (
            f"MatrixCompletion(shape=({m}, {n}), nnz={self.nnz}, weight_decay={self.weight_decay}, "
            f"backend={self.backend!r})"
        )

    # ------------------------------------------------------------------ sampling
    def _sample(self, A: Any, B: Any, out: Any) -> Any:
        return _kernels.sample_lowrank(A, B, self.rows, self.cols, out, parallel=self._parallel)

    def _residual(self, x: FixedRankPoint, out: Any) -> float:
        """``out = P_Omega(X) - b`` in place; returns ``||out||^2``. O(|Omega| r)."""
        return _kernels.sampled_residual(
            x.U * x.s[None, :], x.V, self.rows, self.cols, self.vals, out, parallel=self._parallel
        )

    def sample(self, D: Any, out: Any = None) -> Any:
        """``P_Omega(D)``: the values of an ambient matrix at Omega, in CSR order.

        ``D``: LowRankMatrix (O(|Omega| k)), FixedRankPoint, or a dense m x n array.
        """
        D = self._check_direction(D)
        if out is None:
            out = self._empty()
        if isinstance(D, LowRankMatrix):
            return self._sample(D.A, D.B, out)
        out[:] = D[self.rows, self.cols]
        return out

    def predict(self, x: FixedRankPoint, rows: Any, cols: Any) -> Any:
        """Entries ``X[rows[k], cols[k]]`` of a point at arbitrary positions (e.g. a test set)."""
        be = self._be
        m, n = self.shape
        r = _check_indices(_host(rows, "rows"), m, "rows")
        c = _check_indices(_host(cols, "cols"), n, "cols")
        if len(r) != len(c):
            raise ValueError(f"rows and cols must have the same length, got {len(r)} and {len(c)}")
        idx = np.int32 if max(m, n, len(r)) <= _INT32_MAX else np.int64
        r, c = _index_array(be, r, idx), _index_array(be, c, idx)
        return _kernels.sample_lowrank(x.U * x.s[None, :], x.V, r, c, parallel=self._parallel)

    # ------------------------------------------------------------------ data protocol
    @property
    def num_observations(self) -> int:
        """``|Omega|``, the number of observed entries (the data protocol of
        :mod:`rankopt.solvers.noise`)."""
        return self.nnz

    def observed_values(self) -> Any:
        """The observed values ``b`` in the problem's (CSR) order."""
        return self.vals

    def subset(self, index: Any, weight_decay: float | None = None) -> MatrixCompletion:
        """The same problem on the observations ``index`` (positions in the CSR order).

        Used to hold out observations for validation. ``weight_decay`` defaults to this
        problem's; the truth is kept. O(|index| log |index|).
        """
        be = self._be
        index = np.asarray(index)
        if index.ndim != 1 or index.dtype.kind not in "iu":
            raise ValueError("index must be a 1-D integer array of observation positions")
        return MatrixCompletion(
            be.to_numpy(self.rows)[index],
            be.to_numpy(self.cols)[index],
            be.to_numpy(self.vals)[index],
            self.shape,
            self.weight_decay if weight_decay is None else weight_decay,
            dtype=be.dtype,
            backend=be.name,
            device=be.device,
            truth=self.truth,
            parallel=self._parallel,
        )

    def observation_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Observations per row (length m) and per column (length n), as NumPy int arrays."""
        if self._counts_host is None:
            m, n = self.shape
            be = self._be
            self._counts_host = (
                np.diff(be.to_numpy(self.indptr)).astype(np.int64),
                np.bincount(be.to_numpy(self.cols), minlength=n).astype(np.int64),
            )
        return self._counts_host

    def underdetermined(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        r"""Rows and columns with fewer than ``rank`` observations.

        Row ``i`` of a rank-r point ``X = A B^T`` is ``A_i B^T``: its r unknowns ``A_i`` are
        determined by row i's observations only once the column factor is fixed, so a row with
        fewer than r observations can never be determined (nor a column likewise), whatever
        the solver. Returns ``(rows, cols)`` as sorted NumPy index arrays.
        """
        rc, cc = self.observation_counts()
        return np.flatnonzero(rc < rank), np.flatnonzero(cc < rank)

    def _empty(self) -> Any:
        """A fresh |Omega| buffer (uninitialized for NumPy: every entry is written next)."""
        if isinstance(self.vals, np.ndarray):
            return np.empty_like(self.vals)
        return self._be.zeros((self.nnz,))

    def _csr(self, data: Any) -> Any:
        if self.backend != "numpy":  # torch or cupy: make_csr builds each backend's own CSR
            return _kernels.make_csr(self.backend, data, self.cols, self.indptr, self.shape)
        # scipy: a shallow copy of a template built once shares the (read-only) pattern and
        # skips scipy's format checks: 3 us instead of 17 us a matrix, ~150 matrices a solve
        template = getattr(self, "_csr_template", None)
        if template is None:
            template = _kernels.make_csr("numpy", data, self.cols, self.indptr, self.shape)
            template.has_sorted_indices = True
            self._csr_template = template
        out = copy.copy(template)
        out.data = data
        return out

    def _check_direction(self, D: Any) -> Any:
        if isinstance(D, FixedRankPoint):
            D = D.to_lowrank()
        if isinstance(D, LowRankMatrix):
            if D.shape != self.shape:
                raise ValueError(f"direction has shape {D.shape}, expected {self.shape}")
            return D
        if backend_name_of(D) is not None and not self._be.is_sparse(D):
            if tuple(D.shape) != self.shape:
                raise ValueError(f"direction has shape {tuple(D.shape)}, expected {self.shape}")
            return D
        raise ValueError(
            "direction must be a LowRankMatrix, FixedRankPoint or dense array, got "
            f"{type(D).__name__}"
        )

    # ------------------------------------------------------------------ protocol
    def cost(self, x: FixedRankPoint) -> float:
        """``f(X)``: O(|Omega| r). Its residual is kept for a following :meth:`cost_and_egrad`
        or :meth:`exact_step` at the same point (line searches evaluate the cost first)."""
        x = self._as_point(x)
        _, ss = self._fresh_residual(x)
        return 0.5 * ss + self._ridge_cost(x)

    def _ridge_cost(self, x: FixedRankPoint) -> float:
        if self.weight_decay == 0.0:
            return 0.0
        return 0.5 * self.weight_decay * self._be.to_float(self._be.sum_sq(x.s))

    def _gradient(self, x: FixedRankPoint, res: Any) -> Any:
        R = self._csr(res)
        if self.weight_decay == 0.0:
            return R
        return (R, LowRankMatrix(x.U * (self.weight_decay * x.s)[None, :], x.V))

    def cost_and_egrad(self, x: FixedRankPoint) -> tuple[float, Any]:
        """``(f(X), nabla f(X))`` from one sampling pass.

        The gradient is ``P_Omega^*(R)`` as a CSR matrix (scipy for NumPy, torch sparse CSR
        for torch) with the residual values, or the tuple ``(CSR, lam X)`` (their sum) when
        ``weight_decay > 0``. O(|Omega| r).
        """
        x = self._as_point(x)
        res, ss = self._fresh_residual(x)
        return 0.5 * ss + self._ridge_cost(x), self._gradient(x, res)

    def egrad(self, x: FixedRankPoint) -> Any:
        return self.cost_and_egrad(x)[1]

    def residual(self, x: FixedRankPoint) -> Any:
        """``P_Omega(X) - b`` in CSR order (a copy). O(|Omega| r)."""
        return self._fresh_residual(x)[0] * 1.0

    def _fresh_residual(self, x: FixedRankPoint) -> tuple[Any, float]:
        """``(R, ||R||^2)`` with ``R = P_Omega(X) - b``, from the cache when ``x`` is the last point.

        The cache holds a reference to the point, so identity means the same arrays; a new
        array is allocated per new point because returned gradients share it.
        """
        x = self._as_point(x)
        if self._last is not None and self._last[0] is x:
            return self._last[1], self._last[2]
        res = self._empty()
        ss = self._residual(x, res)
        self._last = (x, res, ss)
        return res, ss

    def ehess(self, x: FixedRankPoint, D: Any) -> Any:
        """Gauss-Newton = exact Hessian: ``P_Omega(D)`` as CSR (``+ lam D``). O(|Omega| k)."""
        D = self._check_direction(self._tangent_or_ambient(x, D))
        H = self._csr(self.sample(D))
        if self.weight_decay == 0.0:
            return H
        return (H, D * self.weight_decay)

    def _numba_fast_path(self) -> bool:
        return self.backend == "numpy" and _kernels.HAVE_NUMBA

    def gn_preconditioner(self, manifold: Any, x: FixedRankPoint) -> Any:
        r"""An SPD approximation of the inverse Gauss-Newton operator, for preconditioned CG.

        The Gauss-Newton operator ``P_x P_Omega P_x (+ lam)`` acts on row ``i`` of ``Up`` as
        the r x r matrix ``G_i = sum_{j in Omega_i} V_j V_j^T (+ lam I)`` (up to the
        projections and the couplings between the blocks), on row ``j`` of ``Vp`` as
        ``H_j = sum_{i in Omega^j} U_i U_i^T (+ lam I)``, and on ``M`` roughly as
        ``|Omega| / (m n) + lam``. The preconditioner applies the inverses of these blocks
        and re-projects ``Up``, ``Vp`` onto the complements of ``U``, ``V``:

        * ``"block"`` (block-Jacobi): the exact ``G_i^{-1}``, ``H_j^{-1}`` (numba kernel,
          O(|Omega| r^2 + (m + n) r^3) to set up per outer iteration, float32 storage of
          ``(m + n) r^2`` numbers; the column blocks use a CSC copy of the pattern, one
          index array of |Omega| entries built once). Measured at 30000 x 30000, rank 10,
          oversampling 3: 38 CG iterations in total instead of 69 (same 7 Gauss-Newton
          iterations); worth its set-up from a few hundred thousand observations on;
        * ``"diagonal"``: ``G_i ~ (c_i / n + lam) I``, ``H_j ~ (d_j / m + lam) I`` (``c_i``,
          ``d_j`` the row and column counts: exact for incoherent factors), O((m + n) r^2)
          a call. 11-15% fewer CG iterations than none at oversampling 2-5.

        Tried and not kept: the diagonal one for the loose first inner solves (relative
        tolerance >= 0.1 or 0.25): one block set-up saved, but 4-8 more CG iterations in total
        at 30000 x 30000 (the rougher first steps cost later).
        """
        kind = self.preconditioner
        if kind == "auto":
            big = self.nnz >= BLOCK_MIN_NNZ and self._numba_fast_path()
            kind = "block" if big else "diagonal"
        if kind == "block" and not self._numba_fast_path():
            raise ValueError(
                "preconditioner='block' needs the numpy backend and numba; use 'diagonal'"
            )
        if kind == "block":
            return self._block_preconditioner(x)
        return self._diagonal_preconditioner(x)

    def _block_preconditioner(self, x: FixedRankPoint) -> Any:
        r"""Block-Jacobi, with the blocks of an earlier point reused when its subspaces are
        close (see ``BLOCK_REUSE``): if ``U = U_0 R_u + E`` with ``R_u = U_0^T U`` nearly
        orthogonal, then ``H_j(U) ~ R_u^T H_j(U_0) R_u`` and ``H_j(U)^{-1} ~ R_u^T
        H_j(U_0)^{-1} R_u`` (likewise for ``V``): the rotation costs O((m + n) r^2) instead of
        the O(|Omega| r^2) set-up. Near convergence the subspaces barely move, so the blocks
        are computed once or twice per solve."""
        m, n = self.shape
        U, V = x.U, x.V
        par = bool(self._parallel)
        lam = self.weight_decay
        cache = self._block_cache
        Ru = Rv = None
        if cache is not None and cache[0].shape == U.shape:
            Ru, Rv = cache[0].T @ U, cache[1].T @ V
            eye = np.eye(U.shape[1])
            drift = max(np.abs(Ru.T @ Ru - eye).max(), np.abs(Rv.T @ Rv - eye).max())
            if not drift <= BLOCK_REUSE:
                cache = None
        if cache is None or cache[0].shape != U.shape:
            if self._csc is None:
                self._csc = _kernels.csc_pattern(self.rows, self.cols, n)
            Gr = _kernels.gram_inverses(V, self.cols, self.indptr, lam, parallel=par)
            Gc = _kernels.gram_inverses(U, self._csc[0], self._csc[1], lam, parallel=par)
            cache = self._block_cache = (U, V, Gr, Gc)
            Ru = Rv = None
        Gr, Gc = cache[2], cache[3]
        mw = self.nnz / (m * n) + lam
        # one scratch array per side, reused by every application (fresh 80 MB arrays at
        # n = 1e6 cost a page-faulting mapping each); each result is the kernel's fresh output
        su, sv = np.empty_like(U), np.empty_like(V)

        def side(P: Any, F: Any, G: Any, rot: Any, s: Any) -> Any:
            """``(I - F F^T) H(P)`` with ``H`` the row blocks ``G`` (rotated by ``rot``)."""
            if rot is None:
                out = _kernels.rowwise_matmul(P, G, parallel=par)
                out -= np.matmul(F, F.T @ out, out=s)
                return out
            out = _kernels.rowwise_matmul(np.matmul(P, rot.T, out=s), G, parallel=par)
            Y = np.matmul(out, rot, out=s)
            np.matmul(F, F.T @ Y, out=out)
            return np.subtract(Y, out, out=out)

        def apply(t: TangentVector) -> TangentVector:
            return TangentVector(t.M / mw, side(t.Up, U, Gr, Rv, su), side(t.Vp, V, Gc, Ru, sv))

        return apply

    def _diagonal_preconditioner(self, x: FixedRankPoint) -> Any:
        m, n = self.shape
        be = self._be
        if getattr(self, "_counts", None) is None:
            rc, cc = self.observation_counts()
            self._counts = (
                be.asarray(rc / n + self.weight_decay)[:, None],
                be.asarray(cc / m + self.weight_decay)[:, None],
                self.nnz / (m * n) + self.weight_decay,
            )
        rw, cw, mw = self._counts
        rw = be.xp.where(rw > 0, rw, 1.0)
        cw = be.xp.where(cw > 0, cw, 1.0)
        U, V = x.U, x.V

        def apply(t: TangentVector) -> TangentVector:
            Up = t.Up / rw
            Vp = t.Vp / cw
            return TangentVector(t.M / mw, Up - U @ (U.T @ Up), Vp - V @ (V.T @ Vp))

        return apply

    def _blocked_pattern(self, k: int) -> Any:
        """The column-block copy of Omega (:class:`~rankopt.problems._kernels.BlockedPattern`)
        when the rows of a rank-k factor over all columns exceed two blocks of
        ``BLOCK_BYTES``; None otherwise (they stay in cache anyway). Built once, on first use,
        with the block width of that first rank (any width is correct; it is only speed):
        O(|Omega|) time, two index arrays of |Omega| entries."""
        m, n = self.shape
        width = max(1, _kernels.BLOCK_BYTES // (8 * k))
        if self._blocked is None and n > 2 * width:
            self._blocked = _kernels.BlockedPattern(self.rows, self.cols, n, width)
        return self._blocked

    def gn_operator(self, manifold: Any, x: FixedRankPoint) -> Any:
        r"""The Gauss-Newton operator ``v -> P_x P_Omega(D_v) + lam v`` on the tangent space at
        ``x`` (``D_v`` the embedding of ``v``), or None where the generic path is as good.

        NumPy with numba: with ``D_v = A B^T``, ``A = [U M + Up, U]``, ``B = [V, Vp]`` and
        ``W = P_Omega(D_v)``, one pass over Omega
        (:func:`~rankopt.problems._kernels.sample_project`) gives ``W V`` and ``W^T U``
        without storing ``W`` (each random row ``B_j`` is read once per entry; threaded when
        ``parallel``; in column-block order for large n, see :meth:`_blocked_pattern`; three
        passes while the factors fit in ``FUSE_MIN_BYTES``), then
        ``M' = U^T W V``, ``Up' = W V - U M'``, ``Vp' = W^T U - V M'^T``. Measured at n = 1e6,
        |Omega| = 6e7, one thread: 2.9 s for the pass against 4.9 s for the three passes
        (sampling, ``W V``, ``W^T U``) it replaces. O(|Omega| r + (m + n) r^2) a call; the
        ridge term of ``P_x (lam D_v)`` is ``lam v`` (``D_v`` is tangent). Other backends:
        None (the solver uses ``ehess`` and the manifold's projection).
        """
        if not self._numba_fast_path():
            return None
        m, n = self.shape
        par = bool(self._parallel)
        lam = self.weight_decay
        U, V = x.U, x.V
        cols, indptr = self.cols, self.indptr
        bp = self._blocked_pattern(2 * x.rank)

        fused = bp is not None or 16 * x.rank * max(m, n) > FUSE_MIN_BYTES
        r = x.rank
        # work arrays of this point, reused by every application (at n = 1e6 each is 80-160 MB:
        # fresh ones cost a page-faulting mapping apiece, about 1 s per application measured)
        A = np.empty((m, 2 * r), dtype=U.dtype)
        B = np.empty((n, 2 * r), dtype=V.dtype)
        A[:, r:], B[:, :r] = U, V
        UM, VM = np.empty_like(U), np.empty_like(V)

        def apply(v: TangentVector) -> TangentVector:
            np.matmul(U, v.M, out=A[:, :r])  # D_v = A B^T, A = [U M + Up, U], B = [V, Vp]
            A[:, :r] += v.Up
            B[:, r:] = v.Vp
            if bp is not None:  # column-block order: cache-resident random accesses
                ZV, ZtU = bp.sample_project(A, B, m, parallel=par)
            elif fused:
                ZV, ZtU = _kernels.sample_project_csr(A, B, cols, indptr, n, parallel=par)
            else:  # factors in cache: three passes (sampling, W V, W^T U) are as fast
                w = _kernels.sample_lowrank(A, B, self.rows, cols, parallel=par)
                ZV = _kernels.csr_matmul(w, cols, indptr, V, parallel=par)
                ZtU = _kernels.csr_rmatmul(w, cols, indptr, U, n, parallel=par)
            M = U.T @ ZV
            ZV -= np.matmul(U, M, out=UM)  # the kernels' outputs are fresh: updated in place
            ZtU -= np.matmul(V, M.T, out=VM)
            out = TangentVector(M, ZV, ZtU)
            return out.axpy(lam, v) if lam > 0 else out

        return apply

    def exact_step(self, x: FixedRankPoint, D: Any) -> float:
        r"""``argmin_t f(X + t D)`` in closed form (f is quadratic in t).

        ``t* = -(<R, P_Omega(D)> + lam <X, D>) / (||P_Omega(D)||^2 + lam ||D||^2)`` with
        ``R = P_Omega(X) - b``. O(|Omega| k) for a rank-k factored D (the residual at X is
        reused from the last :meth:`cost_and_egrad` at the same point). Returns 0.0 when the
        cost is constant along D (the denominator is zero).
        """
        x = self._as_point(x)
        D = self._check_direction(self._tangent_or_ambient(x, D))
        be = self._be
        res, _ = self._fresh_residual(x)
        pd = self.sample(D, self._scratch)
        num = be.to_float(be.vdot(res, pd))
        den = be.to_float(be.sum_sq(pd))
        if self.weight_decay > 0.0:
            X = x.to_lowrank()
            if isinstance(D, LowRankMatrix):
                num += self.weight_decay * be.to_float(lowrank_inner(be, X, D))
                den += self.weight_decay * be.to_float(lowrank_sq_norm(be, D))
            else:  # dense D: <X, D> = sum_i s_i u_i^T D v_i, O(m n r)
                num += self.weight_decay * be.to_float(
                    be.xp.sum(x.s * be.xp.sum(x.U * (D @ x.V), axis=0))
                )
                den += self.weight_decay * be.to_float(be.sum_sq(D))
        if den == 0.0:
            return 0.0
        return -num / den

    # ------------------------------------------------------------------ start
    def sampling_dispersion(self) -> float:
        """Coefficient of variation (std / mean) of the row and column counts, the larger.

        Uniform sampling gives about ``1 / sqrt(mean count)`` (0.13 at 60 per row); power-law
        sampling gives 1 and more. :meth:`spectral_init` switches to degree weighting above
        ``DISPERSED`` = 0.5.
        """
        rc, cc = self.observation_counts()
        return float(max(rc.std() / max(rc.mean(), 1e-300), cc.std() / max(cc.mean(), 1e-300)))

    def spectral_init(
        self,
        rank: int,
        seed: Any = None,
        method: str = "propack",
        weighting: str = "auto",
        trim: float | None = TRIM,
    ) -> FixedRankPoint:
        r"""A spectral start: the top-``rank`` SVD of a rescaled ``P_Omega^*(b)``, as a point.

        Parameters
        ----------
        rank : int
        seed : int, Generator or None
            Seeds the start vector of the iterative SVD (deterministic for a fixed seed).
        method : {"propack", "arpack", "randomized"}
            ``scipy.sparse.linalg.svds`` with PROPACK (default, ARPACK as its fallback if the
            Lanczos process does not converge; exact to working precision and
            the fastest measured at 1000 x 1000, |Omega| = 60k, r = 10: about 15 ms against
            50 ms for ARPACK and 11-30 ms for a randomized SVD with 2 power iterations, which
            is only accurate to about 1e-2 there), ARPACK, or the randomized range finder of
            Halko, Martinsson & Tropp (2011) with 10 oversampling columns and 4 power
            iterations. Each costs O(|Omega| r) per product with the sparse matrix.
        weighting : {"auto", "uniform", "degree"}
            ``"uniform"``: ``H_r((m n / |Omega|) P_Omega^*(b))``, the unbiased estimate under
            uniform sampling (Keshavan, Montanari, Oh 2010; Candes & Recht 2009).
            ``"degree"``, for non-uniform sampling: with ``D_r``, ``D_c`` the row and column
            counts, ``Y = D_r^{-1/2} P_Omega^*(b) D_c^{-1/2}`` (when ``P(observed) ~ c_i d_j /
            |Omega|``, ``E Y = D_r^{1/2} M D_c^{1/2} / |Omega|``, so no heavy row dominates),
            then ``X0 = |Omega| D_r^{-1/2} H_r(Y) D_c^{-1/2}`` (QR of both factors), scaled by
            the exact line search ``c = <P_Omega X0, b> / ||P_Omega X0||^2``. Measured at
            1000 x 1000, rank 10, oversampling 3, Zipf exponent 0.5: start error 0.67 against
            1.44 for the uniform start (worse than zero), 0.90 for the uniform one scaled.
            ``"auto"``: ``"degree"`` when :meth:`sampling_dispersion` exceeds 0.5, else
            ``"uniform"``.
        trim : float or None
            Cap the norm of every row and column of the rescaled data matrix at ``trim`` times
            the median (nonzero) row / column norm before the SVD (default 2; None: off). A
            trimming in the spirit of Keshavan, Montanari & Oh (2010), by norm rather than by
            count: a column whose few observed entries happen to be large otherwise becomes a
            top singular vector on its own (measured at 30000 x 30000, rank 10, oversampling 3:
            a singular vector with 71% of its mass on one column, start error 0.91 instead of
            0.81, 9 Gauss-Newton iterations instead of 7; with the cap 0.80 and 7). O(|Omega|).

        Raises
        ------
        ValueError
            If ``rank`` is out of range, or the data have rank < ``rank`` (a zero singular
            value would leave the manifold).
        """
        m, n = self.shape
        if not isinstance(rank, (int, np.integer)) or not 1 <= rank < min(m, n):
            raise ValueError(
                f"rank must be an integer in [1, min(m, n) - 1 = {min(m, n) - 1}], got {rank!r}"
            )
        if method not in ("propack", "arpack", "randomized"):
            raise ValueError(f"unknown method {method!r}; use 'propack', 'arpack' or 'randomized'")
        if weighting not in ("auto", "uniform", "degree"):
            raise ValueError(f"unknown weighting {weighting!r}; use 'auto', 'uniform' or 'degree'")
        if weighting == "auto":
            weighting = "degree" if self.sampling_dispersion() > DISPERSED else "uniform"
        be = self._be
        vals = be.to_numpy(self.vals).astype(np.float64)
        cols, indptr = be.to_numpy(self.cols), be.to_numpy(self.indptr)
        if weighting == "uniform":
            vals = vals * (m * n / self.nnz)
        else:
            rc, cc = self.observation_counts()
            dr, dc = np.sqrt(np.maximum(rc, 1.0)), np.sqrt(np.maximum(cc, 1.0))
            vals = vals / (np.repeat(dr, rc) * dc[cols])
        if trim is not None:
            vals = _trim(vals, cols, indptr, (m, n), float(trim))
        bp = self._blocked_pattern(2 * int(rank)) if self._numba_fast_path() else None
        if bp is not None and method == "propack":  # Lanczos products in column-block order
            Y = bp.operator(bp.reorder(np.ascontiguousarray(vals)), m)
        else:
            Y = sp_csr(vals, cols, indptr, (m, n))
        u, s, v = _top_svd(Y, int(rank), as_rng(seed), method)
        if weighting == "degree":
            u, s, v = _lowrank_svd((u * s) * (self.nnz / dr[:, None]), v / dc[:, None])
        if not s[-1] > 0:
            raise ValueError(
                f"the observed data have rank < {rank}: spectral_init cannot give a rank-{rank} point"
            )
        U, s, V = _orthonormal_svd(u, s, v)
        # C-contiguous factors: the sampling kernel reads rows of U diag(s) and V
        x = FixedRankPoint(
            be.asarray(np.ascontiguousarray(U)),
            be.asarray(s.copy()),
            be.asarray(np.ascontiguousarray(V)),
        )
        if weighting == "degree":  # the exact line search along the ray t X0
            t = self.exact_step(FixedRankPoint(x.U, x.s * 0.0, x.V), x.to_lowrank())
            if t > 0 and math.isfinite(t):
                x = FixedRankPoint(x.U, x.s * t, x.V)
        return x


def _trim(
    vals: np.ndarray, cols: np.ndarray, indptr: np.ndarray, shape: tuple[int, int], c: float
) -> np.ndarray:
    """Values scaled so that no row or column norm exceeds ``c`` times the median one. O(nnz)."""
    if not c > 0:
        raise ValueError(f"trim must be positive or None, got {c!r}")
    m, n = shape
    counts = np.diff(indptr)
    sq = vals * vals
    rn = np.sqrt(np.add.reduceat(sq, indptr[:-1][counts > 0])) if sq.size else np.zeros(0)
    row_norm = np.zeros(m)
    row_norm[counts > 0] = rn
    col_norm = np.sqrt(np.bincount(cols, sq, minlength=n))
    fr = _cap(row_norm, c)
    fc = _cap(col_norm, c)
    return vals * np.repeat(fr, counts) * fc[cols]


def _cap(norms: np.ndarray, c: float) -> np.ndarray:
    """Factors ``min(1, c median(norms > 0) / norm)``."""
    pos = norms[norms > 0]
    if pos.size == 0:
        return np.ones_like(norms)
    bound = c * float(np.median(pos))
    return np.minimum(1.0, bound / np.maximum(norms, bound * 1e-300))


def sp_csr(vals: np.ndarray, cols: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]):
    """A scipy CSR matrix on a sorted pattern (no checks, no copies)."""
    import scipy.sparse as sp

    return sp.csr_matrix((vals, cols, indptr), shape=shape)


def _top_svd(Y: Any, rank: int, rng: np.random.Generator, method: str):
    """``(u, s, v)``, top ``rank`` singular triplets in descending order (see spectral_init)."""
    import scipy.sparse.linalg as sla

    m, n = Y.shape
    if method == "propack":
        # Lanczos basis of max(10 r, r + 60) vectors: scipy's default (10 r) fails to
        # converge for r = 1, 2 on large matrices; ARPACK is the fallback if it still does
        kmax = min(m, n, max(10 * rank, rank + 60))
        try:
            u, s, vt = sla.svds(Y, k=rank, solver="propack", random_state=rng, maxiter=kmax)
        except np.linalg.LinAlgError:
            method = "arpack"
    if method == "arpack":
        u, s, vt = sla.svds(Y, k=rank, solver="arpack", v0=rng.standard_normal(min(m, n)))
    elif method == "randomized":
        u, s, vt = _randomized_svd(Y, rank, rng)
    order = np.argsort(s)[::-1]
    return u[:, order], s[order], vt[order].T


def _lowrank_svd(A: np.ndarray, B: np.ndarray):
    """SVD ``(U, s, V)`` of ``A B^T`` through QR of both factors: O((m + n) k^2)."""
    qa, ra = np.linalg.qr(A)
    qb, rb = np.linalg.qr(B)
    a, s, bt = np.linalg.svd(ra @ rb.T)
    return qa @ a, s, qb @ bt.T


#: Largest ``max |U^T U - I|`` accepted from an iterative SVD before re-orthonormalizing
#: (Lanczos loses orthogonality for singular values near round-off, e.g. data of rank < r).
ORTH_TOL = 1e-12


def _orthonormal_svd(u: np.ndarray, s: np.ndarray, v: np.ndarray):
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


def _randomized_svd(Y: Any, k: int, rng: np.random.Generator, p: int = 10, q: int = 4):
    """Randomized SVD (Halko, Martinsson, Tropp 2011, Alg. 4.4): ``q`` power iterations with
    re-orthonormalization, ``k + p`` columns. O(q |Omega| (k + p) + (m + n) (k + p)^2)."""
    m, n = Y.shape
    ell = min(k + p, m, n)
    Q, _ = np.linalg.qr(Y @ rng.standard_normal((n, ell)))
    for _ in range(q):
        W, _ = np.linalg.qr(Y.T @ Q)
        Q, _ = np.linalg.qr(Y @ W)
    u, s, vt = np.linalg.svd(np.asarray((Y.T @ Q).T), full_matrices=False)
    return Q @ u[:, :k], s[:k], vt[:k]
