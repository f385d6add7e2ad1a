"""Input checks of the manifold, ``solve`` and the diagnostics: each bad input gives an error
that names the argument, the value and what is allowed, or the correct result; none gives a
silently wrong result or a cryptic error from deep inside.

1. rank bounds of the rank-adaptive retraction; 2. point arithmetic and invalid points;
3. every method of ``rankopt.solvers.METHODS`` runs through ``solve`` (and the docs list them);
4. the ``metric`` argument; 5. 1 x n and m x 1 problems; 6. the diagnostics' cost values.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest

import rankopt as ro
from rankopt import diagnostics
from rankopt.problems import random_completion
from rankopt.solvers import METHODS, ConvergenceWarning, RankWarning
from rankopt.solvers.noise import UnderdeterminedWarning
from rankopt.solvers.options import METHOD_CLASSES

ROOT = Path(__file__).resolve().parents[1]
m_, n_, r_ = 10, 8, 3


@pytest.fixture(scope="module")
def M():
    return ro.FixedRankManifold(m_, n_, r_)


@pytest.fixture(scope="module")
def x(M):
    return M.random_point(0)


@pytest.fixture(scope="module")
def xi(M, x):
    return M.random_tangent_vector(x, 1)


@pytest.fixture(scope="module")
def A():
    return np.random.default_rng(2).standard_normal((m_, n_))


# =========================================================================== 1. rank bounds


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_retraction_adaptive_max_rank_must_be_a_positive_integer(M, x, xi, bad):
    with pytest.raises(
        ValueError, match=r"max_rank must be an integer >= 1.*got " + re.escape(repr(bad))
    ):
        M.retraction_adaptive(x, xi, 1e-3, max_rank=bad)


@pytest.mark.parametrize("bad", [0, -2, 2.0, None, False])
def test_retraction_adaptive_min_rank_must_be_a_positive_integer(M, x, xi, bad):
    with pytest.raises(
        ValueError, match=r"min_rank must be an integer >= 1, got " + re.escape(repr(bad))
    ):
        M.retraction_adaptive(x, xi, 1e-3, min_rank=bad)


def test_retraction_adaptive_min_rank_above_max_rank(M, x, xi):
    with pytest.raises(ValueError, match=r"min_rank=3 exceeds max_rank=2"):
        M.retraction_adaptive(x, xi, 1e-3, max_rank=2, min_rank=3)


@pytest.mark.parametrize("bad", [None, -1e-3, float("nan"), "0.1"])
def test_retraction_adaptive_rank_tol_must_be_a_real_number(M, x, xi, bad):
    with pytest.raises(ValueError, match=r"rank_tol must be a real number >= 0, got"):
        M.retraction_adaptive(x, xi, bad)


def test_the_fast_path_refuses_rank_zero_too(M, x, xi):
    """``manifold.geometry`` (what the rules call) used to return a rank-0 point."""
    with pytest.raises(ValueError, match=r"max_rank must be an integer >= 1"):
        M.geometry.retract_adaptive(x, xi, 1e-3, max_rank=0)


@pytest.mark.parametrize("max_rank", [1, 2, np.int64(2), 6, 100])
def test_retraction_adaptive_valid_bounds(M, x, xi, max_rank):
    y = M.retraction_adaptive(x, xi, 0.0, max_rank=max_rank)
    assert 1 <= y.rank <= min(int(max_rank), 2 * r_)
    M.with_rank(y.rank).check_point(y)


# =========================================================================== 2. points


@pytest.mark.parametrize(
    "op, word",
    [
        (lambda x: x * float("nan"), "nan"),
        (lambda x: float("nan") * x, "nan"),
        (lambda x: x * np.float64("inf"), "inf"),
        (lambda x: x * -np.inf, "-inf"),
        (lambda x: x / float("nan"), "nan"),
        (lambda x: x / 0.0, "by 0"),
        (lambda x: x / np.float64(0.0), "by 0"),
        (lambda x: x * 0, "by 0"),
        (lambda x: x * np.array(np.nan), "nan"),
    ],
)
def test_scaling_a_point_by_a_non_finite_or_zero_factor_raises(x, op, word):
    with pytest.raises(ValueError, match=re.escape(word)):
        op(x)


def test_scaling_a_point_that_overflows_or_underflows_raises(x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match=r"overflow to inf or underflow to 0"):
            (x * 1e300) * 1e300
        with pytest.raises(ValueError, match=r"overflow to inf or underflow to 0"):
            (x * 1e-200) * 1e-200


def test_scaling_a_point_by_a_complex_number_raises(x):
    with pytest.raises(TypeError, match=r"complex number 1j: rankopt points are real"):
        x * 1j


@pytest.mark.parametrize("a", [2.0, -3.0, np.float32(0.5), np.array(-1.5), 7])
def test_scaling_a_point_by_a_finite_number_is_a_point(M, x, a):
    for y in (x * a, a * x, x / a):
        M.check_point(y)
    np.testing.assert_allclose(M.to_dense(x * a), float(a) * M.to_dense(x), atol=1e-12)
    np.testing.assert_allclose(M.to_dense(x / a), M.to_dense(x) / float(a), atol=1e-12)


@pytest.mark.parametrize("method", ["to_dense", "zero_vector", "embed", "retraction", "projection"])
@pytest.mark.parametrize(
    "s, msg",
    [([np.nan, 1.0, 0.5], "non-finite values .* singular values s"),
     ([np.inf, 1.0, 0.5], "non-finite values .* singular values s"),
     ([1.0, -0.5, 0.2], "non-positive singular values s")],
)  # fmt: skip
def test_a_point_built_with_bad_singular_values_is_caught(M, x, xi, A, method, s, msg):
    bad = ro.FixedRankPoint(x.U, np.array(s), x.V)
    args = {"to_dense": (), "zero_vector": (), "embed": (xi,), "retraction": (xi,)}
    with pytest.raises(ValueError, match=msg):
        getattr(M, method)(bad, *args.get(method, (A,)))


@pytest.mark.parametrize("op", [lambda x, v: x + v, lambda x, v: v + x, lambda x, v: x - v,
                                lambda x, v: v - x])  # fmt: skip
def test_point_plus_tangent_vector_says_use_the_retraction(x, xi, op):
    with pytest.raises(TypeError, match=r"TangentVector and a FixedRankPoint.*retraction\(x, xi\)"):
        op(x, xi)


def test_non_finite_tangent_vectors_do_not_reach_a_point(M, x, xi):
    with pytest.raises(ValueError, match="tangent vector contains non-finite values"):
        M.retraction(x, xi * float("nan"))


# =========================================================================== 3. methods


@pytest.fixture(scope="module")
def p():
    """30 x 20, rank 2, exact data, 4x oversampling."""
    return random_completion(30, 20, 2, oversampling=4, seed=0)


def test_methods_is_the_table_solve_uses():
    assert list(METHODS) == list(METHOD_CLASSES)
    for name, (cls, fixed) in METHOD_CLASSES.items():
        solver = METHODS[name]()
        assert type(solver) is cls
        for k, v in fixed.items():
            assert getattr(solver, k) == v
    for name in ("reference-radamw", "radamw-elementwise", "reference-radagrad", "auto"):
        assert name in METHODS


@pytest.mark.parametrize("method", sorted(METHODS))
def test_solve_runs_every_method(p, method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = ro.solve(p, rank=2, method=method, max_iter=25, seed=0)
    assert res.stop_reason in ("gradient", "cost-change", "max-iter", "min-step"), res
    assert 1 <= res.rank <= 2
    p.manifold(res.rank).check_point(res.point, orthonormal=True)  # finite, s > 0, orthonormal
    assert np.isfinite(res.cost) and res.cost <= res.history.cost[0] * (1 + 1e-12), res
    assert res.iterations <= 25


@pytest.mark.parametrize("method", ["reference-radamw", "reference-radagrad", "radamw-elementwise"])
def test_the_dense_rules_also_run_rank_adaptive_and_with_options(p, method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (ConvergenceWarning, RankWarning))
        res = ro.solve(p, rank=2, method="adaptive-" + method, max_iter=10)
        res2 = ro.solve(p, rank=2, method=method, max_iter=5, lr=1e-3, max_time=10.0)
    assert res.rank <= 2 and res2.rank == 2
    assert "lr" in ro.solvers.method_options(method)


def _methods_listed_in(text: str) -> set[str]:
    return set(re.findall(r'`"([a-z][a-z-]*|adaptive-<method>)"`', text))


def test_docs_list_exactly_the_methods():
    text = (ROOT / "docs" / "solvers.md").read_text()
    para = text.split("Other methods:")[1].split("\n\n")[0]
    assert _methods_listed_in(para) | {"auto"} == set(METHODS) | {"adaptive-<method>"}
    doc = " ".join(ro.solve.__doc__.split())
    listed = set(re.findall(r'``"([a-z-]+)"``', doc.split("method : str")[1].split("tol :")[0]))
    assert listed == set(METHODS), listed ^ set(METHODS)


def test_unknown_method_lists_every_method(p):
    with pytest.raises(ValueError, match="unknown method 'reference-adamw'") as e:
        ro.solve(p, rank=2, method="reference-adamw")
    for name in METHODS:
        assert repr(name) in str(e.value)


# =========================================================================== 4. metric


@pytest.mark.parametrize(
    "metric, msg",
    [
        ("adam", r"not the string 'adam' \(did you mean rankopt\.metrics\.Adam\(\)\?\)"),
        ("Euclidean", r"not the string 'Euclidean' \(did you mean rankopt\.metrics\.Euclidean"),
        ("sgd", r"not the string 'sgd'; pass a metric object"),
        (ro.metrics.Adam, r"not the class Adam: instantiate it \(metric=Adam\(\.\.\.\)\)"),
        (ro.metrics.Preconditioned, r"got Preconditioned .*call it, metric=Preconditioned"),
        (3, r"got int \(no inner, apply, solve method\)"),
        (np.eye(3), r"got ndarray"),
    ],
)
def test_metric_must_be_a_metric_object(A, metric, msg):
    with pytest.raises(TypeError, match=msg) as e:
        ro.FixedRankManifold(m_, n_, r_, metric=metric)
    for name in ("rankopt.metrics.Euclidean()", "Adam(...)", "AdaGrad(...)", "Preconditioned("):
        assert name in str(e.value)


def test_metric_is_checked_before_a_solver_runs(p):
    with pytest.raises(TypeError, match="not the string 'adam'"):
        ro.solvers.RCG(metric="adam")
    with pytest.raises(TypeError, match="not the string 'adam'"):
        ro.solve(p, rank=2, method="radamw", metric="adam")


@pytest.mark.parametrize(
    "metric",
    [None, ro.metrics.Euclidean(), ro.metrics.Adam(), ro.metrics.AdaGrad(),
     ro.metrics.Preconditioned(core_weight=0.5)],
)  # fmt: skip
def test_metric_objects_are_accepted(x, A, metric):
    Mm = ro.FixedRankManifold(m_, n_, r_, metric=metric)
    g = Mm.euclidean_to_riemannian_gradient(x, A)
    assert np.isfinite(Mm.norm(x, g))


# =========================================================================== 5. 1 x n problems


def _vector_completion(shape, frac, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape)
    obs = rng.random(shape) < frac
    obs.flat[0] = True
    rows, cols = np.nonzero(obs)
    return ro.problems.MatrixCompletion(rows, cols, a[rows, cols], shape=shape), a, obs


@pytest.mark.parametrize("shape", [(1, 8), (7, 1)])
@pytest.mark.parametrize("method", ["rgn", "rcg", "rgd", "radamw", "adaptive-rgn"])
def test_vector_completion_is_solved_by_fixed_rank_methods(shape, method):
    p, a, obs = _vector_completion(shape, 0.6)
    with warnings.catch_warnings():  # few observations for a vector: warned, as documented
        warnings.simplefilter("ignore", (ConvergenceWarning, UnderdeterminedWarning))
        res = ro.solve(p, rank=1, method=method, max_iter=100)
    assert res.rank == 1
    assert np.abs(res.point.to_dense()[obs] - a[obs]).max() < 1e-3  # the observed entries


@pytest.mark.parametrize("shape", [(1, 8), (7, 1)])
@pytest.mark.parametrize("kw", [{}, {"method": "auto"}, {"rank": "auto"}])
def test_auto_on_vector_completion_names_the_shape(shape, kw):
    p, _, _ = _vector_completion(shape, 1.0)
    kw = {"rank": 1, **kw}
    with pytest.raises(ValueError) as e:
        ro.solve(p, **kw)
    msg = str(e.value)
    assert f"{shape[0]}x{shape[1]} MatrixCompletion" in msg
    assert "single rank 1 = min(m, n)" in msg and "method='rgn'" in msg
    assert "[1, 0]" not in msg and "- 1 = 0" not in msg


def test_vector_rank_above_one_is_out_of_range():
    p, _, _ = _vector_completion((1, 8), 1.0)
    with pytest.raises(
        ValueError, match=r"rank must be in \[1, min\(m, n\) = 1\] for a 1x8 problem"
    ):
        ro.solve(p, rank=2, method="rgn")


def test_auto_still_runs_on_a_vector_problem_with_a_rank_one_start():
    """The guard is for problems that refuse the rank-1 spectral start (completion) only."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((1, 6))
    meas = rng.standard_normal((10, 1, 6))
    p = ro.problems.MatrixSensing(meas, np.einsum("kij,ij->k", meas, a))
    res = ro.solve(p, rank=1)
    assert res.converged and np.abs(res.point.to_dense() - a).max() < 1e-8


# =========================================================================== 6. diagnostics


def _cost(A):
    return lambda x: 0.5 * np.sum((x.to_dense() - A) ** 2)


def _egrad(A):
    return lambda x: x.to_dense() - A


def _run_check(which, M, cost, A):
    if which == "gradient":
        return diagnostics.check_gradient(M, cost, _egrad(A))
    return diagnostics.check_hessian(M, cost, _egrad(A), lambda x, D: D)


@pytest.mark.parametrize("which", ["gradient", "hessian"])
def test_check_cost_must_return_a_scalar(M, A, which):
    with pytest.raises(ValueError, match=r"cost must return a scalar.*array of shape \(10, 8\)"):
        _run_check(which, M, lambda x: x.to_dense() - A, A)
    with pytest.raises(ValueError, match=r"cost must return a scalar.*array of shape \(1,\)"):
        _run_check(which, M, lambda x: np.array([_cost(A)(x)]), A)


@pytest.mark.parametrize("which", ["gradient", "hessian"])
@pytest.mark.parametrize(
    "value, err, msg",
    [(None, TypeError, "cost must return a real scalar .*NoneType"),
     ("1.0", TypeError, "cost must return a real scalar, got '1.0'"),
     (1 + 2j, TypeError, "cost must return a real scalar, got \\(1\\+2j\\)"),
     (np.nan, ValueError, "cost\\(x\\) is nan at the base point")],
)  # fmt: skip
def test_check_cost_bad_values(M, A, which, value, err, msg):
    with pytest.raises(err, match=msg):
        _run_check(which, M, lambda x: value, A)


@pytest.mark.parametrize("which", ["gradient", "hessian"])
def test_check_cost_scalars_of_every_kind_pass(M, A, which):
    for wrap in (float, np.float64, np.asarray):
        f = _cost(A)
        assert _run_check(which, M, lambda x, f=f, wrap=wrap: wrap(f(x)), A).ok


def test_check_retraction_names_bad_arguments(M, x, A):
    with pytest.raises(TypeError, match=r"seed must be an integer or None.*Generator"):
        diagnostics.check_retraction(M, seed=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"expected a FixedRankPoint, got ndarray"):
        diagnostics.check_retraction(M, A)
    with pytest.raises(ValueError, match=r"expected a TangentVector, got ndarray"):
        diagnostics.check_retraction(M, x, A)
    with pytest.raises(ValueError, match=r"non-finite values .* singular values s"):
        diagnostics.check_retraction(M, ro.FixedRankPoint(x.U, x.s * np.nan, x.V))
    assert diagnostics.check_retraction(M, x).ok
