"""Riemannion (Bogachev et al., arXiv 2507.12142): the rule against an independent dense
transcription of the paper's update, the properties of its orthogonalized step, and the
documented discontinuity of the exact matrix sign (the continuous Newton-Schulz variant is in
tests/test_continuity.py's tables with every other optimizer)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import path_tolerance

import rankopt as ro
from rankopt import rules

BACKENDS = ["numpy", "torch"]
NS = (3.4445, -4.7750, 2.0315)  # Muon's quintic coefficients (Jordan et al. 2024)


# ---------------------------------------------------------------------------
# the paper's update on dense m x n matrices, written independently of rankopt's geometry
# ---------------------------------------------------------------------------


def _tangent_projector(X: np.ndarray, r: int):
    U, _, Vh = np.linalg.svd(X)
    PU, PV = U[:, :r] @ U[:, :r].T, Vh[:r].T @ Vh[:r]
    return lambda Z: PU @ Z + Z @ PV - PU @ Z @ PV


def _dense_sign(B: np.ndarray, tol: float, ns_steps: int, kappa: list) -> np.ndarray:
    if ns_steps == 0:  # the exact polar factor, directions below tol * s_1 dropped
        W, s, Vh = np.linalg.svd(B, full_matrices=False)
        keep = s > tol * s[0] if s[0] > 0 else np.zeros_like(s, bool)
        kappa.append(s[0] / s[keep][-1])  # how much the sign amplifies rounding
        return (W * keep) @ Vh
    a, b, c = NS
    X = B / np.linalg.norm(B) if np.linalg.norm(B) > 0 else B
    for _ in range(ns_steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X


def _dense_riemannion(X, grads, r, lr, beta, wd, tol=1e-7, ns_steps=0):
    """Heavy ball on the tangent space with projection transport, D = P_X(sign(B)), then the
    best rank-r approximation of (1 - lr wd) X - lr D (the paper's Algorithm, dense). Also
    returns the largest ratio s_1 / s_k of the kept singular values of the buffers (1 for
    Newton-Schulz, a polynomial)."""
    B = np.zeros_like(X)
    kappa = [1.0]
    for G in grads:
        P = _tangent_projector(X, r)
        B = beta * P(B) + P(G)
        D = P(_dense_sign(B, tol, ns_steps, kappa))
        W, s, Vh = np.linalg.svd((1.0 - lr * wd) * X - lr * D)
        X = (W[:, :r] * s[:r]) @ Vh[:r]
    return X, max(kappa)


def _rule_run(spec, M, x, grads):
    st = spec.init(M, x)
    for G in grads:
        G = M.backend.asarray(G)
        x, st = spec.step(M, x, M.geometry.project(x, G), st)
    return x


def _np(a):
    return np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a, dtype=float)


def _tdense(M, x, xi):
    """The ambient m x n matrix of the tangent vector ``xi`` at ``x``."""
    return _np(M.geometry.embed(x, xi).to_dense())


def _manifold(backend, m=9, n=7, r=3):
    if backend == "torch":
        pytest.importorskip("torch", reason="PyTorch not installed")
    return ro.FixedRankManifold(m, n, r, backend=backend, validate=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ns_steps", [0, 5])
@pytest.mark.parametrize("grad_rank", [1, 7])
def test_steps_equal_the_dense_transcription_of_the_paper(backend, ns_steps, grad_rank):
    """Four steps (momentum 0.9, weight decay 0.1) equal the dense update to 1e-12 relative,
    for full-rank and rank-1 gradients, with the exact sign (the paper) and Newton-Schulz. The
    exact sign amplifies rounding by the buffer's s_1 / s_k (the transported momentum of rank-1
    gradients has kept singular values down to 4e-7 s_1): there the tolerance is two paths'
    times that ratio."""
    M = _manifold(backend)
    x = M.random_point(seed=2)
    rng = np.random.default_rng(grad_rank)
    grads = [rng.standard_normal((9, grad_rank)) @ rng.standard_normal((grad_rank, 7))
             for _ in range(4)]  # fmt: skip
    spec = rules.Riemannion(lr=0.07, momentum=0.9, weight_decay=0.1, ns_steps=ns_steps)
    ours = _np(M.to_dense(_rule_run(spec, M, x, grads)))
    X0 = _np(M.to_dense(x))
    ref, kappa = _dense_riemannion(X0, grads, 3, 0.07, 0.9, 0.1, ns_steps=ns_steps)
    tol = 1e-12 if kappa < 1e3 else path_tolerance(4) * kappa
    assert (ns_steps, grad_rank, kappa < 1e3) != (0, 1, True)  # the ill-conditioned case is one
    assert np.linalg.norm(ours - ref) <= tol * np.linalg.norm(ref)


def _quadratic(M, seed=0):
    A = np.random.default_rng(seed).standard_normal((M.m, M.n))
    return A, (lambda X: 0.5 * float(np.sum((X - A) ** 2)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_step_is_the_tangent_nuclear_norm_direction_with_slope_2(backend):
    """Momentum aside, the first step direction D = P_x(sign(g)) has <g, D> = ||g||_* (the
    steepest descent of the spectral norm), and along it f(R_x(-t D)) = f(x) - t <g, D> + O(t^2):
    the remainder's log-log slope is 2 (a finite-difference check of the step)."""
    M = _manifold(backend)
    x = M.random_point(seed=4)
    A, f = _quadratic(M)
    X = _np(M.to_dense(x))
    g = M.geometry.project(x, M.backend.asarray(X - A))
    D = M.geometry.orthogonalize(x, g, 1e-7)
    gd = float(M.geometry.inner(g, D))
    assert gd == pytest.approx(np.linalg.norm(_np(_tdense(M, x, g)), "nuc"), rel=1e-13)
    ts = np.logspace(-5, -2, 7)
    rem = [abs(f(_np(M.to_dense(M.geometry.retract(x, D, -t)))) - f(X) + t * gd) for t in ts]
    slope = np.polyfit(np.log(ts), np.log(rem), 1)[0]
    assert 1.9 < slope < 2.1, slope


@pytest.mark.parametrize("ns_steps", [0, 5])
@pytest.mark.parametrize("scale", [1e-150, 1e-6, 1e8])
def test_trajectory_does_not_depend_on_the_gradient_scale(ns_steps, scale):
    """Orthogonalization removes the gradient's scale: gradients times 1e-150 ... 1e8 give the
    same five steps, to the tolerance of two computation paths."""
    M = _manifold("numpy")
    x = M.random_point(seed=5)
    rng = np.random.default_rng(5)
    grads = [rng.standard_normal((9, 7)) for _ in range(5)]
    spec = rules.Riemannion(lr=0.05, weight_decay=0.1, ns_steps=ns_steps)
    a = M.to_dense(_rule_run(spec, M, x, grads))
    b = M.to_dense(_rule_run(spec, M, x, [scale * G for G in grads]))
    assert np.linalg.norm(a - b) <= path_tolerance(5) * np.linalg.norm(a)


def test_zero_gradient_does_not_move_and_rank_one_gradient_moves_in_rank_two():
    """A zero buffer gives D = 0 (no step along rounding noise); a rank-1 gradient gives a
    step whose tangent matrix has rank 2 (P_x of a rank-1 matrix), not 2r."""
    M = _manifold("numpy")
    x = M.random_point(seed=6)
    zero = M.geometry.zero_vector(x)
    assert all(np.all(a == 0) for a in M.geometry.orthogonalize(x, zero, 1e-7))
    y, _ = rules.Riemannion(lr=0.1).step(M, x, zero, rules.Riemannion().init(M, x))
    assert np.linalg.norm(M.to_dense(y) - M.to_dense(x)) <= 1e-14 * np.linalg.norm(M.to_dense(x))
    rng = np.random.default_rng(6)
    G = np.outer(rng.standard_normal(9), rng.standard_normal(7))
    D = M.geometry.orthogonalize(x, M.geometry.project(x, G), 1e-7)
    s = np.linalg.svd(_tdense(M, x, D), compute_uv=False)
    assert np.sum(s > 1e-10 * s[0]) == 2


def test_exact_sign_jumps_where_a_singular_value_crosses_the_cutoff():
    """The paper's exact matrix sign is discontinuous (documented in docs/optimizers.md): a
    buffer with a singular value just above or just below ortho_tol * s_1 gives steps that
    differ by O(1); Muon's Newton-Schulz variant (ns_steps=5) moves by about as little as the
    buffer did."""
    M = _manifold("numpy")
    x = M.random_point(seed=7)
    tol = 1e-7
    change = {}
    for steps in (0, 5):
        a, b = (
            _tdense(M, x, M.geometry.orthogonalize(x, _diagonal(M, x, [1.0, 0.5, c]), tol, steps))
            for c in (1.01 * tol, 0.99 * tol)
        )
        change[steps] = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert change[0] > 0.5, change  # a third direction lifted to unit length: 1 / sqrt(3)
    assert change[5] < 1e3 * 0.02 * tol, change  # the buffer moved by 0.02 tol relative


def _diagonal(M, x, values):
    """The tangent vector ``U diag(values) V^T`` at ``x`` (singular values ``values``)."""
    zero = M.geometry.zero_vector(x)
    return ro.TangentVector(np.diag(values), zero.Up, zero.Vp)


@pytest.mark.parametrize("how", ["signs", "rotation"])
def test_exact_sign_step_does_not_depend_on_the_factorization(how):
    """Other signs of the singular vectors, or a rotation within equal singular values, give the
    same step (well-conditioned buffer: a full-rank gradient), to two paths' tolerance."""
    M = _manifold("numpy", r=3)
    x = M.random_point(seed=8)
    if how == "signs":
        flip = np.array([1.0, -1.0, -1.0])
        y = ro.FixedRankPoint(x.U * flip, x.s, x.V * flip)
    else:  # equal singular values: any rotation of their vectors
        Q, _ = np.linalg.qr(np.random.default_rng(8).standard_normal((3, 3)))
        x = ro.FixedRankPoint(x.U, np.ones(3), x.V)
        y = ro.FixedRankPoint(x.U @ Q, np.ones(3), x.V @ Q)
    G = [np.random.default_rng(9 + k).standard_normal((9, 7)) for k in range(3)]
    spec = rules.Riemannion(lr=0.05, weight_decay=0.1)
    a, b = M.to_dense(_rule_run(spec, M, x, G)), M.to_dense(_rule_run(spec, M, y, G))
    assert np.linalg.norm(a - b) <= path_tolerance(3) * np.linalg.norm(a)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(ns_steps=-1), "ns_steps"),
        (dict(ns_steps=2.5), "ns_steps"),
        (dict(ortho_tol=1.0), "ortho_tol"),
        (dict(lr=-1.0), "learning rate"),
    ],
)
def test_bad_hyperparameters_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        rules.Riemannion(**kw)


def test_solve_method_and_solver_come_from_the_registration():
    """``solve(..., method="riemannion")`` and ``rankopt.solvers.Riemannion`` exist without
    front-end code; with a decaying schedule the solver reduces a completion cost."""
    p = ro.problems.random_completion(30, 25, 2, oversampling=4, seed=1)
    solver = ro.solvers.Riemannion(lr=lambda k: 0.3 * 0.93**k, max_iter=60)
    x0 = ro.FixedRankManifold(30, 25, 2).random_point(seed=0)
    res = solver.run(p, x0)
    assert res.history.cost[-1] < 0.05 * res.history.cost[0]
    assert "riemannion" in ro.solvers.METHODS
