r"""The locally optimal start (LOI) of new adapters: ``apply_low_rank(..., start="loi")``.

Bogachev et al. (arXiv 2507.12142) start an adapter not at ``S = 0`` but at the rank-r point
whose tangent space holds most of the first gradient (:func:`rankopt.locally_optimal_start`):
``X_0 = scale U_{1..r} V_{r+1..2r}^T`` from the SVD of the dense gradient ``G`` of the weight at
the zero adapter. Here ``G`` comes from one backward pass of the user's ``start_loss`` through
the plain model, **before** anything is converted:

1. only the targeted weights require grad (the flags of every parameter are restored after);
2. ``start_loss(model)`` once, ``torch.autograd.grad`` of it with respect to those weights (no
   ``.grad`` field is written);
3. each target's gradient as the m x n matrix of its kind (``kinds.weight_matrix``; the q/k/v
   blocks of a packed ``in_proj_weight``); tied or shared modules
   hold one weight, whose gradient is the sum over its uses;
4. the starts from those gradients, checked (2r above ``min(m, n)``, no gradient, a gradient of
   numerical rank below 2r: :class:`~rankopt.starts.LOIWarning` naming the module).

A failure raises before the model changes. ``apply_low_rank`` then converts as usual and sets
each adapter's factors (``set_factors``, which marks it started: the optimizers step from it as
from any point). Cost: one forward and
backward, one SVD of each m x n gradient (O(m n min(m, n))); memory: the dense gradients of
the targeted weights (one backward's worth).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..containers import FixedRankPoint
from ..manifold import FixedRankManifold
from ..starts import LOIWarning, locally_optimal_start
from .kinds import weight_matrix
from .layers import HALF_DTYPES

__all__ = ["START_SCALE", "check_start", "loi_starts"]

#: rankopt's default ``start_scale`` (the start's singular values, ``|alpha|`` of the paper;
#: the paper's own value could not be read here)
START_SCALE = 1e-3


def check_start(start: str, mode: str, start_loss: Any, start_scale: Any) -> None:
    """``ValueError`` for an unknown ``start``, LOI outside adapter mode, a missing or
    non-callable ``start_loss``, a ``start_loss`` without LOI, or a bad ``start_scale``."""
    if start not in ("zero", "loi"):
        raise ValueError(f"start must be 'zero' or 'loi', got {start!r}")
    if start == "zero":
        if start_loss is not None:
            raise ValueError("start_loss is used by start='loi' only")
        return
    if mode != "adapter":
        raise ValueError(f"start='loi' starts new adapters: it needs mode='adapter', got {mode!r}")
    if start_loss is None or not callable(start_loss):
        raise ValueError("start='loi' needs start_loss, a callable model -> scalar loss tensor "
                         f"(evaluated once on a batch you choose); got {start_loss!r}")  # fmt: skip
    if (isinstance(start_scale, bool) or not isinstance(start_scale, (int, float))
            or not math.isfinite(start_scale) or start_scale == 0):  # fmt: skip
        raise ValueError(f"start_scale must be a finite nonzero number, got {start_scale!r}")


def _source(model: nn.Module, name: str, mod: nn.Module) -> tuple[nn.Parameter, Callable]:
    """The parameter holding a target's weight and the map from its gradient to the target's
    m x n matrix. Attention projections (meta-device stand-ins) read their
    ``nn.MultiheadAttention``: a block of ``in_proj_weight``, ``q/k/v_proj_weight`` or
    ``out_proj.weight``."""
    if not mod.weight.is_meta:
        return mod.weight, lambda g, mod=mod: weight_matrix(mod, g)
    parent, _, proj = name.rpartition(".")
    mha = model.get_submodule(parent) if parent else model
    if proj == "out_proj":
        return mha.out_proj.weight, lambda g: g
    i = ("q_proj", "k_proj", "v_proj").index(proj)
    if mha.in_proj_weight is None:
        return getattr(mha, f"{proj[0]}_proj_weight"), lambda g: g
    E = mha.embed_dim
    return mha.in_proj_weight, lambda g, i=i: g[i * E : (i + 1) * E]


def _check_size(name: str, shape: tuple[int, int], rank: int) -> None:
    m, n = shape
    if 2 * rank > min(m, n):
        raise ValueError(
            f"module {name!r} ({m} x {n}): start='loi' needs 2 rank <= min(m, n) = {min(m, n)}, "
            f"got rank={rank}; use a smaller rank or exclude it (exclude_modules=[{name!r}])"
        )


def _gradients(model: nn.Module, params: list[nn.Parameter], start_loss: Callable) -> list:
    """``d start_loss(model) / d p`` for each of ``params`` (None where unused), with only
    ``params`` requiring grad during the pass; every flag restored, no ``.grad`` written."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            loss = start_loss(model)
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                raise ValueError(f"start_loss(model) must return a scalar tensor, got {loss!r}")
            if not loss.requires_grad:
                raise ValueError("start_loss(model) does not depend on any targeted weight "
                                 "(computed under torch.no_grad?)")  # fmt: skip
            return list(torch.autograd.grad(loss.reshape(()), params, allow_unused=True))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _start(name: str, G: torch.Tensor, rank: int, scale: float, dtype) -> FixedRankPoint:
    """The start of one module from its gradient; ``LOIWarning`` re-raised naming it."""
    m, n = G.shape
    man = FixedRankManifold(m, n, rank, backend="torch", dtype=dtype, device=G.device,
                            validate=False)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LOIWarning)
        x0 = locally_optimal_start(man, G.detach().to(dtype), scale)
    for w in caught:
        if issubclass(w.category, LOIWarning):
            warnings.warn(f"module {name!r}: {w.message}", LOIWarning, stacklevel=4)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return x0


def loi_starts(model: nn.Module, groups: list, rank: int, start_loss: Callable,
               scale: float) -> list[FixedRankPoint]:  # fmt: skip
    """The LOI start of each tie group ``[(name, module), ...]`` of ``model`` (see the module
    doc), in the factors' dtype (float32 for half-precision weights). Changes nothing.

    Raises
    ------
    ValueError
        A target with ``2 rank > min(m, n)``, a loss that is not a scalar tensor or does not
        depend on the targets, a target that got no gradient (None or all zero), a non-finite
        gradient.
    """
    sources = [_source(model, *group[0]) for group in groups]
    for group, (param, to_matrix) in zip(groups, sources, strict=True):
        _check_size(group[0][0], tuple(to_matrix(param).shape), rank)
    params = list({id(p): p for p, _ in sources}.values())
    grads = dict(zip(map(id, params), _gradients(model, params, start_loss), strict=True))
    mats = [None if grads[id(p)] is None else f(grads[id(p)]) for p, f in sources]
    dead = [g[0][0] for g, G in zip(groups, mats, strict=True)
            if G is None or not bool(torch.count_nonzero(G))]  # fmt: skip
    if dead:
        raise ValueError(f"start='loi': no gradient reached module(s) {dead} (start_loss does "
                         "not use them); exclude them or use start='zero'")  # fmt: skip
    starts = []
    for group, (param, _), G in zip(groups, sources, mats, strict=True):
        dtype = torch.float32 if param.dtype in HALF_DTYPES else param.dtype
        if not bool(torch.isfinite(G).all()):
            raise ValueError(f"start='loi': the gradient of module {group[0][0]!r} is not finite")
        starts.append(_start(group[0][0], G, rank, scale, dtype))
    return starts
