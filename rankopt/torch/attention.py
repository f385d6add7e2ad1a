r"""``nn.MultiheadAttention`` with its projections as modules, so that each can be low-rank.

``nn.MultiheadAttention`` keeps the query, key and value projections packed in one
``in_proj_weight`` (3E x E) and hands its weights to ``F.multi_head_attention_forward``, which
reads ``out_proj.weight`` directly: a low-rank layer cannot stand in for any of them.
:class:`LowRankMultiheadAttention` is the same attention with four projection **modules**,
``q_proj``, ``k_proj``, ``v_proj`` (the three E-row blocks of ``in_proj_weight``, or the
separate ``q/k/v_proj_weight`` when ``kdim`` / ``vdim`` differ from ``embed_dim``) and
``out_proj``. :func:`~rankopt.torch.apply_low_rank` replaces an ``nn.MultiheadAttention`` by it
(the **q/k/v-blocks** choice: each block is its own fixed-rank matrix of rank r and can be
targeted alone, as ``q_proj`` / ``v_proj`` in Hugging Face models; PEFT instead adapts the
packed ``in_proj`` as one 3E x E matrix) and converts the targeted projections;
:func:`~rankopt.torch.merge` folds it back into an ``nn.MultiheadAttention``.

Names: the projections of an attention module ``a`` are ``a.q_proj``, ``a.k_proj``,
``a.v_proj``, ``a.out_proj``; ``target_modules`` may name them, or ``a`` itself (all four).
The blocks of the packed ``in_proj_weight`` and ``in_proj_bias`` are copied (the packed
parameters are then released with the replaced module); ``out_proj``'s parameters and
``bias_k`` / ``bias_v`` are kept by reference.

It has no packed ``in_proj_weight`` / ``in_proj_bias`` (both None), so the fused fast path
of ``nn.TransformerEncoderLayer`` is not taken (it needs them) and its regular path calls this
module. The forward follows ``F.multi_head_attention_forward`` step by step (masks, ``bias_k`` /
``bias_v``, ``add_zero_attn``, dropout on the attention weights, ``need_weights``,
``average_attn_weights``, ``batch_first``, unbatched inputs), so a converted attention with new
adapters computes the original function to rounding.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LowRankMultiheadAttention",
    "PROJECTIONS",
    "projection_stand_ins",
    "to_multihead_attention",
    "find_module",
]

#: the projection modules of a :class:`LowRankMultiheadAttention`
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _blocks(mha: nn.MultiheadAttention) -> tuple[list[torch.Tensor], list[Any]]:
    """The q, k, v weights (views) and biases (views or None) of an ``nn.MultiheadAttention``."""
    E = mha.embed_dim
    if mha.in_proj_weight is not None:
        w = [mha.in_proj_weight[i * E : (i + 1) * E] for i in range(3)]
    else:
        w = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
    b = mha.in_proj_bias
    return w, [None if b is None else b[i * E : (i + 1) * E] for i in range(3)]


def _linear(weight: torch.Tensor, bias: Any, device: Any = None, copy: bool = True) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` / ``bias`` (copies of views, or the tensors)."""
    out, inp = weight.shape
    lin = nn.Linear(inp, out, bias=bias is not None, device="meta", dtype=weight.dtype)
    lin.to_empty(device=device or weight.device)

    def param(t: torch.Tensor) -> nn.Parameter:
        if isinstance(t, nn.Parameter) and not copy:
            return t
        return nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)

    lin.weight = param(weight)
    if bias is not None:
        lin.bias = param(bias)
    return lin


def projection_stand_ins(mha: nn.MultiheadAttention) -> dict[str, nn.Linear]:
    """``{projection: nn.Linear on the meta device}`` with the shapes and dtype of ``mha``'s
    projections: what :func:`~rankopt.torch.apply_low_rank` checks before changing anything."""
    w, b = _blocks(mha)
    out = {}
    for name, weight, bias in zip(PROJECTIONS, [*w, mha.out_proj.weight],
                                  [*b, mha.out_proj.bias], strict=True):  # fmt: skip
        m, n = weight.shape
        out[name] = nn.Linear(n, m, bias=bias is not None, device="meta", dtype=weight.dtype)
    return out


class LowRankMultiheadAttention(nn.Module):
    """An ``nn.MultiheadAttention`` unpacked into four projection modules (see the module doc).

    Parameters
    ----------
    mha : nn.MultiheadAttention
        The attention to unpack; the new module computes the same function.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.kdim, self.vdim = mha.kdim, mha.vdim
        self.head_dim, self.dropout = mha.head_dim, mha.dropout
        self.batch_first, self.add_zero_attn = mha.batch_first, mha.add_zero_attn
        w, b = _blocks(mha)
        self.q_proj, self.k_proj, self.v_proj = (
            _linear(wi, bi) for wi, bi in zip(w, b, strict=True)
        )
        self.out_proj = _linear(mha.out_proj.weight, mha.out_proj.bias, copy=False)
        self.bias_k, self.bias_v = mha.bias_k, mha.bias_v
        # what torch's Transformer layers read to choose their fused fast path: no packed
        # weights, so they take their regular path, which calls this module
        self.in_proj_weight = self.in_proj_bias = None
        self._qkv_same_embed_dim = False

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward``: ``(attn_output, attn_weights or None)``."""
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        tgt_len, bsz, _ = query.shape
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        mask, kpm = _float_mask(attn_mask, q.dtype), _float_mask(key_padding_mask, q.dtype)
        if mask is not None and mask.dim() == 2:
            mask = mask.unsqueeze(0)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            mask, kpm = _pad(mask), _pad(kpm)
        heads = bsz * self.num_heads
        q = q.reshape(tgt_len, heads, self.head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], heads, self.head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], heads, self.head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = q.new_zeros(heads, 1, self.head_dim)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            mask, kpm = _pad(mask), _pad(kpm)
        src_len = k.shape[1]
        if kpm is not None:
            kpm = kpm.view(bsz, 1, 1, src_len).expand(-1, self.num_heads, -1, -1)
            kpm = kpm.reshape(heads, 1, src_len)
            mask = kpm if mask is None else mask + kpm
        p = self.dropout if self.training else 0.0
        if need_weights:
            out, weights = self._with_weights(q, k, v, mask, p, bsz, average_attn_weights)
        else:
            out, weights = self._sdpa(q, k, v, mask, p, bsz), None
        out = out.view(tgt_len, bsz, out.shape[-1])
        if not batched:
            return out.squeeze(1), None if weights is None else weights.squeeze(0)
        return (out.transpose(0, 1) if self.batch_first else out), weights

    def _with_weights(self, q, k, v, mask, p, bsz, average):
        """The attention as ``F.multi_head_attention_forward`` computes it when the weights
        are returned: scaled ``q``, ``baddbmm`` with the mask, softmax, dropout, ``bmm``."""
        tgt_len, src_len = q.shape[1], k.shape[1]
        q_scaled = q * math.sqrt(1.0 / float(self.head_dim))
        if mask is not None:
            w = torch.baddbmm(mask, q_scaled, k.transpose(-2, -1))
        else:
            w = torch.bmm(q_scaled, k.transpose(-2, -1))
        w = F.softmax(w, dim=-1)
        if p > 0.0:
            w = F.dropout(w, p=p)
        out = torch.bmm(w, v).transpose(0, 1).contiguous().view(tgt_len * bsz, self.embed_dim)
        w = w.view(bsz, self.num_heads, tgt_len, src_len)
        return self.out_proj(out), (w.mean(dim=1) if average else w)

    def _sdpa(self, q, k, v, mask, p, bsz):
        """The attention as ``F.multi_head_attention_forward`` computes it without weights."""
        tgt_len, src_len = q.shape[1], k.shape[1]
        if mask is not None:
            mask = (
                mask.unsqueeze(0)
                if mask.shape[0] == 1
                else mask.view(bsz, self.num_heads, -1, src_len)
            )
        shape = (bsz, self.num_heads, -1, self.head_dim)
        out = F.scaled_dot_product_attention(q.view(shape), k.view(shape), v.view(shape), mask, p)
        out = out.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, self.embed_dim)
        return self.out_proj(out)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, "
            f"vdim={self.vdim}, batch_first={self.batch_first}"
        )


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An additive float mask: a bool mask becomes ``-inf`` where True (as torch's MHA)."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise ValueError(f"attention masks must be bool or floating point, got {mask.dtype}")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _pad(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else F.pad(mask, (0, 1))


def _dense(proj: nn.Module) -> tuple[torch.Tensor, bool]:
    """A projection's dense weight and whether it is trained (plain or low-rank module)."""
    if hasattr(proj, "dense_weight"):
        return proj.dense_weight(), bool(proj.U.requires_grad)
    return proj.weight.detach(), bool(proj.weight.requires_grad)


def to_multihead_attention(att: LowRankMultiheadAttention) -> nn.MultiheadAttention:
    """An ``nn.MultiheadAttention`` computing what ``att`` computes (its low-rank projections
    merged: ``W0 + U S V^T``); ``out_proj``'s bias and ``bias_k`` / ``bias_v`` are kept."""
    dense = [_dense(getattr(att, p)) for p in PROJECTIONS]
    dtype, device = dense[0][0].dtype, dense[0][0].device
    bias = att.q_proj.bias is not None
    mha = nn.MultiheadAttention(
        att.embed_dim, att.num_heads, dropout=att.dropout, bias=bias,
        add_bias_kv=att.bias_k is not None, add_zero_attn=att.add_zero_attn, kdim=att.kdim,
        vdim=att.vdim, batch_first=att.batch_first, device="meta", dtype=dtype,
    )  # fmt: skip
    mha.to_empty(device=device)
    qkv = dense[:3]
    if mha.in_proj_weight is not None:
        w = torch.cat([d for d, _ in qkv])
        mha.in_proj_weight = nn.Parameter(w, requires_grad=any(t for _, t in qkv))
    else:
        for name, (d, trained) in zip(("q", "k", "v"), qkv, strict=True):
            setattr(mha, f"{name}_proj_weight", nn.Parameter(d.clone(), requires_grad=trained))
    if bias:
        b = [getattr(att, p).bias for p in PROJECTIONS[:3]]
        mha.in_proj_bias = nn.Parameter(torch.cat([t.detach() for t in b]),
                                        requires_grad=any(t.requires_grad for t in b))  # fmt: skip
    if isinstance(att.out_proj, nn.Linear):  # not converted: the same parameter
        mha.out_proj.weight = att.out_proj.weight
    else:
        mha.out_proj.weight = nn.Parameter(dense[3][0].clone(), requires_grad=dense[3][1])
    mha.out_proj.bias = att.out_proj.bias
    mha.bias_k, mha.bias_v = att.bias_k, att.bias_v
    mha.train(att.training)
    return mha


def find_module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)``, or for a projection of a plain ``nn.MultiheadAttention``
    (``a.q_proj`` ... ``a.out_proj``) its stand-in (:func:`projection_stand_ins`); raises
    ``AttributeError`` like ``get_submodule`` for a name that is neither."""
    parent, _, child = name.rpartition(".")
    if child in PROJECTIONS:
        try:
            owner = model.get_submodule(parent) if parent else model
        except AttributeError:
            owner = None
        if type(owner) is nn.MultiheadAttention:
            return projection_stand_ins(owner)[child]
    return model.get_submodule(name)
