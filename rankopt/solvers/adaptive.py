r"""Stochastic-style solvers driven by the update rules of :mod:`rankopt.rules`.

``RHeavyBall``, ``RAdaGrad``, ``RAdamW``, ``RAdamWElementwise``, ``DLRAHeavyBall``,
``DLRAAdam``, ``ReferenceRAdamW`` and ``ReferenceRAdaGrad`` take a fixed learning rate
(optionally a schedule ``lr(k)``) and call the ``step`` of the same rule spec as the torch
optimizers in :mod:`rankopt.torch`, so a solver run and a torch training loop apply identical
updates to identical data. Every hyperparameter (and its default) is the spec's: a solver passes
its keyword arguments to the spec, which validates them. What a rule needs besides the tangent
gradient (:func:`rankopt.rules.gradient_input`) comes from the problem's ambient gradient ``Z``:
the DLRA rules get ``Q_u^T Z Q_v`` (products with ``Z``, never an m x n array for sparse or
factored ``Z``), the reference rules the dense ``Z`` (m x n). Cost per iteration: that of the
rule (see :mod:`rankopt.rules`) plus one gradient evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

from .. import rules
from ..containers import LowRankMatrix
from .base import Solver

__all__ = [
    "RHeavyBall",
    "RAdaGrad",
    "RAdamW",
    "RAdamWElementwise",
    "DLRAHeavyBall",
    "DLRAAdam",
    "ReferenceRAdamW",
    "ReferenceRAdaGrad",
    "dense_gradient",
]

#: keyword arguments that belong to the solver loop (see :class:`~rankopt.solvers.base.Solver`)
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


class _RuleSolver(Solver):
    """A solver whose step is ``spec.step`` of a rule of :mod:`rankopt.rules`.

    ``lr`` may be a number or a schedule ``lr(k)`` of the iteration count; every other keyword
    that is not a loop option is a field of the rule's spec.
    """

    spec_class: type = rules.RSGD

    def __init__(self, lr: float | Callable[[int], float] | None = None, **kw: Any) -> None:
        loop = {k: kw.pop(k) for k in list(kw) if k in _SOLVER_KEYS}
        super().__init__(**loop)
        names = {f.name for f in fields(self.spec_class)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise ValueError(
                f"{type(self).__name__} got unknown options {unknown}; its rule "
                f"({self.spec_class.__name__}) takes {sorted(names)} and the loop takes "
                f"{sorted(_SOLVER_KEYS)}"
            )
        if callable(lr):
            self.schedule = lr
        else:
            self.schedule = None
            if lr is not None:
                kw["lr"] = lr
        self.spec = self.spec_class(**kw)
        if self.schedule is None and not self.spec.lr > 0:
            raise ValueError(f"lr must be positive, got {self.spec.lr}")

    @property
    def lr(self) -> Any:
        return self.schedule if self.schedule is not None else self.spec.lr

    def init(self, problem, manifold, x):
        return [0, self.spec.init(manifold, x)]

    def step(self, problem, manifold, x, f, Z, g, st):
        k, state = st
        lr = self.schedule(k) if self.schedule is not None else self.spec.lr
        kind = rules.gradient_input(self.spec)
        extra: dict[str, Any] = {}
        if kind == "normal":
            extra["normal"] = rules.normal_block_of(manifold, Z)
        elif kind == "dense":
            extra["egrad"] = dense_gradient(manifold, Z)
        x_new, state = self.spec.step(manifold, x, g, state, lr=lr, **extra)
        return x_new, [k + 1, state], lr


def dense_gradient(manifold, Z: Any) -> Any:
    """The ambient gradient ``Z`` (dense, sparse, factored or a tuple of those) as a dense m x n
    array of the manifold's backend. O(m n) memory; O(m n k) for a factored ``Z`` of rank k."""
    if isinstance(Z, tuple):
        out = dense_gradient(manifold, Z[0])
        for t in Z[1:]:
            out = out + dense_gradient(manifold, t)
        return out
    if isinstance(Z, LowRankMatrix):
        return Z.to_dense()
    if manifold.backend.is_sparse(Z):
        return Z.toarray() if hasattr(Z, "toarray") else Z.to_dense()
    return Z


class RHeavyBall(_RuleSolver):
    """Riemannian heavy ball / Nesterov (:class:`rankopt.rules.RHeavyBall`)."""

    name = "RHeavyBall"
    spec_class = rules.RHeavyBall


class RAdaGrad(_RuleSolver):
    """RAdaGrad (:class:`rankopt.rules.RAdaGrad`)."""

    name = "RAdaGrad"
    spec_class = rules.RAdaGrad


class RAdamW(_RuleSolver):
    """RAdamW (:class:`rankopt.rules.RAdamW`)."""

    name = "RAdamW"
    spec_class = rules.RAdamW


class RAdamWElementwise(_RuleSolver):
    """RAdamW under the elementwise Adam metric, m x n state (:class:`rankopt.rules.RAdamWElementwise`)."""

    name = "RAdamWElementwise"
    spec_class = rules.RAdamWElementwise


class ReferenceRAdamW(_RuleSolver):
    """The authors' RAdamW, dense m x n moments (:class:`rankopt.rules.ReferenceRAdamW`)."""

    name = "ReferenceRAdamW"
    spec_class = rules.ReferenceRAdamW


class ReferenceRAdaGrad(_RuleSolver):
    """The authors' RAdaGrad, dense gradient per step (:class:`rankopt.rules.ReferenceRAdaGrad`)."""

    name = "ReferenceRAdaGrad"
    spec_class = rules.ReferenceRAdaGrad


class DLRAHeavyBall(_RuleSolver):
    """Rank-adaptive heavy ball by the augmented BUG integrator (:class:`rankopt.rules.DLRAHeavyBall`)."""

    name = "DLRAHeavyBall"
    spec_class = rules.DLRAHeavyBall


class DLRAAdam(_RuleSolver):
    """Rank-adaptive Adam by the augmented BUG integrator (:class:`rankopt.rules.DLRAAdam`)."""

    name = "DLRAAdam"
    spec_class = rules.DLRAAdam
