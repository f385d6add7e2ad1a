r"""The finite check of a step: one host read over gradients, learning rates and results.

``plan`` and ``updates`` are those of :class:`rankopt.torch.RiemannianOptimizer`'s step: per
param group ``(group, spec, buckets, ordinary params)`` and per bucket ``(group index, update)``
(:class:`rankopt.torch.stacks.BucketUpdate`).

Under ``torch.compile`` the host read is an operator of the graph (:func:`finite_gate`, the
custom op ``rankopt::finite_or_raise``): the sum is computed in the graph, the operator reads it
and raises the located error (the step's inputs are untouched then: it re-runs the step's
computation eagerly to name the first non-finite tensor), and every write of the step depends
on its result, so no write can be scheduled before it. No graph break, one graph per step.
FSDP2-sharded gradients (``DTensor``) are summed locally and the sum all-reduced (one number).
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ..containers import TangentVector
from .checks import describe, lr_text
from .sharded import full_tensor, is_sharded, local, sum_over_shards
from .stacks import BucketUpdate, Layer

__all__ = [
    "nonfinite_error",
    "unscale",
    "finite_inputs",
    "finite_gate",
    "register_locator",
    "finite_or_raise",
    "rule_error",
]

#: the optimizers' eager error locators by key (the custom op takes the key, an int)
_LOCATORS: dict[int, weakref.WeakMethod] = {}
_KEYS = itertools.count()


def register_locator(locate: Callable[[], ValueError | None]) -> int:
    """A key for :func:`finite_or_raise` to call ``locate`` (a bound method, held weakly): it
    recomputes the step eagerly and returns its located error (None: all finite)."""
    key = next(_KEYS)
    _LOCATORS[key] = weakref.WeakMethod(locate, lambda _: _LOCATORS.pop(key, None))
    return key


@torch.library.custom_op(
    "rankopt::finite_or_raise", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,)
)
def finite_or_raise(total: torch.Tensor, key: int) -> torch.Tensor:
    """True (0-d bool) if ``total`` is finite or the located check finds nothing (a sum that
    overflowed); else raises the error of the locator registered under ``key``. One host read.
    """
    if not bool(torch.isfinite(total)):
        ref = _LOCATORS.get(key)
        locate = ref() if ref is not None else None
        error = locate() if locate is not None else ValueError(_UNLOCATED)
        if error is not None:
            raise error
    return torch.ones((), dtype=torch.bool, device=total.device)


@finite_or_raise.register_fake
def _(total: torch.Tensor, key: int) -> torch.Tensor:
    return torch.empty((), dtype=torch.bool, device=total.device)


_UNLOCATED = (
    "non-finite gradient or update (inf or NaN) in a compiled step; the step was not taken "
    "(no parameter or optimizer state changed); check_finite=False disables this check"
)


def finite_inputs(plan: list) -> list:
    """The plan with every stacked gradient replaced by zeros if one of them is not finite, in
    the graph (no host read): in a compiled step the rules then never factor non-finite
    values, and :func:`finite_gate` raises the located error."""
    flat = [t for _, _, buckets, _ in plan for _, _, xi in buckets for t in (xi.M, xi.Up, xi.Vp)]
    if not flat:
        return plan
    ok = torch.isfinite(_probe(flat))
    safe = lambda t: torch.where(ok, t, 0.0)  # noqa: E731
    return [
        (group, spec, [(ls, x, TangentVector(safe(xi.M), safe(xi.Up), safe(xi.Vp)))
                       for ls, x, xi in buckets], ordinary)
        for group, spec, buckets, ordinary in plan
    ]  # fmt: skip


def finite_gate(plan: list, updates: list, grads: bool, key: int) -> torch.Tensor:
    """The finite check in a compiled step: :func:`finite_or_raise` of the sum of what
    :func:`nonfinite_error` checks; returns its True tensor (the step's writes depend on it)."""
    flat = _checked(plan, updates, grads)
    total = _probe(flat) if flat else torch.zeros(())
    return finite_or_raise(total, key)


def nonfinite_error(plan: list, updates: list, grads: bool) -> ValueError | None:
    """One synchronization: None if the gradients (``grads``), every tensor ``lr`` (a
    negative one counts) and every new point and state are finite, else the error for the
    first that is not, in that order.

    Fast path: one sum over all of them (small tensors concatenated, per device); only if it
    is not finite (a non-finite entry, or finite entries whose sum overflows) are they
    checked one by one, exactly.
    """
    flat = _checked(plan, updates, grads)
    if not flat or bool(torch.isfinite(_probe(flat))):
        return None
    return _locate(plan, updates, grads)


def _checked(plan: list, updates: list, grads: bool) -> list[torch.Tensor]:
    """Every tensor the check reads: gradients, tensor ``lr`` (negative as NaN), results."""
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
    return flat


def rule_error(
    e: Exception, plan: list, index: int, layers: list[Layer], grads: bool, check: bool
) -> ValueError | None:
    """A clearer error for ``e``, raised by the rule step of ``layers`` in param group
    ``index`` (None: re-raise ``e``, with a note where Python supports notes); with ``check``
    (``check_finite``) a non-finite input, the likeliest cause, is named first."""
    if check:
        error = nonfinite_error(plan, [], grads)
        if error is not None:
            return error
    where = f"the low-rank layer {describe(layers[0])} in param group {index}"
    if isinstance(e, torch.linalg.LinAlgError):
        return ValueError(
            f"the step of {where} failed (torch.linalg.LinAlgError: {e}): its update is "
            f"not finite or ill-conditioned; lr={lr_text(plan[index][0]['lr'])} too large? "
            "The step was not taken (no parameter or optimizer state changed)."
        )
    if hasattr(e, "add_note"):  # Python >= 3.11
        e.add_note(
            f"rankopt: raised by the step of {where}; the step was not taken (no parameter "
            "or optimizer state changed)"
        )
    return None


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
        t = local(t)  # an FSDP2-sharded gradient: its local shard
        t.mul_(inv.to(t.device))


#: tensors up to this many entries are concatenated for one sum (a copy costs less than a kernel)
_SMALL = 4096


def _probe(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The sum of all entries of ``tensors`` (0-d; not finite if one of them is not, or if the
    sum overflows): per device, small tensors concatenated and summed once, large ones apart;
    FSDP2-sharded tensors summed over their local shards, that sum all-reduced."""
    shards = [t for t in tensors if is_sharded(t)]
    if shards:
        own = _probe([t.to_local() for t in shards])
        rest = [t for t in tensors if not is_sharded(t)]
        total = sum_over_shards(own, shards)
        return total + _probe(rest).to(total.device) if rest else total
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
    """Whether every entry is finite (one host read; the error path; a sharded tensor is
    gathered, a collective that every process reaches in the same order)."""
    return bool(torch.isfinite(full_tensor(t)).all())


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
