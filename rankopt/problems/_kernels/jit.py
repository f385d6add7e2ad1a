r"""The one way rankopt compiles a numba kernel: a serial and a threaded twin of one Python loop.

A kernel is a plain Python function of :mod:`rankopt.problems._kernels.loops` whose outer loop
is ``numba.prange`` (used directly). :class:`TwinKernel` compiles that one function twice:

* ``parallel=False``, the *serial twin*: numba runs ``prange`` as ``range``, one thread, no
  threading runtime started;
* ``parallel=True``, the *parallel twin*: the iterations of the ``prange`` loop are split over
  ``numba.get_num_threads()`` threads (:func:`threads`).

Both with :data:`JIT_OPTIONS`: ``cache=True`` (the machine code is written to
``_kernels/__pycache__`` on the first compilation and loaded from there by every later process),
``fastmath={"reassoc"}`` (dot products may be reassociated, i.e. vectorized: 1.5x faster at
k = 20, measured; nothing else, no flush-to-zero and no nan/inf assumptions, so results match
the Python loop to round-off) and ``nogil=True``.

Why twins are compiled from *renamed copies*: numba's on-disk cache names its files after the
function's module, qualified name and first line, and keys the entries by signature, target
machine and bytecode, not by the compile flags. The serial and the parallel compilation of one
function would share an index and load each other's machine code. Each twin is therefore
compiled from a copy of the function named ``<name>_serial`` or ``<name>_parallel`` (the same
code object but for its name, the same module globals: nothing of the module is rewritten).

numba itself is imported on the first compilation (or :attr:`TwinKernel.python`), not with this
module: ``import numba`` costs about 0.4 s, and loading its registries about 1 s more, which
users of the dense problems (sensing, generic) should not pay.

Example::

    SAMPLE = TwinKernel("sample")              # loops.sample, not compiled yet
    SAMPLE(parallel=False)(A, B, rows, cols, out)   # compiles (or loads) the serial twin
    SAMPLE.python(A, B, rows, cols, out)       # the loop run as Python (reference semantics)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "HAVE_NUMBA",
    "JIT_OPTIONS",
    "LOOPS",
    "TwinKernel",
    "compile_twin",
    "renamed",
    "threads",
    "kernel_threads",
    "active_threads",
    "resolve_parallel",
]

#: Whether numba can be imported. It is imported lazily, on the first kernel compilation.
HAVE_NUMBA = importlib.util.find_spec("numba") is not None

#: Options of every compiled kernel (``parallel`` is set per twin).
JIT_OPTIONS: dict[str, Any] = {"cache": True, "fastmath": {"reassoc"}, "nogil": True}

#: Module holding the kernel loops (imported on first use: it imports numba).
LOOPS = "rankopt.problems._kernels.loops"


def renamed(fn: types.FunctionType, name: str) -> types.FunctionType:
    """A copy of ``fn`` named ``name`` (name and qualified name), sharing its code, globals,
    defaults and closure: numba caches it apart from ``fn`` (see the module notes)."""
    code = fn.__code__.replace(co_name=name)
    if sys.version_info >= (3, 11):
        code = code.replace(co_qualname=name)
    copy = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = name
    copy.__doc__ = fn.__doc__
    return copy


def compile_twin(fn: types.FunctionType, parallel: bool) -> Any:
    """The numba dispatcher of ``fn`` compiled with ``parallel`` and :data:`JIT_OPTIONS`.

    Lazy: numba compiles (or loads from its disk cache) per argument types at the first call.
    """
    import numba

    suffix = "_parallel" if parallel else "_serial"
    return numba.njit(parallel=bool(parallel), **JIT_OPTIONS)(renamed(fn, fn.__name__ + suffix))


class TwinKernel:
    """The serial and the parallel twin of one kernel loop, each compiled on first use.

    Parameters
    ----------
    name : str
        Name of the loop function in ``module``.
    module : str
        Dotted module path of the loop (default :data:`LOOPS`); imported on first use.

    Notes
    -----
    ``kernel(parallel)`` returns the numba dispatcher of the twin (created once per process and
    flag; numba compiles per argument types and caches on disk). Loops whose iterations depend
    on each other use ``range`` instead of ``prange`` and are only called as ``kernel(False)``.
    """

    def __init__(self, name: str, module: str = LOOPS) -> None:
        self.name = name
        self.module = module
        self._twins: dict[bool, Any] = {}

    def __repr__(self) -> str:
        return f"TwinKernel({self.module}.{self.name})"

    @property
    def python(self) -> Callable[..., Any]:
        """The loop as a plain Python function (the reference semantics; slow)."""
        return getattr(importlib.import_module(self.module), self.name)

    def __call__(self, parallel: bool | None = False) -> Any:
        """The numba dispatcher of the serial (``parallel`` false or None) or parallel twin."""
        key = bool(parallel)
        twin = self._twins.get(key)
        if twin is None:
            twin = self._twins[key] = compile_twin(self.python, key)
        return twin


def threads(parallel: bool | None) -> int:
    """Threads a kernel call with ``parallel`` runs on: ``numba.get_num_threads()`` or 1."""
    if not parallel:
        return 1
    import numba

    return int(numba.get_num_threads())


# ---------------------------------------------------------------------------------------------
# The thread count of a run: ``rankopt.solve(..., threads=N)`` (through
# ``rankopt.solvers.blas_threads``) enters :func:`kernel_threads`; problems built with
# ``parallel=None`` (the default) then run the parallel twins on N numba threads while it
# holds, and the serial twins otherwise. Per Python thread, like numba's own setting.
# ---------------------------------------------------------------------------------------------
_ACTIVE = threading.local()


def active_threads() -> int:
    """Kernel threads of the :func:`kernel_threads` block around this call (1 outside one)."""
    return int(getattr(_ACTIVE, "n", 1))


def resolve_parallel(parallel: bool | None) -> bool:
    """A problem's ``parallel`` option at call time: True or False as given; None follows the
    enclosing :func:`kernel_threads` block (parallel twins when it asks for 2 or more)."""
    return bool(parallel) if parallel is not None else active_threads() > 1


@contextmanager
def kernel_threads(n: int) -> Iterator[int]:
    """Run the kernels of problems with ``parallel=None`` on ``n`` numba threads in this block.

    ``n > 1`` sets ``numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))`` for the
    calling thread (numba's setting is per thread; the previous one is restored on exit) and
    makes :func:`resolve_parallel` choose the parallel twins; ``n = 1`` chooses the serial twins
    and starts no threading runtime (numba is not even imported). Yields the thread count the
    kernels get. Nested blocks: the inner one holds inside it.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"kernel threads must be a positive integer, got {n!r}")
    before = active_threads()
    if n == 1 or not HAVE_NUMBA:
        _ACTIVE.n = 1
        try:
            yield 1
        finally:
            _ACTIVE.n = before
        return
    import numba

    saved = numba.get_num_threads()
    got = min(n, int(numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(got)
    _ACTIVE.n = got
    try:
        yield got
    finally:
        _ACTIVE.n = before
        numba.set_num_threads(saved)
