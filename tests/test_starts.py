"""The locally optimal start (rankopt.starts, Bogachev et al. 2025's LOI): its optimality, its
independence of the SVD's signs, stacks and backends, continuity, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import CONTINUITY_GAIN, path_tolerance

import rankopt as ro
from rankopt.starts import LOIWarning, locally_optimal_start

BACKENDS = ["numpy", "torch"]


def _manifold(backend="numpy", m=12, n=9, r=3):
    if backend == "torch":
        pytest.importorskip("torch", reason="PyTorch not installed")
    return ro.FixedRankManifold(m, n, r, backend=backend)


def _np(a):
    return np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a, dtype=float)


def _projected_norm(M, x, G) -> float:
    g = M.geometry.project(x, M.backend.asarray(G))
    return float(M.geometry.inner(g, g)) ** 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_start_captures_the_top_2r_singular_values_of_the_gradient(backend):
    """||P_X0(G)|| = sqrt(sigma_1^2 + ... + sigma_2r^2), more than at the top-r point and at
    20 random rank-r points; X0 has singular values |scale| and orthonormal factors."""
    M = _manifold(backend)
    G = np.random.default_rng(0).standard_normal((12, 9))
    sv = np.linalg.svd(G, compute_uv=False)
    x = locally_optimal_start(M, G, 1e-2)
    M.check_point(x)
    assert np.allclose(_np(x.s), 1e-2, rtol=0, atol=1e-17)
    best = _projected_norm(M, x, G)
    assert best == pytest.approx(np.linalg.norm(sv[:6]), rel=1e-13)
    top_r = M.from_matrix(M.backend.asarray(G))
    assert _projected_norm(M, top_r, G) < best * (1 - 1e-3)
    for seed in range(20):
        assert _projected_norm(M, M.random_point(seed), G) < best


def test_start_does_not_depend_on_the_signs_of_the_singular_vectors():
    """-G has singular vectors of flipped signs: the same start; NumPy and torch agree to a
    few eps (their LAPACK calls choose signs independently)."""
    M = _manifold()
    G = np.random.default_rng(1).standard_normal((12, 9))
    a = locally_optimal_start(M, G, 0.05).to_dense()
    assert np.abs(locally_optimal_start(M, -G, 0.05).to_dense() - a).max() <= 1e-15
    t = locally_optimal_start(_manifold("torch"), G, 0.05).to_dense()
    assert np.abs(_np(t) - a).max() <= path_tolerance(1) * np.abs(a).max()


def test_negative_scale_flips_the_sign_and_stacks_equal_single_starts():
    M = _manifold()
    Gs = np.random.default_rng(2).standard_normal((2, 3, 12, 9))
    xs = locally_optimal_start(M, Gs, -0.1)
    assert xs.batch_shape == (2, 3)
    for i in range(2):
        for j in range(3):
            single = locally_optimal_start(M, Gs[i, j], 0.1).to_dense()
            assert np.abs(xs.to_dense()[i, j] + single).max() <= 1e-15


def test_start_is_continuous_in_the_gradient():
    """A relative change of 1e-13 of G moves X0 by at most CONTINUITY_GAIN * 1e-13 relative
    (the gaps between singular values of a Gaussian G are of order 1)."""
    M = _manifold()
    rng = np.random.default_rng(3)
    G = rng.standard_normal((12, 9))
    a = locally_optimal_start(M, G, 1.0).to_dense()
    b = locally_optimal_start(M, G * (1 + 1e-13 * rng.standard_normal(G.shape)), 1.0).to_dense()
    assert np.linalg.norm(a - b) <= CONTINUITY_GAIN * 1e-13 * np.linalg.norm(a)


def test_gradient_of_rank_below_2r_warns():
    M = _manifold()
    rng = np.random.default_rng(4)
    G = rng.standard_normal((12, 4)) @ rng.standard_normal((4, 9))  # rank 4 < 2r = 6
    with pytest.warns(LOIWarning, match="numerical rank below 2r = 6"):
        locally_optimal_start(M, G, 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        locally_optimal_start(M, rng.standard_normal((12, 9)), 0.01)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (((12, 9, 5), np.ones((12, 9)), 0.1), r"2 r <= min\(m, n\)"),
        (((12, 9, 3), np.ones((9, 12)), 0.1), "expected"),
        (((12, 9, 3), np.zeros((12, 9)), 0.1), "gradient is zero"),
        (((12, 9, 3), np.full((12, 9), np.nan), 0.1), "non-finite"),
        (((12, 9, 3), np.ones((12, 9)), 0.0), "scale"),
        (((12, 9, 3), np.ones((12, 9)), float("inf")), "scale"),
    ],
)
def test_bad_input_is_named(args, match):
    shape, G, scale = args
    with pytest.raises(ValueError, match=match):
        locally_optimal_start(ro.FixedRankManifold(*shape), G, scale)
