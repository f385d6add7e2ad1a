r"""What every benchmark shares: threads, the timing loop, the lock, machine info, optimizer state.

One implementation of each, so that two benchmarks' numbers mean the same thing:

* :func:`pin_threads`: BLAS, OpenMP, numba and torch intra-op threads of this process set to one
  count (threadpoolctl and ``torch.set_num_threads``), and the line that states them;
* :func:`time_interleaved`: the timing loop. Every round calls each function in turn (A, B, C,
  A, B, C, ...; ``alternate=True`` reverses every other round, A, B, B, A, ...), so that all of
  them see the same machine load; untimed warm-up calls first; :class:`Timing` holds the
  samples and their median, min and max;
* :func:`bench_lock`: ``flock /tmp/rankopt-bench.lock`` around a timed stage, so that no two
  timing benchmarks run at the same time on a shared machine;
* :func:`machine_info`: the header of every report (CPU, memory, load, BLAS and its threads,
  versions); ``python -m benchmarks.harness`` prints it alone;
* :func:`optimizer_state_bytes` (and :func:`state_bytes` under it): **the** optimizer state of
  every benchmark that reports one (below);
* :func:`report_log`, :func:`command_line` and :func:`pyplot`: a report's lines (printed and
  kept), the command written into it, and matplotlib without a display.

Optimizer state
---------------
The state of an optimizer is the number of **bytes of every tensor reachable from
``optimizer.state``**: torch tensors and NumPy arrays, found through dicts (their values),
lists, tuples and objects' attributes (GaLore's projectors, for instance) down to
:data:`STATE_DEPTH` levels. A tensor counts its own bytes (``numel * element size``), each
memory region once: views of one buffer, such as the per-parameter views of rankopt's stacked
state, are not counted twice. Numbers (Python's, NumPy's scalars) are not counted, nor the rest
of a buffer that a view keeps alive (GaLore's projector is an 8 x 384 view of a 384 x 384 SVD
factor: 12 KiB counted, 576 KiB held). Bytes rather than elements: a float64 and a float32
state of the same shape are not the same memory, and the GPU runs store bfloat16 states. A
NumPy rule's state (:func:`rankopt.rules.state_arrays`) is measured by the same walk
(:func:`state_bytes`).

Before this module, ``optimizer_step`` counted the bytes of the tensors directly in each state
dict (the same numbers for the optimizers it times), ``optimizers`` counted elements (its
columns are now ``state bytes (i)``/``(v)``), and ``finetune`` walked as here.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

#: the file every timing stage holds with ``flock`` (:func:`bench_lock`)
LOCK = "/tmp/rankopt-bench.lock"
#: how deep :func:`state_bytes` walks below each entry of ``optimizer.state``
STATE_DEPTH = 4
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")
_PACKAGES = ("numpy", "scipy", "torch", "pymanopt", "rankopt")


# --------------------------------------------------------------------------- threads


def pin_threads(n: int | None = 1, *, torch: bool = False) -> str:
    """Set every thread pool of this process to ``n`` threads; return the line stating them.

    NumPy (its BLAS), numba (when installed) and, with ``torch=True`` or when it is already
    imported, torch are loaded first, so that their pools exist when they are limited:
    threadpoolctl limits every loaded BLAS and OpenMP runtime, ``numba.set_num_threads`` and
    ``torch.set_num_threads`` the other two. The limits stay for the whole process.

    Parameters
    ----------
    n : int or None
        Threads for every pool; ``None`` changes nothing (the line states the libraries' own
        settings).
    torch : bool
        Import torch first (a benchmark that will use it).

    Returns
    -------
    str
        ``"threads: BLAS 1, OpenMP 1, numba 1, torch 1"`` (the pools that are loaded).
    """
    import numpy  # noqa: F401  (loads the BLAS, so that threadpoolctl finds it)

    numba = importlib.import_module("numba") if importlib.util.find_spec("numba") else None
    if torch or "torch" in sys.modules:
        importlib.import_module("torch")
    if n is not None:
        from threadpoolctl import threadpool_limits

        if numba is not None:
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
        threadpool_limits(limits=n)  # not as a context: the limits stay
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(n)
    return threads_line()


def threads_line() -> str:
    """The thread count of every loaded pool: ``"threads: BLAS 1, OpenMP 1, numba 1, torch 1"``."""
    parts = []
    try:
        from threadpoolctl import threadpool_info

        for api, label in (("blas", "BLAS"), ("openmp", "OpenMP")):
            counts = sorted({d["num_threads"] for d in threadpool_info() if d["user_api"] == api})
            if counts:
                parts.append(f"{label} {'/'.join(map(str, counts))}")
    except ImportError:
        parts.append("BLAS/OpenMP unknown (threadpoolctl not installed)")
    if "numba" in sys.modules:
        parts.append(f"numba {sys.modules['numba'].get_num_threads()}")
    if "torch" in sys.modules:
        parts.append(f"torch {sys.modules['torch'].get_num_threads()}")
    return "threads: " + ", ".join(parts)


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """The timed calls of one function (:func:`time_interleaved`).

    ``seconds``: one sample per round (the round's calls timed together, divided by their
    number), or per call with ``per_call=True``; ``results``: what each timed call returned
    (with ``keep_results=True``); ``last``: what the last call returned; ``spent``: seconds of
    all its calls, warm-up included; ``rounds``: rounds sampled.
    """

    seconds: list[float] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)
    last: Any = None
    spent: float = 0.0
    rounds: int = 0

    @property
    def median(self) -> float:
        """Median of the samples, seconds."""
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        """Smallest sample, seconds."""
        return min(self.seconds)

    @property
    def max(self) -> float:
        """Largest sample, seconds."""
        return max(self.seconds)


def _clock(clock: str) -> Callable[[], float]:
    if clock == "wall":
        return time.perf_counter
    if clock == "cpu":
        return time.thread_time  # CPU time of the calling thread: less sensitive to other load
    raise ValueError(f"clock must be 'wall' or 'cpu', not {clock!r}")


def _call(fn: Callable[[], Any], t: Timing, calls: int, now, sync) -> tuple[float, Any]:
    """``calls`` calls of ``fn`` and a sync, timed together; returns (seconds, last result)."""
    t0 = now()
    for _ in range(calls):
        t.last = fn()
    sync()
    dt = now() - t0
    t.spent += dt
    return dt, t.last


def _record(t: Timing, seconds: list[float], results: list[Any], keep: bool) -> None:
    """One round's samples (and the results of its timed calls, with ``keep``)."""
    t.seconds += seconds
    t.results += results if keep else []
    t.rounds += 1


def _wants_more(t: Timing, rounds: int, calls: int, budget: float | None) -> bool:
    if t.rounds >= rounds:
        return False
    return budget is None or not t.seconds or t.spent + t.median * calls <= budget


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    rounds: int,
    *,
    calls: int = 1,
    per_call: bool = False,
    warmup: int = 1,
    clock: str = "wall",
    sync: Callable[[], None] | None = None,
    alternate: bool = False,
    budget: float | None = None,
    keep_results: bool = False,
    on_round: Callable[[int, dict[str, Timing]], None] | None = None,
) -> dict[str, Timing]:
    """Time several functions side by side: round after round, each function in turn.

    Parameters
    ----------
    fns : mapping of str to callable
        Name -> function of no argument (one call is one unit of work: a step, a solve).
    rounds : int
        Rounds; each gives every function one sample (``calls`` with ``per_call``).
    calls : int
        Consecutive calls of a function per round.
    per_call : bool
        Each call timed alone, one sample per call (``calls`` samples per round); otherwise
        the round's calls are timed together and give one sample, their mean.
    warmup : int
        Untimed calls of every function before the first round (first-call costs, caches,
        compilation). With ``budget``, a warm-up call that takes ``budget / 20`` or more is
        kept as the function's first sample (too slow to throw away).
    clock : {"wall", "cpu"}
        ``time.perf_counter`` or the calling thread's CPU time (``time.thread_time``).
    sync : callable, optional
        Called after a function's calls, inside the timed region (``torch.cuda.synchronize``).
    alternate : bool
        Every other round in reverse order (A, B, B, A, ...): no order bias between two.
    budget : float, optional
        Seconds a function may spend: it is no longer called once its spent time plus one
        more median sample would exceed this (it keeps at least one sample).
    keep_results : bool
        Keep what every timed call returned in ``Timing.results``.
    on_round : callable, optional
        ``on_round(round_index, timings)`` after every round (progress lines).

    Returns
    -------
    dict of str to Timing
        The samples of each function, in seconds per call.
    """
    now, sync = _clock(clock), sync or (lambda: None)
    out = {name: Timing() for name in fns}
    for _ in range(warmup):
        for name, fn in fns.items():
            dt, res = _call(fn, out[name], 1, now, sync)
            if budget is not None and dt >= budget / 20 and out[name].rounds < rounds:
                _record(out[name], [dt], [res], keep_results)  # too slow to throw away
    names = list(fns)
    for rnd in range(rounds):
        order = names[::-1] if alternate and rnd % 2 else names
        todo = [k for k in order if _wants_more(out[k], rounds, calls, budget)]
        if not todo:
            break
        for name in todo:
            n, c = (calls, 1) if per_call else (1, calls)  # samples, calls per sample
            runs = [_call(fns[name], out[name], c, now, sync) for _ in range(n)]
            _record(out[name], [dt / c for dt, _ in runs], [r for _, r in runs], keep_results)
        if on_round is not None:
            on_round(rnd, out)
    return out


# --------------------------------------------------------------------------- lock


@contextlib.contextmanager
def bench_lock(path: str | None = LOCK) -> Iterator[None]:
    """Hold ``flock(path)`` (exclusive) for the ``with`` block; ``None`` or ``""``: no lock.

    Every timing stage that must not share the machine with another benchmark's takes it
    (the shell equivalent is ``flock /tmp/rankopt-bench.lock python -m benchmarks.NAME``).
    """
    if not path:
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- machine info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _blas() -> str:
    """BLAS library and thread count of NumPy, via threadpoolctl when it is installed."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    import numpy  # noqa: F401  (loads the BLAS so it shows up)

    parts = [
        f"{d.get('internal_api')} {d.get('version') or ''} ({d.get('num_threads')} threads)".strip()
        for d in threadpool_info()
        if d.get("user_api") == "blas"
    ]
    return ", ".join(parts) or "unknown"


def _cores() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    total = os.cpu_count()
    return f"{total} logical cores" + (f" ({usable} usable)" if usable not in (None, total) else "")


def machine_info(packages: tuple[str, ...] = _PACKAGES) -> str:
    """A few lines describing this machine and the library versions, for benchmark headers.

    Parameters
    ----------
    packages : tuple of str
        Distributions whose versions are listed.

    Returns
    -------
    str
        CPU and memory, OS, load average, BLAS with its threads (and the thread variables of
        the environment), versions; numba's and torch's threads when they are loaded.
    """
    try:
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "n/a"
    mem = _memory_gib()
    env = {k: os.environ[k] for k in _THREAD_VARS if k in os.environ}
    lines = [
        f"CPU: {_cpu_model()}; {_cores()}" + (f"; {mem:.1f} GiB RAM" if mem is not None else ""),
        f"OS: {platform.platform()}; Python {sys.version.split()[0]}",
        f"load average (1, 5, 15 min): {load}",
        f"BLAS: {_blas()}" + (f"; env {env}" if env else ""),
        "versions: " + ", ".join(f"{p} {_version(p)}" for p in packages),
    ]
    if "numba" in sys.modules:
        lines.append(f"numba: {sys.modules['numba'].get_num_threads()} threads")
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        lines.append(
            f"torch: {torch.get_num_threads()} intra-op threads; CUDA {torch.cuda.is_available()}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- optimizer state


def _tensor_bytes(v: Any) -> tuple[tuple, int] | None:
    """``(where, bytes)`` of a torch tensor or NumPy array (not a scalar); None otherwise.

    ``where`` is ``(device, first byte, end)`` for a contiguous one (overlapping views of one
    buffer are merged) and ``(device, first byte, shape, strides)`` otherwise (the same view
    is counted once). The bytes are the tensor's own, ``numel * element size``, not those of
    the buffer it views.
    """
    torch, np = sys.modules.get("torch"), sys.modules.get("numpy")
    if torch is not None and isinstance(v, torch.Tensor):
        size, dev, ptr = v.numel() * v.element_size(), str(v.device), v.data_ptr()
        contiguous, shape, strides = v.is_contiguous(), tuple(v.shape), v.stride()
    elif np is not None and isinstance(v, np.ndarray):
        size, dev, ptr = v.nbytes, "numpy", v.__array_interface__["data"][0]
        contiguous, shape, strides = v.flags.c_contiguous, v.shape, v.strides
    else:
        return None
    if size == 0:
        return ("empty",), 0
    return ((dev, ptr, ptr + size) if contiguous else (dev, ptr, shape, strides)), size


def _children(v: Any) -> list[Any]:
    if isinstance(v, Mapping):
        return list(v.values())
    if isinstance(v, (list, tuple, set, frozenset)):
        return list(v)
    if hasattr(v, "__dict__"):
        return list(vars(v).values())
    slots = [s for c in type(v).__mro__ for s in getattr(c, "__slots__", ())]
    return [getattr(v, s) for s in slots if hasattr(v, s)]


def _union_bytes(regions: list[tuple[str, int, int]]) -> int:
    """Bytes covered by the union of the ``(device, first byte, end)`` regions."""
    total, cur = 0, None
    for dev, lo, hi in sorted(regions):
        if cur is not None and cur[0] == dev and lo <= cur[2]:
            cur = (dev, cur[1], max(cur[2], hi))
            continue
        total += 0 if cur is None else cur[2] - cur[1]
        cur = (dev, lo, hi)
    return total + (0 if cur is None else cur[2] - cur[1])


#: what the walk neither counts nor enters: numbers (NumPy's scalars too), strings, None
_NOT_WALKED: tuple[type, ...] = (str, bytes, int, float, complex, bool, type(None))


def state_bytes(obj: Any, max_depth: int = STATE_DEPTH) -> int:
    """Bytes of every tensor or array reachable from ``obj`` (the module docstring's walk).

    Parameters
    ----------
    obj : object
        A state: a dict, list, tuple or object holding torch tensors or NumPy arrays.
    max_depth : int
        Levels walked below ``obj``.

    Returns
    -------
    int
        The tensors' bytes (``numel * element size``), each memory region counted once:
        contiguous views of one buffer by the union of their byte ranges, strided views once
        per distinct view.
    """
    ranges: list[tuple[str, int, int]] = []
    strided: dict[tuple, int] = {}
    seen: set[int] = set()
    todo = [(obj, 0)]
    while todo:
        v, depth = todo.pop()
        if id(v) in seen or isinstance(v, _NOT_WALKED):
            continue
        seen.add(id(v))
        found = _tensor_bytes(v)
        if found is None:
            todo += [(c, depth + 1) for c in _children(v)] if depth < max_depth else []
        elif len(found[0]) == 3:
            ranges.append(found[0])
        elif len(found[0]) == 4:
            strided[found[0]] = found[1]
    return _union_bytes(ranges) + sum(strided.values())


def optimizer_state_bytes(opt: Any) -> int:
    """**The** optimizer state of the benchmarks: :func:`state_bytes` of ``opt.state``.

    Parameters
    ----------
    opt : torch.optim.Optimizer or object
        Anything with a ``state`` mapping (parameter -> its state); no ``state``: 0.

    Returns
    -------
    int
        Bytes of every tensor reachable from ``opt.state``'s values.
    """
    return state_bytes(list(getattr(opt, "state", {}).values()))


# --------------------------------------------------------------------------- reports


def report_log(
    title: str, module: str, argv: list[str] | None, packages: tuple[str, ...], threads: str
) -> tuple[Callable[..., None], list[str]]:
    """A ``log(line="")`` that prints each line and keeps it for the markdown report, started
    with ``# TITLE: `python -m MODULE ARGS` ``, the machine information and ``threads`` (the
    line :func:`pin_threads` returned).

    Returns
    -------
    tuple
        ``(log, lines)``: the function, and the list it appends to.
    """
    lines: list[str] = []

    def log(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    log(f"# {title}: `{command_line(module, argv)}`")
    for line in machine_info(packages).splitlines():
        log(line)
    log(threads)
    return log, lines


def command_line(module: str, argv: list[str] | None = None) -> str:
    """``python -m benchmarks.NAME ARGS`` of this run, for a report (``argv``: the arguments
    given to ``main``; None: ``sys.argv[1:]``)."""
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    return " ".join(["python -m", module, *args])


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


if __name__ == "__main__":
    print(machine_info())
