r"""Plain ``torch.optim`` optimizers and manifold parameters.

A manifold parameter's ``.grad`` is a tangent-space piece, not the Euclidean gradient of that
factor, so a plain optimizer would neither descend the loss nor keep ``U``, ``V`` orthonormal.
Importing :mod:`rankopt.torch` registers a global ``torch.optim`` step pre-hook that raises a
``ValueError`` the first time any other ``torch.optim.Optimizer`` subclass steps with a
manifold parameter that requires grad (checked once per optimizer and parameter count). Not
detectable: hand-written update loops, torch's functional optimizer calls, and optimizers that
do not subclass ``torch.optim.Optimizer``. :func:`allow_plain_optimizers` turns the check off.
"""

from __future__ import annotations

import weakref

from torch.optim.optimizer import register_optimizer_step_pre_hook

from .layers import ManifoldParameter

__all__ = ["allow_plain_optimizers"]

_GUARD = {"enabled": True}
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def allow_plain_optimizers(allow: bool = True) -> None:
    """Turn off (``allow=True``) or on the check for manifold parameters in plain optimizers."""
    _GUARD["enabled"] = not allow


def _guard_hook(optimizer, args, kwargs) -> None:
    if not _GUARD["enabled"] or getattr(optimizer, "_rankopt_riemannian", False):
        return
    count = sum(len(g["params"]) for g in optimizer.param_groups)
    if _CHECKED.get(optimizer) == count:
        return
    for g in optimizer.param_groups:
        for p in g["params"]:
            if isinstance(p, ManifoldParameter) and p.requires_grad:
                raise ValueError(
                    f"{type(optimizer).__name__} got the factor {p.role!r} {tuple(p.shape)} of a "
                    "rankopt low-rank layer. Its .grad holds a tangent-space piece of the weight "
                    "gradient, not the Euclidean gradient of the factor, so a plain torch optimizer "
                    "would not minimize the loss and would break the orthonormality of U and V. "
                    "Use a rankopt.torch optimizer (RAdamW, RAdaGrad, RSGD, DLRAAdam, ...: they "
                    "apply AdamW / Adagrad / SGD to all other parameters), or leave the factors out "
                    "(rankopt.torch.ordinary_parameters(model)). "
                    "rankopt.torch.allow_plain_optimizers() disables this check."
                )
    _CHECKED[optimizer] = count


_HOOK_HANDLE = register_optimizer_step_pre_hook(_guard_hook)
