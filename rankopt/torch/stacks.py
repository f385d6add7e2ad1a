r"""Groups of same-shape low-rank layers as stacks: gather, keep state, write back.

The rankopt torch optimizers move all low-rank layers of one shape ``(m, n, r)``, dtype and
device with ONE call of their rule on stacked arrays (``U: (B, m, r)``, ``s: (B, r)``, ...), as
torch.optim's multi-tensor (foreach) kernels do for ordinary parameters. Per step and group this
costs a handful of ``torch.stack`` copies (factors and gradients in, new factors out with one
``torch._foreach_copy_``); the rule's own work is batched matrix products and batched small
QR/SVD factorizations.

Optimizer state lives in stacked buffers (one per state entry and group); each layer's
``optimizer.state[U]`` holds *views* into them, so ``state_dict()`` sees per-layer tensors, a
plain walk of ``optimizer.state`` counts every element, and the rule updates whole groups at
once. When the views no longer match the buffers (after ``load_state_dict``, a rank change or a
change in which layers have gradients) the group is re-stacked from the per-layer entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..containers import FixedRankPoint, TangentVector
from ..rules import state_arrays, state_from_arrays
from .layers import resize_parameter_
from .sharded import any_sharded, local_pairs

__all__ = [
    "Layer",
    "work_dtype",
    "gather_point",
    "gather_tangent",
    "write_point",
    "write_items",
    "StateStack",
    "BucketUpdate",
    "checked_entries",
    "pick_items",
    "template_point",
]


@dataclass(frozen=True, eq=False)
class Layer:
    """The three factors (``ManifoldParameter`` objects) of one low-rank layer. Compared by
    identity (a generated ``==`` would compare the tensors elementwise, which has no truth
    value)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    @property
    def key(self) -> tuple:
        """What must agree for layers to share a stack: shape, rank, dtype, device, started."""
        U = self.U
        return (U.shape[0], self.V.shape[0], U.shape[1], U.dtype, U.device, U.link.started)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the manifold math: the factors' if float32/float64, else float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _stack(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    out = torch.stack(tensors)
    return out if out.dtype == dtype else out.to(dtype)


def _whole(full: Callable | None) -> Callable:
    return (lambda t: t.detach()) if full is None else (lambda t: full(t).detach())


def gather_point(
    layers: list[Layer], dtype: torch.dtype, full: Callable | None = None
) -> FixedRankPoint:
    """The stacked point ``(U, diag(S), V)`` of the layers, in ``dtype`` (``full`` maps an
    FSDP2-sharded factor to its gathered whole, :func:`rankopt.torch.sharded.gather_full`)."""
    whole = _whole(full)
    S = _stack([whole(L.S) for L in layers], dtype)
    return FixedRankPoint(
        _stack([whole(L.U) for L in layers], dtype),
        S.diagonal(dim1=-2, dim2=-1),
        _stack([whole(L.V) for L in layers], dtype),
    )


def gather_tangent(
    layers: list[Layer], dtype: torch.dtype, full: Callable | None = None
) -> TangentVector:
    """The stacked tangent vector ``(S.grad, U.grad, V.grad)`` (= ``(M, Up, Vp)``) in ``dtype``
    (``full``: as for :func:`gather_point`)."""
    whole = _whole(full)
    return TangentVector(
        _stack([whole(L.S.grad) for L in layers], dtype),
        _stack([whole(L.U.grad) for L in layers], dtype),
        _stack([whole(L.V.grad) for L in layers], dtype),
    )


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    foreach_copy = getattr(torch, "_foreach_copy_", None)
    if foreach_copy is not None:
        foreach_copy(dst, src)
    else:  # pragma: no cover - older torch
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)


def template_point(L: Layer, batch: tuple[int, ...] = ()) -> FixedRankPoint:
    """A point of the layer's shape and working dtype (``U = I[:, :r]``, ``s = 1``; stacked to
    ``batch``): what a rule's ``init`` needs to give the names and shapes of its state, without
    the layer's factors (they may be FSDP2 shards)."""
    (m, r), n = L.U.shape, L.V.shape[0]
    kw = {"dtype": work_dtype(L.U.dtype), "device": L.U.device}
    eye = lambda k: torch.eye(k, r, **kw).expand(*batch, k, r).contiguous()  # noqa: E731
    return FixedRankPoint(eye(m), torch.ones(*batch, r, **kw), eye(n))


def pick_items(x: Any, idx: list[int]) -> Any:
    """The items ``idx`` of a stacked point or tangent vector (copies)."""

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.index_select(0, torch.tensor(idx, dtype=torch.long, device=t.device))

    if isinstance(x, FixedRankPoint):
        return FixedRankPoint(pick(x.U), pick(x.s), pick(x.V))
    return TangentVector(pick(x.M), pick(x.Up), pick(x.Vp))


def write_point(layers: list[Layer], x: FixedRankPoint) -> None:
    """Copy a stacked point of the layers' shape back into their factors (in place; one
    multi-tensor copy for all three factors of every layer; an FSDP2-sharded factor gets its
    process's rows, :func:`rankopt.torch.sharded.local_pairs`)."""
    dst = [p for L in layers for p in (L.U, L.S, L.V)]
    parts = (x.U.unbind(0), torch.diag_embed(x.s).unbind(0), x.V.unbind(0))
    src = [a for t in zip(*parts, strict=True) for a in t]
    if any_sharded(dst):
        dst, src = local_pairs(dst, src)
    _copy_all(dst, src)


@torch.compiler.disable  # resizing parameters: eager, also in a compiled step
def write_items(updates: list[BucketUpdate], opt_state: Any) -> None:
    """Write rank-adaptive updates (one point and state per layer, of another rank): the same
    Parameter objects, resized where the rank changed; the layers' entries in ``opt_state``
    (the optimizer's ``state``, keyed by ``U``) replaced."""
    for u in updates:
        for L, x, st in zip(u.layers, u.point, u.state, strict=True):
            for p, new in ((L.U, x.U), (L.S, torch.diag_embed(x.s)), (L.V, x.V)):
                new = new.to(p.dtype)
                if p.shape == new.shape:
                    p.copy_(new)
                else:
                    resize_parameter_(p, new.contiguous())
            entry = opt_state[L.U]
            entry.clear()
            entry.update({k: v.clone() for k, v in state_arrays(st).items()})


class StateStack:
    """The stacked rule state of one group of layers, with per-layer views in ``opt_state``.

    Parameters
    ----------
    layers : list of Layer
    buffers : dict of name -> stacked tensor (leading dimension = number of layers)
    """

    def __init__(self, layers: list[Layer], buffers: dict[str, torch.Tensor], cls: type) -> None:
        self.ids = tuple(id(L.U) for L in layers)
        self.cls = cls
        self.buffers = buffers
        self.views = {k: list(b.unbind(0)) for k, b in buffers.items()}
        #: whether ``opt_state`` holds this stack's views (see :meth:`bind`)
        self.bound = False

    @classmethod
    def build(cls, opt_state: Any, layers: list[Layer], init_state: Any) -> StateStack:
        """:meth:`gather` and :meth:`bind`: the stack, its views in ``opt_state``."""
        out = cls.gather(opt_state, layers, init_state)
        out.bind(opt_state, layers)
        return out

    @classmethod
    def fresh(cls, opt_state: Any, layers: list[Layer], state: Any) -> StateStack:
        """A stack of ``state`` (stacked), bound to the layers (their saved entries replaced)."""
        out = cls(layers, state_arrays(state), type(state))
        out.bind(opt_state, layers)
        return out

    @classmethod
    def gather(cls, opt_state: Any, layers: list[Layer], init_state: Any) -> StateStack:
        """Stack the layers' saved entries (``opt_state[U]``) over a fresh stacked ``init_state``.

        Layers without saved entries start from ``init_state``; saved entries must match the
        rule's names and shapes (checked when loading, see ``RiemannianOptimizer``). Reads
        ``opt_state`` only (no entry is created or changed): the stack is not yet bound.
        """
        buffers = state_arrays(init_state)
        for i, L in enumerate(layers):
            saved = opt_state.get(L.U) or {}
            for k, buf in buffers.items():
                if k in saved:
                    buf[i].copy_(saved[k])
        return cls(layers, buffers, type(init_state))

    def bind(self, opt_state: Any, layers: list[Layer]) -> None:
        """Make each layer's entries in ``opt_state`` views of the buffers (other entries of a
        layer are dropped)."""
        for i, L in enumerate(layers):
            entry = opt_state[L.U]
            for k in list(entry):
                if k not in self.buffers:
                    del entry[k]
            entry.update({k: v[i] for k, v in self.views.items()})
        self.bound = True

    def valid_for(self, opt_state: Any, layers: list[Layer]) -> bool:
        """Whether every layer's entries are still this stack's views (nothing re-bound them)."""
        if tuple(id(L.U) for L in layers) != self.ids:
            return False
        for i, L in enumerate(layers):
            entry = opt_state.get(L.U)
            if entry is None:
                return False
            for k, v in self.views.items():
                if entry.get(k) is not v[i]:
                    return False
        return True

    def state(self) -> Any:
        """The rule state over the stacked buffers (no copy)."""
        return state_from_arrays(self.cls, self.buffers)

    def store(self, new_state: Any) -> None:
        """Copy a new rule state of the same shapes into the buffers (views stay valid)."""
        new = state_arrays(new_state)
        names = list(self.buffers)
        _copy_all(
            [self.buffers[k] for k in names], [_as_tensor(new[k], self.buffers[k]) for k in names]
        )


def _as_tensor(v: Any, like: torch.Tensor) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.full_like(like, float(v))


@dataclass(eq=False)
class BucketUpdate:
    """The computed step of a group of layers, not yet written: the new point and rule state of
    the stack, or (a rank-adaptive step) one per layer.

    ``stack`` is the state stack the step read (None at adapters' first step, when the state
    came from ``init``).
    """

    layers: list[Layer]
    point: Any
    state: Any
    stack: StateStack | None
    #: adapters of the bucket that got no gradient (they stay unstarted) and the rule's ``init``
    #: state of their points (stacked): their entries if they have none yet
    idle: tuple[list[Layer], Any] = ([], None)

    def gated(self, ok: torch.Tensor) -> BucketUpdate:
        """This update with each new floating-point tensor made to depend on ``ok`` (True, else
        the step raised before): under ``torch.compile`` the writes follow the finite check."""

        def gate(v: Any) -> Any:
            return torch.where(ok, v, 0.0) if _is_float_tensor(v) else v

        def point(x: Any) -> Any:
            return FixedRankPoint(gate(x.U), gate(x.s), gate(x.V))

        def state(st: Any) -> Any:
            return state_from_arrays(type(st), {k: gate(v) for k, v in state_arrays(st).items()})

        if not self.layers:
            return self
        many = isinstance(self.point, list)
        return BucketUpdate(
            self.layers,
            [point(x) for x in self.point] if many else point(self.point),
            [state(st) for st in self.state] if many else state(self.state),
            self.stack,
            self.idle,
        )

    def tensors(self) -> list[torch.Tensor]:
        """Every floating-point tensor of the new points and states (what the finite check
        reads; none for an update of idle adapters only)."""
        if not self.layers:
            return []
        points = self.point if isinstance(self.point, list) else [self.point]
        states = self.state if isinstance(self.state, list) else [self.state]
        out = [t for x in points for t in (x.U, x.s, x.V)]
        for st in states:
            out += [v for v in state_arrays(st).values() if _is_float_tensor(v)]
        return out

    def parts(self, k: int) -> dict[str, Any]:
        """The new factors (``U``, ``S``, ``V``) and state entries of layer ``k``, by name."""
        if isinstance(self.point, list):
            x, st = self.point[k], state_arrays(self.state[k])
            item = lambda v: v  # noqa: E731
        else:
            x, st = self.point, state_arrays(self.state)
            item = lambda v: v[k] if getattr(v, "ndim", 0) > 0 else v  # noqa: E731
        out = {"U": item(x.U), "S": item(x.s), "V": item(x.V)}
        out.update({f"state {n!r}": item(v) for n, v in st.items() if _is_float_tensor(v)})
        return out


def checked_entries(expected: dict, saved: dict, mnr: tuple, rule: str, device: Any) -> dict:
    """A low-rank layer's saved state entries, checked against the rule's ``expected`` names
    and shapes (``ValueError`` naming what differs) and cast to their dtypes on ``device``
    (copies). ``mnr``: the layer's ``(m, n, r)``, for the messages."""
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or extra:
        raise ValueError(
            f"optimizer state for a low-rank layer (m, n, r) = {mnr} does not match the rule "
            f"{rule}: missing {missing}, unexpected {extra} (was it saved by another optimizer?)"
        )
    out = {}
    for k, ref in expected.items():
        v = torch.as_tensor(saved[k])
        ref = torch.as_tensor(ref)
        if tuple(v.shape) != tuple(ref.shape):
            raise ValueError(
                f"optimizer state {k!r} of a low-rank layer has shape {tuple(v.shape)}, but "
                f"the layer (m, n, r) = {mnr} needs {tuple(ref.shape)}: load the model's state "
                "(its ranks) first, or the state of a model with the same ranks"
            )
        out[k] = v.to(dtype=ref.dtype, device=device, copy=True)
    return out


def _is_float_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point()
