r"""``torch.optim`` optimizers for models with rankopt low-rank layers.

Each optimizer treats the ``U``, ``S``, ``V`` factors of one low-rank layer as one point
``X = U diag(s) V^T`` of the fixed-rank manifold and moves it with a rule of :mod:`rankopt.rules`
(the same spec the NumPy solvers use: one implementation, one set of defaults), reading the
tangent vector ``P_X(G) = (S.grad, U.grad, V.grad)`` that the layers' backward leaves.
Same-shape layers are stacked and moved by one call of the rule (:mod:`rankopt.torch.stacks`).
Every other parameter in the same optimizer gets the matching Euclidean rule, computed by
torch's own functional implementation (foreach or fused kernels, as torch chooses or as asked):

================  ===============================  ==================================
optimizer         low-rank layers                  ordinary parameters
================  ===============================  ==================================
RAdamW            :class:`rankopt.rules.RAdamW`    ``torch.optim.AdamW``
RAdaGrad          :class:`rankopt.rules.RAdaGrad`  ``torch.optim.Adagrad``
RSGD              :class:`rankopt.rules.RSGD`      ``torch.optim.SGD``
================  ===============================  ==================================

The DLRA optimizers (augmented BUG integrator) are in :mod:`rankopt.torch.dlra`, the authors'
reference rules in :mod:`rankopt.torch.reference`.

Hyperparameters shared by both parts (``lr``, ``betas``, ``weight_decay``, ...) apply to both;
the manifold rules' defaults are the specs'. ``eps`` is torch's (ordinary parameters);
``metric_eps`` is the relative floor of the adaptive metric (:func:`rankopt.metrics.adaptive_diagonals`).
Manifold math runs in the factors' dtype when it is float32/float64, else in float32 (keep the
factors in float32 and use autocast for bf16/fp16 compute). Cost per layer and step:
O((m + n) r^2 + r^3).

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

import inspect
from typing import Any

import torch
from torch.optim.adagrad import adagrad as torch_adagrad
from torch.optim.adamw import adamw as torch_adamw
from torch.optim.sgd import sgd as torch_sgd

from .. import rules
from ._riemannian import RiemannianOptimizer, allow_plain_optimizers

__all__ = [
    "RiemannianOptimizer",
    "RAdamW",
    "RAdaGrad",
    "RSGD",
    "allow_plain_optimizers",
]


def torch_default(cls: type, name: str) -> Any:
    """The default of a keyword of a ``torch.optim`` optimizer (torch's value, not copied)."""
    return inspect.signature(cls).parameters[name].default


def _step_tensor(p: torch.Tensor, fused: bool | None) -> torch.Tensor:
    """torch's per-parameter step counter (float32 on the parameter's device when fused)."""
    if fused:
        return torch.zeros((), dtype=torch.float32, device=p.device)
    return torch.tensor(0.0, dtype=torch.float32)


def _adamw_ordinary(opt: RiemannianOptimizer, group: dict, params: list) -> None:
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


def _sgd_ordinary(opt: RiemannianOptimizer, group: dict, params: list) -> None:
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


def _adagrad_ordinary(opt: RiemannianOptimizer, group: dict, params: list) -> None:
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


def check_torch_eps(eps: Any) -> None:
    """Refuse a non-positive (or non-numeric) ``eps`` of torch's rule for ordinary parameters."""
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"invalid eps={eps!r}: must be > 0")


# ---------------------------------------------------------------------------
# the optimizers
# ---------------------------------------------------------------------------


def _adamw_init(A: type[rules.RAdamW]):
    """``__init__`` of an AdamW-family optimizer with the defaults of the rule spec ``A``."""

    def __init__(
        self,
        params: Any,
        lr: float = A.lr,
        betas: tuple[float, float] = A.betas,
        eps: float = torch_default(torch.optim.AdamW, "eps"),
        weight_decay: float = A.weight_decay,
        *,
        metric_eps: float = A.metric_eps,
        factoring: str = A.factoring,
        structure: str = A.structure,
        solver: str = A.solver,
        exact: bool = A.exact,
        cg_tol: float | None = A.cg_tol,
        cg_maxiter: int = A.cg_maxiter,
        rank_tol: float | None = A.rank_tol,
        max_rank: int | None = A.max_rank,
        min_rank: int = A.min_rank,
        foreach: bool | None = None,
        fused: bool | None = None,
        stack_layers: bool = True,
        compile: bool | str | dict = False,
        check_finite: bool = True,
    ) -> None:
        check_torch_eps(eps)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, metric_eps=metric_eps,
            factoring=factoring, structure=structure, solver=solver, exact=exact, cg_tol=cg_tol,
            cg_maxiter=cg_maxiter, rank_tol=rank_tol, max_rank=max_rank, min_rank=min_rank,
            foreach=foreach, fused=fused, stack_layers=stack_layers, compile=compile,
        )  # fmt: skip
        RiemannianOptimizer.__init__(self, params, defaults, check_finite)

    return __init__


class RAdamW(RiemannianOptimizer):
    r"""Riemannian AdamW on low-rank layers (:class:`rankopt.rules.RAdamW`); AdamW elsewhere.

    Low-rank layers: the first moment is a tangent vector (transported by projection), the
    second moment the row/column mean squares of the gradients, which define the
    Adafactor-factored metric whose exact Riemannian gradient is the direction; decoupled weight
    decay ``X <- (1 - lr wd) X``. Ordinary parameters: exactly
    ``torch.optim.AdamW(lr, betas, eps, weight_decay, foreach, fused)``.

    Parameters
    ----------
    params : iterable
        Parameters or param-group dicts; low-rank layers' factors and ordinary parameters.
    lr : float
        Learning rate of both parts (default: the rule's).
    betas : tuple of float
        Adam's ``(beta1, beta2)`` for both parts.
    eps : float
        AdamW's eps for ordinary parameters (torch's default).
    weight_decay : float
        Decoupled weight decay of both parts (default: the rule's, 0, unlike torch's AdamW).
    metric_eps : float
        The rule's ``eps``: relative floor of the adaptive metric
        (:func:`rankopt.metrics.adaptive_diagonals`).
    factoring : str
        How the metric's weights come from the statistics (``"adafactor"``, ``"quartic"``).
    structure : str
        ``"full"`` (the metric restricted to the tangent space) or ``"block"``.
    solver : str
        ``"direct"`` (exact closed form) or ``"pcg"``.
    exact : bool
        False applies only the metric's preconditioner (``structure="full"``).
    cg_tol : float or None
        PCG's relative tolerance (``solver="pcg"``).
    cg_maxiter : int
        PCG's most iterations (``solver="pcg"``).
    rank_tol : float or None
        Rank-adaptive retraction tolerance (None keeps the rank fixed).
    max_rank : int or None
        Largest rank of a rank-adaptive step.
    min_rank : int
        Smallest rank of a rank-adaptive step.
    foreach : bool or None
        Passed to torch's AdamW for ordinary parameters.
    fused : bool or None
        Passed to torch's AdamW for ordinary parameters.
    stack_layers : bool
        See :class:`RiemannianOptimizer`.
    compile : bool, str or dict
        See :class:`RiemannianOptimizer`.
    check_finite : bool
        See :class:`RiemannianOptimizer`.
    """

    spec_class = rules.RAdamW
    spec_keys: dict[str, str] = {}
    __init__ = _adamw_init(rules.RAdamW)

    def _check_group(self, index: int, group: dict) -> None:
        super()._check_group(index, group)
        if isinstance(group["lr"], torch.Tensor) and group["foreach"] and not group["fused"]:
            raise ValueError(
                f"param group {index}: a tensor lr needs foreach=False (or fused=True) for "
                "torch's AdamW of the ordinary parameters (torch: 'lr as a Tensor is not "
                "supported for capturable=False and foreach=True'); the step was not taken"
            )

    def _euclidean_step(self, group, params):
        _adamw_ordinary(self, group, params)


_G = rules.RAdaGrad


class RAdaGrad(RiemannianOptimizer):
    r"""Riemannian AdaGrad on low-rank layers (:class:`rankopt.rules.RAdaGrad`); Adagrad elsewhere.

    Low-rank layers: step along the exact Riemannian gradient of the metric from the
    accumulated row/column mean squares, with torch's schedule ``lr / (1 + (t - 1) lr_decay)``.
    Ordinary parameters: exactly ``torch.optim.Adagrad(lr, lr_decay, weight_decay,
    initial_accumulator_value, eps)`` (``initial_accumulator_value`` and ``eps`` apply to
    ordinary parameters only; ``metric_eps`` is the metric's relative floor).
    """

    spec_class = rules.RAdaGrad
    spec_keys: dict[str, str] = {}

    def __init__(
        self,
        params: Any,
        lr: float = _G.lr,
        lr_decay: float = _G.lr_decay,
        weight_decay: float = _G.weight_decay,
        initial_accumulator_value: float = torch_default(
            torch.optim.Adagrad, "initial_accumulator_value"
        ),
        eps: float = torch_default(torch.optim.Adagrad, "eps"),
        *,
        metric_eps: float = _G.metric_eps,
        factoring: str = _G.factoring,
        structure: str = _G.structure,
        solver: str = _G.solver,
        exact: bool = _G.exact,
        cg_tol: float | None = _G.cg_tol,
        cg_maxiter: int = _G.cg_maxiter,
        rank_tol: float | None = _G.rank_tol,
        max_rank: int | None = _G.max_rank,
        min_rank: int = _G.min_rank,
        foreach: bool | None = None,
        fused: bool | None = None,
        stack_layers: bool = True,
        compile: bool | str | dict = False,
        check_finite: bool = True,
    ) -> None:
        check_torch_eps(eps)
        if not initial_accumulator_value >= 0:
            raise ValueError(
                f"invalid initial_accumulator_value={initial_accumulator_value!r}: must be >= 0"
            )
        defaults = dict(
            lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, eps=eps, metric_eps=metric_eps,
            factoring=factoring, structure=structure, solver=solver, exact=exact, cg_tol=cg_tol,
            cg_maxiter=cg_maxiter, rank_tol=rank_tol, max_rank=max_rank, min_rank=min_rank,
            foreach=foreach, fused=fused, stack_layers=stack_layers, compile=compile,
        )  # fmt: skip
        super().__init__(params, defaults, check_finite)

    def _euclidean_step(self, group, params):
        _adagrad_ordinary(self, group, params)


_S = rules.RSGD


class RSGD(RiemannianOptimizer):
    r"""Riemannian SGD with (Nesterov) momentum (:class:`rankopt.rules.RSGD`); SGD elsewhere.

    Low-rank layers: momentum buffer kept as a tangent vector and transported; coupled L2
    weight decay as torch's SGD. Ordinary parameters: exactly
    ``torch.optim.SGD(lr, momentum, dampening, weight_decay, nesterov)``.
    """

    spec_class = rules.RSGD

    def __init__(
        self,
        params: Any,
        lr: float = _S.lr,
        momentum: float = _S.momentum,
        dampening: float = _S.dampening,
        weight_decay: float = _S.weight_decay,
        nesterov: bool = _S.nesterov,
        *,
        rank_tol: float | None = _S.rank_tol,
        max_rank: int | None = _S.max_rank,
        min_rank: int = _S.min_rank,
        foreach: bool | None = None,
        fused: bool | None = None,
        stack_layers: bool = True,
        compile: bool | str | dict = False,
        check_finite: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, rank_tol=rank_tol, max_rank=max_rank, min_rank=min_rank,
            foreach=foreach, fused=fused, stack_layers=stack_layers, compile=compile,
        )  # fmt: skip
        super().__init__(params, defaults, check_finite)

    def _euclidean_step(self, group, params):
        _sgd_ordinary(self, group, params)
