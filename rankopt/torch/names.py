"""Module names: PEFT-style matching, every name of a shared module, setting a module by name,
and the full names of a converted model's ``modules_to_save``."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

__all__ = ["matches", "module_names", "set_module", "saved_module_names"]


def matches(name: str, target: Any) -> bool:
    """PEFT-style matching: a list of names matches by suffix at a module boundary; a single
    string or compiled pattern is a regular expression matched against the whole name; None
    matches everything."""
    if target is None:
        return True
    if isinstance(target, re.Pattern):
        return target.fullmatch(name) is not None
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name of every submodule (a module shared by several parents has several)."""
    names: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), []).append(name)
    return names


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` of ``model`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def saved_module_names(model: nn.Module) -> list[str]:
    """Full names of the ``modules_to_save`` recorded by :func:`~rankopt.torch.apply_low_rank`
    (suffix match, outermost module when several nest), e.g. ``["classifier"]``."""
    wanted = (getattr(model, "rankopt_config", None) or {}).get("modules_to_save") or []
    found: list[str] = []
    for name, _ in model.named_modules():
        if (
            name
            and matches(name, list(wanted))
            and not any(name.startswith(f + ".") for f in found)
        ):
            found.append(name)
    return found
