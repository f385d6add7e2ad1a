"""Command line of rankopt: ``python -m rankopt demo`` (also the ``rankopt`` console script)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

DESCRIPTION = "rankopt: Riemannian optimization on the manifold of fixed-rank matrices."

EPILOG = """\
examples:
  python -m rankopt demo                 # 1000 x 1000, rank 10: seconds to tens of seconds
  python -m rankopt demo --size 300      # smaller and faster
  python -m rankopt demo --help          # what the demo does, and each of its options
"""

DEMO_DESCRIPTION = """\
Generate a random SIZE x SIZE matrix of rank RANK and condition number KAPPA, observe
OVERSAMPLING times as many of its entries as it has degrees of freedom, and recover it from
them with each method of --methods; print iterations, time, relative error and rank of each,
and plot the relative error against iterations and time.

The first method is the one the demo checks: the exit status is 0 when its relative error is
at most 1e-6, else 1. The others are comparisons: a comparison that stops at its iteration or
time limit before reaching --tol is reported as such in the table, not as an error.
"""

# what the demo calls each method in its sentences (other methods: their name)
METHOD_WORDS = {
    "auto": "rankopt.solve's default (Riemannian Gauss-Newton from the spectral start, "
    "rank-adaptive if needed)",
    "rcg": "Riemannian conjugate gradients (a first-order method at fixed rank)",
    "rgd": "Riemannian gradient descent (a first-order method at fixed rank)",
}
# stop reasons of a comparison run that are its budget running out, not a fault
BUDGET_STOPS = {"max-iter": "iteration limit", "max-time": "time limit"}
CHECK_ERROR = 1e-6  # relative error the first method must reach for exit status 0


@dataclass
class _Run:
    """One method's run in the demo: its result, wall time, relative error and the
    ``ConvergenceWarning`` it raised, if any (reported in the table)."""

    method: str
    result: Any
    elapsed: float
    error: float
    caught: list[str] = field(default_factory=list)


def _header(ro: Any, args: argparse.Namespace, problem: Any, t_gen: float) -> None:
    """Print the versions, the machine and the problem."""
    import numpy as np

    threads = ro.solvers.get_blas_threads()
    print(f"rankopt {ro.__version__} demo: low-rank matrix completion, solved end to end")
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} cores; "
        f"solvers use {threads} BLAS thread{'s' if threads != 1 else ''} "
        "(rankopt.solvers.set_blas_threads)\n"
    )
    _say(
        f"problem: {args.size}x{args.size}, rank {args.rank}, condition number {args.kappa:g}, "
        f"{problem.nnz} observed entries (oversampling {args.oversampling:g}), "
        f"generated in {t_gen:.2f} s."
    )
    _say(
        f"goal: each method runs until its gradient norm is below --tol {args.tol:g} times "
        f"the starting one, or its iteration limit; the demo checks that {args.methods[0]} "
        f"recovers the matrix to relative error {CHECK_ERROR:g}."
    )
    print()


def _run(ro: Any, problem: Any, method: str, args: argparse.Namespace, compare: bool) -> _Run:
    """Solve with one method. For a comparison run, a ``ConvergenceWarning`` for a run that
    used up its budget is caught and kept for the table; every other warning is re-issued."""
    budget: dict[str, Any] = {}
    if args.max_time is not None:
        budget["max_time"] = args.max_time
    if args.max_iter is not None:
        budget["max_iter"] = args.max_iter
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = ro.solve(
            problem,
            rank=args.rank,
            method=method,
            tol=args.tol,
            seed=args.seed,
            track_error=True,
            **budget,
        )
    elapsed = time.perf_counter() - t
    run = _Run(method, res, elapsed, float(problem.relative_error(res.point)))
    for w in seen:
        budget_stop = str(res.stop_reason) in BUDGET_STOPS
        if compare and budget_stop and issubclass(w.category, ro.ConvergenceWarning):
            run.caught.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return run


def _verdict(run: _Run, first: bool) -> str:
    """The table's last column: whether the run converged, in words."""
    if run.result.converged:
        return "yes"
    if not first and run.caught:
        return f"no: {BUDGET_STOPS[str(run.result.stop_reason)]} (comparison)"
    return "NO"


def _table(runs: list[_Run]) -> None:
    """Print one line per run; the last column says in words whether it converged."""
    lines = [
        f"{'method':<8} {'iterations':>10} {'time [s]':>9} {'rel. error':>11} {'rank':>5}  "
        f"{'stop':<9} converged"
    ]
    for i, run in enumerate(runs):
        res = run.result
        lines.append(
            f"{run.method:<8} {res.iterations:>10d} {run.elapsed:>9.3f} {run.error:>11.2e} "
            f"{res.rank:>5d}  {str(res.stop_reason):<9} {_verdict(run, i == 0)}"
        )
    lines.insert(1, "-" * max(len(line) for line in lines))
    print("\n".join(lines))


def _say(text: str) -> None:
    """Print a paragraph wrapped to 92 columns."""
    print(textwrap.fill(text, width=92))


def _summary(runs: list[_Run], args: argparse.Namespace) -> bool:
    """Say in words what the table shows; return whether the first method passed the check."""
    first = runs[0]
    ok = first.error <= CHECK_ERROR
    print()
    _say(
        f"{first.method}: {METHOD_WORDS.get(first.method, 'method ' + repr(first.method))}, "
        f"relative error {first.error:.1e} after {first.result.iterations} iterations: "
        + (
            "recovered (check passed)."
            if ok
            else f"NOT recovered to {CHECK_ERROR:g} (check failed)."
        )
    )
    for run in runs[1:]:
        if not run.caught:
            continue
        words = METHOD_WORDS.get(run.method, "method " + repr(run.method))
        why = (
            f" First-order methods make slow progress when the condition number is high "
            f"(here {args.kappa:g})."
            if "first-order" in words
            else ""
        )
        _say(
            f"{run.method}: {words}, shown for comparison. It stopped at its "
            f"{BUDGET_STOPS[str(run.result.stop_reason)]} ({run.result.iterations} iterations) "
            f"before reaching --tol {args.tol:g}, at relative error {run.error:.1e}. This is the "
            f"comparison the demo makes, not an error.{why} --max-iter or --max-time gives it "
            "more room."
        )
    return ok


def _demo(args: argparse.Namespace) -> int:
    """Run the demo: generate the problem, solve it with each method, print and plot."""
    import rankopt as ro
    from rankopt.problems import random_completion

    t = time.perf_counter()
    problem = random_completion(
        args.size,
        args.size,
        args.rank,
        kappa=args.kappa,
        oversampling=args.oversampling,
        seed=args.seed,
    )
    _header(ro, args, problem, time.perf_counter() - t)
    runs = [_run(ro, problem, m, args, compare=i > 0) for i, m in enumerate(args.methods)]
    _table(runs)
    ok = _summary(runs, args)
    if args.plot:
        _plot(runs, args)
    return 0 if ok else 1


def _plot(runs: list[_Run], args: argparse.Namespace) -> None:
    """The convergence figure: relative error against iterations and against time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        h = run.result.history.as_arrays()
        axes[0].semilogy(h["iteration"], h["rel_error"], ".-", label=run.method)
        axes[1].semilogy(h["time"], h["rel_error"], ".-", label=run.method)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("time [s]")
    for ax in axes:
        ax.set_ylabel("relative error ||X - X*||_F / ||X*||_F")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"completion {args.size}x{args.size}, rank {args.rank}, kappa {args.kappa:g}")
    os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
    fig.savefig(args.plot, dpi=100, bbox_inches="tight")
    print(f"\nconvergence plot written to {args.plot}")


def _demo_parser(sub: Any) -> None:
    """Add the ``demo`` command and its options about the problem."""
    d = sub.add_parser(
        "demo",
        help="recover an ill-conditioned 1000 x 1000 matrix of rank 10 from 6%% of its entries "
        "with rankopt.solve, against a first-order method; prints a table, writes a plot",
        description=DEMO_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument(
        "--size",
        type=int,
        default=1000,
        help="rows and columns of the hidden matrix (default: %(default)s)",
    )
    d.add_argument(
        "--rank",
        type=int,
        default=10,
        help="rank of the hidden matrix, and the rank solved for (default: %(default)s)",
    )
    d.add_argument(
        "--kappa",
        type=float,
        default=100.0,
        help="condition number of the hidden matrix: largest over smallest nonzero singular value "
        "(default: %(default)g)",
    )
    d.add_argument(
        "--oversampling",
        type=float,
        default=3.0,
        help="observed entries per degree of freedom: oversampling * rank * (2 size - rank) "
        "entries are observed; lower is harder (default: %(default)g)",
    )
    _solver_options(d)


def _solver_options(d: argparse.ArgumentParser) -> None:
    """Add the demo's options that concern the solvers and the output."""
    d.add_argument(
        "--tol",
        type=float,
        default=1e-12,
        help="relative gradient tolerance: a run converges when its gradient norm falls below "
        "tol times the starting one (default: %(default)g)",
    )
    d.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed of the hidden matrix, the observed entries and the solvers' starts "
        "(default: %(default)s; the same seed gives the same iteration counts)",
    )
    d.add_argument(
        "--max-time",
        type=float,
        default=None,
        help="seconds per solver (default: none, so that the iteration counts do not depend "
        "on the machine's speed or load; each solver stops at its tolerance or iteration limit)",
    )
    d.add_argument(
        "--max-iter",
        type=int,
        default=None,
        help="iteration limit per solver (default: rankopt.solve's, 200 for auto, 2000 for rcg)",
    )
    d.add_argument(
        "--methods",
        nargs="+",
        default=["auto", "rcg"],
        help="methods of rankopt.solve to run: the first is checked, the others are comparisons "
        "(default: auto rcg)",
    )
    d.add_argument(
        "--plot",
        default="out/demo_convergence.png",
        help="PNG path of the plot, '' for none (default: %(default)s)",
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success; without a command, the help is printed and 0 returned.
    """
    run_as_module = os.path.basename(sys.argv[0]) == "__main__.py"
    parser = argparse.ArgumentParser(
        prog="python -m rankopt" if run_as_module else "rankopt",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", title="commands", metavar="{demo}")
    _demo_parser(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        print(f"\nNo command given. Start with: {parser.prog} demo")
        return 0
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())
