r"""Large completion problems for ``python -m benchmarks.completion --scale`` (one fresh process
each).

Each size runs in its own process (``python -m benchmarks.completion --_worker ...``) so that
its peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, generation included)
is its own; the worker prints a line per stage (generation, spectral start, every Gauss-Newton
iteration with its time) and a JSON line with the results:

* ``generate_s`` (``random_completion``), ``time`` (``ro.solve``, end to end, less the
  callback's error evaluations), ``iterations``, ``trace`` (time and relative error after every
  iteration), ``longest_error_rise`` (most consecutive iterations whose error grew),
  ``cpu_s`` (the process's CPU seconds of the solve: with one thread, the time on an idle
  core when the machine is shared), ``load_average`` (1 min, at the end),
  ``cg_iterations`` (inner CG, phase 1), ``time_per_iteration``, ``rel_error``, ``stop``,
  ``phase``, ``peak_rss_gib``, ``threads`` (``solve(..., threads=N)``: BLAS and the numba
  kernels).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import pyplot

RANK = 10
#: the folder that holds the ``benchmarks`` package (the workers' working directory)
ROOT = Path(__file__).resolve().parents[1]


def run_worker(
    n: int,
    seed: int,
    kappa: float,
    oversampling: float,
    max_time: float,
    parallel: bool = False,
    backend: str = "numpy",
    device: str | None = None,
    threads: int = 1,
) -> None:
    """Generate one problem and solve it with ``ro.solve(..., threads=threads)`` (BLAS and the
    kernels on ``threads`` threads; ``parallel`` without ``threads``, the older spelling: the
    ``NUMBA_NUM_THREADS`` of the environment); prints progress lines and a final JSON line."""
    import rankopt as ro
    from rankopt.problems import random_completion, warmup_kernels

    if parallel and threads == 1:
        threads = int(os.environ.get("NUMBA_NUM_THREADS", "2") or 2)
    warmup_kernels(parallel=None if threads > 1 else False)
    t = time.perf_counter()
    p = random_completion(
        n,
        n,
        RANK,
        kappa=kappa,
        oversampling=oversampling,
        seed=seed,
        backend=backend,
        device=device,
    )
    t_gen = time.perf_counter() - t
    print(f"  generated n={n} seed={seed}: |Omega|={p.nnz} in {t_gen:.1f} s", flush=True)
    progress = ErrorTrace(p)
    res = ro.solve(
        p, RANK, tol=1e-10, seed=0, max_time=max_time, callback=progress, threads=threads
    )
    t_solve, cpu = progress.elapsed()
    trace = progress.trace
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    first = res.info.get("first_phase", res)
    state = first.info.get("state")
    out = {
        "n": n,
        "seed": seed,
        "kappa": kappa,
        "oversampling": oversampling,
        "nnz": p.nnz,
        "generate_s": t_gen,
        "time": t_solve,
        "cpu_s": cpu,
        "load_average": os.getloadavg()[0],
        "iterations": res.iterations,
        "cg_iterations": getattr(state, "cg_total", None),
        "time_per_iteration": t_solve / max(res.iterations, 1),
        "rel_error": float(p.relative_error(res.point)),
        "stop": str(res.stop_reason),
        "phase": res.info.get("phase"),
        "rank": res.rank,
        "peak_rss_gib": ru / 2**20 if sys.platform != "darwin" else ru / 2**30,
        "threads": threads,
        "first_phase_skipped": res.info.get("first_phase_skipped"),
        "longest_error_rise": longest_rise([e for _, e in trace]),
        "trace": trace,
        "backend": backend,
        "device": str(device),
    }
    print(json.dumps(out), flush=True)


class ErrorTrace:
    """A solve's callback: prints a line per iteration and keeps ``trace``, the (seconds since
    construction, relative error) after every iteration; the seconds it spends itself (the
    error, O((m + n) r^2)) are taken out of the times it reports."""

    def __init__(self, problem: Any) -> None:
        self.problem, self.trace = problem, []
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.spent = [0.0, 0.0]  # own wall and CPU seconds

    def __call__(self, info: Any) -> None:
        t_in, c_in = time.perf_counter(), time.process_time()
        err = float(self.problem.relative_error(info.point))
        self.trace.append((t_in - self.t0 - self.spent[0], err))
        print(
            f"    iteration {info.iteration}: {self.trace[-1][0]:.1f} s, rank "
            f"{info.point.rank}, gradient {info.grad_norm:.2e}, error {err:.2e}",
            flush=True,
        )
        self.spent[0] += time.perf_counter() - t_in
        self.spent[1] += time.process_time() - c_in

    def elapsed(self) -> tuple[float, float]:
        """Wall and CPU seconds since construction, less the callback's own."""
        wall = time.perf_counter() - self.t0 - self.spent[0]
        return wall, time.process_time() - self.c0 - self.spent[1]


def longest_rise(errors: list[float]) -> int:
    """The most consecutive iterations whose error grew by more than 0.1% (rounding-level
    jitter near the end does not count; the issue's acceptance: at most 2)."""
    best = run = 0
    for a, b in zip(errors, errors[1:], strict=False):
        run = run + 1 if b > 1.001 * a else 0
        best = max(best, run)
    return best


def run_fresh(
    n: int,
    seed: int,
    log: Callable[[str], None],
    *,
    kappa: float = 1.0,
    oversampling: float = 3.0,
    max_time: float = 1800.0,
    threads: int = 1,
    backend: str = "numpy",
    device: str | None = None,
) -> dict:
    """Run :func:`run_worker` in a fresh process (``python -m benchmarks.completion --_worker``,
    from the folder that holds the ``benchmarks`` package); stream its progress lines to
    ``log``."""
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)  # the pools' sizes; solve(threads=...) sets what is used
    env["NUMBA_NUM_THREADS"] = str(max(threads, 1))
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.completion",
        "--_worker",
        json.dumps(
            {
                "n": n,
                "seed": seed,
                "kappa": kappa,
                "oversampling": oversampling,
                "max_time": max_time,
                "threads": threads,
                "backend": backend,
                "device": device,
            }
        ),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
    )
    last = ""
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line.startswith("{"):
            last = line
        elif line:
            log(line)
    proc.wait()
    if proc.returncode != 0 or not last:
        return {"n": n, "seed": seed, "error": f"worker exited with {proc.returncode}"}
    return json.loads(last)


def scale_table(rows: list[dict]) -> list[str]:
    out = [
        "| n | kappa | seed | |Omega| | threads | generate [s] | solve [s] | solve CPU [s] | iterations | CG iterations | s / iteration | us per 1000 entries and iteration | rel. error | phase | longest error rise | peak memory [GiB] |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['n']} | {r['seed']} | failed: {r['error']} |")
            continue
        per = 1e6 * r["time"] / max(r["iterations"], 1) / (r["nnz"] / 1000)
        out.append(
            f"| {r['n']:.0e} | {r.get('kappa', 1.0):g} | {r['seed']} | {r['nnz']:.2e} | "
            f"{r['threads']} | "
            f"{r['generate_s']:.1f} | {r['time']:.1f} | {r.get('cpu_s', float('nan')):.1f} | "
            f"{r['iterations']} | "
            f"{r['cg_iterations']} | {r['time_per_iteration']:.2f} | {per:.0f} | "
            f"{r['rel_error']:.1e} | {r['phase']} | {r.get('longest_error_rise', '-')} | "
            f"{r['peak_rss_gib']:.2f} |"
        )
    return out


def plot_scale(rows: list[dict], path: Path, title_note: str = "") -> None:
    plt = pyplot()
    ok = [r for r in rows if "error" not in r]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for threads in sorted({r["threads"] for r in ok}):
        pts = sorted((r["nnz"], r["time"]) for r in ok if r["threads"] == threads)
        ax.loglog(*zip(*pts, strict=True), "o", label=f"solve, {threads} thread(s)")
    if ok:
        x0, y0 = min((r["nnz"], r["time"]) for r in ok)
        xs = [x0, max(r["nnz"] for r in ok)]
        ax.loglog(xs, [y0 * x / x0 for x in xs], "k:", lw=1, label="linear in |Omega|")
    ax.set_xlabel("|Omega| (observed entries)")
    ax.set_ylabel("solve time [s] (end to end)")
    kappas = sorted({r.get("kappa", 1.0) for r in ok}) or [1.0]
    kap = ", ".join(f"{k:g}" for k in kappas)
    ax.set_title(f"Completion, rank {RANK}, kappa {kap}, oversampling 3{title_note}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def kernel_times(n: int, threads: tuple, repeats: int, log: Callable[[str], None]) -> list:
    """The completion kernels at ``n x n`` (kappa 1, oversampling 3, seed 0, rank 10, at the
    spectral start) on each thread count, interleaved, ``repeats`` times, each inside
    ``kernel_threads(t)`` with BLAS limited to ``t``: cost and gradient, one Gauss-Newton
    operator application, the block preconditioner's set-up with one application, 20 pairs of
    single-vector products of the spectral start's operator. Rows ``{piece, threads,
    seconds, median}``."""
    import statistics

    import numpy as np
    from threadpoolctl import threadpool_limits

    from rankopt import FixedRankPoint
    from rankopt.problems import MatrixCompletion, kernel_threads, random_completion
    from rankopt.problems._kernels import BlockedPattern

    p = random_completion(n, n, RANK, oversampling=3, seed=0)
    M = p.manifold(RANK)
    x = p.spectral_init(RANK, seed=0)
    v = M.random_tangent_vector(x, seed=1)
    bp = BlockedPattern(np.asarray(p.rows), np.asarray(p.cols), n, max(1, (8 << 20) // 160))
    vals = bp.reorder(np.asarray(p.vals))
    u0 = np.random.default_rng(2).standard_normal(n)

    def products(q: MatrixCompletion) -> None:
        Y = bp.operator(vals, n, parallel=q.parallel)
        for _ in range(20):
            Y.rmatvec(Y.matvec(u0))

    pieces = {
        "cost and gradient": lambda q: q.cost_and_egrad(FixedRankPoint(x.U, x.s, x.V)),
        "Gauss-Newton operator (one application)": lambda q: q.gn_operator(M, x)(v),
        "block preconditioner (set-up, one application)": lambda q: q.gn_preconditioner(M, x)(v),
        "spectral start (20 product pairs)": products,
    }
    times: dict = {}
    for _ in range(repeats):
        for t in threads:
            q = MatrixCompletion(p.rows, p.cols, p.vals, p.shape, preconditioner="block")
            with threadpool_limits(limits=t, user_api="blas"), kernel_threads(t):
                for name, fn in pieces.items():
                    t0 = time.perf_counter()
                    fn(q)
                    times.setdefault((name, t), []).append(time.perf_counter() - t0)
    rows = []
    for (name, t), secs in sorted(times.items()):
        med = statistics.median(secs)
        rows.append({"piece": name, "threads": t, "seconds": secs, "median": med})
        log(f"  {name}, {t} thread(s): median {med:.3f} s ({', '.join(f'{v:.3f}' for v in secs)})")
    return rows


def kernel_section(n: int, log: Callable[[str], None]) -> list:
    """``--kernels N`` of ``benchmarks.completion``: :func:`kernel_times` on 1 and 2 threads."""
    log(f"\n## kernels at n = {n:g} on 1 and 2 threads (interleaved, 3 repeats)")
    return kernel_times(n, (1, 2), 3, log)
