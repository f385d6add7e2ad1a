r"""Model conversion in the PEFT spirit: low-rank adapters, compression, merging back.

* :func:`apply_low_rank` replaces selected ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding``
  modules by :class:`~rankopt.torch.LowRankLinear` / :class:`~rankopt.torch.LowRankConv2d` /
  :class:`~rankopt.torch.LowRankEmbedding`:

  - ``mode="adapter"``: ``W = W0 + U S V^T`` with the pretrained ``W0`` frozen (kept by
    reference, no copy) and ``S = 0``, so the converted model computes exactly the original
    function until the optimizer's first step (see :mod:`rankopt.torch.layers` for how the
    first step enters the manifold). All other parameters of the model are frozen, except those
    of modules named in ``modules_to_save``.
  - ``mode="compress"``: ``W ~ U diag(s) V^T``, the truncated SVD of the pretrained weight
    (conv kernels reshaped ``out x (in kh kw)``), optionally with a rank per layer chosen from
    an energy threshold. Cost O(m n min(m, n)) per layer, once.

* :func:`merge` folds every low-rank layer back into a plain ``nn.Linear`` / ``nn.Conv2d`` /
  ``nn.Embedding``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .embedding import LowRankEmbedding
from .layers import LowRankConv2d, LowRankLinear, _LowRankBase, is_manifold_parameter

__all__ = [
    "apply_low_rank",
    "merge",
    "trainable_parameters",
    "manifold_parameters",
    "ordinary_parameters",
    "parameter_counts",
    "energy_rank",
]


def _matches(name: str, target: Any) -> bool:
    """PEFT-style matching: a list of names matches by suffix at a module boundary; a single
    string or compiled pattern is a regular expression matched against the whole name."""
    if target is None:
        return True
    if isinstance(target, re.Pattern):
        return target.fullmatch(name) is not None
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def energy_rank(s: torch.Tensor, energy: float) -> int:
    r"""Smallest k with ``sum_{i<k} s_i^2 >= energy * sum_i s_i^2`` (s descending)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must lie in (0, 1], got {energy}")
    e = torch.cumsum(s.double() ** 2, 0)
    total = float(e[-1])
    if total == 0:
        return 1
    return int(torch.searchsorted(e, torch.tensor(energy * total, dtype=e.dtype)).item()) + 1


def _flat_weight(mod: nn.Module) -> torch.Tensor:
    w = mod.weight.detach()
    return w.reshape(w.shape[0], -1)


def _conv_kwargs(mod: nn.Conv2d, name: str) -> dict:
    if mod.groups != 1:
        raise ValueError(
            f"module {name!r}: grouped convolutions (groups={mod.groups}) are not supported"
        )
    if mod.padding_mode != "zeros":
        raise ValueError(f"module {name!r}: padding_mode={mod.padding_mode!r} is not supported")
    padding = mod.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif all(s == 1 for s in mod.stride) and all(
            d * (k - 1) % 2 == 0 for d, k in zip(mod.dilation, mod.kernel_size, strict=True)
        ):
            padding = tuple(
                d * (k - 1) // 2 for d, k in zip(mod.dilation, mod.kernel_size, strict=True)
            )
        else:
            raise ValueError(
                f"module {name!r}: padding={padding!r} is not supported for this kernel"
            )
    return dict(
        kernel_size=tuple(mod.kernel_size), stride=tuple(mod.stride), padding=tuple(padding),
        dilation=tuple(mod.dilation),
    )  # fmt: skip


def _make_layer(mod: nn.Module, name: str, rank: int, base, seed) -> _LowRankBase:
    dtype, device = mod.weight.dtype, mod.weight.device
    if isinstance(mod, nn.Embedding):
        if mod.max_norm is not None or mod.scale_grad_by_freq or mod.sparse:
            raise ValueError(
                f"module {name!r}: nn.Embedding with max_norm, scale_grad_by_freq or sparse "
                "is not supported"
            )
        return LowRankEmbedding(
            mod.num_embeddings, mod.embedding_dim, rank, padding_idx=mod.padding_idx, base=base,
            dtype=dtype, device=device, seed=seed,
        )  # fmt: skip
    if isinstance(mod, nn.Linear):
        layer = LowRankLinear(
            mod.in_features, mod.out_features, rank, bias=False, base=base, dtype=dtype,
            device=device, seed=seed,
        )  # fmt: skip
    else:
        layer = LowRankConv2d(
            mod.in_channels, mod.out_channels, rank=rank, bias=False, base=base, dtype=dtype,
            device=device, seed=seed, **_conv_kwargs(mod, name),
        )  # fmt: skip
    layer.bias = mod.bias
    return layer


def apply_low_rank(
    model: nn.Module,
    rank: int | None = 8,
    target_modules: Sequence[str] | str | re.Pattern | None = None,
    mode: str = "adapter",
    energy: float | None = None,
    modules_to_save: Sequence[str] | None = None,
    seed: int | None = None,
) -> nn.Module:
    r"""Replace selected ``nn.Linear`` / ``nn.Conv2d`` modules of ``model`` by low-rank layers.

    Parameters
    ----------
    model : nn.Module
        Converted in place (and returned).
    rank : int or None
        Rank of every converted layer; in "compress" mode with ``energy`` an upper bound
        (None: no bound).
    target_modules : list of str, str, compiled regex or None
        A list matches module names by suffix (``"query"`` matches ``"encoder.layer.0.attention.self.query"``);
        a string or pattern is a regular expression matched against the full name; None selects
        every ``nn.Linear`` and ``nn.Conv2d``. ``nn.Embedding`` modules are converted only when
        named by ``target_modules``.
    mode : {"adapter", "compress"}
    energy : float in (0, 1], optional
        "compress" only: per layer, the smallest rank keeping this fraction of ``||W||_F^2``.
    modules_to_save : list of str, optional
        "adapter" only: modules (suffix match) whose parameters stay trainable, e.g. a new
        classification head. Everything else except the adapters is frozen.
    seed : int, optional
        Seeds the adapters' random orthonormal factors (layer i uses ``seed + i``).

    Returns
    -------
    nn.Module
        ``model``.

    Raises
    ------
    ValueError
        Unknown mode, no module matched, a rank above ``min(out, in)`` of a matched layer, a
        weight of rank below the requested rank in "compress" mode, unsupported conv options.
    """
    if mode not in ("adapter", "compress"):
        raise ValueError(f"mode must be 'adapter' or 'compress', got {mode!r}")
    if energy is not None and mode != "compress":
        raise ValueError("energy (rank from an energy threshold) applies to mode='compress' only")
    if rank is None and energy is None:
        raise ValueError("give a rank, an energy threshold, or both")
    if mode == "adapter" and modules_to_save is None:
        modules_to_save = ()
    kinds = (
        (nn.Linear, nn.Conv2d) if target_modules is None else (nn.Linear, nn.Conv2d, nn.Embedding)
    )
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if type(mod) in kinds and _matches(name, target_modules)
    ]
    if not targets:
        raise ValueError(
            f"no nn.Linear, nn.Conv2d or nn.Embedding module matches target_modules={target_modules!r}"
        )
    new_layers = []
    for i, (name, mod) in enumerate(targets):
        m, n = _flat_weight(mod).shape
        layer_seed = None if seed is None else seed + i
        if mode == "adapter":
            if not 1 <= rank <= min(m, n):
                raise ValueError(
                    f"rank={rank} exceeds min(out, in) = {min(m, n)} of module {name!r}; "
                    "exclude it with target_modules"
                )
            layer = _make_layer(mod, name, rank, mod.weight, layer_seed)
        else:
            W = _flat_weight(mod)
            u, s, vh = torch.linalg.svd(W.double(), full_matrices=False)
            k = energy_rank(s, energy) if energy is not None else rank
            if rank is not None:
                if rank > min(m, n):
                    raise ValueError(
                        f"rank={rank} exceeds min(out, in) = {min(m, n)} of module {name!r}; "
                        "exclude it with target_modules"
                    )
                k = min(k, rank)
            if not float(s[k - 1]) > 0:
                raise ValueError(
                    f"the weight of module {name!r} has rank < {k}: use a smaller rank"
                )
            layer = _make_layer(mod, name, k, None, layer_seed)
            layer.set_factors(u[:, :k], s[:k], vh[:k].T)
        _set_module(model, name, layer)
        new_layers.append(layer)
    if mode == "adapter":
        keep = {id(p) for layer in new_layers for p in (layer.U, layer.S, layer.V)}
        for name, mod in model.named_modules():
            if name and _matches(name, list(modules_to_save)):
                keep.update(id(p) for p in mod.parameters())
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    return model


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def merge(model: nn.Module) -> nn.Module:
    """Fold every low-rank layer back into a plain ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding``.

    The new weight is ``W0 + U S V^T`` (adapters) or ``U S V^T``; the bias is kept (same
    tensor); ``requires_grad`` of the new weight follows the factors'. Returns ``model``.
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, _LowRankBase)]
    if isinstance(model, _LowRankBase):
        raise ValueError(
            "merge() takes a model containing low-rank layers; call layer.dense_weight() on a layer"
        )
    for name, layer in found:
        W = layer.dense_weight()
        if isinstance(layer, LowRankEmbedding):
            new = nn.Embedding(layer.num_embeddings, layer.embedding_dim, layer.padding_idx,
                               dtype=W.dtype, device=W.device)  # fmt: skip
        elif isinstance(layer, LowRankLinear):
            new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                            dtype=W.dtype, device=W.device)  # fmt: skip
        else:
            new = nn.Conv2d(
                layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                layer.padding, layer.dilation, bias=layer.bias is not None, dtype=W.dtype,
                device=W.device,
            )  # fmt: skip
        with torch.no_grad():
            new.weight.copy_(W)
        new.weight.requires_grad_(layer.U.requires_grad)
        if getattr(layer, "bias", None) is not None:
            new.bias = layer.bias
        _set_module(model, name, new)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with ``requires_grad`` (adapters, saved modules; pass them to an optimizer)."""
    return [p for p in model.parameters() if p.requires_grad]


def manifold_parameters(params: Iterable[nn.Parameter] | nn.Module) -> list[nn.Parameter]:
    """The ``U``, ``S``, ``V`` factors of low-rank layers among ``params`` (or a module's)."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    return [p for p in params if is_manifold_parameter(p)]


def ordinary_parameters(params: Iterable[nn.Parameter] | nn.Module) -> list[nn.Parameter]:
    """All parameters except low-rank factors (safe to hand to any torch optimizer)."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    return [p for p in params if not is_manifold_parameter(p)]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Counts: ``total`` (stored numbers), ``trainable``, and ``manifold_dim``, the sum over
    low-rank layers of the manifold dimension ``(m + n - r) r`` (the true degrees of freedom,
    less than the ``m r + r^2 + n r`` stored numbers of U, S, V)."""
    dim = sum(
        (m.U.shape[0] + m.V.shape[0] - m.rank) * m.rank
        for m in model.modules()
        if isinstance(m, _LowRankBase)
    )
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "manifold_dim": int(dim),
    }
