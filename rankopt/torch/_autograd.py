"""Autograd functions of the low-rank layers (see :mod:`rankopt.torch.layers` for the math).

The backward stores, for ``G = dL/dW`` (never formed), the tangent pieces
``(U.grad, S.grad, V.grad) = (G V - U M, M, G^T U - V M^T)`` with ``M = U^T G V``, or the raw
sketches ``(G V, U^T G V, G^T U)`` for an adapter before its first step. Big products run in
the compute dtype (bf16/fp16 under autocast), the projection in the factors' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------


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


class _LowRankLinearFn(torch.autograd.Function):
    """``y = ((x V) S^T) U^T`` with the manifold pieces as factor gradients."""

    @staticmethod
    def forward(ctx, x, U, S, V, started: bool):
        xV = x @ V
        out = (xV @ S.T) @ U.T
        ctx.save_for_backward(x, xV, U, S, V)
        ctx.started = started
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
        gu, gs, gv = _manifold_grads(U, V, g2.T @ xV2, x2.T @ gU, gU.T @ xV2, ctx.started, needs)
        return grad_x, gu, gs, gv, None


class _LowRankConv2dFn(torch.autograd.Function):
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
        gu, gs, gv = _manifold_grads(U, V, GV, GtU, M, ctx.started, needs)
        return (grad_x, gu, gs, gv) + (None,) * 5


class _LowRankEmbeddingFn(torch.autograd.Function):
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
        gu, gs, gv = _manifold_grads(U, V, GV, g2.T @ Ui, Ui.T @ gV, ctx.started, needs)
        return None, gu, gs, gv, None, None
