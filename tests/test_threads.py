"""One switch for threads: ``solve(..., threads=N)`` runs BLAS and the completion kernels (the
parallel numba twins) on N threads, and reproduces the serial result to rounding.

The rounding bound: two summation orders of ``s = sum_k a_k`` (k terms, unit roundoff u)
differ by at most ``2 gamma_k sum_k |a_k|``, ``gamma_k = k u / (1 - k u)`` (Higham, Accuracy
and Stability of Numerical Algorithms, 2002, eq. 4.4). The threaded kernels split the same
terms into chunks (one per thread) and add the partial sums, so every output they produce must
lie within that bound of the serial one, with ``sum |a_k|`` formed from the absolute values of
the same terms.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import rankopt as ro
from rankopt.problems import MatrixCompletion, kernel_threads, random_completion
from rankopt.problems import _gauss_newton as gauss_newton
from rankopt.problems._kernels import blocked

numba = pytest.importorskip("numba")
TWO = pytest.mark.skipif(
    numba.config.NUMBA_NUM_THREADS < 2, reason="numba allows one thread only here"
)
U_ROUND = np.finfo(np.float64).eps / 2


def gamma(k: int) -> float:
    """Higham's ``gamma_k = k u / (1 - k u)``."""
    return k * U_ROUND / (1 - k * U_ROUND)


def copy(p: MatrixCompletion, parallel: bool | None, **kw) -> MatrixCompletion:
    return MatrixCompletion(
        p.rows, p.cols, p.vals, p.shape, p.weight_decay, truth=p.truth, parallel=parallel, **kw
    )


@TWO
@pytest.mark.filterwarnings("ignore::rankopt.solvers.ConvergenceWarning")
def test_threads_switch_covers_blas_and_kernels():
    from threadpoolctl import threadpool_info

    p = copy(random_completion(80, 60, 3, oversampling=4, seed=0), None)
    forced = copy(p, False)
    seen = []

    def cb(info):
        blas = [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]
        seen.append((blas, numba.get_num_threads(), p.parallel, forced.parallel))
        return False

    before = numba.get_num_threads()
    ro.solve(p, 3, method="rgn", max_iter=2, callback=cb, threads=2)
    assert seen and all(b == [2] * len(b) and t == 2 and par and not f for b, t, par, f in seen)
    assert numba.get_num_threads() == before and not p.parallel  # restored after the call
    seen.clear()
    ro.solve(p, 3, method="rgn", max_iter=2, callback=cb)  # the default: one thread, serial
    assert seen and all(b == [1] * len(b) and not par for b, _, par, _ in seen)
    with kernel_threads(2) as got:
        assert got == 2 and p.parallel and numba.get_num_threads() == 2
        with kernel_threads(1):
            assert not p.parallel
        assert p.parallel
    assert not p.parallel
    with pytest.raises(ValueError, match="positive integer"):
        with kernel_threads(0):
            pass


def _abs_operator(p: MatrixCompletion, x, v) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(|W| |V|, |W|^T |U|, |w|)`` for ``W = P_Omega(D_v)`` with every product taken in
    absolute value: the ``sum |a_k|`` of the operator's sums (the projections after them are
    BLAS calls of the same thread count, so they do not differ)."""
    A = np.hstack([x.U @ v.M + v.Up, x.U])
    B = np.hstack([x.V, v.Vp])
    rows, cols = np.asarray(p.rows), np.asarray(p.cols)
    w = np.einsum("ij,ij->i", np.abs(A[rows]), np.abs(B[cols]))
    W = sp.csr_matrix((w, (rows, cols)), shape=p.shape)
    return W @ np.abs(x.V), W.T @ np.abs(x.U), w


@TWO
@pytest.mark.parametrize("path", ["csr", "fused", "blocked"])
def test_kernels_match_serial_within_rounding(path, monkeypatch):
    if path != "csr":
        monkeypatch.setattr(gauss_newton, "FUSE_MIN_BYTES", 0)
    if path == "blocked":
        monkeypatch.setattr(blocked, "BLOCK_BYTES", 8 * 8 * 7)  # 7 columns per block, k = 8
    p = random_completion(300, 250, 4, oversampling=4, seed=3)
    M = p.manifold(4)
    x = M.random_point(seed=1)
    v = M.random_tangent_vector(x, seed=2)
    out = {}
    for threads in (1, 2):
        q = copy(p, None, preconditioner="block")
        with kernel_threads(threads):
            f, Z = q.cost_and_egrad(x)
            op = q.gn_operator(M, x)(v)
            pre = q.gn_preconditioner(M, x)(v)
        out[threads] = (f, Z.data.copy(), op, pre)
    (f1, z1, op1, pre1), (f2, z2, op2, pre2) = out[1], out[2]
    nnz, r = p.nnz, x.rank
    # cost: 1/2 sum of nnz squares, all terms >= 0
    assert abs(f2 - f1) <= 2 * gamma(nnz) * f1
    # gradient values: one dot product of length r per entry (minus b), per entry
    rows, cols = np.asarray(p.rows), np.asarray(p.cols)
    A = np.abs(x.U * x.s)[rows]
    dots = np.einsum("ij,ij->i", A, np.abs(x.V)[cols]) + np.abs(np.asarray(p.vals))
    assert np.all(np.abs(z2 - z1) <= 2 * gamma(r + 1) * dots)
    # Gauss-Newton operator: entry sums over a row (column) of W, each term a product
    # of an r-term dot product; M = U^T (W V) then carries the bound through U^T
    ZV_abs, ZtU_abs, _ = _abs_operator(p, x, v)
    k = int(max(np.bincount(np.asarray(p.rows)).max(), np.bincount(np.asarray(p.cols)).max()))
    bound_u = 2 * gamma(k + 2 * r) * ZV_abs
    bound_v = 2 * gamma(k + 2 * r) * ZtU_abs
    bound_m = np.abs(x.U).T @ bound_u
    assert np.all(np.abs(op2.M - op1.M) <= bound_m + 1e-300)
    # Up = W V - U M, Vp = W^T U - V M^T (the same BLAS on both sides)
    assert np.all(np.abs(op2.Up - op1.Up) <= bound_u + np.abs(x.U) @ bound_m + 1e-300)
    assert np.all(np.abs(op2.Vp - op1.Vp) <= bound_v + np.abs(x.V) @ bound_m.T + 1e-300)
    # block preconditioner: per-row Gram inverses and products, each row on one thread
    # (float32 blocks: the same arithmetic in both twins, equal up to its rounding)
    for a, b in zip(pre1, pre2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12 * np.abs(a).max())


@TWO
@pytest.mark.parametrize("kappa", [1.0, 1e2])
def test_solve_with_two_threads_reproduces_the_serial_result(kappa):
    """Same iterations, stop and phase, and the final point within the rounding bound of one
    evaluation, ``2 gamma_N ||X||`` (N observations: the longest sum a threaded kernel
    splits; 3e-11 here; measured 4e-16). At kappa = 1 (phase 1 converges) every iterate's
    cost is within ``2 gamma_N f_0`` too. At kappa = 100 the iterates of the abandoned first
    phase are not: its last inner CG solves run on an ill-conditioned system and amplify
    the rounding (costs 0.3% apart after its third iteration, measured); the rank-adaptive
    phase that gives the result agrees again to 1e-15 relative."""
    p = random_completion(800, 600, 4, kappa=kappa, oversampling=3, seed=0)
    res = {}
    for threads in (1, 2):
        q = copy(p, None, preconditioner="block")
        res[threads] = ro.solve(q, 4, seed=0, threads=threads, noise=0)
    a, b = res[1], res[2]
    assert a.iterations == b.iterations and a.stop_reason == b.stop_reason
    assert a.info["phase"] == b.info["phase"] and a.rank == b.rank == 4
    tol = 2 * gamma(p.nnz)
    if kappa == 1.0:
        assert a.info["phase"] == 1
        ca, cb = np.asarray(a.history.cost), np.asarray(b.history.cost)
        assert np.all(np.abs(ca - cb) <= tol * ca[0])
    Xa, Xb = a.point.to_dense(), b.point.to_dense()
    assert np.linalg.norm(Xa - Xb) <= tol * np.linalg.norm(Xa)
    assert p.relative_error(a.point) <= 1e-9 and p.relative_error(b.point) <= 1e-9
