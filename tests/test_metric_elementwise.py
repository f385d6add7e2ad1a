"""The elementwise-diagonal metric (rankopt.metrics.ElementwiseDiagonal) and RAdamWElementwise:
finite-difference checks like every other metric (gradient slope 2, Hessian slope 3, wrong
gradients flagged), the operators, and the rule that uses the metric."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_paths_agree
from test_diagnostics import SHAPE, make_cost

import rankopt as ro
from rankopt import diagnostics, metrics, rules


def _metric(M, seed, spread=3.0):
    rng = np.random.default_rng(2000 + seed)
    w = np.exp(rng.uniform(-spread, spread, (M.m, M.n)) / 2)  # weights over e^{+-1.5}
    return metrics.ElementwiseDiagonal(M.backend.asarray(w))


@pytest.mark.parametrize("cost_name", ["quadratic", "quartic", "completion", "lowrank"])
def test_gradient_and_hessian_fd(backend, cost_name, seed):
    M0 = ro.FixedRankManifold(*SHAPE, backend=backend)
    M = M0.with_metric(_metric(M0, seed))
    c = make_cost(M, cost_name, seed)
    g = diagnostics.check_gradient(M, c.cost, c.egrad, seed=seed)
    assert g.ok and abs(g.slope - 2.0) < 0.15, g
    h = diagnostics.check_hessian(M, c.cost, c.egrad, c.ehess, seed=seed)
    assert h.ok and abs(h.slope - 3.0) < 0.25 and h.extra["symmetry"] < 1e-8, h
    bad = make_cost(M, cost_name, seed, wrong="scale")
    b = diagnostics.check_gradient(M, bad.cost, bad.egrad, seed=seed)
    assert not b.ok and abs(b.slope - 1.0) < 0.2, b


def test_operators_and_the_preconditioner_is_not_the_gradient(backend, seed):
    """g is SPD, solve inverts apply, g(a, b) = <a, G b>; the preconditioner alone
    (P_x(D^-1 .)) is not the Riemannian gradient (check_gradient: slope 1)."""
    M0 = ro.FixedRankManifold(*SHAPE, backend=backend)
    met = _metric(M0, seed)
    M = M0.with_metric(met)
    x = M.random_point(seed)
    a, b = M.random_tangent_vector(x, seed + 1), M.random_tangent_vector(x, seed + 2)
    gab, gba = M.inner_product(x, a, b), M.inner_product(x, b, a)
    assert abs(gab - gba) < 1e-10 * max(1.0, abs(gab)) and M.inner_product(x, a, a) > 0
    back = met.solve(M, x, met.apply(M, x, a))
    for u, v in zip(back, a, strict=True):
        u, v = M.backend.to_numpy(u), M.backend.to_numpy(v)
        assert np.linalg.norm(u - v) <= 1e-9 * max(1.0, np.linalg.norm(v))

    class PreconditionOnly(metrics.ElementwiseDiagonal):
        def solve(self, manifold, x, eta):
            return self.precondition(manifold, x, eta)

    Mp = M0.with_metric(PreconditionOnly(met.weights))
    c = make_cost(Mp, "quadratic", seed)
    res = diagnostics.check_gradient(Mp, c.cost, c.egrad, seed=seed)
    assert not res.ok and abs(res.slope - 1.0) < 0.2, res


def test_constant_weights_scale_the_euclidean_gradient():
    M = ro.FixedRankManifold(9, 7, 2)
    x = M.random_point(0)
    Z = np.random.default_rng(1).standard_normal((9, 7))
    Mw = M.with_metric(metrics.ElementwiseDiagonal(np.full((9, 7), 4.0)))
    g, ge = Mw.euclidean_to_riemannian_gradient(x, Z), M.euclidean_to_riemannian_gradient(x, Z)
    for a, b in zip(g, ge, strict=True):
        np.testing.assert_allclose(a, b / 4.0, atol=1e-13)


def test_elementwise_weights_match_the_factored_ones_on_rank_one_statistics():
    """For a second moment v = a b^T (rank one, what the factored metric assumes) the elementwise
    weights sqrt(v + eps^2 mu) equal the Adafactor-factored D_L,i D_R,j up to the eps terms."""
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.5, 2.0, 6), rng.uniform(0.5, 2.0, 5)
    v = np.outer(a, b)
    eps = 1e-6
    D = metrics.elementwise_weights(v, eps, np)
    dl, dr = metrics.adaptive_diagonals(v.mean(1), v.mean(0), eps, "adafactor", np)
    np.testing.assert_allclose(D, np.outer(dl, dr), rtol=1e-9)


def test_radamw_elementwise_rule():
    """RAdamWElementwise: stacked = single steps, its direction is the Riemannian gradient of
    the elementwise metric (FD), and it keeps an m x n second moment."""
    M = ro.FixedRankManifold(12, 10, 3, validate=False)
    spec = rules.RAdamWElementwise(lr=1e-2, cg_tol=1e-13, cg_maxiter=200)
    xs = M.random_point(0, batch_shape=(2,))
    Z = np.random.default_rng(0).standard_normal((2, 12, 10))
    ys, sts = spec.step(M, xs, M.geometry.project(xs, Z), spec.init(M, xs))
    for k in range(2):
        xk = ro.FixedRankPoint(xs.U[k], xs.s[k], xs.V[k])
        y, st = spec.step(M, xk, M.geometry.project(xk, Z[k]), spec.init(M, xk))
        assert_paths_agree(ys.to_dense()[k], y.to_dense(), 1, "point")
        assert_paths_agree(sts.exp_avg_sq[k], st.exp_avg_sq, 1, "exp_avg_sq")
    assert st.exp_avg_sq.shape == (12, 10)
    # the metric the rule builds is FD-consistent
    v = st.exp_avg_sq / (1 - spec.betas[1])
    Mg = M.with_metric(
        metrics.ElementwiseDiagonal(metrics.elementwise_weights(v, spec.metric_eps, np))
    )
    A = np.random.default_rng(3).standard_normal((12, 10))
    res = diagnostics.check_gradient(
        Mg, lambda p: 0.5 * np.sum((p.to_dense() - A) ** 2), lambda p: p.to_dense() - A, y
    )
    assert res.ok and abs(res.slope - 2) < 0.15, res
    with pytest.raises(ValueError, match="cg_maxiter"):
        rules.RAdamWElementwise(cg_maxiter=0)
    with pytest.raises(ValueError, match="weights"):
        metrics.ElementwiseDiagonal()
