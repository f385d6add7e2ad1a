"""Benchmark: tangent projection of a sparse matrix and one retraction, rankopt vs pymanopt.

For m = n in {1e3, 1e4, 1e5} and r in {10, 50}:

* a scipy.sparse CSR matrix Z with ``min(10 r (m + n), m n)`` random entries (every row gets the
  same number of distinct, uniformly random columns; standard normal values);
* a random point x (rankopt's ``random_point``) and xi = P_x(Z);
* timed: ``projection(x, Z)`` (only the products Z V and Z^T U touch Z: O(nnz r + (m+n) r^2))
  and ``retraction(x, xi)`` (QR of two (m+n) x 2r blocks, a 2r x 2r SVD: O((m+n) r^2 + r^3)),
  for rankopt's NumPy backend, rankopt's torch backend on the CPU (Z as a torch sparse CSR
  tensor) and pymanopt 2.2.1's ``FixedRankEmbedded.projection`` / ``.retraction`` on the same
  point in pymanopt's ``(u, s, vt)`` layout (pymanopt's ``to_tangent_space`` re-projects a
  tangent vector; the ambient projection is ``projection``).

Each time is the median over up to ``--repeats`` calls, fewer when one call is slow (the
number of calls is printed with the time; a fast first call is discarded as warm-up). The
implementations are called round-robin, so they see the same machine load. The two
libraries' results are compared (projection: max abs difference; retraction: singular values)
to make sure the same operation is timed. A log-scale bar chart goes to
``out/manifold_ops.png`` (out/ is git-ignored).

Run: ``python -m benchmarks.manifold_ops [--quick] [--threads N] [--no-torch]``.
``--quick`` runs m = 1e3 only. The full run takes about 5 minutes and < 6 GB on a 2-core
machine (the m = 1e5, r = 50 matrix has 1e8 entries, 1.2 GB in CSR).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import machine_info, pin_threads, pyplot, time_interleaved

HERE = Path(__file__).resolve().parent
IMPLS = ("rankopt-numpy", "rankopt-torch", "pymanopt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="only m = n = 1000")
    p.add_argument("--repeats", type=int, default=9, help="most timed calls per cell")
    p.add_argument("--budget", type=float, default=6.0, help="seconds of timed calls per cell")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="BLAS/OpenMP/numba/torch threads (default: the libraries' own)",
    )
    p.add_argument("--no-torch", action="store_true", help="skip rankopt's torch backend")
    p.add_argument(
        "--torch-max-m", type=int, default=10_000, help="largest m for the torch backend"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE.parent / "out" / "manifold_ops.png"))
    return p.parse_args(argv)


# --------------------------------------------------------------------------- data


def sparse_matrix(m: int, n: int, nnz: int, rng) -> Any:
    """CSR matrix with ``min(nnz, m n)`` entries: ``nnz // m`` distinct random columns per row.

    Columns are drawn with replacement and duplicates within a row redrawn until none is
    left (a few percent at these densities); rows with more than n/2 entries use a random
    permutation of the columns instead. O(nnz log(nnz / m)) time, O(nnz) memory.
    """
    import numpy as np
    import scipy.sparse as sps

    per = min(n, max(1, nnz // m))
    if 2 * per > n:
        cols = np.argsort(rng.random((m, n)), axis=1)[:, :per].astype(np.int32)
        cols.sort(axis=1)
    else:
        cols = rng.integers(0, n, size=(m, per), dtype=np.int32)
        cols.sort(axis=1)
        while True:
            dup = np.zeros(cols.shape, dtype=bool)
            dup[:, 1:] = cols[:, 1:] == cols[:, :-1]
            k = int(dup.sum())
            if k == 0:
                break
            cols[dup] = rng.integers(0, n, size=k, dtype=np.int32)
            cols.sort(axis=1)
    indptr = np.arange(m + 1, dtype=np.int64) * per
    data = rng.standard_normal(m * per)
    return sps.csr_matrix((data, cols.ravel(), indptr), shape=(m, n))


# --------------------------------------------------------------------------- timing


def bench(fns: dict[str, Callable[[], Any]], repeats: int, budget: float) -> dict[str, tuple]:
    """Time several implementations of one operation, interleaved (:func:`time_interleaved`).

    Calls go round-robin (a, b, c, a, b, c, ...) so that every implementation sees the same
    machine load. Returns ``{name: (median seconds, min seconds, number of timed calls, last
    result)}``. A first call that is fast (< budget / 20) is discarded as warm-up; timing stops
    after ``repeats`` rounds or once an implementation has spent ``budget`` seconds (at least
    one timed call each).
    """
    t = time_interleaved(fns, repeats, warmup=1, budget=budget)
    return {k: (v.median, v.min, len(v.seconds), v.last) for k, v in t.items()}


def run_case(
    m: int, r: int, args: argparse.Namespace, have_torch: bool, have_pymanopt: bool
) -> dict:
    import numpy as np

    import rankopt as ro

    rng = np.random.default_rng(args.seed)
    nnz_target = 10 * r * (m + m)
    t0 = time.perf_counter()
    Z = sparse_matrix(m, m, nnz_target, rng)
    gen = time.perf_counter() - t0
    row: dict[str, Any] = {"m": m, "r": r, "nnz": Z.nnz, "gen_s": gen, "times": {}, "notes": []}

    M = ro.FixedRankManifold(m, m, r)
    x = M.random_point(rng)
    project = {"rankopt-numpy": lambda: M.projection(x, Z)}
    retract = {"rankopt-numpy": lambda v: M.retraction(x, v)}

    if have_torch and not args.no_torch:
        if m > args.torch_max_m:
            row["notes"].append(
                f"rankopt-torch: n/a (skipped, m > --torch-max-m={args.torch_max_m}: torch's CPU "
                "product Z^T @ U for a sparse CSR Z is ~25x slower than Z @ V)"
            )
        else:
            import torch

            T = ro.FixedRankManifold(m, m, r, backend="torch")
            xt = ro.FixedRankPoint(*(torch.from_numpy(a) for a in (x.U, x.s, x.V)))
            with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
                warnings.simplefilter("ignore", UserWarning)
                Zt = torch.sparse_csr_tensor(
                    torch.from_numpy(Z.indptr.astype(np.int64)),
                    torch.from_numpy(Z.indices.astype(np.int64)),
                    torch.from_numpy(Z.data),
                    size=Z.shape,
                )
            project["rankopt-torch"] = lambda: T.projection(xt, Zt)
            retract["rankopt-torch"] = lambda v: T.retraction(xt, v)

    if have_pymanopt:
        from pymanopt.manifolds import FixedRankEmbedded

        P = FixedRankEmbedded(m, m, r)
        pt = (x.U, x.s, np.ascontiguousarray(x.V.T))  # pymanopt's (u, s, vt) layout
        project["pymanopt"] = lambda: P.projection(pt, Z)
        retract["pymanopt"] = lambda w: P.retraction(pt, w)

    try:
        proj = bench(project, args.repeats, args.budget)
        retr = bench(
            {k: (lambda f=f, v=proj[k][3]: f(v)) for k, f in retract.items()},
            args.repeats,
            args.budget,
        )
    except MemoryError:  # pragma: no cover - not reached at the default sizes
        row["notes"].append("n/a: out of memory")
        return row
    for k in project:
        row["times"][k] = {"projection": proj[k][:3], "retraction": retr[k][:3]}
    if "pymanopt" in proj:
        # the same operation is timed: pymanopt's tangent vector is (Up, M, Vp)
        xi, v = proj["rankopt-numpy"][3], proj["pymanopt"][3]
        y, yp = retr["rankopt-numpy"][3], retr["pymanopt"][3]
        scale = float(np.abs(xi.Up).max())
        dproj = max(
            float(np.abs(a - b).max()) for a, b in ((v.Up, xi.Up), (v.M, xi.M), (v.Vp, xi.Vp))
        )
        dretr = float(np.abs(np.asarray(yp[1]) - y.s).max() / y.s[0])
        row["notes"].append(
            f"pymanopt vs rankopt-numpy: projection differs by {dproj / scale:.1e}, "
            f"retracted s by {dretr:.1e} (relative)"
        )
    return row


# --------------------------------------------------------------------------- output


def _fmt(cell: tuple[float, float, int] | None) -> str:
    if cell is None:
        return "n/a"
    t, _, k = cell
    s = f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s"
    return f"{s} ({k})"


def print_table(rows: list[dict], impls: list[str]) -> None:
    head = ["m = n", "r", "nnz", "operation", *impls, "pymanopt / rankopt-numpy", "(of minima)"]
    lines = [head]
    for row in rows:
        for op in ("projection", "retraction"):
            cells = []
            for impl in impls:
                times = row["times"].get(impl)
                cells.append(_fmt(times[op] if times else None))
            ro_t = row["times"]["rankopt-numpy"][op]
            pm = row["times"].get("pymanopt")
            ratio = f"{pm[op][0] / ro_t[0]:.2f}" if pm else "n/a"
            ratio_min = f"{pm[op][1] / ro_t[1]:.2f}" if pm else "n/a"
            lines.append(
                [
                    f"{row['m']:.0e}",
                    str(row["r"]),
                    f"{row['nnz']:.2e}",
                    op,
                    *cells,
                    ratio,
                    ratio_min,
                ]
            )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for i, line in enumerate(lines):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(
        "time: median (number of timed calls); ratios of medians and of minima (the minimum is the "
        "least disturbed by other processes when the machine is shared)"
    )
    for row in rows:
        for note in row["notes"]:
            print(f"m={row['m']:.0e}, r={row['r']}: {note}")


def plot(rows: list[dict], impls: list[str], path: str) -> None:
    import numpy as np

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=False)
    labels = [f"m=1e{len(str(row['m'])) - 1}\nr={row['r']}" for row in rows]
    width = 0.8 / len(impls)
    for ax, op in zip(axes, ("projection", "retraction"), strict=True):
        for k, impl in enumerate(impls):
            vals = [row["times"][impl][op][0] if row["times"].get(impl) else np.nan for row in rows]
            ax.bar(
                np.arange(len(rows)) + (k - (len(impls) - 1) / 2) * width, vals, width, label=impl
            )
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(rows)), labels)
        ax.set_ylabel("seconds (median)")
        ax.set_title(f"{op} (sparse Z with 10 r (m+n) entries)" if op == "projection" else op)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"chart: {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    have_torch = importlib.util.find_spec("torch") is not None
    have_pymanopt = importlib.util.find_spec("pymanopt") is not None
    threads = pin_threads(args.threads, torch=have_torch and not args.no_torch)
    print(machine_info())
    print(threads)
    print()
    sizes = [1000] if args.quick else [1000, 10_000, 100_000]
    impls = [i for i in IMPLS if not (i == "rankopt-torch" and (args.no_torch or not have_torch))]
    if not have_pymanopt:
        print("pymanopt not installed: its column is n/a (pip install -e '.[pymanopt]')")
    rows = []
    t_start = time.perf_counter()
    for m in sizes:
        for r in (10, 50):
            row = run_case(m, r, args, have_torch, have_pymanopt)
            rows.append(row)
            print(
                f"  done m={m:.0e} r={r}: nnz {row['nnz']:.2e} (generated in {row['gen_s']:.1f} s), "
                f"{time.perf_counter() - t_start:.0f} s so far",
                flush=True,
            )
    print()
    print_table(rows, impls)
    plot(rows, impls, args.out)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
