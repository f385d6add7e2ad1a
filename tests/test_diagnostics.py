"""Finite-difference diagnostics: gradients and Hessians of several costs under every metric.

``check_gradient`` must find slope 2 and ``check_hessian`` slope 3 for correct derivatives
(the Riemannian gradient/Hessian under the manifold's metric, from Euclidean ones given as
dense, scipy/torch sparse and LowRankMatrix ambient matrices), and must flag wrong ones
(slope 1 for a wrong gradient, 2 for a wrong Hessian).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import rankopt as ro
from rankopt import diagnostics, metrics

COSTS = ["quadratic", "quartic", "completion", "lowrank"]
SHAPE = (7, 5, 3)


def _sparse_from_coo(be, rows, cols, vals, shape):
    """A sparse ambient matrix of the backend from COO data (``vals`` already on the backend)."""
    if be.name == "numpy":
        import scipy.sparse as sps

        return sps.csr_matrix((vals, (rows, cols)), shape=shape)
    if be.name == "torch":
        import torch

        idx = torch.as_tensor(np.vstack([rows, cols]), device=be.device)
        return torch.sparse_coo_tensor(idx, vals, shape, check_invariants=True).coalesce()
    import cupyx.scipy.sparse as cps

    return cps.coo_matrix((vals, (be.asarray(rows), be.asarray(cols))), shape=shape).tocsr()


def make_cost(M: ro.FixedRankManifold, name: str, seed: int, wrong: str | None = None):
    """``SimpleNamespace(cost, egrad, ehess)`` on the manifold's backend.

    * quadratic  ``0.5 ||X - A||^2``: dense gradient, Hessian = identity (LowRankMatrix out).
    * quartic    ``0.5 ||X o X - A||^2``: dense gradient ``2 (X o X - A) o X`` and Hessian
      ``D -> 2 (3 X o X - A) o D``.
    * completion ``0.5 ||P_Omega(X) - b||^2``: sparse gradient and Hessian ``P_Omega(D)``,
      with X sampled at Omega from the factors (no m x n matrix).
    * lowrank    ``0.5 ||X - A B^T||^2``: LowRankMatrix gradient ``X - A B^T``.

    ``wrong``: "scale" multiplies the gradient by 1.1, "bug" drops a factor (quartic:
    ``o X``; others: a sign flip of part of the gradient), "hess" multiplies the Hessian by 1.1.
    """
    be = M.backend
    xp = be.xp
    rng = np.random.default_rng(500 + seed)
    m, n = M.m, M.n
    gscale = 1.1 if wrong == "scale" else 1.0
    hscale = 1.1 if wrong == "hess" else 1.0

    def fl(v):
        return be.to_float(v)

    if name == "quadratic":
        A = be.asarray(rng.standard_normal((m, n)))

        def cost(x):
            return 0.5 * fl(be.sum_sq(x.to_dense() - A))

        def egrad(x):
            G = x.to_dense() - A
            return (G - 2 * A if wrong == "bug" else G) * gscale

        def ehess(x, D):
            return D * hscale

    elif name == "quartic":
        A = be.asarray(rng.standard_normal((m, n)))

        def cost(x):
            X = x.to_dense()
            return 0.5 * fl(be.sum_sq(X * X - A))

        def egrad(x):
            X = x.to_dense()
            G = 2 * (X * X - A)
            return (G if wrong == "bug" else G * X) * gscale

        def ehess(x, D):
            X = x.to_dense()
            return 2 * (3 * X * X - A) * D.to_dense() * hscale

    elif name == "completion":
        k = (m * n) // 2
        flat = rng.choice(m * n, size=k, replace=False)
        rows, cols = flat // n, flat % n
        ri, ci = xp.asarray(rows, device=be.device), xp.asarray(cols, device=be.device)
        b = be.asarray(rng.standard_normal(k))

        def sample(F, G):  # (F G^T)[rows, cols] from factors: O(k r)
            return xp.sum(F[ri, :] * G[ci, :], axis=1)

        def cost(x):
            return 0.5 * fl(be.sum_sq(sample(x.U * x.s[None, :], x.V) - b))

        def egrad(x):
            vals = sample(x.U * x.s[None, :], x.V) - b
            if wrong == "bug":
                vals = vals + b  # forgets the data term
            return _sparse_from_coo(be, rows, cols, vals * gscale, (m, n))

        def ehess(x, D):
            return _sparse_from_coo(be, rows, cols, sample(D.A, D.B) * hscale, (m, n))

    elif name == "lowrank":
        A = be.asarray(rng.standard_normal((m, 2)))
        B = be.asarray(rng.standard_normal((n, 2)))
        T = ro.LowRankMatrix(A, B)

        def cost(x):
            return 0.5 * (x.to_lowrank() - T).fro_norm() ** 2

        def egrad(x):
            G = x.to_lowrank() - T
            return (x.to_lowrank() + T if wrong == "bug" else G) * gscale

        def ehess(x, D):
            return D * hscale

    else:  # pragma: no cover
        raise KeyError(name)
    return SimpleNamespace(cost=cost, egrad=egrad, ehess=ehess)


METRICS = ["euclidean", "core-weight", "row-col-weights", "adagrad", "adam"]
# every (cost, metric) pair once, seeds cycling over the pairs, plus extra seeds for the
# Euclidean metric: 28 cases per backend and dtype instead of 60
CASES = [
    pytest.param(c, mt, (i * len(METRICS) + j) % 3, id=f"{c}-{mt}-{(i * len(METRICS) + j) % 3}")
    for i, c in enumerate(COSTS)
    for j, mt in enumerate(METRICS)
] + [pytest.param(c, "euclidean", s, id=f"{c}-euclidean-{s}") for c in COSTS for s in (3, 4)]


def _manifold(backend, dtype, h=None, seed=0, metric_name=None):
    M = ro.FixedRankManifold(*SHAPE, backend=backend, dtype=dtype)
    if metric_name is not None:
        M = M.with_metric(h.metric_zoo(M, seed)[metric_name])
    return M


# --------------------------------------------------------------------------- gradient


@pytest.mark.parametrize("cost_name, metric_name, seed", CASES)
def test_check_gradient_slope_two(h, backend, dtype, cost_name, metric_name, seed):
    M = _manifold(backend, dtype, h=h, seed=seed, metric_name=metric_name)
    c = make_cost(M, cost_name, seed)
    res = diagnostics.check_gradient(M, c.cost, c.egrad, seed=seed)
    assert np.isfinite(res.slope), res
    tol = 0.3 if dtype == "float32" else 0.15
    assert abs(res.slope - 2.0) < tol, res
    assert res.ok, res
    assert res.extra["tangency"] < (1e-5 if dtype == "float32" else 1e-12)


@pytest.mark.parametrize("cost_name, metric_name, seed", CASES[:20])
def test_wrong_gradient_is_flagged(h, backend, cost_name, metric_name, seed):
    """float64; the kind of mistake alternates with the case: a 10% scale or a bug."""
    wrong = ("scale", "bug")[(COSTS.index(cost_name) + METRICS.index(metric_name)) % 2]
    M = _manifold(backend, "float64", h=h, seed=seed, metric_name=metric_name)
    c = make_cost(M, cost_name, seed, wrong=wrong)
    res = diagnostics.check_gradient(M, c.cost, c.egrad, seed=seed)
    assert not res.ok, res
    assert abs(res.slope - 1.0) < 0.2, res


@pytest.mark.xfail(
    strict=True,
    reason="check_gradient's float32 defaults (steps 1e-4..1 times s_min/||d||, longest-window fit) "
    "pass or mis-fit about a quarter of wrong gradients (10% scaled or buggy) in float32",
)
def test_wrong_gradient_is_flagged_float32():
    missed = []
    for seed in range(3):
        for name in COSTS:
            for wrong in ("scale", "bug"):
                M = ro.FixedRankManifold(*SHAPE, dtype="float32")
                c = make_cost(M, name, seed, wrong=wrong)
                res = diagnostics.check_gradient(M, c.cost, c.egrad, seed=seed)
                if res.ok or abs(res.slope - 1.0) >= 0.2:
                    missed.append((seed, name, wrong, round(res.slope, 2), res.ok))
    assert not missed, missed


def test_check_gradient_accepts_riemannian_gradient(backend, seed):
    M = ro.FixedRankManifold(*SHAPE, backend=backend)
    c = make_cost(M, "quartic", seed)
    good = diagnostics.check_gradient(
        M, c.cost, rgrad=lambda x: M.euclidean_to_riemannian_gradient(x, c.egrad(x)), seed=seed
    )
    bad = diagnostics.check_gradient(
        M,
        c.cost,
        rgrad=lambda x: M.euclidean_to_riemannian_gradient(x, c.egrad(x)) * 0.9,
        seed=seed,
    )
    assert good.ok and abs(good.slope - 2) < 0.15
    assert not bad.ok and abs(bad.slope - 1) < 0.2
    with pytest.raises(ValueError, match="exactly one of egrad or rgrad"):
        diagnostics.check_gradient(M, c.cost)
    with pytest.raises(ValueError, match="exactly one of egrad or rgrad"):
        diagnostics.check_gradient(M, c.cost, c.egrad, rgrad=lambda x: M.zero_vector(x))


def test_inexact_kronecker_metric_is_not_the_gradient(backend, seed):
    """``KroneckerDiagonal(exact=False)`` only preconditions: check_gradient must reject it.

    float64 (see ``test_wrong_gradient_is_flagged_float32`` for float32's limits).
    """
    rng = np.random.default_rng(seed)
    M0 = ro.FixedRankManifold(*SHAPE, backend=backend)
    wl = M0.backend.asarray(rng.uniform(0.3, 3.0, SHAPE[0]))
    wr = M0.backend.asarray(rng.uniform(0.3, 3.0, SHAPE[1]))
    results = {}
    for exact in (True, False):
        M = M0.with_metric(metrics.KroneckerDiagonal(left=wl, right=wr, exact=exact))
        c = make_cost(M, "quadratic", seed)
        results[exact] = diagnostics.check_gradient(M, c.cost, c.egrad, seed=seed)
    assert results[True].ok and abs(results[True].slope - 2) < 0.15, results[True]
    assert not results[False].ok and abs(results[False].slope - 1) < 0.2, results[False]


# --------------------------------------------------------------------------- Hessian


@pytest.mark.parametrize("cost_name, metric_name, seed", CASES)
def test_check_hessian_slope_three(h, backend, cost_name, metric_name, seed):
    """float64 only: in float32 the O(t^3) error drowns in round-off (see the float32 test below)."""
    M = _manifold(backend, "float64", h=h, seed=seed, metric_name=metric_name)
    c = make_cost(M, cost_name, seed)
    res = diagnostics.check_hessian(M, c.cost, c.egrad, c.ehess, seed=seed)
    assert np.isfinite(res.slope), res
    assert abs(res.slope - 3.0) < 0.25, res
    assert res.ok, res
    # the Hessian is self-adjoint under the metric
    assert res.extra["symmetry"] < 1e-8, res


@pytest.mark.parametrize("cost_name, metric_name, seed", CASES[:20])
def test_wrong_hessian_is_flagged(h, backend, cost_name, metric_name, seed):
    M = _manifold(backend, "float64", h=h, seed=seed, metric_name=metric_name)
    c = make_cost(M, cost_name, seed, wrong="hess")
    res = diagnostics.check_hessian(M, c.cost, c.egrad, c.ehess, seed=seed)
    assert not res.ok, res
    assert abs(res.slope - 2.0) < 0.2, res


def test_hessian_missing_term_is_flagged(backend, seed):
    """Quartic cost with the ``4 X o X o D`` part of its Euclidean Hessian forgotten."""
    M = ro.FixedRankManifold(*SHAPE, backend=backend)
    c = make_cost(M, "quartic", seed)

    def bad_ehess(x, D):
        return c.ehess(x, D) - 4 * x.to_dense() * x.to_dense() * D.to_dense()

    res = diagnostics.check_hessian(M, c.cost, c.egrad, bad_ehess, seed=seed)
    assert not res.ok and abs(res.slope - 2.0) < 0.2, res


@pytest.mark.parametrize("cost_name", COSTS)
@pytest.mark.parametrize("metric_name", METRICS)
def test_hessian_float32_agrees_with_float64(h, backend, cost_name, metric_name):
    """float32 Riemannian gradient and Hessian equal the float64 ones to float32 accuracy."""
    out = {}
    for dt in ("float32", "float64"):
        M = _manifold(backend, dt, h=h, seed=3, metric_name=metric_name)
        c = make_cost(M, cost_name, 3)
        x = M.random_point(3)
        xi = M.random_tangent_vector(x, 4)
        Z = c.egrad(x)
        g = M.euclidean_to_riemannian_gradient(x, Z)
        H = M.euclidean_to_riemannian_hessian(x, Z, c.ehess(x, M.embed(x, xi)), xi)
        out[dt] = (h.tangent_dense(M, x, g), h.tangent_dense(M, x, H))
    for a, b in zip(out["float32"], out["float64"], strict=True):
        assert h.rel(a, b) < 2e-4


def test_hessian_at_equal_singular_values(backend, seed):
    """No 1/(s_i^2 - s_j^2): gradient and Hessian checks pass at a point with s = (1, 1, 1)."""
    M = ro.FixedRankManifold(*SHAPE, backend=backend)
    x0 = M.random_point(seed)
    x = ro.FixedRankPoint(x0.U, M.backend.asarray(np.ones(SHAPE[2])), x0.V)
    c = make_cost(M, "quartic", seed)
    g = diagnostics.check_gradient(M, c.cost, c.egrad, x=x, seed=seed)
    hs = diagnostics.check_hessian(M, c.cost, c.egrad, c.ehess, x=x, seed=seed)
    assert g.ok and abs(g.slope - 2) < 0.15, g
    assert hs.ok and abs(hs.slope - 3) < 0.25, hs


# --------------------------------------------------------------------------- result object


def test_fit_slope_recovers_power_law():
    t = np.logspace(-8, 0, 41)
    err = 3.0 * t**2.5 + 1e-14  # a power law above a noise floor
    slope, (i, j) = diagnostics.fit_slope(t, err, floor=1e-12)
    assert abs(slope - 2.5) < 1e-3
    assert np.all(err[i:j] > 1e-12) and j - i >= 6
    # nothing above the floor: no window
    slope, window = diagnostics.fit_slope(t, np.full_like(t, 1e-16), floor=1e-12)
    assert np.isnan(slope) and window == (0, 0)


def test_check_result_plot_and_data(tmp_path):
    M = ro.FixedRankManifold(*SHAPE)
    c = make_cost(M, "quadratic", 0)
    res = diagnostics.check_gradient(M, c.cost, c.egrad)
    assert len(res.steps) == len(res.errors) and res.window[1] - res.window[0] >= 6
    assert np.all(np.diff(res.steps) > 0)
    assert "slope" in repr(res)
    path = tmp_path / "grad.png"
    ax = res.plot(path=str(path))
    assert path.stat().st_size > 1000
    assert len(ax.get_lines()) == 2  # the error curve and the fitted slope
    import matplotlib.pyplot as plt

    plt.close(ax.figure)
