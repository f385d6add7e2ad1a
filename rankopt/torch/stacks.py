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

from dataclasses import dataclass
from typing import Any

import torch

from ..containers import FixedRankPoint, TangentVector
from ..rules import state_arrays, state_from_arrays

__all__ = [
    "Layer",
    "work_dtype",
    "gather_point",
    "gather_tangent",
    "write_point",
    "StateStack",
    "BucketUpdate",
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


def gather_point(layers: list[Layer], dtype: torch.dtype) -> FixedRankPoint:
    """The stacked point ``(U, diag(S), V)`` of the layers, in ``dtype``."""
    S = _stack([L.S.detach() for L in layers], dtype)
    return FixedRankPoint(
        _stack([L.U.detach() for L in layers], dtype),
        S.diagonal(dim1=-2, dim2=-1),
        _stack([L.V.detach() for L in layers], dtype),
    )


def gather_tangent(layers: list[Layer], dtype: torch.dtype) -> TangentVector:
    """The stacked tangent vector ``(S.grad, U.grad, V.grad)`` (= ``(M, Up, Vp)``) in ``dtype``."""
    return TangentVector(
        _stack([L.S.grad for L in layers], dtype),
        _stack([L.U.grad for L in layers], dtype),
        _stack([L.V.grad for L in layers], dtype),
    )


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    foreach_copy = getattr(torch, "_foreach_copy_", None)
    if foreach_copy is not None:
        foreach_copy(dst, src)
    else:  # pragma: no cover - older torch
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)


def write_point(layers: list[Layer], x: FixedRankPoint) -> None:
    """Copy a stacked point of the layers' shape back into their factors (in place; one
    multi-tensor copy for all three factors of every layer)."""
    dst = [p for L in layers for p in (L.U, L.S, L.V)]
    parts = (x.U.unbind(0), torch.diag_embed(x.s).unbind(0), x.V.unbind(0))
    src = [a for t in zip(*parts, strict=True) for a in t]
    _copy_all(dst, src)


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

    def tensors(self) -> list[torch.Tensor]:
        """Every floating-point tensor of the new points and states (what the finite check
        reads)."""
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


def _is_float_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point()
