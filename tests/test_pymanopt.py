"""rankopt as a Pymanopt manifold: Pymanopt's own diagnostics and optimizers on rankopt.

NumPy >= 2.4 shim: Pymanopt 2.2.1's ``check_directional_derivative`` calls
``pymanopt.tools.diagnostics.identify_linear_piece``, which stores the 1-element ``residuals``
array of ``np.polyfit`` into a float slot and raises "setting an array element with a
sequence" under NumPy >= 2.4. The ``pymanopt_slope`` fixture below replaces that helper (for
the duration of one test, with ``monkeypatch``) by :func:`_linear_piece`, our own
implementation of the same idea (best least-squares line over sliding windows) with one
addition: windows lying entirely below the round-off level of the cost are skipped, since an
exactly flat floor would otherwise win with slope 0 (observed on both backends). Everything
else in the check (steps, Taylor models, calls into the manifold) is Pymanopt's code.
``test_linear_piece_shim`` shows the original fails here (or, on older NumPy, that both agree).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

pymanopt = pytest.importorskip(
    "pymanopt", reason="pymanopt is optional: pip install -e '.[pymanopt]'"
)

import pymanopt.tools.diagnostics as pm_diagnostics  # noqa: E402
from numpy.lib.stride_tricks import sliding_window_view  # noqa: E402
from pymanopt.manifolds import FixedRankEmbedded  # noqa: E402
from pymanopt.optimizers import ConjugateGradient, SteepestDescent, TrustRegions  # noqa: E402

import rankopt as ro  # noqa: E402
from rankopt.pymanopt import (  # noqa: E402
    FixedRank,
    factor_gradient,
    from_factor_functions,
    function,
    to_pymanopt,
)

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["numpy", "torch"]
METRICS = ["euclidean", "core-weight", "row-col-weights", "adagrad", "adam"]  # conftest zoo


# ----------------------------------------------------------------------------- shim
def _linear_piece(x, y, window_length, floor=-np.inf):
    """Most linear run of ``window_length + 1`` consecutive points of the curve (x, y).

    A least-squares line is fitted on every window (closed form from window means); the
    window with the smallest residual norm wins. Returns its indices and the line as
    ``[slope, intercept]`` (the contract of Pymanopt's ``identify_linear_piece``).

    One deliberate addition: windows whose ``y`` all lie at or below ``floor`` are skipped
    (unless no other window exists). The fixture passes the round-off level of the cost,
    ``log10(100 eps |f(x)|)`` (the floor ``rankopt.diagnostics`` uses too): below it the
    error is rounding of ``f``, which can be exactly constant over many steps (seen on both
    backends), and a perfectly flat window has zero residual and would win with slope 0.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    X, Y = sliding_window_view(x, window_length + 1), sliding_window_view(y, window_length + 1)
    xc = X - X.mean(axis=1, keepdims=True)
    yc = Y - Y.mean(axis=1, keepdims=True)
    slope = np.sum(xc * yc, axis=1) / np.sum(xc * xc, axis=1)
    resid = np.sqrt(np.sum((yc - slope[:, None] * xc) ** 2, axis=1))
    below = Y.max(axis=1) <= floor
    if not below.all():
        resid = np.where(below, np.inf, resid)
    k = int(np.argmin(resid))
    intercept = Y[k].mean() - slope[k] * X[k].mean()
    return np.arange(k, k + window_length + 1), np.array([slope[k], intercept])


@pytest.fixture
def pymanopt_slope(monkeypatch):
    """Slope of Pymanopt's ``check_directional_derivative`` (with the NumPy >= 2.4 shim)."""

    def slope(problem, x, d, quadratic=False):
        floor = np.log10(100 * np.finfo(float).eps * abs(problem.cost(x)) + np.finfo(float).eps)
        monkeypatch.setattr(
            pm_diagnostics, "identify_linear_piece", functools.partial(_linear_piece, floor=floor)
        )
        h, err, segment, poly = pm_diagnostics.check_directional_derivative(
            problem, x, d, use_quadratic_model=quadratic
        )
        assert np.all(np.isfinite(err))
        return float(poly[0])

    return slope


def test_linear_piece_shim():
    rng = np.random.default_rng(0)
    x = np.linspace(-8, 0, 51)
    y = 2.0 * x - 4.0 + 1e-3 * rng.standard_normal(51)
    seg_y, poly_y = _linear_piece(x, y, 10)
    assert abs(poly_y[0] - 2.0) < 1e-2 and abs(poly_y[1] + 4.0) < 5e-2
    # an exactly constant round-off floor (zero residual) wins unless the floor is given
    y_flat = np.maximum(3.0 * x - 1.0, -13.5)
    assert _linear_piece(x, y_flat, 10)[1][0] == 0.0
    seg, poly = _linear_piece(x, y_flat, 10, floor=-13.0)
    assert abs(poly[0] - 3.0) < 1e-12 and x[seg[0]] >= -12.5 / 3.0
    if tuple(int(v) for v in np.__version__.split(".")[:2]) >= (2, 4):
        with pytest.raises(ValueError, match="sequence"):
            pm_diagnostics.identify_linear_piece(x, y, 10)
    else:  # the original works: without a floor both must agree
        seg0, poly0 = pm_diagnostics.identify_linear_piece(x, y, 10)
        np.testing.assert_array_equal(seg_y, seg0)
        np.testing.assert_allclose(poly_y, poly0, rtol=1e-10)


# ------------------------------------------------------------------------- problems
class Completion:
    """``f(X) = 1/2 sum_Omega (X_ij - A_ij)^2`` for a rank-r ``A``; sparse gradient and Hessian."""

    def __init__(self, m=40, n=30, r=3, oversampling=4.0, seed=0):
        rng = np.random.default_rng(seed)
        self.m, self.n, self.r = m, n, r
        self.truth = rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) / np.sqrt(r)
        k = int(oversampling * r * (m + n - r))
        idx = np.sort(rng.choice(m * n, size=k, replace=False))
        self.rows, self.cols = idx // n, idx % n
        self.vals = self.truth[self.rows, self.cols]

    def problem(self, pm, decorator=None):
        be = pm.manifold.backend
        vals = be.asarray(self.vals)
        if be.name == "torch":
            import torch

            ri, ci = torch.as_tensor(self.rows), torch.as_tensor(self.cols)

            def sparse(v):
                return torch.sparse_coo_tensor(
                    torch.stack([ri, ci]), v, (self.m, self.n), check_invariants=False
                )
        else:
            ri, ci = self.rows, self.cols

            def sparse(v):
                return sp.csr_matrix((v, (ri, ci)), shape=(self.m, self.n))

        def sample(x):  # X at Omega, O(|Omega| r)
            return ((x.U[ri] * x.s[None, :]) * x.V[ci]).sum(axis=1)

        dec = (decorator or function)(pm)

        @dec
        def cost(x):
            res = sample(x) - vals
            return 0.5 * (res * res).sum()

        @dec
        def egrad(x):
            return sparse(sample(x) - vals)

        @dec
        def ehess(x, D):  # D: LowRankMatrix from pm.embedding
            return sparse((D.A[ri] * D.B[ci]).sum(axis=1))

        return pymanopt.Problem(pm, cost, euclidean_gradient=egrad, euclidean_hessian=ehess)


def dense_problem(pm, seed=3):
    """``f(X) = 1/4 ||X X^T - B||^2 + <P Q^T, X>``: dense term plus a low-rank linear term.

    The Euclidean gradient is returned as a sum ``((X X^T - B) X, LowRankMatrix(P, Q))``.
    """
    be, (m, n) = pm.manifold.backend, (pm.manifold.m, pm.manifold.n)
    rng = np.random.default_rng(seed)
    B0 = rng.standard_normal((m, m))
    B = be.asarray(B0 + B0.T)
    P, Q = be.asarray(rng.standard_normal((m, 2))), be.asarray(rng.standard_normal((n, 2)))

    @function(pm)
    def cost(x):
        X = x.to_dense()
        E = X @ X.T - B
        return 0.25 * (E * E).sum() + (P * (X @ Q)).sum()

    @function(pm)
    def egrad(x):
        X = x.to_dense()
        return ((X @ X.T - B) @ X, ro.LowRankMatrix(P, Q))

    @function(pm)
    def ehess(x, D):
        X, Dd = x.to_dense(), D.to_dense()
        return (Dd @ X.T + X @ Dd.T) @ X + (X @ X.T - B) @ Dd

    return pymanopt.Problem(pm, cost, euclidean_gradient=egrad, euclidean_hessian=ehess)


def make_metric(h, name, backend, m, n):
    """A metric of the shared zoo (conftest ``metric_zoo``) with arrays of ``backend``."""
    return h.metric_zoo(ro.FixedRankManifold(m, n, 1, backend=backend))[name]


def quiet(cls, **kw):
    return cls(verbosity=0, **kw)


# ---------------------------------------------------------------- derivative checks
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kind", ["completion", "dense"])
def test_check_directional_derivative(pymanopt_slope, h, request, kind, metric, backend):
    if backend == "torch":
        request.getfixturevalue("one_torch_thread")
    m, n, r = 20, 15, 3
    pm = FixedRank(m, n, r, metric=make_metric(h, metric, backend, m, n), backend=backend, seed=0)
    problem = (
        Completion(m, n, r, oversampling=2.0).problem(pm)
        if kind == "completion"
        else dense_problem(pm)
    )
    x = pm.random_point(seed=1)
    d = pm.random_tangent_vector(x, seed=2)
    s_grad = pymanopt_slope(problem, x, d)
    s_hess = pymanopt_slope(problem, x, d, quadratic=True)
    assert abs(s_grad - 2.0) < 0.05, s_grad
    assert abs(s_hess - 3.0) < 0.1, s_hess
    # a wrong metric would break the gradient check: the Euclidean projection is not the
    # Riemannian gradient under another metric (so the slope test really sees the metric)
    if metric != "euclidean":
        g = problem.riemannian_gradient(x)
        g_emb = pm.projection(x, problem.euclidean_gradient(x))
        assert pm.norm(x, g - g_emb) > 1e-3 * pm.norm(x, g)
    # the Riemannian Hessian is self-adjoint under the metric (TrustRegions relies on it)
    a, b = pm.random_tangent_vector(x, seed=3), pm.random_tangent_vector(x, seed=4)
    hab = pm.inner_product(x, problem.riemannian_hessian(x, a), b)
    assert abs(hab - pm.inner_product(x, a, problem.riemannian_hessian(x, b))) <= 1e-9 * max(
        abs(hab), 1
    )


# -------------------------------------------------------------------------- solvers
@pytest.mark.parametrize("solver", [SteepestDescent, ConjugateGradient, TrustRegions])
def test_pymanopt_solvers_complete_matrix(solver):
    comp = Completion()  # 40 x 30, rank 3, oversampling 4, random start
    pm = FixedRank(comp.m, comp.n, comp.r, seed=1)
    problem = comp.problem(pm, decorator=pymanopt.function.numpy)
    res = quiet(solver, max_iterations=2000, min_gradient_norm=1e-10).run(
        problem, initial_point=pm.random_point()
    )
    assert res.cost < 1e-12, (res.cost, res.stopping_criterion)
    assert np.linalg.norm(pm.to_dense(res.point) - comp.truth) < 1e-5 * np.linalg.norm(comp.truth)
    if solver is TrustRegions:
        assert res.iterations < 50, res.iterations


@pytest.mark.parametrize("metric", METRICS[1:])
@pytest.mark.parametrize("solver", [ConjugateGradient, TrustRegions])
def test_pymanopt_solvers_with_metrics(h, solver, metric):
    comp = Completion()
    pm = FixedRank(
        comp.m, comp.n, comp.r, metric=make_metric(h, metric, "numpy", comp.m, comp.n), seed=1
    )
    res = quiet(solver, max_iterations=1000, min_gradient_norm=1e-10).run(
        comp.problem(pm), initial_point=pm.random_point()
    )
    assert res.cost < 1e-12, (res.cost, res.stopping_criterion)
    if solver is TrustRegions:
        assert res.iterations < 50, res.iterations


@pytest.mark.parametrize("solver", [ConjugateGradient, TrustRegions])
def test_torch_backend_through_pymanopt(one_torch_thread, solver):
    torch = one_torch_thread
    comp = Completion()
    pm = FixedRank(comp.m, comp.n, comp.r, backend="torch", seed=1)
    problem = comp.problem(pm)
    x0 = pm.random_point()
    assert isinstance(x0.U, torch.Tensor)
    res = quiet(solver, max_iterations=1000, min_gradient_norm=1e-10).run(problem, initial_point=x0)
    assert isinstance(res.cost, float) and isinstance(res.gradient_norm, float)
    assert isinstance(res.point.U, torch.Tensor) and res.point.U.dtype == torch.float64
    assert isinstance(problem.cost(x0), float)  # rankopt.pymanopt.function: 0-d tensor -> float
    assert isinstance(problem.euclidean_gradient(x0), torch.Tensor)  # gradients pass unchanged
    assert res.cost < 1e-12, (res.cost, res.stopping_criterion)
    # same problem and start on NumPy: same answer
    pm_np = FixedRank(comp.m, comp.n, comp.r, seed=1)
    res_np = quiet(solver, max_iterations=1000, min_gradient_norm=1e-10).run(
        comp.problem(pm_np), initial_point=pm_np.random_point()
    )
    diff = np.linalg.norm(res.point.to_dense().numpy() - res_np.point.to_dense())
    assert diff < 1e-6 * np.linalg.norm(comp.truth)


@pytest.mark.parametrize("backend", BACKENDS)
def test_to_pymanopt_with_rankopt_problem(request, backend):
    if backend == "torch":
        request.getfixturevalue("one_torch_thread")
    p = ro.problems.random_completion(40, 30, 3, oversampling=4.0, seed=0, backend=backend)
    problem = to_pymanopt(p, 3, seed=1)
    assert (
        isinstance(problem.manifold, FixedRank)
        and problem.manifold.manifold.backend.name == backend
    )
    x = problem.manifold.random_point()
    assert problem.cost(x) == p.cost(x)
    res = quiet(TrustRegions, min_gradient_norm=1e-10).run(problem, initial_point=x)
    assert res.cost < 1e-12 and res.iterations < 50
    assert p.relative_error(res.point) < 1e-8
    with pytest.raises(ValueError, match="egrad"):
        to_pymanopt(object.__new__(type("NoGrad", (), {"shape": (3, 3), "cost": None})), 1)


# --------------------------------------------------- agreement with FixedRankEmbedded
def _their_point(x):
    return (x.U, x.s, x.V.T)


def _their_tangent(tv):  # theirs: (Up, M, Vp); ours: (M, Up, Vp)
    from pymanopt.manifolds.fixed_rank import _FixedRankTangentVector

    return _FixedRankTangentVector(tv.Up, tv.M, tv.Vp)


def _assert_same_tangent(ours, theirs, rtol):
    scale = max(np.linalg.norm(theirs.Up), np.linalg.norm(theirs.M), np.linalg.norm(theirs.Vp))
    for a, b in ((ours.M, theirs.M), (ours.Up, theirs.Up), (ours.Vp, theirs.Vp)):
        assert np.linalg.norm(a - b) <= rtol * scale


def _their_completion(comp, theirs):
    ri, ci, vals = comp.rows, comp.cols, comp.vals

    def G(u, s, vt):
        return sp.csr_matrix(
            (((u[ri] * s) * vt.T[ci]).sum(1) - vals, (ri, ci)), shape=(comp.m, comp.n)
        )

    @pymanopt.function.numpy(theirs)
    def cost(u, s, vt):
        return 0.5 * float(np.sum(G(u, s, vt).data ** 2))

    @pymanopt.function.numpy(theirs)
    def egrad(u, s, vt):  # gradients with respect to the factors (u, s, vt)
        Gm = G(u, s, vt)
        GV = Gm @ vt.T
        return GV * s, np.sum(u * GV, axis=0), (Gm.T @ u * s).T

    return pymanopt.Problem(theirs, cost, euclidean_gradient=egrad)


class FixedStep:
    """A Pymanopt line searcher that always takes ``alpha * d`` (for iterate comparisons)."""

    def __init__(self, alpha):
        self.alpha = alpha

    def search(self, objective, manifold, x, d, f0, df0):
        return self.alpha * manifold.norm(x, d), manifold.retraction(x, self.alpha * d)


def _dense(p):
    return (p.U * p.s) @ p.V.T if hasattr(p, "U") else (p[0] * p[1]) @ p[2]


def test_agrees_with_fixedrankembedded():
    comp = Completion()
    m, n, r = comp.m, comp.n, comp.r
    ours, theirs = FixedRank(m, n, r, seed=0), FixedRankEmbedded(m, n, r)
    x = ours.random_point()
    xt = _their_point(x)
    rng = np.random.default_rng(7)

    # projections of a dense and of a factored ambient matrix
    Z = rng.standard_normal((m, n))
    _assert_same_tangent(ours.projection(x, Z), theirs.projection(xt, Z), 1e-13)
    # a factored A S B^T: Pymanopt 2.2.1 computes (A S B^T)^T @ U as B S A^T U (S, not S^T),
    # right only for symmetric S, so compare with a symmetric S; ours is checked against the
    # dense projection with a general S
    A, B, S = rng.standard_normal((m, 4)), rng.standard_normal((n, 4)), rng.standard_normal((4, 4))
    for S_ in (S, S + S.T):
        _assert_same_tangent(
            ours.projection(x, ro.LowRankMatrix(A @ S_, B)), ours.projection(x, A @ S_ @ B.T), 1e-13
        )
    _assert_same_tangent(
        ours.projection(x, ro.LowRankMatrix(A @ (S + S.T), B)),
        theirs.projection(xt, (A, S + S.T, B)),
        1e-13,
    )

    # inner products, embedding, retraction (both are H_r(X + xi): the same map)
    v, w = ours.random_tangent_vector(x, seed=1), ours.random_tangent_vector(x, seed=2)
    their_vw = theirs.inner_product(xt, _their_tangent(v), _their_tangent(w))
    assert abs(ours.inner_product(x, v, w) - their_vw) < 1e-13
    U3, S3, V3 = theirs.embedding(xt, _their_tangent(v))
    np.testing.assert_allclose(ours.embedding(x, v).to_dense(), U3 @ S3 @ V3.T, atol=1e-13)
    for t in (1e-3, 0.3, 3.0):
        y, yt = ours.retraction(x, t * v), theirs.retraction(xt, _their_tangent(t * v))
        assert np.linalg.norm(_dense(y) - _dense(yt)) < 1e-12 * np.linalg.norm(_dense(y))
    _assert_same_tangent(
        ours.transport(x, y, v), theirs.transport(xt, yt, _their_tangent(v)), 1e-12
    )

    # Riemannian gradients of the completion cost (theirs from factor gradients, ours ambient)
    ours_p, theirs_p = comp.problem(ours), _their_completion(comp, theirs)
    _assert_same_tangent(ours_p.riemannian_gradient(x), theirs_p.riemannian_gradient(xt), 1e-10)

    # steepest descent and CG (Fletcher-Reeves: beta > 0, so transports enter) with the same
    # start and a fixed step: the same iterates up to round-off (measured: ~1e-15 relative)
    iterates = {}
    for name, solver, kw in (
        ("sd", SteepestDescent, {}),
        ("cg", ConjugateGradient, {"beta_rule": "FletcherReeves"}),
    ):
        runs = [
            quiet(
                solver, line_searcher=FixedStep(0.5), max_iterations=6, log_verbosity=1, **kw
            ).run(p, initial_point=x0)
            for p, x0 in ((ours_p, x), (theirs_p, xt))
        ]
        pts = [run.log["iterations"]["point"] for run in runs]
        assert len(pts[0]) == len(pts[1]) == 6
        for a, b in zip(*pts, strict=True):
            assert np.linalg.norm(_dense(a) - _dense(b)) < 1e-12 * np.linalg.norm(_dense(b))
        assert runs[0].cost < 0.05 * ours_p.cost(x)  # the steps make progress
        iterates[name] = pts[0]
    sd_cg_gap = np.linalg.norm(_dense(iterates["sd"][-1]) - _dense(iterates["cg"][-1]))
    assert sd_cg_gap > 1e-3  # CG really differs from SD


def test_equal_singular_values():
    comp = Completion()
    m, n, r = comp.m, comp.n, comp.r
    ours, theirs = FixedRank(m, n, r, seed=0), FixedRankEmbedded(m, n, r)
    x = ours.random_point()
    x_eq = ro.FixedRankPoint(x.U, np.ones(r), x.V)  # s all equal
    theirs_p, problem = _their_completion(comp, theirs), comp.problem(ours)

    # Pymanopt's factor-gradient conversion divides by s_j^2 - s_i^2 (its issue #34): NaN at
    # equal s, and a relative error ~ eps / gap at nearly equal s
    with np.errstate(divide="ignore", invalid="ignore"):
        g_theirs = theirs_p.riemannian_gradient(_their_point(x_eq))
        assert not np.all(np.isfinite(g_theirs.M))
        try:
            res = quiet(SteepestDescent, max_iterations=20).run(
                theirs_p, initial_point=_their_point(x_eq)
            )
            theirs_failed = not np.isfinite(res.cost)
        except np.linalg.LinAlgError:  # observed: "SVD did not converge" in its retraction
            theirs_failed = True
    assert theirs_failed

    g = problem.riemannian_gradient(x_eq)
    assert ours.manifold.backend.all_finite(g.M) and np.isfinite(ours.norm(x_eq, g))
    # ours is continuous in s: at a gap of 2e-4 it is within O(gap) of the value at x_eq
    x_near = ro.FixedRankPoint(x.U, np.array([1.0 + 2e-4, 1.0, 1.0 - 2e-4]), x.V)
    assert ours.norm(x_eq, g - problem.riemannian_gradient(x_near)) < 1e-3 * ours.norm(x_eq, g)
    x_tiny = ro.FixedRankPoint(x.U, np.array([1.0 + 1e-12, 1.0, 1.0 - 1e-12]), x.V)
    g_tiny, g_tiny_theirs = (
        problem.riemannian_gradient(x_tiny),
        theirs_p.riemannian_gradient(_their_point(x_tiny)),
    )
    assert np.linalg.norm(g_tiny.M - g.M) < 1e-12 * np.linalg.norm(g.M)
    assert np.linalg.norm(g_tiny_theirs.M - g.M) > 1e-7 * np.linalg.norm(g.M)  # measured: 9e-5

    for solver in (SteepestDescent, ConjugateGradient, TrustRegions):
        res = quiet(solver, max_iterations=2000, min_gradient_norm=1e-10).run(
            problem, initial_point=x_eq
        )
        assert np.isfinite(res.cost) and res.cost < 1e-12, (solver.__name__, res.cost)


# --------------------------------------------------------------- plumbing and errors
def test_tangent_vector_arithmetic_used_by_pymanopt():
    pm = FixedRank(6, 5, 2, seed=0)
    x = pm.random_point()
    v, w = pm.random_tangent_vector(x), pm.random_tangent_vector(x)
    n2 = pm.inner_product(x, v, v)
    assert isinstance(n2, float) and isinstance(pm.norm(x, v), float)
    c = np.sqrt(np.sqrt(np.spacing(1)))  # TrustRegions' shrink factor, a numpy float64
    cases = {
        "np * v": (c * v, c),
        "v * np": (v * c, c),
        "0 * v": (0 * v, 0.0),
        "v * 0": (v * 0, 0.0),
        "-v": (-v, -1.0),
        "v / np": (v / np.float64(4.0), 0.25),
        "1e-6 * v": (1e-6 * v, 1e-6),
        "np.f32 * v": (np.float32(2.0) * v, 2.0),
    }
    for label, (u, a) in cases.items():
        assert abs(pm.inner_product(x, u, w) - a * pm.inner_product(x, v, w)) < 1e-12, label
    s = v + 2.0 * w - w
    assert pm.norm(x, s - (v + w)) < 1e-14
    assert pm.norm(x, pm.zero_vector(x)) == 0.0


def test_to_tangent_space_and_errors():
    pm = FixedRank(6, 5, 2, seed=0)
    x = pm.random_point()
    v = pm.random_tangent_vector(x)
    bent = ro.TangentVector(v.M, v.Up + x.U @ np.ones((2, 2)), v.Vp)  # leaves the tangent space
    fixed = pm.to_tangent_space(x, bent)
    assert np.abs(x.U.T @ fixed.Up).max() < 1e-14 and pm.norm(x, fixed - v) < 1e-14
    assert pm.norm(x, pm.to_tangent_space(x, pm.embedding(x, v)) - v) < 1e-13
    with pytest.raises(ValueError, match="ambient"):
        pm.projection(x, v)
    for method, args in (("exp", (x, v)), ("log", (x, x)), ("dist", (x, x)), ("pair_mean", (x, x))):
        with pytest.raises(NotImplementedError, match="fixed-rank"):
            getattr(pm, method)(*args)
    with pytest.raises(ValueError, match="rank"):
        FixedRank(3, 4, 5)
    with pytest.raises(ValueError, match="FixedRank"):
        function(FixedRankEmbedded(4, 3, 2))
    assert pm.dim == (6 + 5 - 2) * 2 and pm.point_layout == 1
    assert FixedRank.from_manifold(pm.manifold).dim == pm.dim


def test_import_error_without_pymanopt():
    code = (
        "import sys\n"
        "sys.modules['pymanopt'] = None\n"
        "import rankopt\n"
        "assert 'rankopt.pymanopt' not in sys.modules\n"
        "try:\n"
        "    import rankopt.pymanopt\n"
        "except ImportError as e:\n"
        "    print('IMPORTERROR:', e)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "IMPORTERROR:" in out.stdout and "pip install -e '.[pymanopt]'" in out.stdout


def test_example_quick(capsys):
    import runpy

    mod = runpy.run_path(str(ROOT / "examples" / "pymanopt_completion.py"))
    rows = mod["main"](["--quick"])
    out = capsys.readouterr().out
    ours = [row for row in rows if row["manifold"] == "rankopt"]
    assert len(ours) >= 3 and all(row["cost"] < 1e-12 for row in ours)
    assert all(row["solver"] in out for row in rows)


# --------------------------------------------------------------- coming from Pymanopt


def _migration_blocks() -> list[str]:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "pymanopt.md").read_text()
    section = doc.split("## Coming from Pymanopt")[1].split("\n## ")[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_migration_section_runs_and_recovers_the_analytic_solution(one_torch_thread):
    """The docs' rewrite of Pymanopt's low-rank approximation example, block by block."""
    pytest.importorskip("torch")
    blocks = _migration_blocks()
    assert len(blocks) == 4
    ns: dict = {}
    errors = []
    for k, code in enumerate(blocks):
        exec(compile(code, "docs/pymanopt.md", "exec"), ns)
        u, s, vt = ns["res"].point if k == 3 else (ns["u"], ns["s"], ns["vt"])
        errors.append(np.linalg.norm(u @ np.diag(s) @ vt - ns["best"]))
    # measured: 1.1e-6 (Pymanopt's CG, gradient tolerance 1e-6), 8.6e-10 and 1.8e-9 (rankopt's
    # RCG, stopped by the line search at round-off of the cost), 6.9e-15 (trust regions)
    assert errors[0] < 1e-5 and errors[1] < 1e-7 and errors[3] < 1e-7, errors
    assert errors[2] < 1e-12, errors


@pytest.mark.parametrize("s_kind", ["distinct", "equal"])
def test_factor_gradient_is_the_tangent_projection(s_kind):
    """factor_gradient(x, gu, gs, gvt) projects to P_X(G) exactly, with equal singular values
    too (where Pymanopt's 1/(s_j^2 - s_i^2) conversion gives NaN), and agrees with Pymanopt's
    conversion where that is defined."""
    m, n, r = 9, 7, 3
    rng = np.random.default_rng(0)
    A = rng.standard_normal((m, n))
    M = ro.FixedRankManifold(m, n, r)
    x0 = M.random_point(1)
    x = x0 if s_kind == "distinct" else ro.FixedRankPoint(x0.U, np.ones(r), x0.V)
    X = M.to_dense(x)
    G = 2 * (X - A)
    S = np.diag(x.s)
    gu, gs, gvt = G @ x.V @ S, np.diag(x.U.T @ G @ x.V), S @ x.U.T @ G
    ours = M.projection(x, factor_gradient(x, gu, gs, gvt))
    true = M.projection(x, G)
    for a, b in zip(ours, true, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        theirs = FixedRankEmbedded(m, n, r).euclidean_to_riemannian_gradient(
            tuple(x), (gu, gs, gvt)
        )
    if s_kind == "distinct":
        np.testing.assert_allclose(theirs.M, true.M, atol=1e-10)
    else:
        assert not np.all(np.isfinite(theirs.M))  # Pymanopt's issue #34, for the record


def test_from_factor_functions_checks_and_gradient_check():
    m, n, r = 8, 6, 2
    A = np.random.default_rng(2).standard_normal((m, n))
    M = ro.FixedRankManifold(m, n, r)

    def cost(u, s, vt):
        return 0.5 * np.linalg.norm(u @ np.diag(s) @ vt - A) ** 2

    def grad(u, s, vt):
        R = u @ np.diag(s) @ vt - A
        return R @ vt.T * s, np.diag(u.T @ R @ vt.T), (u * s).T @ R

    cost_x, egrad_x = from_factor_functions(cost, grad)
    res = ro.diagnostics.check_gradient(M, cost_x, egrad_x, seed=0)
    assert res.ok and abs(res.slope - 2) < 0.1
    with pytest.raises(ValueError, match="gu has shape"):
        factor_gradient(M.random_point(0), np.zeros((m, r + 1)), np.zeros(r), np.zeros((r, n)))
    with pytest.raises(ValueError, match="three factor gradients"):
        from_factor_functions(cost, lambda u, s, vt: u)[1](M.random_point(0))
    with pytest.raises(ValueError, match="callable"):
        from_factor_functions(3)
