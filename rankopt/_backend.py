"""The one place where array libraries differ.

All manifold math in rankopt is written against the small :class:`Backend` interface
below. The array arithmetic itself (``@``, ``+``, ``*``, slicing) is shared by NumPy, CuPy
and Torch; what differs (namespaces, QR/SVD, random numbers, sparse products, devices,
turning a 0-d array into a Python float) is wrapped here, on top of ``array-api-compat``.

Backends are imported lazily: ``import rankopt`` imports neither torch nor cupy.

Array types from outside this module can name their own :class:`Backend`: an object with a
method ``__rankopt_backend__()`` returning one is an array of that backend for
:func:`backend_name_of` and :func:`backend_like` (:mod:`rankopt.distributed`'s row-blocked Dask
arrays do this; the hook costs one attribute lookup, and imports nothing).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

BACKENDS = ("numpy", "torch", "cupy")


def _torch():
    """The torch module (imported on first use: ``import rankopt`` does not import torch)."""
    torch = sys.modules.get("torch")
    if torch is None:
        import torch
    return torch


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _is_cupy(x: Any) -> bool:
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(x, cp.ndarray):
        return True
    sp = sys.modules.get("cupyx.scipy.sparse")
    return sp is not None and sp.issparse(x)


def _is_scipy_sparse(x: Any) -> bool:
    sp = sys.modules.get("scipy.sparse")
    return sp is not None and sp.issparse(x)


def _own_backend(x: Any) -> Backend | None:
    """The :class:`Backend` an array type names itself (``__rankopt_backend__()``), or None."""
    get = getattr(type(x), "__rankopt_backend__", None)
    return None if get is None else get(x)


def backend_name_of(x: Any) -> str | None:
    """Name of the backend an array (dense or sparse) belongs to, or None if not an array."""
    if isinstance(x, np.ndarray) or _is_scipy_sparse(x):
        return "numpy"
    own = _own_backend(x)
    if own is not None:
        return own.name
    if _is_torch(x):
        return "torch"
    if _is_cupy(x):
        return "cupy"
    return None


#: torch CPU, one thread, ``C += A @ B`` with ``C: (B, m, r)``, ``A: (B, m, k)``, ``B: (B, k, r)``;
#: microseconds, fused ``baddbmm_`` / separate ``bmm`` + ``add_`` (measured 2026-11-29):
#: 12 x 384 x 8: 53 / 34; 24 x 384 x 8: 97 / 69; 48 x 768 x 4: 332 / 170; 12 x 384 x 16: 39 / 55;
#: 48 x 768 x 16: 316 / 517; 12 x 3072 x 8: 340 / 870; 48 x 768 x 8: 345 / 862. The fused call
#: wins from a contraction of 16 on, or from 2^18 entries of C on (where the separate product's
#: fresh output costs more than the GEMM).
FUSED_ADDMM_MIN_K = 16
FUSED_ADDMM_MIN_NUMEL = 1 << 18


def _fused_addmm(C: Any, A: Any, B: Any) -> bool:
    """Whether torch's fused ``(b)addmm`` beats a separate product and ``add`` for ``C + A @ B``
    (same batch shape, 2-D or 3-D): on CPUs by the table above; on GPUs always (one BLAS call
    with beta = 1 instead of two kernels)."""
    return (
        C.ndim == A.ndim == B.ndim
        and C.ndim in (2, 3)
        and C.shape[:-2] == A.shape[:-2] == B.shape[:-2]
        and (
            C.device.type != "cpu"
            or A.shape[-1] >= FUSED_ADDMM_MIN_K
            or C.numel() >= FUSED_ADDMM_MIN_NUMEL
        )
    )


#: Rows per block of :func:`tsqr` (a 2048 x 10 float64 block is 160 KB: it stays in L2).
TSQR_BLOCK_ROWS = 2048


def tsqr(a: np.ndarray, block_rows: int = TSQR_BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    r"""Reduced QR of a tall-skinny NumPy matrix by one level of TSQR.

    ``a`` (m x k) is split into row blocks ``a_b`` of ``block_rows`` rows (the last one takes
    the remainder): ``a_b = Q_b R_b`` (one batched Householder QR, each block in cache), then
    ``[R_1; ...; R_B] = Q' R`` (Householder QR of a (B k) x k matrix), and ``Q = diag(Q_b) Q'``,
    ``a = Q R`` (Demmel, Grigori, Hoemmen, Langou, "Communication-optimal parallel and
    sequential QR and LU factorizations", SIAM J. Sci. Comput. 2012). As stable as
    Householder QR (``max |Q^T Q - I|`` and ``max |Q R - a| / max |a|`` at rounding level:
    2.4e-15 and 1.7e-15 measured at 1e6 x 10); it reads ``a`` about twice instead of about
    2k times (LAPACK's unblocked ``geqr2`` / ``org2r`` for k below its block size): 0.15 s
    against 0.57 s at 1e6 x 10, 1.3 ms against 2.3 ms at 1e4 x 10 (one thread). O(m k^2).
    Falls back to ``numpy.linalg.qr`` with fewer than two blocks or ``k > block_rows / 4``.
    The signs of R's diagonal may differ from ``numpy.linalg.qr`` (QR is unique up to them).
    """
    m, k = a.shape
    nb = m // int(block_rows)
    if nb < 2 or 4 * k > block_rows:
        return np.linalg.qr(a)
    main = (nb - 1) * block_rows  # nb - 1 full blocks, then the last with the remainder
    q1, r1 = np.linalg.qr(a[:main].reshape(nb - 1, block_rows, k))
    ql, rl = np.linalg.qr(a[main:])
    q2, r = np.linalg.qr(np.concatenate([r1.reshape(-1, k), rl]))
    q = np.empty(a.shape, dtype=np.result_type(q1, q2))
    head = q[:main].reshape(nb - 1, block_rows, k)
    np.matmul(q1, q2[: (nb - 1) * k].reshape(nb - 1, k, k), out=head)
    q[main:] = ql @ q2[(nb - 1) * k :]
    return q, r


@dataclass(frozen=True)
class Backend:
    """Array-library adapter used by every manifold operation.

    Parameters
    ----------
    name : {"numpy", "torch", "cupy"}
    dtype : backend dtype object (float32 or float64)
    device : backend device (``None`` for NumPy)
    """

    name: str
    dtype: Any
    device: Any

    # -- namespaces ---------------------------------------------------------
    @property
    def xp(self):
        """The array-api-compat namespace of this backend."""
        return _namespace(self.name)

    @property
    def eps(self) -> float:
        """Machine epsilon of the working dtype."""
        return 1.1920929e-07 if self.is_float32 else 2.220446049250313e-16

    @property
    def is_float32(self) -> bool:
        return "32" in str(self.dtype)

    # -- creation -------------------------------------------------------------
    def asarray(self, a: Any) -> Any:
        """Convert ``a`` (array of any backend, or Python/NumPy data) to this backend."""
        if self.name == "numpy":
            if _is_torch(a):
                a = a.detach().cpu().numpy()
            elif _is_cupy(a):
                a = a.get()
            return np.asarray(a, dtype=self.dtype)
        if self.name == "torch":
            torch = _torch()
            if _is_torch(a):
                return a.to(device=self.device, dtype=self.dtype)
            if _is_cupy(a):
                a = a.get()
            return torch.as_tensor(np.asarray(a), device=self.device).to(self.dtype)
        import cupy as cp

        if _is_torch(a):
            a = a.detach().cpu().numpy()
        with cp.cuda.Device(self.device):
            return cp.asarray(a, dtype=self.dtype)

    def zeros(self, shape: tuple[int, ...]) -> Any:
        return self.xp.zeros(shape, dtype=self.dtype, device=self.device)

    def eye(self, n: int) -> Any:
        return self.xp.eye(n, dtype=self.dtype, device=self.device)

    def randn(self, rng: np.random.Generator, shape: tuple[int, ...]) -> Any:
        """Standard normal samples drawn in NumPy (float64) then moved here.

        Drawing on the host makes a seed give the same numbers on every backend, which the
        backend-agreement tests rely on; random draws are never on a hot path.
        """
        return self.asarray(rng.standard_normal(shape))

    # -- linear algebra -------------------------------------------------------
    def qr(self, a: Any) -> tuple[Any, Any]:
        """Reduced QR factorization, O(m k^2) for an m x k matrix (NumPy matrices: :func:`tsqr`,
        which is plain Householder QR below two blocks of ``TSQR_BLOCK_ROWS`` rows)."""
        if self.name == "numpy" and a.ndim == 2:
            return tsqr(a)
        return self.xp.linalg.qr(a, mode="reduced")

    def svd(self, a: Any) -> tuple[Any, Any, Any]:
        """Thin SVD ``a = U diag(s) Vh`` with s descending."""
        if self.name == "torch":
            torch = _torch()
            return torch.linalg.svd(a, full_matrices=False)
        return self.xp.linalg.svd(a, full_matrices=False)

    def diag(self, v: Any) -> Any:
        """``diag(v)`` for ``v`` of shape ``(..., n)``: a stack of ``n x n`` diagonal matrices."""
        if self.name == "torch":
            return _torch().diag_embed(v)
        n = v.shape[-1]
        return v[..., :, None] * self.xp.eye(n, dtype=v.dtype, device=self.device)

    def diagonal(self, a: Any) -> Any:
        """The diagonals of a stack of square matrices, shape ``(..., n)``."""
        return self.xp.linalg.diagonal(a)

    def concat(self, arrays: list[Any], axis: int = 0) -> Any:
        return self.xp.concat(arrays, axis=axis)

    def sum_sq(self, a: Any) -> Any:
        """Sum of squares: 0-d for a vector or matrix, shape ``(...)`` for a ``(..., p, q)`` stack."""
        return self.vdot(a, a)

    def vdot(self, a: Any, b: Any) -> Any:
        """Sum of elementwise products: over all entries of vectors and matrices (0-d), over the
        last two axes of stacks (shape ``(...)``).

        NumPy matrices use ``np.vdot`` (no temporary; 3x faster than ``sum(a * b)`` at
        1000 x 10), NumPy stacks ``einsum``; torch and CuPy ``sum(a * b)``.
        """
        if a.ndim <= 2:
            if self.name == "numpy":
                return np.asarray(np.vdot(a, b))
            return self.xp.sum(a * b)
        if self.name == "numpy":
            return np.einsum("...ij,...ij->...", a, b)
        return self.xp.sum(a * b, axis=(-2, -1))

    def mm(self, A: Any, B: Any) -> Any:
        """``A @ B`` for (stacks of) matrices; torch's ``bmm``/``mm`` directly where the shapes
        allow (they skip ``matmul``'s broadcasting bookkeeping: 2-8 us per call on a CPU)."""
        if self.name == "torch":
            torch = _torch()
            if A.ndim == B.ndim == 3 and A.shape[0] == B.shape[0]:
                return torch.bmm(A, B)
            if A.ndim == B.ndim == 2:
                return torch.mm(A, B)
        return A @ B

    def addmm(self, C: Any, A: Any, B: Any, alpha: float = 1.0) -> Any:
        """``C + alpha * (A @ B)`` for (stacks of) matrices.

        torch: fused ``baddbmm`` / ``addmm`` (one pass over ``C`` instead of two) where
        :func:`_fused_addmm` says so, else a separate product and ``add``.
        """
        if self.name == "torch":
            torch = _torch()
            if _fused_addmm(C, A, B):
                return (torch.addmm if C.ndim == 2 else torch.baddbmm)(C, A, B, alpha=alpha)
            AB = self.mm(A, B)
            if AB.shape != C.shape or (
                torch.is_grad_enabled() and (C.requires_grad or AB.requires_grad)
            ):  # C broadcasts, or autograd records the sum (it refuses out=): a new array
                return torch.add(C, AB, alpha=alpha)
            return torch.add(C, AB, alpha=alpha, out=AB)  # into the fresh product: no 2nd array
        AB = A @ B
        return C + AB if alpha == 1.0 else C + alpha * AB

    def addmm_(self, C: Any, A: Any, B: Any, alpha: float = 1.0) -> Any:
        """In place ``C += alpha * (A @ B)`` for a ``C`` the caller owns (a temporary); returns C.

        torch: ``baddbmm_`` / ``addmm_`` (GEMM with beta = 1 on C: one pass, no allocation)
        where :func:`_fused_addmm` says so, ``add_`` of the product elsewhere."""
        if self.name == "torch":
            if _fused_addmm(C, A, B):
                return (C.addmm_ if C.ndim == 2 else C.baddbmm_)(A, B, alpha=alpha)
            return C.add_(self.mm(A, B), alpha=alpha)
        if alpha == 1.0:
            C += A @ B
        else:
            C += alpha * (A @ B)
        return C

    def axpy(self, a: Any, X: Any, Y: Any) -> Any:
        """``Y + a X`` with ``a`` a number or per-item values ``(...)`` for ``(..., p, q)`` arrays."""
        if getattr(a, "ndim", 0) > 0:
            a = a[..., None, None]
        if self.name == "torch":
            torch = _torch()
            return (
                torch.addcmul(Y, a, X) if isinstance(a, torch.Tensor) else torch.add(Y, X, alpha=a)
            )
        return Y + a * X

    def lerp(self, a: Any, b: Any, w: Any) -> Any:
        """``a + w (b - a)`` (one fused pass with torch); ``w`` a number or broadcastable array."""
        if self.name == "torch":
            return _torch().lerp(a, b, w)
        return a + w * (b - a)

    def rowdot(self, a: Any, b: Any, c: Any = None, d: Any = None) -> Any:
        """``sum(a * b, axis=-1)``, plus ``sum(c * d, axis=-1)`` when ``c``, ``d`` are given.

        NumPy: ``einsum`` (no temporary). torch: one product ``a * b`` (with ``c * d`` added in
        place by ``addcmul_``) times a vector of ones, a matrix-vector product: 2x faster than
        ``einsum`` or ``sum(-1)`` over short rows on CPUs (19 vs 37 us at 12 x 384 x 8,
        one thread). O(size of a).
        """
        if self.name == "numpy":
            out = np.einsum("...ij,...ij->...i", a, b)
            return out if c is None else out + np.einsum("...ij,...ij->...i", c, d)
        prod = a * b
        if c is not None:
            prod = prod.addcmul_(c, d) if self.name == "torch" else prod + c * d
        if self.name == "torch":
            return prod @ _torch().ones(a.shape[-1], dtype=prod.dtype, device=prod.device)
        return self.xp.sum(prod, axis=-1)

    def frobenius(self, a: Any) -> Any:
        """Frobenius norm: 0-d for a matrix, shape ``(...)`` for a ``(..., p, q)`` stack."""
        if self.name == "torch":
            return _torch().linalg.matrix_norm(a)
        return self.xp.sqrt(self.sum_sq(a))

    def to_float(self, a: Any) -> float:
        """A 0-d array (or number) as a Python float (synchronizes GPU backends)."""
        return float(a)

    def all_finite(self, a: Any) -> bool:
        return bool(self.xp.all(self.xp.isfinite(a)))

    def to_numpy(self, a: Any) -> np.ndarray:
        if self.name == "torch":
            return a.detach().cpu().numpy()
        if self.name == "cupy":
            return a.get()
        return np.asarray(a)

    @staticmethod
    def is_complex(a: Any) -> bool:
        """Whether ``a`` (dense or sparse array of any backend) has a complex dtype."""
        dt = getattr(a, "dtype", None)
        if dt is None:
            return False
        if getattr(dt, "is_complex", None) is not None:  # torch dtypes
            return bool(dt.is_complex)
        return getattr(np.dtype(dt), "kind", "") == "c"

    # -- ambient matrices ------------------------------------------------------
    def is_sparse(self, z: Any) -> bool:
        if self.name == "numpy":
            return _is_scipy_sparse(z)
        if self.name == "torch":
            return _is_torch(z) and z.layout != _torch().strided
        sp = sys.modules.get("cupyx.scipy.sparse")
        return sp is not None and sp.issparse(z)

    def matmul_sparse(self, z: Any, b: Any) -> Any:
        """``z @ b`` for a sparse ``z`` (dense result)."""
        out = z @ b
        if self.name == "numpy":
            out = np.asarray(out)
        return out

    def rmatmul_sparse(self, z: Any, a: Any) -> Any:
        """``z.T @ a`` for a sparse ``z`` (dense result), without densifying ``z``."""
        if self.name == "torch":
            return z.t() @ a
        out = z.T @ a
        if self.name == "numpy":
            out = np.asarray(out)
        return out

    def sparse_values(self, z: Any) -> Any:
        """The stored values of a sparse matrix (for finiteness checks)."""
        if self.name == "torch":
            if z.layout == _torch().sparse_coo:
                return z.coalesce().values()
            return z.values()
        return z.data

    def sparse_to_dtype(self, z: Any) -> Any:
        if self.name == "torch":
            return z.to(self.dtype)
        return z.astype(self.dtype) if z.dtype != self.dtype else z

    def device_of(self, a: Any) -> Any:
        if self.name == "torch":
            return a.device
        if self.name == "cupy":
            return getattr(a, "device", None)
        return None

    def same_device(self, a: Any) -> bool:
        if self.name == "numpy":
            return True
        if self.name == "torch":
            return a.device == self.device
        dev = self.device_of(a)
        return dev is None or int(getattr(dev, "id", dev)) == int(
            getattr(self.device, "id", self.device)
        )


@cache
def _namespace(name: str):
    if name == "numpy":
        import array_api_compat.numpy as xp

        return xp
    if name == "torch":
        import array_api_compat.torch as xp

        return xp
    if name == "cupy":
        import array_api_compat.cupy as xp

        return xp
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


_DTYPE_NAMES = {
    "float32": "float32",
    "float64": "float64",
    "single": "float32",
    "double": "float64",
}


def make_backend(name: str = "numpy", dtype: Any = None, device: Any = None) -> Backend:
    """Build a :class:`Backend` from user arguments, with clear errors (cached).

    ``dtype`` may be None (float64), a string (``"float32"``, ``"float64"``) or a dtype object
    of any backend; ``device`` may be None (CPU for torch, the current device for CuPy).
    """
    try:
        return _make_backend_cached(name, dtype, device)
    except TypeError:  # an unhashable device or dtype: build it without the cache
        return _make_backend(name, dtype, device)


@cache
def _make_backend_cached(name: str, dtype: Any, device: Any) -> Backend:
    return _make_backend(name, dtype, device)


def _make_backend(name: str, dtype: Any, device: Any) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    key = "float64"
    if dtype is not None:
        s = str(dtype).replace("torch.", "").replace("numpy.", "")
        s = s.replace("<class '", "").replace("'>", "")
        if s not in _DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {dtype!r}: rankopt supports float32 and float64")
        key = _DTYPE_NAMES[s]
    if name == "numpy":
        if device not in (None, "cpu"):
            raise ValueError(
                f"the numpy backend has no device {device!r}; use backend='torch' or 'cupy'"
            )
        return Backend("numpy", np.dtype(key), None)
    if name == "torch":
        try:
            torch = _torch()
        except ImportError as e:  # pragma: no cover - exercised only without torch
            raise ImportError("backend='torch' needs PyTorch: pip install -e '.[torch]'") from e
        dev = torch.device(device if device is not None else "cpu")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} requested but torch sees no CUDA GPU on this machine"
            )
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        return Backend("torch", getattr(torch, key), dev)
    try:
        import cupy as cp
    except ImportError as e:
        raise ImportError(
            "backend='cupy' needs CuPy and a CUDA GPU: pip install -e '.[cupy]'"
        ) from e
    dev = cp.cuda.Device(device if device is not None else cp.cuda.runtime.getDevice())
    return Backend("cupy", np.dtype(key), dev)


def backend_like(a: Any) -> Backend:
    """The :class:`Backend` (name, dtype, device) of an existing array."""
    own = _own_backend(a)
    if own is not None:
        return own
    name = backend_name_of(a)
    if name is None:
        raise ValueError(f"expected an array (numpy, torch or cupy), got {type(a).__name__}")
    if name == "torch":
        return make_backend("torch", a.dtype, a.device)
    if name == "cupy":
        return make_backend("cupy", a.dtype, getattr(a, "device", None))
    return make_backend("numpy", a.dtype if a.dtype.kind == "f" else None, None)


def as_rng(seed: Any) -> np.random.Generator:
    """A NumPy Generator from None, an int, a SeedSequence or a Generator (no global state)."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)
