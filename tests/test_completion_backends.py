"""Completion on every backend (torch on the CPU here; CUDA and CuPy skip without a GPU), and
the numba kernels of the large-scale path (CSR products, Gauss-Newton operator, block-Jacobi
preconditioner) against dense or scipy formulas."""

from __future__ import annotations

import sys
import types
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import rankopt as ro
from rankopt.problems import MatrixCompletion, random_completion
from rankopt.problems import _kernels as K
from rankopt.problems._kernels import blocked
from rankopt.solvers import RGN

pytestmark = pytest.mark.timeout(120)

CUPY_REASON = "CuPy not installed / no CUDA GPU"


def _quiet_solve(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ro.solve(*args, **kw)


# --------------------------------------------------------------------------- torch (CPU)
@pytest.mark.usefixtures("one_torch_thread")
def test_torch_solve_matches_numpy():
    pytest.importorskip("torch", reason="torch backend test needs PyTorch")
    pn = random_completion(80, 60, 3, kappa=10.0, oversampling=3, seed=2)
    pt = random_completion(80, 60, 3, kappa=10.0, oversampling=3, seed=2, backend="torch")
    rn, rt = _quiet_solve(pn, 3, seed=0), _quiet_solve(pt, 3, seed=0)
    assert pn.relative_error(rn.point) <= 1e-8 and pt.relative_error(rt.point) <= 1e-8
    assert rt.rank == rn.rank == 3 and rt.converged
    assert type(rt.point.U).__module__.startswith("torch")
    assert rt.info["noise_estimate"] <= 1e-9


@pytest.mark.usefixtures("one_torch_thread")
def test_torch_noisy_rank_auto_matches_numpy():
    pytest.importorskip("torch", reason="torch backend test needs PyTorch")
    kw = dict(kappa=100.0, oversampling=3, seed=3, noise=1e-3)
    pn = random_completion(150, 120, 4, **kw)
    pt = random_completion(150, 120, 4, backend="torch", **kw)
    rn = _quiet_solve(pn, "auto", max_rank=6)
    rt = _quiet_solve(pt, "auto", max_rank=6)
    assert rt.info["rank_chosen"] == rn.info["rank_chosen"]
    assert pt.relative_error(rt.point) == pytest.approx(pn.relative_error(rn.point), rel=1e-6)
    assert rt.info["noise_estimate"] == pytest.approx(rn.info["noise_estimate"], rel=1e-6)
    assert rt.info["validation_rmse"] == pytest.approx(rn.info["validation_rmse"], rel=1e-6)


@pytest.mark.usefixtures("one_torch_thread")
def test_torch_float32_and_subset_and_predict():
    torch = pytest.importorskip("torch", reason="torch backend test needs PyTorch")
    p = random_completion(60, 50, 2, oversampling=4, seed=1, backend="torch", dtype="float32")
    res = _quiet_solve(p, 2, seed=0, noise=0)
    assert p.relative_error(res.point) <= 1e-4 and res.point.U.dtype == torch.float32
    q = p.subset(np.arange(0, p.nnz, 2))
    assert q.backend == "torch" and q.nnz == (p.nnz + 1) // 2
    vals = p.predict(res.point, [0, 1], [2, 3])
    assert isinstance(vals, torch.Tensor) and vals.shape == (2,)


@pytest.mark.gpu
def test_torch_cuda_solve():
    torch = pytest.importorskip("torch", reason="needs PyTorch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    p = random_completion(
        300, 300, 5, kappa=100.0, oversampling=3, seed=0, backend="torch", device="cuda"
    )
    res = _quiet_solve(p, 5, seed=0)
    assert res.point.U.is_cuda and p.relative_error(res.point) <= 1e-8


@pytest.mark.gpu
def test_cupy_solve():
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError
    except Exception:
        pytest.skip(CUPY_REASON)
    p = random_completion(300, 300, 5, kappa=100.0, oversampling=3, seed=0, backend="cupy")
    assert type(p.rows).__module__.startswith("cupy") and p.rows.dtype == np.int32
    res = _quiet_solve(p, 5, seed=0)
    assert p.relative_error(res.point) <= 1e-8


def test_cupy_indices_do_not_take_the_torch_branch(monkeypatch):
    """Without a GPU: the index arrays of a CuPy problem are made by cupy (int32), not torch."""
    from rankopt._backend import Backend
    from rankopt.problems._observations import index_array

    made = []

    class _Device:
        def __init__(self, dev):
            made.append(("device", dev))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fake = types.SimpleNamespace(
        cuda=types.SimpleNamespace(Device=_Device),
        asarray=lambda a: made.append(("asarray", a.dtype)) or a,
    )
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # a torch call would import it
    be = Backend("cupy", np.dtype("float64"), 0)
    out = index_array(be, np.arange(5, dtype=np.int64), np.int32)
    assert out.dtype == np.int32 and ("asarray", np.dtype("int32")) in made
    assert "torch" not in sys.modules
    with pytest.raises(ValueError, match="int32 indices"):
        index_array(be, np.arange(5), np.int64)


# --------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("parallel", [False, True])
def test_csr_kernels_match_scipy(parallel):
    rng = np.random.default_rng(0)
    p = random_completion(70, 50, 3, oversampling=4, seed=0)
    w = rng.standard_normal(p.nnz)
    U, V = rng.standard_normal((70, 4)), rng.standard_normal((50, 4))
    Z = sp.csr_matrix((w, p.cols, p.indptr), shape=(70, 50))
    np.testing.assert_allclose(
        K.csr_matmul(w, p.cols, p.indptr, V, parallel=parallel), Z @ V, atol=1e-12
    )
    np.testing.assert_allclose(
        K.csr_rmatmul(w, p.cols, p.indptr, U, 50, parallel=parallel), Z.T @ U, atol=1e-12
    )
    rows_c, ptr_c = K.csc_pattern(p.rows, p.cols, 50)
    Zc = Z.tocsc()
    np.testing.assert_array_equal(ptr_c, Zc.indptr)
    np.testing.assert_array_equal(rows_c, Zc.indices)
    G = K.gram_inverses(V, p.cols, p.indptr, 0.5, parallel=parallel)
    for i in (0, 7, 69):
        Vi = V[p.cols[p.indptr[i] : p.indptr[i + 1]]]
        np.testing.assert_allclose(G[i], np.linalg.inv(Vi.T @ Vi + 0.5 * np.eye(4)), rtol=1e-5)
    X = rng.standard_normal((70, 4))
    np.testing.assert_allclose(
        K.rowwise_matmul(X, G, parallel=parallel), np.einsum("ij,ijk->ik", X, G), rtol=1e-12
    )
    assert K.row_bounds(p.indptr, 3)[[0, -1]].tolist() == [0, 70]


@st.composite
def _sample_project_case(draw):
    """A random pattern, factors, and a split of the entries into chunks that honours
    ``disjoint`` (whole rows, whole columns, or anything)."""
    m, n = draw(st.integers(1, 30)), draw(st.integers(1, 30))
    k = draw(st.integers(1, 6))
    q = 2 * k
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    mask = rng.random((m, n)) < draw(st.floats(0.05, 1.0))
    rows, cols = (a.astype(np.int32) for a in np.nonzero(mask))  # row-major
    disjoint = draw(st.sampled_from([None, "rows", "cols"]))
    key = rows if disjoint != "cols" else cols
    if disjoint == "cols":  # column-major order, so that chunks can own whole columns
        order = np.lexsort((rows, cols))
        rows, cols, key = rows[order], cols[order], cols[order]
    cuts = rng.integers(0, len(rows) + 1, size=draw(st.integers(0, 4)))
    if disjoint is not None:  # move each cut to the start of its row / column
        cuts = np.searchsorted(key, key[np.minimum(cuts, len(key) - 1)]) if len(key) else cuts
    bounds = np.unique(np.concatenate([[0], cuts, [len(rows)]])).astype(np.int64)
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    A = rng.standard_normal((m, q)).astype(dtype)
    B = rng.standard_normal((n, q)).astype(dtype)
    return A, B, rows, cols, k, mask, bounds, disjoint


@settings(max_examples=60, deadline=None)
@given(case=_sample_project_case(), parallel=st.booleans())
def test_sample_project_matches_numpy(case, parallel):
    """One pass over Omega gives W B[:, :k] and W^T A[:, k:] for W = P_Omega(A B^T), in any
    chunking that honours ``disjoint``, serial and threaded."""
    A, B, rows, cols, k, mask, bounds, disjoint = case
    m, n = mask.shape
    A64, B64 = A.astype(np.float64), B.astype(np.float64)
    W = np.where(mask, A64 @ B64.T, 0.0)
    ZV, ZtU = K.sample_project(
        A, B, rows, cols, (m, n), bounds=bounds, disjoint=disjoint, parallel=parallel
    )
    scale = 1.0 + np.abs(A64).max() * np.abs(B64).max() ** 2 * A64.shape[1] * mask.sum()
    np.testing.assert_allclose(ZV, W @ B64[:, :k], rtol=0, atol=1e-13 * scale)
    np.testing.assert_allclose(ZtU, W.T @ A64[:, k:], rtol=0, atol=1e-13 * scale)
    ZV2, ZtU2 = K.sample_project(A, B, rows, cols, (m, n), parallel=parallel)  # own chunks
    np.testing.assert_allclose(ZV2, ZV, rtol=0, atol=1e-13 * scale)
    np.testing.assert_allclose(ZtU2, ZtU, rtol=0, atol=1e-13 * scale)
    rr, cc = np.nonzero(mask)  # the CSR variant (row-major pattern)
    indptr = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int32)
    ZV3, ZtU3 = K.sample_project_csr(A, B, cc.astype(np.int32), indptr, n, parallel=parallel)
    np.testing.assert_allclose(ZV3, ZV, rtol=0, atol=1e-13 * scale)
    np.testing.assert_allclose(ZtU3, ZtU, rtol=0, atol=1e-13 * scale)


def test_sample_project_rejects_bad_widths():
    idx = np.zeros(1, np.int32)
    with pytest.raises(ValueError, match="same even width"):
        K.sample_project(np.zeros((3, 2)), np.zeros((4, 4)), idx, idx, (3, 4))
    with pytest.raises(ValueError, match="same even width"):
        K.sample_project(np.zeros((3, 3)), np.zeros((4, 3)), idx, idx, (3, 4))
    with pytest.raises(ValueError, match="same even width"):
        K.sample_project_csr(np.zeros((1, 3)), np.zeros((4, 3)), idx, np.array([0, 1]), 4)


@pytest.mark.parametrize("wd", [0.0, 0.3])
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_gn_operator_matches_the_generic_one(wd, parallel, fused, monkeypatch):
    from rankopt.problems import _gauss_newton

    if fused:  # the one-pass sample_project_csr path (used once the factors leave the cache)
        monkeypatch.setattr(_gauss_newton, "FUSE_MIN_BYTES", 0)
    p = random_completion(60, 45, 3, oversampling=4, seed=1, weight_decay=wd)
    q = MatrixCompletion(p.rows, p.cols, p.vals, p.shape, wd, parallel=parallel)
    M = p.manifold(3)
    x = M.random_point(seed=2)
    op = q.gn_operator(M, x)
    # two applications of one operator (its work arrays are reused between calls): each
    # result stays what it was when the next is computed
    vs = [M.random_tangent_vector(x, seed=s) for s in (3, 4)]
    fast = [op(v) for v in vs]
    for v, f in zip(vs, fast, strict=True):
        slow = M.projection(x, p.ehess(x, M.embed(x, v)))
        for a, b in zip(f, slow, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-12)


def test_block_preconditioner_is_spd_and_inverts_the_blocks():
    p = MatrixCompletion(
        *(lambda q: (q.rows, q.cols, q.vals))(random_completion(60, 50, 3, oversampling=4, seed=4)),
        (60, 50),
        preconditioner="block",
    )
    M = p.manifold(3)
    x = M.random_point(seed=0)
    P = p.gn_preconditioner(M, x)
    a, b = M.random_tangent_vector(x, seed=1), M.random_tangent_vector(x, seed=2)
    Pa, Pb = P(a), P(b)
    assert float(M.euclidean_inner(Pa, b)) == pytest.approx(
        float(M.euclidean_inner(a, Pb)), rel=1e-5
    )
    assert float(M.euclidean_inner(Pa, a)) > 0
    # on a row of Up, P applies the inverse of G_i = sum_j V_j V_j^T (then projects)
    i = 5
    e = np.zeros_like(a.Up)
    e[i] = np.arange(1.0, 4.0)
    t = ro.TangentVector(a.M * 0, e - x.U @ (x.U.T @ e), a.Vp * 0)
    got = P(t).Up
    raw = K.rowwise_matmul(t.Up, K.gram_inverses(x.V, p.cols, p.indptr, 0.0))
    np.testing.assert_allclose(got, raw - x.U @ (x.U.T @ raw), rtol=1e-5, atol=1e-9)
    # reuse: a rotated basis of the same subspaces gives the same operator
    R, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((3, 3)))
    y = ro.FixedRankPoint(x.U @ R, x.s, x.V @ R)
    ty = ro.TangentVector(t.M, t.Up, t.Vp)
    fresh = MatrixCompletion(p.rows, p.cols, p.vals, p.shape, preconditioner="block")
    np.testing.assert_allclose(
        p.gn_preconditioner(M, y)(ty).Up, fresh.gn_preconditioner(M, y)(ty).Up, rtol=1e-4, atol=1e-8
    )


def test_block_and_diagonal_preconditioners_reach_the_same_solution():
    p = random_completion(300, 300, 4, kappa=1.0, oversampling=3, seed=0)
    x0 = p.spectral_init(4, seed=0)
    out = {}
    for kind in ("diagonal", "block"):
        q = MatrixCompletion(p.rows, p.cols, p.vals, p.shape, preconditioner=kind, truth=p.truth)
        res = RGN(max_iter=50, tol=1e-11).run(q, x0)
        out[kind] = (q.relative_error(res.point), res.info["state"].cg_total)
    assert out["block"][0] <= 1e-8 and out["diagonal"][0] <= 1e-8
    assert out["block"][1] < out["diagonal"][1]  # fewer inner CG iterations
    with pytest.raises(ValueError, match="preconditioner"):
        MatrixCompletion(p.rows, p.cols, p.vals, p.shape, preconditioner="ilu")


@pytest.mark.parametrize("parallel", [False, True])
def test_blocked_pattern_products_match_scipy(parallel):
    """Column-block order (used at scale): same W V and W^T U as the CSR products."""
    rng = np.random.default_rng(3)
    p = random_completion(90, 70, 3, oversampling=4, seed=5)
    bp = K.BlockedPattern(p.rows, p.cols, 70, width=8)
    assert np.all(np.diff(bp.cols // 8) >= 0)  # grouped by column block
    lin = np.sort(bp.rows.astype(np.int64) * 70 + bp.cols)
    np.testing.assert_array_equal(lin, np.asarray(p.rows, np.int64) * 70 + p.cols)
    A, B = rng.standard_normal((90, 4)), rng.standard_normal((70, 4))
    U, V = rng.standard_normal((90, 2)), rng.standard_normal((70, 2))
    w = K.sample_lowrank(A, B, bp.rows, bp.cols)
    W = sp.csr_matrix((w, (bp.rows, bp.cols)), shape=(90, 70))
    np.testing.assert_allclose(bp.matmul(w, V, 90, parallel=parallel), W @ V, atol=1e-12)
    np.testing.assert_allclose(bp.rmatmul(w, U, parallel=parallel), W.T @ U, atol=1e-12)
    assert bp.chunks(3)[0] == 0 and bp.chunks(3)[-1] == p.nnz
    assert set(bp.chunks(3)) <= set(bp.block_ptr.tolist())


def test_gn_operator_blocked_path_matches(monkeypatch):
    monkeypatch.setattr(blocked, "BLOCK_BYTES", 8 * 6 * 5)  # 5 columns per block at k = 6
    p = random_completion(60, 45, 3, oversampling=4, seed=1)
    M = p.manifold(3)
    x = M.random_point(seed=2)
    op = p.gn_operator(M, x)
    vs = [M.random_tangent_vector(x, seed=s) for s in (3, 4)]
    fast = [op(v) for v in vs]
    assert p._blocked is not None and p._blocked.width == 5  # noqa: SLF001
    for v, f in zip(vs, fast, strict=True):
        slow = M.projection(x, p.ehess(x, M.embed(x, v)))
        for a, b in zip(f, slow, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-12)


def test_truncated_cg_reports_the_curvature_along_its_solution():
    from rankopt.solvers.newton import truncated_cg

    p = random_completion(50, 40, 3, oversampling=4, seed=2, weight_decay=0.1)
    M = p.manifold(3)
    x = M.random_point(seed=1)
    g = M.projection(x, p.egrad(x))
    H = p.gn_operator(M, x)
    for rtol, maxiter in ((1e-12, 200), (0.3, 2)):
        info = {}
        xi, _, _ = truncated_cg(H, g, M, rtol, maxiter, p.gn_preconditioner(M, x), info)
        assert info["xHx"] == pytest.approx(float(M.euclidean_inner(xi, H(xi))), rel=1e-8)
    # and Gauss-Newton uses it as its first step: no exact_step pass over the data
    calls = []
    orig = p.exact_step
    p.exact_step = lambda *a: calls.append(1) or orig(*a)
    res = RGN(max_iter=5).run(p, p.spectral_init(3, seed=0))
    assert res.iterations > 0 and not calls


def test_spectral_start_through_the_blocked_operator_is_the_same(monkeypatch):
    p = random_completion(120, 100, 3, kappa=3.0, oversampling=3, seed=4)
    ref = p.spectral_init(3, seed=0)
    monkeypatch.setattr(blocked, "BLOCK_BYTES", 8 * 6 * 9)  # 9 columns per block at rank 3
    q = MatrixCompletion(p.rows, p.cols, p.vals, p.shape, truth=p.truth)
    x = q.spectral_init(3, seed=0)
    assert q._blocked is not None  # noqa: SLF001
    np.testing.assert_allclose(x.to_dense(), ref.to_dense(), atol=1e-9)
    bp = q._blocked  # noqa: SLF001
    vb = bp.reorder(np.asarray(p.vals))
    np.testing.assert_allclose(
        sp.csr_matrix((vb, (bp.rows, bp.cols)), shape=p.shape).toarray(),
        sp.csr_matrix((p.vals, p.cols, p.indptr), shape=p.shape).toarray(),
    )


def test_block_preconditioner_reused_blocks_are_rotated_into_place():
    """At a point near the one whose blocks were computed, the blocks are reused, rotated by
    R_u = U_0^T U, R_v = V_0^T V: each application equals (I - F F^T) R^T H_0 R applied row by
    row (scratch arrays reused between calls leave earlier results intact)."""
    from rankopt.problems import _kernels

    q = random_completion(60, 50, 3, oversampling=4, seed=4)
    p = MatrixCompletion(q.rows, q.cols, q.vals, (60, 50), preconditioner="block")
    M = p.manifold(3)
    x = M.random_point(seed=0)
    p.gn_preconditioner(M, x)
    y = M.retraction(x, M.random_tangent_vector(x, seed=5) * 1e-4)
    P = p.gn_preconditioner(M, y)
    U0, V0, Gr, Gc = p._block_jacobi.blocks  # noqa: SLF001
    assert U0 is x.U  # reused, not recomputed
    Ru, Rv = U0.T @ y.U, V0.T @ y.V
    ts = [M.random_tangent_vector(y, seed=s) for s in (1, 2)]
    outs = [P(t) for t in ts]
    for t, out in zip(ts, outs, strict=True):
        Up = _kernels.rowwise_matmul(t.Up @ Rv.T, Gr) @ Rv
        Vp = _kernels.rowwise_matmul(t.Vp @ Ru.T, Gc) @ Ru
        np.testing.assert_allclose(out.Up, Up - y.U @ (y.U.T @ Up), atol=1e-12)
        np.testing.assert_allclose(out.Vp, Vp - y.V @ (y.V.T @ Vp), atol=1e-12)
        np.testing.assert_allclose(out.M, t.M / (p.nnz / 3000), atol=1e-12)
