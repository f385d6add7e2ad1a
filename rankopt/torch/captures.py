r"""What a rule needs besides the tangent gradient, taken from the layers' backward.

The layers' backward leaves the tangent projection ``P_X(G)`` in ``.grad``
(:mod:`rankopt.torch.layers`), which is all a tangent-space rule needs. Two kinds of rule need
more (:func:`rankopt.rules.gradient_input`):

* ``"normal"`` (the DLRA rules, augmented BUG integrator) need the **normal-normal block**
  ``Q_u^T G Q_v`` of the gradient in the new directions ``Q_u``, ``Q_v``, which are only known
  at the step. The layers' backward therefore keeps the batch's inputs and output gradients
  (``G = g^T x`` for a linear layer; a convolution and an embedding likewise, see
  :class:`rankopt.torch._autograd.Capture`) until the step, which forms ``(g Q_u)^T (x Q_v)``:
  **no second forward/backward pass and no m x n matrix**. Cost: O(b (m + n) r) per layer and
  step (about the backward's own sketch products, b the rows of the batch), memory: the
  batch's ``b (m + n)`` inputs and output gradients per layer, kept from the backward to the
  step (per micro-batch under gradient accumulation).
* ``"dense"`` (the reference rules of the authors' code) need the dense gradient ``G``, which
  the backward then accumulates (m x n per layer, O(b m n) per backward).

Consistency with ``.grad``. Whatever scaled the ``.grad`` since the backward (GradScaler's
unscale, ``clip_grad_norm_``) must scale the captured batch too: per layer the optimizer
compares the tangent pieces (or the adapters' sketches) of the captured gradient with the
gathered ``.grad`` and uses their ratio; if ``.grad`` is not a multiple of the captured
gradient (``clip_grad_value_``, gradients edited by hand, a backward whose gradients were
zeroed by ``model.zero_grad()`` without this optimizer's ``zero_grad``, or a distributed
all-reduce) it raises a ``ValueError`` instead of taking an inconsistent step.

Gradient accumulation works (the captures accumulate like ``.grad``; they are cleared by the
optimizer's ``step`` and ``zero_grad``; a step that raises keeps them, like the gradients, so it
can be retried). A layer without a captured batch whose gradient is exactly zero (e.g. the
zero-gradient step by which ``torch.distributed.checkpoint`` initializes an optimizer's state)
reads a zero batch. **DistributedDataParallel is not supported** by these rules: the captured
batch is each process's own (and rank changes resize parameters, which DDP does not allow
either); the consistency check raises. **FSDP2** (``fully_shard``) is: for a sharded layer the
sketches of the local batch (``(m + n + r) r`` numbers) and what the rule reads (the DLRA normal
block, ``4 r^2``, or the reference rules' dense ``m x n`` gradient) are all-reduced over the
processes (:func:`rankopt.torch.sharded.all_reduce_parts`), and the consistency check compares
the sums with the reduced ``.grad`` (their ratio is FSDP's averaging factor).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import rules
from ..containers import FixedRankPoint
from ._autograd import Capture, get_capture, start_capture
from .sharded import all_reduce_parts
from .stacks import Layer

__all__ = [
    "CAPTURE_KINDS",
    "consistency_tolerance",
    "register_captures",
    "clear_captures",
    "layer_captures",
    "extra_inputs",
    "split_items",
]

#: what the backward keeps for each kind of rule input (:func:`rankopt.rules.gradient_input`)
CAPTURE_KINDS = {"tangent": None, "normal": "batch", "dense": "dense"}


def consistency_tolerance(dtype: torch.dtype) -> float:
    """Relative mismatch allowed between ``.grad`` and the captured gradient's tangent pieces:
    ``10 sqrt(eps)`` of the capture's dtype (1.5e-7 in float64, 3.5e-3 in float32; bf16/fp16
    autocast is then hardly checked)."""
    return 10.0 * math.sqrt(torch.finfo(dtype).eps)


def register_captures(layers: list[Layer], kind: str, owner: Any) -> None:
    """Ask the backward of every layer to capture ``kind`` for as long as ``owner`` lives."""
    for L in layers:
        start_capture(L.U.link, kind, owner)


def clear_captures(layers: list[Layer]) -> None:
    """Drop what the layers' backward kept (a step consumed it, or ``zero_grad``)."""
    for L in layers:
        cap = get_capture(L.U.link)
        if cap is not None:
            cap.clear()


def _missing(L: Layer, owner: str) -> ValueError:
    return ValueError(
        f"no captured batch for a low-rank layer {tuple(L.U.shape)} x {tuple(L.V.shape)} that "
        f"has gradients: {owner} reads the batch its backward kept, and each step consumes it. "
        "Run backward after creating the optimizer and before each step (a second step on the "
        "same gradients, or gradients computed before the optimizer existed, cannot be taken)"
    )


def _inconsistent(L: Layer, mismatch: float, owner: str) -> ValueError:
    return ValueError(
        f"the gradient of a low-rank layer {tuple(L.U.shape)} x {tuple(L.V.shape)} is not a "
        f"multiple of the batch its backward captured (relative mismatch {mismatch:.2e}): "
        f"{owner} needs the backward's batch for the normal directions of the gradient. "
        "Gradients changed other than by a common factor (clip_grad_value_, edited by hand, "
        "zeroed by model.zero_grad() instead of the optimizer's zero_grad, averaged by "
        "DistributedDataParallel) are not supported; clip_grad_norm_ and GradScaler are."
    )


def layer_captures(
    layers: list[Layer], x: FixedRankPoint, xi: Any, started: bool, default: float, owner: str
) -> list[tuple[Any, float, Any]]:
    """``[(capture, scale, factor)]`` per layer: the capture, the factor by which ``.grad``
    (gathered in ``xi``) differs from it (``default`` where the capture is zero) and the layer's
    ``U`` (FSDP2-sharded: the capture's products are summed over the processes). Raises if
    ``.grad`` is not such a multiple (:func:`consistency_tolerance`), or has no capture and is
    not zero. Host reads: three numbers per layer (the sketches of sharded layers all-reduced
    first, one collective)."""
    caps, parts = [], []
    for k, L in enumerate(layers):
        cap = get_capture(L.U.link)
        if cap is None or cap.empty:  # no batch recorded: zero (refused below unless .grad is)
            cap = Capture("batch", _NOBODY)
        U, V = x.U[k], x.V[k]
        GV, GtU, M = cap.sketches(U, V)
        if started:
            GV, GtU = GV - U @ M, GtU - V @ M.T
        caps.append(cap)
        parts.append(torch.cat([M.reshape(-1), GV.reshape(-1), GtU.reshape(-1), _count(cap, M)]))
    parts = all_reduce_parts(parts, [L.U for L in layers])
    out = []
    for k, (L, cap, part) in enumerate(zip(layers, caps, parts, strict=True)):
        have = [t.reshape(-1) for t in (xi.M[k], xi.Up[k], xi.Vp[k])]
        got = torch.split(part[:-1], [t.numel() for t in have])
        sums = torch.stack([(a * b).sum() for a, b in zip(have, got, strict=True)]
                           + [(b * b).sum() for b in got] + [(a * a).sum() for a in have]
                           + [part[-1]]).double()  # fmt: skip
        dot_t, cc_t = sums[0] + sums[1] + sums[2], sums[3] + sums[4] + sums[5]
        dot, cc, hh, count = (
            float(v) for v in _host([dot_t, cc_t, sums[6] + sums[7] + sums[8], sums[9]])
        )
        if count == 0 and hh > 0:
            raise _missing(L, owner)
        scale = dot / cc if cc > 0 else default
        res = max(hh - 2 * scale * dot + scale * scale * cc, 0.0)
        tol = consistency_tolerance(_capture_dtype(cap, x.U.dtype))
        if cc > 0 and res > (tol * tol) * max(hh, scale * scale * cc):
            raise _inconsistent(L, math.sqrt(res / max(hh, 1e-300)), owner)
        # the scale as a tensor (its value dot / cc): a compiled step does not specialize on it
        out.append((cap, dot_t / cc_t if cc > 0 else default, L.U))
    return out


def _host(values: list[torch.Tensor]) -> list[float]:
    """The values of 0-d tensors (one host read)."""
    return torch.stack(values).tolist()


class _Nobody:
    """The owner of the empty captures that stand for a batch no backward recorded."""


_NOBODY = _Nobody()


def _count(cap: Any, like: torch.Tensor) -> torch.Tensor:
    """1 if ``cap`` recorded a batch, else 0 (summed over processes: how many did)."""
    return like.new_full((1,), 0.0 if cap.empty else 1.0)


def extra_inputs(spec: rules.Rule, caps: list, x: FixedRankPoint) -> dict:
    """The keyword arguments of ``spec.step`` besides the tangent gradient, from the captures
    of :func:`layer_captures`: ``normal=f`` (``f(Q_u, Q_v) = Q_u^T G Q_v`` per layer) or
    ``egrad=G`` (stacked); summed over the processes for FSDP2-sharded layers."""
    kind = rules.gradient_input(spec)
    like = [u for _, _, u in caps]
    if kind == "normal":

        def normal(Qu, Qv):
            parts = [c.normal(Qu[k], Qv[k]) for k, (c, _, _) in enumerate(caps)]
            parts = all_reduce_parts(parts, like)
            return torch.stack([s * p for p, (_, s, _) in zip(parts, caps, strict=True)])

        return {"normal": normal}
    if kind == "dense":
        dtype, (m, n) = x.U.dtype, x.shape
        parts = [x.U.new_zeros(m, n) if c.dense is None else c.dense.to(dtype) for c, _, _ in caps]
        parts = all_reduce_parts(parts, like)
        return {"egrad": torch.stack([s * p for p, (_, s, _) in zip(parts, caps, strict=True)])}
    return {}


def _capture_dtype(cap: Any, default: torch.dtype) -> torch.dtype:
    if cap.dense is not None:
        return cap.dense.dtype
    return cap.records[0][2].dtype if cap.records else default


def split_items(x: FixedRankPoint, state: Any) -> tuple[list, list]:
    """A stacked point and state as lists of per-item points and states (a rank-adaptive step
    that moved every item of a stack to one new rank)."""
    arrays = rules.state_arrays(state)
    points, states = [], []
    for k in range(x.U.shape[0]):
        points.append(FixedRankPoint(x.U[k], x.s[k], x.V[k]))
        item = {n: (v if getattr(v, "ndim", 0) == 0 else v[k]) for n, v in arrays.items()}
        states.append(rules.state_from_arrays(type(state), item))
    return points, states
