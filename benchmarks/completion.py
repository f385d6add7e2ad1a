r"""Matrix completion benchmark: rankopt's solvers against pymanopt 2.2.1, over kappa, sampling and size.

Problem (``rankopt.problems.random_completion``): an n x n truth ``X* = U diag(s) V^T`` of rank
10 with Haar factors and singular values geometric from 1 to ``1/kappa``; ``|Omega| =
oversampling * r (2n - r)`` entries observed uniformly; cost ``1/2 ||P_Omega(X) - b||^2``.
Every method starts from the same spectral start (seed 0) and stops at the same rule:
``||grad|| <= tol ||grad(x0)||`` (``tol = 1e-10``), or ``max_iter`` steps, or ``max_time``
seconds ("timeout" in the table). Times are wall-clock, end to end (spectral start included).
The error is ``||X - X*||_F / ||X*||_F`` (``problem.relative_error``).

Design (default run: 12-15 minutes on a 2-core machine):

* n <= 3000 (default 1000): every kappa (1, 1e2, 1e4) x oversampling (2, 3, 5) x method
  ("auto", RGN, RCG, RGD, RCG with ``Preconditioned(core_weight=0.5)``, RAdamW, RHeavyBall,
  RAdaGrad, DLRAHeavyBall, DLRAAdam, pymanopt CG),
  each run capped at ``--grid-max-time`` seconds; the oversampling-3 runs also record their
  iterates for ``out/completion_convergence.png`` (error against iteration and time);
* n <= 30000 (default 1e4): "auto", RCG and pymanopt CG at oversampling 3, capped at
  ``--max-time`` (60 s);
* larger n (default 1e5): "auto" alone, in a fresh process, reporting its peak memory
  (``resource.getrusage(...).ru_maxrss``);
* the kappa = 1, n = 1000 case is timed ``--repeats`` more times, rankopt.solve and
  pymanopt interleaved, and the medians and their ratio are reported.

Usage::

    python -m benchmarks.completion              # full run, writes out/completion_*.{png,md}
    python -m benchmarks.completion --quick      # 300 x 300 subset, < 20 s
    python -m benchmarks.completion --sizes 1000 10000 --repeats 7 --out out/

Every thread pool (BLAS, OpenMP, numba) is pinned to one thread
(:func:`benchmarks.harness.pin_threads`): on a small shared machine, OpenBLAS threads that
compete with other processes for the cores make the small QRs/SVDs of these solvers up to 100x
slower, and timings become noise; one thread also makes rankopt and pymanopt run under the same
conditions. ``--scale --threads N`` runs the fresh processes with ``solve(..., threads=N)``
(BLAS and the numba kernels on N threads); ``--scale 1e6 --kappa 100`` another condition number;
``--als [N ...]`` compares with Spark's ALS (``benchmarks/_als.py``, the extra ``als``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import rankopt as ro
from benchmarks import _als as als_bench  # --als: rankopt against Spark's ALS
from benchmarks import _completion_noise as noise_bench
from benchmarks import _completion_scale as scale_bench
from benchmarks._pymanopt_completion import pymanopt_available, run_pymanopt_cg
from benchmarks.harness import pin_threads, pyplot, report_log, time_interleaved
from rankopt.problems import random_completion

RANK = 10
TOL = 1e-10
SEED = 0
# RAdamW's learning rate, from a sweep at n = 1000 (docs/solvers.md): 1e-3 and up blow up at
# kappa = 100, 1e-4 is slow at kappa = 1.
RADAMW_LR = 3e-4
PYMANOPT = "pymanopt CG"
#: method label -> (rankopt.solve method, solver options)
RANKOPT_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "auto": ("auto", {}),
    "RGN": ("rgn", {}),
    "RCG": ("rcg", {}),
    "RGD": ("rgd", {}),
    "RCG+Precond(0.5)": ("rcg", {"metric": ro.metrics.Preconditioned(core_weight=0.5)}),
    f"RAdamW(lr={RADAMW_LR:g})": ("radamw", {"lr": RADAMW_LR}),
    # fixed-learning-rate rules, each at the best learning rate of a sweep at kappa = 1,
    # n = 1000, oversampling 3, 150 steps (docs/solvers.md, "Learning rates of the fixed-rate
    # rules"): heavy ball 30 diverges and 3 is slow; DLRAHeavyBall diverges at 10
    "RHeavyBall(lr=10, mom=0.5)": ("rheavyball", {"lr": 10.0, "momentum": 0.5}),
    "RAdaGrad(lr=0.01)": ("radagrad", {"lr": 0.01}),
    "DLRAHeavyBall(lr=5, tol=1e-3)": (
        "dlra-heavyball",
        {"lr": 5.0, "momentum": 0.5, "rank_tol": 1e-3},  # solve caps the rank at RANK
    ),
    "DLRAAdam(lr=3e-3, tol=1e-3)": ("dlra-adam", {"lr": 3e-3, "rank_tol": 1e-3}),
}
SECOND_ORDER = ("auto", "rgn")
#: backend and device of every generated problem (``--backend``, ``--device``)
PROBLEM_KW: dict[str, Any] = {}


@dataclass
class Row:
    """One run of one method on one problem."""

    n: int
    kappa: float
    oversampling: float
    method: str
    iterations: int
    time: float
    rel_error: float
    stop: str
    rank: int = RANK
    trace_iter: list[int] = field(default_factory=list)
    trace_time: list[float] = field(default_factory=list)
    trace_error: list[float] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        return self.stop in ("gradient", "cost-change", "target-cost")

    @property
    def label(self) -> str:
        return "timeout" if self.stop == "max-time" else self.stop


# --------------------------------------------------------------------------- runs
def _max_iter(method: str, first_order_iters: int) -> int:
    return 200 if method in SECOND_ORDER else first_order_iters


def run_rankopt(
    problem: Any,
    n: int,
    kappa: float,
    os_: float,
    label: str,
    max_iter: int,
    max_time: float,
    record: bool,
) -> Row:
    """One rankopt run; with ``record`` the iterates are kept (errors computed afterwards)."""
    method, opts = RANKOPT_METHODS[label]
    max_iter = _max_iter(method, max_iter)
    points: list[tuple[float, Any]] = []
    t0 = time.perf_counter()

    def cb(info) -> None:  # keeps a reference to each iterate; errors are computed afterwards
        points.append((time.perf_counter() - t0, info.point))

    res = ro.solve(
        problem,
        RANK,
        method=method,
        tol=TOL,
        max_iter=max_iter,
        seed=SEED,
        max_time=max_time,
        callback=cb if record else None,
        **opts,
    )
    elapsed = time.perf_counter() - t0
    row = Row(
        n,
        kappa,
        os_,
        label,
        res.iterations,
        elapsed,
        float(problem.relative_error(res.point)),
        str(res.stop_reason),
        res.rank,
    )
    if record:
        k0 = points[0][1].rank if points else RANK  # a rank-adaptive start is a truncated one
        t = time.perf_counter()
        x0 = problem.spectral_init(RANK, seed=SEED)  # the start the solver computed itself
        t_start = time.perf_counter() - t
        x0 = ro.FixedRankPoint(x0.U[:, :k0], x0.s[:k0], x0.V[:, :k0])
        row.trace_time = [t_start] + [t for t, _ in points]
        row.trace_error = [float(problem.relative_error(x0))] + [
            float(problem.relative_error(p)) for _, p in points
        ]
        row.trace_iter = list(range(len(row.trace_time)))
    return row


def run_baseline(
    problem: Any, n: int, kappa: float, os_: float, max_iter: int, max_time: float, record: bool
) -> Row:
    """One pymanopt CG run (see ``_pymanopt_completion``)."""
    r = run_pymanopt_cg(
        problem, RANK, tol=TOL, max_iter=max_iter, max_time=max_time, seed=SEED, record=record
    )
    row = Row(n, kappa, os_, PYMANOPT, r.iterations, r.time, r.rel_error, r.stop)
    row.trace_time, row.trace_error = r.trace_time, r.trace_error
    row.trace_iter = list(range(len(r.trace_time)))
    return row


def run_problem(
    n: int,
    kappa: float,
    os_: float,
    methods: list[str],
    max_iter: int,
    max_time: float,
    record: bool,
    log: Callable[[str], None],
) -> list[Row]:
    """Generate one problem (seed 0) and run every method on it."""
    t = time.perf_counter()
    problem = random_completion(n, n, RANK, kappa=kappa, oversampling=os_, seed=SEED, **PROBLEM_KW)
    log(
        f"  n={n} kappa={kappa:g} oversampling={os_:g}: |Omega|={problem.nnz}, generated in {time.perf_counter() - t:.2f} s"
    )
    rows = []
    for label in methods:
        if label == PYMANOPT:
            row = run_baseline(problem, n, kappa, os_, max_iter, max_time, record)
        else:
            row = run_rankopt(problem, n, kappa, os_, label, max_iter, max_time, record)
        log(
            f"    {label:<18} {row.iterations:>5d} it {row.time:>8.3f} s  err {row.rel_error:.2e}  {row.label}"
        )
        rows.append(row)
    return rows


def warm_up() -> None:
    """Load the numba kernels (compiled and cached on first use) outside every timed region."""
    p = random_completion(60, 60, 2, oversampling=3, seed=1, **PROBLEM_KW)
    for label in RANKOPT_METHODS:
        method, opts = RANKOPT_METHODS[label]
        ro.solve(p, 2, method=method, max_iter=3, **opts)
    if pymanopt_available() and p.backend == "numpy":
        run_pymanopt_cg(p, 2, max_iter=3)


def repeat_kappa1(n: int, os_: float, repeats: int, log: Callable[[str], None]) -> dict[str, Any]:
    """rankopt.solve("auto") and pymanopt CG on the same kappa = 1 problem, interleaved
    (:func:`time_interleaved`; no warm-up, :func:`warm_up` loaded the kernels). pymanopt's time
    is its run's own (``BaselineResult.time``: start, setup and optimizer, not the error
    computed afterwards), as in the grid."""
    problem = random_completion(n, n, RANK, kappa=1.0, oversampling=os_, seed=SEED, **PROBLEM_KW)
    fns = {"rankopt": lambda: ro.solve(problem, RANK, method="auto", tol=TOL, seed=SEED)}
    if pymanopt_available() and problem.backend == "numpy":
        fns["pymanopt"] = lambda: run_pymanopt_cg(problem, RANK, tol=TOL, max_iter=1000, seed=SEED)

    def progress(k: int, t: dict) -> None:
        ours, res = t["rankopt"].seconds[-1], t["rankopt"].last
        line = f"  repeat {k + 1}: rankopt {ours:.3f} s ({res.iterations} it)"
        if "pymanopt" in t:
            b = t["pymanopt"].last
            line += f", pymanopt {b.time:.3f} s ({b.iterations} it), ratio {b.time / ours:.1f}"
        log(line)

    t = time_interleaved(fns, repeats, warmup=0, keep_results=True, on_round=progress)
    ours = t["rankopt"].seconds
    theirs = [b.time for b in t["pymanopt"].results] if "pymanopt" in t else []
    errs = [float(problem.relative_error(r.point)) for r in t["rankopt"].results]
    errs += [b.rel_error for b in t["pymanopt"].results] if "pymanopt" in t else []
    out = {
        "n": n,
        "oversampling": os_,
        "repeats": repeats,
        "rankopt": ours,
        "pymanopt": theirs,
        "rankopt_iterations": t["rankopt"].last.iterations,
        "max_error": max(errs),
        "rankopt_median": statistics.median(ours),
    }
    if theirs:
        out["pymanopt_median"] = statistics.median(theirs)
        out["pymanopt_iterations"] = t["pymanopt"].last.iterations
        out["ratio_of_medians"] = out["pymanopt_median"] / out["rankopt_median"]
        out["ratios"] = [p / o for p, o in zip(theirs, ours, strict=True)]
    return out


# --------------------------------------------------------------------------- output
def table(rows: list[Row]) -> list[str]:
    """Markdown table; the last column is pymanopt's time on the same problem over the method's
    (only for runs that converged; "> x" where pymanopt did not)."""
    base = {(r.n, r.kappa, r.oversampling): r for r in rows if r.method == PYMANOPT}
    out = [
        "| n | kappa | oversampling | method | iterations | time [s] | rel. error | stop | pymanopt time / time |",
        "|---:|---:|---:|:---|---:|---:|---:|:---|---:|",
    ]
    for r in rows:
        b = base.get((r.n, r.kappa, r.oversampling))
        ratio = ""
        if b is not None and r.method != PYMANOPT and r.converged:
            # pymanopt not converged: its time is a lower bound on the time it needs
            ratio = f"{b.time / r.time:.1f}" if b.converged else f"> {b.time / r.time:.1f}"
        out.append(
            f"| {r.n} | {r.kappa:g} | {r.oversampling:g} | {r.method} | {r.iterations} | {r.time:.3f} | "
            f"{r.rel_error:.1e} | {r.label} | {ratio} |"
        )
    return out


def plot(rows: list[Row], path: Path) -> None:
    """Error against iteration (top) and time (bottom), one column per kappa."""
    plt = pyplot()
    traced = [r for r in rows if r.trace_error]
    kappas = sorted({r.kappa for r in traced})
    fig, axes = plt.subplots(2, len(kappas), figsize=(4.6 * len(kappas), 7.5), squeeze=False)
    methods = list(dict.fromkeys(r.method for r in traced))
    # ten colours, then the same colours dashed: every method its own line
    styles = {m: (f"C{i % 10}", "-" if i < 10 else "--") for i, m in enumerate(methods)}
    for j, kappa in enumerate(kappas):
        for r in (r for r in traced if r.kappa == kappa):
            err = np.maximum(np.asarray(r.trace_error), 1e-16)
            color, ls = styles[r.method]
            kw = {"color": color, "ls": ls, "label": r.method, "lw": 1.4}
            axes[0, j].semilogy(r.trace_iter, err, **kw)
            axes[1, j].semilogy(r.trace_time, err, **kw)
        n, os_ = traced[0].n, traced[0].oversampling
        axes[0, j].set_title(
            f"kappa = {kappa:g}  ({n}x{n}, rank {RANK}, oversampling {os_:g})", fontsize=9
        )
        axes[0, j].set_xlabel("iteration")
        axes[0, j].set_xscale("symlog", linthresh=10)
        axes[1, j].set_xlabel("time [s] (end to end)")
        axes[1, j].set_xscale("log")
        for ax in axes[:, j]:
            ax.set_ylabel("||X - X*||_F / ||X*||_F")
            ax.set_ylim(1e-12, 1e2)  # diverging runs leave the axis at the top, not stretch it
            ax.grid(True, which="major", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="300 x 300 subset (< 20 s)")
    ap.add_argument(
        "--sizes", type=int, nargs="+", default=[1000, 10000, 100000], help="square sizes n"
    )
    ap.add_argument("--repeats", type=int, default=7, help="repeats of the kappa=1 ratio case")
    ap.add_argument("--out", type=Path, default=Path("out"), help="output folder")
    ap.add_argument("--max-time", type=float, default=60.0, help="cap per run for n > 3000 [s]")
    ap.add_argument(
        "--grid-max-time", type=float, default=10.0, help="cap per run in the full grid [s]"
    )
    ap.add_argument(
        "--max-iter", type=int, default=1000, help="iteration cap of first-order methods"
    )
    ap.add_argument(
        "--noise",
        action="store_true",
        help="noisy data: sigma x kappa grid against the oracle and the zero matrix",
    )
    ap.add_argument("--noise-n", type=int, default=1000, help="size of the --noise problems")
    ap.add_argument("--sampling", action="store_true", help="power-law sampling, exact data")
    ap.add_argument(
        "--scale",
        type=float,
        nargs="*",
        default=None,
        metavar="N",
        help="solve n x n problems (kappa 1, oversampling 3) each in a fresh process; "
        "default sizes 1e3 3e3 1e4 3e4 1e5 3e5 1e6",
    )
    ap.add_argument("--seeds", type=int, default=1, help="seeds per --scale size")
    ap.add_argument("--first-seed", type=int, default=0, help="first seed of --scale")
    ap.add_argument("--kappa", type=float, default=1.0, help="condition number of --scale")
    ap.add_argument("--als", type=float, nargs="*", default=None, metavar="N",
                    help="rankopt against Spark's ALS at these sizes (default 2e4 1e5), "
                    "kappa 1 and 100 (extra 'als')")  # fmt: skip
    ap.add_argument("--als-cores", type=int, default=2, help="Spark's local[N] cores")
    ap.add_argument("--als-reg", type=float, nargs="+", help="ALS regParam grid")
    ap.add_argument("--als-iters", type=int, nargs="+", help="ALS maxIter grid")
    ap.add_argument("--als-kappas", type=float, nargs="+", help="--als kappas (1 100)")
    ap.add_argument("--threads", type=int, default=1, help="solve(threads=N) in --scale workers")
    ap.add_argument("--kernels", type=float, help="time the kernels at N x N on 1 and 2 threads")
    ap.add_argument(
        "--backend",
        choices=("numpy", "torch", "cupy"),
        default="numpy",
        help="array backend of the problems (torch: --device cpu or cuda)",
    )
    ap.add_argument("--device", default=None, help="e.g. cuda, cuda:1 (torch/cupy backends)")
    ap.add_argument("--_worker", dest="worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device is not None and args.device.startswith("cuda") and args.backend == "numpy":
        args.backend = "torch"  # --device cuda alone means the torch backend on the GPU
    if any(s < 2 * RANK for s in args.sizes):
        ap.error(f"--sizes must be at least {2 * RANK}")
    if args.repeats < 0:
        ap.error("--repeats must be >= 0")
    return args


def check_device(args: argparse.Namespace) -> None:
    """Fail early, with a clear message, when the backend or device asked for is missing."""
    if args.backend == "numpy":
        return
    from rankopt._backend import make_backend

    try:
        be = make_backend(args.backend, None, args.device)
    except (ImportError, ValueError) as e:
        raise SystemExit(f"--backend {args.backend} --device {args.device}: {e}") from None
    args.device = str(be.device) if be.device is not None else None


def _report_log(argv: list[str] | None, packages: tuple[str, ...]) -> tuple[Any, list[str]]:
    """Every thread pool pinned to one thread, and the report's ``log`` (:func:`report_log`)."""
    return report_log(
        "completion benchmark", "benchmarks.completion", argv, packages, pin_threads(1)
    )


def _baselines(args: argparse.Namespace) -> list[str]:
    """pymanopt CG when it is installed and the problems are NumPy's."""
    return [PYMANOPT] if pymanopt_available() and args.backend == "numpy" else []


def run_size(n: int, args: argparse.Namespace, methods: list[str], log) -> tuple[list, dict | None]:
    """One size of the full run: the grid (n <= 3000), three methods (n <= 30000) or "auto"
    alone in a fresh process (larger); returns the rows and the fresh process's record."""
    kappas, oversamplings = (1.0, 1e2, 1e4), (2.0, 3.0, 5.0)
    rows: list[Row] = []
    if n <= 3000:
        log(f"\n## n = {n}: kappa x oversampling x method grid (cap {args.grid_max_time:g} s)")
        for kappa in kappas:
            for os_ in oversamplings:
                rows += run_problem(
                    n, kappa, os_, methods, args.max_iter, args.grid_max_time, os_ == 3.0, log
                )
        return rows, None
    if n <= 30000:
        log(f"\n## n = {n}: auto, RCG, pymanopt CG at oversampling 3 (cap {args.max_time:g} s)")
        meths = ["auto", "RCG", *_baselines(args)]
        for kappa in kappas:
            rows += run_problem(n, kappa, 3.0, meths, args.max_iter, args.max_time, False, log)
        return rows, None
    log(f"\n## n = {n}: auto alone, kappa 1, oversampling 3 (fresh process)")
    info = scale_bench.run_fresh(
        n, SEED, log, max_time=max(args.max_time, 1200.0), backend=args.backend, device=args.device
    )
    log("  " + json.dumps(info))
    return rows, info


def kappa1_section(n: int, repeats: int, log) -> dict:
    """The interleaved kappa = 1 repeats (:func:`repeat_kappa1`) and their summary line."""
    if repeats <= 0:
        return {}
    log(f"\n## kappa = 1, n = {n}, oversampling 3: {repeats} interleaved repeats")
    summary = repeat_kappa1(n, 3.0, repeats, log)
    msg = f"rankopt.solve median {summary['rankopt_median']:.3f} s ({summary['rankopt_iterations']} iterations)"
    if "pymanopt_median" in summary:
        msg += (
            f", pymanopt CG median {summary['pymanopt_median']:.3f} s ({summary['pymanopt_iterations']} iterations); "
            f"ratio of medians {summary['ratio_of_medians']:.1f}x (per repeat {min(summary['ratios']):.1f}-{max(summary['ratios']):.1f}x)"
        )
    log(msg)
    return summary


def write_outputs(args, rows: list[Row], summary: dict, large: list, lines: list[str], log) -> None:
    """The figure (when iterates were recorded), ``completion_table.md`` (every logged line)
    and ``completion_results.json`` in ``--out``."""
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "completion_convergence.png"
    if any(r.trace_error for r in rows):
        plot(rows, png)
        log(f"wrote {png}")
    (args.out / "completion_table.md").write_text("\n".join(lines) + "\n")
    results = {
        "rows": [{k: v for k, v in r.__dict__.items() if not k.startswith("trace")} for r in rows],
        "kappa1": summary,
        "large": large,
    }
    (args.out / "completion_results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out / 'completion_table.md'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        scale_bench.run_worker(**json.loads(args.worker))
        return 0
    check_device(args)
    if args.noise or args.sampling or args.kernels or (args.scale, args.als) != (None, None):
        return main_sections(args, argv)
    log, lines = _report_log(argv, ("numpy", "scipy", "numba", "pymanopt", "rankopt"))
    log(
        f"rank {RANK}, tol {TOL:g} (relative gradient norm), seed {SEED}, spectral start for every method"
    )
    t_all = time.perf_counter()
    PROBLEM_KW.update(backend=args.backend, device=args.device)
    log(f"backend {args.backend}, device {args.device}")
    warm_up()
    all_methods = list(RANKOPT_METHODS) + ([PYMANOPT] if pymanopt_available() else [])
    if args.backend != "numpy":  # the GPU backends: the second-order and CG solvers only
        all_methods = ["auto", "RGN", "RCG"]
    rows: list[Row] = []
    large: list[dict] = []
    if args.quick:
        sizes, repeats = [300], min(args.repeats, 2)
        log("\n## quick: n = 300, oversampling 3")
        for kappa in (1.0, 1e2):
            rows += run_problem(
                300, kappa, 3.0, ["auto", "RCG", *_baselines(args)], 150, 5.0, True, log
            )
    else:
        sizes, repeats = args.sizes, args.repeats
        for n in sizes:
            new_rows, info = run_size(n, args, all_methods, log)
            rows += new_rows
            large += [info] if info is not None else []
    log("\n## table")
    for s in table(rows):
        log(s)
    rep_n = 300 if args.quick else (1000 if 1000 in sizes else min(sizes))
    summary = kappa1_section(rep_n, repeats, log)
    for info in large:
        if "error" not in info:
            log(
                f"\nn = {info['n']}: |Omega| = {info['nnz']}, generated in {info['generate_s']:.1f} s; rankopt.solve "
                f"{info['time']:.1f} s, {info['iterations']} iterations, rel. error {info['rel_error']:.1e} "
                f"({info['stop']}), peak memory {info['peak_rss_gib']:.2f} GiB"
            )
    log("\nload average at the end: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    log(f"total wall time {time.perf_counter() - t_all:.0f} s")
    write_outputs(args, rows, summary, large, lines, log)
    return 0


def scale_section(args: argparse.Namespace, log, note: str) -> list[dict]:
    """``--scale``: every size and seed solved in a fresh process; the table and the figure."""
    sizes = [int(v) for v in (args.scale or (1e3, 3e3, 1e4, 3e4, 1e5, 3e5, 1e6))]
    if args.quick:
        sizes = [s for s in sizes if s <= 3000] or [1000]
    log(
        f"\n## scale: kappa {args.kappa:g}, oversampling 3, {args.seeds} seed(s) per size, "
        f"{args.threads} thread(s), each run in a fresh process{note}"
    )
    rows = []
    for n in sizes:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            log(f"  n = {n}, seed {seed}: starting (load average {os.getloadavg()[0]:.2f})")
            kw = {"kappa": args.kappa, "threads": args.threads, "device": args.device}
            rows.append(scale_bench.run_fresh(n, seed, log, backend=args.backend, **kw))
            log("  " + json.dumps(rows[-1]))
    for s in scale_bench.scale_table(rows):
        log(s)
    scale_bench.plot_scale(rows, args.out / "completion_scale.png", note)
    log(f"wrote {args.out / 'completion_scale.png'}")
    return rows


def main_sections(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The sections ``--noise``, ``--sampling``, ``--scale``, ``--als`` (any combination)."""
    log, lines = _report_log(argv, ("numpy", "scipy", "numba", "rankopt"))
    note = " (quick run)" if args.quick else ""
    t_all = time.perf_counter()
    out: dict[str, Any] = {}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.noise:
        n = 300 if args.quick else args.noise_n
        log(f"\n## noise: {n} x {n}, rank {RANK}, oversampling 3, seed 3{note}")
        rows = noise_bench.run_noise(
            n, log, sigmas=(1e-4, 1e-2) if args.quick else noise_bench.SIGMAS
        )
        for s in noise_bench.noise_table(rows):
            log(s)
        fails = [r for r in rows if not r["pass"]]
        log(f"cells within min(1.5 x oracle, 1): {len(rows) - len(fails)} of {len(rows)}")
        noise_bench.plot_noise(rows, args.out / "completion_noise.png", note)
        log(f"wrote {args.out / 'completion_noise.png'}")
        out["noise"] = rows
    if args.sampling:
        n = 300 if args.quick else 1000
        log(f"\n## power-law sampling, exact data: {n} x {n}, rank {RANK}, oversampling 3{note}")
        rows = noise_bench.run_sampling(n, log, seeds=(0,) if args.quick else (0, 1))
        for s in noise_bench.sampling_table(rows):
            log(s)
        out["sampling"] = rows
    if args.scale is not None:
        out["scale"] = scale_section(args, log, note)
    if args.kernels:
        out["kernels"] = scale_bench.kernel_section(int(args.kernels), log)
    if args.als is not None:
        out["als"] = als_bench.als_from_args(args, note, log)
    log("\nload average at the end: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    log(f"total wall time {time.perf_counter() - t_all:.0f} s")
    parts = ("noise", "sampling", "scale", "als", "kernels")
    stem = "completion_" + "_".join(k for k in parts if k in out)
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {args.out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
