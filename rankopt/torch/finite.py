r"""The finite check of a step: one host read over gradients, learning rates and results.

``plan`` and ``updates`` are those of :class:`rankopt.torch.RiemannianOptimizer`'s step: per
param group ``(group, spec, buckets, ordinary params)`` and per bucket ``(group index, update)``
(:class:`rankopt.torch.stacks.BucketUpdate`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .checks import describe, lr_text
from .stacks import BucketUpdate, Layer

__all__ = ["nonfinite_error", "unscale"]


def nonfinite_error(plan: list, updates: list, grads: bool) -> ValueError | None:
    """One synchronization: None if the gradients (``grads``), every tensor ``lr`` (a
    negative one counts) and every new point and state are finite, else the error for the
    first that is not, in that order.

    Fast path: one sum over all of them (small tensors concatenated, per device); only if it
    is not finite (a non-finite entry, or finite entries whose sum overflows) are they
    checked one by one, exactly.
    """
    flat = []
    for group, _, buckets, ordinary in plan:
        if grads:
            flat += [p.grad for p in ordinary]
            flat += [t for _, _, xi in buckets for t in xi]
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            flat.append(torch.where(lr >= 0, lr, torch.nan))
    for _, u in updates:
        flat += u.tensors()
    if not flat or bool(torch.isfinite(_probe(flat))):
        return None
    return _locate(plan, updates, grads)


def _locate(plan: list, updates: list, grads: bool) -> ValueError | None:
    """The error path of :func:`nonfinite_error`: the first non-finite gradient, ``lr`` or new
    point/state, by exact checks (None if all are finite: a sum overflowed)."""
    for gi, (group, _, buckets, ordinary) in enumerate(plan):
        for p in ordinary if grads else []:
            if not _finite(p.grad):
                return _gradient_error(p, gi)
        for layers, _, xi in buckets if grads else []:
            for k, L in enumerate(layers):
                if not all(_finite(t[k]) for t in xi):
                    return _gradient_error(L, gi)
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and not 0 <= float(lr) < math.inf:
            return ValueError(
                f"param group {gi}: invalid learning rate lr={lr_text(lr)}: must be a "
                "finite number >= 0; the step was not taken"
            )
    for gi, u in updates:
        bad = _first_bad(u)
        if bad is not None:
            k, part = bad
            return ValueError(
                f"the step of the low-rank layer {describe(u.layers[k])} in param group "
                f"{gi} is not finite (inf or NaN in its new {part}): "
                f"lr={lr_text(plan[gi][0]['lr'])} too large? The step was not taken (no "
                "parameter or optimizer state changed). Lower the learning rate or check the "
                "other hyperparameters; check_finite=False disables this check."
            )
    return None


def unscale(tensors: list[torch.Tensor], grad_scale: torch.Tensor) -> None:
    """Divide by GradScaler's scale in place, exactly as its ``unscale_`` does."""
    inv = grad_scale.double().reciprocal().float()
    for t in tensors:
        t.mul_(inv.to(t.device))


#: tensors up to this many entries are concatenated for one sum (a copy costs less than a kernel)
_SMALL = 4096


def _probe(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The sum of all entries of ``tensors`` (0-d; not finite if one of them is not, or if the
    sum overflows): per device, small tensors concatenated and summed once, large ones apart."""
    by_device: dict = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    parts = []
    for ts in by_device.values():
        small = [t.reshape(-1) for t in ts if t.numel() <= _SMALL]
        parts += [_total(t) for t in ts if t.numel() > _SMALL]
        if small:
            parts.append(_total(torch.cat(small)))
    dev = parts[0].device
    return sum((p.to(dev) for p in parts[1:]), parts[0])


def _finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite (one host read; the error path)."""
    return bool(torch.isfinite(t).all())


def _gradient_error(what: Any, gi: int) -> ValueError:
    if isinstance(what, Layer):
        shape = (what.U.shape[0], what.V.shape[0], what.U.shape[1])
        desc = f"a low-rank layer of shape (m, n, r) = {shape}"
    else:
        desc = f"a parameter of shape {tuple(what.shape)}"
    return ValueError(
        f"non-finite gradient (inf or NaN) in {desc} (param group {gi}); the step was not "
        "taken. Lower the learning rate, clip gradients, or use torch.amp.GradScaler (which "
        "skips such steps); check_finite=False disables this check."
    )


def _first_bad(u: BucketUpdate) -> tuple[int, str] | None:
    """The first layer of ``u`` with a non-finite new factor or state entry, and which (None if
    all are finite)."""
    for k in range(len(u.layers)):
        for name, t in u.parts(k).items():
            if not _finite(t):
                return k, name
    return None


def _total(t: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor's entries, accumulated and returned in at least float32."""
    return t.sum(dtype=torch.promote_types(t.dtype, torch.float32))
