r"""``torch.optim`` optimizers for models with rankopt low-rank layers, one per registered rule.

Each optimizer treats the ``U``, ``S``, ``V`` factors of one low-rank layer as one point
``X = U diag(s) V^T`` of the fixed-rank manifold and moves it with a rule of :mod:`rankopt.rules`
(the same spec the NumPy solvers use: one implementation, one set of defaults), reading the
tangent vector ``P_X(G) = (S.grad, U.grad, V.grad)`` that the layers' backward leaves. Every other
parameter in the same optimizer gets torch's rule named by the rule's registration
(:mod:`rankopt.torch.ordinary`), computed by torch's own functional implementation.

The named optimizers are not written here: :func:`optimizer_class` generates each from its
rule's registration (:mod:`rankopt.rules.registry`) as a subclass of
:class:`~rankopt.torch.RiemannianOptimizer` with the rule's fields, the ordinary rule's own
options and the common options as its signature, the spec's defaults as its defaults, and its
docstring from the spec's ``Parameters``. No optimizer derives from another (``issubclass``
holds only with :class:`~rankopt.torch.RiemannianOptimizer`):

==================  ========================================  ======================
optimizer           low-rank layers                           ordinary parameters
==================  ========================================  ======================
RSGD                :class:`rankopt.rules.RSGD`               ``torch.optim.SGD``
RHeavyBall          :class:`rankopt.rules.RHeavyBall`         ``torch.optim.SGD``
RAdaGrad            :class:`rankopt.rules.RAdaGrad`           ``torch.optim.Adagrad``
RAdamW              :class:`rankopt.rules.RAdamW`             ``torch.optim.AdamW``
RAdamWElementwise   :class:`rankopt.rules.RAdamWElementwise`  ``torch.optim.AdamW``
DLRAHeavyBall       :class:`rankopt.rules.DLRAHeavyBall`      ``torch.optim.SGD``
DLRAAdam            :class:`rankopt.rules.DLRAAdam`           ``torch.optim.AdamW``
ReferenceRAdamW     :class:`rankopt.rules.ReferenceRAdamW`    ``torch.optim.AdamW``
ReferenceRAdaGrad   :class:`rankopt.rules.ReferenceRAdaGrad`  ``torch.optim.SGD``
==================  ========================================  ======================

One meaning per keyword: a keyword that is a field of the rule means the rule's option (and,
where torch's rule has an option of that name, the same value applies to the ordinary
parameters: ``lr``, ``betas``, ``weight_decay``, ``momentum``, ...); ``metric_eps`` is the floor
of a rule's metric or second moment; ``eps`` is Adam's (Adagrad's) epsilon of torch's rule for
the ordinary parameters (and the authors' RAdamW's, which applies one AdamW to everything).
Manifold math runs in the factors' dtype when it is float32/float64, else in float32 (keep the
factors in float32 and use autocast for bf16/fp16 compute). Cost per layer and step:
O((m + n) r^2 + r^3) for the rules with O((m + n) r) state.
"""

from __future__ import annotations

import inspect
import textwrap
from typing import Any

from ..rules.registry import Registration, field_docs, registered, registration, spec_fields
from .optimizer import COMMON_OPTIONS, RiemannianOptimizer
from .ordinary import ORDINARY
from .plain import allow_plain_optimizers

__all__ = [
    "RiemannianOptimizer",
    "optimizer_class",
    "rule_optimizers",
    "allow_plain_optimizers",
]

_CLASSES: dict[type, type] = {}

#: the common options' docs (the constructor's, beyond the rule's and torch's)
_COMMON_DOCS = {
    "foreach": ("bool or None", "torch's foreach kernels for the ordinary parameters."),
    "fused": ("bool or None", "torch's fused kernels for the ordinary parameters."),
    "stack_layers": ("bool", "Stack same-shape layers into one call of the rule (False: each "
                     "layer alone, the same results to rounding)."),
    "compile": ("bool, str or dict", "``torch.compile`` each stack's fixed-rank rule step "
                "(see :class:`~rankopt.torch.RiemannianOptimizer`)."),
    "check_finite": ("bool", "One host read per step: refuse non-finite gradients and updates "
                     "before anything moves."),
}  # fmt: skip


def optimizer_class(rule: Any) -> type[RiemannianOptimizer]:
    """The named torch optimizer of a registered rule (spec class, instance or name), generated
    once per rule (see the module docstring)."""
    reg = registration(rule)
    cls = _CLASSES.get(reg.spec)
    if cls is None:
        cls = _CLASSES[reg.spec] = _make(reg)
    return cls


def rule_optimizers() -> dict[str, type[RiemannianOptimizer]]:
    """``{name: optimizer class}`` of every registered rule."""
    return {reg.name: optimizer_class(reg.spec) for reg in registered()}


def exposed_keys(reg: Registration) -> tuple[list[str], list[str]]:
    """``(positional, keyword-only)`` keyword names of the optimizer of ``reg`` (after
    ``params``): torch's positional order for its rule's options that are exposed (shared with
    the spec or the optimizer's own), then the spec's other fields, the other own options and
    the common options."""
    ordinary = ORDINARY[reg.ordinary]
    names = [f.name for f in spec_fields(reg.spec)]
    own = [k for k in ordinary.keys if k not in names and k not in reg.ordinary_fixed]
    positional = [k for k in ordinary.keys if k in names or k in own]
    rest = [k for k in names if k not in positional] + [k for k in own if k not in positional]
    return positional, rest + [*COMMON_OPTIONS, "check_finite"]


def _signature(reg: Registration) -> inspect.Signature:
    positional, keyword = exposed_keys(reg)
    spec_defaults = {f.name: f.default for f in spec_fields(reg.spec)}
    ordinary = ORDINARY[reg.ordinary]

    def default(k: str) -> Any:
        if k in spec_defaults:
            return spec_defaults[k]
        if k in COMMON_OPTIONS:
            return COMMON_OPTIONS[k]
        return True if k == "check_finite" else ordinary.default(k)

    P = inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD), P("params", P.POSITIONAL_OR_KEYWORD)]
    params += [P(k, P.POSITIONAL_OR_KEYWORD, default=default(k)) for k in positional]
    params += [P(k, P.KEYWORD_ONLY, default=default(k)) for k in keyword]
    return inspect.Signature(params)


def _make(reg: Registration) -> type[RiemannianOptimizer]:
    signature = _signature(reg)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(signature.parameters))
        if unknown:
            known = list(signature.parameters)[2:]
            raise TypeError(f"{reg.name} got unknown options {unknown}; it takes {known}")
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        values.pop("self")
        params = values.pop("params")
        check = values.pop("check_finite")
        RiemannianOptimizer.__init__(self, params, reg.spec, check_finite=check, **values)

    __init__.__signature__ = signature
    __init__.__qualname__ = f"{reg.name}.__init__"
    attrs = {
        "__init__": __init__,
        "__doc__": _docstring(reg),
        "__module__": __name__,
        "__qualname__": reg.name,
        "spec_class": reg.spec,
    }
    return type(reg.name, (RiemannianOptimizer,), attrs)


def _docstring(reg: Registration) -> str:
    ordinary = ORDINARY[reg.ordinary]
    docs = field_docs(reg.spec)
    shared = [k for k in ordinary.keys if k in docs]
    fixed = ", ".join(f"``{k}={v!r}``" for k, v in reg.ordinary_fixed.items())
    torch_name = f"torch.optim.{ordinary.torch_class.__name__}"
    text = (
        f"Low-rank layers: the rule :class:`rankopt.rules.{reg.spec.__name__}` (its docstring "
        f"says what a step computes). Ordinary parameters: ``{torch_name}``"
        + (f" with the rule's {', '.join(f'``{k}``' for k in shared)}" if shared else "")
        + (f" and {fixed}" if fixed else "")
        + ". Generated from the rule's registration (:mod:`rankopt.rules.registry`)."
    )
    lines = [reg.summary, "", *textwrap.wrap(text, 92), "", "Parameters", "----------"]
    lines += ["params : iterable", "    Parameters or param-group dicts (low-rank factors and "
              "ordinary parameters)."]  # fmt: skip
    positional, keyword = exposed_keys(reg)
    for k in positional + keyword:
        kind, about = docs.get(k) or ordinary.docs.get(k) or _COMMON_DOCS[k]
        if k in docs and k in ordinary.docs:
            about += f" The same value for torch's {ordinary.torch_class.__name__}."
        lines += [f"{k} : {kind}", *textwrap.wrap(about, 88, initial_indent="    ",
                                                  subsequent_indent="    ")]  # fmt: skip
    return "\n".join(lines) + "\n"


def __getattr__(name: str) -> Any:
    """``RAdamW``, ``DLRAAdam`` and every other registered rule's optimizer (PEP 562)."""
    if any(reg.name == name for reg in registered()):
        return optimizer_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
