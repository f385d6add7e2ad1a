r"""Large completion problems for ``python -m benchmarks.completion --scale`` (one fresh process
each).

Each size runs in its own process (``python -m benchmarks.completion --_worker ...``) so that
its peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, generation included)
is its own; the worker prints a line per stage (generation, spectral start, every Gauss-Newton
iteration with its time) and a JSON line with the results:

* ``generate_s`` (``random_completion``), ``time`` (``ro.solve``, end to end), ``iterations``,
  ``cg_iterations`` (inner CG, phase 1), ``time_per_iteration``, ``rel_error``, ``stop``,
  ``phase``, ``peak_rss_gib``, ``threads`` (numba / BLAS threads of the run).
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
    parallel: bool,
    backend: str = "numpy",
    device: str | None = None,
) -> None:
    """Generate one problem and solve it; prints progress lines and a final JSON line."""
    import rankopt as ro
    from rankopt.problems import MatrixCompletion, random_completion, warmup_kernels

    warmup_kernels()
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
    if parallel and backend == "numpy":
        p = MatrixCompletion(p.rows, p.cols, p.vals, p.shape, truth=p.truth, parallel=True)
    t_gen = time.perf_counter() - t
    print(f"  generated n={n} seed={seed}: |Omega|={p.nnz} in {t_gen:.1f} s", flush=True)
    t0 = time.perf_counter()

    def progress(info: Any) -> None:
        print(
            f"    iteration {info.iteration}: {time.perf_counter() - t0:.1f} s, rank "
            f"{info.point.rank}, gradient {info.grad_norm:.2e}",
            flush=True,
        )

    res = ro.solve(p, RANK, tol=1e-10, seed=0, max_time=max_time, callback=progress)
    t_solve = time.perf_counter() - t0
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
        "iterations": res.iterations,
        "cg_iterations": getattr(state, "cg_total", None),
        "time_per_iteration": t_solve / max(res.iterations, 1),
        "rel_error": float(p.relative_error(res.point)),
        "stop": str(res.stop_reason),
        "phase": res.info.get("phase"),
        "rank": res.rank,
        "peak_rss_gib": ru / 2**20 if sys.platform != "darwin" else ru / 2**30,
        "threads": int(os.environ.get("NUMBA_NUM_THREADS", "0") or 0) if parallel else 1,
        "backend": backend,
        "device": str(device),
    }
    print(json.dumps(out), flush=True)


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
        env[var] = "1"  # BLAS stays single-threaded: the heavy work is in the numba kernels
    env["NUMBA_NUM_THREADS"] = str(threads)
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
                "parallel": threads > 1,
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
        "| n | seed | |Omega| | threads | generate [s] | solve [s] | iterations | CG iterations | s / iteration | us per 1000 entries and iteration | rel. error | phase | peak memory [GiB] |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['n']} | {r['seed']} | failed: {r['error']} |")
            continue
        per = 1e6 * r["time"] / max(r["iterations"], 1) / (r["nnz"] / 1000)
        out.append(
            f"| {r['n']:.0e} | {r['seed']} | {r['nnz']:.2e} | {r['threads']} | "
            f"{r['generate_s']:.1f} | {r['time']:.1f} | {r['iterations']} | "
            f"{r['cg_iterations']} | {r['time_per_iteration']:.2f} | {per:.0f} | "
            f"{r['rel_error']:.1e} | {r['phase']} | {r['peak_rss_gib']:.2f} |"
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
    ax.set_title(f"Completion, rank {RANK}, kappa 1, oversampling 3{title_note}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
