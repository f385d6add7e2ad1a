r"""Torch optimizers for the authors' reference rules and the elementwise Adam metric: dense
(m x n) state, for comparison and for layers small enough to afford it.

* :class:`ReferenceRAdamW`, :class:`ReferenceRAdaGrad`: :class:`rankopt.rules.ReferenceRAdamW`
  and :class:`rankopt.rules.ReferenceRAdaGrad` (the RAdamW and RAdaGrad of the authors' code,
  step for step; ``faithful=True`` reproduces its documented defects). They need the dense
  gradient ``G`` of each low-rank layer, which the layers' backward then accumulates (an m x n
  matrix per layer, one O(b m n) product per backward; see :mod:`rankopt.torch.dlra` for how
  captures follow gradient accumulation, clipping and GradScaler, and why DDP is not
  supported). ReferenceRAdamW also keeps two m x n moments per layer.
* :class:`RAdamWElementwise`: :class:`rankopt.rules.RAdamWElementwise` (an m x n second moment,
  from the tangent gradient: no capture needed).

Ordinary parameters: AdamW (ReferenceRAdamW, RAdamWElementwise) or SGD (ReferenceRAdaGrad, whose
code integrates with ``torch.optim.SGD``), with the same ``lr``/``weight_decay``.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import rules
from ._riemannian import RiemannianOptimizer
from .dlra import CapturingOptimizer
from .optim import RSGD, RAdamW, check_torch_eps, torch_default

__all__ = ["ReferenceRAdamW", "ReferenceRAdaGrad", "RAdamWElementwise"]

_R = rules.ReferenceRAdamW


class ReferenceRAdamW(CapturingOptimizer, RAdamW):
    r"""The authors' RAdamW on low-rank layers (:class:`rankopt.rules.ReferenceRAdamW`): dense
    m x n AdamW moments (no bias correction by default), the step and decoupled decay on the
    dense weight, projection and retraction. ``eps``/``weight_decay`` (the code's 1e-6 / 0.01)
    apply to ordinary parameters too (torch AdamW)."""

    spec_class = rules.ReferenceRAdamW
    capture_kind = "dense"
    rank_options = "truncation"
    spec_keys: dict[str, str] = {}

    def __init__(
        self,
        params: Any,
        lr: float = _R.lr,
        betas: tuple[float, float] = _R.betas,
        eps: float = _R.eps,
        weight_decay: float = _R.weight_decay,
        *,
        correct_bias: bool = _R.correct_bias,
        faithful: bool = _R.faithful,
        rank_tol: float | None = _R.rank_tol,
        min_rank: int = _R.min_rank,
        foreach: bool | None = None,
        fused: bool | None = None,
        stack_layers: bool = True,
        check_finite: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            correct_bias=correct_bias, faithful=faithful, rank_tol=rank_tol, min_rank=min_rank,
            foreach=foreach, fused=fused, stack_layers=stack_layers,
        )  # fmt: skip
        RiemannianOptimizer.__init__(self, params, defaults, check_finite)


_G = rules.ReferenceRAdaGrad


class ReferenceRAdaGrad(CapturingOptimizer, RSGD):
    r"""The authors' RAdaGrad on low-rank layers (:class:`rankopt.rules.ReferenceRAdaGrad`): an
    SGD step on ``D_L^{-1} G D_R^{-1}`` (from the current dense gradient), then the projection
    (or the code's weighted formula, ``faithful=True``) and retraction. Ordinary parameters:
    ``torch.optim.SGD(lr)``."""

    spec_class = rules.ReferenceRAdaGrad
    capture_kind = "dense"
    rank_options = "truncation"

    def __init__(
        self,
        params: Any,
        lr: float = _G.lr,
        *,
        metric_eps: float = _G.metric_eps,
        faithful: bool = _G.faithful,
        rank_tol: float | None = _G.rank_tol,
        min_rank: int = _G.min_rank,
        foreach: bool | None = None,
        fused: bool | None = None,
        stack_layers: bool = True,
        check_finite: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
            metric_eps=metric_eps, faithful=faithful, rank_tol=rank_tol, min_rank=min_rank,
            foreach=foreach, fused=fused, stack_layers=stack_layers,
        )  # fmt: skip
        RiemannianOptimizer.__init__(self, params, defaults, check_finite)


_E = rules.RAdamWElementwise


class RAdamWElementwise(RAdamW):
    r"""RAdamW under the elementwise Adam metric (:class:`rankopt.rules.RAdamWElementwise`):
    an m x n second moment per layer; AdamW for ordinary parameters (``eps`` is torch's,
    ``metric_eps`` the metric's relative floor)."""

    spec_class = rules.RAdamWElementwise
    spec_keys = {"eps": "metric_eps"}

    def __init__(
        self,
        params: Any,
        lr: float = _E.lr,
        betas: tuple[float, float] = _E.betas,
        eps: float = torch_default(torch.optim.AdamW, "eps"),
        weight_decay: float = _E.weight_decay,
        *,
        metric_eps: float = _E.metric_eps,
        cg_tol: float | None = _E.cg_tol,
        cg_maxiter: int = _E.cg_maxiter,
        rank_tol: float | None = _E.rank_tol,
        max_rank: int | None = _E.max_rank,
        min_rank: int = _E.min_rank,
        foreach: bool | None = None,
        fused: bool | None = None,
        stack_layers: bool = True,
        check_finite: bool = True,
    ) -> None:
        check_torch_eps(eps)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, metric_eps=metric_eps,
            cg_tol=cg_tol, cg_maxiter=cg_maxiter, rank_tol=rank_tol, max_rank=max_rank,
            min_rank=min_rank, foreach=foreach, fused=fused, stack_layers=stack_layers,
        )  # fmt: skip
        RiemannianOptimizer.__init__(self, params, defaults, check_finite)
