"""Property tests (hypothesis) over shapes and ranks: m, n in [1, 12], r in [1, min(m, n)].

Edge cases r = 1 and r = min(m, n) (where the tangent space is the whole ambient space) are
always included as explicit examples. NumPy backend, float64.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import rankopt as ro

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def shapes(draw):
    m = draw(st.integers(1, 12))
    n = draw(st.integers(1, 12))
    r = draw(st.integers(1, min(m, n)))
    seed = draw(st.integers(0, 2**32 - 1))
    return m, n, r, seed


def _tangent_dense(x, xi):
    return x.U @ xi.M @ x.V.T + xi.Up @ x.V.T + x.U @ xi.Vp.T


@SETTINGS
@given(shapes())
@example((1, 1, 1, 0))
@example((12, 12, 12, 1))
@example((12, 3, 3, 2))
@example((1, 12, 1, 3))
@example((12, 11, 1, 4))
def test_projection_idempotent_and_tangent(case):
    m, n, r, seed = case
    M = ro.FixedRankManifold(m, n, r)
    rng = np.random.default_rng(seed)
    x = M.random_point(rng)
    Z = rng.standard_normal((m, n))
    xi = M.projection(x, Z)
    P = _tangent_dense(x, xi)
    scale = max(1.0, np.abs(Z).max())
    assert np.abs(x.U.T @ xi.Up).max() < 1e-12 * scale
    assert np.abs(x.V.T @ xi.Vp).max() < 1e-12 * scale
    PP = _tangent_dense(x, M.projection(x, P))
    assert np.abs(PP - P).max() < 1e-12 * scale
    # P is the orthogonal projector: <Z - P(Z), P(Z)> = 0
    assert abs(np.sum((Z - P) * P)) < 1e-11 * scale**2 * m * n
    if r == min(m, n):
        assert np.abs(P - Z).max() < 1e-12 * scale


@SETTINGS
@given(shapes(), st.floats(1e-3, 10.0))
@example((1, 1, 1, 0), 1.0)
@example((12, 12, 12, 1), 5.0)
@example((7, 12, 1, 2), 0.1)
def test_retraction_stays_on_manifold(case, t):
    m, n, r, seed = case
    M = ro.FixedRankManifold(m, n, r)
    rng = np.random.default_rng(seed)
    x = M.random_point(rng)
    xi = M.random_tangent_vector(x, rng) * t
    y = M.retraction(x, xi)
    assert y.U.shape == (m, r) and y.V.shape == (n, r) and y.s.shape == (r,)
    assert np.abs(y.U.T @ y.U - np.eye(r)).max() < 1e-12
    assert np.abs(y.V.T @ y.V - np.eye(r)).max() < 1e-12
    assert np.all(np.diff(y.s) <= 0) and np.all(np.isfinite(y.s))
    # s >= 0 always; s > 0 unless X + xi itself has rank < r (only possible for huge steps)
    assert np.all(y.s >= 0)
    sv = np.linalg.svd(x.to_dense() + _tangent_dense(x, xi), compute_uv=False)
    assert np.allclose(y.s, sv[:r], rtol=1e-10, atol=1e-12 * sv[0])


@SETTINGS
@given(shapes())
@example((1, 1, 1, 0))
@example((12, 12, 12, 0))
@example((12, 1, 1, 0))
@example((9, 6, 3, 0))
def test_dim_is_rank_of_projection(case):
    """The projection, as a linear map on R^{m x n}, is an orthogonal projector (P^2 = P,
    P^T = P) whose rank and trace equal ``M.dim``; it kills the normal space
    ``(I - UU^T) R^{m x n} (I - VV^T)`` (of dimension (m - r)(n - r), so ``dim`` is what is
    left of m n) and fixes tangent vectors built from random ``(M, Up, Vp)``."""
    m, n, r, seed = case
    M = ro.FixedRankManifold(m, n, r)
    x = M.random_point(seed)
    cols = []
    for k in range(m * n):
        E = np.zeros(m * n)
        E[k] = 1.0
        cols.append(_tangent_dense(x, M.projection(x, E.reshape(m, n))).ravel())
    P = np.array(cols).T
    np.testing.assert_allclose(P @ P, P, atol=1e-12)
    np.testing.assert_allclose(P, P.T, atol=1e-12)
    assert np.linalg.matrix_rank(P, tol=1e-8) == M.dim
    assert abs(np.trace(P) - M.dim) < 1e-9
    assert M.dim == m * n - (m - r) * (n - r)
    rng = np.random.default_rng(seed)
    U, V = x.U, x.V
    N = (np.eye(m) - U @ U.T) @ rng.standard_normal((m, n)) @ (np.eye(n) - V @ V.T)
    np.testing.assert_allclose(P @ N.ravel(), 0.0, atol=1e-12)
    Mc, Up, Vp = (
        rng.standard_normal((r, r)),
        rng.standard_normal((m, r)),
        rng.standard_normal((n, r)),
    )
    Up, Vp = Up - U @ (U.T @ Up), Vp - V @ (V.T @ Vp)
    T = U @ Mc @ V.T + Up @ V.T + U @ Vp.T
    np.testing.assert_allclose(P @ T.ravel(), T.ravel(), atol=1e-12)
