"""Tests of rankopt.problems and rankopt.data: derivatives by finite differences, agreement
with dense formulas, generators, kernels, input validation, torch agreement, MovieLens."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import rankopt as ro
from rankopt.diagnostics import check_gradient, check_hessian
from rankopt.problems import (
    MatrixCompletion,
    MatrixSensing,
    Problem,
    low_rank_truth,
    random_completion,
    random_sensing,
)
from rankopt.problems import _kernels as K
from rankopt.problems._kernels.sampling import RESIDUAL, SAMPLE
from rankopt.problems.synthetic import sample_entries

METRICS = {
    "euclidean": lambda: None,
    "preconditioned": lambda: ro.metrics.Preconditioned(core_weight=0.5),
}


def dense(Z):
    """Dense value of an ambient matrix (or a tuple: the sum)."""
    if isinstance(Z, tuple):
        return sum(dense(t) for t in Z)
    if isinstance(Z, (ro.LowRankMatrix, ro.FixedRankPoint)):
        return np.asarray(Z.to_dense())
    if sp.issparse(Z):
        return Z.toarray()
    return np.asarray(Z)


# --------------------------------------------------------------------------- problem zoo
def _completion(wd=0.0):
    return random_completion(30, 40, 3, kappa=10.0, oversampling=3.0, seed=1, weight_decay=wd)


def _sensing_dense(wd=0.0):
    p = random_sensing(8, 9, 2, kappa=10.0, seed=2)
    return MatrixSensing(p.A, p.b, wd, truth=p.truth)


def _sensing_op_dense():
    """Matrix-free operator: forward takes a LowRankMatrix, adjoint returns a dense matrix."""
    p = random_sensing(8, 9, 2, kappa=10.0, k=60, seed=3)
    Af = p.A.reshape(p.k, -1)
    return MatrixSensing.from_operator(
        lambda D: Af @ (D.A @ D.B.T).reshape(-1),
        lambda y: (y @ Af).reshape(8, 9),
        p.b,
        (8, 9),
        truth=p.truth,
    )


def _sensing_op_sparse():
    """Matrix-free sampling operator whose adjoint is a scipy sparse matrix."""
    rng = np.random.default_rng(4)
    m, n, r = 12, 10, 2
    rows, cols = sample_entries(m, n, 80, rng)
    truth = low_rank_truth(m, n, r, 5.0, seed=rng)
    b = np.asarray(truth.to_dense())[rows, cols]
    return MatrixSensing.from_operator(
        lambda D: K.sample_lowrank(D.A, D.B, rows, cols),
        lambda y: sp.csr_matrix((y, (rows, cols)), shape=(m, n)),
        b,
        (m, n),
        truth=truth,
    )


def _generic():
    """f(X) = 1/4 ||X - C||_F^4: not quadratic, dense callables."""
    C = np.random.default_rng(5).standard_normal((7, 6))

    def cost(x):
        E = x.to_dense() - C
        return 0.25 * np.sum(E * E) ** 2

    def egrad(x):
        E = x.to_dense() - C
        return np.sum(E * E) * E

    def ehess(x, D):
        E, Dd = x.to_dense() - C, dense(D)
        return np.sum(E * E) * Dd + 2.0 * np.sum(E * Dd) * E

    return Problem(cost, egrad, ehess, shape=(7, 6))


PROBLEMS = {
    "completion": (_completion, 3),
    "completion_wd": (lambda: _completion(0.3), 3),
    "sensing": (_sensing_dense, 2),
    "sensing_wd": (lambda: _sensing_dense(0.2), 2),
    "sensing_op_dense": (_sensing_op_dense, 2),
    "sensing_op_sparse": (_sensing_op_sparse, 2),
    "generic": (_generic, 2),
}


@pytest.mark.parametrize("metric", sorted(METRICS))
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_gradient_and_hessian_slopes(name, metric):
    make, r = PROBLEMS[name]
    p = make()
    M = p.manifold(r, METRICS[metric]())
    x = M.random_point(seed=7)
    g = check_gradient(M, p.cost, p.egrad, x=x, seed=8)
    assert g.ok and abs(g.slope - 2.0) < 0.2, g
    h = check_hessian(M, p.cost, p.egrad, p.ehess, x=x, seed=9)
    assert h.ok and abs(h.slope - 3.0) < 0.25, h
    assert h.extra["symmetry"] < 1e-10
    # cost_and_egrad agrees with cost and egrad
    f, G = p.cost_and_egrad(x)
    assert f == pytest.approx(p.cost(x), rel=1e-14)
    np.testing.assert_allclose(dense(G), dense(p.egrad(x)), rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------- dense agreement
def _dense_completion_cost(p, X):
    R = X[p.rows, p.cols] - p.vals
    return 0.5 * R @ R + 0.5 * p.weight_decay * np.sum(X * X)


@pytest.mark.parametrize("wd", [0.0, 0.5])
def test_completion_matches_dense_formulas(wd):
    p = _completion(wd)
    M = p.manifold(3)
    x = M.random_point(seed=0)
    X = x.to_dense()
    assert p.cost(x) == pytest.approx(_dense_completion_cost(p, X), rel=1e-13)
    G = np.zeros(p.shape)
    G[p.rows, p.cols] = X[p.rows, p.cols] - p.vals
    G += wd * X
    np.testing.assert_allclose(dense(p.egrad(x)), G, atol=1e-13)
    R = p.egrad(x)
    R = R[0] if isinstance(R, tuple) else R
    assert sp.issparse(R) and R.format == "csr" and R.nnz == p.nnz  # never dense m x n
    D = M.embed(x, M.random_tangent_vector(x, seed=1))
    H = np.zeros(p.shape)
    Dd = D.to_dense()
    H[p.rows, p.cols] = Dd[p.rows, p.cols]
    np.testing.assert_allclose(dense(p.ehess(x, D)), H + wd * Dd, atol=1e-13)
    # the data were sorted row-major and kept; a gradient returned earlier stays valid
    G_old = p.egrad(x)
    G1 = dense(G_old)
    p.cost_and_egrad(M.random_point(seed=3))
    p.cost(M.random_point(seed=4))
    np.testing.assert_array_equal(dense(G_old), G1)


def test_sensing_matches_dense_formulas():
    p = _sensing_dense(0.1)
    M = p.manifold(2)
    x = M.random_point(seed=0)
    X = x.to_dense()
    Af = p.A.reshape(p.k, -1)
    r = Af @ X.ravel() - p.b
    assert p.cost(x) == pytest.approx(0.5 * r @ r + 0.05 * np.sum(X * X), rel=1e-13)
    np.testing.assert_allclose(dense(p.egrad(x)), (r @ Af).reshape(X.shape) + 0.1 * X, atol=1e-12)


def _fit_argmin(f, scale):
    """Minimizer of the parabola through f(-s), f(0), f(s) (exact for a quadratic f)."""
    fm, f0, fp = f(-scale), f(0.0), f(scale)
    a = (fp + fm - 2 * f0) / (2 * scale**2)
    bcoef = (fp - fm) / (2 * scale)
    return -bcoef / (2 * a)


@pytest.mark.parametrize(
    "name", ["completion", "completion_wd", "sensing", "sensing_wd", "sensing_op_sparse"]
)
def test_exact_step_is_the_line_minimizer(name):
    make, r = PROBLEMS[name]
    p = make()
    M = p.manifold(r)
    x = M.random_point(seed=11)
    D = M.embed(x, M.random_tangent_vector(x, seed=12))
    X, Dd = x.to_dense(), D.to_dense()
    if isinstance(p, MatrixCompletion):

        def f(t):
            return _dense_completion_cost(p, X + t * Dd)

    else:

        def f(t):
            Y = X + t * Dd  # as a LowRankMatrix Y I^T, which every forward operator accepts
            r = np.asarray(p.forward(ro.LowRankMatrix(Y, np.eye(Y.shape[1])))) - p.b
            return 0.5 * float(r @ r) + 0.5 * p.weight_decay * float(np.sum(Y * Y))

    p.cost_and_egrad(x)  # primes the cached residual, as a solver does
    t = p.exact_step(x, D)
    assert t == pytest.approx(_fit_argmin(f, 1.0), rel=1e-8)
    # also without the cache, and for the tangent vector itself
    p2 = make()
    assert p2.exact_step(x, D) == pytest.approx(t, rel=1e-12)
    assert f(t) <= min(f(0.99 * t), f(1.01 * t))


def test_exact_step_zero_direction():
    p = _completion()
    M = p.manifold(3)
    x = M.random_point(seed=0)
    Z = ro.LowRankMatrix(np.zeros((30, 1)), np.zeros((40, 1)))
    assert p.exact_step(x, Z) == 0.0


# --------------------------------------------------------------------------- kernels
KERNEL_CASES = [  # (path, index dtype, float dtype); numba specializations compile once each
    ("numpy", np.int32, np.float64),
    ("numpy", np.int64, np.float32),
    ("numba_serial", np.int32, np.float64),
    ("numba_serial", np.int64, np.float64),
    ("numba_serial", np.int32, np.float32),
    ("numba_parallel", np.int32, np.float64),
]


@pytest.mark.parametrize("path, idx_dtype, dtype", KERNEL_CASES)
def test_sample_lowrank_matches_dense(path, idx_dtype, dtype):
    if path != "numpy" and not K.HAVE_NUMBA:
        pytest.skip("numba is not installed (the numba kernel path cannot run)")
    rng = np.random.default_rng(0)
    m, n, k = 50, 70, 6
    A = rng.standard_normal((m, k)).astype(dtype)
    B = np.asfortranarray(rng.standard_normal((n, k))).astype(dtype)  # non-contiguous input
    rows, cols = sample_entries(m, n, 1000, rng)
    rows, cols = rows.astype(idx_dtype), cols.astype(idx_dtype)
    want = (A.astype(np.float64) @ B.astype(np.float64).T)[rows, cols]
    # the kernel source run as plain Python (before compilation) is the reference loop
    ref = SAMPLE.python(A, B, rows[:50], cols[:50], np.empty(50, dtype=dtype))
    np.testing.assert_allclose(ref, want[:50], rtol=1e-5, atol=1e-5)
    kw = {"use_numba": path != "numpy", "parallel": path == "numba_parallel"}
    out = K.sample_lowrank(A, B, rows, cols, **kw)
    tol = 1e-12 if dtype == np.float64 else 1e-4
    assert out.dtype == dtype
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol)
    b = rng.standard_normal(1000).astype(dtype)
    res = np.empty(1000, dtype=dtype)
    ss = K.sampled_residual(A, B, rows, cols, b, res, **kw)
    np.testing.assert_allclose(res, want - b, rtol=tol, atol=tol)
    assert ss == pytest.approx(float(np.sum((want - b) ** 2)), rel=10 * tol)


def test_warmup_compiles_the_serial_kernels():
    if not K.HAVE_NUMBA:
        pytest.skip("numba is not installed (nothing to warm up)")
    assert ro.problems.warmup_kernels(parallel=False) >= 0.0
    sample, residual = SAMPLE(False), RESIDUAL(False)
    assert len(sample.signatures) >= 2 and len(residual.signatures) >= 2  # int32 and int64


def test_sample_lowrank_bad_shapes():
    A, B = np.ones((3, 2)), np.ones((4, 3))
    with pytest.raises(ValueError, match="A \\(m, k\\) and B \\(n, k\\)"):
        K.sample_lowrank(A, B, np.arange(2), np.arange(2))
    with pytest.raises(ValueError, match="equal length"):
        K.sample_lowrank(A, np.ones((4, 2)), np.arange(2), np.arange(3))


# --------------------------------------------------------------------------- generators
@pytest.mark.parametrize("spectrum", ["geometric", "linear"])
def test_random_completion_sizes_kappa_rank(spectrum):
    m, n, r, kappa, os_ = 60, 50, 4, 100.0, 2.5
    p = random_completion(m, n, r, kappa, os_, spectrum, seed=3)
    assert p.nnz == round(os_ * r * (m + n - r))
    lin = p.rows.astype(np.int64) * n + p.cols
    assert np.unique(lin).size == p.nnz and np.all(np.diff(lin) > 0)  # distinct, CSR order
    X = p.truth.to_dense()
    sv = np.linalg.svd(X, compute_uv=False)
    assert np.linalg.matrix_rank(X) == r
    assert sv[0] / sv[r - 1] == pytest.approx(kappa, rel=1e-10)
    want = (
        np.geomspace(1, 1 / kappa, r) if spectrum == "geometric" else np.linspace(1, 1 / kappa, r)
    )
    np.testing.assert_allclose(sv[:r], want, rtol=1e-12)
    np.testing.assert_allclose(p.vals, X[p.rows, p.cols], atol=1e-14)
    # relative_error against a dense computation
    x = p.manifold(r).random_point(seed=1)
    want_err = np.linalg.norm(x.to_dense() - X) / np.linalg.norm(X)
    assert p.relative_error(x) == pytest.approx(want_err, rel=1e-10)
    assert p.relative_error(p.truth) < 1e-15


def test_random_completion_same_seed_same_problem():
    a, b = random_completion(20, 20, 2, seed=5), random_completion(20, 20, 2, seed=5)
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.cols, b.cols)
    np.testing.assert_array_equal(a.vals, b.vals)
    np.testing.assert_array_equal(a.truth.to_dense(), b.truth.to_dense())
    c = random_completion(20, 20, 2, seed=6)  # and another seed gives another problem
    assert not (np.array_equal(a.rows, c.rows) and np.array_equal(a.cols, c.cols))
    assert not np.allclose(a.truth.to_dense(), c.truth.to_dense())


def test_sample_entries_huge_matrix_without_dense_array():
    # 1e5 x 1e5 has 1e10 positions (80 GB as float64): the sampler must not touch them all
    rows, cols = sample_entries(100_000, 100_000, 200_000, seed=0)
    lin = rows * 100_000 + cols
    assert lin.size == 200_000 and np.unique(lin).size == 200_000
    assert rows.max() < 100_000 and cols.max() < 100_000
    # roughly uniform: each half of the rows gets about half the samples
    assert abs(np.mean(rows < 50_000) - 0.5) < 0.01


def test_random_sensing_defaults():
    m, n, r = 10, 8, 2
    p = random_sensing(m, n, r, kappa=50.0, seed=0)
    assert p.k == 5 * r * (m + n - r) and p.A.shape == (p.k, m, n)
    sv = np.linalg.svd(p.truth.to_dense(), compute_uv=False)
    assert sv[0] / sv[r - 1] == pytest.approx(50.0, rel=1e-10)
    np.testing.assert_allclose(p.b, p.A.reshape(p.k, -1) @ p.truth.to_dense().ravel(), atol=1e-13)
    assert p.cost(p.truth) < 1e-28


# --------------------------------------------------------------------------- spectral init
def test_completion_spectral_init_is_top_svd():
    p = random_completion(40, 30, 3, kappa=2.0, seed=6)
    m, n = p.shape
    Y = np.zeros((m, n))
    Y[p.rows, p.cols] = p.vals * (m * n / p.nnz)
    u, s, vt = np.linalg.svd(Y)
    Yr = (u[:, :3] * s[:3]) @ vt[:3]
    for method in ("propack", "arpack"):
        x = p.spectral_init(3, seed=0, method=method, trim=None)
        np.testing.assert_allclose(x.s, s[:3], rtol=1e-10)
        np.testing.assert_allclose(x.to_dense(), Yr, atol=1e-10)
        assert np.all(np.diff(x.s) <= 0)
    x = p.spectral_init(3, seed=0, method="randomized", trim=None)
    np.testing.assert_allclose(x.s, s[:3], rtol=1e-3)
    with pytest.raises(ValueError, match="unknown method"):
        p.spectral_init(3, method="qr")
    # a huge trim caps nothing
    np.testing.assert_allclose(p.spectral_init(3, seed=0, trim=1e9).s, s[:3], rtol=1e-10)


def test_completion_spectral_init_trim_matches_dense_formula():
    """Rows, then columns, scaled so that no norm exceeds trim x the median norm (the factors
    come from the untrimmed norms of rows and of columns)."""
    p = random_completion(50, 40, 3, seed=7)
    m, n = p.shape
    Y = np.zeros((m, n))
    Y[p.rows, p.cols] = p.vals * (m * n / p.nnz)
    Y[3] *= 10.0  # a heavy row and a heavy column
    Y[:, 5] *= 10.0
    q = MatrixCompletion(p.rows, p.cols, Y[p.rows, p.cols] * p.nnz / (m * n), (m, n))
    rn, cn = np.linalg.norm(Y, axis=1), np.linalg.norm(Y, axis=0)
    fr = np.minimum(1, 1.5 * np.median(rn[rn > 0]) / rn)
    fc = np.minimum(1, 1.5 * np.median(cn[cn > 0]) / cn)
    Yt = Y * fr[:, None] * fc[None, :]
    assert fr[3] < 0.5 and fc[5] < 0.5
    u, s, vt = np.linalg.svd(Yt)
    x = q.spectral_init(3, seed=0, trim=1.5, weighting="uniform")
    np.testing.assert_allclose(x.to_dense(), (u[:, :3] * s[:3]) @ vt[:3], atol=1e-10)
    with pytest.raises(ValueError, match="trim"):
        q.spectral_init(3, trim=0.0)


@pytest.mark.parametrize("rank", [1, 2])
def test_completion_spectral_init_small_rank_large_matrix(rank):
    # scipy's default PROPACK basis (10 r vectors) does not converge here for r = 1, 2
    p = random_completion(3000, 3000, 2, seed=0)
    x = p.spectral_init(rank, seed=0)
    y = p.spectral_init(rank, seed=0, method="arpack")
    np.testing.assert_allclose(x.s, y.s, rtol=1e-8)


def test_sensing_spectral_init_is_scaled_top_svd():
    p = random_sensing(12, 10, 2, kappa=3.0, seed=1)
    x = p.spectral_init(2)
    Y = (p.b @ p.A.reshape(p.k, -1)).reshape(p.shape)
    u, s, vt = np.linalg.svd(Y)
    assert np.allclose(x.U @ x.U.T, u[:, :2] @ u[:, :2].T, atol=1e-10)
    # the scale is the exact line search along the ray: perturbing it increases the cost
    f0 = p.cost(x)
    assert f0 < p.cost(ro.FixedRankPoint(x.U, 1.01 * x.s, x.V))
    assert f0 < p.cost(ro.FixedRankPoint(x.U, 0.99 * x.s, x.V))
    unscaled = ro.FixedRankPoint(u[:, :2], s[:2], vt[:2].T)
    assert f0 <= p.cost(unscaled)
    assert p.relative_error(x) < 1.0
    xs = _sensing_op_sparse().spectral_init(2)  # sparse adjoint branch
    assert xs.s.shape == (2,) and np.all(xs.s > 0)


# --------------------------------------------------------------------------- protocol
def test_protocol_attributes():
    p = _completion()
    assert p.least_squares and p.has_hessian and p.backend == "numpy" and p.shape == (30, 40)
    M = p.manifold(3, ro.metrics.Preconditioned(core_weight=0.5))
    assert (M.m, M.n, M.r) == (30, 40, 3) and isinstance(M.metric, ro.metrics.BlockScaled)
    g = _generic()
    assert not g.least_squares and g.has_hessian
    x = g.manifold(2).random_point(seed=0)
    assert g.exact_step(x, x.to_lowrank()) is None
    assert g.spectral_init(2) is None and g.relative_error(x) is None
    h = Problem(g.cost, g.egrad, shape=(7, 6))
    assert not h.has_hessian
    with pytest.raises(NotImplementedError, match="no Hessian"):
        h.ehess(x, x.to_lowrank())


# --------------------------------------------------------------------------- bad input
def test_completion_rejects_bad_input():
    r, c, v = np.array([0, 1, 2]), np.array([0, 1, 2]), np.array([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="duplicate observed entries: position \\(1, 1\\)"):
        MatrixCompletion(np.array([0, 1, 1]), np.array([0, 1, 1]), v, (3, 3))
    with pytest.raises(ValueError, match="rows out of range"):
        MatrixCompletion(np.array([0, 1, 3]), c, v, (3, 3))
    with pytest.raises(ValueError, match="cols out of range"):
        MatrixCompletion(r, np.array([0, -1, 2]), v, (3, 3))
    with pytest.raises(ValueError, match="finite"):
        MatrixCompletion(r, c, np.array([1.0, np.nan, 3.0]), (3, 3))
    with pytest.raises(ValueError, match="same length"):
        MatrixCompletion(r, c[:2], v, (3, 3))
    with pytest.raises(ValueError, match="integers"):
        MatrixCompletion(r.astype(float), c, v, (3, 3))
    with pytest.raises(ValueError, match="at least one observed entry"):
        MatrixCompletion(r[:0], c[:0], v[:0], (3, 3))
    with pytest.raises(ValueError, match="weight_decay"):
        MatrixCompletion(r, c, v, (3, 3), weight_decay=-1.0)
    with pytest.raises(ValueError, match="shape"):
        MatrixCompletion(r, c, v, (3, 0))
    p = MatrixCompletion(r, c, v, (3, 3))
    x = p.manifold(1).random_point(seed=0)
    with pytest.raises(ValueError, match="shape"):
        p.ehess(x, ro.LowRankMatrix(np.ones((4, 1)), np.ones((3, 1))))
    with pytest.raises(ValueError, match="rank must be"):
        p.spectral_init(5)


def test_sensing_and_generators_reject_bad_input():
    with pytest.raises(ValueError, match="\\(k, m, n\\)"):
        MatrixSensing(np.ones((3, 4)), np.ones(3))
    with pytest.raises(ValueError, match="b must be a 1-D"):
        MatrixSensing(np.ones((3, 4, 5)), np.ones((3, 1)))
    with pytest.raises(ValueError, match="non-finite"):
        MatrixSensing(np.full((3, 4, 5), np.inf), np.ones(3))
    # a b of the wrong length fails at construction, naming both lengths
    with pytest.raises(ValueError, match="b has 2 measurements but A holds k = 3"):
        MatrixSensing(np.ones((3, 4, 5)), np.ones(2))
    with pytest.raises(ValueError, match="b has 4 measurements but the forward operator"):
        MatrixSensing.from_operator(
            lambda D: np.zeros(3), lambda y: np.zeros((4, 5)), np.ones(4), (4, 5)
        )
    # a forward operator that changes its output length later still fails clearly
    calls = []

    def fickle(D):
        calls.append(1)
        return np.zeros(3 if len(calls) == 1 else 2)

    p = MatrixSensing.from_operator(fickle, lambda y: np.zeros((4, 5)), np.ones(3), (4, 5))
    with pytest.raises(ValueError, match="forward operator returned shape"):
        p.cost(p.manifold(1).random_point(seed=0))
    with pytest.raises(ValueError, match="callables"):
        MatrixSensing.from_operator(None, None, np.ones(2), (3, 3))
    with pytest.raises(ValueError, match="kappa"):
        random_completion(10, 10, 2, kappa=0.5)
    with pytest.raises(ValueError, match="asks for"):
        random_completion(10, 10, 2, oversampling=100.0)
    with pytest.raises(ValueError, match="spectrum"):
        low_rank_truth(10, 10, 2, spectrum="cubic")
    with pytest.raises(ValueError, match="exceeds"):
        random_sensing(3, 4, 5)
    with pytest.raises(ValueError, match="callable cost"):
        Problem(None, lambda x: x, shape=(2, 2))
    with pytest.raises(ValueError, match="shape"):
        Problem(lambda x: 0.0, lambda x: x)


# --------------------------------------------------------------------------- torch backend
def test_torch_completion_matches_numpy():
    torch = pytest.importorskip("torch", reason="torch backend test needs PyTorch")
    for wd in (0.0, 0.25):
        pn = random_completion(30, 40, 3, kappa=10.0, seed=1, weight_decay=wd)
        pt = random_completion(30, 40, 3, kappa=10.0, seed=1, weight_decay=wd, backend="torch")
        assert pt.backend == "torch" and isinstance(pt.vals, torch.Tensor)
        Mn, Mt = pn.manifold(3), pt.manifold(3)
        xn = Mn.random_point(seed=4)
        xt = Mt.random_point(seed=4)
        fn, Gn = pn.cost_and_egrad(xn)
        ft, Gt = pt.cost_and_egrad(xt)
        assert ft == pytest.approx(fn, rel=1e-12)

        def tdense(Z):
            if isinstance(Z, tuple):
                return sum(tdense(t) for t in Z)
            if isinstance(Z, ro.LowRankMatrix):
                return (Z.A @ Z.B.T).numpy()
            return Z.to_dense().numpy()

        np.testing.assert_allclose(tdense(Gt), dense(Gn), atol=1e-10, rtol=0)
        gn, gt = Mn.projection(xn, Gn), Mt.projection(xt, Gt)
        for a, b in zip(gn, gt, strict=True):
            np.testing.assert_allclose(b.numpy(), a, atol=1e-10)
        Dn = Mn.embed(xn, Mn.random_tangent_vector(xn, seed=5))
        Dt = Mt.embed(xt, Mt.random_tangent_vector(xt, seed=5))
        np.testing.assert_allclose(tdense(pt.ehess(xt, Dt)), dense(pn.ehess(xn, Dn)), atol=1e-10)
        assert pt.exact_step(xt, Dt) == pytest.approx(pn.exact_step(xn, Dn), rel=1e-10)
        assert pt.relative_error(xt) == pytest.approx(pn.relative_error(xn), rel=1e-12)
        x0 = pt.spectral_init(3, seed=0)
        assert isinstance(x0.U, torch.Tensor)
        assert check_gradient(Mt, pt.cost, pt.egrad, x=xt, seed=1).ok


def test_torch_sensing_matches_numpy():
    torch = pytest.importorskip("torch", reason="torch backend test needs PyTorch")
    pn = random_sensing(8, 9, 2, kappa=10.0, seed=2)
    pt = random_sensing(8, 9, 2, kappa=10.0, seed=2, backend="torch")
    assert isinstance(pt.A, torch.Tensor) and pt.backend == "torch"
    Mn, Mt = pn.manifold(2), pt.manifold(2)
    xn, xt = Mn.random_point(seed=1), Mt.random_point(seed=1)
    assert pt.cost(xt) == pytest.approx(pn.cost(xn), rel=1e-12)
    np.testing.assert_allclose(pt.egrad(xt).numpy(), pn.egrad(xn), atol=1e-12)
    Dn = Mn.embed(xn, Mn.random_tangent_vector(xn, seed=3))
    Dt = Mt.embed(xt, Mt.random_tangent_vector(xt, seed=3))
    assert pt.exact_step(xt, Dt) == pytest.approx(pn.exact_step(xn, Dn), rel=1e-10)
    assert pt.relative_error(pt.spectral_init(2)) == pytest.approx(
        pn.relative_error(pn.spectral_init(2)), rel=1e-10
    )


# --------------------------------------------------------------------------- data
def test_train_test_split():
    from rankopt.data import train_test_split

    rows, cols = np.arange(1000) // 10, np.arange(1000) % 10
    vals = np.arange(1000, dtype=float)
    (r1, c1, v1), (r2, c2, v2) = train_test_split(rows, cols, vals, 0.1, seed=0)
    assert len(v2) == 100 and len(v1) == 900
    assert set(v1.tolist()).isdisjoint(v2.tolist()) and len(set(v1) | set(v2)) == 1000
    np.testing.assert_array_equal(r2 * 10 + c2, v2)  # rows stay aligned with their values
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(rows, cols, vals, 1.5)


def test_movielens100k():
    import importlib.util

    if importlib.util.find_spec("recbole") is None:
        pytest.skip("recbole is not installed (pip install --no-deps recbole)")
    from rankopt.data import movielens100k

    users, items, ratings, shape = movielens100k()
    assert shape == (943, 1682)
    assert len(users) == len(items) == len(ratings) == 100_000
    assert np.unique(users).size == 943 and users.min() == 0 and users.max() == 942
    assert np.unique(items).size == 1682 and items.min() == 0 and items.max() == 1681
    assert set(np.unique(ratings).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert np.unique(users * 1682 + items).size == 100_000  # no duplicate ratings
    p = MatrixCompletion(users, items, ratings, shape)
    assert p.nnz == 100_000


def test_movielens_example_beats_bias_baseline(tmp_path):
    import importlib.util
    import pathlib

    if importlib.util.find_spec("recbole") is None:
        pytest.skip("recbole is not installed (pip install --no-deps recbole)")
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "movielens.py"
    spec = importlib.util.spec_from_file_location("movielens_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "movielens.png").stat().st_size > 10_000
    assert out["bias_test"] < 0.95  # the bias-only baseline is sane
    assert out["chosen_test"] < out["bias_test"] - 0.01  # the low-rank part helps on test data


# --------------------------------------------------------------------------- non-uniform sampling
def test_powerlaw_sampling_is_distinct_skewed_and_seeded():
    from rankopt.problems.synthetic import powerlaw_weights, sample_entries_weighted

    rng = np.random.default_rng(0)
    w = powerlaw_weights(500, 0.5, rng)
    assert w.sum() == pytest.approx(1.0) and w.max() / w.min() == pytest.approx(np.sqrt(500))
    p = random_completion(400, 300, 4, oversampling=3, seed=1, sampling="powerlaw")
    q = random_completion(400, 300, 4, oversampling=3, seed=1, sampling="powerlaw")
    np.testing.assert_array_equal(p.rows, q.rows)
    np.testing.assert_array_equal(p.cols, q.cols)
    lin = np.asarray(p.rows, dtype=np.int64) * 300 + np.asarray(p.cols)
    assert np.unique(lin).size == p.nnz == round(3 * 4 * (700 - 4))
    rc, cc = p.observation_counts()
    assert rc.max() > 6 * np.median(rc) and cc.max() > 6 * np.median(cc)  # heavy tails
    assert p.sampling_dispersion() > 0.5
    u = random_completion(400, 300, 4, oversampling=3, seed=1)
    assert u.sampling_dispersion() < 0.3
    with pytest.raises(ValueError, match="could not draw"):  # weights on too few positions
        sample_entries_weighted(10, 10, 50, np.eye(10)[0], np.full(10, 0.1), 0)
    with pytest.raises(ValueError, match="sampling must be"):
        random_completion(20, 20, 2, sampling="zipf")
    with pytest.raises(ValueError, match="exponent"):
        random_completion(20, 20, 2, sampling="powerlaw", exponent=-1.0)


def test_degree_weighted_start_beats_uniform_on_powerlaw():
    p = random_completion(600, 500, 6, oversampling=3, seed=2, sampling="powerlaw")
    e_deg = p.relative_error(p.spectral_init(6, seed=0, weighting="degree"))
    e_uni = p.relative_error(p.spectral_init(6, seed=0, weighting="uniform"))
    assert e_deg < 0.85 * e_uni and e_deg < 1.0  # the uniform start is worse than zero here
    # "auto" picks the degree weighting for dispersed counts, the uniform one otherwise
    x_auto = p.spectral_init(6, seed=0)
    assert p.relative_error(x_auto) == pytest.approx(e_deg)
    u = random_completion(300, 300, 3, oversampling=3, seed=2)
    assert u.relative_error(u.spectral_init(3, seed=0)) == pytest.approx(
        u.relative_error(u.spectral_init(3, seed=0, weighting="uniform"))
    )
    with pytest.raises(ValueError, match="weighting"):
        p.spectral_init(2, weighting="ipw")


@pytest.mark.timeout(120)
def test_powerlaw_completion_is_recovered():
    """Issue 12, non-uniform sampling, at a smaller size: kappa = 100, exact data."""
    p = random_completion(400, 400, 6, kappa=100.0, oversampling=3, seed=0, sampling="powerlaw")
    assert p.underdetermined(6)[0].size == 0 and p.underdetermined(6)[1].size == 0
    res = ro.solve(p, 6, seed=0)
    assert res.converged and p.relative_error(res.point) <= 1e-6


def test_powerlaw_underdetermined_rows_are_reported():
    p = random_completion(300, 300, 5, oversampling=2, seed=0, sampling="powerlaw", exponent=1.2)
    rows, cols = p.underdetermined(5)
    assert rows.size + cols.size > 0
    with pytest.warns(ro.solvers.noise.UnderdeterminedWarning, match="fewer than rank=5"):
        res = ro.solve(p, 5, max_iter=5, check_rank=False)
    np.testing.assert_array_equal(res.info["underdetermined_rows"], rows)
