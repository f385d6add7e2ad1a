r"""Noisy data and non-uniform sampling for ``python -m benchmarks.completion --noise`` /
``--sampling``.

Noise: ``random_completion(n, n, 10, kappa, oversampling=3, seed=3,
noise=sigma)`` for sigma in {1e-5, 1e-4, 1e-3, 1e-2} and kappa in {1, 1e2, 1e4}; each problem
is solved by

* ``ro.solve(p, 10)`` (the default: "auto", noise estimated, rank 10 a maximum), and
* ``ro.solve(p, "auto", max_rank=10)`` (rank chosen on held-out observations from the start),

and compared with

* the **oracle**: the least-squares fit on the true tangent space (it knows the truth's
  tangent space and fits the noisy data there, :func:`rankopt.solvers.noise.oracle_error`),
* the **zero matrix** (relative error 1).

A cell passes when the relative error is at most ``1.5 x`` the oracle's and at most the zero
matrix's (1).

Sampling: ``sampling="powerlaw"`` (Zipf exponent 0.5, and 1.0 to show the report of rows and
columns with fewer than ``r`` observations), exact data, kappa in {1, 100}.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import rankopt as ro
from benchmarks.harness import pyplot
from rankopt.problems import random_completion
from rankopt.solvers.noise import oracle_error

RANK = 10
SIGMAS = (1e-5, 1e-4, 1e-3, 1e-2)
KAPPAS = (1.0, 1e2, 1e4)
#: acceptance: error <= FACTOR * oracle and <= the zero matrix's error (1)
FACTOR = 1.5


def _solve(problem: Any, rank: Any, **kw: Any) -> tuple[Any, float, list[str]]:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t = time.perf_counter()
        res = ro.solve(problem, rank, seed=0, **kw)
        elapsed = time.perf_counter() - t
    return res, elapsed, sorted({x.category.__name__ for x in w})


def run_noise(
    n: int, log: Callable[[str], None], sigmas=SIGMAS, kappas=KAPPAS, seed: int = 3
) -> list[dict]:
    """Every (kappa, sigma) cell: oracle, zero, and the two ways of calling solve."""
    rows = []
    for kappa in kappas:
        for sigma in sigmas:
            p = random_completion(n, n, RANK, kappa=kappa, oversampling=3, seed=seed, noise=sigma)
            t = time.perf_counter()
            oracle = oracle_error(p)
            t_oracle = time.perf_counter() - t
            for label, rank, kw in (
                ("solve(p, 10)", RANK, {}),
                ('solve(p, "auto", max_rank=10)', "auto", {"max_rank": RANK}),
            ):
                res, elapsed, warned = _solve(p, rank, **kw)
                err = float(p.relative_error(res.point))
                bound = min(FACTOR * oracle, 1.0)
                row = {
                    "n": n,
                    "kappa": kappa,
                    "sigma": sigma,
                    "method": label,
                    "oracle": oracle,
                    "oracle_time": t_oracle,
                    "error": err,
                    "ratio": err / oracle,
                    "pass": err <= bound,
                    "rank": res.rank,
                    "time": elapsed,
                    "iterations": res.iterations,
                    "stop": str(res.stop_reason),
                    "converged": res.converged,
                    "noise_estimate": res.info.get("noise_estimate", float("nan")),
                    "validation_rmse": res.info.get("validation_rmse", float("nan")),
                    "zero_rmse": res.info.get("zero_rmse", float("nan")),
                    "warnings": warned,
                }
                rows.append(row)
                log(
                    f"  kappa={kappa:g} sigma={sigma:g} {label:<30} err {err:.3e} oracle "
                    f"{oracle:.3e} ({row['ratio']:.2f}x) rank {res.rank} {elapsed:.2f} s "
                    f"{res.iterations} it {row['stop']} sigma_hat {row['noise_estimate']:.2e} "
                    f"{'PASS' if row['pass'] else 'FAIL'} {','.join(warned)}"
                )
    return rows


def noise_table(rows: list[dict]) -> list[str]:
    out = [
        "| kappa | sigma | method | rel. error | oracle | error / oracle | <= min(1.5 oracle, 1) | "
        "rank | sigma estimate | time [s] | iterations | stop | warnings |",
        "|---:|---:|:---|---:|---:|---:|:---:|---:|---:|---:|---:|:---|:---|",
    ]
    for r in rows:
        out.append(
            f"| {r['kappa']:g} | {r['sigma']:g} | `{r['method']}` | {r['error']:.2e} | "
            f"{r['oracle']:.2e} | {r['ratio']:.2f} | {'yes' if r['pass'] else '**no**'} | "
            f"{r['rank']} | {r['noise_estimate']:.2e} | {r['time']:.2f} | {r['iterations']} | "
            f"{r['stop']} | {', '.join(r['warnings']) or '-'} |"
        )
    return out


def plot_noise(rows: list[dict], path: Path, title_note: str = "") -> None:
    plt = pyplot()
    kappas = sorted({r["kappa"] for r in rows})
    fig, axes = plt.subplots(1, len(kappas), figsize=(4.8 * len(kappas), 4.2), squeeze=False)
    for ax, kappa in zip(axes[0], kappas, strict=True):
        rk = [r for r in rows if r["kappa"] == kappa]
        sig = sorted({r["sigma"] for r in rk})
        orc = [next(r["oracle"] for r in rk if r["sigma"] == s) for s in sig]
        ax.loglog(sig, orc, "k-", lw=1.5, label="oracle (LS on true tangent space)")
        ax.loglog(sig, [FACTOR * o for o in orc], "k--", lw=1, label="1.5 x oracle")
        ax.axhline(1.0, color="0.5", ls=":", lw=1.5, label="zero matrix")
        for marker, method in (("o", "solve(p, 10)"), ("x", 'solve(p, "auto", max_rank=10)')):
            pts = [(r["sigma"], r["error"]) for r in rk if r["method"] == method]
            ax.loglog(*zip(*pts, strict=True), marker, ms=7, label=method)
        ax.set_title(f"kappa = {kappa:g}", fontsize=10)
        ax.set_xlabel("noise sigma")
        ax.set_ylabel("||X - X*||_F / ||X*||_F")
        ax.grid(True, which="major", alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    n = rows[0]["n"]
    fig.suptitle(f"Noisy completion, {n}x{n}, rank {RANK}, oversampling 3{title_note}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def determined_error(p: Any, x: Any, rank: int = RANK) -> float:
    r"""Relative error on the rows and columns with at least ``rank`` observations (the part
    of the matrix the data can determine), through the factors: never dense."""
    under_r, under_c = p.underdetermined(rank)
    R = np.setdiff1d(np.arange(p.shape[0]), under_r)
    C = np.setdiff1d(np.arange(p.shape[1]), under_c)
    t = p.truth
    diff = ro.LowRankMatrix(np.hstack([x.U[R] * x.s, -t.U[R] * t.s]), np.hstack([x.V[C], t.V[C]]))
    return float(diff.fro_norm() / ro.LowRankMatrix(t.U[R] * t.s, t.V[C]).fro_norm())


def run_sampling(n: int, log: Callable[[str], None], seeds=(0, 1)) -> list[dict]:
    """Power-law sampling, exact data: error, rank, time and the under-determined report."""
    rows = []
    for exponent in (0.5, 1.0):
        for kappa in (1.0, 100.0):
            for seed in seeds:
                p = random_completion(
                    n,
                    n,
                    RANK,
                    kappa=kappa,
                    oversampling=3,
                    seed=seed,
                    sampling="powerlaw",
                    exponent=exponent,
                )
                rc, cc = p.observation_counts()
                under_r, under_c = p.underdetermined(RANK)
                res, elapsed, warned = _solve(p, RANK)
                err = float(p.relative_error(res.point))
                row = {
                    "n": n,
                    "exponent": exponent,
                    "kappa": kappa,
                    "seed": seed,
                    "row_counts": (int(rc.min()), int(np.median(rc)), int(rc.max())),
                    "col_counts": (int(cc.min()), int(np.median(cc)), int(cc.max())),
                    "under_rows": int(under_r.size),
                    "under_cols": int(under_c.size),
                    "error": err,
                    "determined_error": determined_error(p, res.point),
                    "rank": res.rank,
                    "time": elapsed,
                    "iterations": res.iterations,
                    "stop": str(res.stop_reason),
                    "warnings": warned,
                }
                rows.append(row)
                log(
                    f"  exponent={exponent:g} kappa={kappa:g} seed={seed}: rows min/median/max "
                    f"{row['row_counts']}, cols {row['col_counts']}, under-determined "
                    f"{under_r.size} rows {under_c.size} cols | err {err:.2e} (determined part "
                    f"{row['determined_error']:.2e}) rank {res.rank} {elapsed:.2f} s "
                    f"{res.iterations} it {row['stop']} {','.join(warned)}"
                )
    return rows


def sampling_table(rows: list[dict]) -> list[str]:
    out = [
        "| Zipf exponent | kappa | seed | row counts min/median/max | column counts | rows, cols with < r obs. | rel. error | on the determined rows and cols | rank | time [s] | iterations | stop | warnings |",
        "|---:|---:|---:|:---|:---|:---|---:|---:|---:|---:|---:|:---|:---|",
    ]
    for r in rows:
        out.append(
            f"| {r['exponent']:g} | {r['kappa']:g} | {r['seed']} | "
            f"{'/'.join(map(str, r['row_counts']))} | {'/'.join(map(str, r['col_counts']))} | "
            f"{r['under_rows']}, {r['under_cols']} | {r['error']:.1e} | "
            f"{r['determined_error']:.1e} | {r['rank']} | "
            f"{r['time']:.2f} | {r['iterations']} | {r['stop']} | {', '.join(r['warnings']) or '-'} |"
        )
    return out
