r"""Solvers driven by the update rules of :mod:`rankopt.rules`: one generic solver, and one named
solver per registered rule, generated from its spec.

:class:`RuleSolver` takes a fixed learning rate (or a schedule ``lr(k)`` of the iteration count)
and calls the ``step`` of a rule spec, the same spec the torch optimizers of
:mod:`rankopt.torch` call, so a solver run and a torch training loop apply identical updates to
identical data. Its keywords are the spec's fields (validated by the spec) and the loop's options
(:class:`~rankopt.solvers.base.Solver`). For every registered rule
(:func:`rankopt.rules.registry.register`) :func:`solver_class` generates a named subclass,
``rankopt.solvers.RAdamW`` and so on, with the spec's fields and defaults as its signature and
its docstring from the spec's ``Parameters``; nothing is written per rule here.

What a rule needs besides the tangent gradient (:func:`rankopt.rules.gradient_input`) comes
from the problem's ambient gradient ``Z``: the DLRA rules get ``Q_u^T Z Q_v`` (products with
``Z``, never an m x n array for sparse or factored ``Z``), the reference rules the dense ``Z``
(m x n). Cost per iteration: that of the rule (see :mod:`rankopt.rules`) plus one gradient
evaluation.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any

from .. import rules
from ..containers import LowRankMatrix
from ..rules.registry import (
    Registration,
    field_docs,
    parse_parameters,
    registered,
    registration,
    spec_fields,
)
from .base import Solver

__all__ = [
    "RuleSolver",
    "solver_class",
    "rule_solvers",
    "dense_gradient",
    "LOOP_OPTIONS",
]

#: keyword arguments that belong to the solver loop (see :class:`~rankopt.solvers.base.Solver`)
LOOP_OPTIONS = tuple(
    p.name
    for p in inspect.signature(Solver.__init__).parameters.values()
    if p.kind == p.KEYWORD_ONLY
)


class RuleSolver(Solver):
    """A solver whose step is ``spec.step`` of a rule of :mod:`rankopt.rules`.

    Parameters
    ----------
    rule : rule spec class, spec instance, or registered name
        The rule (``rankopt.rules.RAdamW``, ``rankopt.rules.RAdamW(lr=1e-2)``, ``"RAdamW"`` or
        its method name ``"radamw"``); an instance gives the defaults of its fields.
    lr : float, callable or None
        Learning rate, or a schedule ``lr(k)`` of the iteration count (None: the spec's).
    **options
        The spec's fields and the loop's options (:class:`~rankopt.solvers.base.Solver`).
    """

    name = "RuleSolver"
    #: the spec class (set by :func:`solver_class`; :class:`RuleSolver` takes it as ``rule``)
    spec_class: type | None = None

    def __init__(
        self, rule: Any = None, lr: float | Callable[[int], float] | None = None, **options: Any
    ) -> None:
        base = _base_spec(self.spec_class if rule is None else rule)
        loop = {k: options.pop(k) for k in list(options) if k in LOOP_OPTIONS}
        super().__init__(**loop)
        unknown = sorted(set(options) - {f.name for f in fields(type(base))})
        if unknown:
            raise _unknown(self.name, unknown, type(base))
        self.schedule = lr if callable(lr) else None
        if lr is not None and not callable(lr):
            options["lr"] = lr
        values = {f.name: getattr(base, f.name) for f in fields(type(base))}
        self.spec = type(base)(**{**values, **options})
        if self.schedule is None and not self.spec.lr > 0:
            raise ValueError(f"lr must be positive, got {self.spec.lr}")
        if self.name == "RuleSolver":
            self.name = type(base).__name__

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


def _unknown(name: str, unknown: list[str], spec: type) -> ValueError:
    names = sorted(f.name for f in fields(spec))
    return ValueError(
        f"{name} got unknown options {unknown}; its rule ({spec.__name__}) takes {names} and "
        f"the loop takes {sorted(LOOP_OPTIONS)}"
    )


def _base_spec(rule: Any) -> Any:
    """A spec instance from a spec class, an instance, or a registered name."""
    if rule is None:
        raise TypeError("RuleSolver needs a rule: RuleSolver(rankopt.rules.RAdamW, lr=...)")
    if isinstance(rule, str):
        rule = registration(rule).spec
    if isinstance(rule, type) and issubclass(rule, rules.Rule):
        return rule()
    if isinstance(rule, rules.Rule):
        return rule
    raise TypeError(
        f"rule must be a rule spec (class or instance) or a registered name, got {rule!r}"
    )


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


# ---------------------------------------------------------------------------
# named solvers generated from the registry
# ---------------------------------------------------------------------------

_CLASSES: dict[type, type] = {}


def solver_class(rule: Any) -> type[RuleSolver]:
    """The named solver of a registered rule (spec class, instance or name), generated once.

    Its signature is ``(lr=..., *, <spec fields>, <loop options>)`` with the spec's defaults,
    its docstring the spec's summary and ``Parameters``; ``issubclass`` holds only with
    :class:`RuleSolver` (no solver derives from another)."""
    reg = registration(rule)
    cls = _CLASSES.get(reg.spec)
    if cls is None:
        cls = _CLASSES[reg.spec] = _make(reg)
    return cls


def rule_solvers() -> dict[str, type[RuleSolver]]:
    """``{name: solver class}`` of every registered rule."""
    return {reg.name: solver_class(reg.spec) for reg in registered()}


def _make(reg: Registration) -> type[RuleSolver]:
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for f in spec_fields(reg.spec):
        kind = inspect.Parameter.KEYWORD_ONLY
        if f.name == "lr":
            kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        default = f.default if f.default is not MISSING else inspect.Parameter.empty
        params.append(inspect.Parameter(f.name, kind, default=default))
    loop = inspect.signature(Solver.__init__).parameters
    params += [p for name, p in loop.items() if name in LOOP_OPTIONS]
    signature = inspect.Signature(params)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(signature.parameters))
        if unknown:
            raise _unknown(reg.name, unknown, reg.spec)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        values.pop("self")
        RuleSolver.__init__(self, reg.spec, **values)

    __init__.__signature__ = signature
    __init__.__qualname__ = f"{reg.name}.__init__"
    attrs = {
        "__init__": __init__,
        "__doc__": _docstring(reg),
        "__module__": __name__,
        "__qualname__": reg.name,
        "name": reg.name,
        "spec_class": reg.spec,
    }
    return type(reg.name, (RuleSolver,), attrs)


def _docstring(reg: Registration) -> str:
    docs = field_docs(reg.spec)
    loop = parse_parameters(Solver.__doc__ or "")
    head = (
        f"The NumPy solver of the rule :class:`rankopt.rules.{reg.spec.__name__}` "
        f"(``rankopt.solve(..., method={reg.method!r})``), generated from its spec: a "
        ":class:`RuleSolver` with the spec's fields as keywords."
    )
    lines = [reg.summary, "", *textwrap.wrap(head, 92), "", "Parameters", "----------"]
    for f in spec_fields(reg.spec):
        kind, text = docs[f.name]
        lines += [f"{f.name} : {kind}", *_indent(f"{text} Default: ``{f.default!r}``.")]
    for name in LOOP_OPTIONS:
        kind, text = loop.get(name, ("", "See :class:`~rankopt.solvers.base.Solver`."))
        lines += [f"{name} : {kind}" if kind else name, *_indent(text)]
    return "\n".join(lines) + "\n"


def _indent(text: str) -> list[str]:
    return textwrap.wrap(text, 88, initial_indent="    ", subsequent_indent="    ")


def __getattr__(name: str) -> Any:
    """``RAdamW``, ``DLRAAdam`` and every other registered rule's solver (PEP 562)."""
    if any(reg.name == name for reg in registered()):
        return solver_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
