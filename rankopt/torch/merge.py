"""Folding low-rank layers back into the plain modules they replaced (:func:`merge`).

Every low-rank layer becomes the plain module of its kind (:mod:`rankopt.torch.kinds`:
``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding``, transformers' ``Conv1D``) with
the weight ``W0 + U S V^T`` (adapters) or ``U S V^T``, and every unpacked attention
(:class:`~rankopt.torch.attention.LowRankMultiheadAttention`) an ``nn.MultiheadAttention``
again.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import LowRankMultiheadAttention, to_multihead_attention
from .kinds import plain_module
from .layers import LowRankBase
from .names import module_names, set_module

__all__ = ["merge"]


def merge(model: nn.Module) -> nn.Module:
    """Fold every low-rank layer back into the plain module it replaced.

    The new weight is ``W0 + U S V^T`` (adapters) or ``U S V^T``, in the base's dtype and the
    plain module's layout (``Conv1D``: ``(in, out)``); the bias is kept (same tensor);
    ``requires_grad`` of the new weight follows the factors'. Layers sharing factors (tied
    weights) get one shared weight; a shared layer stays shared. Unpacked attentions become
    ``nn.MultiheadAttention`` again (``in_proj_weight`` the q, k, v blocks stacked).
    Returns ``model``.
    """
    if isinstance(model, (LowRankBase, LowRankMultiheadAttention)):
        raise ValueError(
            "merge() takes a model containing low-rank layers; call layer.dense_weight() on a layer"
        )
    names = module_names(model)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankBase)]
    weights: dict[int, nn.Parameter] = {}  # id(U) -> merged weight (tied layers share it)
    for _, layer in found:
        w = weights.get(id(layer.U))
        with torch.no_grad():
            dense = layer.dense_weight() if w is None else w.detach()
        new = plain_module(layer, dense, layer.U.requires_grad)
        if w is None:
            weights[id(layer.U)] = new.weight
        else:
            new.weight = w
        for name in names[id(layer)]:
            set_module(model, name, new)
    names = module_names(model)
    for _, att in [(n, m) for n, m in model.named_modules()
                   if isinstance(m, LowRankMultiheadAttention)]:  # fmt: skip
        mha = to_multihead_attention(att)
        for name in names[id(att)]:
            set_module(model, name, mha)
    return model
