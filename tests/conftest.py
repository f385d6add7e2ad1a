"""Shared fixtures for the rankopt test suite.

* ``backend``: "numpy", "torch" (skipped when PyTorch is absent) and "cupy" (skipped with the
  reason ``"CuPy not installed / no CUDA GPU"``).
* ``dtype``: "float32" (looser tolerances, see ``rtol``) and "float64".
* ``seed``: a few seeds; every random draw goes through ``numpy.random.default_rng(seed)``.
* ``h``: small helpers (conversion to NumPy float64, sparse matrices of every backend, dense
  reference formulas) shared by the test modules. They are exposed as a fixture rather than
  imported so the test modules need no package ``__init__``.
* ``run_script``: runs a script (benchmark, example, figure) in a fresh Python as a user runs it
  and fails with the tail of its output when it exits with an error.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import rankopt as ro

# With OpenMP's default (active, spinning) wait policy, torch.linalg.qr on a tiny CPU matrix
# takes ~20 ms instead of ~10 us when the 2 cores are shared with other processes (measured on
# the 2-core dev machine under load). Passive waiting changes no numbers, only the time; it
# must be set before torch is first imported, which happens after this conftest is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

#: What tests/test_continuity.py asserts for every torch optimizer and rule: a relative change
#: ``delta`` of the point or of the gradient moves the weights after three steps by at most
#: ``CONTINUITY_GAIN * delta`` relative (1e-13 -> 1e-10; the largest change measured is 1.2e-12,
#: and the requirement is 1e-8). Two computation paths of the same steps (stacked and
#: per-layer groups, a reload and an uninterrupted run, another numerics path) differ in each
#: step only by rounding, a relative ``ROUNDING_PER_STEP * eps`` or less (a few hundred
#: operations on vectors of a few dozen entries; about 5 eps measured), so after ``k`` steps
#: they agree to ``path_tolerance(k, eps)``; an equality test uses that, never the luck of
#: identical rounding.
CONTINUITY_GAIN = 1e3
ROUNDING_PER_STEP = 64
#: other factors of the same matrix: the same next weights to this relative tolerance
INVARIANCE_RTOL = 1e-12


def path_tolerance(steps: int, eps: float = float(np.finfo(np.float64).eps)) -> float:
    """Relative tolerance for two computation paths of ``steps`` optimizer steps (see above)."""
    return CONTINUITY_GAIN * ROUNDING_PER_STEP * steps * eps


CUPY_REASON = "CuPy not installed / no CUDA GPU"
TORCH_REASON = "PyTorch not installed (pip install -e '.[torch]')"


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def cupy_available() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver, no device: the backend cannot run here
        return False


def torch_cuda_available() -> bool:
    if not torch_available():
        return False
    import torch

    return torch.cuda.is_available()


BACKEND_PARAMS = [
    pytest.param("numpy", id="numpy"),
    pytest.param(
        "torch", id="torch", marks=pytest.mark.skipif(not torch_available(), reason=TORCH_REASON)
    ),
    pytest.param(
        "cupy", id="cupy", marks=pytest.mark.skipif(not cupy_available(), reason=CUPY_REASON)
    ),
]
DTYPES = ["float32", "float64"]
SEEDS = [0, 1, 2]
SPARSE_FORMATS = ["csr", "coo"]


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request) -> str:
    return request.param


@pytest.fixture(params=BACKEND_PARAMS[1:])
def other_backend(request) -> str:
    """A non-NumPy backend (compared against NumPy in the agreement tests)."""
    return request.param


@pytest.fixture(params=DTYPES)
def dtype(request) -> str:
    return request.param


@pytest.fixture(params=SEEDS)
def seed(request) -> int:
    return request.param


@pytest.fixture
def rtol(dtype) -> float:
    """Relative tolerance of an identity checked in ``dtype`` on small (<= 12 x 12) problems."""
    return 2e-4 if dtype == "float32" else 1e-10


# --------------------------------------------------------------------------- helpers


def to_numpy(a: Any) -> np.ndarray:
    """Any array (numpy, torch, cupy, dense or sparse, LowRankMatrix) as dense float64 NumPy."""
    if isinstance(a, ro.LowRankMatrix):
        return to_numpy(a.A) @ to_numpy(a.B).T
    if isinstance(a, ro.FixedRankPoint):
        return (to_numpy(a.U) * to_numpy(a.s)[None, :]) @ to_numpy(a.V).T
    if hasattr(a, "toarray"):  # scipy.sparse / cupyx.scipy.sparse
        a = a.toarray()
    mod = type(a).__module__
    if mod.startswith("torch"):
        if a.layout != __import__("torch").strided:
            a = a.to_dense()
        return a.detach().cpu().double().numpy()
    if mod.startswith("cupy"):
        a = a.get()
    return np.asarray(a, dtype=np.float64)


def sparse(manifold: ro.FixedRankManifold, dense: np.ndarray, fmt: str) -> Any:
    """The nonzeros of a NumPy array as a sparse matrix of the manifold's backend.

    ``fmt`` is "csr" or "coo": scipy.sparse for numpy, torch sparse COO/CSR for torch,
    cupyx.scipy.sparse for cupy.
    """
    be = manifold.backend
    if be.name == "numpy":
        import scipy.sparse as sps

        d = dense.astype(be.dtype)
        # both scipy APIs: the legacy matrix class for CSR, the array class for COO
        return sps.csr_matrix(d) if fmt == "csr" else sps.coo_array(d)
    if be.name == "torch":
        t = be.asarray(dense)
        if fmt == "coo":
            return t.to_sparse_coo()
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            return t.to_sparse_csr()
    import cupyx.scipy.sparse as cps

    d = be.asarray(dense)
    return cps.csr_matrix(d) if fmt == "csr" else cps.coo_matrix(d)


def random_sparse_dense(
    rng: np.random.Generator, m: int, n: int, density: float = 0.4
) -> np.ndarray:
    """A dense NumPy array with about ``density * m * n`` standard-normal nonzeros (at least one)."""
    mask = rng.random((m, n)) < density
    mask[rng.integers(m), rng.integers(n)] = True
    return np.where(mask, rng.standard_normal((m, n)), 0.0)


def dense_projection(x: ro.FixedRankPoint, Z: np.ndarray) -> np.ndarray:
    """Reference formula ``U U^T Z + Z V V^T - U U^T Z V V^T`` in float64."""
    U, V = to_numpy(x.U), to_numpy(x.V)
    PU, PV = U @ U.T, V @ V.T
    return PU @ Z + Z @ PV - PU @ Z @ PV


def tangent_dense(
    manifold: ro.FixedRankManifold, x: ro.FixedRankPoint, xi: ro.TangentVector
) -> np.ndarray:
    """``U M V^T + Up V^T + U Vp^T`` in float64."""
    U, V = to_numpy(x.U), to_numpy(x.V)
    return U @ to_numpy(xi.M) @ V.T + to_numpy(xi.Up) @ V.T + U @ to_numpy(xi.Vp).T


def tangency_error(x: ro.FixedRankPoint, xi: ro.TangentVector) -> float:
    """``max(|U^T Up|, |V^T Vp|)`` relative to the size of ``Up``, ``Vp``."""
    U, V, Up, Vp = (to_numpy(a) for a in (x.U, x.V, xi.Up, xi.Vp))
    scale = max(1.0, np.abs(Up).max(initial=0.0), np.abs(Vp).max(initial=0.0))
    return max(np.abs(U.T @ Up).max(), np.abs(V.T @ Vp).max()) / scale


def rel(a: Any, b: Any) -> float:
    """``||a - b||_F / max(||b||_F, 1)`` after conversion to float64 NumPy."""
    a, b = to_numpy(a), to_numpy(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1.0))


def metric_zoo(manifold: ro.FixedRankManifold, seed: int = 0) -> dict[str, Any]:
    """Every metric of ``rankopt.metrics`` with positive weights/statistics of the manifold's backend."""
    from rankopt import metrics

    rng = np.random.default_rng(1000 + seed)
    be, m, n = manifold.backend, manifold.m, manifold.n
    wl, wr = be.asarray(rng.uniform(0.5, 2.0, m)), be.asarray(rng.uniform(0.5, 2.0, n))
    rows, cols = be.asarray(rng.uniform(0.1, 3.0, m)), be.asarray(rng.uniform(0.1, 3.0, n))
    return {
        "euclidean": metrics.Euclidean(),
        "core-weight": metrics.Preconditioned(core_weight=0.5),
        "row-col-weights": metrics.Preconditioned(left=wl, right=wr),
        "adagrad": metrics.AdaGrad(row_stats=rows, col_stats=cols),
        "adam": metrics.Adam(row_stats=rows, col_stats=cols, steps=3),
    }


METRIC_NAMES = ["euclidean", "core-weight", "row-col-weights", "adagrad", "adam"]


#: Two forward passes over the same weights may take other kernels (another memory layout of a
#: loaded tensor, another summation order): a relative ``FORWARD_ROUNDING * eps`` of the
#: output's scale for the small models of the tests (a few layers of width <= 64).
FORWARD_ROUNDING = 64


def assert_same_outputs(a: Any, b: Any) -> None:
    """Outputs of two forward passes over the same weights (torch tensors) agree to
    ``FORWARD_ROUNDING * eps(dtype) * max|a|``: what rounding allows, not bitwise."""
    import torch

    tol = FORWARD_ROUNDING * torch.finfo(a.dtype).eps * float(a.abs().max())
    err = float((a - b).abs().max())
    assert a.shape == b.shape and err <= tol, (err, tol)


#: r x r state fields of the DLRA rules that live in the point's bases (compared as U a V^T)
CORE_FIELDS = ("exp_avg", "momentum_buffer")


def basis_free_state(x: ro.FixedRankPoint, arrays: dict[str, Any]) -> dict[str, np.ndarray]:
    """A rule state (``rules.state_arrays``) as arrays that do not depend on the signs or
    rotations of the point's singular vectors (float64 NumPy): a tangent-vector field as its
    ambient matrix ``U M V^T + Up V^T + U Vp^T``, an r x r core moment of the DLRA rules as
    ``U a V^T``, everything else (statistics, dense moments, counts, the core Adam's
    elementwise second moment) as it is."""
    U, V = to_numpy(x.U), to_numpy(x.V)
    out = {}
    for key, val in arrays.items():
        a = to_numpy(val)
        if key.endswith(".M"):
            name = key[:-2]
            Up, Vp = to_numpy(arrays[name + ".Up"]), to_numpy(arrays[name + ".Vp"])
            out[name] = U @ a @ V.T + Up @ V.T + U @ Vp.T
        elif key.endswith((".Up", ".Vp")):
            continue
        elif key in CORE_FIELDS and a.shape[-2:] == (U.shape[-1], V.shape[-1]):
            out[key] = U @ a @ V.T
        else:
            out[key] = a
    return out


def assert_paths_agree(a: Any, b: Any, steps: int, what: str = "") -> None:
    """Two computation paths of ``steps`` steps agree to ``path_tolerance(steps)`` relative
    (Frobenius norm; points as dense matrices; dicts entry by entry)."""
    if isinstance(a, dict):
        assert set(a) == set(b), (what, sorted(a), sorted(b))
        for k in a:
            assert_paths_agree(a[k], b[k], steps, f"{what}{k}")
        return
    if isinstance(a, ro.FixedRankPoint):
        a, b = a.to_dense(), b.to_dense()
    a, b = to_numpy(a), to_numpy(b)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = float(np.linalg.norm(a - b))
    assert err <= path_tolerance(steps) * max(float(np.linalg.norm(a)), 1e-300), (what, err)


@pytest.fixture(params=METRIC_NAMES)
def metric_name(request) -> str:
    return request.param


@pytest.fixture
def h() -> SimpleNamespace:
    """Helper functions (see the module docstring)."""
    return SimpleNamespace(
        to_numpy=to_numpy,
        sparse=sparse,
        random_sparse_dense=random_sparse_dense,
        dense_projection=dense_projection,
        tangent_dense=tangent_dense,
        tangency_error=tangency_error,
        rel=rel,
        metric_zoo=metric_zoo,
        METRIC_NAMES=METRIC_NAMES,
        SPARSE_FORMATS=SPARSE_FORMATS,
    )


ROOT = Path(__file__).resolve().parents[1]


def _run_script(
    args: list[Any], *, cwd: Path = ROOT, timeout: float = 300, check: bool = True, **env: str
) -> subprocess.CompletedProcess:
    """``python *args`` in ``cwd`` with matplotlib off screen and the extra environment ``env``;
    with ``check``, a non-zero exit fails the test with the last 3000 characters of stdout and
    stderr."""
    proc = subprocess.run(
        [sys.executable, *(str(a) for a in args)],
        cwd=cwd,
        env=dict(os.environ, MPLBACKEND="Agg", **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def run_script():
    """The function that runs a script as a user runs it (see ``_run_script``)."""
    return _run_script


@pytest.fixture
def one_torch_thread():
    """Tiny torch ops run single-threaded, the previous setting restored afterwards: OpenMP
    threads spinning on a loaded 2-core machine made such tests up to 30x slower (measured: CG
    on 40 x 30 took 11.7 s with 2 threads, 0.33 s with 1). Yields the torch module."""
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(n)
