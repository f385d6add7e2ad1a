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

Its parts live beside it: the entries' validation and CSR layout in
:mod:`~rankopt.problems._observations`, the kernels in :mod:`~rankopt.problems._kernels`, the
Gauss-Newton operator in :mod:`~rankopt.problems._gauss_newton`, its preconditioners in
:mod:`~rankopt.problems._preconditioners`, the spectral start in
:mod:`~rankopt.problems._spectral` (SVDs: :mod:`~rankopt.problems._svd`). Their constants that
lived here are re-exported (read-only: set them on their own module).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._backend import as_rng, backend_name_of, make_backend
from ..containers import FixedRankPoint, LowRankMatrix
from . import _observations as obs
from . import _spectral as spectral
from ._gauss_newton import FUSE_MIN_BYTES as FUSE_MIN_BYTES
from ._gauss_newton import gauss_newton_operator
from ._kernels import (
    HAVE_NUMBA,
    PatternCSR,
    blocked,
    resolve_parallel,
    sample_lowrank,
    sampled_residual,
)
from ._preconditioners import BLOCK_MIN_NNZ as BLOCK_MIN_NNZ
from ._preconditioners import BLOCK_REUSE as BLOCK_REUSE
from ._preconditioners import BlockJacobi, DiagonalPreconditioner, check_kind, resolve_kind
from ._spectral import DISPERSED as DISPERSED
from ._spectral import TRIM as TRIM
from ._spectral import sp_csr as sp_csr
from ._svd import ORTH_TOL as ORTH_TOL
from .base import Problem, check_weight_decay, lowrank_inner, lowrank_sq_norm

# ``X as X`` above: names of this module before its parts moved out, kept importable from here
__all__ = ["MatrixCompletion"]


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
        operator, the block preconditioner and the spectral start's products. ``None`` (the
        default): follow the run, i.e. ``rankopt.solve(..., threads=N)`` (threaded on ``N``
        numba threads when ``N >= 2``; serial with the default ``threads=1``, see
        :func:`rankopt.problems.kernel_threads`); ``True`` / ``False`` force it either way.
        Threads help on an idle multi-core machine and can hurt badly on a loaded one
        (:func:`rankopt.problems._kernels.sample_lowrank`).
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
        r_h, c_h, v_h = obs.host_entries(rows, cols, vals)
        if dtype is None and v_h.dtype == np.float32:
            dtype = "float32"
        super().__init__(shape=shape, backend=backend, dtype=dtype, device=device, truth=truth)
        m, n = self.shape
        r_h = obs.check_indices(r_h, m, "rows")
        c_h = obs.check_indices(c_h, n, "cols")
        v_h = obs.check_values(v_h)
        self.weight_decay = check_weight_decay(weight_decay)
        self._parallel = parallel
        self.preconditioner = check_kind(preconditioner)
        self.rows, self.cols, self.indptr, self.vals = obs.csr_layout(
            self._be, r_h, c_h, v_h, self.shape
        )
        self.nnz = int(len(v_h))
        self._csr = PatternCSR(self.backend, self.cols, self.indptr, self.shape)
        self._scratch = self._be.zeros((self.nnz,))  # P_Omega(D) in exact_step (never returned)
        # filled on first use
        self._last: tuple[FixedRankPoint, Any, float] | None = None  # point, residual, ||res||^2
        self._counts_host: tuple[np.ndarray, np.ndarray] | None = None
        self._blocked: blocked.BlockedPattern | None = None
        self._block_jacobi: BlockJacobi | None = None
        self._diagonal: DiagonalPreconditioner | None = None

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
    @property
    def parallel(self) -> bool:
        """Whether the kernels run threaded now: the ``parallel`` option, or for ``None`` the
        enclosing ``threads=`` setting (:func:`rankopt.problems.kernel_threads`)."""
        return resolve_parallel(self._parallel)

    def _sample(self, A: Any, B: Any, out: Any) -> Any:
        return sample_lowrank(A, B, self.rows, self.cols, out, parallel=self.parallel)

    def _residual(self, x: FixedRankPoint, out: Any) -> float:
        """``out = P_Omega(X) - b`` in place; returns ``||out||^2``. O(|Omega| r)."""
        return sampled_residual(
            x.U * x.s[None, :], x.V, self.rows, self.cols, self.vals, out, parallel=self.parallel
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
        r, c = obs.positions(self._be, rows, cols, self.shape)
        return sample_lowrank(x.U * x.s[None, :], x.V, r, c, parallel=self.parallel)

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
        R = self._csr(res)  # P_Omega^*(R): a CSR matrix sharing the fixed pattern
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
        return self.backend == "numpy" and HAVE_NUMBA

    def gn_preconditioner(self, manifold: Any, x: FixedRankPoint) -> Any:
        r"""An SPD approximation of the inverse Gauss-Newton operator, for preconditioned CG.

        The inverses of the r x r blocks of the operator on the rows of ``Up`` and ``Vp``
        (:mod:`rankopt.problems._preconditioners`), by the ``preconditioner`` option:

        * ``"block"`` (block-Jacobi, :class:`~rankopt.problems._preconditioners.BlockJacobi`):
          the exact blocks (numba; O(|Omega| r^2 + (m + n) r^3) per set-up, reused while the
          subspaces move little). Measured at 30000 x 30000, rank 10, oversampling 3: 38 CG
          iterations in total instead of 69 (same 7 Gauss-Newton iterations); worth its set-up
          from a few hundred thousand observations on;
        * ``"diagonal"``
          (:class:`~rankopt.problems._preconditioners.DiagonalPreconditioner`): the blocks
          approximated from the row and column counts, O((m + n) r^2) a call, any backend.
          11-15% fewer CG iterations than none at oversampling 2-5.

        Returns a callable(TangentVector) -> TangentVector.
        """
        kind = resolve_kind(self.preconditioner, self.nnz, self._numba_fast_path())
        if kind == "block":
            if self._block_jacobi is None:
                self._block_jacobi = BlockJacobi(
                    self.rows,
                    self.cols,
                    self.indptr,
                    self.shape,
                    self.nnz,
                    self.weight_decay,
                    self._parallel,
                )
            return self._block_jacobi.at(x)
        if self._diagonal is None:
            rc, cc = self.observation_counts()
            self._diagonal = DiagonalPreconditioner(rc, cc, self.nnz, self.weight_decay, self._be)
        return self._diagonal.at(x)

    def _blocked_pattern(self, k: int) -> blocked.BlockedPattern | None:
        """The column-block copy of Omega (:class:`~rankopt.problems._kernels.BlockedPattern`)
        when the rows of a rank-k factor over all columns exceed two blocks of
        ``BLOCK_BYTES``; None otherwise (they stay in cache anyway). Built once, on first use,
        with the block width of that first rank (any width is correct; it is only speed):
        O(|Omega|) time, two index arrays of |Omega| entries."""
        m, n = self.shape
        width = max(1, blocked.BLOCK_BYTES // (8 * k))
        if self._blocked is None and n > 2 * width:
            self._blocked = blocked.BlockedPattern(self.rows, self.cols, n, width)
        return self._blocked

    def gn_operator(self, manifold: Any, x: FixedRankPoint) -> Any:
        r"""The Gauss-Newton operator ``v -> P_x P_Omega(D_v) + lam v`` on the tangent space at
        ``x`` (``D_v`` the embedding of ``v``), or None where the generic path is as good.

        NumPy with numba: one pass over Omega per application, in column-block order for large
        n (:meth:`_blocked_pattern`), threaded when ``parallel``
        (:func:`~rankopt.problems._gauss_newton.gauss_newton_operator`), O(|Omega| r +
        (m + n) r^2). Other backends: None (the solver uses ``ehess`` and the manifold's
        projection).
        """
        if not self._numba_fast_path():
            return None
        blocked_pattern = self._blocked_pattern(2 * x.rank)
        return gauss_newton_operator(
            x,
            self.rows,
            self.cols,
            self.indptr,
            self.shape,
            self.weight_decay,
            self.parallel,
            blocked_pattern,
        )

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
        return spectral.dispersion(*self.observation_counts())

    def spectral_init(
        self,
        rank: int,
        seed: Any = None,
        method: str = "propack",
        weighting: str = "auto",
        trim: float | None = TRIM,
    ) -> FixedRankPoint:
        r"""A spectral start: the top-``rank`` SVD of a rescaled ``P_Omega^*(b)``, as a point.

        The choices and their measurements are described in :mod:`rankopt.problems._spectral`.

        Parameters
        ----------
        rank : int
        seed : int, Generator or None
            Seeds the start vector of the iterative SVD (deterministic for a fixed seed).
        method : {"propack", "arpack", "randomized"}
            ``scipy.sparse.linalg.svds`` with PROPACK (default; ARPACK as its fallback if the
            Lanczos process does not converge; exact to working precision and the fastest
            measured), ARPACK, or the randomized SVD of Halko, Martinsson & Tropp (2011) with
            10 oversampling columns and 4 power iterations
            (:func:`~rankopt.problems._svd.randomized_svd`). Each costs O(|Omega| r) per
            product with the sparse matrix.
        weighting : {"auto", "uniform", "degree"}
            ``"uniform"``: ``H_r((m n / |Omega|) P_Omega^*(b))``, the unbiased estimate under
            uniform sampling. ``"degree"``, for non-uniform sampling: with ``D_r``, ``D_c``
            the row and column counts, ``X0 = |Omega| D_r^{-1/2} H_r(D_r^{-1/2} P_Omega^*(b)
            D_c^{-1/2}) D_c^{-1/2}``, scaled by the exact line search along ``t X0``.
            ``"auto"``: ``"degree"`` when :meth:`sampling_dispersion` exceeds ``DISPERSED``
            (0.5), else ``"uniform"``.
        trim : float or None
            Cap the norm of every row and column of the rescaled data matrix at ``trim`` times
            the median (nonzero) row / column norm before the SVD (default 2; None: off).
            O(|Omega|).

        Raises
        ------
        ValueError
            If ``rank`` is out of range, or the data have rank < ``rank`` (a zero singular
            value would leave the manifold).
        """
        return self._spectral_point(rank, seed, method, weighting, trim, fallback=True)

    def spectral_init_if_separated(self, rank: int, seed: Any = None) -> FixedRankPoint | None:
        r"""The spectral start (:meth:`spectral_init`, its defaults) when its top ``rank``
        singular values are separated from the rest, else None.

        Separated means: PROPACK's Lanczos process converges for them within its basis of
        ``max(10 r, r + 60)`` vectors. It does not when the r-th singular value of the data
        matrix sits in a cluster with the next ones, i.e. in the bulk of the sampling noise:
        then the data do not determine a rank-r subspace, and Gauss-Newton from such a start
        fails (:class:`~rankopt.solvers.Auto` goes straight to its rank-adaptive phase).
        Measured at rank 10, three seeds: at 4000 x 4000 separated for every kappa = 1 case
        (oversampling 1.5-5, uniform and power-law sampling), not separated for 43 of the 48
        uniform cases with kappa 3-1e4 (all of those at oversampling <= 2), where Gauss-Newton
        from the spectral start failed in every case tried; at 1000 x 1000 (a basis of 10% of
        n) always separated. The failed attempt costs less than ``spectral_init``, which then
        runs ARPACK (at 1e5 x 1e5, kappa 100: 27 s in all).
        """
        try:
            return self._spectral_point(rank, seed, "propack", "auto", TRIM, fallback=False)
        except np.linalg.LinAlgError:
            return None

    def _spectral_point(
        self,
        rank: int,
        seed: Any,
        method: str,
        weighting: str,
        trim: float | None,
        fallback: bool,
    ) -> FixedRankPoint:
        """:meth:`spectral_init`'s work; ``fallback=False`` raises PROPACK's ``LinAlgError``."""
        spectral.check_spectral_args(rank, self.shape, method, weighting)
        if weighting == "auto":
            weighting = "degree" if self.sampling_dispersion() > spectral.DISPERSED else "uniform"
        rank = int(rank)
        be = self._be
        cols, indptr = be.to_numpy(self.cols), be.to_numpy(self.indptr)
        counts = self.observation_counts() if weighting == "degree" else None
        vals = be.to_numpy(self.vals).astype(np.float64)
        vals = spectral.weighted_values(vals, cols, self.shape, self.nnz, weighting, counts)
        if trim is not None:
            vals = spectral.trim_values(vals, cols, indptr, self.shape, float(trim))
        bp = self._blocked_pattern(2 * rank) if self._numba_fast_path() else None
        if bp is not None and method == "propack":  # Lanczos products in column-block order
            Y = bp.operator(
                bp.reorder(np.ascontiguousarray(vals)), self.shape[0], parallel=self.parallel
            )
        else:
            Y = spectral.sp_csr(vals, cols, indptr, self.shape)
        U, s, V = spectral.spectral_factors(
            Y, rank, as_rng(seed), method, self.nnz, counts, fallback
        )
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
