"""rankopt: Riemannian optimization on the manifold of fixed-rank matrices.

``import rankopt`` loads NumPy/SciPy only: the manifold, its points and the metrics. ``solve``,
the other submodules (``solvers``, ``problems``, ``diagnostics``, ...) load on first use, and
torch, cupy and pymanopt only when their parts of rankopt are used.
"""

import importlib as _importlib

from . import metrics
from .containers import FixedRankPoint, LowRankMatrix, TangentVector
from .manifold import FixedRankManifold

__version__ = "0.1.0"

# Submodules that need only NumPy/SciPy: ``from rankopt import *`` may import them.
_LAZY_SUBMODULES = ("diagnostics", "problems", "solvers", "rules", "data", "starts")
# Submodules that need an optional dependency (torch, pymanopt): listed by ``dir(rankopt)`` and
# loaded on attribute access, never by ``from rankopt import *``.
_OPTIONAL_SUBMODULES = ("pymanopt", "torch")
_LAZY_ATTRS = {
    "solve": ("rankopt.solvers", "solve"),
    "SolverResult": ("rankopt.solvers", "SolverResult"),
    "RankWarning": ("rankopt.solvers", "RankWarning"),
    "ConvergenceWarning": ("rankopt.solvers", "ConvergenceWarning"),
    "locally_optimal_start": ("rankopt.starts", "locally_optimal_start"),
}

__all__ = [
    "FixedRankManifold",
    "FixedRankPoint",
    "LowRankMatrix",
    "TangentVector",
    "metrics",
    *_LAZY_ATTRS,
    *_LAZY_SUBMODULES,
]


def __getattr__(name: str) -> object:
    """Load ``solve``, the solver warnings and the submodules on first access (PEP 562)."""
    if name in _LAZY_SUBMODULES or name in _OPTIONAL_SUBMODULES:
        return _importlib.import_module(f"rankopt.{name}")
    if name in _LAZY_ATTRS:
        module, attr = _LAZY_ATTRS[name]
        return getattr(_importlib.import_module(module), attr)
    raise AttributeError(f"module 'rankopt' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, loaded or not (not the helpers this module imports)."""
    return sorted({*__all__, *_OPTIONAL_SUBMODULES, "__version__", "__doc__", "__name__"})
