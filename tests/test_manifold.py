"""FixedRankManifold: projection, embedding, inner product, retraction, transport, metrics.

Every identity is checked against a dense float64 reference formula on small matrices, for
each backend (numpy, torch; cupy when available), dtype (float32 with looser tolerances,
float64) and several seeds.
"""

from __future__ import annotations

import numpy as np
import pytest

import rankopt as ro
from rankopt import diagnostics

# (m, n, r): tall, wide, and full rank r = min(m, n)
SHAPES = [(7, 5, 3), (4, 9, 2), (6, 4, 4)]


@pytest.fixture(params=SHAPES, ids=lambda s: "x".join(map(str, s)))
def shape(request):
    return request.param


def _manifold(shape, backend, dtype, **kw) -> ro.FixedRankManifold:
    m, n, r = shape
    return ro.FixedRankManifold(m, n, r, backend=backend, dtype=dtype, **kw)


def _assert_tangent(h, x, xi, dtype):
    bound = 1e-5 if dtype == "float32" else 1e-13
    assert h.tangency_error(x, xi) < bound


def _assert_on_manifold(h, M, y, dtype):
    """Orthonormal factors, positive descending s, correct shapes and dtype."""
    tol = 1e-5 if dtype == "float32" else 1e-13
    U, s, V = h.to_numpy(y.U), h.to_numpy(y.s), h.to_numpy(y.V)
    assert U.shape == (M.m, M.r) and V.shape == (M.n, M.r) and s.shape == (M.r,)
    assert np.abs(U.T @ U - np.eye(M.r)).max() < tol
    assert np.abs(V.T @ V - np.eye(M.r)).max() < tol
    assert np.all(s > 0)
    assert np.all(np.diff(s) <= 0)
    assert y.U.dtype == M.backend.dtype and y.s.dtype == M.backend.dtype
    M.check_point(y)  # the library's own validation agrees


# --------------------------------------------------------------------------- projection


def test_projection_dense_matches_formula(h, backend, dtype, seed, shape, rtol):
    M = _manifold(shape, backend, dtype)
    x = M.random_point(seed)
    Zn = np.random.default_rng(seed + 10).standard_normal((M.m, M.n))
    xi = M.projection(x, M.backend.asarray(Zn))
    assert isinstance(xi, ro.TangentVector)
    assert xi.Up.dtype == M.backend.dtype
    assert h.rel(h.tangent_dense(M, x, xi), h.dense_projection(x, Zn)) < rtol
    _assert_tangent(h, x, xi, dtype)


@pytest.mark.parametrize("fmt", ["csr", "coo"])
def test_projection_sparse_matches_formula(h, backend, dtype, seed, shape, rtol, fmt):
    M = _manifold(shape, backend, dtype)
    x = M.random_point(seed)
    Zn = h.random_sparse_dense(np.random.default_rng(seed + 20), M.m, M.n)
    Z = h.sparse(M, Zn, fmt)
    assert M.backend.is_sparse(Z)
    xi = M.projection(x, Z)
    assert h.rel(h.tangent_dense(M, x, xi), h.dense_projection(x, Zn)) < rtol
    _assert_tangent(h, x, xi, dtype)


@pytest.mark.parametrize("k", [1, 4])
def test_projection_lowrank_matches_formula(h, backend, dtype, seed, shape, rtol, k):
    M = _manifold(shape, backend, dtype)
    x = M.random_point(seed)
    rng = np.random.default_rng(seed + 30)
    A, B = rng.standard_normal((M.m, k)), rng.standard_normal((M.n, k))
    Z = ro.LowRankMatrix(M.backend.asarray(A), M.backend.asarray(B))
    xi = M.projection(x, Z)
    assert h.rel(h.tangent_dense(M, x, xi), h.dense_projection(x, A @ B.T)) < rtol
    _assert_tangent(h, x, xi, dtype)


def test_projection_of_point_is_point(h, backend, dtype, seed, rtol):
    """X itself lies in its tangent space: P_X(X) = X (a FixedRankPoint is a valid ambient input)."""
    M = _manifold((7, 5, 3), backend, dtype)
    x = M.random_point(seed)
    xi = M.projection(x, x)
    assert h.rel(h.tangent_dense(M, x, xi), h.to_numpy(x)) < rtol
    assert h.rel(xi.M, np.diag(h.to_numpy(x.s))) < rtol


def test_projection_of_ambient_sum(h, backend, dtype, seed, rtol):
    """A tuple of ambient terms (dense, sparse, factored) projects to the sum of projections."""
    M = _manifold((7, 5, 3), backend, dtype)
    x = M.random_point(seed)
    rng = np.random.default_rng(seed + 60)
    D = rng.standard_normal((7, 5))
    S = h.random_sparse_dense(rng, 7, 5)
    A, B = rng.standard_normal((7, 2)), rng.standard_normal((5, 2))
    be = M.backend
    Z = (be.asarray(D), h.sparse(M, S, "csr"), ro.LowRankMatrix(be.asarray(A), be.asarray(B)))
    xi = M.projection(x, Z)
    assert h.rel(h.tangent_dense(M, x, xi), h.dense_projection(x, D + S + A @ B.T)) < rtol


def test_projection_idempotent(h, backend, dtype, seed, shape, rtol):
    M = _manifold(shape, backend, dtype)
    x = M.random_point(seed)
    Zn = np.random.default_rng(seed + 40).standard_normal((M.m, M.n))
    xi = M.projection(x, M.backend.asarray(Zn))
    again_lr = M.projection(x, M.embed(x, xi))  # factored input
    again_dense = M.projection(x, M.backend.asarray(h.tangent_dense(M, x, xi)))  # dense input
    for again in (again_lr, again_dense):
        for a, b in zip(again, xi, strict=True):
            assert h.rel(a, b) < rtol
    # the residual Z - P(Z) is orthogonal to the tangent space
    resid = Zn - h.tangent_dense(M, x, xi)
    assert h.rel(M.projection(x, M.backend.asarray(resid)).Up, 0 * Zn[:, : M.r]) < 10 * rtol


def test_full_rank_projection_is_identity(h, backend, dtype, seed, rtol):
    """For r = min(m, n) the tangent space is the whole ambient space."""
    M = _manifold((6, 4, 4), backend, dtype)
    x = M.random_point(seed)
    Zn = np.random.default_rng(seed).standard_normal((6, 4))
    xi = M.projection(x, M.backend.asarray(Zn))
    assert h.rel(h.tangent_dense(M, x, xi), Zn) < rtol
    assert M.dim == 6 * 4


# ------------------------------------------------------------- embed / dense / inner


def test_embed_and_to_dense_consistent(h, backend, dtype, seed, shape, rtol):
    M = _manifold(shape, backend, dtype)
    x = M.random_point(seed)
    xi = M.random_tangent_vector(x, seed + 1)
    E = M.embed(x, xi)
    assert isinstance(E, ro.LowRankMatrix)
    assert E.shape == (M.m, M.n) and E.rank_bound == 2 * M.r
    assert h.rel(E.to_dense(), h.tangent_dense(M, x, xi)) < rtol
    U, s, V = h.to_numpy(x.U), h.to_numpy(x.s), h.to_numpy(x.V)
    assert h.rel(M.to_dense(x), (U * s) @ V.T) < rtol
    assert h.rel(x.to_lowrank().to_dense(), M.to_dense(x)) < rtol
    # from_matrix recovers the point from its dense form
    y = M.from_matrix(M.to_dense(x))
    assert h.rel(M.to_dense(y), M.to_dense(x)) < 10 * rtol
    # ... and from its factored form
    y2 = M.from_matrix(x.to_lowrank())
    assert h.rel(M.to_dense(y2), M.to_dense(x)) < 10 * rtol


def test_inner_product_is_frobenius(h, backend, dtype, seed, shape, rtol):
    M = _manifold(shape, backend, dtype)
    x = M.random_point(seed)
    xi, eta = M.random_tangent_vector(x, seed + 1), M.random_tangent_vector(x, seed + 2)
    A, B = h.tangent_dense(M, x, xi), h.tangent_dense(M, x, eta)
    ip = M.inner_product(x, xi, eta)
    assert isinstance(ip, float)
    assert abs(ip - float(np.sum(A * B))) < rtol * 10
    assert abs(M.norm(x, xi) - np.linalg.norm(A)) < rtol * 10
    assert abs(M.norm(x, xi) - 1.0) < rtol * 10  # random tangent vectors have unit norm
    # LowRankMatrix Frobenius norm agrees with the dense one
    assert abs(M.embed(x, xi).fro_norm() - np.linalg.norm(A)) < rtol * 10


def test_zero_vector_and_dim(h, backend, dtype, shape):
    M = _manifold(shape, backend, dtype)
    m, n, r = shape
    x = M.random_point(0)
    z = M.zero_vector(x)
    assert M.norm(x, z) == 0.0
    assert np.all(h.tangent_dense(M, x, z) == 0)
    assert M.dim == (m + n - r) * r


def test_random_point_reproducible(h, backend, dtype, seed):
    M = _manifold((7, 5, 3), backend, dtype)
    a, b = M.random_point(seed), M.random_point(np.random.default_rng(seed))
    for fa, fb in zip((a.U, a.s, a.V), (b.U, b.s, b.V), strict=True):
        assert np.array_equal(h.to_numpy(fa), h.to_numpy(fb))
    c = M.random_point(seed + 100)
    assert not np.allclose(h.to_numpy(a.U), h.to_numpy(c.U))
    _assert_on_manifold(h, M, a, dtype)


# --------------------------------------------------------------------------- retraction


@pytest.mark.parametrize("t", [0.05, 0.5, 1.0])
def test_retraction_is_best_rank_r_approximation(h, backend, dtype, seed, shape, t):
    M = _manifold(shape, backend, dtype)
    x = M.random_point(seed)
    xi = M.random_tangent_vector(x, seed + 1) * t
    y = M.retraction(x, xi)
    _assert_on_manifold(h, M, y, dtype)
    S = h.to_numpy(x) + h.tangent_dense(M, x, xi)
    u, sv, vt = np.linalg.svd(S)
    r = M.r
    best = (u[:, :r] * sv[:r]) @ vt[:r]
    gap = (sv[r - 1] - (sv[r] if r < len(sv) else 0.0)) / sv[0]
    assert gap > 1e-3  # the best approximation is unique here
    unit = 1e-6 if dtype == "float32" else 1e-14
    assert h.rel(y, best) < 100 * unit / gap
    assert np.allclose(h.to_numpy(y.s), sv[:r], rtol=100 * unit / gap, atol=0)


def _slope_tol(dtype):
    return 0.4 if dtype == "float32" else 0.2


def _assert_second_order(res, dtype):
    tan = res.extra["tangential"]
    assert np.isfinite(res.slope) and np.isfinite(tan.slope), res  # a window was found
    tol = _slope_tol(dtype)
    assert abs(res.slope - 2.0) < tol, res
    assert tan.slope > 3.0 - tol, res
    assert res.ok
    assert res.extra["orthonormality"] < (1e-5 if dtype == "float32" else 1e-13)


def test_check_retraction_second_order(backend, dtype, seed, shape):
    M = _manifold(shape, backend, dtype)
    res = diagnostics.check_retraction(M, seed=seed, slope_tol=_slope_tol(dtype))
    if M.r == min(M.m, M.n):
        # full rank: the manifold is open in R^{m x n} and R_x(t xi) = X + t xi exactly
        unit = 1e-6 if dtype == "float32" else 1e-15
        assert res.ok and np.all(res.errors < 100 * unit * 10), res
        return
    _assert_second_order(res, dtype)


@pytest.mark.parametrize("s_kind", ["equal", "tiny-equal"])
def test_retraction_equal_and_tiny_singular_values(h, backend, dtype, seed, s_kind):
    """All-equal s (no 1/(s_i^2 - s_j^2) anywhere) and all s = 1e-8 (t is scaled by s_min)."""
    M = _manifold((7, 5, 3), backend, dtype)
    x0 = M.random_point(seed)
    value = 1.0 if s_kind == "equal" else 1e-8
    x = ro.FixedRankPoint(x0.U, M.backend.asarray(np.full(3, value)), x0.V)
    M.check_point(x)
    xi = M.random_tangent_vector(x, seed + 1)
    res = diagnostics.check_retraction(M, x, xi, slope_tol=_slope_tol(dtype))
    _assert_second_order(res, dtype)
    # a finite step of size ~ s_min stays on the manifold and is the truncated SVD
    y = M.retraction(x, xi * (0.3 * value))
    _assert_on_manifold(h, M, y, dtype)
    S = h.to_numpy(x) + h.tangent_dense(M, x, xi * (0.3 * value))
    u, sv, vt = np.linalg.svd(S)
    unit = 1e-6 if dtype == "float32" else 1e-14
    gap = (sv[2] - sv[3]) / sv[0]
    assert h.rel(h.to_numpy(y) / value, (u[:, :3] * sv[:3]) @ vt[:3] / value) < 100 * unit / gap


def test_retraction_mixed_tiny_singular_values(h, backend, seed):
    """s = (1, 1e-4, 1e-8) in float64: still second order, orthonormal, nothing blows up."""
    M = _manifold((7, 5, 3), backend, "float64")
    x0 = M.random_point(seed)
    x = ro.FixedRankPoint(x0.U, M.backend.asarray(np.array([1.0, 1e-4, 1e-8])), x0.V)
    xi = M.random_tangent_vector(x, seed + 1)
    res = diagnostics.check_retraction(M, x, xi)
    _assert_second_order(res, "float64")
    y = M.retraction(x, xi * 1e-9)
    _assert_on_manifold(h, M, y, "float64")


def test_retraction_zero_step_is_identity(h, backend, dtype, seed, rtol):
    M = _manifold((7, 5, 3), backend, dtype)
    x = M.random_point(seed)
    y = M.retraction(x, M.zero_vector(x))
    assert h.rel(y, x) < rtol
    _assert_on_manifold(h, M, y, dtype)


# --------------------------------------------------------------------------- transport


def test_transport_lands_in_new_tangent_space(h, backend, dtype, seed, shape, rtol):
    M = _manifold(shape, backend, dtype)
    x = M.random_point(seed)
    y = M.retraction(x, M.random_tangent_vector(x, seed + 1) * 0.5)
    xi = M.random_tangent_vector(x, seed + 2)
    zeta = M.transport(x, y, xi)
    _assert_tangent(h, y, zeta, dtype)
    # it is the orthogonal projection of the ambient xi onto T_y
    assert (
        h.rel(h.tangent_dense(M, y, zeta), h.dense_projection(y, h.tangent_dense(M, x, xi))) < rtol
    )
    # projection never increases the (Euclidean) norm
    assert M.norm(y, zeta) <= M.norm(x, xi) * (1 + rtol)


def test_transport_to_same_point_is_identity(h, backend, dtype, seed, shape, rtol):
    M = _manifold(shape, backend, dtype)
    x = M.random_point(seed)
    xi = M.random_tangent_vector(x, seed + 1)
    zeta = M.transport(x, x, xi)
    for a, b in zip(zeta, xi, strict=True):
        assert h.rel(a, b) < rtol


# --------------------------------------------------------------------------- metrics


def test_metric_operators(h, backend, dtype, seed, metric_name, rtol):
    """g is symmetric positive definite, solve inverts apply, and g(a, b) = <a, G b>."""
    M0 = _manifold((7, 5, 3), backend, dtype)
    M = M0.with_metric(h.metric_zoo(M0, seed)[metric_name])
    x = M.random_point(seed)
    a, b = M.random_tangent_vector(x, seed + 1), M.random_tangent_vector(x, seed + 2)
    gab, gba = M.inner_product(x, a, b), M.inner_product(x, b, a)
    assert abs(gab - gba) < 10 * rtol * max(1.0, abs(gab))
    assert M.inner_product(x, a, a) > 0
    Ga = M.metric.apply(M, x, a)
    _assert_tangent(h, x, Ga, dtype)
    assert abs(M0.inner_product(x, b, Ga) - gab) < 10 * rtol * max(1.0, abs(gab))
    back = M.metric.solve(M, x, Ga)
    for u, v in zip(back, a, strict=True):
        assert h.rel(u, v) < (1e-3 if dtype == "float32" else 1e-9)


def test_riemannian_gradient_defining_identity(h, backend, dtype, seed, metric_name):
    """g_x(grad f, eta) = <egrad, eta>_F for every tangent eta, under every metric."""
    M0 = _manifold((7, 5, 3), backend, dtype)
    M = M0.with_metric(h.metric_zoo(M0, seed)[metric_name])
    x = M.random_point(seed)
    Zn = np.random.default_rng(seed + 7).standard_normal((7, 5))
    g = M.euclidean_to_riemannian_gradient(x, M.backend.asarray(Zn))
    _assert_tangent(h, x, g, dtype)
    for k in range(3):
        eta = M.random_tangent_vector(x, seed + 20 + k)
        lhs = M.inner_product(x, g, eta)
        rhs = float(np.sum(Zn * h.tangent_dense(M, x, eta)))
        assert abs(lhs - rhs) < (1e-4 if dtype == "float32" else 1e-9) * max(1.0, abs(rhs))
