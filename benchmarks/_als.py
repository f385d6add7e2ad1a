r"""rankopt against Spark's ALS (``pyspark.ml.recommendation.ALS``) on exact completion problems,
for ``python -m benchmarks.completion --als`` (the optional extra ``als``: pyspark, and pyarrow
for the data transfer; Java 17 or later on the PATH).

Protocol, per problem ``random_completion(n, n, 10, kappa, oversampling=3, seed=SEED)``:

* **rankopt**: ``ro.solve(p, 10, tol=1e-10, seed=0)`` (one thread), its iterates kept by a
  callback and their errors computed afterwards: the error against time.
* **Spark ALS** (``local[CORES]``, explicit feedback, rank 10, ``seed=0``): the observed
  values divided by their RMS (ALS-WR's ``regParam`` multiplies ``lambda n_u ||x_u||^2``:
  on raw values of RMS ``1e-4`` any ``regParam`` above ``1e-8`` collapses the fit to 0); the
  product of its factors times that RMS is compared with the truth on the original scale.
  Every ``regParam`` x ``maxIter`` of :data:`GRID` is fitted (each fit from scratch: Spark
  has no warm start); the best one is reported. Spark's start-up (the JVM and the session),
  the load (the ratings into a cached DataFrame) and, per fit, the factor collection
  (``model.userFactors`` / ``itemFactors`` to NumPy) are timed apart from ``ALS.fit``.

The error is ``||X - X*||_F / ||X*||_F`` computed in a joint orthonormal basis of both factor
pairs (O((m + n) r^2), no cancellation: exact to round-off at any error size).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import pyplot

__all__ = [
    "als_available",
    "als_section",
    "als_from_args",
    "relative_error",
    "time_to",
    "GRID",
    "GRID_QUICK",
]

RANK = 10
SEED = 3
#: regParam x maxIter grid of Spark's ALS
GRID: dict[str, tuple] = {"regParam": (0.0, 1e-6, 1e-3, 1e-2), "maxIter": (10, 20, 50)}
#: the grid of ``--quick`` (a smoke test)
GRID_QUICK: dict[str, tuple] = {"regParam": (0.0, 1e-3), "maxIter": (5, 10)}
#: Spark session settings (no UI, Arrow transfers, few shuffle partitions on a small machine)
SPARK_CONF = {
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.shuffle.partitions": "4",
    "spark.driver.memory": "8g",
    "spark.driver.extraJavaOptions": "-Xss16m",
}


def als_available() -> str | None:
    """None when pyspark, pyarrow and a Java runtime are there; else what is missing."""
    missing = [m for m in ("pyspark", "pyarrow") if importlib.util.find_spec(m) is None]
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        missing.append("java (JAVA_HOME or java on the PATH)")
    return ", ".join(missing) or None


def relative_error(A: np.ndarray, B: np.ndarray, truth: Any) -> float:
    """``||A B^T - U diag(s) V^T||_F / ||s||`` in the joint bases ``qr([A, U])``,
    ``qr([B, V])``: O((m + n) r^2), no cancellation."""
    U, s, V = (np.asarray(t) for t in (truth.U, truth.s, truth.V))
    Q1, _ = np.linalg.qr(np.hstack([A, U]))
    Q2, _ = np.linalg.qr(np.hstack([B, V]))
    core = (Q1.T @ A) @ (B.T @ Q2) - (Q1.T @ U) @ ((s[:, None] * V.T) @ Q2)
    return float(np.linalg.norm(core) / np.linalg.norm(s))


def start_spark(cores: int) -> tuple[Any, float]:
    """A local Spark session on ``cores`` cores and the seconds its start-up took."""
    from pyspark.sql import SparkSession

    # pyspark 4.x warns on every pandas conversion under pandas 3 (the columns used here are
    # plain int32 / float64 ones, which it converts correctly)
    warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas")
    t = time.perf_counter()
    builder = SparkSession.builder.master(f"local[{cores}]").appName("rankopt-als")
    for k, v in SPARK_CONF.items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark, time.perf_counter() - t


def load(spark: Any, problem: Any, scale: float) -> tuple[Any, float]:
    """The ratings ``(u, i, r / scale)`` as a cached Spark DataFrame, and the load's seconds
    (pandas -> Arrow -> Spark, cache, count)."""
    import pandas as pd

    t = time.perf_counter()
    frame = pd.DataFrame(
        {
            "u": np.asarray(problem.rows, dtype=np.int32),
            "i": np.asarray(problem.cols, dtype=np.int32),
            "r": np.asarray(problem.vals, dtype=np.float64) / scale,
        }
    )
    df = spark.createDataFrame(frame).repartition(4).cache()
    df.count()
    return df, time.perf_counter() - t


def _factors(frame: Any, size: int) -> np.ndarray:
    """A factor DataFrame ``(id, features)`` as a ``size x RANK`` array (absent ids: 0)."""
    pdf = frame.toPandas()
    out = np.zeros((size, RANK))
    if len(pdf):
        out[pdf["id"].to_numpy()] = np.stack(pdf["features"].to_numpy())
    return out


def fit_als(df: Any, problem: Any, scale: float, reg: float, iters: int) -> dict:
    """One ALS fit: ``fit`` seconds, ``collect`` seconds, the relative error."""
    from pyspark.ml.recommendation import ALS

    als = ALS(rank=RANK, maxIter=iters, regParam=reg, userCol="u", itemCol="i", ratingCol="r")
    als = als.setSeed(0).setColdStartStrategy("drop")
    t = time.perf_counter()
    model = als.fit(df)
    t_fit = time.perf_counter() - t
    t = time.perf_counter()
    m, n = problem.shape
    A = _factors(model.userFactors, m) * scale
    B = _factors(model.itemFactors, n)
    t_collect = time.perf_counter() - t
    err = relative_error(A, B, problem.truth)
    return {"regParam": reg, "maxIter": iters, "fit": t_fit, "collect": t_collect, "error": err}


def run_rankopt(problem: Any) -> dict:
    """``ro.solve(p, 10, tol=1e-10, seed=0)`` with its error after every iteration against the
    time since the call (iterates kept by the callback, errors computed afterwards)."""
    import rankopt as ro

    points: list[tuple[float, Any]] = []
    t0 = time.perf_counter()

    def keep(info: Any) -> bool:
        points.append((time.perf_counter() - t0, info.point))
        return False

    res = ro.solve(problem, RANK, tol=1e-10, seed=0, callback=keep)
    elapsed = time.perf_counter() - t0
    trace = [(t, float(problem.relative_error(x))) for t, x in points]
    return {
        "time": elapsed,
        "iterations": res.iterations,
        "error": float(problem.relative_error(res.point)),
        "phase": res.info.get("phase"),
        "trace": trace,
    }


def time_to(trace: list[tuple[float, float]], error: float) -> float | None:
    """The first time at which the trace is at or below ``error`` (None: never)."""
    return next((t for t, e in trace if e <= error), None)


def run_case(spark: Any, n: int, kappa: float, grid: dict, log: Callable[[str], None]) -> dict:
    """rankopt and the ALS ``grid`` on one problem."""
    from rankopt.problems import random_completion

    t = time.perf_counter()
    p = random_completion(n, n, RANK, kappa=kappa, oversampling=3, seed=SEED)
    log(f"  n={n:g} kappa={kappa:g}: |Omega|={p.nnz}, generated in {time.perf_counter() - t:.1f} s")
    ours = run_rankopt(p)
    log(
        f"    rankopt: {ours['time']:.1f} s, {ours['iterations']} iterations, "
        f"error {ours['error']:.1e} (phase {ours['phase']})"
    )
    vals = np.asarray(p.vals, dtype=np.float64)
    scale = float(np.sqrt(np.mean(vals * vals)))
    df, t_load = load(spark, p, scale)
    log(f"    Spark load: {t_load:.1f} s (ratings divided by their RMS {scale:.3g})")
    fits = []
    for reg in grid["regParam"]:
        for iters in grid["maxIter"]:
            fits.append(fit_als(df, p, scale, reg, iters))
            f = fits[-1]
            log(
                f"    ALS regParam={reg:g} maxIter={iters}: fit {f['fit']:.1f} s "
                f"(+ {f['collect']:.1f} s collect), error {f['error']:.2e}"
            )
    df.unpersist()
    best = min(fits, key=lambda f: (f["error"], f["fit"]))
    ours["time_to_als_best"] = time_to(ours["trace"], best["error"])
    return {"n": n, "kappa": kappa, "nnz": p.nnz, "load": t_load, "rankopt": ours,
            "als": fits, "best": best}  # fmt: skip


def table(cases: list[dict], startup: float, cores: int, grid: dict) -> list[str]:
    """The comparison table (one row per problem) in markdown."""
    out = [
        f"Spark start-up (JVM and session, local[{cores}]): {startup:.1f} s, once.",
        "",
        "| n | kappa | Spark load [s] | ALS best (regParam, maxIter) | ALS fit [s] | ALS error "
        f"| ALS error at maxIter {' / '.join(map(str, grid['maxIter']))} (best regParam) "
        "| rankopt to ALS's best error [s] "
        "| rankopt [s] | rankopt error | ALS fit / rankopt to the same error |",
        "|---:|---:|---:|:---|---:|---:|:---|---:|---:|---:|---:|",
    ]
    for c in cases:
        b, ours = c["best"], c["rankopt"]
        by_iter = {f["maxIter"]: f["error"] for f in c["als"] if f["regParam"] == b["regParam"]}
        curve = " / ".join(f"{by_iter[k]:.1e}" for k in grid["maxIter"] if k in by_iter)
        tt = ours["time_to_als_best"]
        ratio = f"{b['fit'] / tt:.1f}" if tt else "-"
        out.append(
            f"| {c['n']:.0e} | {c['kappa']:g} | {c['load']:.1f} | {b['regParam']:g}, "
            f"{b['maxIter']} | {b['fit']:.1f} | {b['error']:.2e} | {curve} | "
            f"{tt if tt is None else f'{tt:.1f}'} | {ours['time']:.1f} | "
            f"{ours['error']:.1e} | {ratio} |"
        )
    return out


def plot(cases: list[dict], path: Path, grid: dict) -> None:
    """Error against time, one panel per problem: rankopt's iterates, and ALS's fits (one line
    per regParam through its maxIter values; fit time, start-up and load excluded)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(cases), figsize=(4.4 * len(cases), 4), squeeze=False)
    for ax, c in zip(axes[0], cases, strict=True):
        t, e = zip(*c["rankopt"]["trace"], strict=True)
        ax.loglog(t, np.maximum(e, 1e-16), "k-", lw=1.6, label="rankopt solve (1 thread)")
        for j, reg in enumerate(grid["regParam"]):
            pts = sorted((f["fit"], f["error"]) for f in c["als"] if f["regParam"] == reg)
            ax.loglog(*zip(*pts, strict=True), "o--", color=f"C{j}", label=f"ALS regParam {reg:g}")
        ax.set_title(f"n = {c['n']:.0e}, kappa = {c['kappa']:g}", fontsize=10)
        ax.set_xlabel("time [s] (ALS: fit only)")
        ax.set_ylim(1e-11, 3)
        ax.grid(True, which="major", alpha=0.3)
    axes[0, 0].set_ylabel("||X - X*||_F / ||X*||_F")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def als_section(
    sizes: list[int],
    kappas: list[float],
    cores: int,
    out: Path,
    log: Callable[[str], None],
    grid: dict | None = None,
) -> dict:
    """Every size x kappa: rankopt, then the ALS ``grid`` (default :data:`GRID`); the table
    and the figure ``completion_als.png`` in ``out``."""
    grid = grid or GRID
    missing = als_available()
    if missing:
        log(f"ALS comparison skipped: missing {missing} (pip install 'rankopt[als]')")
        return {"skipped": missing}
    import pyspark

    from rankopt.problems import warmup_kernels

    warmup_kernels()  # numba's one-time compilation stays out of rankopt's times
    spark, startup = start_spark(cores)
    log(f"pyspark {pyspark.__version__}; Spark start-up {startup:.1f} s (local[{cores}])")
    log(f"grid: regParam {grid['regParam']} x maxIter {grid['maxIter']}, rank {RANK}, seed 0")
    try:
        cases = [run_case(spark, n, k, grid, log) for n in sizes for k in kappas]
    finally:
        spark.stop()
    for line in table(cases, startup, cores, grid):
        log(line)
    plot(cases, out / "completion_als.png", grid)
    log(f"wrote {out / 'completion_als.png'}")
    return {"startup": startup, "cores": cores, "cases": cases, "grid": grid}


def als_from_args(args: Any, note: str, log: Callable[[str], None]) -> dict:
    """``--als [N ...]`` of ``benchmarks.completion``: the sizes (default 2e4 and 1e5; 2000 with
    ``--quick``), kappa 1 and 100 (or ``--als-kappas``), the grid (:data:`GRID`,
    :data:`GRID_QUICK`, or ``--als-reg`` / ``--als-iters``), ``--als-cores``."""
    sizes = [int(v) for v in (args.als or (2e4, 1e5))] if not args.quick else [2000]
    kappas = [float(k) for k in (getattr(args, "als_kappas", None) or (1.0, 100.0))]
    log(f"\n## rankopt against Spark's ALS: kappa {kappas}, oversampling 3{note}")
    grid = dict(GRID_QUICK if args.quick else GRID)
    over = {"regParam": args.als_reg, "maxIter": args.als_iters}
    grid.update({k: tuple(v) for k, v in over.items() if v})
    return als_section(sizes, kappas, args.als_cores, args.out, log, grid)
