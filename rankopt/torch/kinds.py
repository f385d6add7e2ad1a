r"""Which plain modules become which low-rank layers, and back: one :class:`Kind` per pair.

==================================  ==========================================  ==============
plain module                        low-rank layer                              kind
==================================  ==========================================  ==============
``nn.Linear``                       :class:`~rankopt.torch.LowRankLinear`       ``linear``
``nn.Conv2d``                       :class:`~rankopt.torch.LowRankConv2d`       ``conv2d``
``nn.Embedding``                    :class:`~rankopt.torch.LowRankEmbedding`    ``embedding``
``nn.Conv1d``                       :class:`~rankopt.torch.LowRankConv1d`       ``conv1d``
transformers' ``Conv1D`` (GPT-2)    :class:`~rankopt.torch.LowRankConv1D`       ``hf_conv1d``
==================================  ==========================================  ==============

Plain modules match by exact type (a subclass may compute something else in its forward;
``nn.MultiheadAttention``'s ``out_proj`` is converted through
:mod:`rankopt.torch.attention`). Each kind knows its module's weight as the m x n matrix the
factors approximate (``out x in``; conv kernels ``out x (in k...)``; ``Conv1D``'s ``(in, out)``
weight transposed), the options it cannot take, how to build the low-rank layer (adapter:
the weight is the frozen base, by reference) and the plain module a layer merges into.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .conv1d import LowRankConv1D, LowRankConv1d
from .embedding import LowRankEmbedding
from .layers import HALF_DTYPES, LowRankBase, LowRankConv2d, LowRankLinear

__all__ = ["Kind", "KINDS", "plain_kind", "layer_kind", "flat_weight", "weight_matrix", "unsupported",
           "make_layer", "plain_module", "LOW_RANK_TYPES", "is_hf_conv1d"]  # fmt: skip


def is_hf_conv1d(mod: Any) -> bool:
    """True for transformers' ``Conv1D`` (without importing transformers)."""
    cls = type(mod)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


@dataclass(frozen=True)
class Kind:
    """A plain module type and its low-rank layer: ``name`` (as in adapter files),
    ``low_rank`` (the layer class), ``matches(module)``, ``flat(module)`` (its weight as the
    m x n matrix), ``make(module, rank, base, dtype, seed)``, ``plain(layer)`` (an empty plain
    module on the meta device, weight to be set)."""

    name: str
    low_rank: type
    matches: Callable[[nn.Module], bool]
    flat: Callable[[nn.Module], torch.Tensor]
    make: Callable[..., LowRankBase]
    plain: Callable[[LowRankBase], nn.Module]


def _flat(mod: nn.Module) -> torch.Tensor:
    w = mod.weight.detach()
    return w.reshape(w.shape[0], -1)


def conv_kwargs(mod: nn.Module) -> dict:
    """Low-rank conv keyword arguments of a plain ``nn.Conv1d`` / ``nn.Conv2d``; ``ValueError``
    (the reason) for options they do not support."""
    if mod.groups != 1:
        raise ValueError(f"grouped convolutions (groups={mod.groups}) are not supported")
    if mod.padding_mode != "zeros":
        raise ValueError(f"padding_mode={mod.padding_mode!r} is not supported")
    padding = mod.padding
    if isinstance(padding, str):
        pairs = list(zip(mod.dilation, mod.kernel_size, strict=True))
        if padding == "valid":
            padding = (0,) * len(pairs)
        elif all(s == 1 for s in mod.stride) and all(d * (k - 1) % 2 == 0 for d, k in pairs):
            padding = tuple(d * (k - 1) // 2 for d, k in pairs)
        else:
            raise ValueError(f"padding={padding!r} is not supported for this kernel")
    return dict(kernel_size=tuple(mod.kernel_size), stride=tuple(mod.stride),
                padding=tuple(padding), dilation=tuple(mod.dilation))  # fmt: skip


def _with_bias(layer: LowRankBase, mod: nn.Module) -> LowRankBase:
    layer.bias = mod.bias
    return layer


def _kw(base, dtype, seed, device) -> dict:
    return dict(base=base, dtype=dtype, device=device, seed=seed)


def _meta(cls: type, *args: Any, layer: LowRankBase, **kw: Any) -> nn.Module:
    """A plain module on the meta device with the dtype of ``layer``'s base (or factors)."""
    W = layer.base_weight if layer.base_weight is not None else layer.U
    return cls(*args, device="meta", dtype=W.dtype, **kw)


def _hf_conv1d_plain(layer: LowRankBase) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        new = Conv1D(layer.out_features, layer.in_features)
    W = layer.base_weight if layer.base_weight is not None else layer.U
    return new.to(W.dtype)


def _conv_plain(cls: type, layer: LowRankBase) -> nn.Module:
    return _meta(cls, layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                 layer.padding, layer.dilation, bias=layer.bias is not None, layer=layer)  # fmt: skip


KINDS: tuple[Kind, ...] = (
    Kind("linear", LowRankLinear, lambda m: type(m) is nn.Linear, _flat,
         lambda m, r, b, dt, s, dev: _with_bias(LowRankLinear(
             m.in_features, m.out_features, r, bias=False, **_kw(b, dt, s, dev)), m),
         lambda L: _meta(nn.Linear, L.in_features, L.out_features, bias=L.bias is not None,
                         layer=L)),
    Kind("conv2d", LowRankConv2d, lambda m: type(m) is nn.Conv2d, _flat,
         lambda m, r, b, dt, s, dev: _with_bias(LowRankConv2d(
             m.in_channels, m.out_channels, rank=r, bias=False, **_kw(b, dt, s, dev),
             **conv_kwargs(m)), m),
         lambda L: _conv_plain(nn.Conv2d, L)),
    Kind("embedding", LowRankEmbedding, lambda m: type(m) is nn.Embedding, _flat,
         lambda m, r, b, dt, s, dev: LowRankEmbedding(
             m.num_embeddings, m.embedding_dim, r, padding_idx=m.padding_idx, **_kw(b, dt, s, dev)),
         lambda L: _meta(nn.Embedding, L.num_embeddings, L.embedding_dim, L.padding_idx, layer=L)),
    Kind("conv1d", LowRankConv1d, lambda m: type(m) is nn.Conv1d, _flat,
         lambda m, r, b, dt, s, dev: _with_bias(LowRankConv1d(
             m.in_channels, m.out_channels, rank=r, bias=False, **_kw(b, dt, s, dev),
             **conv_kwargs(m)), m),
         lambda L: _conv_plain(nn.Conv1d, L)),
    Kind("hf_conv1d", LowRankConv1D, is_hf_conv1d, lambda m: m.weight.detach().T,
         lambda m, r, b, dt, s, dev: _with_bias(LowRankConv1D(
             m.weight.shape[0], m.weight.shape[1], r, bias=False, **_kw(b, dt, s, dev)), m),
         _hf_conv1d_plain),
)  # fmt: skip

#: the low-rank layer classes (``isinstance`` checks)
LOW_RANK_TYPES = tuple(k.low_rank for k in KINDS)


def plain_kind(mod: Any) -> Kind | None:
    """The kind of a plain module (None: not convertible by type)."""
    return next((k for k in KINDS if k.matches(mod)), None)


def layer_kind(layer: Any) -> Kind | None:
    """The kind of a low-rank layer (None: not one)."""
    return next((k for k in KINDS if type(layer) is k.low_rank), None)


def flat_weight(mod: nn.Module) -> torch.Tensor:
    """A plain module's weight as the m x n matrix a low-rank layer approximates."""
    return plain_kind(mod).flat(mod)


def weight_matrix(mod: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """A tensor of ``mod``'s weight shape (its gradient, say) as the m x n matrix, read as
    :func:`flat_weight` reads the weight (a view: reshaped, or transposed for ``Conv1D``)."""
    return plain_kind(mod).flat(SimpleNamespace(weight=w))


def unsupported(mod: nn.Module, rank: int | None) -> tuple[str, str] | None:
    """``(reason, detail)`` why ``mod`` cannot become a low-rank layer of this rank (None: it
    can). Reasons: ``"unsupported options"``, ``"grouped conv"``, ``"non-float weight"``,
    ``"too small for the rank"``."""
    if isinstance(mod, nn.Embedding) and (mod.max_norm is not None or mod.scale_grad_by_freq
                                          or mod.sparse):  # fmt: skip
        return ("unsupported options",
                "nn.Embedding with max_norm, scale_grad_by_freq or sparse is not supported")  # fmt: skip
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        try:
            conv_kwargs(mod)
        except ValueError as e:
            return ("grouped conv" if mod.groups != 1 else "unsupported options", str(e))
    if not mod.weight.is_floating_point():
        return (
            "non-float weight",
            f"weight of dtype {mod.weight.dtype} (quantized?) is not supported",
        )
    m, n = flat_weight(mod).shape
    if rank is not None and rank > min(m, n):
        return "too small for the rank", f"rank={rank} exceeds min(out, in) = {min(m, n)}"
    return None


def make_layer(mod: nn.Module, rank: int, base: torch.Tensor | None, seed: Any) -> LowRankBase:
    """A low-rank layer of ``mod``'s kind and options (``base``: adapter mode); float32
    factors for half-precision weights; the bias is ``mod``'s (same tensor)."""
    w = mod.weight
    dtype = torch.float32 if w.dtype in HALF_DTYPES else w.dtype
    return plain_kind(mod).make(mod, rank, base, dtype, seed, w.device)


def plain_module(layer: LowRankBase, weight: torch.Tensor, requires_grad: bool) -> nn.Module:
    """The plain module ``layer`` merges into, holding ``weight`` (a new parameter) and the
    layer's bias (same tensor)."""
    new = layer_kind(layer).plain(layer)
    new.to_empty(device=weight.device)
    new.weight = nn.Parameter(weight, requires_grad=requires_grad)
    if getattr(layer, "bias", None) is not None:
        new.bias = layer.bias
    elif getattr(new, "bias", None) is not None:  # Conv1D always adds one: a frozen zero
        new.bias = nn.Parameter(torch.zeros_like(new.bias), requires_grad=False)
    return new
