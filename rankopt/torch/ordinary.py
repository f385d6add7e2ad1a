r"""torch's own rules for the ordinary (non-low-rank) parameters of a rankopt optimizer.

Every rankopt optimizer moves the low-rank layers with its rule (:mod:`rankopt.rules`) and
every other parameter in the same optimizer with one of torch's functional implementations
(foreach or fused kernels, as torch chooses or as asked), named by the rule's registration
(:mod:`rankopt.rules.registry`): ``"adamw"`` (``torch.optim.AdamW``), ``"adagrad"``
(``torch.optim.Adagrad``) or ``"sgd"`` (``torch.optim.SGD``). An option of that rule with the
name of a field of the rankopt rule takes the same value (``lr``, ``betas``, ``weight_decay``,
``momentum``, ...); the others are the optimizer's own keywords, with torch's defaults (``eps``:
Adam's epsilon, ``initial_accumulator_value``), or fixed by the registration. The update is
exactly torch's (its functional code is called; ``tests/test_torch_optim.py`` compares bitwise).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.adagrad import adagrad as torch_adagrad
from torch.optim.adamw import adamw as torch_adamw
from torch.optim.sgd import sgd as torch_sgd

__all__ = ["OrdinaryRule", "ORDINARY", "torch_default"]


def torch_default(cls: type, name: str) -> Any:
    """The default of a keyword of a ``torch.optim`` optimizer (torch's value, not copied)."""
    return inspect.signature(cls).parameters[name].default


@dataclass(frozen=True)
class OrdinaryRule:
    """One of torch's rules for ordinary parameters.

    Attributes
    ----------
    torch_class : type
        The ``torch.optim`` class (for its defaults and its name in docs).
    keys : tuple of str
        Its options a param group holds, in torch's positional order.
    docs : dict
        What each option means here (for the optimizers' docstrings).
    step : callable
        ``step(optimizer, group, params)``: torch's update of ``params`` with the group's options.
    check : callable or None
        ``check(index, group)``: refusals torch itself would raise, raised before anything moves.
    """

    torch_class: type
    keys: tuple[str, ...]
    docs: dict[str, tuple[str, str]]
    step: Callable[[Any, dict, list], None]
    check: Callable[[int, dict], None] | None = None

    def default(self, key: str) -> Any:
        """torch's default of ``key``."""
        return torch_default(self.torch_class, key)


def _step_tensor(p: torch.Tensor, fused: bool | None) -> torch.Tensor:
    """torch's per-parameter step counter (float32 on the parameter's device when fused)."""
    if fused:
        return torch.zeros((), dtype=torch.float32, device=p.device)
    return torch.tensor(0.0, dtype=torch.float32)


def _adamw(opt: Any, group: dict, params: list) -> None:
    grads, exp_avgs, exp_avg_sqs, steps = [], [], [], []
    fresh = {}  # new entries are stored once torch's update went through
    for p in params:
        st = opt.state.get(p)
        if not st:
            st = fresh[p] = {
                "step": _step_tensor(p, group["fused"]),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
        grads.append(p.grad)
        exp_avgs.append(st["exp_avg"])
        exp_avg_sqs.append(st["exp_avg_sq"])
        steps.append(st["step"])
    beta1, beta2 = group["betas"]
    torch_adamw(
        params, grads, exp_avgs, exp_avg_sqs, [], steps,
        foreach=group["foreach"], fused=group["fused"],
        has_complex=any(torch.is_complex(p) for p in params),
        amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
        weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
    )  # fmt: skip
    for p, st in fresh.items():
        opt.state[p] = st


def _sgd(opt: Any, group: dict, params: list) -> None:
    grads = [p.grad for p in params]
    bufs = [opt.state.get(p, {}).get("momentum_buffer") for p in params]
    torch_sgd(
        params, grads, bufs, foreach=group["foreach"], fused=group["fused"],
        weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
        dampening=group["dampening"], nesterov=group["nesterov"], maximize=False,
    )  # fmt: skip
    for p, b in zip(params, bufs, strict=True):  # an entry per stepped parameter, as torch's
        entry = opt.state[p]
        if group["momentum"] != 0:
            entry["momentum_buffer"] = b


def _adagrad(opt: Any, group: dict, params: list) -> None:
    sums, steps = [], []
    fresh = {}  # new entries are stored once torch's update went through
    for p in params:
        st = opt.state.get(p)
        if not st:
            init = group["initial_accumulator_value"]
            st = fresh[p] = {
                "step": _step_tensor(p, group["fused"]),
                "sum": torch.full_like(p, init, memory_format=torch.preserve_format),
            }
        sums.append(st["sum"])
        steps.append(st["step"])
    torch_adagrad(
        params, [p.grad for p in params], sums, steps, foreach=group["foreach"],
        fused=group["fused"], has_complex=any(torch.is_complex(p) for p in params),
        lr=group["lr"], weight_decay=group["weight_decay"], lr_decay=group["lr_decay"],
        eps=group["eps"], maximize=False,
    )  # fmt: skip
    for p, st in fresh.items():
        opt.state[p] = st


def _check_adamw(index: int, group: dict) -> None:
    if isinstance(group["lr"], torch.Tensor) and group["foreach"] and not group["fused"]:
        raise ValueError(
            f"param group {index}: a tensor lr needs foreach=False (or fused=True) for torch's "
            "AdamW of the ordinary parameters (torch: 'lr as a Tensor is not supported for "
            "capturable=False and foreach=True'); the step was not taken"
        )


_LR = ("float", "Learning rate of both parts.")
_WD = ("float", "Weight decay of the ordinary parameters (torch's).")
_EPS = ("float", "Adam's epsilon of torch's rule for the ordinary parameters.")

#: the rules by their registration name
ORDINARY: dict[str, OrdinaryRule] = {
    "adamw": OrdinaryRule(
        torch.optim.AdamW,
        ("lr", "betas", "eps", "weight_decay"),
        {
            "lr": _LR,
            "betas": ("tuple of float", "AdamW's (beta1, beta2)."),
            "eps": _EPS,
            "weight_decay": _WD,
        },
        _adamw,
        _check_adamw,
    ),  # fmt: skip
    "adagrad": OrdinaryRule(
        torch.optim.Adagrad,
        ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"),
        {
            "lr": _LR,
            "lr_decay": ("float", "Adagrad's lr decay."),
            "weight_decay": _WD,
            "initial_accumulator_value": (
                "float",
                "Adagrad's initial sum of squares of the ordinary parameters.",
            ),
            "eps": ("float", "Adagrad's epsilon of torch's rule for the ordinary parameters."),
        },
        _adagrad,
    ),  # fmt: skip
    "sgd": OrdinaryRule(
        torch.optim.SGD,
        ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
        {
            "lr": _LR,
            "momentum": ("float", "SGD's momentum."),
            "dampening": ("float", "SGD's dampening."),
            "weight_decay": _WD,
            "nesterov": ("bool", "SGD's Nesterov momentum."),
        },
        _sgd,
    ),  # fmt: skip
}
