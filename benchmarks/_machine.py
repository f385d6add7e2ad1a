"""Machine description printed at the top of every benchmark.

CPU model, cores, memory, load average, BLAS threads and library versions: timings are only
comparable between runs with the same header.

Run ``python benchmarks/_machine.py`` to print it alone.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import sys


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


def machine_info(
    packages: tuple[str, ...] = ("numpy", "scipy", "torch", "pymanopt", "rankopt"),
) -> str:
    """A few lines describing this machine and the library versions, for benchmark headers."""
    try:
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "n/a"
    mem = _memory_gib()
    threads_env = {
        k: os.environ[k]
        for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")
        if k in os.environ
    }
    lines = [
        f"CPU: {_cpu_model()}; {os.cpu_count()} logical cores"
        + (f"; {mem:.1f} GiB RAM" if mem is not None else ""),
        f"OS: {platform.platform()}; Python {sys.version.split()[0]}",
        f"load average (1, 5, 15 min): {load}",
        f"BLAS: {_blas()}" + (f"; env {threads_env}" if threads_env else ""),
        "versions: " + ", ".join(f"{p} {_version(p)}" for p in packages),
    ]
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        lines.append(
            f"torch: {torch.get_num_threads()} intra-op threads; CUDA {torch.cuda.is_available()}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(machine_info())
