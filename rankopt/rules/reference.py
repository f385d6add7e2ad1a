r"""The RAdamW and RAdaGrad of the authors' public code, as reference rules (dense m x n state).

Bian, Zheng, Liu, Luo, Cai (NeurIPS 2025) published their optimizer as one class, ``RGD_Opt``
(github ``cwb-clearwing/RAdaGrad``), used with ``pre=False`` as "RAdamW" (``Mix-of-Show``
fine-tuning: an AdamW step on the dense weight, then projection and retraction) and with
``pre=True`` as "RAdaGrad" (``MNIST_experiments``: an SGD step on a preconditioned dense
gradient, then a weighted formula and retraction). These specs reproduce those two algorithms
step for step on a point ``X = U diag(s) V^T`` of the fixed-rank manifold, so that they can be
compared with rankopt's own :class:`~rankopt.rules.RAdamW` and :class:`~rankopt.rules.RAdaGrad`
(which are different algorithms; see ``docs/optimizers.md``).

Both need the **dense Euclidean gradient** ``G`` (m x n) at every step, passed as
``step(..., egrad=G)`` (the NumPy solvers and the torch optimizers do this); the tangent
gradient argument is not used. :class:`ReferenceRAdamW` keeps **two dense m x n moments**
(``2 m n`` numbers per matrix, against ``O((m + n) r)`` for rankopt's rules);
:class:`ReferenceRAdaGrad` keeps none (its preconditioner comes from the current gradient
only) but forms m x n matrices every step. Cost per step O(m n r) for both.

``faithful`` (default False) reproduces the documented defects of the code:

* RAdaGrad's weighted formula (the map from the dense step ``W'`` to the matrix that is
  retracted) is not a projection: with ``D_L``, ``D_R`` the preconditioner's diagonals,
  ``A_L = U^T D_L U`` and ``A_R = V^T D_R V``, the code forms

  ``Y1 = A_L U^T D_L W'``, ``Y2 = W' D_R V A_R``,
  ``K0 = Y1 V + U^T Y2 - A_L U^T D_L Y2``,
  ``T = U K0 V^T + U Y1 (I - V V^T) + (I - U U^T) Y2 V^T``

  and retracts ``T``. For ``D = I`` it is the tangent projection ``P_X(W')``; otherwise even
  ``lr = 0`` moves ``X`` (``K0 = A_L^2 S + S A_R^2 - A_L^2 S A_R^2`` instead of ``S``).
  ``faithful=False`` retracts ``P_X(W')``, the projection.
* the rank truncation (both rules, only with ``rank_tol``) measures the tail
  ``||s_{j:2r-1}||`` without the last of the 2r singular values, and never keeps fewer than 2
  (hard-coded). ``faithful=False`` uses the full tail ``||s_{j:}||`` and ``min_rank``.

In both modes the rank never grows (the authors' truncation keeps at most the current rank).

**The first step** (state count 0), from any start, is the code's: its layers hold a dense
weight until their first step (``p.s is None``), which is the dense AdamW/SGD step ``W'`` of
the current weight followed by ``X_1 = H_r(W')``, a truncated **dense** SVD (O(m n min(m, n)),
once per matrix), and then, in the same step, the code's retraction and truncation at that
point: the weighted formula ``T(X_1)`` (RAdaGrad with ``faithful=True``; otherwise ``X_1``
itself) retracted, and with ``rank_tol`` truncated by the rule above (so a faithful run with
``rank_tol`` may lower the rank at step 1, e.g. to 2 at ``theta`` 0.3). From a point ``X`` of
rank r this differs from a step on the manifold (``H_r(W')`` against ``H_r(P_X(W'))``). The
torch optimizers pass an adapter's start ``X = 0`` as ``U0 0 V0^T``. Not reproduced, in either
mode (documented in ``docs/optimizers.md``): in the MNIST code, a ``momentum`` buffer and a
coupled weight decay that are computed but never used by the update (dead code); and the case
``rank < minimum_rank``, where the code skips the retraction and leaves the weight dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..containers import FixedRankPoint, TangentVector
from ..geometry import truncation_rank
from .base import Rule, check_common, count_init, state
from .registry import register

__all__ = [
    "ReferenceAdamState",
    "ReferenceState",
    "ReferenceRule",
    "ReferenceRAdamW",
    "ReferenceRAdaGrad",
]


@state
class ReferenceAdamState:
    """State of :class:`ReferenceRAdamW`: count and the dense AdamW moments (m x n each)."""

    count: Any
    exp_avg: Any
    exp_avg_sq: Any


@state
class ReferenceState:
    """State of :class:`ReferenceRAdaGrad`: the step count only (no statistics are kept)."""

    count: Any


def _t(a: Any) -> Any:
    return a.swapaxes(-1, -2)


def faithful_truncation_rank(s: np.ndarray, rank_tol: float, rank: int) -> int:
    """The authors' truncation rule on the 2r singular values ``s`` of the retraction's core.

    ``j`` = the first index in ``0 .. 2r - 2`` with ``||s_{j:2r-1}|| < rank_tol ||s||`` (the
    tail leaves out the last value ``s_{2r-1}``), else ``r``; then ``min(j, r)`` and at least 2.
    O(r^2).
    """
    two_r = len(s)
    tol = rank_tol * float(np.linalg.norm(s))
    keep = rank
    for j in range(two_r - 1):
        if float(np.linalg.norm(s[j : two_r - 1])) < tol:
            keep = j
            break
    return max(min(keep, rank), 2)


def _truncated(spec: Any, manifold, x: FixedRankPoint, xi: TangentVector) -> Any:
    """``H_j(X + xi)`` with ``j`` from the (faithful or corrected) truncation rule, never above
    the current rank; ``H_r(X + xi)`` without ``rank_tol``. A list of points for a stack."""
    g = manifold.geometry
    if spec.rank_tol is None:
        return g.retract(x, xi)
    U, qu, A, s2, B, V, qv = g.sum_svd(x, xi, 1.0)
    sv = manifold.backend.to_numpy(s2).astype(np.float64)
    r = x.rank
    batch = x.batch_shape
    points = []
    for i, row in enumerate(sv.reshape(-1, sv.shape[-1])):
        if spec.faithful:
            j = faithful_truncation_rank(row, spec.rank_tol, r)
        else:
            j = min(max(truncation_rank(row, spec.rank_tol), spec.min_rank), r)
        while j > 1 and not row[j - 1] > 0:  # exact zeros are off the manifold
            j -= 1
        k = np.unravel_index(i, batch) if batch else ()
        points.append(
            FixedRankPoint(
                g.combine(U[k], qu[k], A[k], j)[0],
                s2[k][..., :j],
                g.combine(V[k], qv[k], B[k], j)[0],
            )
        )
    return points if batch else points[0]


def _first_items(count: Any) -> Any:
    """Which items take the code's first step: True/False for all of them, or None when a
    stack mixes first and later steps (then each item is stepped on its own)."""
    first = np.asarray(count) == 0
    return bool(first.all()) if first.all() or not first.any() else None


def _dense_truncation(manifold, W: Any, r: int) -> FixedRankPoint:
    """``H_r(W)`` of a dense (stack of) m x n matrices by a full SVD: O(m n min(m, n))."""
    U, s, Vh = manifold.backend.svd(W)
    return FixedRankPoint(U[..., :, :r], s[..., :r], _t(Vh[..., :r, :]))


def _first_step(spec: Any, manifold, W: Any, r: int, weighted: Any = None) -> Any:
    """The code's first step from the dense stepped weight ``W``: ``X_1 = H_r(W)``, then its
    retraction of ``T(X_1)`` (``weighted(X_1)``, a tangent vector, or ``X_1`` itself) with the
    truncation at ``rank_tol``. O(m n min(m, n))."""
    y = _dense_truncation(manifold, W, r)
    if weighted is None and spec.rank_tol is None:
        return y
    xi = weighted(y) if weighted is not None else manifold.geometry.zero_vector(y)
    return _truncated(spec, manifold, y, xi)


def _item(a: Any, k: tuple) -> Any:
    """Item ``k`` of a per-item array (numbers pass through)."""
    return a if np.ndim(a) == 0 else a[k]


def _item_steps(spec: Any, manifold, x: FixedRankPoint, state: Any, egrad: Any, lr: Any):
    """Step each item of a stack on its own (lists of points and states): a stack whose items
    are at their first step and at later steps."""
    batch = x.batch_shape
    points, states = [], []
    for i in range(int(np.prod(batch))):
        k = np.unravel_index(i, batch)
        xk = FixedRankPoint(x.U[k], x.s[k], x.V[k])
        sk = type(state)(*(getattr(state, f)[k] for f in type(state).FIELDS))
        y, st = spec.step(manifold, xk, None, sk, lr=_item(lr, k), egrad=egrad[k])
        points.append(y)
        states.append(st)
    return points, states


def _need_dense(egrad: Any, x: FixedRankPoint, name: str) -> None:
    if egrad is None:
        raise ValueError(
            f"{name} needs the dense Euclidean gradient: call step(..., egrad=G) with G of shape "
            f"(..., {x.shape[0]}, {x.shape[1]}) (the authors' code works on the dense gradient)"
        )
    if tuple(egrad.shape[-2:]) != tuple(x.shape):
        raise ValueError(
            f"egrad has shape {tuple(egrad.shape)}, expected (..., {x.shape[0]}, {x.shape[1]})"
        )


def _split_items(x: FixedRankPoint, points: Any, state: Any, make) -> tuple[Any, Any]:
    """After a truncation of a stack: one state per item (``make(k)``)."""
    if not isinstance(points, list):
        return points, state
    batch = x.batch_shape
    return points, [make(np.unravel_index(i, batch)) for i in range(len(points))]


@dataclass(frozen=True, kw_only=True)
class ReferenceRule(Rule):
    """What the reference rules share: the dense gradient as input, a truncation that only
    lowers the rank.

    Parameters
    ----------
    rank_tol : float or None
        The code's ``theta``: truncate to the smallest rank ``j`` whose tail of singular values
        is below ``rank_tol ||s||`` (only lowers the rank; None: fixed rank).
    min_rank : int
        Smallest rank the (corrected) truncation keeps.
    max_rank : int or None
        Not used by these rules (the rank never grows); must stay None.
    """

    gradient_input: ClassVar[str] = "dense"
    rank_semantics: ClassVar[str] = "truncation"


@register(method="reference-radamw", ordinary="adamw", namespace="reference")
@dataclass(frozen=True, kw_only=True)
class ReferenceRAdamW(ReferenceRule):
    r"""The authors' RAdamW, step for step (``RGD_Opt(pre=False)`` of their Mix-of-Show code).

    With the dense gradient ``G``, ``t <- t + 1``::

        m <- beta1 m + (1 - beta1) G                 (m x n)
        v <- beta2 v + (1 - beta2) G * G             (m x n, elementwise)
        W' = X - lr_t m / (sqrt(v) + eps)            (ambient AdamW step)
        W'' = (1 - lr wd) W'                         (decoupled decay, on the stepped weight)
        X <- H_r(P_X(W''))                           (tangent projection, QR + 2r x 2r SVD)

    with ``lr_t = lr`` (their code applies no bias correction: ``correct_bias`` is read from
    the param group, which never has it) or ``lr sqrt(1 - beta2^t) / (1 - beta1^t)`` with
    ``correct_bias=True``. Defaults are the code's: ``eps=1e-6``, and ``betas=(0.9, 0.999)``,
    ``weight_decay=0.01`` from its training configuration. ``rank_tol`` (their ``theta``,
    default 0.1 in the code, which truncates whatever lies below a tenth of ``||s||``) is off
    by default here: the rank stays fixed. The moments are never transported: they are ambient
    m x n arrays, as in the code.

    State: ``2 m n`` numbers per matrix. Cost: O(m n r) per step.

    Parameters
    ----------
    lr : float
        Learning rate.
    betas : tuple of float
        AdamW's ``(beta1, beta2)`` of the dense moments.
    eps : float
        Adam's epsilon added to ``sqrt(v)`` (the code's 1e-6; also torch's AdamW of the ordinary
        parameters in the torch optimizer, as the code applies one AdamW to everything).
    weight_decay : float
        Decoupled weight decay on the stepped dense weight.
    correct_bias : bool
        Adam's bias correction (the code never sets it: False).
    faithful : bool
        Reproduce the code's documented defects (its truncation rule, see the module docstring).
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.01
    correct_bias: bool = False
    faithful: bool = False

    def __post_init__(self) -> None:
        check_common(self)

    def init(self, manifold, x: FixedRankPoint) -> ReferenceAdamState:
        be = manifold.backend
        dense = be.zeros((*x.batch_shape, *x.shape))
        return ReferenceAdamState(count_init(manifold, x), dense, be.xp.zeros_like(dense))

    def step(
        self, manifold, x, grad, state: ReferenceAdamState, *, lr: Any = None, egrad: Any = None
    ):
        _need_dense(egrad, x, type(self).__name__)
        lr = self.lr if lr is None else lr
        first = _first_items(state.count)
        if first is None:
            return _item_steps(self, manifold, x, state, egrad, lr)
        xp = manifold.backend.xp
        b1, b2 = self.betas
        t = state.count + 1
        m = b1 * state.exp_avg + (1.0 - b1) * egrad
        v = b2 * state.exp_avg_sq + (1.0 - b2) * egrad * egrad
        step = lr
        if self.correct_bias:
            tt = t[..., None, None] if getattr(t, "ndim", 0) > 0 else t
            step = lr * (1.0 - b2**tt) ** 0.5 / (1.0 - b1**tt)
        D = -step * m / (xp.sqrt(v) + self.eps)  # W' - X
        # W'' - X = (1 - lr wd)(X + D) - X = (1 - lr wd) D - lr wd X; X is tangent at X
        decay = 1.0 - lr * self.weight_decay
        new = ReferenceAdamState(t, m, v)
        if first:  # the code's first step: H_r(W'') of the dense weight, then its truncation
            y = _first_step(self, manifold, (x.to_dense() + D) * decay, x.rank)
            return _split_items(x, y, new, lambda k: ReferenceAdamState(_item(t, k), m[k], v[k]))
        xi = manifold.geometry.project(x, D * decay)
        if self.weight_decay != 0:
            xi = TangentVector(
                xi.M - (lr * self.weight_decay) * manifold.backend.diag(x.s), xi.Up, xi.Vp
            )
        y = _truncated(self, manifold, x, xi)
        return _split_items(x, y, new, lambda k: ReferenceAdamState(_item(t, k), m[k], v[k]))


@register(
    method="reference-radagrad",
    ordinary="sgd",
    ordinary_fixed={"momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False},
    namespace="reference",
)
@dataclass(frozen=True, kw_only=True)
class ReferenceRAdaGrad(ReferenceRule):
    r"""The authors' RAdaGrad (``RGD_Opt(pre=True)`` of their MNIST code), step for step.

    With the dense gradient ``G``::

        D_L = (metric_eps + diag(G G^T))^{1/4},  D_R = (metric_eps + diag(G^T G))^{1/4}
        W' = X - lr D_L^{-1} G D_R^{-1}              (an SGD step on the preconditioned G)
        X <- H_r(T(W'))

    where ``T`` is the code's weighted formula (``faithful=True``, see the module docstring;
    not a projection) or the tangent projection ``P_X`` (``faithful=False``). The preconditioner
    comes from the current gradient alone (no accumulation over steps, despite the name), with
    ``metric_eps = 1`` (absolute; the code's ``epsilon``) as in the MNIST training script (the
    class default there is 0.01).
    ``rank_tol`` is their ``theta`` (off by default; see :class:`ReferenceRAdamW`).

    State: the count only. Cost: O(m n r) per step (m x n temporaries).

    Parameters
    ----------
    lr : float
        Learning rate.
    metric_eps : float
        The preconditioner's absolute floor (the code's ``epsilon``; 1 in its MNIST script).
    faithful : bool
        Reproduce the code's documented defects (the weighted formula and its truncation rule).
    """

    lr: float = 1e-2
    metric_eps: float = 1.0
    faithful: bool = False

    def __post_init__(self) -> None:
        check_common(self)

    def init(self, manifold, x: FixedRankPoint) -> ReferenceState:
        return ReferenceState(count_init(manifold, x))

    def step(self, manifold, x, grad, state: ReferenceState, *, lr: Any = None, egrad: Any = None):
        _need_dense(egrad, x, type(self).__name__)
        lr = self.lr if lr is None else lr
        first = _first_items(state.count)
        if first is None:
            return _item_steps(self, manifold, x, state, egrad, lr)
        xp = manifold.backend.xp
        sq = egrad * egrad
        dl = (self.metric_eps + xp.sum(sq, axis=-1)) ** 0.25  # (..., m)
        dr = (self.metric_eps + xp.sum(sq, axis=-2)) ** 0.25  # (..., n)
        D = (-lr) * egrad / (dl[..., :, None] * dr[..., None, :])  # W' - X
        t = state.count + 1
        new = ReferenceState(t)
        if first:  # the code's first step: H_r(W'), then its weighted formula at that point

            def weighted(y):
                return self._weighted(manifold, y, 0.0 * D, dl, dr)

            W = x.to_dense() + D
            y = _first_step(self, manifold, W, x.rank, weighted if self.faithful else None)
            return _split_items(x, y, new, lambda k: ReferenceState(_item(t, k)))
        if self.faithful:
            xi = self._weighted(manifold, x, D, dl, dr)
        else:
            xi = manifold.geometry.project(x, D)
        y = _truncated(self, manifold, x, xi)
        return _split_items(x, y, new, lambda k: ReferenceState(_item(t, k)))

    @staticmethod
    def _weighted(manifold, x: FixedRankPoint, D: Any, dl: Any, dr: Any) -> TangentVector:
        r"""``T(W') - X`` as a tangent vector at ``X`` (``W' = X + D``): the code's formula.

        ``T = U K0 V^T + U Y1 (I - V V^T) + (I - U U^T) Y2 V^T`` is ``X + xi`` with
        ``xi = (K0 - S, (I - U U^T) Y2, (I - V V^T) Y1^T)``. O(m n r).
        """
        U, V = x.U, x.V
        W = x.to_dense() + D
        DLU, DRV = dl[..., :, None] * U, dr[..., :, None] * V
        AL, AR = _t(U) @ DLU, _t(V) @ DRV
        Y1 = AL @ (_t(DLU) @ W)  # r x n
        Y2 = (W @ DRV) @ AR  # m x r
        K0 = Y1 @ V + _t(U) @ Y2 - AL @ (_t(DLU) @ Y2)
        Up = Y2 - U @ (_t(U) @ Y2)
        Y1t = _t(Y1)
        Vp = Y1t - V @ (_t(V) @ Y1t)
        return TangentVector(K0 - manifold.backend.diag(x.s), Up, Vp)
