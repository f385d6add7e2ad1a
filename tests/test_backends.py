"""Backends agree: the same seed gives the same numbers, and every operation gives the same
result on NumPy, Torch (and CuPy when available) to 1e-10 in float64.

Also checks that dtype and device follow the manifold (outputs are arrays of its backend,
dtype and device).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rankopt as ro
from rankopt import diagnostics

SHAPE = (8, 6, 3)
AGREE = 1e-10


@pytest.fixture
def other(other_backend) -> str:
    return other_backend


def _pair(other, metric_name=None, h=None, seed=0):
    """The same manifold on numpy and on ``other`` (float64), with the same metric data."""
    out = []
    for name in ("numpy", other):
        M = ro.FixedRankManifold(*SHAPE, backend=name, dtype="float64")
        if metric_name is not None:
            M = M.with_metric(h.metric_zoo(M, seed)[metric_name])
        out.append(M)
    return out


def _close(h, a, b, tol=AGREE):
    an, bn = h.to_numpy(a), h.to_numpy(b)
    assert an.shape == bn.shape
    err = np.abs(an - bn).max(initial=0.0) / max(1.0, np.abs(an).max(initial=0.0))
    assert err < tol, err


def _close_tangent(h, xi, eta, tol=AGREE):
    for a, b in zip(xi, eta, strict=True):
        _close(h, a, b, tol)


def test_same_seed_same_random_numbers(h, other, seed):
    Mn, Mo = _pair(other)
    xn, xo = Mn.random_point(seed), Mo.random_point(seed)
    for a, b in zip((xn.U, xn.s, xn.V), (xo.U, xo.s, xo.V), strict=True):
        assert np.array_equal(h.to_numpy(a), h.to_numpy(b))
    tn, to = Mn.random_tangent_vector(xn, seed + 1), Mo.random_tangent_vector(xo, seed + 1)
    _close_tangent(h, tn, to, 1e-14)


def test_operations_agree(h, other, seed):
    Mn, Mo = _pair(other)
    xn, xo = Mn.random_point(seed), Mo.random_point(seed)
    rng = np.random.default_rng(seed + 50)
    Zd = rng.standard_normal(SHAPE[:2])
    Zs = h.random_sparse_dense(rng, *SHAPE[:2])
    A, B = rng.standard_normal((SHAPE[0], 2)), rng.standard_normal((SHAPE[1], 2))

    # projection of dense, sparse (both formats) and factored matrices
    _close_tangent(h, Mn.projection(xn, Zd), Mo.projection(xo, Mo.backend.asarray(Zd)))
    for fmt in ("csr", "coo"):
        _close_tangent(
            h, Mn.projection(xn, h.sparse(Mn, Zs, fmt)), Mo.projection(xo, h.sparse(Mo, Zs, fmt))
        )
    lr_n = ro.LowRankMatrix(A, B)
    lr_o = ro.LowRankMatrix(Mo.backend.asarray(A), Mo.backend.asarray(B))
    _close_tangent(h, Mn.projection(xn, lr_n), Mo.projection(xo, lr_o))

    # retraction, transport, inner product, norm, embed, dense, from_matrix
    xin, xio = Mn.random_tangent_vector(xn, seed + 1), Mo.random_tangent_vector(xo, seed + 1)
    yn, yo = Mn.retraction(xn, xin * 0.7), Mo.retraction(xo, xio * 0.7)
    _close(h, yn.s, yo.s)
    _close(h, Mn.to_dense(yn), Mo.to_dense(yo))
    # factors agree up to the sign of each singular pair
    signs = np.sign(np.sum(h.to_numpy(yn.U) * h.to_numpy(yo.U), axis=0))
    _close(h, h.to_numpy(yn.U), h.to_numpy(yo.U) * signs)
    _close(h, h.to_numpy(yn.V), h.to_numpy(yo.V) * signs)
    etan, etao = Mn.random_tangent_vector(xn, seed + 2), Mo.random_tangent_vector(xo, seed + 2)
    # transport to a common point: use numpy's y on both sides
    yo_same = ro.FixedRankPoint(*(Mo.backend.asarray(a) for a in (yn.U, yn.s, yn.V)))
    _close_tangent(h, Mn.transport(xn, yn, etan), Mo.transport(xo, yo_same, etao))
    assert abs(Mn.inner_product(xn, xin, etan) - Mo.inner_product(xo, xio, etao)) < AGREE
    assert abs(Mn.norm(xn, etan) - Mo.norm(xo, etao)) < AGREE
    _close(h, Mn.embed(xn, xin), Mo.embed(xo, xio))
    fn = Mn.from_matrix(Zd)
    fo = Mo.from_matrix(Mo.backend.asarray(Zd))
    _close(h, fn.s, fo.s)
    _close(h, Mn.to_dense(fn), Mo.to_dense(fo))


def test_gradient_and_hessian_agree(h, other, metric_name):
    seed = 3
    Mn, Mo = _pair(other, metric_name, h, seed)
    xn, xo = Mn.random_point(seed), Mo.random_point(seed)
    rng = np.random.default_rng(seed)
    Z, Hd = rng.standard_normal(SHAPE[:2]), rng.standard_normal(SHAPE[:2])
    xin, xio = Mn.random_tangent_vector(xn, 1), Mo.random_tangent_vector(xo, 1)
    gn = Mn.euclidean_to_riemannian_gradient(xn, Z)
    go = Mo.euclidean_to_riemannian_gradient(xo, Mo.backend.asarray(Z))
    _close_tangent(h, gn, go)
    Hn = Mn.euclidean_to_riemannian_hessian(xn, Z, Hd, xin)
    Ho = Mo.euclidean_to_riemannian_hessian(xo, Mo.backend.asarray(Z), Mo.backend.asarray(Hd), xio)
    _close_tangent(h, Hn, Ho)
    assert abs(Mn.inner_product(xn, gn, xin) - Mo.inner_product(xo, go, xio)) < AGREE


def test_diagnostics_agree(other):
    """The finite-difference data themselves agree across backends (float64)."""
    Mn, Mo = _pair(other)
    rn = diagnostics.check_retraction(Mn, seed=5)
    ro_ = diagnostics.check_retraction(Mo, seed=5)
    big = rn.errors > 1e-8
    assert np.allclose(rn.errors[big], ro_.errors[big], rtol=1e-6)
    assert abs(rn.slope - ro_.slope) < 1e-3


@pytest.mark.parametrize("dtype_in", ["float32", "float64"])
def test_dtype_and_backend_follow_manifold(h, backend, dtype, dtype_in):
    """Outputs are arrays of the manifold's backend and dtype; ambient inputs of the other
    float dtype are cast (not rejected)."""
    M = ro.FixedRankManifold(*SHAPE, backend=backend, dtype=dtype)
    be = M.backend
    x = M.random_point(0)
    Z = ro.FixedRankManifold(*SHAPE, backend=backend, dtype=dtype_in).backend.asarray(
        np.random.default_rng(0).standard_normal(SHAPE[:2])
    )
    xi = M.projection(x, Z)
    y = M.retraction(x, xi)
    for a in (*xi, y.U, y.s, y.V, M.embed(x, xi).A, M.to_dense(y)):
        assert type(a) is type(x.U)
        assert a.dtype == be.dtype
        assert be.same_device(a)
    assert isinstance(M.inner_product(x, xi, xi), float)


def test_torch_cuda_matches_cpu(h):
    torch = pytest.importorskip("torch", reason="PyTorch not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    cpu = ro.FixedRankManifold(*SHAPE, backend="torch")
    gpu = ro.FixedRankManifold(*SHAPE, backend="torch", device="cuda")
    xc, xg = cpu.random_point(0), gpu.random_point(0)
    assert xg.U.device.type == "cuda"
    Z = np.random.default_rng(0).standard_normal(SHAPE[:2])
    pc, pg = cpu.projection(xc, cpu.backend.asarray(Z)), gpu.projection(xg, gpu.backend.asarray(Z))
    _close_tangent(h, pc, pg)
    _close(h, cpu.to_dense(cpu.retraction(xc, pc)), gpu.to_dense(gpu.retraction(xg, pg)))


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 700),
    k=st.integers(1, 6),
    block=st.sampled_from([4, 8, 24, 64]),
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from([np.float64, np.float32]),
    rank_deficient=st.booleans(),
)
def test_tsqr_is_a_householder_quality_qr(m, k, block, seed, dtype, rank_deficient):
    """TSQR: Q orthonormal and Q R = a to rounding, R upper triangular and equal to
    numpy's R up to the signs of its rows (QR is unique up to them for full rank)."""
    from rankopt._backend import tsqr

    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k))
    if rank_deficient and k > 1:
        a[:, -1] = a[:, 0]  # a zero singular value: Q must stay orthonormal
    a = a.astype(dtype)
    q, r = tsqr(a, block_rows=block)
    eps = float(np.finfo(dtype).eps)
    kk = min(m, k)
    assert q.shape == (m, kk) and r.shape == (kk, k) and q.dtype == dtype
    np.testing.assert_allclose(q.T @ q, np.eye(kk), rtol=0, atol=50 * eps)
    np.testing.assert_allclose(q @ r, a, rtol=0, atol=50 * eps * np.abs(a).max())
    np.testing.assert_array_equal(np.tril(r, -1), 0)
    r0 = np.linalg.qr(a.astype(np.float64))[1]
    if not rank_deficient:
        np.testing.assert_allclose(np.abs(r), np.abs(r0), rtol=0, atol=200 * eps * np.abs(a).max())


def test_numpy_backend_qr_uses_tsqr_for_tall_matrices(monkeypatch):
    from rankopt import _backend

    calls = []
    monkeypatch.setattr(_backend, "tsqr", lambda a: calls.append(a.shape) or np.linalg.qr(a))
    be = ro.FixedRankManifold(5000, 40, 3).backend
    be.qr(np.ones((5000, 3)))
    be.qr(np.ones((2, 5000, 3)))  # stacks: numpy's batched QR
    assert calls == [(5000, 3)]
