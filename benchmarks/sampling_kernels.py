"""Benchmark: sampling a low-rank matrix at the observed entries, and the sparse products.

Compares, for |Omega| = 60k entries of a 1000 x 1000 matrix (the completion benchmark of
RESEARCH.md section 4) and k = 10 and 2r = 20 columns:

* ``out[k] = A[rows[k]] . B[cols[k]]``: the NumPy fallback (gather + einsum, chunked), the numba
  kernel (serial and threaded), torch (gather + multiply + sum) and
  ``torch.sparse.sampled_addmm`` when torch is installed;
* the CSR products ``Z @ V`` and ``Z^T @ U`` of the gradient projection: scipy against a fused
  numba kernel that computes both in one pass over Omega (defined here only for the measurement);
* the numba first-call time in a fresh process, with an empty cache (compilation) and with the
  on-disk cache written by the first run (``cache=True``);
* the per-iteration operations of ``MatrixCompletion``.

Timings are the minimum over ``--repeats`` rounds of the mean of ``--number`` calls, the
implementations of one table called in turn in every round (the minimum is the least disturbed
by other processes; the machine's load average is printed with the table). No thread count is
pinned: the numba kernels are timed serial and threaded, and the header states the counts.

Run: ``python -m benchmarks.sampling_kernels [--quick]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import scipy.sparse as sp

from benchmarks.harness import machine_info, pin_threads, time_interleaved
from rankopt import FixedRankPoint
from rankopt.problems import _kernels as K
from rankopt.problems import random_completion
from rankopt.problems.synthetic import sample_entries


def timeit(fns: dict, number: int, repeats: int) -> dict[str, float]:
    """Per function: the minimum over ``repeats`` rounds of the mean time of ``number`` calls,
    in milliseconds, after one warm-up call; the functions interleaved round by round
    (:func:`benchmarks.harness.time_interleaved`)."""
    return {k: 1e3 * t.min for k, t in time_interleaved(fns, repeats, calls=number).items()}


if K.HAVE_NUMBA:
    from numba import njit

    @njit(cache=True)
    def _fused_pair(indptr, indices, data, U, V, ZV, ZtU):  # pragma: no cover - compiled
        """``ZV = Z V`` and ``ZtU = Z^T U`` in one pass over a CSR matrix Z."""
        r = U.shape[1]
        ZV[:] = 0.0
        ZtU[:] = 0.0
        for i in range(indptr.shape[0] - 1):
            for p in range(indptr[i], indptr[i + 1]):
                j = indices[p]
                z = data[p]
                for c in range(r):
                    ZV[i, c] += z * V[j, c]
                    ZtU[j, c] += z * U[i, c]


def _sampling_cases(A, B, rows, cols, out) -> dict:
    """Callables computing ``out[k] = A[rows[k]] . B[cols[k]]`` by each method."""
    m, n, nnz = A.shape[0], B.shape[0], rows.shape[0]
    cases = {
        "numpy fallback (take + einsum)": lambda: K.sample_lowrank_numpy(A, B, rows, cols, out)
    }
    if K.HAVE_NUMBA:
        cases["numba serial"] = lambda: K.sample_lowrank(A, B, rows, cols, out, parallel=False)
        cases["numba parallel"] = lambda: K.sample_lowrank(A, B, rows, cols, out, parallel=True)
    try:
        import torch
    except ImportError:
        return cases
    At, Bt = torch.as_tensor(A), torch.as_tensor(B)
    rt, ct = torch.as_tensor(rows.astype(np.int64)), torch.as_tensor(cols.astype(np.int64))
    cases["torch gather + sum"] = lambda: (At[rt] * Bt[ct]).sum(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sparse CSR "beta" notice
        mask = torch.sparse_coo_tensor(
            torch.stack([rt, ct]), torch.ones(nnz, dtype=torch.float64), (m, n)
        ).to_sparse_csr()
    cases["torch.sparse.sampled_addmm"] = lambda: torch.sparse.sampled_addmm(
        mask, At, Bt.T, beta=0.0
    )
    return cases


def sampling_table(m: int, n: int, nnz: int, ks: list[int], number: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    rows, cols = sample_entries(m, n, nnz, rng)
    rows, cols = rows.astype(np.int32), cols.astype(np.int32)
    print(f"\nSampling A B^T at |Omega| = {nnz} entries of a {m} x {n} matrix (ms per call)")
    header = f"{'method':34s}" + "".join(f"{f'k={k}':>12s}" for k in ks)
    print(header)
    print("-" * len(header))
    results: dict[str, list[float]] = {}
    for k in ks:
        A = rng.standard_normal((m, k))
        B = rng.standard_normal((n, k))
        out = np.empty(nnz)
        want = K.sample_lowrank_numpy(A, B, rows, cols, np.empty(nnz))
        cases = _sampling_cases(A, B, rows, cols, out)
        for name, f in cases.items():
            if name.startswith(("numba", "numpy")):
                f()
                assert np.allclose(out, want)
        for name, ms in timeit(cases, number, repeats).items():
            results.setdefault(name, []).append(ms)
    for name, ts in results.items():
        print(f"{name:34s}" + "".join(f"{t:12.3f}" for t in ts))


def product_table(m: int, n: int, nnz: int, r: int, number: int, repeats: int) -> None:
    rng = np.random.default_rng(1)
    rows, cols = sample_entries(m, n, nnz, rng)
    Z = sp.csr_matrix((rng.standard_normal(nnz), (rows, cols)), shape=(m, n))
    U, V = rng.standard_normal((m, r)), rng.standard_normal((n, r))
    print(f"\nCSR products for the gradient projection, r = {r} (ms per call)")
    cases = {"scipy Z @ V": lambda: Z @ V, "scipy Z.T @ U": lambda: Z.T @ U}
    if K.HAVE_NUMBA:
        ZV, ZtU = np.empty((m, r)), np.empty((n, r))
        args = (Z.indptr, Z.indices, Z.data, U, V, ZV, ZtU)
        _fused_pair(*args)
        assert np.allclose(ZV, Z @ V) and np.allclose(ZtU, Z.T @ U)
        cases["numba fused (both products)"] = lambda: _fused_pair(*args)
    for name, ms in timeit(cases, number, repeats).items():
        print(f"{name:34s}{ms:12.3f}")


_FIRST_CALL = """
import time, numpy as np
t = time.perf_counter()
from rankopt import FixedRankPoint
from rankopt.problems import _kernels as K
t_import = time.perf_counter() - t
A = np.ones((1000, 10)); B = np.ones((1000, 10)); r = np.arange(60000, dtype=np.int32) % 1000
out = np.empty(60000)
t = time.perf_counter(); K.sample_lowrank(A, B, r, r, out, parallel={par}); t1 = time.perf_counter() - t
t = time.perf_counter(); K.sample_lowrank(A, B, r, r, out, parallel={par}); t2 = time.perf_counter() - t
print(t_import, t1, t2)
"""


def first_call_table() -> None:
    if not K.HAVE_NUMBA:
        print("\nnumba not installed: no first-call timings")
        return
    print(
        "\nnumba first call in a fresh process (ms): import of rankopt.problems._kernels, first call, second call"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for par in (False, True):
            for label in ("empty cache (compile)", "warm on-disk cache"):
                out = subprocess.run(
                    [sys.executable, "-c", _FIRST_CALL.format(par=par)],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.split()
                ti, t1, t2 = (1e3 * float(v) for v in out)
                name = f"{'parallel' if par else 'serial'}, {label}"
                print(f"{name:40s} import {ti:8.1f}   first {t1:8.1f}   second {t2:8.3f}")


def completion_table(number: int, repeats: int) -> None:
    p = random_completion(1000, 1000, 10, kappa=1.0, oversampling=3.0, seed=0)
    M = p.manifold(10)
    x = p.spectral_init(10, seed=0)
    f, G = p.cost_and_egrad(x)
    xi = M.projection(x, G)
    D = M.embed(x, xi)
    print(f"\nMatrixCompletion 1000 x 1000, r = 10, |Omega| = {p.nnz} (ms per call)")

    def fresh():
        """The point x as a new object: the problem caches the residual of the last point by
        identity, so each call with a fresh object samples X again."""
        return FixedRankPoint(x.U, x.s, x.V)

    cases = {  # every call is at x; the uncached ones pass it as a new object
        "cost": lambda: p.cost(fresh()),
        "cost_and_egrad": lambda: p.cost_and_egrad(fresh()),
        "cost_and_egrad (cached point)": lambda: p.cost_and_egrad(x),
        "projection of the gradient": lambda: M.projection(x, G),
        "exact_step (2r-column direction)": lambda: p.exact_step(x, D),  # residual cached
        "ehess (2r-column direction)": lambda: p.ehess(x, D),
        "retraction": lambda: M.retraction(x, xi),
    }
    for name, ms in timeit(cases, number, repeats).items():
        print(f"{name:34s}{ms:12.3f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (CI smoke run)")
    ap.add_argument("--nnz", type=int, default=60_000)
    ap.add_argument("--number", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    number, repeats = (5, 2) if args.quick else (args.number, args.repeats)
    threads = pin_threads(None, torch=importlib.util.find_spec("torch") is not None)  # as is
    print(machine_info(("numpy", "scipy", "numba", "torch", "rankopt")))
    print(threads)
    sampling_table(1000, 1000, args.nnz, [10, 20], number, repeats)
    product_table(1000, 1000, args.nnz, 10, number, repeats)
    completion_table(number, repeats)
    if not args.quick:
        first_call_table()


if __name__ == "__main__":
    main()
