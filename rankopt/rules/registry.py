r"""The rule registry: one registration per rule, from which every front end is derived.

A rule is declared once, as a frozen spec (:class:`~rankopt.rules.base.Rule`: its
hyperparameters with their defaults and numpydoc ``Parameters`` docs, ``init`` and ``step``),
and registered once::

    @register(method="radamw", ordinary="adamw")
    @dataclass(frozen=True, kw_only=True)
    class RAdamW(AdaptiveRule):
        ...

From the registration come, with no further code: the NumPy solver (``rankopt.solvers.RAdamW``,
a :class:`~rankopt.solvers.RuleSolver` whose keywords are the spec's fields and the solver loop's
options), the ``rankopt.solve`` method name (``"radamw"``) and the torch optimizer
(``rankopt.torch.RAdamW``, a :class:`~rankopt.torch.RiemannianOptimizer` whose signature,
defaults and docstring are the spec's fields plus the options of the torch rule that moves the
model's ordinary parameters). The registry stores names and strings only: it imports neither the
solvers nor torch, which read it (the layers depend downwards only).

What a registration names
-------------------------
``name``
    The class name in every front end (default: the spec class's name).
``method``
    ``rankopt.solve``'s method name (lower case, ``-`` separated).
``ordinary``
    The ``torch.optim`` rule of the ordinary (non-low-rank) parameters in the same optimizer:
    ``"adamw"``, ``"adagrad"`` or ``"sgd"``. Options of that rule that the spec shares by name
    (``lr``, ``betas``, ``weight_decay``, ``momentum``, ...) take the spec's value; the others are
    the optimizer's own keywords (``eps`` of AdamW/Adagrad: Adam's epsilon) or fixed
    (``ordinary_fixed``).
``ordinary_fixed``
    Options of the ordinary rule fixed for this optimizer (not keywords), e.g. SGD without
    momentum for a rule that has none.
``namespace``
    ``""``, or ``"reference"`` for the reproductions of published code (their rules live in
    :mod:`rankopt.rules.reference`, their optimizers also in :mod:`rankopt.torch.reference`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "Registration",
    "register",
    "unregister",
    "registered",
    "registration",
    "field_docs",
    "spec_fields",
    "parse_parameters",
    "ORDINARY_RULES",
]

#: the torch rules that can move ordinary parameters next to a registered rule
ORDINARY_RULES = ("adamw", "adagrad", "sgd")

_METHOD = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


@dataclass(frozen=True)
class Registration:
    """What the front ends need to know about a rule besides its spec (see the module
    docstring)."""

    spec: type
    name: str
    method: str
    ordinary: str
    ordinary_fixed: Mapping[str, Any] = field(default_factory=dict)
    namespace: str = ""

    @property
    def summary(self) -> str:
        """The first line of the spec's docstring."""
        return (self.spec.__doc__ or self.name).strip().splitlines()[0].strip()


_REGISTRY: dict[str, Registration] = {}


def register(
    spec: type | None = None,
    *,
    method: str,
    ordinary: str,
    name: str | None = None,
    ordinary_fixed: Mapping[str, Any] | None = None,
    namespace: str = "",
) -> Any:
    """Register a rule spec (usable as a class decorator); returns the spec unchanged.

    Raises ``ValueError`` for a name or method already registered to another spec, a method name
    that is not lower case and ``-`` separated, an unknown ``ordinary`` rule, or a spec field
    without documentation (every field needs an entry in a numpydoc ``Parameters`` section of
    the spec or one of its bases: the front ends' docstrings are built from them).
    """

    def wrap(cls: type) -> type:
        reg = Registration(
            cls, name or cls.__name__, method, ordinary, dict(ordinary_fixed or {}), namespace
        )
        _check(reg)
        _REGISTRY[reg.name] = reg
        return cls

    return wrap if spec is None else wrap(spec)


def _check(reg: Registration) -> None:
    if not _METHOD.match(reg.method):
        raise ValueError(f"method name {reg.method!r}: lower case words joined by '-'")
    if reg.ordinary not in ORDINARY_RULES:
        raise ValueError(f"ordinary={reg.ordinary!r}: one of {ORDINARY_RULES}")
    for other in _REGISTRY.values():
        if other.spec is reg.spec or other.name == reg.name:
            continue
        if other.method == reg.method:
            raise ValueError(f"method {reg.method!r} is already registered for {other.name}")
    missing = [f.name for f in fields(reg.spec) if f.name not in field_docs(reg.spec)]
    if missing:
        raise ValueError(
            f"{reg.spec.__name__}: fields {missing} have no documentation: add them to the "
            "'Parameters' section of its docstring (the front ends' docs are built from it)"
        )


def unregister(name: str) -> None:
    """Remove a registration (for rules registered by tests or experiments)."""
    _REGISTRY.pop(name, None)


def registered(namespace: str | None = None) -> tuple[Registration, ...]:
    """Every registration, in registration order (only ``namespace``'s when given)."""
    regs = tuple(_REGISTRY.values())
    return regs if namespace is None else tuple(r for r in regs if r.namespace == namespace)


def registration(key: Any) -> Registration:
    """The registration of a spec class, a spec instance, a class name or a method name."""
    for reg in _REGISTRY.values():
        if key in (reg.name, reg.method) or key is reg.spec or type(key) is reg.spec:
            return reg
    names = sorted(r.name for r in _REGISTRY.values())
    raise ValueError(f"no registered rule {key!r}; registered: {names}")


def spec_fields(spec: type) -> list:
    """The dataclass fields of a spec in the order front ends list them: ``lr`` first, then each
    class's own fields from the spec to its bases (the rank options of :class:`Rule` last)."""

    def owner(f) -> int:
        return next(
            i for i, c in enumerate(spec.__mro__) if f.name in vars(c).get("__annotations__", {})
        )

    return sorted(fields(spec), key=lambda f: (f.name != "lr", owner(f)))


def field_docs(spec: type) -> dict[str, tuple[str, str]]:
    """``{field: (type, description)}`` from the numpydoc ``Parameters`` sections of ``spec``
    and its bases (the most derived class's entry wins). O(length of the docstrings)."""
    out: dict[str, tuple[str, str]] = {}
    for cls in reversed(spec.__mro__):
        out.update(parse_parameters(cls.__dict__.get("__doc__") or ""))
    return out


def parse_parameters(doc: str) -> dict[str, tuple[str, str]]:
    """The entries of a numpydoc ``Parameters`` section: ``{name: (type, description)}``."""
    lines = _dedent(doc).splitlines()
    try:
        start = next(i for i, ln in enumerate(lines[:-1]) if ln.strip() == "Parameters"
                     and set(lines[i + 1].strip()) == {"-"})  # fmt: skip
    except StopIteration:
        return {}
    out: dict[str, tuple[str, str]] = {}
    name = kind = None
    text: list[str] = []
    for ln in lines[start + 2 :]:
        if ln.strip() and not ln.startswith(" "):
            if _is_heading(ln, lines):
                break
            if name is not None:
                out[name] = (kind, " ".join(text))
            head, _, kind = ln.partition(" : ")
            name, kind, text = head.strip(), kind.strip(), []
        elif ln.strip():
            text.append(ln.strip())
    if name is not None:
        out[name] = (kind, " ".join(text))
    return out


def _is_heading(line: str, lines: list[str]) -> bool:
    i = lines.index(line)
    return i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"} and " : " not in line


def _dedent(doc: str) -> str:
    import inspect

    return inspect.cleandoc(doc)
