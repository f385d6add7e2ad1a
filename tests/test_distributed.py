"""rankopt.distributed: completion on a Dask cluster gives the single-process answers.

One ``distributed.LocalCluster(n_workers=2, processes=True)`` serves the module (started once,
a few seconds). Problems are small (a few thousand observations): what is tested is that the
same solver makes the same decisions on blocked factors, not speed. Every comparison is with
the single-process :class:`rankopt.problems.MatrixCompletion` on the same data: the two differ
only by the order of floating-point sums (tree reductions over cells), so costs agree to a
few ulps of the cost's scale, iterations within one, final errors within a factor of 2.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")
import dask.array as da  # noqa: E402

import rankopt as ro  # noqa: E402
import rankopt.distributed as rd  # noqa: E402
from rankopt.distributed.communication import Traffic  # noqa: E402

# generous: on a loaded 2-core machine a round trip through the scheduler takes 0.1-0.3 s
pytestmark = pytest.mark.timeout(300)

# well-conditioned and small: Gauss-Newton converges in about 7 iterations in one process, and
# every iteration is some 40 round trips to the scheduler on the cluster
M, N, R = 100, 80, 2


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    with cluster, distributed.Client(cluster) as c:
        yield c


def _single(kappa: float = 1.0, seed: int = 1, **kw):
    return ro.problems.random_completion(M, N, R, kappa=kappa, oversampling=4, seed=seed, **kw)


def _entries(p, seed: int = 0):
    """The observations of ``p`` shuffled (input order is not CSR order on a cluster)."""
    perm = np.random.default_rng(seed).permutation(p.nnz)
    return tuple(np.asarray(a)[perm] for a in (p.rows, p.cols, p.vals))


def _dask_vectors(rows, cols, vals, chunks: int = 4):
    size = -(-len(vals) // chunks)
    return tuple(da.from_array(a, chunks=size) for a in (rows, cols, vals))


def _distributed(p, chunks: int = 4, **kw):
    return rd.MatrixCompletion(*_dask_vectors(*_entries(p), chunks), p.shape, truth=p.truth, **kw)


def test_import_does_not_import_dask():
    import subprocess
    import sys

    code = "import sys, rankopt, rankopt.distributed; print('dask' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_client_is_a_clear_error():
    p = _single()
    with pytest.raises(ValueError, match="distributed.Client"):
        rd.MatrixCompletion(*_entries(p), p.shape, client=None)


def test_cost_gradient_and_gauss_newton_match_one_process(client):
    p = _single()
    q = _distributed(p)
    assert q.nnz == p.nnz and q.grid.cells == (2, 2)  # ceil(sqrt(2 workers)) squared
    x = p.manifold(R).random_point(seed=3)
    f1, f2 = p.cost(x), q.cost(x)
    # sums of |Omega| squares in another order: relative rounding ~ |Omega| eps
    assert f2 == pytest.approx(f1, rel=p.nnz * np.finfo(float).eps)
    Mp, Mq = p.manifold(R), q.manifold(R)
    g1 = Mp.projection(x, p.egrad(x))
    be = Mq.backend  # blocked factors: the point on the cluster
    xq = ro.FixedRankPoint(be.asarray(x.U), x.s, be.asarray(x.V))
    g2 = Mq.projection(xq, q.egrad(xq))
    scale = np.linalg.norm(g1.M) + np.linalg.norm(g1.Up) + np.linalg.norm(g1.Vp)
    tol = 1e-12 * scale
    assert np.abs(g2.M - g1.M).max() <= tol
    assert np.abs(np.asarray(g2.Up) - g1.Up).max() <= tol
    assert np.abs(np.asarray(g2.Vp) - g1.Vp).max() <= tol
    H1 = p.gn_operator(Mp, x)(g1)
    H2 = q.gn_operator(Mq, xq)(g2)
    assert np.abs(np.asarray(H2.Up) - H1.Up).max() <= 1e-10 * np.abs(H1.Up).max()


#: Gauss-Newton iterations the tests run: each is some 40 round trips through the scheduler,
#: 0.1-0.3 s each on a loaded 2-core machine (the full solves are benchmarks/completion_dask.py)
STEPS = 2


def _same_history(h1, h2) -> None:
    """The same decisions: costs agree to rounding amplified by the inner CG (the sums run in
    another order; relative 1e-8 leaves 1e8 of amplification)."""
    assert len(h1.cost) == len(h2.cost)
    for c1, c2 in zip(h1.cost, h2.cost, strict=True):
        assert c2 == pytest.approx(c1, rel=1e-8, abs=1e-8 * h1.cost[0])


@pytest.mark.filterwarnings("ignore::rankopt.solvers.ConvergenceWarning")
def test_solve_matches_one_process(client):
    p = _single()
    res1 = ro.solve(p, rank=R, method="rgn", tol=1e-10, noise=0, max_iter=STEPS)
    q = _distributed(p)
    start = rd.snapshot()
    res2 = ro.solve(q, rank=R, method="rgn", tol=1e-10, noise=0, max_iter=STEPS)
    traffic = rd.measure(start)
    assert res1.iterations == res2.iterations == STEPS
    _same_history(res1.history, res2.history)
    e1, e2 = p.relative_error(res1.point), q.relative_error(res2.point)
    assert e2 == pytest.approx(e1, rel=1e-6)
    assert e2 < 0.5 * q.relative_error(q.spectral_init(R, seed=0))  # Gauss-Newton progressed
    assert isinstance(traffic, Traffic) and traffic.syncs > res2.iterations
    assert traffic.worker_bytes >= 0 and len(traffic.peak_rss_bytes) == 2
    x = rd.gather_point(res2.point)
    assert isinstance(x.U, np.ndarray) and x.U.shape == (M, R)


def test_spectral_start_matches_one_process(client):
    p = _single()
    q = _distributed(p)
    x1 = p.spectral_init(R, seed=0)
    x2 = rd.gather_point(q.spectral_init(R, seed=0))
    # the same operator up to rounding: the same top-R singular values and subspaces
    assert np.allclose(x2.s, x1.s, rtol=1e-8)
    assert np.allclose(np.abs(x1.U.T @ x2.U), np.eye(R), atol=1e-6)


def test_dataframe_gives_the_same_problem(client):
    dd = pytest.importorskip("dask.dataframe")
    pd = pytest.importorskip("pandas")
    p = _single()
    rows, cols, vals = _entries(p)
    df = dd.from_pandas(pd.DataFrame({"row": rows, "col": cols, "value": vals}), npartitions=3)
    q = rd.MatrixCompletion.from_dataframe(df, p.shape, truth=p.truth)
    x = p.manifold(R).random_point(seed=5)
    assert q.nnz == p.nnz
    assert q.cost(x) == pytest.approx(p.cost(x), rel=p.nnz * np.finfo(float).eps)
    with pytest.raises(ValueError, match="no column 'rating'"):
        rd.MatrixCompletion.from_dataframe(df, p.shape, value="rating")


def _message(fn) -> str:
    with pytest.raises(ValueError) as err:
        fn()
    return str(err.value)


@pytest.mark.parametrize("bad", ["duplicate", "nan", "row-range", "col-range", "negative"])
def test_bad_input_gives_the_single_process_error(client, bad):
    p = _single()
    rows, cols, vals = (a.copy() for a in _entries(p))
    if bad == "duplicate":
        rows[7], cols[7] = rows[3], cols[3]
    elif bad == "nan":
        vals[11] = np.nan
    elif bad == "row-range":
        rows[5] = M
    elif bad == "col-range":
        cols[5] = N + 3
    else:
        rows[2] = -1
    want = _message(lambda: ro.problems.MatrixCompletion(rows, cols, vals, (M, N)))
    got = _message(lambda: rd.MatrixCompletion(*_dask_vectors(rows, cols, vals), (M, N)))
    assert got == want


@pytest.mark.filterwarnings("ignore::rankopt.solvers.ConvergenceWarning")
def test_a_killed_worker_does_not_change_the_result(client):
    """A worker process killed (SIGKILL) during the solve: the nanny restarts it, the
    scheduler recomputes what it held from the graphs' lineage (distributed's own retry), and
    the solve makes the decisions of the undisturbed one (in one process)."""
    p = _single(seed=2)
    q = _distributed(p)
    ref = ro.solve(p, rank=R, method="rgn", tol=1e-10, noise=0, max_iter=STEPS + 1)
    pids = client.run(os.getpid)
    victim = sorted(pids)[0]
    killed = []

    def kill_once(info) -> bool:
        if not killed and info.iteration >= 1:
            os.kill(pids[victim], signal.SIGKILL)
            killed.append(info.iteration)
        return False

    res = ro.solve(q, rank=R, method="rgn", tol=1e-10, noise=0, max_iter=STEPS + 1,
                   callback=kill_once)  # fmt: skip
    assert killed, "the solve ended before the kill"
    client.wait_for_workers(2, timeout=60)
    assert set(client.run(os.getpid).values()) != set(pids.values())  # really restarted
    assert res.iterations == ref.iterations
    _same_history(ref.history, res.history)


def test_held_out_subsets_are_the_single_process_ones(client):
    """``subset`` (what rank="auto" holds out) picks the same entries as in one process."""
    p = _single(noise=1e-3)
    q = _distributed(p)
    idx = np.random.default_rng(0).choice(p.nnz, size=p.nnz // 10, replace=False)
    x = p.manifold(R).random_point(seed=6)
    for a, b in ((p.subset(idx), q.subset(idx)), (p.subset(np.sort(idx)), q.subset(idx))):
        assert b.nnz == a.nnz
        assert b.cost(x) == pytest.approx(a.cost(x), rel=p.nnz * np.finfo(float).eps)
    with pytest.raises(IndexError):
        q.subset(np.array([p.nnz]))


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("RANKOPT_DISTRIBUTED_SLOW"),
    reason="a held-out rank search on a cluster: several fits, over 300 s on a loaded 2-core "
    "machine; set RANKOPT_DISTRIBUTED_SLOW=1 to run it",
)
def test_rank_auto_chooses_the_rank_on_noisy_data(client):
    p = _single(seed=4, noise=1e-3)
    q = _distributed(p)
    res = ro.solve(q, rank="auto", max_rank=3, tol=1e-8, seed=0, ridge=None)
    assert res.point.rank == R
    assert res.info["rank_chosen"] == R


def test_cost_model_of_the_benchmark():
    from benchmarks.completion_dask import project

    measured = {"rank": 10, "nnz": 6e7,
                "single": {"solve_s": 257.0, "iterations": 7},
                "distributed": {"iterations": 7, "syncs": 7 * 120}}  # fmt: skip
    small, large = project(measured, workers=(64, 512))
    assert (small["grid"], large["grid"]) == (8, 23)
    # compute divides by W; network volume grows with P = sqrt(W) but per link falls as 1/P
    assert large["compute_s_per_iter"] == pytest.approx(small["compute_s_per_iter"] / 8)
    assert large["network_bytes_per_iter"] == pytest.approx(
        small["network_bytes_per_iter"] * 23 / 8
    )
    assert large["memory_per_worker_bytes"] < small["memory_per_worker_bytes"]
    assert small["total_s"] == pytest.approx(7 * small["seconds_per_iter"])
