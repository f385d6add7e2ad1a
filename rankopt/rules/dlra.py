r"""DLRAHeavyBall and DLRAAdam: the augmented BUG integrator with optimizer moments on the core.

After the dynamical low-rank training of Schotthöfer, Klein, Kusch (NeurIPS 2025) and the
rank-adaptive "basis update & Galerkin" (BUG) integrator of Ceruti, Kusch, Lubich (BIT 2022),
as the group's public training layers implement it for optimizers with state. One step at
``X = U diag(s) V^T`` (rank r) with the Euclidean gradient ``G``:

1. **K- and L-steps (basis augmentation).** The K-step moves ``K = U S`` along
   ``-dL/dK = -G V``, the L-step ``L = V S^T`` along ``-G^T U``; the new bases span
   ``[U, G V]`` and ``[V, G^T U]``: ``U_hat = [U, Q_u]``, ``V_hat = [V, Q_v]`` with
   ``Q_u`` an orthonormal basis of ``U.grad = (I - U U^T) G V`` and ``Q_v`` of
   ``V.grad = (I - V V^T) G^T U`` (:func:`complement_basis`: left singular vectors, at most
   ``min(r, m - r)`` and ``min(r, n - r)`` columns; columns that only complete a rank-deficient
   tangent piece are set by rounding and get no gradient, no moment and no metric coupling, so
   the step never depends on them). Rank at most ``2r``.
2. **Moments carried over.** The core ``S_hat = U_hat^T X V_hat = [[S, 0], [0, 0]]``; the
   optimizer's moments live on the core, in the current bases, and are carried the same way
   (zero blocks for the new directions).
3. **Galerkin step** on the augmented core with the gradient of the loss with respect to that
   core, ``G_hat = U_hat^T G V_hat = [[M, R_v^T], [R_u, N]]`` with ``M = U^T G V`` and
   ``N = Q_u^T G Q_v``, the **normal-normal block**, which the tangent vector does not contain
   (the callers pass it: ``step(..., normal=f)`` with ``f(Q_u, Q_v) = Q_u^T G Q_v``).
   DLRAHeavyBall: ``b <- mu b + (G_hat + wd S_hat)``, ``S_hat <- S_hat - lr b`` (torch.SGD's
   heavy ball, first step ``b = G_hat + wd S_hat``). DLRAAdam: Adam on the core entries
   with the first moment on the core and, by default, the Galerkin step under the
   Adafactor-factored metric (``second_moment="factored"``), or elementwise Adam on the core
   (``second_moment="core"``, what the group's layers do), decoupled decay; see
   :class:`DLRAAdam`.
4. **Truncation.** ``S_hat = P diag(d) Q^T`` (SVD of the augmented core); keep the smallest ``j`` with
   ``||d_{j:}|| <= rank_tol ||d||`` (:func:`rankopt.geometry.truncation_rank`), clipped to
   ``[min_rank, max_rank]`` (``max_rank=None``: the rank at ``init``, a budget that never
   grows) and never keeping exact zeros; ``rank_tol=None`` keeps the rank ``r`` (fixed-rank
   BUG). ``U <- U_hat P_j``, ``V <- V_hat Q_j``, ``s <- d_{:j}``; the moments rotate with the
   bases: ``m <- P_j^T m Q_j``, ``b`` likewise, and the second moment through its square root,
   ``v <- (P_j^T sqrt(v) Q_j)^2`` (as the group's layers do).

This differs from a step in the tangent space followed by a (rank-adaptive) retraction, which
is what rankopt's ``RSGD``/``RAdamW`` with ``rank_tol`` do: at fixed rank the two agree to
O(lr^2), but the normal-normal block ``N`` enters at O(lr) and is what lets the rank grow
towards the gradient's normal directions. The state is O(r^2) per matrix (moments on the
core; plus O(m + n) row/column statistics for DLRAAdam's default). Cost per step: the basis
augmentation and two basis combinations, O((m + n) r^2), the SVD of the (at most) 2r x 2r core,
O(r^3), plus the normal block (O((m + n) r^2) products from a dense or factored
gradient, or O(b (m + n) r) from a layer's captured batch). One host read per step (the
singular values, for the truncation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..containers import FixedRankPoint, TangentVector
from ..geometry import truncation_rank
from ..metrics import ADAPTIVE_EPS, adaptive_diagonals
from .base import Rule, check_common, count_init, started, state
from .registry import register

__all__ = [
    "DLRAHeavyBall",
    "DLRAAdam",
    "DLRAState",
    "DLRAAdamState",
    "normal_block_of",
]

#: a function ``(Q_u, Q_v) -> Q_u^T G Q_v`` of stacked bases ``(..., m, r)``, ``(..., n, r)``
NormalBlock = Callable[[Any, Any], Any]


def _t(a: Any) -> Any:
    return a.swapaxes(-1, -2)


def normal_block_of(manifold, Z: Any) -> NormalBlock:
    """``(Q_u, Q_v) -> Q_u^T Z Q_v`` for an ambient gradient ``Z`` (dense, sparse, factored, or a
    tuple of those; dense stacks too): what the DLRA rules need besides the tangent vector.

    Cost O(nnz r + m r^2) (sparse), O(m n r) (dense), O((m + n) k r) (factored, rank k).
    """
    g = manifold.geometry
    return lambda Qu, Qv: _t(Qu) @ g.matmul(Z, Qv)


_OMEGAS: dict = {}

#: a complement direction counts as part of the K-/L-step span when its QR diagonal exceeds
#: this many times the regularization ``tau sqrt(m)`` (``tau`` = eps times the largest entry)
SPAN_FACTOR = 1e3


def _omega(be, m: int, r: int) -> Any:
    """A fixed m x r Gaussian matrix (seed 0) on ``be``, cached per backend and shape."""
    key = (be.name, str(be.dtype), str(be.device), m, r)
    if key not in _OMEGAS:
        _OMEGAS[key] = be.asarray(np.random.default_rng(0).standard_normal((m, r)))
    return _OMEGAS[key]


def complement_basis(be, F: Any, P: Any, k: int | None = None) -> tuple[Any, Any]:
    r"""An orthonormal basis ``Q`` (..., m, k) of the dominant part of ``span(P)``, orthogonal to
    ``F``, completed to k columns; the columns in ``span(P)`` come first.

    ``P`` (..., m, r) is (nearly) orthogonal to the orthonormal ``F`` (m x r, a tangent piece);
    ``k`` defaults to r and is at most ``m - r`` (the room left next to ``F``). With
    ``tau = eps max|P|``, ``P_t = (I - F F^T)(P + tau Omega)`` (``Omega`` a fixed Gaussian
    matrix, so that ``Q`` has k independent columns even where ``P`` is rank-deficient).
    ``P_t = Q_0 R`` (QR), ``R = W diag(d) Z^T`` (SVD): ``Q_0 W`` are the left singular vectors
    of ``P_t``, ordered by ``d``, and ``Q`` is its first k columns, projected against ``F`` and
    orthonormalized once more ("twice is enough"; Gram-Schmidt order keeps the span of the
    leading columns), which makes ``F^T Q`` rounding-level also for the completing columns.

    Returns ``Q`` and a 0/1 array (..., k) marking the columns that lie in ``span(P)``
    (singular value above ``SPAN_FACTOR tau sqrt(m)``): a leading block. The span of that block
    is a continuous function of ``P`` (a rank-revealing factorization: a plain QR of ``P_t``
    would mix a completing direction into later columns whenever an early column of ``P`` is
    negligible, and so make even the kept span depend on rounding). The completing columns are
    set by rounding and ``Omega``: callers must not let anything depend on them.
    O(m r^2 + r^3): a QR, an r x r SVD, a second QR and four products of size m x r x r.
    """
    xp = be.xp
    m, r = P.shape[-2], P.shape[-1]
    k = r if k is None else k
    tiny = 1e-25 if be.is_float32 else 1e-280
    tau = be.eps * (xp.max(xp.abs(P), axis=(-2, -1)) + tiny)
    Pt = P + tau[..., None, None] * _omega(be, m, r)
    Pt = Pt - F @ (_t(F) @ Pt)
    Q0, R = be.qr(Pt)
    W, sv, _ = be.svd(R)
    Q, d = Q0 @ W[..., :, :k], sv[..., :k]
    Q = Q - F @ (_t(F) @ Q)
    Q, _ = be.qr(Q)
    keep = d > (SPAN_FACTOR * float(np.sqrt(m))) * tau[..., None]
    return Q, xp.astype(keep, P.dtype)


@state
class DLRAState:
    """State of :class:`DLRAHeavyBall`: count, core momentum (r x r, in the bases of the current
    point) and the rank budget (the rank at ``init``)."""

    count: Any
    momentum_buffer: Any
    rank_cap: Any


@state
class DLRAAdamState:
    """State of :class:`DLRAAdam`: count, core first moment (r x r, in the bases of the current
    point), the rank budget (the rank at ``init``), and the second moment: entrywise on the core
    (``exp_avg_sq``, r x r, ``second_moment="core"``) or the row and column mean squares of the
    core gradients' ambient matrices (``row_stats`` (m), ``col_stats`` (n),
    ``second_moment="factored"``)."""

    count: Any
    exp_avg: Any
    rank_cap: Any
    exp_avg_sq: Any = None
    row_stats: Any = None
    col_stats: Any = None


def _pad(be, a: Any, rows: int, cols: int) -> Any:
    """``[[a, 0], [0, 0]]`` of shape (..., rows, cols): an r x r core matrix in the augmented
    bases."""
    xp = be.xp
    r = a.shape[-1]
    right = xp.zeros((*a.shape[:-1], cols - r), dtype=a.dtype, device=be.device_of(a))
    top = be.concat([a, right], -1)
    bottom = xp.zeros((*a.shape[:-2], rows - r, cols), dtype=a.dtype, device=be.device_of(a))
    return be.concat([top, bottom], -2)


def _used_columns(be, x: FixedRankPoint, grad: TangentVector) -> tuple[TangentVector, tuple]:
    r"""The gradient without the columns of ``U``, ``V`` that carry neither the point nor the
    gradient, and the 0/1 flags (..., r) of the others.

    Column i of ``U`` counts when ``s_i > 0`` or the gradient touches it,
    ``||M_{i,:}||^2 + ||Vp_{:,i}||^2 > (SPAN_FACTOR sqrt(max(m, n)) tau)^2`` with
    ``tau = eps max|grad|`` (column j of ``V`` with ``M_{:,j}`` and ``Up_{:,j}``): at a point
    with ``s_i = 0`` and no gradient there (an adapter's start from a gradient of lower rank),
    ``u_i`` is arbitrary, and the gradient's rounding-level entries there are set to zero. At
    a point with ``s > 0`` every flag is 1 and the gradient is unchanged. O((m + n) r).
    """
    xp = be.xp
    (m, n), tiny = x.shape, (1e-25 if be.is_float32 else 1e-280)
    big = xp.maximum(xp.max(xp.abs(grad.M), axis=(-2, -1)), xp.max(xp.abs(grad.Up), axis=(-2, -1)))
    big = xp.maximum(big, xp.max(xp.abs(grad.Vp), axis=(-2, -1)))
    thr = (SPAN_FACTOR * float(np.sqrt(max(m, n))) * be.eps * (big + tiny))[..., None] ** 2
    on = x.s > 0
    u_sq = xp.sum(grad.M * grad.M, axis=-1) + xp.sum(grad.Vp * grad.Vp, axis=-2)
    v_sq = xp.sum(grad.M * grad.M, axis=-2) + xp.sum(grad.Up * grad.Up, axis=-2)
    u0 = xp.astype(on | (u_sq > thr), grad.M.dtype)
    v0 = xp.astype(on | (v_sq > thr), grad.M.dtype)
    M = grad.M * (u0[..., :, None] * v0[..., None, :])
    return TangentVector(M, grad.Up * v0[..., None, :], grad.Vp * u0[..., None, :]), (u0, v0)


def _cap_init(manifold, x: FixedRankPoint) -> Any:
    if not x.batch_shape:
        return x.rank
    return manifold.backend.zeros(x.batch_shape) + float(x.rank)


@dataclass(frozen=True, kw_only=True)
class _BUG(Rule):
    """What both DLRA rules share: the augmentation, the truncation and moving the moments.

    Parameters
    ----------
    rank_tol : float or None
        Truncation tolerance: keep the smallest rank ``j`` with ``||d_{j:}|| <= rank_tol ||d||``
        of the stepped core's singular values ``d`` (None: keep the rank).
    max_rank : int or None
        Largest rank kept after the truncation (None: each matrix's rank at ``init``, a budget
        that never grows).
    min_rank : int
        Smallest rank kept after the truncation.
    """

    gradient_input: ClassVar[str] = "normal"
    rank_semantics: ClassVar[str] = "budget"
    #: state fields that are core matrices rotated as ``P^T a Q`` / through their square root
    _linear: ClassVar[tuple[str, ...]] = ()
    _squared: ClassVar[tuple[str, ...]] = ()

    rank_tol: float | None = 1e-3

    def _augment(self, manifold, x: FixedRankPoint, grad: TangentVector, normal: Any):
        """``((U, Q_u, V, Q_v), G_hat, S_hat, (k_u, k_v))``: the augmented bases, the core
        gradient, the core, and the 0/1 flags (..., r + k) of the columns of ``[U, Q_u]``,
        ``[V, Q_v]`` that span the Galerkin space.

        Directions of ``Q_u`` (``Q_v``) that only complete a rank-deficient ``U.grad``
        (``V.grad``) to r columns, and columns of ``U`` (``V``) of a zero singular value that the
        gradient does not touch (an adapter's start, ``S = 0``, from a gradient of rank below r:
        its basis beyond the gradient's range is arbitrary), get flag 0: they are set by
        rounding, their rows (columns) of ``G_hat`` are zero, so the step never moves along
        them, and nothing else may depend on them (see :meth:`DLRAAdam._factored`).
        """
        if normal is None:
            raise ValueError(
                f"{type(self).__name__} (augmented BUG) needs the normal-normal block of the "
                "gradient: call step(..., normal=f) with f(Qu, Qv) = Qu^T G Qv "
                "(rankopt.rules.normal_block_of(manifold, G) makes one from an ambient gradient)"
            )
        be = manifold.backend
        U, V = x.U, x.V
        (m, n), r = x.shape, x.rank
        grad, (u0, v0) = _used_columns(be, x, grad)
        qu, ku = complement_basis(be, U, grad.Up, min(r, m - r))
        qv, kv = complement_basis(be, V, grad.Vp, min(r, n - r))
        Ru = (_t(qu) @ grad.Up) * ku[..., :, None]
        Rv = (_t(qv) @ grad.Vp) * kv[..., :, None]
        N = normal(qu, qv) * (ku[..., :, None] * kv[..., None, :])
        G = be.concat([be.concat([grad.M, _t(Rv)], -1), be.concat([Ru, N], -1)], -2)
        keep = (be.concat([u0, ku], -1), be.concat([v0, kv], -1))
        return (U, qu, V, qv), G, _pad(be, be.diag(x.s), *G.shape[-2:]), keep

    def _ranks(self, manifold, x: FixedRankPoint, d: Any, cap: Any) -> list[int]:
        """The kept rank of each item (one host read of the singular values)."""
        be = manifold.backend
        sv = be.to_numpy(d).astype(np.float64).reshape(-1, d.shape[-1])
        cap = cap if isinstance(cap, (int, float)) else be.to_numpy(cap)
        caps = np.broadcast_to(np.asarray(cap, dtype=np.float64).reshape(-1), (len(sv),))
        m, n = x.shape
        out = []
        for row, c in zip(sv, caps, strict=True):
            hi = int(min(len(row), m, n, self.max_rank if self.max_rank is not None else c))
            j = x.rank if self.rank_tol is None else truncation_rank(row, self.rank_tol)
            j = int(min(max(j, self.min_rank), hi))
            while j > 1 and not row[j - 1] > 0:  # exact zeros are off the manifold
                j -= 1
            out.append(j)
        return out

    def _finish(self, manifold, x, bases, core, fields: dict[str, Any], make_state):
        """Truncate the stepped core, rotate the bases and the core moments.

        ``fields`` maps state names to augmented core matrices or per-item arrays;
        ``make_state(**fields)`` builds the state. For a stack whose items end at different
        ranks: a list of points and a list of states (one per item, C order); otherwise a point
        (a stack of the new common rank) and a state.
        """
        be, g = manifold.backend, manifold.geometry
        U, qu, V, qv = bases
        P, d, Qh = be.svd(core)
        Q = _t(Qh)
        ranks = self._ranks(manifold, x, d, fields["rank_cap"])
        batch = x.batch_shape
        if len(set(ranks)) == 1:  # one point, or a stack whose items keep one rank
            return self._rotate(g, (U, qu, V, qv), P, d, Q, ranks[0], fields, make_state)
        points, states = [], []
        for i, j in enumerate(ranks):
            k = np.unravel_index(i, batch)
            item = {n: (v if np.ndim(v) == 0 else v[k]) for n, v in fields.items()}
            y, st = self._rotate(
                g, (U[k], qu[k], V[k], qv[k]), P[k], d[k], Q[k], j, item, make_state
            )
            points.append(y)
            states.append(st)
        return points, states

    def _rotate(self, g, bases, P, d, Q, j, fields, make_state):
        U, qu, V, qv = bases
        Pj, Qj = P[..., :, :j], Q[..., :, :j]
        y = FixedRankPoint(g.combine(U, qu, P, j)[0], d[..., :j], g.combine(V, qv, Q, j)[0])
        out = dict(fields)
        for name in self._linear:
            out[name] = _t(Pj) @ fields[name] @ Qj
        for name in self._squared:
            if fields.get(name) is None:
                continue
            r = _t(Pj) @ g.backend.xp.sqrt(fields[name]) @ Qj
            out[name] = r * r
        return y, make_state(**out)


@register(
    method="dlra-heavyball",
    ordinary="sgd",
    ordinary_fixed={"dampening": 0.0, "nesterov": False},
)
@dataclass(frozen=True, kw_only=True)
class DLRAHeavyBall(_BUG):
    r"""Rank-adaptive heavy ball by the augmented BUG integrator.

    The steps are in the docstring of :mod:`rankopt.rules.dlra`.

    ``b <- mu b + (G_hat + wd S_hat)`` on the augmented core (first step ``b = G_hat + wd
    S_hat``, torch.SGD's convention), ``S_hat <- S_hat - lr b``, then truncation at
    ``rank_tol`` within ``[min_rank, max_rank]`` (``max_rank=None``: the starting rank).
    ``step(manifold, x, grad, state, lr=..., normal=f)`` with ``f(Q_u, Q_v) = Q_u^T G Q_v``.

    Parameters
    ----------
    lr : float
        Learning rate.
    momentum : float
        Heavy-ball momentum on the core.
    weight_decay : float
        Coupled L2 weight decay (added to the core gradient).
    """

    _linear: ClassVar[tuple[str, ...]] = ("momentum_buffer",)

    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_common(self)
        if not self.momentum >= 0:
            raise ValueError(f"invalid momentum={self.momentum!r}: must be >= 0")

    def init(self, manifold, x: FixedRankPoint) -> DLRAState:
        be = manifold.backend
        r = x.rank
        return DLRAState(
            count_init(manifold, x), be.zeros((*x.batch_shape, r, r)), _cap_init(manifold, x)
        )

    def step(self, manifold, x, grad, state: DLRAState, *, lr: Any = None, normal: Any = None):
        lr = self.lr if lr is None else lr
        be = manifold.backend
        bases, G, S, _ = self._augment(manifold, x, grad, normal)
        if self.weight_decay != 0:
            G = G + self.weight_decay * S
        on = started(state.count, be.xp)
        on = on[..., None, None] if getattr(on, "ndim", 0) > 0 else on
        buf = (on * self.momentum) * _pad(be, state.momentum_buffer, *G.shape[-2:]) + G
        core = S - _lr(lr) * buf
        fields = {"count": state.count + 1, "momentum_buffer": buf, "rank_cap": state.rank_cap}
        return self._finish(manifold, x, bases, core, fields, DLRAState)


def _lr(lr: Any) -> Any:
    return lr[..., None, None] if getattr(lr, "ndim", 0) > 0 else lr


SECOND_MOMENTS = ("factored", "core")


@register(method="dlra-adam", ordinary="adamw")
@dataclass(frozen=True, kw_only=True)
class DLRAAdam(_BUG):
    r"""Rank-adaptive Adam by the augmented BUG integrator.

    The steps are in the docstring of :mod:`rankopt.rules.dlra`.

    The first moment ``m`` lives on the augmented core (``m <- beta1 m + (1 - beta1) G_hat``,
    rotated with the bases); the step on the core is ``S_hat <- (1 - lr wd) S_hat - lr d``
    (decoupled decay) with, by ``second_moment``:

    * ``"factored"`` (default): the Galerkin step under rankopt's adaptive metric
      ``<xi, D_L eta D_R>`` (:func:`rankopt.metrics.adaptive_diagonals`, Adafactor factoring,
      relative ``metric_eps``), ``d = A_L^{-1} m_hat A_R^{-1}`` with ``A_L = U_hat^T D_L U_hat`` and
      ``A_R = V_hat^T D_R V_hat`` (at most 2r x 2r), i.e. the gradient of the loss with respect to the
      core under that metric. ``D_L``, ``D_R`` come from exponential moving averages of the row
      and column mean squares of ``U_hat G_hat V_hat^T`` (bias-corrected): ambient statistics,
      which need no rotation when the bases change. State O(m + n + r^2).
    * ``"core"``: Adam on the entries of the core, ``d = m_hat / (sqrt(v_hat) + metric_eps)`` with
      ``v`` elementwise on the core and rotated through its square root,
      ``v <- (P^T sqrt(v) Q)^2``: what the DLRA group's training layers do. ``metric_eps`` is
      then Adam's absolute epsilon (pass e.g. ``metric_eps=1e-8``). State O(r^2).

    Then truncation at ``rank_tol`` within ``[min_rank, max_rank]`` (``max_rank=None``: the
    starting rank). ``step(manifold, x, grad, state, lr=..., normal=f)``.

    Parameters
    ----------
    lr : float
        Learning rate.
    betas : tuple of float
        Adam's ``(beta1, beta2)``.
    metric_eps : float
        Floor of the second moment: relative (the factored metric's) with
        ``second_moment="factored"``, Adam's absolute epsilon with ``"core"``.
    weight_decay : float
        Decoupled weight decay on the core.
    second_moment : str
        ``"factored"`` (the Galerkin step under the Adafactor-factored metric) or ``"core"``
        (elementwise Adam on the core, the DLRA group's layers).
    """

    _linear: ClassVar[tuple[str, ...]] = ("exp_avg",)
    _squared: ClassVar[tuple[str, ...]] = ("exp_avg_sq",)

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    metric_eps: float = ADAPTIVE_EPS
    weight_decay: float = 0.0
    second_moment: str = "factored"

    def __post_init__(self) -> None:
        check_common(self)
        if self.second_moment not in SECOND_MOMENTS:
            raise ValueError(
                f"second_moment must be one of {SECOND_MOMENTS}, got {self.second_moment!r}"
            )

    def init(self, manifold, x: FixedRankPoint) -> DLRAAdamState:
        be = manifold.backend
        r = x.rank
        z = be.zeros((*x.batch_shape, r, r))
        cap = _cap_init(manifold, x)
        if self.second_moment == "core":
            return DLRAAdamState(count_init(manifold, x), z, cap, exp_avg_sq=be.xp.zeros_like(z))
        rows, cols = be.zeros((*x.batch_shape, x.shape[0])), be.zeros((*x.batch_shape, x.shape[1]))
        return DLRAAdamState(count_init(manifold, x), z, cap, row_stats=rows, col_stats=cols)

    def step(self, manifold, x, grad, state: DLRAAdamState, *, lr: Any = None, normal: Any = None):
        lr = self.lr if lr is None else lr
        be = manifold.backend
        b1, b2 = self.betas
        bases, G, S, keep = self._augment(manifold, x, grad, normal)
        t = state.count + 1
        tt = t[..., None, None] if getattr(t, "ndim", 0) > 0 else t
        m = b1 * _pad(be, state.exp_avg, *G.shape[-2:]) + (1.0 - b1) * G
        fields = {"count": t, "exp_avg": m, "rank_cap": state.rank_cap}
        if self.second_moment == "core":
            v = b2 * _pad(be, state.exp_avg_sq, *G.shape[-2:]) + (1.0 - b2) * G * G
            direction = (m / (1.0 - b1**tt)) / (be.xp.sqrt(v / (1.0 - b2**tt)) + self.metric_eps)
            fields["exp_avg_sq"] = v
        else:
            direction, rows, cols = self._factored(manifold, bases, keep, G, m, state, tt)
            fields.update(row_stats=rows, col_stats=cols)
        core = S * (1.0 - _lr(lr) * self.weight_decay) - _lr(lr) * direction
        return self._finish(manifold, x, bases, core, fields, DLRAAdamState)

    def _factored(self, manifold, bases, keep, G, m, state, tt):
        r"""``A_L^{-1} m_hat A_R^{-1}`` and the new row/column statistics.

        The ambient matrix of the core gradient is ``U_hat G_hat V_hat^T``; with orthonormal
        ``V_hat`` its row squares are those of ``U_hat G_hat`` (m x <= 2r), its column squares
        those of ``V_hat G_hat^T``. The Galerkin space is spanned by the flagged columns of
        ``U_hat = [U, Q_u]`` (``keep``, see :meth:`_augment`; likewise for ``V``): the metric's
        Gram matrices are taken over those columns only,
        ``A_L = K U_hat^T D_L U_hat K + (I - K)`` with ``K`` the 0/1 diagonal of the flags, so
        that ``A_L`` is block diagonal between the Galerkin space and the completing columns. ``m_hat`` is zero on the completing rows and columns, hence so is
        the direction, and the step does not depend on the completing columns (which rounding
        sets). Without the mask the off-diagonal blocks of ``A_L^{-1}`` carry the step into those
        columns: a discontinuous step whenever the gradient's rank is below the layer's.
        O((m + n) r^2 + r^3).
        """
        be = manifold.backend
        xp = be.xp
        U, qu, V, qv = bases
        b1, b2 = self.betas
        Uh, Vh = be.concat([U, qu], -1), be.concat([V, qv], -1)
        A = Uh @ G
        B = Vh @ _t(G)
        mm, nn = U.shape[-2], V.shape[-2]
        rows = be.lerp(be.rowdot(A, A) / nn, state.row_stats, b2)
        cols = be.lerp(be.rowdot(B, B) / mm, state.col_stats, b2)
        c2 = tt[..., 0] if getattr(tt, "ndim", 0) > 0 else tt
        dl, dr = adaptive_diagonals(
            rows / (1.0 - b2**c2), cols / (1.0 - b2**c2), self.metric_eps, "adafactor", xp
        )
        AL = _galerkin_gram(be, Uh, dl, keep[0])
        AR = _galerkin_gram(be, Vh, dr, keep[1])
        inv = xp.linalg.inv
        direction = inv(AL) @ (m / (1.0 - b1**tt)) @ inv(AR)
        return direction, rows, cols


def _galerkin_gram(be, B: Any, w: Any, keep: Any) -> Any:
    """``K B^T diag(w) B K + (I - K)`` with ``K = diag(keep)`` for the augmented basis ``B``
    (..., m, r + k) and its 0/1 flags (..., r + k): the Gram matrix of the flagged columns, the
    identity on the others. O(m r^2)."""
    Bk = B * keep[..., None, :]
    return _t(Bk) @ (w[..., :, None] * Bk) + be.diag(1.0 - keep)
