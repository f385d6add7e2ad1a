r"""Stochastic-style solvers driven by the pure rules of :mod:`rankopt.solvers.rules`.

``RHeavyBall``, ``RAdaGrad``, ``RAdamW``, ``DLRAHeavyBall`` and ``DLRAAdam`` take a fixed learning
rate (optionally a schedule ``lr(k)``) and call the same step functions as the torch
optimizers in :mod:`rankopt.torch`, so a solver run and a torch training loop apply identical
updates to identical data. Cost per iteration: that of the rule (see ``rules``) plus one
gradient evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import rules
from .base import Solver

__all__ = ["RHeavyBall", "RAdaGrad", "RAdamW", "DLRAHeavyBall", "DLRAAdam"]


class _RuleSolver(Solver):
    _init: Callable = staticmethod(rules.rsgd_init)
    _step: Callable = staticmethod(rules.rsgd_step)
    _init_keys: tuple[str, ...] = ()

    def __init__(self, lr: float | Callable[[int], float] = 1e-2, **kw: Any) -> None:
        base = {k: kw.pop(k) for k in list(kw) if k in _SOLVER_KEYS}
        super().__init__(**base)
        if not callable(lr) and not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.lr = lr
        self.init_kw = {k: kw.pop(k) for k in list(kw) if k in self._init_keys}
        self.hyper = kw

    def init(self, problem, manifold, x):
        return [0, self._init(manifold, x, **self.init_kw)]

    def step(self, problem, manifold, x, f, Z, g, st):
        k, state = st
        lr = self.lr(k) if callable(self.lr) else self.lr
        x_new, state = self._step(manifold, x, g, state, lr=lr, **self.hyper)
        return x_new, [k + 1, state], lr


_SOLVER_KEYS = {
    "max_iter",
    "tol",
    "gtol",
    "ftol",
    "patience",
    "target_cost",
    "max_time",
    "min_step",
    "metric",
    "verbose",
    "track_error",
}


class RHeavyBall(_RuleSolver):
    """Riemannian heavy ball / Nesterov (``rules.rsgd_step``): ``RHeavyBall(lr, momentum=0.9)``."""

    name = "RHeavyBall"

    def __init__(self, lr=1e-2, momentum: float = 0.9, **kw: Any) -> None:
        super().__init__(lr, momentum=momentum, **kw)


class RAdaGrad(_RuleSolver):
    """RAdaGrad (``rules.radagrad_step``): ``RAdaGrad(lr, eps=1e-10, exact=True)``."""

    name = "RAdaGrad"
    _init = staticmethod(rules.radagrad_init)
    _step = staticmethod(rules.radagrad_step)
    _init_keys = ("eps", "exact", "cg_tol", "cg_maxiter")


class RAdamW(_RuleSolver):
    """RAdamW (``rules.radamw_step``): ``RAdamW(lr, betas=(0.9, 0.999), weight_decay=0.0)``."""

    name = "RAdamW"
    _init = staticmethod(rules.radamw_init)
    _step = staticmethod(rules.radamw_step)
    _init_keys = ("eps", "exact", "cg_tol", "cg_maxiter")

    def __init__(self, lr=1e-2, weight_decay: float = 0.0, **kw: Any) -> None:
        super().__init__(lr, weight_decay=weight_decay, **kw)


class DLRAHeavyBall(_RuleSolver):
    """Rank-adaptive low-rank heavy ball (``rules.dlra_heavyball_step``)."""

    name = "DLRAHeavyBall"
    _init = staticmethod(rules.dlra_heavyball_init)
    _step = staticmethod(rules.dlra_heavyball_step)


class DLRAAdam(_RuleSolver):
    """Rank-adaptive low-rank Adam (``rules.dlra_adam_step``)."""

    name = "DLRAAdam"
    _init = staticmethod(rules.dlra_adam_init)
    _step = staticmethod(rules.dlra_adam_step)
    _init_keys = ("eps", "exact", "cg_tol", "cg_maxiter")
