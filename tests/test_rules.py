"""Update rules (rankopt.rules): stacks equal single steps, invariants, O((m+n) r) state,
exact special cases, one place for every default."""

from __future__ import annotations

import inspect
from dataclasses import fields

import numpy as np
import pytest
from conftest import assert_paths_agree, basis_free_state

import rankopt as ro
from rankopt import rules
from rankopt.containers import FixedRankPoint, TangentVector
from rankopt.diagnostics import check_gradient
from rankopt.rules import registry

BACKENDS = ["numpy", "torch"]

SPECS = {
    "rsgd": rules.RSGD(lr=0.1, momentum=0.9),
    "rsgd-nesterov": rules.RSGD(lr=0.1, momentum=0.9, nesterov=True),
    "rsgd-dampening-wd": rules.RSGD(lr=0.1, momentum=0.5, dampening=0.2, weight_decay=0.1),
    "heavyball": rules.RHeavyBall(lr=0.05),
    "riemannion": rules.Riemannion(lr=0.05, weight_decay=0.1),
    "radagrad": rules.RAdaGrad(lr=0.05, weight_decay=0.1, lr_decay=0.1),
    "radamw": rules.RAdamW(lr=0.01, weight_decay=0.1),
    "radamw-block": rules.RAdamW(lr=0.01, structure="block"),
    "radamw-pcg": rules.RAdamW(lr=0.01, solver="pcg"),
    "radamw-precondition": rules.RAdamW(lr=0.01, exact=False),
    "radamw-quartic": rules.RAdamW(lr=0.01, factoring="quartic", metric_eps=1e-8),
    # a tangent step and the rank-adaptive retraction (not DLRA: see tests/test_dlra.py)
    "rsgd-rank-adaptive": rules.RSGD(lr=0.1, momentum=0.9, rank_tol=1e-2),
    "radamw-rank-adaptive": rules.RAdamW(lr=0.01, rank_tol=1e-2),
    "riemannion-rank-adaptive": rules.Riemannion(lr=0.05, rank_tol=1e-2),
}
FIXED = [k for k, s in SPECS.items() if not s.rank_adaptive]


def _manifold(backend, m=40, n=30, r=4):
    if backend == "torch":
        pytest.importorskip("torch", reason="PyTorch not installed")
    return ro.FixedRankManifold(m, n, r, backend=backend, validate=False)


def _grad(M, x, seed):
    """The projection of a random ambient matrix (one per item of a stack)."""
    rng = np.random.default_rng(seed)
    Z = M.backend.asarray(rng.standard_normal((*x.batch_shape, M.m, M.n)))
    return M.geometry.project(x, Z)


def _np(a):
    return np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a, dtype=float)


def _tangency(x, xi) -> float:
    U, V = _np(x.U), _np(x.V)
    return max(np.abs(U.T @ _np(xi.Up)).max(), np.abs(V.T @ _np(xi.Vp)).max())


def _item(obj, k):
    """Item k of a stacked point / vector / state (per-item arrays indexed, numbers kept)."""
    if isinstance(obj, FixedRankPoint):
        return FixedRankPoint(obj.U[k], obj.s[k], obj.V[k])
    if isinstance(obj, TangentVector):
        return TangentVector(obj.M[k], obj.Up[k], obj.Vp[k])
    return {n: (v if np.ndim(v) == 0 else v[k]) for n, v in rules.state_arrays(obj).items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SPECS))
def test_stacked_step_equals_single_steps(backend, name):
    """One call of a rule on a stack of 3 same-shape points equals 3 single calls (float64,
    to the tolerance of two computation paths, conftest.path_tolerance): points, and every
    state array (first moments as ambient matrices, statistics, counts)."""
    spec = SPECS[name]
    M = _manifold(backend)
    xs = M.random_point(0, batch_shape=(3,))
    singles = [_item(xs, k) for k in range(3)]
    st = spec.init(M, xs)
    sts = [spec.init(M, x) for x in singles]
    for step in range(3):
        g = _grad(M, xs, step)
        new, st_new = spec.step(M, xs, g, st)
        for k in range(3):
            y, sts[k] = spec.step(M, singles[k], _item(g, k), sts[k])
            yk = new[k] if isinstance(new, list) else _item(new, k)
            assert_paths_agree(yk, y, step + 1, "point")
            ref = rules.state_arrays(sts[k])
            got = rules.state_arrays(st_new[k]) if isinstance(new, list) else _item(st_new, k)
            assert_paths_agree(basis_free_state(yk, got), basis_free_state(y, ref), step + 1)
            singles[k] = y
        if isinstance(new, list):  # ranks differ: continue with single points only
            break
        xs, st = new, st_new


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SPECS))
def test_states_stay_tangent_and_point_valid(backend, name):
    spec = SPECS[name]
    M = _manifold(backend)
    x = M.random_point(0)
    state = spec.init(M, x)
    for k in range(4):
        x, state = spec.step(M.with_rank(x.rank), x, _grad(M.with_rank(x.rank), x, k), state)
        M.with_rank(x.rank).check_point(x, orthonormal=True)
        for v in (getattr(state, f.name) for f in fields(state)):
            if isinstance(v, TangentVector):
                assert _tangency(x, v) < 1e-10, name


@pytest.mark.parametrize("name", FIXED)
def test_state_memory_is_linear(name):
    """Every state array is O((m + n) r): never an m x n matrix."""
    spec = SPECS[name]
    m, n, r = 600, 500, 3
    M = _manifold("numpy", m, n, r)
    x = M.random_point(0)
    state = spec.init(M, x)
    for k in range(2):
        x, state = spec.step(M, x, M.random_tangent_vector(x, k), state)
    total = sum(int(np.size(v)) for v in rules.state_arrays(state).values())
    assert total <= (m + n) * r + (m + n) + r * r + 1  # m * n would be 300000


@pytest.mark.parametrize("name", FIXED)
def test_state_arrays_roundtrip(name):
    spec = SPECS[name]
    M = _manifold("numpy")
    x = M.random_point(0)
    state = spec.init(M, x)
    x, state = spec.step(M, x, _grad(M, x, 1), state)
    back = rules.state_from_arrays(type(state), rules.state_arrays(state))
    g = _grad(M, x, 2)
    y1, _ = spec.step(M, x, g, state)
    y2, _ = spec.step(M, x, g, back)
    np.testing.assert_array_equal(y1.to_dense(), y2.to_dense())
    with pytest.raises(ValueError, match="has no entries"):
        rules.state_from_arrays(type(state), {**rules.state_arrays(state), "bogus": 1})


def test_weight_decay_alone_shrinks_exactly():
    M = _manifold("numpy")
    x = M.random_point(0)
    spec = rules.RAdamW(lr=0.1, weight_decay=0.5)
    y, _ = spec.step(M, x, M.zero_vector(x), spec.init(M, x))
    np.testing.assert_allclose(y.to_dense(), 0.95 * x.to_dense(), atol=1e-13)


def test_rsgd_without_momentum_is_a_retraction_step():
    M = _manifold("numpy")
    x = M.random_point(0)
    g = _grad(M, x, 0)
    spec = rules.RSGD(lr=0.3)
    y, _ = spec.step(M, x, g, spec.init(M, x))
    np.testing.assert_allclose(y.to_dense(), M.retraction(x, g * -0.3).to_dense(), atol=1e-13)


def test_first_radamw_step_is_sign_like():
    """Adam's first step is lr * sign(g) entrywise (m_hat = g, v_hat = g^2). RAdamW's metric
    normalizes by row and column statistics instead of entries, so its first step is
    sign-*like*: per entry about lr in size (RMS within a factor 2 of lr), against the
    gradient (cosine < -0.9, signs opposite to g's on > 90% of entries), and independent of
    the gradient's scale over 12 orders of magnitude."""
    M = _manifold("numpy")
    x = M.random_point(0)
    g = _grad(M, x, 0)
    G = M.embed(x, g).to_dense()
    lr = 1e-3
    steps = {}
    for scale in (1e-6, 1.0, 1e6):
        spec = rules.RAdamW(lr=lr, weight_decay=0.0)
        y, _ = spec.step(M, x, g * scale, spec.init(M, x))
        D = (y.to_dense() - x.to_dense()) / lr
        steps[scale] = D
        assert 0.5 < np.sqrt(np.mean(D**2)) < 2.0, scale
        assert np.sum(D * G) / (np.linalg.norm(D) * np.linalg.norm(G)) < -0.9
        assert np.mean(np.sign(D) == -np.sign(G)) > 0.9
    np.testing.assert_allclose(steps[1e6], steps[1.0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(steps[1e-6], steps[1.0], rtol=0.1, atol=0.1)  # eps = 1e-8 shows


@pytest.mark.parametrize("scale", [1e-150, 1e-6, 1e8])
def test_radamw_trajectory_is_invariant_to_the_gradient_scale(scale):
    """With the relative eps of the Adafactor-factored metric, scaling every gradient by any
    positive number (down to 1e-150) leaves RAdamW's (and Adam's) iterates unchanged: the
    first step moves by about lr per unit RMS, whatever the scale of the data."""
    M = _manifold("numpy")
    spec = rules.RAdamW(lr=1e-2)
    ref = x = M.random_point(0)
    s_ref = s = spec.init(M, x)
    for k in range(5):
        g = _grad(M, x, k)
        x, s = spec.step(M, x, g * scale, s)
        ref, s_ref = spec.step(M, ref, _grad(M, ref, k), s_ref)
    np.testing.assert_allclose(x.to_dense(), ref.to_dense(), atol=1e-11)
    moved = np.linalg.norm(x.to_dense() - M.random_point(0).to_dense())
    assert moved > 1e-2  # it did move (5 steps of lr 1e-2)


def test_rank_adaptive_retraction_grows_and_shrinks():
    M = _manifold("numpy", 40, 30, 3)
    x = M.random_point(0)
    grow = rules.RSGD(lr=1.0, rank_tol=1e-8)
    y, _ = grow.step(M, x, _grad(M, x, 0) * 10.0, grow.init(M, x))
    assert y.rank > 3  # augmented basis kept
    x = FixedRankPoint(x.U, np.array([1.0, 1.0, 1e-4]), x.V)
    shrink = rules.RSGD(lr=1.0, rank_tol=1e-3)
    z, _ = shrink.step(M, x, M.zero_vector(x), shrink.init(M, x))
    assert z.rank == 2  # the 1e-4 direction is truncated
    capped = rules.RSGD(lr=1.0, rank_tol=1e-8, max_rank=4)
    w, _ = capped.step(M, M.random_point(0), _grad(M, x, 0) * 10.0, capped.init(M, x))
    assert w.rank == 4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["radamw", "radagrad", "radamw-block", "radamw-quartic"])
def test_adaptive_metric_gradients_fd(backend, name):
    """The metric a rule builds from its statistics gives the true Riemannian gradient of that
    metric (finite differences, slope 2)."""
    spec = SPECS[name]
    M = _manifold(backend)
    x = M.random_point(0)
    state = spec.init(M, x)
    for k in range(3):
        x, state = spec.step(M, x, _grad(M, x, k), state)
    c = 1.0 - spec.betas[1] ** state.count if hasattr(spec, "betas") else 1.0
    Mg = M.with_metric(spec.metric(M, state.row_stats / c, state.col_stats / c))
    A = M.backend.asarray(np.random.default_rng(9).standard_normal((M.m, M.n)))
    xp = M.backend.xp

    def cost(y):
        return 0.5 * float(xp.sum((y.to_dense() - A) ** 2))

    res = check_gradient(Mg, cost, lambda y: y.to_dense() - A, x)
    assert res.ok and abs(res.slope - 2) < 0.1, res


def test_torch_and_numpy_rules_agree():
    pytest.importorskip("torch", reason="PyTorch not installed")
    Mn, Mt = _manifold("numpy"), _manifold("torch")
    xn, xt = Mn.random_point(0), Mt.random_point(0)
    spec = rules.RAdamW(lr=1e-2)
    sn, st = spec.init(Mn, xn), spec.init(Mt, xt)
    for k in range(3):
        xn, sn = spec.step(Mn, xn, _grad(Mn, xn, k), sn)
        xt, st = spec.step(Mt, xt, _grad(Mt, xt, k), st)
    np.testing.assert_allclose(xt.to_dense().numpy(), xn.to_dense(), atol=1e-10)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: rules.RSGD(lr=-1.0), "learning rate"),
        (lambda: rules.RAdamW(betas=(1.0, 0.9)), "betas"),
        (lambda: rules.RSGD(nesterov=True), "Nesterov"),
        (lambda: rules.RAdamW(cg_maxiter=0), "cg_maxiter"),
        (lambda: rules.RAdamW(structure="diag"), "structure"),
        (lambda: rules.RAdamW(factoring="quad"), "factoring"),
        (lambda: rules.RAdamW(solver="lu"), "solver"),
        (lambda: rules.RAdamW(metric_eps=0.0), "metric_eps"),
        (lambda: rules.DLRAAdam(max_rank=0), "max_rank"),
        (lambda: rules.DLRAAdam(min_rank=3, max_rank=2), "exceeds max_rank"),
        (lambda: rules.RAdaGrad(lr_decay=-1), "lr_decay"),
        (lambda: rules.RAdamW(structure="block", exact=False), "structure='full' only"),
    ],
)
def test_bad_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_specs_are_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        rules.RAdamW(0.1)
    spec = rules.RAdamW()
    with pytest.raises(AttributeError):
        spec.lr = 0.5


SOLVER_OF = {
    "RHeavyBall": rules.RHeavyBall,
    "RAdaGrad": rules.RAdaGrad,
    "RAdamW": rules.RAdamW,
    "DLRAHeavyBall": rules.DLRAHeavyBall,
    "DLRAAdam": rules.DLRAAdam,
    "RAdamWElementwise": rules.RAdamWElementwise,
    "ReferenceRAdamW": rules.ReferenceRAdamW,
    "ReferenceRAdaGrad": rules.ReferenceRAdaGrad,
    "Riemannion": rules.Riemannion,
}


@pytest.mark.parametrize("name", list(SOLVER_OF))
def test_numpy_solvers_take_their_defaults_from_the_spec(name):
    solver = getattr(ro.solvers, name)()
    assert solver.spec == SOLVER_OF[name]()
    with pytest.raises(ValueError, match="unknown options"):
        getattr(ro.solvers, name)(learning_rate=0.1)


@pytest.mark.parametrize("reg", registry.registered(), ids=lambda r: r.name)
def test_torch_optimizers_keywords_are_the_spec_fields(reg):
    """For every registered rule, the torch optimizer's keywords are the spec's fields with the
    spec's defaults, plus the ordinary rule's own options (torch's defaults) and the common
    options: nothing else, nothing renamed (the defaults are written once, in rankopt.rules)."""
    rt = pytest.importorskip("rankopt.torch", reason="PyTorch not installed")
    from rankopt.torch.optimizer import COMMON_OPTIONS
    from rankopt.torch.ordinary import ORDINARY

    cls = getattr(rt, reg.name)
    assert cls is rt.optimizer_class(reg.spec) and cls.spec_class is reg.spec
    params = dict(inspect.signature(cls).parameters)
    params.pop("params")
    spec = {f.name: f.default for f in fields(reg.spec)}
    ordinary = ORDINARY[reg.ordinary]
    own = {k for k in ordinary.keys if k not in spec and k not in reg.ordinary_fixed}
    assert set(params) == set(spec) | own | set(COMMON_OPTIONS) | {"check_finite"}
    for name, default in spec.items():
        assert params[name].default == default, (reg.name, name)
    for name in own:
        assert params[name].default == ordinary.default(name), (reg.name, name)
    assert cls.__mro__[1] is rt.RiemannianOptimizer  # no optimizer derives from another


@pytest.mark.parametrize("reg", registry.registered(), ids=lambda r: r.name)
def test_numpy_solvers_keywords_are_the_spec_fields(reg):
    from rankopt.solvers.adaptive import LOOP_OPTIONS

    cls = getattr(ro.solvers, reg.name)
    params = inspect.signature(cls).parameters
    spec = {f.name: f.default for f in fields(reg.spec)}
    assert set(params) == set(spec) | set(LOOP_OPTIONS)
    assert all(params[k].default == v for k, v in spec.items())
    assert cls.__mro__[1] is ro.solvers.RuleSolver
    assert ro.solvers.METHODS[reg.method] is cls
