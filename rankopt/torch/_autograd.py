"""Autograd functions of the low-rank layers (see :mod:`rankopt.torch.layers` for the math).

The backward stores, for ``G = dL/dW`` (never formed), the tangent pieces
``(U.grad, S.grad, V.grad) = (G V - U M, M, G^T U - V M^T)`` with ``M = U^T G V``, or the raw
sketches ``(G V, U^T G V, G^T U)`` for an adapter before its first step. Big products run in
the compute dtype (bf16/fp16 under autocast), the projection in the factors' dtype.

Captures (for optimizers that need more than the tangent pieces)
----------------------------------------------------------------
An optimizer may ask a layer's backward to keep what it has (:func:`start_capture`): the
batch's inputs and output gradients (``kind="batch"``: what ``G`` is made of, ``G = g^T x``
for a linear layer; the DLRA optimizers compute ``Q_u^T G Q_v`` from it, O(b (m + n) r), without
an m x n matrix), or the dense gradient itself (``kind="dense"``: ``G`` accumulated, m x n; the
authors' reference rules need it). A capture accumulates over backward passes (gradient
accumulation) until the optimizer consumes and clears it; it costs the memory of the kept
tensors (``b (m + n)`` numbers per micro-batch and layer for "batch": the activations the
backward held anyway, kept until the step; ``m n`` for "dense") and, for "dense", one extra
O(b m n) product per backward. It lives as long as the optimizer that asked for it.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["Capture", "start_capture", "stop_capture", "get_capture"]

# ---------------------------------------------------------------------------
# captures
# ---------------------------------------------------------------------------

_CAPTURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Capture:
    """What one layer's backward passes recorded since the last :meth:`clear`.

    ``records`` holds one entry per backward pass (kind "batch"): ``("linear", x, g)``,
    ``("conv2d", x, g, conf)`` or ``("embedding", idx, g, rows)``, in the compute dtype;
    ``dense`` the accumulated m x n gradient (kind "dense"). The queries return the captured
    gradient's products in the dtype of their arguments.
    """

    def __init__(self, kind: str, owner: Any) -> None:
        if kind not in ("batch", "dense"):
            raise ValueError(f"capture kind must be 'batch' or 'dense', got {kind!r}")
        self.kind = kind
        self.owner = weakref.ref(owner)
        self.records: list[tuple] = []
        self.dense: torch.Tensor | None = None

    def clear(self) -> None:
        self.records.clear()
        self.dense = None

    @property
    def empty(self) -> bool:
        return not self.records and self.dense is None

    # -- recording (called by the backward) -------------------------------------------
    def add(self, record: tuple, dense: Any) -> None:
        """Keep a batch record (kind "batch") or add ``dense()`` to the gradient (kind "dense")."""
        if self.kind == "batch":
            self.records.append(record)
        else:
            G = dense()
            self.dense = G if self.dense is None else self.dense + G

    # -- queries ------------------------------------------------------------------
    def normal(self, Qu: torch.Tensor, Qv: torch.Tensor) -> torch.Tensor:
        """``Q_u^T G Q_v`` (k x l) of the captured ``G``: O(b (m + n) (k + l)) per record."""
        out = Qu.new_zeros(Qu.shape[-1], Qv.shape[-1])
        for rec in self.records:
            kind, a, g = rec[0], rec[1], rec[2]
            if kind == "linear":
                out += (g.to(Qu.dtype) @ Qu).T @ (a.to(Qu.dtype) @ Qv)
            elif kind == "conv2d":
                gq, z = _conv_sketch(a.to(Qu.dtype), g.to(Qu.dtype), Qu, Qv, rec[3])
                out += torch.einsum("bkhw,blhw->kl", gq, z)
            else:
                out += Qu[a].T @ (g.to(Qu.dtype) @ Qv)
        return out

    def sketches(self, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(G V, G^T U, U^T G V)`` of the captured ``G`` (to compare with the ``.grad``)."""
        if self.dense is not None:
            G = self.dense.to(U.dtype)
            GV = G @ V
            return GV, G.T @ U, U.T @ GV
        GV, GtU, M = U.new_zeros(U.shape), V.new_zeros(V.shape), U.new_zeros(U.shape[1], V.shape[1])
        for rec in self.records:
            kind, a, g = rec[0], rec[1], rec[2].to(U.dtype)
            if kind != "embedding":
                a = a.to(U.dtype)
            if kind == "linear":
                xV, gU = a @ V, g @ U
                GV, GtU, M = GV + g.T @ xV, GtU + a.T @ gU, M + gU.T @ xV
            elif kind == "conv2d":
                gU, z = _conv_sketch(a, g, U, V, rec[3])
                GV += torch.einsum("bohw,brhw->or", g, z)
                ks, stride, padding, dilation = rec[3]
                w_shape = (U.shape[1], a.shape[1], *ks)
                GtU += (
                    torch.nn.grad.conv2d_weight(a, w_shape, gU, stride, padding, dilation)
                    .reshape(U.shape[1], -1)
                    .T
                )
                M += torch.einsum("brhw,bshw->rs", gU, z)
            else:
                gV, Ui = g @ V, U[a]
                GV = GV.index_add(0, a, gV)
                GtU, M = GtU + g.T @ Ui, M + Ui.T @ gV
        return GV, GtU, M


def _conv_sketch(x, g, Qu, Qv, conf):
    """``(g Q_u, x * Q_v)``: the output gradient and the input convolved with the filters
    ``Q_v^T`` (reshaped ``(k, in, kh, kw)``), at every output position."""
    ks, stride, padding, dilation = conf
    k = Qv.shape[1]
    z = F.conv2d(x, Qv.T.reshape(k, -1, *ks), None, stride, padding, dilation)
    return torch.einsum("bohw,ok->bkhw", g, Qu), z


def start_capture(link: Any, kind: str, owner: Any) -> Capture:
    """Ask the backward of the layer with ``link`` to capture (see the module docstring) for as
    long as ``owner`` (the optimizer) lives. Returns the (new) :class:`Capture`."""
    cap = _CAPTURES.get(link)
    if cap is None or cap.kind != kind or cap.owner() is not owner:
        cap = Capture(kind, owner)
        _CAPTURES[link] = cap
    return cap


def stop_capture(link: Any) -> None:
    """Stop capturing for the layer with ``link`` (and drop what was kept)."""
    _CAPTURES.pop(link, None)


def get_capture(link: Any) -> Capture | None:
    """The layer's active capture, or None (also when its optimizer is gone)."""
    cap = _CAPTURES.get(link)
    if cap is not None and cap.owner() is None:
        _CAPTURES.pop(link, None)
        return None
    return cap


# ---------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------


def _work(dtype: torch.dtype) -> torch.dtype:
    """The optimizers' working dtype for factors of ``dtype`` (float32 below float32)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _manifold_grads(U, V, GV, GtU, M, started: bool, needs: tuple[bool, bool, bool]):
    """``(U.grad, S.grad, V.grad)`` from the sketches, in the parameters' dtype.

    Started: the tangent projection ``(Up, M, Vp)``, O((m + n) r^2). Not started (adapter
    before its first step): the raw sketches ``(G V, U^T G V, G^T U)``.
    """
    GV, GtU, M = GV.to(U.dtype), GtU.to(U.dtype), M.to(U.dtype)
    if started:
        GV = GV - U @ M
        GtU = GtU - V @ M.T
    return (GV if needs[0] else None, M if needs[1] else None, GtU if needs[2] else None)


class LowRankLinearFn(torch.autograd.Function):
    """``y = ((x V) S^T) U^T`` with the manifold pieces as factor gradients."""

    @staticmethod
    def forward(ctx, x, U, S, V, started: bool):
        xV = x @ V
        out = (xV @ S.T) @ U.T
        ctx.save_for_backward(x, xV, U, S, V)
        ctx.started = started
        ctx.link = getattr(U, "link", None)
        return out

    @staticmethod
    def backward(ctx, g):
        x, xV, U, S, V = ctx.saved_tensors
        cd = g.dtype  # compute dtype (bf16/fp16 under autocast); manifold pieces in U's dtype
        m, n, r = U.shape[0], V.shape[0], U.shape[1]
        g2 = g.reshape(-1, m)
        xV2 = xV.reshape(-1, r).to(cd)
        gU = g2 @ U.to(cd)  # (b, r)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = ((gU @ S.to(cd)) @ V.to(cd).T).reshape(x.shape).to(x.dtype)
        needs = ctx.needs_input_grad[1:4]
        if not any(needs):
            return grad_x, None, None, None, None
        x2 = x.reshape(-1, n).to(cd)
        cap = get_capture(ctx.link)
        if cap is not None:
            wd = _work(U.dtype)
            cap.add(("linear", x2.detach(), g2.detach()), lambda: g2.to(wd).T @ x2.to(wd))
        gu, gs, gv = _manifold_grads(U, V, g2.T @ xV2, x2.T @ gU, gU.T @ xV2, ctx.started, needs)
        return grad_x, gu, gs, gv, None


class LowRankConv2dFn(torch.autograd.Function):
    """Convolution with kernel ``U S V^T`` reshaped (out, in, kh, kw): a kh x kw convolution
    with the r filters ``V^T`` then a 1 x 1 convolution with ``U S``."""

    @staticmethod
    def forward(ctx, x, U, S, V, started: bool, kernel_size, stride, padding, dilation):
        r = U.shape[1]
        w1 = V.T.reshape(r, -1, *kernel_size)
        z = F.conv2d(x, w1, None, stride, padding, dilation)
        out = F.conv2d(z, (U @ S)[:, :, None, None])
        ctx.save_for_backward(x, z, U, S, V)
        ctx.started = started
        ctx.conf = (kernel_size, stride, padding, dilation)
        ctx.link = getattr(U, "link", None)
        return out

    @staticmethod
    def backward(ctx, g):
        x, z, U, S, V = ctx.saved_tensors
        kernel_size, stride, padding, dilation = ctx.conf
        cd = g.dtype
        r = U.shape[1]
        z = z.to(cd)
        gU = torch.einsum("bohw,or->brhw", g, U.to(cd))  # U^T g at every output position
        grad_x = None
        if ctx.needs_input_grad[0]:
            gz = torch.einsum("brhw,rs->bshw", gU, S.to(cd))
            w1 = V.to(cd).T.reshape(r, -1, *kernel_size)
            grad_x = torch.nn.grad.conv2d_input(x.shape, w1, gz, stride, padding, dilation)
            grad_x = grad_x.to(x.dtype)
        needs = ctx.needs_input_grad[1:4]
        if not any(needs):
            return (grad_x,) + (None,) * 8
        GV = torch.einsum("bohw,brhw->or", g, z)
        w_shape = (r, x.shape[1], *kernel_size)
        GtU = torch.nn.grad.conv2d_weight(x.to(cd), w_shape, gU, stride, padding, dilation)
        GtU = GtU.reshape(r, -1).T
        M = torch.einsum("brhw,bshw->rs", gU, z)
        cap = get_capture(ctx.link)
        if cap is not None:
            wd = _work(U.dtype)
            m_out = U.shape[0]

            def dense():
                shape = (m_out, x.shape[1], *kernel_size)
                w = torch.nn.grad.conv2d_weight(
                    x.to(wd), shape, g.to(wd), stride, padding, dilation
                )
                return w.reshape(m_out, -1)

            cap.add(("conv2d", x.detach().to(cd), g.detach(), ctx.conf), dense)
        gu, gs, gv = _manifold_grads(U, V, GV, GtU, M, ctx.started, needs)
        return (grad_x, gu, gs, gv) + (None,) * 5


class LowRankEmbeddingFn(torch.autograd.Function):
    """Rows ``idx`` of ``U S V^T``: ``(U[idx] S) V^T``.

    ``G = dL/dW`` has the output gradients ``g_t`` in rows ``idx_t`` (rows ``padding_idx`` get
    none), so ``G V = index_add(g V)``, ``G^T U = g^T U[idx]``, ``M = U[idx]^T (g V)``:
    O(b r (dim + r) + num r).
    """

    @staticmethod
    def forward(ctx, idx, U, S, V, started: bool, padding_idx):
        out = (U[idx] @ S) @ V.T
        ctx.save_for_backward(idx, U, S, V)
        ctx.started = started
        ctx.padding_idx = padding_idx
        ctx.link = getattr(U, "link", None)
        return out

    @staticmethod
    def backward(ctx, g):
        idx, U, S, V = ctx.saved_tensors
        cd = g.dtype
        dim, r = V.shape
        g2 = g.reshape(-1, dim)
        i = idx.reshape(-1)
        if ctx.padding_idx is not None:
            g2 = g2 * (i != ctx.padding_idx).to(cd)[:, None]
        needs = ctx.needs_input_grad[1:4]
        if not any(needs):
            return (None,) * 6
        gV = g2 @ V.to(cd)
        Ui = U[i].to(cd)
        GV = torch.zeros(U.shape[0], r, dtype=cd, device=g.device).index_add_(0, i, gV)
        cap = get_capture(ctx.link)
        if cap is not None:
            wd, num = _work(U.dtype), U.shape[0]

            def dense():
                return torch.zeros(num, dim, dtype=wd, device=g.device).index_add_(0, i, g2.to(wd))

            cap.add(("embedding", i.detach(), g2.detach()), dense)
        gu, gs, gv = _manifold_grads(U, V, GV, g2.T @ Ui, Ui.T @ gV, ctx.started, needs)
        return None, gu, gs, gv, None, None
