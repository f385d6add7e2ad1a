r"""What every update rule shares: the spec protocol, state (de)serialization, small helpers.

A rule is a frozen dataclass (its *spec*): the hyperparameters, with their defaults written
once, plus two methods in the style of optax's ``init``/``update``::

    state = spec.init(manifold, x)
    x_new, state = spec.step(manifold, x, grad, state)     # or step(..., lr=...)

* ``manifold`` is a :class:`~rankopt.FixedRankManifold`; rules only call its unchecked, public
  fast path ``manifold.geometry`` (:class:`~rankopt.geometry.Geometry`) and its metric-free
  attributes, so one call serves one point or a stack of same-shape points (leading
  dimensions ``(...)``: a group of layers).
* ``grad`` is the tangent projection ``P_x(G)`` of the Euclidean gradient (a
  :class:`~rankopt.TangentVector`).
* a state is a frozen dataclass holding arrays (tangent vectors, row/column statistics, all
  O((m + n) r) per matrix, never m x n) and a count, nothing else: :func:`state_arrays` turns
  it into a flat dict of arrays (what the torch optimizers keep per layer) and
  :func:`state_from_arrays` back. The count is an int, or an array of shape ``(...)``
  (one count per item of a stack).

Rank-adaptive rules (``rank_tol`` set) may change the rank; for a stack they return a list of
points and a list of states, one per item (the items' ranks differ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ..containers import FixedRankPoint, TangentVector

__all__ = ["Rule", "state", "state_arrays", "state_from_arrays", "check_common"]


def state(cls: type) -> type:
    """Decorator of a rule's state class: a frozen dataclass whose field names are also kept
    as the tuple ``cls.FIELDS``, so the rule machinery never calls ``dataclasses.fields`` or
    ``dataclasses.replace`` on a hot path (and ``torch.compile`` traces it without breaks)."""
    cls = dataclass(frozen=True)(cls)
    cls.FIELDS = tuple(f.name for f in fields(cls))
    return cls


def _with(st: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` for a :func:`state` class."""
    return type(st)(**{k: changes.get(k, getattr(st, k)) for k in type(st).FIELDS})


@dataclass(frozen=True, kw_only=True)
class Rule:
    """Base of every rule spec: ``init`` and ``step``; hyperparameters are keyword-only fields.

    A spec documents each of its fields in a numpydoc ``Parameters`` section (the front ends'
    docstrings are built from them, :func:`rankopt.rules.registry.field_docs`).
    ``rank_semantics`` says how the rank options act (the torch optimizers check them against
    each layer): ``"retraction"`` (``rank_tol`` makes the retraction rank-adaptive, up to
    min(m, n)), ``"budget"`` (truncation within ``[min_rank, max_rank]`` at every step,
    ``max_rank=None``: the starting rank) or ``"truncation"`` (``rank_tol`` only lowers the rank).

    Parameters
    ----------
    rank_tol : float or None
        None keeps the rank fixed; a number makes the retraction rank-adaptive
        (:meth:`rankopt.geometry.Geometry.retract_adaptive`): the smallest rank ``j`` with
        ``||s_{j:}|| <= rank_tol ||s||`` of the retracted point's singular values.
    max_rank : int or None
        Largest rank a rank-adaptive step keeps (None: up to twice the current rank per step).
    min_rank : int
        Smallest rank a rank-adaptive step keeps.
    """

    #: how the rank options act: "retraction", "budget" or "truncation" (see above)
    rank_semantics: ClassVar[str] = "retraction"

    rank_tol: float | None = None
    max_rank: int | None = None
    min_rank: int = 1

    @property
    def rank_adaptive(self) -> bool:
        """Whether ``step`` may change the rank."""
        return self.rank_tol is not None

    def init(self, manifold, x: FixedRankPoint) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(
        self, manifold, x: FixedRankPoint, grad: TangentVector, state: Any, *, lr: Any = None
    ) -> tuple[Any, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def hyperparameters(cls) -> dict[str, Any]:
        """The spec's hyperparameters and their defaults (the one place they are written)."""
        return {f.name: f.default for f in fields(cls)}


def check_common(spec: Any) -> None:
    """Validate the hyperparameters most rules share (``ValueError`` naming the bad one)."""
    lr = getattr(spec, "lr", 0.0)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"invalid learning rate lr={lr!r}: must be a finite number >= 0")
    wd = getattr(spec, "weight_decay", 0.0)
    if not (isinstance(wd, (int, float)) and wd >= 0):
        raise ValueError(f"invalid weight_decay={wd!r}: must be >= 0")
    for name in ("eps", "metric_eps"):
        eps = getattr(spec, name, 1.0)
        if not (isinstance(eps, (int, float)) and 0 < eps < math.inf):
            raise ValueError(f"invalid {name}={eps!r}: must be a finite number > 0")
    betas = getattr(spec, "betas", None)
    if betas is not None and not (len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"invalid betas={betas!r}: two numbers, each in [0, 1)")
    rank_tol = getattr(spec, "rank_tol", None)
    if rank_tol is not None and not rank_tol >= 0:
        raise ValueError(f"invalid rank_tol={rank_tol!r}: must be >= 0 or None")
    for name in ("max_rank", "min_rank"):
        v = getattr(spec, name, None)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"invalid {name}={v!r}: must be an integer >= 1 (or None)")
    lo, hi = getattr(spec, "min_rank", None), getattr(spec, "max_rank", None)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"min_rank={lo} exceeds max_rank={hi}")


def state_arrays(state: Any) -> dict[str, Any]:
    """A rule state as a flat dict ``{name: array or number}``; tangent vectors as ``name.M`` etc.

    ``None`` fields (e.g. no momentum buffer) are left out.
    """
    out: dict[str, Any] = {}
    for name in type(state).FIELDS:
        v = getattr(state, name)
        if isinstance(v, TangentVector):
            out[f"{name}.M"], out[f"{name}.Up"], out[f"{name}.Vp"] = v.M, v.Up, v.Vp
        elif v is not None:
            out[name] = v
    return out


def state_from_arrays(cls: type, arrays: dict[str, Any]) -> Any:
    """Inverse of :func:`state_arrays` for the state class ``cls``.

    Raises ``ValueError`` naming the missing or unexpected entries.
    """
    kw: dict[str, Any] = {}
    used: set[str] = set()
    for name in cls.FIELDS:
        if f"{name}.M" in arrays:
            keys = [f"{name}.M", f"{name}.Up", f"{name}.Vp"]
            if not all(k in arrays for k in keys):
                raise ValueError(f"{cls.__name__}: tangent vector {name!r} is incomplete")
            kw[name] = TangentVector(*(arrays[k] for k in keys))
            used.update(keys)
        elif name in arrays:
            kw[name] = arrays[name]
            used.add(name)
    extra = sorted(set(arrays) - used)
    if extra:
        raise ValueError(f"{cls.__name__} has no entries {extra}")
    try:
        return cls(**kw)
    except TypeError as e:
        raise ValueError(f"{cls.__name__}: missing entries ({e})") from None


def retract(spec: Any, manifold, x: FixedRankPoint, d: TangentVector, t: Any) -> Any:
    """``R_x(t d)``: fixed rank, or rank-adaptive when ``spec.rank_tol`` is set.

    ``t`` (a number or per-item values) scales only r x r blocks inside the retraction.
    """
    g = manifold.geometry
    if spec.rank_tol is None:
        return g.retract(x, d, t)
    return g.retract_adaptive(x, d, spec.rank_tol, spec.max_rank, spec.min_rank, t)


def add_weight_decay(manifold, x: FixedRankPoint, d: TangentVector, wd: Any) -> TangentVector:
    """``d + wd X`` with ``X`` as the tangent vector ``(diag(s), 0, 0)`` at ``x``. O(r^2).

    ``wd`` is a number or per-item values ``(...)``.
    """
    if isinstance(wd, (int, float)) and wd == 0:
        return d
    w = wd[..., None, None] if getattr(wd, "ndim", 0) > 0 else wd
    return TangentVector(d.M + w * manifold.backend.diag(x.s), d.Up, d.Vp)


def lerp(manifold, a: TangentVector, b: TangentVector, w: float) -> TangentVector:
    """``a + w (b - a)`` componentwise (fused per component with torch)."""
    f = manifold.backend.lerp
    return TangentVector(f(a.M, b.M, w), f(a.Up, b.Up, w), f(a.Vp, b.Vp, w))


def items(x: FixedRankPoint, xi: TangentVector | None) -> list[tuple[Any, Any]]:
    """Split a stack (flattened leading dimensions, C order) into ``(point, vector)`` pairs."""
    batch = x.batch_shape
    n = math.prod(batch)
    out = []
    for i in range(n):
        k = _unravel(i, batch)
        p = FixedRankPoint(x.U[k], x.s[k], x.V[k])
        v = None if xi is None else TangentVector(xi.M[k], xi.Up[k], xi.Vp[k])
        out.append((p, v))
    return out


def _unravel(i: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    idx = []
    for d in reversed(shape):
        idx.append(i % d)
        i //= d
    return tuple(reversed(idx))


def per_item(a: Any, k: tuple[int, ...]) -> Any:
    """Item ``k`` of a per-item array (numbers pass through)."""
    if getattr(a, "shape", ()) == ():
        return a
    return a[k]


def started(count: Any, xp: Any) -> Any:
    """1 where ``count > 0`` else 0: a number for a number, else an array in ``count``'s dtype."""
    if isinstance(count, (int, float)):
        return 1.0 if count > 0 else 0.0
    return xp.astype(count > 0, count.dtype)


def column(c: Any) -> Any:
    """A per-item number ``(...)`` shaped to scale ``(..., k)`` arrays (numbers pass through)."""
    return c[..., None] if getattr(c, "ndim", 0) > 0 else c


def retract_state(spec: Any, manifold, x: FixedRankPoint, d: TangentVector, t: Any, state: Any):
    """``(R_x(t d), state)`` with every tangent-vector field of ``state`` transported to the new
    point: fused (:meth:`rankopt.geometry.Geometry.retract_transport`) at fixed rank, per item
    after a rank-adaptive step (:func:`move_state`)."""
    if spec.rank_tol is not None:
        x_new = retract(spec, manifold, x, d, t)
        return x_new, move_state(manifold, x, x_new, state)
    names = [n for n in type(state).FIELDS if isinstance(getattr(state, n), TangentVector)]
    y, moved = manifold.geometry.retract_transport(x, d, t, tuple(getattr(state, n) for n in names))
    return y, _with(state, **dict(zip(names, moved, strict=True)))


def move_state(manifold, x: FixedRankPoint, x_new: Any, state: Any) -> Any:
    """Transport every tangent-vector field of ``state`` from ``x`` to ``x_new`` (by projection).

    ``x_new`` is a point (same stack shape) or, after a rank-adaptive step on a stack, a list of
    points: then the state is split per item and a list of states is returned.
    """
    g = manifold.geometry
    vec = [n for n in type(state).FIELDS if isinstance(getattr(state, n), TangentVector)]
    if not isinstance(x_new, list):
        return _with(state, **{f: g.transport(x, x_new, getattr(state, f)) for f in vec})
    out = []
    batch = x.batch_shape
    for i, y in enumerate(x_new):
        k = _unravel(i, batch)
        xk = FixedRankPoint(x.U[k], x.s[k], x.V[k])
        kw = {}
        for name in type(state).FIELDS:
            v = getattr(state, name)
            if isinstance(v, TangentVector):
                kw[name] = g.transport(xk, y, TangentVector(v.M[k], v.Up[k], v.Vp[k]))
            elif v is not None:
                kw[name] = per_item(v, k)
        out.append(_with(state, **kw))
    return out


def count_init(manifold, x: FixedRankPoint) -> Any:
    """A zero step count: ``0`` for one point, a float array of the stack's shape for a stack."""
    return 0 if not x.batch_shape else manifold.backend.zeros(x.batch_shape)
