r"""Param-group checks (hyperparameters, rank options) and defaults of the torch optimizers.

They read Python numbers only (microseconds, no device synchronization) and run when a group is
added and before every step, so that an invalid value set in ``param_groups`` after construction
is refused before anything moves.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

import torch

from ..rules import Rule
from ..rules.registry import Registration
from .ordinary import ORDINARY
from .stacks import Layer

__all__ = [
    "COMMON_OPTIONS",
    "optimizer_defaults",
    "check_group",
    "check_rank_options",
    "check_rank_budget",
    "rank_budget",
    "describe",
    "lr_text",
]

#: options every rankopt optimizer takes besides its rule's and its ordinary rule's, and their
#: defaults (``check_finite`` is a constructor argument, not a param-group option)
COMMON_OPTIONS = {"foreach": None, "fused": None, "stack_layers": True, "compile": False}


#: param-group options that must be finite numbers >= 0, and those that must be > 0
_AT_LEAST_ZERO = ("weight_decay", "momentum", "lr_decay", "initial_accumulator_value")
_ABOVE_ZERO = ("eps", "metric_eps")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bad_option(index: int, name: str, value: Any, need: str) -> ValueError:
    return ValueError(
        f"param group {index}: invalid {name}={value!r}: {need}; the step was not taken"
    )


def check_group(index: int, group: dict) -> None:
    """Refuse an invalid hyperparameter of the param group ``index`` (``ValueError`` naming the
    group, the option and its value).

    Reads Python numbers only (microseconds, no device synchronization): ``lr`` a finite number
    >= 0 or a 0-d floating-point tensor (whose value the finite check reads), ``weight_decay``,
    ``momentum``, ``lr_decay``, ``initial_accumulator_value`` finite and >= 0, ``eps``,
    ``metric_eps`` finite and > 0, ``dampening`` in [0, 1], ``betas`` two numbers
    in [0, 1), ``nesterov`` a bool. The rule spec checks its other options when they change.
    """
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.ndim != 0 or not lr.is_floating_point():
            raise _bad_option(index, "lr", lr, "a tensor learning rate must be 0-d floating-point")
    elif not (_is_number(lr) and 0 <= lr < math.inf):
        raise ValueError(
            f"param group {index}: invalid learning rate lr={lr!r}: must be a finite number >= 0 "
            "(or a 0-d tensor); the step was not taken"
        )
    for name in _AT_LEAST_ZERO:
        v = group.get(name, 0.0)
        if not (_is_number(v) and 0 <= v < math.inf):
            raise _bad_option(index, name, v, "must be a finite number >= 0")
    for name in _ABOVE_ZERO:
        v = group.get(name, 1.0)
        if not (_is_number(v) and 0 < v < math.inf):
            raise _bad_option(index, name, v, "must be a finite number > 0")
    v = group.get("dampening", 0.0)
    if not (_is_number(v) and 0 <= v <= 1):
        raise _bad_option(index, "dampening", v, "must be in [0, 1] (above 1 reverses the step)")
    v = group.get("betas", (0.0, 0.0))
    if not (
        isinstance(v, (tuple, list))
        and len(v) == 2
        and all(_is_number(b) and 0 <= b < 1 for b in v)
    ):
        raise _bad_option(index, "betas", v, "two numbers, each in [0, 1)")
    if not isinstance(group.get("nesterov", False), bool):
        raise _bad_option(index, "nesterov", group["nesterov"], "must be True or False")


def describe(L: Layer) -> str:
    """``"m x n of rank r"`` of a low-rank layer (for messages)."""
    return f"{L.U.shape[0]} x {L.V.shape[0]} of rank {L.U.shape[1]}"


def lr_text(lr: Any) -> str:
    """A learning rate for a message (a tensor's value read)."""
    return f"{lr.item()!r} (a tensor)" if isinstance(lr, torch.Tensor) else repr(lr)


def check_rank_options(spec: Rule, index: Any, owner: str) -> None:
    """Refuse rank options that the rule would ignore (checked once per spec); ``owner`` names
    the optimizer in the message. How the options act is the spec's ``rank_semantics``."""
    if spec.rank_semantics == "budget":  # DLRA: min_rank / max_rank act even without rank_tol
        return
    unused, why = [], ""
    if spec.rank_tol is None:
        unused = [f"min_rank={spec.min_rank!r}"] if spec.min_rank != 1 else []
        unused += [f"max_rank={spec.max_rank!r}"] if spec.max_rank is not None else []
        why = "without rank_tol the rank is fixed (set rank_tol, e.g. 1e-3, to adapt it)"
    elif spec.rank_semantics == "truncation":
        if spec.max_rank is not None:
            unused, why = [f"max_rank={spec.max_rank!r}"], "these rules never raise the rank"
        if getattr(spec, "faithful", False) and spec.min_rank != 1:
            unused += [f"min_rank={spec.min_rank!r}"]
            why = "faithful=True keeps the authors' smallest rank, 2"
    if unused:
        raise ValueError(
            f"param group {index}: {', '.join(unused)} would be ignored by {owner}: {why}"
        )


def check_rank_budget(spec: Rule, index: int, layers: list[Layer], state: Any, owner: str) -> None:
    """Refuse a ``min_rank`` above the rank budget of layers of one shape and rank (which the
    rule would silently clip). Python integers; a budget is only looked up (for DLRA a host
    read of the saved budget in the optimizer ``state``) when ``min_rank`` exceeds the layers'
    rank."""
    r = layers[0].U.shape[1]
    if spec.min_rank <= r:  # every budget is at least the rank, or min_rank <= max_rank
        return
    m, n = layers[0].U.shape[0], layers[0].V.shape[0]
    for L in layers:
        budget, why = rank_budget(spec, L, min(m, n), r, state)
        if budget is not None and spec.min_rank > budget:
            hint = " or set max_rank" if spec.rank_semantics == "budget" else ""
            raise ValueError(
                f"param group {index}: min_rank={spec.min_rank} is above the rank budget of "
                f"the low-rank layer {describe(L)}: {owner} keeps its rank "
                f"at most {budget} ({why}); lower min_rank{hint}"
            )


def rank_budget(spec: Rule, L: Layer, mn: int, r: int, state: Any) -> tuple[int | None, str]:
    """The largest rank the rule may give a layer of rank ``r`` (``mn = min(m, n)``), and
    why; None where ``min_rank`` does not act."""
    if spec.rank_semantics == "budget":
        if spec.max_rank is not None:
            return min(mn, spec.max_rank), "min(m, n, max_rank)"
        cap = (state.get(L.U) or {}).get("rank_cap")
        cap = r if cap is None else round(float(cap))
        return min(mn, cap), f"max_rank=None: its starting rank {cap} is its budget"
    if spec.rank_tol is None:
        return None, ""
    if spec.rank_semantics == "truncation":
        return (None if getattr(spec, "faithful", False) else r), "the rank never grows"
    return mn, "min(m, n)"


def optimizer_defaults(reg: Registration, base: Rule | None, options: dict) -> dict:
    """The param-group defaults of an optimizer with the rule ``reg``: the spec's fields (from
    ``options``, else from the instance ``base``, else the spec's defaults), the ordinary rule's
    options (shared by name with the spec, fixed by the registration, or from ``options`` with
    torch's default) and :data:`COMMON_OPTIONS`. Raises ``TypeError`` naming unknown options."""
    options = dict(options)
    spec_values = {f.name: getattr(base, f.name) if base is not None else f.default
                   for f in fields(reg.spec)}  # fmt: skip
    defaults = {k: options.pop(k, v) for k, v in spec_values.items()}
    ordinary = ORDINARY[reg.ordinary]
    for key in ordinary.keys:
        if key in defaults:
            continue
        if key in reg.ordinary_fixed:
            defaults[key] = reg.ordinary_fixed[key]
        else:
            defaults[key] = options.pop(key, ordinary.default(key))
    defaults.update({k: options.pop(k, v) for k, v in COMMON_OPTIONS.items()})
    if options:
        known = sorted(defaults)
        raise TypeError(f"{reg.name} got unknown options {sorted(options)}; it takes {known}")
    if isinstance(defaults.get("betas"), list):
        defaults["betas"] = tuple(defaults["betas"])
    return defaults
