r"""``torch.optim`` optimizers for models with rankopt low-rank layers.

Each optimizer treats the ``U``, ``S``, ``V`` factors of one low-rank layer as one point
``X = U diag(s) V^T`` of the fixed-rank manifold and moves it with the update rule of
:mod:`rankopt.solvers.rules` (the same function the NumPy solvers call: one implementation),
reading the tangent vector ``P_X(G) = (S.grad, U.grad, V.grad)`` that the layers' backward
leaves. Every other parameter in the same optimizer gets the matching Euclidean rule, computed
by torch's own functional implementation:

================  ==========================  ==================================
optimizer         manifold parameters          ordinary parameters
================  ==========================  ==================================
RAdamW            ``rules.radamw_step``        ``torch.optim.AdamW``
RAdaGrad          ``rules.radagrad_step``      ``torch.optim.Adagrad``
RSGD              ``rules.rsgd_step``          ``torch.optim.SGD``
DLRAHeavyBall     ``rules.dlra_heavyball_step`` ``torch.optim.SGD`` (momentum)
DLRAAdam          ``rules.dlra_adam_step``     ``torch.optim.AdamW``
================  ==========================  ==================================

Manifold math runs in the factors' dtype when it is float32/float64, else in float32 (keep the
factors in float32 and use autocast for bf16/fp16 compute). Cost per layer and step:
O((m + n) r^2 + r^3), plus PCG iterations for the adaptive metrics.

Plain ``torch.optim`` optimizers and manifold parameters
--------------------------------------------------------
A manifold parameter's ``.grad`` is a tangent-space piece, not the Euclidean gradient of that
factor, so a plain optimizer would neither descend the loss nor keep ``U``, ``V`` orthonormal.
Importing :mod:`rankopt.torch` registers a global ``torch.optim`` step pre-hook that raises a
``ValueError`` the first time any other ``torch.optim.Optimizer`` subclass steps with a
manifold parameter that requires grad (checked once per optimizer and parameter count).
Not detectable: hand-written update loops, torch's functional optimizer calls, and optimizers
that do not subclass ``torch.optim.Optimizer``. :func:`allow_plain_optimizers` turns the check off.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.adagrad import adagrad as _torch_adagrad
from torch.optim.adamw import adamw as _torch_adamw
from torch.optim.sgd import sgd as _torch_sgd

from ..solvers import rules
from ._riemannian import RiemannianOptimizer, _check_hyper, allow_plain_optimizers

try:  # torch's own choice of dtype for the per-parameter step counter
    from torch.optim.optimizer import _get_scalar_dtype
except ImportError:  # pragma: no cover - older torch

    def _get_scalar_dtype(is_fused=None):
        return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


__all__ = [
    "RiemannianOptimizer",
    "RAdamW",
    "RAdaGrad",
    "RSGD",
    "DLRAHeavyBall",
    "DLRAAdam",
    "allow_plain_optimizers",
]


# ---------------------------------------------------------------------------
# Euclidean rules for ordinary parameters (torch's functional implementations)
# ---------------------------------------------------------------------------


def _adamw_ordinary(opt: RiemannianOptimizer, group: dict, params: list) -> None:
    grads, exp_avgs, exp_avg_sqs, steps = [], [], [], []
    for p in params:
        st = opt.state[p]
        if len(st) == 0:
            st["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        grads.append(p.grad)
        exp_avgs.append(st["exp_avg"])
        exp_avg_sqs.append(st["exp_avg_sq"])
        steps.append(st["step"])
    beta1, beta2 = group["betas"]
    _torch_adamw(
        params, grads, exp_avgs, exp_avg_sqs, [], steps,
        foreach=group["foreach"], has_complex=any(torch.is_complex(p) for p in params),
        amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
        weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
    )  # fmt: skip


def _sgd_ordinary(opt: RiemannianOptimizer, group: dict, params: list) -> None:
    grads = [p.grad for p in params]
    bufs = [opt.state[p].get("momentum_buffer") for p in params]
    _torch_sgd(
        params, grads, bufs, foreach=group["foreach"],
        weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
        dampening=group["dampening"], nesterov=group["nesterov"], maximize=False,
    )  # fmt: skip
    if group["momentum"] != 0:
        for p, b in zip(params, bufs, strict=True):
            opt.state[p]["momentum_buffer"] = b


# ---------------------------------------------------------------------------
# the optimizers
# ---------------------------------------------------------------------------


class RAdamW(RiemannianOptimizer):
    r"""Riemannian AdamW (Bian et al., NeurIPS 2025) on low-rank layers; AdamW elsewhere.

    Manifold parameters: :func:`rankopt.solvers.rules.radamw_step` (first moment kept as a
    transported tangent vector, second moment as the row/column statistics of the Adam metric,
    decoupled weight decay ``X <- (1 - lr wd) X`` along the tangent direction ``X``).
    Ordinary parameters: exactly ``torch.optim.AdamW(lr, betas, eps, weight_decay)``.

    Parameters
    ----------
    params : iterable
    lr : float
    betas : (float, float)
    eps : float
        AdamW's eps for ordinary parameters; the Adam metric's eps (added to the row/column
        statistics before their 1/4 power) for manifold ones.
    weight_decay : float
        Decoupled weight decay (both kinds).
    exact, cg_tol, cg_maxiter
        Metric solve: the Riemannian gradient of the Adam metric by PCG (``exact=True``) to a
        relative residual ``cg_tol`` (1e-4 gives the direction to about 1e-5 relative, ample
        for a stochastic optimizer, and about 3x fewer iterations than 1e-10, which float32
        cannot reach anyway), or the preconditioner only (``exact=False``, cheapest).
    rank_tol, max_rank : optional
        Rank-adaptive retraction (None keeps the rank fixed).
    foreach : bool, optional
        Passed to torch's AdamW for ordinary parameters.
    check_finite : bool
        See :class:`RiemannianOptimizer`.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        exact: bool = True,
        cg_tol: float | None = 1e-4,
        cg_maxiter: int = 20,
        rank_tol: float | None = None,
        max_rank: int | None = None,
        foreach: bool | None = None,
        check_finite: bool = True,
    ) -> None:
        _check_hyper(lr, eps, betas, weight_decay)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, exact=exact,
            cg_tol=cg_tol, cg_maxiter=cg_maxiter, rank_tol=rank_tol, max_rank=max_rank,
            foreach=foreach,
        )  # fmt: skip
        super().__init__(params, defaults, check_finite)

    _init_fn = staticmethod(rules.radamw_init)
    _step_fn = staticmethod(rules.radamw_step)

    def _rule_init(self, manifold, x, group):
        return self._init_fn(
            manifold, x, betas=group["betas"], eps=group["eps"], exact=group["exact"],
            cg_tol=group["cg_tol"], cg_maxiter=group["cg_maxiter"],
        )  # fmt: skip

    def _rule_step(self, manifold, x, xi, state, group):
        return self._step_fn(
            manifold, x, xi, state, lr=group["lr"], betas=group["betas"], eps=group["eps"],
            weight_decay=group["weight_decay"], rank_tol=group["rank_tol"],
            max_rank=group["max_rank"],
        )  # fmt: skip

    def _euclidean_step(self, group, params):
        _adamw_ordinary(self, group, params)


class DLRAAdam(RAdamW):
    r"""Geometry-aware low-rank Adam (after Schotthöfer, Klein, Kusch, NeurIPS 2025).

    Manifold parameters: :func:`rankopt.solvers.rules.dlra_adam_step` (RAdamW's rule with the
    rank-adaptive augmented-basis retraction, truncated at ``rank_tol``: the rank of each layer
    changes; ``layer.rank`` tells the current one). Ordinary parameters: ``torch.optim.AdamW``.
    Same parameters as :class:`RAdamW`, with ``weight_decay=0`` and ``rank_tol=1e-3`` by default.
    Rank changes resize the factor tensors in place (same ``Parameter`` objects), which
    DistributedDataParallel does not support.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        rank_tol: float | None = 1e-3,
        max_rank: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, rank_tol=rank_tol, max_rank=max_rank, **kwargs
        )

    _init_fn = staticmethod(rules.dlra_adam_init)
    _step_fn = staticmethod(rules.dlra_adam_step)


class RAdaGrad(RiemannianOptimizer):
    r"""Riemannian AdaGrad (Bian et al., NeurIPS 2025) on low-rank layers; Adagrad elsewhere.

    Manifold parameters: :func:`rankopt.solvers.rules.radagrad_step` with the learning rate
    ``lr / (1 + (t - 1) lr_decay)`` (torch's schedule). Ordinary parameters: exactly
    ``torch.optim.Adagrad(lr, lr_decay, weight_decay, initial_accumulator_value, eps)``
    (``initial_accumulator_value`` applies to ordinary parameters only).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        *,
        exact: bool = True,
        cg_tol: float | None = 1e-4,
        cg_maxiter: int = 20,
        rank_tol: float | None = None,
        max_rank: int | None = None,
        foreach: bool | None = None,
        check_finite: bool = True,
    ) -> None:
        _check_hyper(lr, eps, None, weight_decay)
        if not lr_decay >= 0 or not initial_accumulator_value >= 0:
            raise ValueError("lr_decay and initial_accumulator_value must be >= 0")
        defaults = dict(
            lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, eps=eps, exact=exact,
            cg_tol=cg_tol, cg_maxiter=cg_maxiter, rank_tol=rank_tol, max_rank=max_rank,
            foreach=foreach,
        )  # fmt: skip
        super().__init__(params, defaults, check_finite)

    def _rule_init(self, manifold, x, group):
        return rules.radagrad_init(
            manifold, x, eps=group["eps"], exact=group["exact"], cg_tol=group["cg_tol"],
            cg_maxiter=group["cg_maxiter"],
        )  # fmt: skip

    def _rule_step(self, manifold, x, xi, state, group):
        lr = group["lr"] / (1.0 + state.step * group["lr_decay"])
        return rules.radagrad_step(
            manifold, x, xi, state, lr=lr, weight_decay=group["weight_decay"],
            rank_tol=group["rank_tol"], max_rank=group["max_rank"],
        )  # fmt: skip

    def _euclidean_step(self, group, params):
        sums, steps = [], []
        for p in params:
            st = self.state[p]
            if len(st) == 0:
                st["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                init = group["initial_accumulator_value"]
                st["sum"] = torch.full_like(p, init, memory_format=torch.preserve_format)
            sums.append(st["sum"])
            steps.append(st["step"])
        _torch_adagrad(
            params, [p.grad for p in params], sums, steps, foreach=group["foreach"],
            has_complex=any(torch.is_complex(p) for p in params), lr=group["lr"],
            weight_decay=group["weight_decay"], lr_decay=group["lr_decay"], eps=group["eps"],
            maximize=False,
        )  # fmt: skip


class RSGD(RiemannianOptimizer):
    r"""Riemannian SGD with (Nesterov) momentum on low-rank layers; ``torch.optim.SGD`` elsewhere.

    Manifold parameters: :func:`rankopt.solvers.rules.rsgd_step` (momentum buffer kept as a
    tangent vector and transported; coupled L2 weight decay as torch's SGD). Ordinary
    parameters: exactly ``torch.optim.SGD(lr, momentum, dampening, weight_decay, nesterov)``.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        rank_tol: float | None = None,
        max_rank: int | None = None,
        foreach: bool | None = None,
        check_finite: bool = True,
    ) -> None:
        _check_hyper(lr, None, None, weight_decay)
        if not momentum >= 0:
            raise ValueError(f"invalid momentum={momentum!r}: must be >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, rank_tol=rank_tol, max_rank=max_rank, foreach=foreach,
        )  # fmt: skip
        super().__init__(params, defaults, check_finite)

    _init_fn = staticmethod(rules.rsgd_init)

    def _rule_init(self, manifold, x, group):
        return self._init_fn(manifold, x)

    def _rule_step(self, manifold, x, xi, state, group):
        return rules.rsgd_step(
            manifold, x, xi, state, lr=group["lr"], momentum=group["momentum"],
            dampening=group["dampening"], nesterov=group["nesterov"],
            weight_decay=group["weight_decay"], rank_tol=group["rank_tol"],
            max_rank=group["max_rank"],
        )  # fmt: skip

    def _euclidean_step(self, group, params):
        _sgd_ordinary(self, group, params)


class DLRAHeavyBall(RSGD):
    r"""Geometry-aware low-rank heavy ball (after Schotthöfer, Klein, Kusch, NeurIPS 2025).

    Manifold parameters: :func:`rankopt.solvers.rules.dlra_heavyball_step` (tangent momentum,
    augmented basis, truncation at ``rank_tol``: ranks change). Ordinary parameters:
    ``torch.optim.SGD(lr, momentum, weight_decay=weight_decay)``. Rank changes resize the factor
    tensors, which DistributedDataParallel does not support.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        rank_tol: float | None = 1e-3,
        max_rank: int | None = None,
        foreach: bool | None = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__(
            params, lr, momentum, 0.0, weight_decay, False, rank_tol=rank_tol,
            max_rank=max_rank, foreach=foreach, check_finite=check_finite,
        )  # fmt: skip

    _init_fn = staticmethod(rules.dlra_heavyball_init)

    def _rule_step(self, manifold, x, xi, state, group):
        return rules.dlra_heavyball_step(
            manifold, x, xi, state, lr=group["lr"], momentum=group["momentum"],
            rank_tol=group["rank_tol"], max_rank=group["max_rank"],
            weight_decay=group["weight_decay"],
        )  # fmt: skip
