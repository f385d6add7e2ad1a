r"""Torch optimizers whose rules need more than the tangent gradient: DLRA (augmented BUG) and
the authors' reference rules.

The layers' backward leaves the tangent projection ``P_X(G)`` in ``.grad``
(:mod:`rankopt.torch.layers`), which is all a tangent-space rule needs. Two kinds of rule need
more (:func:`rankopt.rules.gradient_input`):

* the DLRA rules (:class:`DLRAHeavyBall`, :class:`DLRAAdam`, augmented BUG integrator) need the
  **normal-normal block** ``Q_u^T G Q_v`` of the gradient in the new directions ``Q_u``,
  ``Q_v``, which are only known at the step. The layers' backward therefore keeps the batch's
  inputs and output gradients (``G = g^T x`` for a linear layer; a convolution and an embedding
  likewise, see :class:`rankopt.torch._autograd.Capture`) until the step, which forms
  ``(g Q_u)^T (x Q_v)``: **no second forward/backward pass and no m x n matrix**. Cost:
  O(b (m + n) r) per layer and step (about the backward's own sketch products, b the rows of
  the batch), memory: the batch's ``b (m + n)`` inputs and output gradients per layer, kept
  from the backward to the step (per micro-batch under gradient accumulation).
* the reference rules (:class:`ReferenceRAdamW`, :class:`ReferenceRAdaGrad` in
  :mod:`rankopt.torch.reference`) need the dense gradient ``G``, which the backward then
  accumulates (m x n per layer, O(b m n) per backward).

Consistency with ``.grad``. Whatever scaled the ``.grad`` since the backward (GradScaler's
unscale, ``clip_grad_norm_``) must scale the captured batch too: per layer the optimizer
compares the tangent pieces (or the adapters' sketches) of the captured gradient with the
gathered ``.grad`` and uses their ratio; if ``.grad`` is not a multiple of the captured
gradient (``clip_grad_value_``, gradients edited by hand, a backward whose gradients were
zeroed by ``model.zero_grad()`` without this optimizer's ``zero_grad``, or a distributed
all-reduce) it raises a ``ValueError`` instead of taking an inconsistent step.

Gradient accumulation works (the captures accumulate like ``.grad``; they are cleared by the
optimizer's ``step`` and ``zero_grad``; a step that raises keeps them, like the gradients, so it
can be retried). **DistributedDataParallel is not supported**: the
captured batch is each process's own (and rank changes resize parameters, which DDP does not
allow either); the consistency check raises. Ordinary parameters get torch's SGD (heavy ball)
or AdamW, as for :class:`rankopt.torch.RSGD` / :class:`rankopt.torch.RAdamW`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import rules
from ..containers import FixedRankPoint
from ._autograd import get_capture, start_capture
from ._riemannian import RiemannianOptimizer
from .optim import RSGD, RAdamW, check_torch_eps, torch_default
from .stacks import BucketUpdate

__all__ = [
    "CapturingOptimizer",
    "DLRAHeavyBall",
    "DLRAAdam",
    "consistency_tolerance",
    "torch_default",
]


def consistency_tolerance(dtype: torch.dtype) -> float:
    """Relative mismatch allowed between ``.grad`` and the captured gradient's tangent pieces:
    ``10 sqrt(eps)`` of the capture's dtype (1.5e-7 in float64, 3.5e-3 in float32; bf16/fp16
    autocast is then hardly checked)."""
    return 10.0 * math.sqrt(torch.finfo(dtype).eps)


class CapturingOptimizer:
    """Mixin for a :class:`~rankopt.torch.RiemannianOptimizer` whose rule needs a capture.

    Registers a capture (``capture_kind``: "batch" or "dense") for every low-rank layer it is
    given, and replaces the per-bucket step: the rule gets ``normal=`` or ``egrad=`` built from
    the layers' captures, scaled to match their ``.grad``.
    """

    capture_kind = "batch"

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for L in self._split(self.param_groups[-1])[0]:
            start_capture(L.U.link, self.capture_kind, self)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._clear_captures()

    def _clear_captures(self) -> None:
        for group in self.param_groups:
            for L in self._split(group)[0]:
                cap = get_capture(L.U.link)
                if cap is not None:
                    cap.clear()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """The step of :class:`~rankopt.torch.RiemannianOptimizer`; it consumes the captures.

        A step that raises keeps them with the gradients (nothing was changed): it can be
        retried on the same backward (e.g. after lowering ``lr``), or ``zero_grad`` drops both.
        """
        loss = super().step(closure)
        self._clear_captures()
        return loss

    # -- the captured gradient, scaled like .grad ----------------------------------------
    def _captures(self, layers: list, x: FixedRankPoint, xi: Any, started: bool) -> list:
        """``[(capture, scale)]`` per layer: the capture and the factor by which ``.grad``
        (gathered in ``xi``) differs from it. Raises if ``.grad`` is not such a multiple."""
        out = []
        inv = getattr(self, "grad_scale", None)
        default = 1.0 if inv is None else float(inv.double().reciprocal())
        for k, L in enumerate(layers):
            cap = get_capture(L.U.link)
            if cap is None or cap.empty:
                raise ValueError(
                    f"no captured batch for a low-rank layer {tuple(L.U.shape)} x "
                    f"{tuple(L.V.shape)} that has gradients: {type(self).__name__} reads the "
                    "batch its backward kept, and each step consumes it. Run backward after "
                    "creating the optimizer and before each step (a second step on the same "
                    "gradients, or gradients computed before the optimizer existed, cannot be "
                    "taken)"
                )
            U, V = x.U[k], x.V[k]
            GV, GtU, M = cap.sketches(U, V)
            if started:
                GV, GtU = GV - U @ M, GtU - V @ M.T
            have = (xi.M[k], xi.Up[k], xi.Vp[k])
            dot = sum(float((a * b).sum()) for a, b in zip(have, (M, GV, GtU), strict=True))
            cc = sum(float((b * b).sum()) for b in (M, GV, GtU))
            hh = sum(float((a * a).sum()) for a in have)
            scale = dot / cc if cc > 0 else default
            res = max(hh - 2 * scale * dot + scale * scale * cc, 0.0)
            tol = consistency_tolerance(_capture_dtype(cap))
            if cc > 0 and res > (tol * tol) * max(hh, scale * scale * cc):
                raise ValueError(
                    f"the gradient of a low-rank layer {tuple(L.U.shape)} x {tuple(L.V.shape)} "
                    f"is not a multiple of the batch its backward captured (relative mismatch "
                    f"{math.sqrt(res / max(hh, 1e-300)):.2e}): {type(self).__name__} needs the "
                    "backward's batch for the normal directions of the gradient. Gradients "
                    "changed other than by a common factor (clip_grad_value_, edited by hand, "
                    "zeroed by model.zero_grad() instead of the optimizer's zero_grad, averaged "
                    "by DistributedDataParallel) are not supported; clip_grad_norm_ and "
                    "GradScaler are."
                )
            out.append((cap, scale))
        return out

    def _extra(self, spec: rules.Rule, caps: list, x: FixedRankPoint) -> dict:
        kind = rules.gradient_input(spec)
        if kind == "normal":

            def normal(Qu, Qv):
                return torch.stack([s * c.normal(Qu[k], Qv[k]) for k, (c, s) in enumerate(caps)])

            return {"normal": normal}
        if kind == "dense":
            dtype = x.U.dtype
            return {"egrad": torch.stack([s * c.dense.to(dtype) for c, s in caps])}
        return {}

    def _bucket_update(
        self, group: dict, spec: rules.Rule, layers: list, x, xi
    ) -> BucketUpdate | None:
        """The new point and state of one bucket, from the rule with the layers' captures
        (nothing written)."""
        caps = self._captures(layers, x, xi, layers[0].U.link.started)
        by_layer = {id(L): c for L, c in zip(layers, caps, strict=True)}
        man = self._layer_manifold(layers[0])
        begun = self._begin(spec, man, layers, x, xi)
        if begun is None:
            return None
        layers, x, xi, state, stack = begun
        extra = self._extra(spec, [by_layer[id(L)] for L in layers], x)
        x_new, new_state = spec.step(man, x, xi, state, lr=group["lr"], **extra)
        if not isinstance(x_new, list) and x_new.rank != x.rank:
            x_new, new_state = _items(x_new, new_state)
        return BucketUpdate(layers, x_new, new_state, stack, cache_point=False)


def _capture_dtype(cap: Any) -> torch.dtype:
    if cap.dense is not None:
        return cap.dense.dtype
    return cap.records[0][2].dtype


def _items(x: FixedRankPoint, state: Any) -> tuple[list, list]:
    """A stacked point and state as lists of per-item points and states."""
    arrays = rules.state_arrays(state)
    points, states = [], []
    for k in range(x.U.shape[0]):
        points.append(FixedRankPoint(x.U[k], x.s[k], x.V[k]))
        item = {n: (v if getattr(v, "ndim", 0) == 0 else v[k]) for n, v in arrays.items()}
        states.append(rules.state_from_arrays(type(state), item))
    return points, states


_H = rules.DLRAHeavyBall


class DLRAHeavyBall(CapturingOptimizer, RSGD):
    r"""Rank-adaptive heavy ball by the augmented BUG integrator (:class:`rankopt.rules.DLRAHeavyBall`).

    Low-rank layers: bases augmented with the K-/L-step directions, heavy ball on the 2r x 2r
    core with the core's gradient (normal-normal block from the captured batch, see the module
    docstring), truncation at ``rank_tol`` within ``[min_rank, max_rank]`` (``max_rank=None``:
    each layer's rank when the optimizer first steps it). ``layer.rank`` tells the current
    rank. Ordinary parameters: ``torch.optim.SGD(lr, momentum, weight_decay=weight_decay)``.
    """

    spec_class = rules.DLRAHeavyBall
    rank_options = "budget"

    def __init__(
        self,
        params: Any,
        lr: float = _H.lr,
        momentum: float = _H.momentum,
        weight_decay: float = _H.weight_decay,
        *,
        rank_tol: float | None = _H.rank_tol,
        max_rank: int | None = _H.max_rank,
        min_rank: int = _H.min_rank,
        foreach: bool | None = None,
        fused: bool | None = None,
        stack_layers: bool = True,
        check_finite: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, dampening=0.0, weight_decay=weight_decay, nesterov=False,
            rank_tol=rank_tol, max_rank=max_rank, min_rank=min_rank, foreach=foreach,
            fused=fused, stack_layers=stack_layers,
        )  # fmt: skip
        RiemannianOptimizer.__init__(self, params, defaults, check_finite)


_A = rules.DLRAAdam


class DLRAAdam(CapturingOptimizer, RAdamW):
    r"""Rank-adaptive Adam by the augmented BUG integrator (:class:`rankopt.rules.DLRAAdam`).

    Low-rank layers: bases augmented with the K-/L-step directions, the first moment on the
    2r x 2r core, the Galerkin step under the Adafactor-factored metric
    (``second_moment="factored"``, default) or elementwise Adam on the core
    (``second_moment="core"``, the DLRA group's layers), truncation at ``rank_tol`` within
    ``[min_rank, max_rank]`` (``max_rank=None``: each layer's starting rank). Ordinary
    parameters: ``torch.optim.AdamW(lr, betas, eps, weight_decay)``; ``metric_eps`` is the
    rule's ``eps``.
    """

    spec_class = rules.DLRAAdam
    spec_keys: dict[str, str] = {}
    rank_options = "budget"

    def __init__(
        self,
        params: Any,
        lr: float = _A.lr,
        betas: tuple[float, float] = _A.betas,
        eps: float = torch_default(torch.optim.AdamW, "eps"),
        weight_decay: float = _A.weight_decay,
        *,
        metric_eps: float = _A.metric_eps,
        second_moment: str = _A.second_moment,
        rank_tol: float | None = _A.rank_tol,
        max_rank: int | None = _A.max_rank,
        min_rank: int = _A.min_rank,
        foreach: bool | None = None,
        fused: bool | None = None,
        stack_layers: bool = True,
        check_finite: bool = True,
    ) -> None:
        check_torch_eps(eps)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, metric_eps=metric_eps,
            second_moment=second_moment, rank_tol=rank_tol, max_rank=max_rank,
            min_rank=min_rank, foreach=foreach, fused=fused, stack_layers=stack_layers,
        )  # fmt: skip
        RiemannianOptimizer.__init__(self, params, defaults, check_finite)
