"""rankopt: Riemannian optimization on the manifold of fixed-rank matrices.

``import rankopt`` loads NumPy/SciPy only; torch, cupy and pymanopt load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import metrics
from .containers import FixedRankPoint, LowRankMatrix, TangentVector
from .manifold import FixedRankManifold

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("diagnostics", "problems", "solvers", "pymanopt", "torch", "data")
_LAZY_ATTRS = {
    "solve": ("rankopt.solvers", "solve"),
    "SolverResult": ("rankopt.solvers", "SolverResult"),
    "RankWarning": ("rankopt.solvers", "RankWarning"),
    "ConvergenceWarning": ("rankopt.solvers", "ConvergenceWarning"),
}

__all__ = [
    "FixedRankManifold",
    "FixedRankPoint",
    "LowRankMatrix",
    "TangentVector",
    "metrics",
    "solve",
    "RankWarning",
    "ConvergenceWarning",
    *_LAZY_SUBMODULES,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"rankopt.{name}")
    if name in _LAZY_ATTRS:
        mod, attr = _LAZY_ATTRS[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'rankopt' has no attribute {name!r}")
