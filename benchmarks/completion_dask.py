r"""Completion on a local Dask cluster against one process: ``python -m benchmarks.completion_dask``.

``--dask N`` starts ``distributed.LocalCluster(n_workers=N, threads_per_worker=1,
processes=True)``, builds the synthetic problem of :func:`rankopt.problems.random_completion`
(``m = n``, rank ``r``, condition number ``kappa``, ``oversampling`` times the manifold
dimension in observations), hands its entries to :class:`rankopt.distributed.MatrixCompletion`
as Dask arrays of ``--chunks`` chunks (shuffled: input order is not the row-major one), and
solves both with ``rankopt.solve(p, rank=r, tol=tol, noise=0)``. Reported per side: build time,
solve time, iterations, relative error; for the cluster also the synchronizations, the bytes
between client and cluster and between workers (:mod:`rankopt.distributed.communication`),
and every worker's peak resident memory. ``--project`` adds the cost model of
:func:`project` (the table of docs/completion.md, "Beyond one machine").

Timings on a shared machine are noisy: hold ``flock /tmp/rankopt-bench.lock`` around a run.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from typing import Any

import numpy as np

__all__ = ["run", "project", "main"]


def _peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _single(p: Any, rank: int, tol: float) -> dict:
    import rankopt as ro

    t = time.perf_counter()
    res = ro.solve(p, rank=rank, tol=tol, noise=0)
    return {
        "solve_s": time.perf_counter() - t,
        "iterations": int(res.iterations),
        "error": float(p.relative_error(res.point)),
        "peak_rss_bytes": _peak_rss(),
    }


def _distributed(p: Any, rank: int, tol: float, workers: int, chunks: int, seed: int) -> dict:
    import dask.array as da
    import distributed

    import rankopt as ro
    import rankopt.distributed as rd

    perm = np.random.default_rng(seed).permutation(p.nnz)
    entries = [np.asarray(a)[perm] for a in (p.rows, p.cols, p.vals)]
    size = -(-p.nnz // chunks)
    cluster = distributed.LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
    )
    with cluster, distributed.Client(cluster):
        t = time.perf_counter()
        q = rd.MatrixCompletion(*(da.from_array(a, chunks=size) for a in entries), p.shape,
                                truth=p.truth)  # fmt: skip
        build = time.perf_counter() - t
        start = rd.snapshot()
        t = time.perf_counter()
        res = ro.solve(q, rank=rank, tol=tol, noise=0)
        solve = time.perf_counter() - t
        traffic = rd.measure(start)
        err = float(q.relative_error(res.point))
    it = int(res.iterations)
    return {
        "build_s": build,
        "solve_s": solve,
        "iterations": it,
        "error": err,
        "cells": list(q.grid.cells),
        "syncs": traffic.syncs,
        "client_sent_bytes": traffic.client_sent_bytes,
        "client_gathered_bytes": traffic.client_gathered_bytes,
        "worker_bytes": traffic.worker_bytes,
        "worker_transfers": traffic.worker_transfers,
        "transfer_log_full": traffic.log_full,
        "peak_rss_per_worker_bytes": sorted(traffic.peak_rss_bytes.values()),
        "per_iteration": traffic.per_iteration(it),
    }


def run(m: int, rank: int, kappa: float, oversampling: float, workers: int, chunks: int,
        tol: float = 1e-10, seed: int = 0) -> dict:  # fmt: skip
    """Both solves of one problem (see the module notes); a JSON-able dict."""
    import rankopt as ro

    t = time.perf_counter()
    p = ro.problems.random_completion(m, m, rank, kappa=kappa, oversampling=oversampling,
                                      seed=seed)  # fmt: skip
    gen = time.perf_counter() - t
    ro.problems.warmup_kernels()
    one = _single(p, rank, tol)
    many = _distributed(p, rank, tol, workers, chunks, seed)
    return {"m": m, "n": m, "rank": rank, "kappa": kappa, "nnz": int(p.nnz), "workers": workers,
            "chunks": chunks, "generate_s": gen, "single": one, "distributed": many}  # fmt: skip


def project(measured: dict, m: float = 1e8, nnz: float = 1e10, workers: tuple = (64, 512),
            latency_s: float = 0.005, task_s: float = 2e-4,
            bandwidth: float = 1.25e9) -> list[dict]:  # fmt: skip
    r"""The cost model, projected from a measured run (docs/completion.md gives the text).

    Per Gauss-Newton iteration on ``W`` workers (``P = ceil(sqrt(W))``, a ``P x P`` grid),
    with ``s`` the measured synchronizations per iteration and ``a = s / 6`` operator
    applications (about six synchronizations per CG step):

    * compute: ``c |Omega| r / W`` seconds, ``c`` the single-process seconds per observation,
      per unit of rank and per iteration of the measured run (same kernels, one core per
      worker, perfect balance);
    * network: ``a * 3 P (m + n) r * 8`` bytes (every application sends each cell its row
      blocks and sums its partial products; an upper bound: blocks already on the cell's
      worker do not move), spread over the ``W`` links of ``bandwidth`` bytes/s;
    * scheduling: ``s (latency_s + 4 P^2 task_s)``: a round trip per synchronization plus
      ``task_s`` (distributed's documented order, 200 us) for each of the about ``4 P^2`` tasks
      of a synchronization;
    * iterations: the measured count.

    Memory per worker: ``24 |Omega| / W`` (observations: 4+4 bytes of indices, 8 of value, 8
    of the CSC copy) + ``10 * 8 (m + n) r / W`` (about ten live tall arrays, spread evenly)
    + ``6 * 8 (m / P) r`` (the blocks one cell task reads and writes).
    """
    one, many = measured["single"], measured["distributed"]
    r, it = measured["rank"], max(many["iterations"], 1)
    c = one["solve_s"] / (measured["nnz"] * r * max(one["iterations"], 1))
    syncs = many["syncs"] / it
    applications = max(syncs / 6.0, 1.0)
    out = []
    for w in workers:
        P = math.ceil(math.sqrt(w))
        compute = c * nnz * r / w
        net_bytes = applications * 3 * P * (2 * m) * r * 8
        network = net_bytes / (bandwidth * w)
        sched = syncs * (latency_s + 4 * P * P * task_s)
        mem = 24 * nnz / w + 10 * 8 * (2 * m) * r / w + 6 * 8 * (m / P) * r
        per = compute + network + sched
        out.append({"workers": w, "grid": P, "compute_s_per_iter": compute,
                    "network_s_per_iter": network, "scheduling_s_per_iter": sched,
                    "seconds_per_iter": per, "network_bytes_per_iter": net_bytes,
                    "iterations": it, "total_s": it * per,
                    "memory_per_worker_bytes": mem})  # fmt: skip
    return out


def _table(res: dict) -> str:
    one, many = res["single"], res["distributed"]
    gib = 2.0**30
    rows = [
        f"| | one process | Dask, {res['workers']} workers |",
        "|---|---|---|",
        f"| solve time (s) | {one['solve_s']:.1f} | {many['solve_s']:.1f} |",
        f"| iterations | {one['iterations']} | {many['iterations']} |",
        f"| relative error | {one['error']:.1e} | {many['error']:.1e} |",
        f"| peak memory (GiB) | {one['peak_rss_bytes'] / gib:.2f} (process) | "
        + ", ".join(f"{b / gib:.2f}" for b in many["peak_rss_per_worker_bytes"])
        + " (per worker) |",
        f"| synchronizations | - | {many['syncs']} |",
        f"| worker-worker traffic (MiB) | - | {many['worker_bytes'] / 2**20:.1f} |",
        f"| client traffic (MiB) | - | "
        f"{(many['client_sent_bytes'] + many['client_gathered_bytes']) / 2**20:.1f} |",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    """Command line (see the module notes); prints the table and writes ``--out`` (JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dask", type=int, default=2, help="worker processes")
    ap.add_argument("--m", type=int, default=20_000, help="m = n")
    ap.add_argument("--rank", type=int, default=10)
    ap.add_argument("--kappa", type=float, default=100.0)
    ap.add_argument("--oversampling", type=float, default=3.0)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--tol", type=float, default=1e-10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--project", action="store_true", help="add the 1e8 x 1e8 projection")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    a = ap.parse_args(argv)
    res = run(a.m, a.rank, a.kappa, a.oversampling, a.dask, a.chunks, a.tol, a.seed)
    if a.project:
        res["projection"] = project(res)
    print(_table(res))
    for row in res.get("projection", []):
        print(json.dumps(row))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
