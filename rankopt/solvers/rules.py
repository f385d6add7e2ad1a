r"""Pure update rules on the fixed-rank manifold: the ONE implementation of each rule.

Every rule is a function ``step(manifold, x, grad, state, **hyper) -> (x_new, state_new)``:

* ``x`` is a :class:`~rankopt.FixedRankPoint`;
* ``grad`` is the tangent-projected Euclidean gradient ``P_x(G)`` (a
  :class:`~rankopt.TangentVector`), i.e. ``M = U^T G V``, ``Up = G V - U M``,
  ``Vp = G^T U - V M^T``; the torch layers produce exactly this without forming ``G``;
* ``state`` is an immutable dataclass whose arrays are O((m + n) r) (never m x n):
  tangent vectors (transported to the new point at the end of each step, so the state always
  lives at the current point) and row/column statistics (O(m + n)).

``rankopt.solvers`` (``RHeavyBall``, ``RAdaGrad``, ``RAdamW``, ``DLRA*``) and the torch optimizers
in ``rankopt.torch`` both call these functions. Cost of one step: O((m + n) r^2 + r^3) plus, for
the adaptive metrics, ``k`` PCG iterations of O((m + n) r^2) (``exact=True``).

Transport is by projection (``P_{x_new}`` of the ambient vector), which also works when the
rank changes (DLRA rules).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from ..containers import FixedRankPoint, TangentVector
from ..metrics import AdaGrad, Adam

__all__ = [
    "SGDState",
    "AdamState",
    "AdaGradState",
    "rsgd_init",
    "rsgd_step",
    "radamw_init",
    "radamw_step",
    "radagrad_init",
    "radagrad_step",
    "dlra_heavyball_init",
    "dlra_heavyball_step",
    "dlra_adam_init",
    "dlra_adam_step",
    "point_as_tangent",
    "state_to_dict",
    "state_from_dict",
]


def point_as_tangent(manifold, x: FixedRankPoint) -> TangentVector:
    """``X`` itself as a tangent vector at ``X`` (``M = diag(s)``, ``Up = Vp = 0``).

    ``X`` lies in its own tangent space, so ``R_X(-c X) = (1 - c) X`` exactly: decoupled
    weight decay is a tangent step.
    """
    be = manifold.backend
    r = int(x.s.shape[0])
    return TangentVector(be.diag(x.s), be.zeros((x.U.shape[0], r)), be.zeros((x.V.shape[0], r)))


def _retract(manifold, x, xi, rank_tol, max_rank):
    if rank_tol is None:
        return manifold._retract(x, xi)
    return manifold.retraction_adaptive(x, xi, rank_tol, max_rank=max_rank)


def _check_lr(lr: float) -> None:
    if not lr >= 0:
        raise ValueError(f"learning rate must be >= 0, got {lr}")


# ---------------------------------------------------------------------------
# Riemannian SGD with heavy-ball / Nesterov momentum
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SGDState:
    """State of :func:`rsgd_step`: step count and the momentum buffer (tangent at x)."""

    step: int = 0
    momentum_buffer: TangentVector | None = None


def rsgd_init(manifold, x: FixedRankPoint) -> SGDState:
    return SGDState()


def rsgd_step(
    manifold,
    x: FixedRankPoint,
    grad: TangentVector,
    state: SGDState,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    rank_tol: float | None = None,
    max_rank: int | None = None,
) -> tuple[FixedRankPoint, SGDState]:
    r"""Riemannian SGD with momentum, following ``torch.optim.SGD``'s conventions.

    ``d = grad + wd X`` (coupled L2, as torch.SGD); ``b <- mu T(b) + (1 - dampening) d`` (first
    step ``b = d``); direction ``d + mu b`` (Nesterov) or ``b``; ``x <- R_x(-lr dir)``; ``b`` is
    transported to the new point by projection (heavy ball on manifolds, e.g. Absil et al. /
    Ahn & Sra 2020 style with projection transport).
    """
    _check_lr(lr)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires momentum > 0 and dampening = 0")
    d = grad if weight_decay == 0 else grad.axpy(weight_decay, point_as_tangent(manifold, x))
    buf = state.momentum_buffer
    if momentum != 0:
        buf = d if buf is None else buf * momentum + d * (1.0 - dampening)
        direction = d.axpy(momentum, buf) if nesterov else buf
    else:
        direction = d
    x_new = _retract(manifold, x, direction * (-lr), rank_tol, max_rank)
    if buf is not None:
        buf = manifold._transport(x, x_new, buf)
    return x_new, SGDState(state.step + 1, buf)


# ---------------------------------------------------------------------------
# RAdaGrad
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AdaGradState:
    """State of :func:`radagrad_step`: the AdaGrad metric (accumulated row/column statistics)."""

    step: int
    metric: AdaGrad


def radagrad_init(
    manifold,
    x: FixedRankPoint,
    *,
    eps: float = 1e-10,
    exact: bool = True,
    cg_tol: float | None = 1e-10,
    cg_maxiter: int = 20,
) -> AdaGradState:
    return AdaGradState(0, AdaGrad(eps=eps, exact=exact, cg_tol=cg_tol, cg_maxiter=cg_maxiter))


def radagrad_step(
    manifold,
    x: FixedRankPoint,
    grad: TangentVector,
    state: AdaGradState,
    *,
    lr: float,
    weight_decay: float = 0.0,
    rank_tol: float | None = None,
    max_rank: int | None = None,
) -> tuple[FixedRankPoint, AdaGradState]:
    r"""RAdaGrad: Riemannian gradient under the AdaGrad metric, then retraction.

    ``g = grad + wd X`` (coupled, as torch.Adagrad); accumulate its row/column mean squares
    into the metric (frozen for this step); ``x <- R_x(-lr G_x^{-1} g)``. With ``exact`` the
    metric's PCG solve gives the true Riemannian gradient of the AdaGrad metric (Bian et al.,
    NeurIPS 2025, with statistics restricted to the tangent space).
    """
    _check_lr(lr)
    g = grad if weight_decay == 0 else grad.axpy(weight_decay, point_as_tangent(manifold, x))
    metric = state.metric.update(manifold, x, g)
    d = metric.solve(manifold, x, g)
    x_new = _retract(manifold, x, d * (-lr), rank_tol, max_rank)
    return x_new, AdaGradState(state.step + 1, metric)


# ---------------------------------------------------------------------------
# RAdamW
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AdamState:
    """State of :func:`radamw_step`: step count, first moment (tangent at x), Adam metric."""

    step: int
    exp_avg: TangentVector | None
    metric: Adam


def radamw_init(
    manifold,
    x: FixedRankPoint,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    exact: bool = True,
    cg_tol: float | None = 1e-10,
    cg_maxiter: int = 20,
) -> AdamState:
    return AdamState(
        0, None, Adam(eps=eps, beta2=betas[1], exact=exact, cg_tol=cg_tol, cg_maxiter=cg_maxiter)
    )


def radamw_step(
    manifold,
    x: FixedRankPoint,
    grad: TangentVector,
    state: AdamState,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float | None = None,
    weight_decay: float = 0.01,
    rank_tol: float | None = None,
    max_rank: int | None = None,
) -> tuple[FixedRankPoint, AdamState]:
    r"""RAdamW: Adam on the manifold with decoupled weight decay.

    ``t <- t + 1``; the Adam metric takes the row/column statistics of ``grad`` (EMA with
    ``beta2``, bias-corrected); the first moment ``m <- beta1 T(m) + (1 - beta1) grad`` (kept
    as a tangent vector, transported by projection); ``m_hat = m / (1 - beta1^t)``; direction
    ``G_x^{-1} m_hat`` (the metric's solve: preconditioning applied after averaging, as Adam
    does); ``x <- R_x(-lr (G_x^{-1} m_hat + wd X))``, where the weight-decay part alone would
    give exactly ``(1 - lr wd) X``. ``eps``, if given, overrides the metric's.
    """
    _check_lr(lr)
    b1, b2 = betas
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"betas must lie in [0, 1), got {betas}")
    metric = state.metric
    if metric.beta2 != b2 or (eps is not None and metric.eps != eps):
        metric = replace(metric, beta2=b2, eps=metric.eps if eps is None else eps)
    metric = metric.update(manifold, x, grad)
    m = grad * (1.0 - b1) if state.exp_avg is None else state.exp_avg * b1 + grad * (1.0 - b1)
    t = state.step + 1
    d = metric.solve(manifold, x, m / (1.0 - b1**t))
    if weight_decay != 0:
        d = d.axpy(weight_decay, point_as_tangent(manifold, x))
    x_new = _retract(manifold, x, d * (-lr), rank_tol, max_rank)
    return x_new, AdamState(t, manifold._transport(x, x_new, m), metric)


# ---------------------------------------------------------------------------
# Dynamical low-rank (rank-adaptive) momentum methods
# ---------------------------------------------------------------------------


def dlra_heavyball_init(manifold, x: FixedRankPoint) -> SGDState:
    return SGDState()


def dlra_heavyball_step(
    manifold,
    x: FixedRankPoint,
    grad: TangentVector,
    state: SGDState,
    *,
    lr: float,
    momentum: float = 0.9,
    rank_tol: float | None = 1e-3,
    max_rank: int | None = None,
    weight_decay: float = 0.0,
) -> tuple[FixedRankPoint, SGDState]:
    r"""Geometry-aware low-rank heavy ball (after Schotthöfer, Klein, Kusch, NeurIPS 2025).

    The momentum lives in the tangent space (projected/transported, never the factors'
    gradients), the step augments the basis to ``[U, Up]``, ``[V, Vp]`` (rank <= 2r) and
    truncates the 2r x 2r core at ``rank_tol`` (:meth:`FixedRankManifold.retraction_adaptive`),
    so the rank grows or shrinks. This is :func:`rsgd_step` with momentum and a rank-adaptive
    retraction: one implementation. ``rank_tol=None`` keeps the rank.
    """
    return rsgd_step(
        manifold,
        x,
        grad,
        state,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        rank_tol=rank_tol,
        max_rank=max_rank,
    )


dlra_adam_init = radamw_init


def dlra_adam_step(
    manifold,
    x: FixedRankPoint,
    grad: TangentVector,
    state: AdamState,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float | None = None,
    weight_decay: float = 0.0,
    rank_tol: float | None = 1e-3,
    max_rank: int | None = None,
) -> tuple[FixedRankPoint, AdamState]:
    r"""Geometry-aware low-rank Adam: :func:`radamw_step` with the rank-adaptive retraction."""
    return radamw_step(
        manifold,
        x,
        grad,
        state,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        rank_tol=rank_tol,
        max_rank=max_rank,
    )


# ---------------------------------------------------------------------------
# (de)serialization for torch state_dict
# ---------------------------------------------------------------------------

_STATES = {c.__name__: c for c in (SGDState, AdaGradState, AdamState)}
_METRICS = {c.__name__: c for c in (AdaGrad, Adam)}


def state_to_dict(state: Any) -> dict:
    """A plain dict (arrays, numbers, strings) describing a rule state, for ``state_dict()``."""
    out: dict[str, Any] = {"__state__": type(state).__name__}
    for f in fields(state):
        v = getattr(state, f.name)
        if isinstance(v, TangentVector):
            out[f.name] = {"__tangent__": True, "M": v.M, "Up": v.Up, "Vp": v.Vp}
        elif isinstance(v, (AdaGrad, Adam)):
            out[f.name] = {
                "__metric__": type(v).__name__,
                **{
                    k.name: getattr(v, k.name) for k in fields(v) if k.name not in ("left", "right")
                },
            }
        else:
            out[f.name] = v
    return out


def state_from_dict(d: dict) -> Any:
    """Inverse of :func:`state_to_dict`."""
    cls = _STATES[d["__state__"]]
    kw = {}
    for f in fields(cls):
        v = d[f.name]
        if isinstance(v, dict) and v.get("__tangent__"):
            v = TangentVector(v["M"], v["Up"], v["Vp"])
        elif isinstance(v, dict) and "__metric__" in v:
            mcls = _METRICS[v["__metric__"]]
            v = mcls(**{k: val for k, val in v.items() if k != "__metric__"})
        kw[f.name] = v
    return cls(**kw)
