"""Low-rank matrix completion with Pymanopt's optimizers on rankopt's fixed-rank manifold.

Runs Pymanopt's SteepestDescent, ConjugateGradient and TrustRegions on
``rankopt.pymanopt.FixedRank`` (Euclidean and a preconditioned metric), and Pymanopt's own
``FixedRankEmbedded`` with ConjugateGradient for comparison, from the same random start;
prints one row per run: iterations, final cost, relative error to the hidden matrix, time.

    python examples/pymanopt_completion.py            # 300 x 200, rank 5
    python examples/pymanopt_completion.py --quick    # 60 x 40, rank 3 (a few seconds)

The cost is ``f(X) = 1/2 sum_{(i,j) in Omega} (X_ij - A_ij)^2``. Its Euclidean gradient is
the sparse residual matrix, never an m x n dense array, and its Euclidean Hessian along the
direction ``D`` (a ``LowRankMatrix`` handed over by Pymanopt) is ``D`` sampled on Omega.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pymanopt
import scipy.sparse as sp
from pymanopt.manifolds import FixedRankEmbedded
from pymanopt.optimizers import ConjugateGradient, SteepestDescent, TrustRegions

import rankopt as ro
from rankopt.pymanopt import FixedRank, function


def make_data(m: int, n: int, r: int, oversampling: float, seed: int):
    """A rank-r matrix with N(0, 1) factors and |Omega| = oversampling * r (m + n - r) entries."""
    rng = np.random.default_rng(seed)
    truth = rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) / np.sqrt(r)
    k = min(int(oversampling * r * (m + n - r)), m * n)
    idx = np.sort(rng.choice(m * n, size=k, replace=False))
    rows, cols = idx // n, idx % n
    return truth, rows, cols, truth[rows, cols]


def rankopt_problem(pm: FixedRank, rows, cols, vals) -> pymanopt.Problem:
    m, n = pm.manifold.m, pm.manifold.n

    def sample(x):  # X on Omega: O(|Omega| r)
        return np.sum((x.U[rows] * x.s) * x.V[cols], axis=1)

    def on_omega(v):
        return sp.csr_matrix((v, (rows, cols)), shape=(m, n))

    @function(pm)
    def cost(x):
        res = sample(x) - vals
        return 0.5 * res @ res

    @function(pm)
    def euclidean_gradient(x):
        return on_omega(sample(x) - vals)

    @function(pm)
    def euclidean_hessian(x, D):  # D = pm.embedding(x, xi), a rank-2r LowRankMatrix
        return on_omega(np.sum(D.A[rows] * D.B[cols], axis=1))

    return pymanopt.Problem(
        pm, cost, euclidean_gradient=euclidean_gradient, euclidean_hessian=euclidean_hessian
    )


def pymanopt_problem(manifold: FixedRankEmbedded, m, n, rows, cols, vals) -> pymanopt.Problem:
    """The same cost on Pymanopt's FixedRankEmbedded (gradient with respect to u, s, vt)."""

    def residual(u, s, vt):
        return sp.csr_matrix(
            (np.sum((u[rows] * s) * vt.T[cols], axis=1) - vals, (rows, cols)), shape=(m, n)
        )

    @pymanopt.function.numpy(manifold)
    def cost(u, s, vt):
        return 0.5 * float(np.sum(residual(u, s, vt).data ** 2))

    @pymanopt.function.numpy(manifold)
    def euclidean_gradient(u, s, vt):
        G = residual(u, s, vt)
        GV = G @ vt.T
        return GV * s, np.sum(u * GV, axis=0), (G.T @ u * s).T

    return pymanopt.Problem(manifold, cost, euclidean_gradient=euclidean_gradient)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small problem (a few seconds)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    m, n, r = (60, 40, 3) if args.quick else (300, 200, 5)
    truth, rows, cols, vals = make_data(m, n, r, oversampling=4.0, seed=args.seed)
    print(
        f"completion {m} x {n}, rank {r}, {len(vals)} observed entries "
        f"({100 * len(vals) / (m * n):.0f}%), random start"
    )

    pm = FixedRank(m, n, r, seed=args.seed + 1)
    x0 = pm.random_point()
    runs = [
        ("rankopt", "euclidean", SteepestDescent, None),
        ("rankopt", "euclidean", ConjugateGradient, None),
        ("rankopt", "euclidean", TrustRegions, None),
        (
            "rankopt",
            "scaled (c=1/2)",
            ConjugateGradient,
            ro.metrics.Preconditioned(core_weight=0.5),
        ),
        ("rankopt", "scaled (c=1/2)", TrustRegions, ro.metrics.Preconditioned(core_weight=0.5)),
        ("pymanopt", "euclidean", ConjugateGradient, None),
    ]
    rows_out = []
    for which, metric_name, solver, metric in runs:
        opt = solver(max_iterations=2000, min_gradient_norm=1e-10, verbosity=0)
        if which == "rankopt":
            man = FixedRank(m, n, r, metric=metric)
            problem, start = rankopt_problem(man, rows, cols, vals), x0
        else:
            man = FixedRankEmbedded(m, n, r)
            problem, start = pymanopt_problem(man, m, n, rows, cols, vals), (x0.U, x0.s, x0.V.T)
        t0 = time.perf_counter()
        res = opt.run(problem, initial_point=start)
        elapsed = time.perf_counter() - t0
        p = res.point
        X = (p.U * p.s) @ p.V.T if which == "rankopt" else (p[0] * p[1]) @ p[2]
        rows_out.append(
            {
                "manifold": which,
                "metric": metric_name,
                "solver": solver.__name__,
                "iterations": res.iterations,
                "cost": float(res.cost),
                "rel_error": float(np.linalg.norm(X - truth) / np.linalg.norm(truth)),
                "time_s": elapsed,
            }
        )

    header = f"{'manifold':9s} {'metric':15s} {'solver':18s} {'iters':>6s} {'cost':>10s} {'rel.err':>9s} {'time s':>7s}"
    print(header)
    print("-" * len(header))
    for row in rows_out:
        print(
            f"{row['manifold']:9s} {row['metric']:15s} {row['solver']:18s} {row['iterations']:6d} "
            f"{row['cost']:10.2e} {row['rel_error']:9.2e} {row['time_s']:7.2f}"
        )
    return rows_out


if __name__ == "__main__":
    main()
