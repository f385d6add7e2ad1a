"""DLRAHeavyBall / DLRAAdam: the augmented BUG integrator (rankopt.rules.dlra).

The reference is an independent dense NumPy implementation of one augmented BUG step, written
from the description of the algorithm (bases augmented with the K- and L-step directions, a
Galerkin step on the 2r x 2r core with the core's own gradient ``U_hat^T G V_hat``, truncation
at ``rank_tol ||s||``, optimizer moments on the core rotated with the bases).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_paths_agree, basis_free_state

import rankopt as ro
from rankopt import rules
from rankopt.containers import FixedRankPoint

BACKENDS = ["numpy", "torch"]


def _np(a):
    return np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a, dtype=float)


def _pad(a, k):
    out = np.zeros((k, k))
    out[: a.shape[0], : a.shape[1]] = a
    return out


def _keep(d, tol, lo, hi):
    """Smallest j with ||d_{j:}|| <= tol ||d||, clipped to [lo, hi]."""
    if tol is None:
        return None
    tails = np.sqrt(np.cumsum((d**2)[::-1])[::-1])
    j = next((k for k in range(1, len(d)) if tails[k] <= tol * tails[0]), len(d))
    return int(min(max(j, lo), hi))


def _adafactor(vl, vr, eps):
    """Weights of the Adafactor-factored metric: sqrt(v + eps^2 mu) / mu^(1/4) per side."""
    mu = vl.mean()
    return np.sqrt(vl + eps**2 * mu) / mu**0.25, np.sqrt(vr + eps**2 * mu) / mu**0.25


def _new_directions(P, basis):
    """An orthonormal basis of span(P) (full column rank): its QR factor ("qr", the group's), or
    its left singular vectors ("svd", rankopt's choice, the same span; computed as rankopt does,
    ``Q_0 W`` from ``P = Q_0 R``, ``R = W D Z^T``, then a second QR, because the core Adam's
    second moment also sees the signs LAPACK gives the vectors)."""
    Q0, R = np.linalg.qr(P)
    return Q0 if basis == "qr" else np.linalg.qr(Q0 @ np.linalg.svd(R)[0])[0]


def dense_bug_step(U, s, V, G, moments, count, *, kind, lr, tol, hi, lo=1, mu=0.9,
                   betas=(0.9, 0.999), eps=1e-3, wd=0.0, basis="svd"):  # fmt: skip
    """One augmented BUG step, dense. ``kind``: "hb" (heavy ball on the core), "core" (Adam on
    the core entries, the DLRA group's layers) or "factored" (Adam first moment on the core, the
    Galerkin step under the Adafactor-factored metric with ambient row/column statistics).
    ``basis``: how the new directions are made orthonormal ("svd": left singular vectors of the
    K-/L-step directions, as rankopt does; "qr": the group's QR, the same span).
    Returns (U1, s1, V1, moments in the new bases)."""
    r = U.shape[1]
    X = U @ np.diag(s) @ V.T
    K_dir = G @ V  # K = U S moves along -dL/dK = -G V
    L_dir = G.T @ U  # L = V S^T moves along -G^T U
    Qu = _new_directions(K_dir - U @ (U.T @ K_dir), basis)
    Qv = _new_directions(L_dir - V @ (V.T @ L_dir), basis)
    Uh, Vh = np.hstack([U, Qu]), np.hstack([V, Qv])
    S0 = Uh.T @ X @ Vh
    Gh = Uh.T @ G @ Vh  # gradient of the loss with respect to the augmented core
    k = 2 * r
    if kind == "hb":
        g = Gh + wd * S0
        b = mu * _pad(moments[0], k) + g if count > 0 else g
        S1 = S0 - lr * b
        new = [b]
    elif kind == "core":
        b1, b2 = betas
        t = count + 1
        m = b1 * _pad(moments[0], k) + (1 - b1) * Gh
        v = b2 * _pad(moments[1], k) + (1 - b2) * Gh**2
        S1 = S0 * (1 - lr * wd) - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        new = [m, v]
    else:
        b1, b2 = betas
        t = count + 1
        amb = Uh @ Gh @ Vh.T  # the core gradient as an ambient m x n matrix
        vl = b2 * moments[1] + (1 - b2) * (amb**2).mean(1)
        vr = b2 * moments[2] + (1 - b2) * (amb**2).mean(0)
        dl, dr = _adafactor(vl / (1 - b2**t), vr / (1 - b2**t), eps)
        m = b1 * _pad(moments[0], k) + (1 - b1) * Gh
        AL, AR = Uh.T @ np.diag(dl) @ Uh, Vh.T @ np.diag(dr) @ Vh
        S1 = S0 * (1 - lr * wd) - lr * np.linalg.solve(AL, m / (1 - b1**t)) @ np.linalg.inv(AR)
        new = [m, vl, vr]
    P, d, Qt = np.linalg.svd(S1)
    Q = Qt.T
    j = _keep(d, tol, lo, hi) or r
    Pj, Qj = P[:, :j], Q[:, :j]
    out = [Pj.T @ new[0] @ Qj]
    if kind == "core":
        out.append((Pj.T @ np.sqrt(new[1]) @ Qj) ** 2)
    elif kind == "factored":
        out += new[1:]  # ambient statistics: not rotated
    return Uh @ Pj, d[:j], Vh @ Qj, out


#: Adam's eps in the "core" variant is absolute: core entries that are zero in exact arithmetic
#: carry rounding (1e-17) that eps = 1e-8 would turn into steps of lr 1e-9, different in any two
#: implementations; 1e-4 keeps that below 1e-12 (the factored variant's eps is relative)
EPS = {"hb": None, "core": 1e-4, "factored": 1e-3}


def _spec(kind, **kw):
    if kind == "hb":
        return rules.DLRAHeavyBall(**kw)
    return rules.DLRAAdam(second_moment=kind, metric_eps=EPS[kind], **kw)


def _moments(kind, st):
    if kind == "hb":
        return [st.momentum_buffer]
    if kind == "core":
        return [st.exp_avg, st.exp_avg_sq]
    return [st.exp_avg, st.row_stats, st.col_stats]


def _zero_moments(kind, r, m, n):
    if kind == "hb":
        return [np.zeros((r, r))]
    if kind == "core":
        return [np.zeros((r, r))] * 2
    return [np.zeros((r, r)), np.zeros(m), np.zeros(n)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("kind", "basis"),
    [("hb", "svd"), ("hb", "qr"), ("core", "svd"), ("factored", "svd"), ("factored", "qr")],
)
@pytest.mark.parametrize("tol", [None, 1e-2])
def test_step_equals_dense_augmented_bug(backend, kind, basis, tol):
    """Three steps of the rule equal the dense augmented BUG steps (float64, 1e-12): the
    point, and the moments (compared as ambient matrices ``U m V^T``, which do not depend on
    the sign conventions of QR and SVD; the squared second moment entrywise). With
    ``tol=1e-2`` the rank changes (it grows from 3 and the small directions are truncated).
    The heavy ball and the factored Adam depend only on the span of the new directions (they
    also equal the reference with the group's QR basis); the core Adam's elementwise second
    moment sees the basis too (rankopt's: the left singular vectors)."""
    if backend == "torch":
        pytest.importorskip("torch")
    m, n, r = 30, 24, 3
    rng = np.random.default_rng(0)
    M = ro.FixedRankManifold(m, n, r, backend=backend, validate=False)
    x = M.random_point(1)
    x = FixedRankPoint(x.U, x.s * M.backend.asarray(np.array([1.0, 0.5, 0.02])), x.V)
    spec = _spec(kind, lr=0.05, rank_tol=tol, max_rank=5)
    st = spec.init(M, x)
    U, s, V = _np(x.U), _np(x.s), _np(x.V)
    mom = _zero_moments(kind, r, m, n)
    ranks = []
    for k in range(3):
        G = rng.standard_normal((m, n)) + 3.0 * np.outer(
            rng.standard_normal(m), rng.standard_normal(n)
        )
        Mk = M.with_rank(x.rank)
        Gb = Mk.backend.asarray(G)
        x, st = spec.step(
            Mk, x, Mk.geometry.project(x, Gb), st, normal=rules.normal_block_of(Mk, Gb)
        )
        U, s, V, mom = dense_bug_step(
            U, s, V, G, mom, k, kind=kind, lr=0.05, tol=tol, hi=5, eps=EPS[kind], basis=basis
        )
        ranks.append(x.rank)
        assert x.rank == len(s)
        np.testing.assert_allclose(_np(x.to_dense()), U @ np.diag(s) @ V.T, atol=1e-12)
        got = _moments(kind, st)
        np.testing.assert_allclose(
            _np(x.U) @ _np(got[0]) @ _np(x.V).T, U @ mom[0] @ V.T, atol=1e-12
        )
        for a, b in zip(got[1:], mom[1:], strict=True):
            # row/column statistics (factored): ambient, 1e-12. v on the core: entrywise in the
            # new bases, rotated by the individual singular vectors of the core (not only by
            # the kept subspace), which rounding moves by about eps / (gap between singular
            # values): 1e-7 relative
            rtol = 1e-7 if kind == "core" else 1e-12
            np.testing.assert_allclose(_np(a), b, rtol=rtol, atol=1e-14)
    if tol is not None:
        assert len(set(ranks)) > 1 or ranks[0] != r, ranks  # the rank did change


def regression(m=60, n=50, r=4, kappa=100.0, samples=400, seed=0):
    """Problem (i) of benchmarks/optimizers.py: W* (m x n, rank r, singular values geometric
    from 1 to 1/kappa), Gaussian inputs; loss 0.5 ||(W - W*) L||^2 / f(0), Sigma = L L^T."""
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((m, r)))[0]
    V = np.linalg.qr(rng.standard_normal((n, r)))[0]
    W = (U * np.geomspace(1, 1 / kappa, r)) @ V.T
    X = rng.standard_normal((samples, n))
    H = X.T @ X / samples
    f0 = 0.5 * np.trace(W @ H @ W.T)
    return (lambda A: 0.5 * np.trace((A - W) @ H @ (A - W).T) / f0), (lambda A: (A - W) @ H / f0)


def _train(spec, cost, grad, x, steps):
    st = spec.init(ro.FixedRankManifold(*x.shape, x.rank, validate=False), x)
    losses, ranks = [], []
    for _ in range(steps):
        M = ro.FixedRankManifold(*x.shape, x.rank, validate=False)
        G = grad(x.to_dense())
        x, st = spec.step(M, x, M.geometry.project(x, G), st, normal=rules.normal_block_of(M, G))
        losses.append(cost(x.to_dense()))
        ranks.append(x.rank)
    return x, np.array(losses), np.array(ranks)


@pytest.mark.parametrize("kind", ["adam", "hb"])
def test_rank_10_start_finds_the_rank_4_target(kind):
    """Started at rank 10 on a rank-4 target with rank_tol=1e-3, the DLRA rules end at rank 4
    with loss < 1e-8, and the rank never exceeds the budget (the starting rank)."""
    cost, grad = regression()
    x = ro.FixedRankManifold(60, 50, 10, validate=False).random_point(7)
    x = FixedRankPoint(x.U, 0.1 * x.s, x.V)
    spec = rules.DLRAAdam(lr=5e-3) if kind == "adam" else rules.DLRAHeavyBall(lr=0.05)
    assert spec.rank_tol == 1e-3 and spec.max_rank is None
    y, losses, ranks = _train(spec, cost, grad, x, 500)
    assert y.rank == 4 and losses[-1] < 1e-8, (y.rank, losses[-1])
    assert ranks.max() <= 10 and ranks[0] <= 10


def test_rank_budget_min_rank_and_growth():
    """The rank grows (normal-normal block) up to max_rank, never below min_rank, and with
    max_rank=None never above the starting rank."""
    M = ro.FixedRankManifold(30, 24, 2, validate=False)
    x = M.random_point(0)
    G = np.random.default_rng(0).standard_normal((30, 24)) * 10
    nb = rules.normal_block_of(M, G)
    for cap, want in ((None, 2), (3, 3), (8, 4)):
        spec = rules.DLRAHeavyBall(lr=1.0, momentum=0.0, rank_tol=1e-8, max_rank=cap)
        y, st = spec.step(M, x, M.geometry.project(x, G), spec.init(M, x), normal=nb)
        assert y.rank == want, (cap, y.rank)  # 2r = 4 at most per step
    tiny = FixedRankPoint(x.U, np.array([1.0, 1e-6]), x.V)
    for lo, want in ((1, 1), (2, 2)):
        spec = rules.DLRAHeavyBall(lr=0.0, rank_tol=1e-3, min_rank=lo)
        y, _ = spec.step(M, tiny, M.zero_vector(tiny), spec.init(M, tiny), normal=nb)
        assert y.rank == want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["hb", "adam", "adam-core"])
def test_stacked_step_equals_single_steps(backend, name):
    """One call on a stack of 3 points equals 3 single calls (float64, 1e-12), also when the
    items end at different ranks (a list of points and states comes back)."""
    if backend == "torch":
        pytest.importorskip("torch")
    spec = {
        "hb": rules.DLRAHeavyBall(lr=0.1, rank_tol=1e-2, max_rank=5),
        "adam": rules.DLRAAdam(lr=0.02, rank_tol=1e-2, max_rank=5),
        "adam-core": rules.DLRAAdam(lr=0.02, rank_tol=1e-2, max_rank=5, second_moment="core"),
    }[name]
    M = ro.FixedRankManifold(20, 16, 3, backend=backend, validate=False)
    xs = M.random_point(0, batch_shape=(3,))
    scale = M.backend.asarray(np.array([[1.0, 0.5, 0.3], [1.0, 0.5, 1e-4], [1.0, 1.0, 1.0]]))
    xs = FixedRankPoint(xs.U, xs.s * scale, xs.V)
    rng = np.random.default_rng(1)
    # item 0: a large gradient (the rank grows), item 1: none and a tiny singular value (it
    # shrinks), item 2: a small gradient
    Z = M.backend.asarray(
        rng.standard_normal((3, 20, 16)) * np.array([10.0, 0.0, 1e-3])[:, None, None]
    )
    ys, sts = spec.step(
        M, xs, M.geometry.project(xs, Z), spec.init(M, xs), normal=rules.normal_block_of(M, Z)
    )
    for k in range(3):
        xk = FixedRankPoint(xs.U[k], xs.s[k], xs.V[k])
        y, st = spec.step(
            M,
            xk,
            M.geometry.project(xk, Z[k]),
            spec.init(M, xk),
            normal=rules.normal_block_of(M, Z[k]),
        )
        yk = ys[k] if isinstance(ys, list) else FixedRankPoint(ys.U[k], ys.s[k], ys.V[k])
        assert_paths_agree(yk, y, 1, "point")
        got = (
            rules.state_arrays(sts[k])
            if isinstance(ys, list)
            else {n: (v if np.ndim(v) == 0 else v[k]) for n, v in rules.state_arrays(sts).items()}
        )
        ref = rules.state_arrays(st)
        assert_paths_agree(basis_free_state(yk, got), basis_free_state(y, ref), 1)
    assert isinstance(ys, list)  # the items' ranks differ here


def test_needs_the_normal_block_and_state_roundtrip():
    M = ro.FixedRankManifold(20, 16, 3, validate=False)
    x = M.random_point(0)
    for spec in (rules.DLRAHeavyBall(), rules.DLRAAdam(), rules.DLRAAdam(second_moment="core")):
        assert rules.gradient_input(spec) == "normal"
        with pytest.raises(ValueError, match="normal-normal block"):
            spec.step(M, x, M.zero_vector(x), spec.init(M, x))
        st = spec.init(M, x)
        back = rules.state_from_arrays(type(st), rules.state_arrays(st))
        assert set(rules.state_arrays(back)) == set(rules.state_arrays(st))
        # O(r^2) on the core, plus O(m + n) ambient statistics for the factored second moment
        size = sum(np.size(v) for v in rules.state_arrays(st).values())
        assert size <= 2 * 9 + 20 + 16 + 2
    with pytest.raises(ValueError, match="second_moment"):
        rules.DLRAAdam(second_moment="diag")
    with pytest.raises(ValueError, match="exceeds max_rank"):
        rules.DLRAAdam(min_rank=3, max_rank=2)
