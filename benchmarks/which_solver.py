"""The measurements behind "Which solver when" (docs/solvers.md).

One row per situation, several methods each, all through ``rankopt.solve`` with the library's
defaults (1 BLAS thread), the same spectral start, ``tol=1e-10`` and the method's default
iteration cap unless said otherwise; times are wall-clock, end to end:

* ``exact, kappa=1`` and ``exact, kappa=1e4``: completion ``n x n``, rank 10, oversampling 3,
  exact data: relative error to the truth;
* ``noisy, sigma=1e-4`` and ``noisy, sigma=1e-3``: the same with Gaussian noise on the
  observations (kappa 1): relative error to the truth;
* ``gradient only, kappa=1`` / ``kappa=100``: a generic ``Problem(cost, egrad)`` without
  Hessian, the best rank-10 approximation of a dense ``n x 0.8 n`` matrix (a rank-10 matrix
  with that condition number plus 1e-3 noise): relative distance to the optimum ``X*`` (the
  truncated SVD, computed once), ``||X - X*||_F / ||X*||_F``;
* ``gradient only, completion kappa=100``: the kappa-100 completion wrapped as a generic
  ``Problem(cost, egrad)``: no Hessian, no exact line search, no spectral start (random start);
* ``large``: completion at ``--large`` (default 10,000; skipped in ``--quick``), kappa 1.

    python -m benchmarks.which_solver           # n = 1000: about 2-4 min on 2 cores
    python -m benchmarks.which_solver --quick   # n = 200, smoke run

Writes ``out/which_solver.md`` (machine info and the table), ``out/which_solver.json`` and
``out/which_solver.png`` (``--replot`` redraws the PNG from the JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import rankopt as ro
from benchmarks.harness import machine_info, pyplot
from rankopt.problems import random_completion, warmup_kernels

RANK = 10
COMPLETION_METHODS = {
    "auto": {},
    "rcg": {},
    "rgd": {},
    "radamw (lr 3e-4)": {"method": "radamw", "lr": 3e-4, "max_iter": 1000},
}
GRADIENT_ONLY_METHODS = {
    "rcg": {},
    "rgd": {},
    "rcg + Preconditioned(0.5)": {"metric": ro.metrics.Preconditioned(core_weight=0.5)},
    "radamw (lr 1e-2)": {"method": "radamw", "lr": 1e-2, "max_iter": 1000},
    "adaptive-rcg": {"max_iter": 2000},
}


def _method(label: str, kw: dict) -> dict:
    kw = dict(kw)
    kw.setdefault("method", label.split(" ")[0])
    return kw


def dense_problem(m: int, n: int, kappa: float, seed: int) -> Any:
    """0.5 ||X - A||^2 for A = rank-10 (condition kappa) + 1e-3 noise; its truth is the
    truncated SVD of A (the minimizer), so ``problem.relative_error`` measures the distance."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, RANK)))
    V, _ = np.linalg.qr(rng.standard_normal((n, RANK)))
    s = np.geomspace(1.0, 1.0 / kappa, RANK) * np.sqrt(m * n / RANK) * 1e-2
    A = (U * s) @ V.T + 1e-3 * rng.standard_normal((m, n))
    u, sv, vt = np.linalg.svd(A, full_matrices=False)
    best = ro.FixedRankPoint(u[:, :RANK], sv[:RANK], vt[:RANK].T.copy())

    def cost_and_egrad(x):
        R = x.to_dense() - A
        return 0.5 * float(np.sum(R * R)), R

    problem = ro.problems.Problem(
        lambda x: cost_and_egrad(x)[0],
        lambda x: cost_and_egrad(x)[1],
        shape=(m, n),
        cost_and_egrad=cost_and_egrad,
        truth=best,
    )
    return problem


def run(problem, label: str, kw: dict, measure) -> dict:
    t = time.perf_counter()
    try:
        res = ro.solve(problem, RANK, tol=1e-10, seed=0, **_method(label, kw))
    except (TypeError, ValueError) as e:  # e.g. "auto" on a problem without Hessian
        return {"method": label, "error": "refused: " + str(e).split(",")[0]}
    return {
        "method": label,
        "iterations": res.iterations,
        "time": time.perf_counter() - t,
        "measure": measure(res.point),
        "stop": str(res.stop_reason),
    }


def situations(n: int, large: int | None):
    """(name, what is measured, problem, measure(point), methods)."""
    for kappa in (1.0, 1e4):
        p = random_completion(n, n, RANK, kappa=kappa, oversampling=3, seed=0)
        yield f"exact, kappa={kappa:g}", "rel. error", p, p.relative_error, COMPLETION_METHODS
    for sigma in (1e-4, 1e-3):
        p = random_completion(n, n, RANK, oversampling=3, seed=3, noise=sigma)
        yield f"noisy, sigma={sigma:g}", "rel. error", p, p.relative_error, COMPLETION_METHODS
    for kappa in (1.0, 100.0):
        p = dense_problem(n, int(0.8 * n), kappa, 0)
        methods = {"auto": {}, **GRADIENT_ONLY_METHODS}
        yield f"gradient only, kappa={kappa:g}", "distance to X*", p, p.relative_error, methods
    q = random_completion(n, n, RANK, kappa=100, oversampling=3, seed=0)
    p = ro.problems.Problem(  # the same completion seen through cost and gradient only
        q.cost, q.egrad, shape=q.shape, cost_and_egrad=q.cost_and_egrad, truth=q.truth
    )
    yield (
        "gradient only, completion kappa=100",
        "rel. error",
        p,
        p.relative_error,
        {
            "rcg": {},
            "rcg + Preconditioned(0.5)": GRADIENT_ONLY_METHODS["rcg + Preconditioned(0.5)"],
            "adaptive-rcg": {"max_iter": 2000},
        },
    )
    if large:
        p = random_completion(large, large, RANK, oversampling=3, seed=0)
        yield (
            f"large n={large}, kappa=1",
            "rel. error",
            p,
            p.relative_error,
            {"auto": {}, "rcg": {}},
        )


def table(rows: list[dict]) -> str:
    lines = [
        "| situation | measured | method | iterations | time [s] | value | stop |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['situation']} | {r['what']} | {r['method']} | - | - | - | {r['error']} |"
            )
            continue
        lines.append(
            f"| {r['situation']} | {r['what']} | {r['method']} | {r['iterations']} | "
            f"{r['time']:.3f} | {r['measure']:.1e} | {r['stop']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, quick: bool) -> None:
    """One panel per situation (2 rows), error against time, one color per method."""
    plt = pyplot()
    from matplotlib.ticker import NullFormatter

    sits = list(dict.fromkeys(r["situation"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {m: plt.get_cmap("tab10")(k % 10) for k, m in enumerate(methods)}
    ncol = (len(sits) + 1) // 2
    fig, axes = plt.subplots(2, ncol, figsize=(3.6 * ncol, 7), squeeze=False)
    for ax, sit in zip(axes.flat, sits, strict=False):
        ys = []
        for r in (r for r in rows if r["situation"] == sit and "error" not in r):
            ys.append(max(r["measure"], 1e-16))
            ax.loglog(r["time"], ys[-1], "o", ms=8, color=colors[r["method"]])
        if ys and max(ys) < 10 * min(ys):  # equal errors: show a decade around them
            ax.set_ylim(min(ys) / 4, max(ys) * 4)
        ax.set_title(sit, fontsize=9)
        ax.set_xlabel("time [s]")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes.flat[len(sits) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("rel. error (to truth, or to X*)")
    handles = [plt.Line2D([], [], marker="o", ls="", color=colors[m], label=m) for m in methods]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(methods), 6), fontsize=9)
    title = "Which solver when: error against time, one panel per situation"
    fig.suptitle(title + (" (QUICK smoke run)" if quick else ""))
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=100, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="n = 200, no large case")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--large", type=int, default=10_000, help="0 to skip")
    ap.add_argument("--out", default="out")
    ap.add_argument("--replot", action="store_true", help="redraw the PNG from the saved JSON")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        saved = json.loads((out / "which_solver.json").read_text())
        plot(saved["rows"], out / "which_solver.png", saved["quick"])
        return 0
    n, large = (200, None) if args.quick else (args.n, args.large or None)
    out.mkdir(parents=True, exist_ok=True)
    head = machine_info()
    print(
        head + f"\nrankopt BLAS threads in solvers: {ro.solvers.get_blas_threads()}\n", flush=True
    )
    warmup_kernels()
    rows = []
    for sit, what, problem, measure, methods in situations(n, large):
        for label, kw in methods.items():
            row = {"situation": sit, "what": what, **run(problem, label, kw, measure)}
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    text = table(rows)
    print("\n" + text)
    threads = f"rankopt solvers ran with {ro.solvers.get_blas_threads()} BLAS thread(s) (the library default)"
    (out / "which_solver.md").write_text(head + "\n" + threads + "\n\n" + text + "\n")
    (out / "which_solver.json").write_text(json.dumps({"quick": args.quick, "rows": rows}))
    plot(rows, out / "which_solver.png", args.quick)
    print(f"\nwrote {out / 'which_solver.md'} and {out / 'which_solver.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
