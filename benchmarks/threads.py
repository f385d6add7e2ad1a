"""BLAS threads inside solver runs: the library default (1 thread) against the BLAS default.

``rankopt.solve`` and every solver's ``run`` limit BLAS to one thread (threadpoolctl) unless
told otherwise (``solve(..., threads=None)`` or ``rankopt.solvers.set_blas_threads(None)``
leaves the BLAS library's own setting, here all cores). This script measures both settings on
the same problems, interleaved in one process (A, B, B, A, ...: no order bias) after one untimed warm-up run of each, medians of
``--repeats``:

* ``readme``: the README's example (2000 x 2000, rank 10, kappa 1e3, ``solve(..., tol=1e-12)``);
* ``demo-auto`` / ``demo-rcg``: the two rows of ``python -m rankopt demo`` (1000 x 1000,
  rank 10, kappa 100; rcg capped at 300 iterations here to keep the run short);
* ``dense-rcg``: a generic problem with a dense gradient (best rank-10 approximation of a
  dense 1000 x 800 matrix, RCG, 100 iterations): the projection multiplies an m x n matrix by
  r columns, the one place a multi-threaded BLAS could pay off;
* ``small-rcg``: 200 x 200 completion, RCG, 300 iterations (tiny kernels).

Each setting runs on the machine as it is ("as is") and, with ``--load K``, again while K
busy processes (one pure-Python loop each) compete for the cores, the situation of a laptop
or a shared server. Iteration counts of repeated runs are compared too (they must agree). The
capped cases (``demo-rcg``, ``dense-rcg``, ``small-rcg``) time a fixed amount of work and are not
meant to converge: their ``ConvergenceWarning`` is not shown.

    python -m benchmarks.threads               # ~3-5 min on 2 cores
    python -m benchmarks.threads --quick       # smoke run: 1 repeat, small problems

Writes ``out/threads.md`` (the table) and ``out/threads.png`` (time ratios).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

import rankopt as ro
from benchmarks.harness import machine_info, pyplot, time_interleaved
from rankopt.problems import random_completion, warmup_kernels

SETTINGS = {"1 thread (default)": 1, "BLAS default": None}


def _busy() -> None:  # pragma: no cover - runs in a child process
    while True:
        pass


def _dense_problem(m: int, n: int, r: int, seed: int) -> Any:
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) + 0.01 * rng.standard_normal(
        (m, n)
    )

    def cost_and_egrad(x):
        R = x.to_dense() - A
        return 0.5 * float(np.sum(R * R)), R

    return ro.problems.Problem(
        lambda x: cost_and_egrad(x)[0],
        lambda x: cost_and_egrad(x)[1],
        shape=(m, n),
        cost_and_egrad=cost_and_egrad,
    )


def cases(quick: bool) -> dict[str, tuple[Any, dict[str, Any]]]:
    """name -> (problem, solve keyword arguments)."""
    big, mid, dense = (400, 300, (300, 200)) if quick else (2000, 1000, (1000, 800))
    readme = random_completion(big, big, 10, kappa=1e3, oversampling=3, seed=0)
    demo = random_completion(mid, mid, 10, kappa=100, oversampling=3, seed=0)
    small = random_completion(200, 200, 5, oversampling=3, seed=0)
    return {
        "readme": (readme, {"rank": 10, "tol": 1e-12}),
        "demo-auto": (demo, {"rank": 10, "tol": 1e-12, "seed": 0}),
        "demo-rcg": (demo, {"rank": 10, "tol": 1e-12, "seed": 0, "method": "rcg", "max_iter": 300}),
        "dense-rcg": (
            _dense_problem(*dense, 10, 0),
            {"rank": 10, "method": "rcg", "max_iter": 100},
        ),
        "small-rcg": (small, {"rank": 5, "method": "rcg", "max_iter": 300, "tol": 0.0}),
    }


def _solve(problem: Any, threads: int | None, kw: dict[str, Any]) -> Any:
    """``ro.solve`` with ``threads``; a capped case's ``ConvergenceWarning`` (it is meant to
    stop at ``max_iter``, or runs to ``tol=0``) is not shown, every other warning is."""
    with warnings.catch_warnings():
        if "max_iter" in kw or kw.get("tol") == 0.0:
            warnings.simplefilter("ignore", ro.ConvergenceWarning)
        return ro.solve(problem, threads=threads, **kw)


def measure(problems, repeats: int, log) -> dict[str, dict[str, list]]:
    """Interleaved runs (A, B, B, A, ...: no order bias) after one untimed warm-up run of each
    setting; returns name -> setting -> [(seconds, iterations), ...]."""
    out: dict[str, dict[str, list]] = {}
    for name, (problem, kw) in problems.items():
        fns = {
            label: (lambda p=problem, t=threads, kw=kw: _solve(p, t, kw))
            for label, threads in SETTINGS.items()
        }

        def progress(rnd, timings, name=name):
            log(
                f"  {name} repeat {rnd + 1}/{repeats}: "
                + ", ".join(
                    f"{k} {t.seconds[-1]:.3f} s ({t.results[-1].iterations} it)"
                    for k, t in timings.items()
                )
            )

        timings = time_interleaved(
            fns, repeats, alternate=True, keep_results=True, on_round=progress
        )
        out[name] = {
            k: [(s, r.iterations) for s, r in zip(t.seconds, t.results, strict=True)]
            for k, t in timings.items()
        }
    return out


def table(results: dict[str, dict[str, dict[str, list]]]) -> str:
    lines = [
        "| condition | case | 1 thread: median s | BLAS default: median s | BLAS default / 1 thread | iterations (all runs) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for cond, per in results.items():
        for name, d in per.items():
            a, b = ([t for t, _ in d[s]] for s in SETTINGS)
            its = sorted({i for s in SETTINGS for _, i in d[s]})
            ma, mb = statistics.median(a), statistics.median(b)
            lines.append(
                f"| {cond} | {name} | {ma:.3f} (min {min(a):.3f}, max {max(a):.3f}) | "
                f"{mb:.3f} (min {min(b):.3f}, max {max(b):.3f}) | {mb / ma:.2f} | "
                f"{', '.join(map(str, its))} |"
            )
    return "\n".join(lines)


def plot(results, path: Path, quick: bool) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    names = list(next(iter(results.values())))
    width = 0.8 / len(results)
    for k, (cond, per) in enumerate(results.items()):
        ratios = [
            statistics.median([t for t, _ in per[n]["BLAS default"]])
            / statistics.median([t for t, _ in per[n]["1 thread (default)"]])
            for n in names
        ]
        ax.bar(np.arange(len(names)) + k * width, ratios, width, label=cond)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(names)) + width * (len(results) - 1) / 2, names)
    ax.set_ylabel("time with BLAS default / time with 1 thread")
    title = "BLAS threads in rankopt.solve: > 1 means the 1-thread default is faster"
    ax.set_title(title + (" (QUICK smoke run)" if quick else ""), fontsize=10)
    ax.legend()
    ax.grid(True, which="both", axis="y", alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 repeat, small problems")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--load", type=int, default=os.cpu_count() or 2, help="busy processes (0: none)"
    )
    ap.add_argument("--cases", nargs="+", default=None, help="subset of the cases to run")
    ap.add_argument("--out", default="out")
    args = ap.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(machine_info(), flush=True)
    print(f"rankopt default BLAS threads in solvers: {ro.solvers.get_blas_threads()}\n", flush=True)
    warmup_kernels()
    problems = cases(args.quick)
    if args.cases:
        problems = {k: v for k, v in problems.items() if k in args.cases}
    results = {}
    print("## as is", flush=True)
    results["as is"] = measure(problems, repeats, lambda s: print(s, flush=True))
    if args.load > 0:
        print(f"## with {args.load} busy processes", flush=True)
        procs = [mp.Process(target=_busy, daemon=True) for _ in range(args.load)]
        for p in procs:
            p.start()
        try:
            results[f"{args.load} busy processes"] = measure(
                problems, repeats, lambda s: print(s, flush=True)
            )
        finally:
            for p in procs:
                p.terminate()
                p.join()
    text = table(results)
    print("\n" + text, flush=True)
    stem = "threads" if not args.cases else "threads_" + "_".join(args.cases)
    (out / f"{stem}.md").write_text(machine_info() + "\n\n" + text + "\n")
    plot(results, out / f"{stem}.png", args.quick)
    print(f"\nwrote {out / (stem + '.md')} and {out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
