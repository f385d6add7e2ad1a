"""The pure update rules: invariants, tangency of states, O((m+n) r) memory, exact special cases."""

from __future__ import annotations

import numpy as np
import pytest

import rankopt as ro
from rankopt.diagnostics import check_gradient
from rankopt.solvers import rules

BACKENDS = ["numpy", "torch"]


def _manifold(backend, m=40, n=30, r=4):
    if backend == "torch":
        pytest.importorskip("torch", reason="PyTorch not installed")
    return ro.FixedRankManifold(m, n, r, backend=backend, validate=False)


def _grad(M, x, seed):
    rng = np.random.default_rng(seed)
    Z = M.backend.asarray(rng.standard_normal((M.m, M.n)))
    return M.projection(x, Z)


def _tangency(M, x, xi) -> float:
    be, xp = M.backend, M.backend.xp
    return max(
        be.to_float(xp.max(xp.abs(x.U.T @ xi.Up))), be.to_float(xp.max(xp.abs(x.V.T @ xi.Vp)))
    )


def _n_elements(obj) -> int:
    """Total number of array elements held by a rule state (recursively)."""
    if obj is None or isinstance(obj, (int, float, bool, str)):
        return 0
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return int(np.prod(obj.shape))
    if isinstance(obj, dict):
        return sum(_n_elements(v) for v in obj.values())
    return 0


STEPS = [
    ("rsgd", rules.rsgd_init, rules.rsgd_step, {"lr": 0.1, "momentum": 0.9}),
    (
        "rsgd-nesterov",
        rules.rsgd_init,
        rules.rsgd_step,
        {"lr": 0.1, "momentum": 0.9, "nesterov": True},
    ),
    ("radagrad", rules.radagrad_init, rules.radagrad_step, {"lr": 0.05}),
    ("radamw", rules.radamw_init, rules.radamw_step, {"lr": 0.01, "weight_decay": 0.1}),
    (
        "dlra-heavyball",
        rules.dlra_heavyball_init,
        rules.dlra_heavyball_step,
        {"lr": 0.1, "rank_tol": None},
    ),
    ("dlra-adam", rules.dlra_adam_init, rules.dlra_adam_step, {"lr": 0.01, "rank_tol": None}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,init,step,hyper", STEPS, ids=[s[0] for s in STEPS])
def test_states_stay_tangent_and_point_valid(backend, name, init, step, hyper):
    M = _manifold(backend)
    x = M.random_point(0)
    state = init(M, x)
    for k in range(4):
        x, state = step(M, x, _grad(M, x, k), state, **hyper)
        M.check_point(x, orthonormal=True)
        for f in ("momentum_buffer", "exp_avg"):
            v = getattr(state, f, None)
            if v is not None:
                assert _tangency(M, x, v) < 1e-10, (name, f)


@pytest.mark.parametrize("name,init,step,hyper", STEPS, ids=[s[0] for s in STEPS])
def test_state_memory_is_linear(name, init, step, hyper):
    m, n, r = 600, 500, 3
    M = _manifold("numpy", m, n, r)
    x = M.random_point(0)
    state = init(M, x)
    for k in range(2):
        x, state = step(M, x, M.random_tangent_vector(x, k), state, **hyper)
    d = rules.state_to_dict(state)
    # every array is O((m + n) r): here at most (m + n) * r + (m + n) + r^2 elements; m*n would be 300000
    assert _n_elements(d) <= 2 * ((m + n) * r + (m + n) + r * r)


@pytest.mark.parametrize("name,init,step,hyper", STEPS, ids=[s[0] for s in STEPS])
def test_state_dict_roundtrip(name, init, step, hyper):
    M = _manifold("numpy")
    x = M.random_point(0)
    state = init(M, x)
    x, state = step(M, x, _grad(M, x, 1), state, **hyper)
    back = rules.state_from_dict(rules.state_to_dict(state))
    g = _grad(M, x, 2)
    y1, _ = step(M, x, g, state, **hyper)
    y2, _ = step(M, x, g, back, **hyper)
    np.testing.assert_array_equal(y1.to_dense(), y2.to_dense())


def test_weight_decay_alone_shrinks_exactly():
    M = _manifold("numpy")
    x = M.random_point(0)
    state = rules.radamw_init(M, x)
    y, _ = rules.radamw_step(M, x, M.zero_vector(x), state, lr=0.1, weight_decay=0.5)
    np.testing.assert_allclose(y.to_dense(), 0.95 * x.to_dense(), atol=1e-13)


def test_rsgd_without_momentum_is_a_retraction_step():
    M = _manifold("numpy")
    x = M.random_point(0)
    g = _grad(M, x, 0)
    y, _ = rules.rsgd_step(M, x, g, rules.rsgd_init(M, x), lr=0.3)
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
        y, _ = rules.radamw_step(M, x, g * scale, rules.radamw_init(M, x), lr=lr, weight_decay=0.0)
        D = (y.to_dense() - x.to_dense()) / lr
        steps[scale] = D
        assert 0.5 < np.sqrt(np.mean(D**2)) < 2.0, scale
        assert np.sum(D * G) / (np.linalg.norm(D) * np.linalg.norm(G)) < -0.9
        assert np.mean(np.sign(D) == -np.sign(G)) > 0.9
    np.testing.assert_allclose(steps[1e6], steps[1.0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(steps[1e-6], steps[1.0], rtol=0.1, atol=0.1)  # eps = 1e-8 shows


def test_dlra_rank_grows_and_shrinks():
    M = _manifold("numpy", 40, 30, 3)
    x = M.random_point(0)
    big = _grad(M, x, 0) * 10.0
    y, _ = rules.dlra_heavyball_step(
        M, x, big, rules.dlra_heavyball_init(M, x), lr=1.0, momentum=0.0, rank_tol=1e-8
    )
    assert y.rank > 3  # augmented basis kept
    x = ro.FixedRankPoint(x.U, np.array([1.0, 1.0, 1e-4]), x.V)
    small = M.zero_vector(x)
    z, _ = rules.dlra_heavyball_step(
        M, x, small, rules.dlra_heavyball_init(M, x), lr=1.0, momentum=0.0, rank_tol=1e-3
    )
    assert z.rank == 2  # the 1e-4 direction is truncated


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps", [1, 5])
def test_adaptive_metric_gradients_fd(backend, steps):
    """The metric used by RAdaGrad/RAdamW after some updates gives the true Riemannian gradient."""
    M = _manifold(backend)
    x = M.random_point(0)
    state = rules.radamw_init(M, x)
    for k in range(steps):
        x, state = rules.radamw_step(M, x, _grad(M, x, k), state, lr=1e-2)
    Mg = M.with_metric(state.metric)
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
    sn, st = rules.radamw_init(Mn, xn), rules.radamw_init(Mt, xt)
    for k in range(3):
        gn = _grad(Mn, xn, k)
        gt = _grad(Mt, xt, k)
        xn, sn = rules.radamw_step(Mn, xn, gn, sn, lr=1e-2)
        xt, st = rules.radamw_step(Mt, xt, gt, st, lr=1e-2)
    np.testing.assert_allclose(xt.to_dense().numpy(), xn.to_dense(), atol=1e-10)


def test_bad_hyperparameters():
    M = _manifold("numpy")
    x = M.random_point(0)
    g = _grad(M, x, 0)
    with pytest.raises(ValueError, match="learning rate"):
        rules.rsgd_step(M, x, g, rules.rsgd_init(M, x), lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        rules.radamw_step(M, x, g, rules.radamw_init(M, x), lr=0.1, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="Nesterov"):
        rules.rsgd_step(M, x, g, rules.rsgd_init(M, x), lr=0.1, nesterov=True)
