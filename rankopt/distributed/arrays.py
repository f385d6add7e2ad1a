r"""Row-blocked Dask arrays that the manifold's geometry can compute with: :class:`BlockedArray`.

The factors of a distributed point (``U``: m x r, ``V``: n x r) and of tangent vectors
(``Up``, ``Vp``) are tall-skinny matrices split into row blocks, each block one chunk of a
``dask.array.Array`` with a single column chunk. The r x r parts (``s``, ``M``, Gram matrices,
the R factors of QR) are NumPy arrays on the client: the geometry of
:mod:`rankopt.geometry` runs unchanged, with the r x r and 2r x 2r algebra on the client and
everything of size m or n on the workers.

Why a wrapper and not plain dask arrays: an iterative solver on lazy dask arrays builds a graph
that grows with every iteration (``r_k = r_{k-1} - alpha_k H p_k`` in conjugate gradients), and
every inner product would recompute the history since the last persisted array, O(k^2) work
for k iterations. A :class:`BlockedArray` is lazy only until the next *synchronization*: every
result the client waits for (an inner product, a Gram matrix, the R of a QR) first persists
all pending arrays that are still alive (:func:`flush`), so graphs stay one synchronization
deep and nothing is computed twice; temporaries that died in between are never computed.

Operations (``k``, ``k'`` the numbers of columns, ``m_i`` the rows of block i):

* ``A + B``, ``A - B``, ``a * A`` (a number, a 0-d dask array, or a row vector), ``A / a``,
  ``-A``: blockwise, lazy, O(m k);
* ``A @ S`` for a NumPy ``k x k'`` matrix: blockwise, lazy, O(m k k');
* ``A.T @ B`` (:class:`Transposed`): the Gram matrix ``sum_i A_i^T B_i`` as a tree reduction
  of the per-block products (fan-in 8), computed: a k x k' NumPy array, O(m k k') work,
  ``k k'`` numbers moved per block;
* :func:`tsqr`: ``A = Q R`` by tall-skinny QR (Demmel, Grigori, Hoemmen, Langou 2012): QR of
  every block on its worker, QR of the stacked R factors on the client, ``Q_i = Q_i' Q''_i``
  back on the workers; ``k^2`` numbers per block move, O(m k^2) work;
* :func:`vdot`: ``sum(A * B)`` as a 0-d dask array (computed when a float is asked for).
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from . import _dask

__all__ = [
    "BlockedArray",
    "Transposed",
    "flush",
    "pending_count",
    "gram",
    "grams",
    "tsqr",
    "vdot",
    "gather",
    "from_numpy",
    "zeros",
]

#: Alive arrays whose dask graph is still lazy (persisted at the next synchronization).
_PENDING: weakref.WeakSet = weakref.WeakSet()


def flush() -> None:
    """Persist every pending :class:`BlockedArray` still alive, in one ``persist`` call."""
    arrays = [a for a in list(_PENDING) if a.pending]
    if not arrays:
        return
    done = _dask.persist([a.dask for a in arrays])
    for a, d in zip(arrays, done, strict=True):
        a.set_persisted(d)
    _PENDING.clear()


def pending_count() -> int:
    """How many alive arrays wait for the next :func:`flush` (a diagnostic)."""
    return sum(1 for a in list(_PENDING) if a.pending)


def _is_dask(x: Any) -> bool:
    return type(x).__module__.startswith("dask.array")


def _coefficient(a: Any) -> Any:
    """A number, 0-d array or row vector that multiplies every block; NotImplemented else."""
    if isinstance(a, (int, float, np.number)):
        return a
    if isinstance(a, np.ndarray) and (
        a.ndim == 0 or (a.ndim <= 2 and a.shape[0] == 1) or a.ndim == 1
    ):
        return a
    if _is_dask(a) and a.ndim == 0:
        return a
    return NotImplemented


class BlockedArray:
    """A tall-skinny m x k matrix held as row blocks on the cluster (see the module notes).

    Parameters
    ----------
    arr : dask.array.Array
        2-D, one chunk per row block, a single column chunk.
    backend : rankopt.distributed.backend.DaskBackend
        The backend the array belongs to (``rankopt._backend.backend_like`` returns it).
    pending : bool
        Whether ``arr`` is a lazy graph (persisted at the next :func:`flush`).

    Attributes
    ----------
    dask : dask.array.Array
        The array itself (persisted after a synchronization).
    shape, dtype, ndim, row_chunks
    """

    __array_ufunc__ = None  # NumPy operators defer to ours (ndarray * BlockedArray)

    def __init__(self, arr: Any, backend: Any, pending: bool = True) -> None:
        if arr.ndim != 2 or len(arr.chunks[1]) != 1:
            raise ValueError(
                f"a BlockedArray needs a 2-D dask array with one column chunk, got chunks "
                f"{arr.chunks}"
            )
        self.dask = arr
        self.backend = backend
        self.pending = pending
        if pending:
            _PENDING.add(self)

    def set_persisted(self, arr: Any) -> None:
        """Replace the lazy graph by its persisted version (same keys)."""
        self.dask, self.pending = arr, False

    def __rankopt_backend__(self) -> Any:
        return self.backend

    # ------------------------------------------------------------------ attributes
    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.dask.shape[0]), int(self.dask.shape[1]))

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> Any:
        return self.dask.dtype

    @property
    def row_chunks(self) -> tuple[int, ...]:
        return tuple(int(c) for c in self.dask.chunks[0])

    @property
    def T(self) -> Transposed:
        return Transposed(self)

    mT = T

    def swapaxes(self, a: int, b: int) -> Transposed:
        if {a % 2, b % 2} != {0, 1}:
            raise ValueError(f"a BlockedArray swaps its two axes only, got ({a}, {b})")
        return Transposed(self)

    def __repr__(self) -> str:
        state = "pending" if self.pending else "persisted"
        return f"BlockedArray(shape={self.shape}, blocks={len(self.row_chunks)}, {state})"

    def __len__(self) -> int:
        return self.shape[0]

    def _new(self, arr: Any) -> BlockedArray:
        return BlockedArray(arr, self.backend)

    # ------------------------------------------------------------------ arithmetic
    def _other(self, other: Any) -> Any:
        if isinstance(other, BlockedArray):  # same shape, or one column (broadcast)
            if other.row_chunks != self.row_chunks or other.shape[1] not in (1, self.shape[1]):
                raise ValueError(
                    f"BlockedArrays of shapes {self.shape} and {other.shape} (row blocks "
                    f"{self.row_chunks} and {other.row_chunks}) do not align"
                )
            return other.dask
        return _coefficient(other)

    def __add__(self, other: Any) -> BlockedArray:
        o = self._other(other)
        return NotImplemented if o is NotImplemented else self._new(self.dask + o)

    __radd__ = __add__

    def __sub__(self, other: Any) -> BlockedArray:
        o = self._other(other)
        return NotImplemented if o is NotImplemented else self._new(self.dask - o)

    def __rsub__(self, other: Any) -> BlockedArray:
        o = self._other(other)
        return NotImplemented if o is NotImplemented else self._new(o - self.dask)

    def __mul__(self, other: Any) -> BlockedArray:
        if isinstance(other, BlockedArray):
            return self._new(self.dask * self._other(other))
        o = _coefficient(other)
        return NotImplemented if o is NotImplemented else self._new(self.dask * o)

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> BlockedArray:
        o = self._other(other)
        return NotImplemented if o is NotImplemented else self._new(self.dask / o)

    def __neg__(self) -> BlockedArray:
        return self._new(-self.dask)

    def __pos__(self) -> BlockedArray:
        return self

    def __matmul__(self, other: Any) -> BlockedArray:
        """``A @ S`` for a small NumPy matrix ``S`` (k x k'): blockwise, O(m k k')."""
        if isinstance(other, (BlockedArray, Transposed)) or _is_dask(other):
            return NotImplemented
        S = np.asarray(other, dtype=self.dtype)
        if S.ndim != 2 or S.shape[0] != self.shape[1]:
            raise ValueError(f"cannot multiply a {self.shape} BlockedArray by {S.shape}")
        return self._new(
            self.dask.map_blocks(np.matmul, S, chunks=(self.row_chunks, (S.shape[1],)))
        )

    def astype(self, dtype: Any) -> BlockedArray:
        return self if np.dtype(dtype) == self.dtype else self._new(self.dask.astype(dtype))

    def __getitem__(self, key: Any) -> Any:
        """Column selections ``A[:, cols]`` (also ``A[..., cols]``, ``A[()]``) stay blocked; a
        row selection returns a NumPy array (computed: small selections only)."""
        rows, cols = _normalize_key(key)
        if rows == slice(None):
            return self._new(self.dask[:, cols]) if cols != slice(None) else self
        return gather_dask(self.dask[rows, cols])

    # ------------------------------------------------------------------ results
    def compute(self) -> np.ndarray:
        """The whole matrix as a NumPy array on the client (O(m k) memory there)."""
        return gather(self)

    def to_dask(self) -> Any:
        """The persisted dask array (one chunk per row block)."""
        flush()
        return self.dask

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = gather(self)
        return out if dtype is None else out.astype(dtype)


class Transposed:
    """``A^T`` for a :class:`BlockedArray` ``A`` (k x m): ``A.T @ B`` is a Gram matrix.

    Only what the geometry uses: ``@`` with a BlockedArray of the same rows (:func:`gram`),
    selections of rows (columns of ``A``), scaling, and ``.T`` back.
    """

    __array_ufunc__ = None

    def __init__(self, base: BlockedArray) -> None:
        self.base = base

    @property
    def shape(self) -> tuple[int, int]:
        m, k = self.base.shape
        return (k, m)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> Any:
        return self.base.dtype

    @property
    def T(self) -> BlockedArray:
        return self.base

    mT = T

    def swapaxes(self, a: int, b: int) -> BlockedArray:
        return self.base.swapaxes(a, b).base

    def __rankopt_backend__(self) -> Any:
        return self.base.backend

    def __matmul__(self, other: Any) -> np.ndarray:
        if isinstance(other, BlockedArray):
            return gram(self.base, other)
        return NotImplemented

    def __mul__(self, a: Any) -> Transposed:
        return Transposed(self.base * a)

    __rmul__ = __mul__

    def __neg__(self) -> Transposed:
        return Transposed(-self.base)

    def __getitem__(self, key: Any) -> Any:
        rows, cols = _normalize_key(key)
        if cols != slice(None):
            raise IndexError("a transposed BlockedArray selects rows only (columns of A)")
        return Transposed(self.base[:, rows])


def _normalize_key(key: Any) -> tuple[Any, Any]:
    """``(rows, cols)`` of a 2-D index (``()``, ``...`` and missing parts mean all)."""
    if not isinstance(key, tuple):
        key = (key,)
    if key == ():
        return slice(None), slice(None)
    if key[0] is Ellipsis:
        rest = key[1:]
        key = (slice(None),) * (2 - len(rest)) + rest
    elif len(key) == 2 and key[1] is Ellipsis:
        key = (key[0], slice(None))
    if len(key) == 1:
        key = (key[0], slice(None))
    if len(key) != 2:
        raise IndexError(f"a BlockedArray is 2-D; got the index {key!r}")
    return key


# ---------------------------------------------------------------------------- synchronizing
def gather_dask(arr: Any) -> Any:
    """Compute a dask collection after persisting what is pending (one synchronization)."""
    flush()
    return _dask.compute(arr)[0]


def gather(a: BlockedArray) -> np.ndarray:
    """``a`` as one NumPy array on the client. O(m k) transferred."""
    return np.asarray(gather_dask(a.dask))


def _gram_block(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.T @ b


def _gram_graph(dsk: dict, A: BlockedArray, B: BlockedArray) -> Any:
    """Add the tasks of ``A^T B`` (per-block products, tree sum) to ``dsk``; its final key."""
    if A.row_chunks != B.row_chunks:
        raise ValueError(f"Gram of misaligned BlockedArrays: {A.row_chunks} vs {B.row_chunks}")
    name = _dask.new_name("gram")
    parts = []
    for i in range(len(A.row_chunks)):
        dsk[(name + "-p", i)] = (_gram_block, (A.dask.name, i, 0), (B.dask.name, i, 0))
        parts.append((name + "-p", i))
    return _dask.tree_sum(dsk, name, parts, (name, 0, 0))


def grams(pairs: list[tuple[BlockedArray, BlockedArray]]) -> list[np.ndarray]:
    """The Gram matrices ``A^T B`` of several pairs in one synchronization (tree reductions)."""
    flush()
    dsk: dict = {}
    finals = [_gram_graph(dsk, A, B) for A, B in pairs]
    deps = [x.dask for pair in pairs for x in pair]
    arrays = [
        _dask.array_from_graph(key[0], dsk, deps, ((A.shape[1],), (B.shape[1],)), A.dtype)
        for (A, B), key in zip(pairs, finals, strict=True)
    ]
    return [np.asarray(res) for res in _dask.compute(*arrays)]


def gram(A: BlockedArray, B: BlockedArray) -> np.ndarray:
    """``A^T B`` (k x k'), a NumPy array: O(m k k') on the workers, k k' numbers per block."""
    return grams([(A, B)])[0]


def _vdot_block(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.vdot(a, b))


def vdot(A: BlockedArray, B: BlockedArray) -> Any:
    """``sum(A * B)`` as a 0-d dask array (lazy; one number per block is moved)."""
    if A.row_chunks != B.row_chunks:
        raise ValueError(f"vdot of misaligned BlockedArrays: {A.row_chunks} vs {B.row_chunks}")
    name = _dask.new_name("vdot")
    dsk: dict = {}
    parts = []
    for i in range(len(A.row_chunks)):
        dsk[(name + "-p", i)] = (_vdot_block, (A.dask.name, i, 0), (B.dask.name, i, 0))
        parts.append((name + "-p", i))
    _dask.tree_sum(dsk, name, parts, (name,))
    return _dask.array_from_graph(name, dsk, [A.dask, B.dask], (), A.dtype)


def _qr_block(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.linalg.qr(a)


def _item(t: tuple, i: int) -> Any:
    return t[i]


def tsqr(A: BlockedArray) -> tuple[BlockedArray, np.ndarray]:
    r"""Reduced QR ``A = Q R`` by one level of tall-skinny QR.

    Blocks ``A_i = Q'_i R_i`` on the workers (Householder), ``[R_1; ...; R_P] = Q'' R`` on the
    client (a (P k) x k Householder QR), ``Q_i = Q'_i Q''_i`` lazily on the workers. As stable
    as Householder QR; O(m k^2) work, ``P k^2`` numbers gathered and sent back. Returns
    ``(Q, R)`` with ``Q`` a BlockedArray and ``R`` a k x k NumPy array. Blocks of fewer than k
    rows (tiny problems only): the QR of the gathered matrix.
    """
    flush()
    nb, k = len(A.row_chunks), A.shape[1]
    if min(A.row_chunks) < k:
        q, r = np.linalg.qr(gather(A))
        return from_numpy(q, A.row_chunks, A.backend), r
    name = _dask.new_name("tsqr")
    dsk: dict = {}
    for i in range(nb):
        dsk[(name + "-qr", i)] = (_qr_block, (A.dask.name, i, 0))
        dsk[(name + "-q", i, 0)] = (_item, (name + "-qr", i), 0)
        dsk[(name + "-r", i, 0)] = (_item, (name + "-qr", i), 1)
    q_local = _dask.array_from_graph(name + "-q", dsk, [A.dask], (A.row_chunks, (k,)), A.dtype)
    r_stack = _dask.array_from_graph(name + "-r", dsk, [A.dask], ((k,) * nb, (k,)), A.dtype)
    (q_local,) = _dask.persist([q_local])  # submitted first: the block QRs run once
    q2, R = np.linalg.qr(np.asarray(_dask.compute(r_stack)[0]))
    qname = _dask.new_name("tsqr-q")
    dsk_q = {
        (qname, i, 0): (
            np.matmul,
            (q_local.name, i, 0),
            _dask.embed(q2[i * k : (i + 1) * k].copy()),
        )
        for i in range(nb)
    }
    Q = _dask.array_from_graph(qname, dsk_q, [q_local], (A.row_chunks, (k,)), A.dtype)
    return BlockedArray(Q, A.backend), R


# ---------------------------------------------------------------------------- creation
def from_numpy(a: np.ndarray, row_chunks: tuple[int, ...], backend: Any) -> BlockedArray:
    """A NumPy m x k array split into row blocks; the blocks travel inside the task graph (so
    the scheduler can recompute them if a worker holding them is lost). O(m k) sent."""
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[0] != sum(row_chunks):
        raise ValueError(f"cannot split an array of shape {a.shape} into row blocks {row_chunks}")
    name = _dask.new_name("blocks")
    dsk = {}
    lo = 0
    for i, c in enumerate(row_chunks):
        dsk[(name, i, 0)] = _dask.embed(np.ascontiguousarray(a[lo : lo + c]))
        lo += c
    arr = _dask.array_from_graph(name, dsk, [], (tuple(row_chunks), (a.shape[1],)), a.dtype)
    return BlockedArray(arr, backend)


def _zeros_block(rows: int, cols: int, dtype: Any) -> np.ndarray:
    return np.zeros((rows, cols), dtype=dtype)


def zeros(row_chunks: tuple[int, ...], k: int, dtype: Any, backend: Any) -> BlockedArray:
    """An m x k BlockedArray of zeros (made on the workers)."""
    name = _dask.new_name("zeros")
    dsk = {(name, i, 0): (_zeros_block, c, k, np.dtype(dtype)) for i, c in enumerate(row_chunks)}
    arr = _dask.array_from_graph(name, dsk, [], (tuple(row_chunks), (k,)), dtype)
    return BlockedArray(arr, backend)
