"""Command line: ``python -m rankopt demo`` (also the ``rankopt`` console script)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    import numpy as np

    import rankopt as ro
    from rankopt.problems import random_completion

    print(f"rankopt {ro.__version__} demo: low-rank matrix completion, solved end to end")
    threads = ro.solvers.get_blas_threads()
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} cores; "
        f"solvers use {threads} BLAS thread{'s' if threads != 1 else ''} "
        "(rankopt.solvers.set_blas_threads)\n"
    )
    t = time.perf_counter()
    problem = random_completion(
        args.size,
        args.size,
        args.rank,
        kappa=args.kappa,
        oversampling=args.oversampling,
        seed=args.seed,
    )
    t_gen = time.perf_counter() - t
    print(
        f"problem: {args.size}x{args.size}, rank {args.rank}, condition number {args.kappa:g}, "
        f"{problem.nnz} observed entries (oversampling {args.oversampling:g}), generated in {t_gen:.2f} s\n"
    )
    rows = []
    budget = {} if args.max_time is None else {"max_time": args.max_time}
    if args.max_iter is not None:
        budget["max_iter"] = args.max_iter
    for method in args.methods:
        t = time.perf_counter()
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
        rows.append((method, res, elapsed, problem.relative_error(res.point)))
    head = f"{'method':<8} {'iterations':>10} {'time [s]':>9} {'rel. error':>11} {'rank':>5}  stop"
    print(head)
    print("-" * len(head))
    for method, res, elapsed, err in rows:
        print(
            f"{method:<8} {res.iterations:>10d} {elapsed:>9.3f} {err:>11.2e} {res.rank:>5d}  {res.stop_reason}"
        )
    if args.plot:
        _plot(rows, args)
    ok = all(err <= 1e-6 for *_, err in rows[:1])
    return 0 if ok else 1


def _plot(rows: list, args: argparse.Namespace) -> None:
    """The convergence figure: relative error against iterations and against time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, res, _, _ in rows:
        h = res.history.as_arrays()
        axes[0].semilogy(h["iteration"], h["rel_error"], ".-", label=method)
        axes[1].semilogy(h["time"], h["rel_error"], ".-", label=method)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rankopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo", help="solve an ill-conditioned 1000x1000 rank-10 completion end to end"
    )
    d.add_argument("--size", type=int, default=1000)
    d.add_argument("--rank", type=int, default=10)
    d.add_argument(
        "--kappa", type=float, default=100.0, help="condition number of the hidden matrix"
    )
    d.add_argument("--oversampling", type=float, default=3.0)
    d.add_argument("--tol", type=float, default=1e-12)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--max-time",
        type=float,
        default=None,
        help="seconds per solver (default: none, so that the iteration counts do not depend "
        "on the machine's speed or load; each solver stops at its tolerance or max_iter)",
    )
    d.add_argument(
        "--max-iter", type=int, default=None, help="iteration cap per solver (default: solve's)"
    )
    d.add_argument("--methods", nargs="+", default=["auto", "rcg"], help="solvers to compare")
    d.add_argument("--plot", default="out/demo_convergence.png", help="PNG path ('' to skip)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
