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
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .embedding import LowRankEmbedding
from .layers import (
    HALF_DTYPES,
    LowRankBase,
    LowRankConv2d,
    LowRankLinear,
    is_manifold_parameter,
)

__all__ = [
    "apply_low_rank",
    "merge",
    "trainable_parameters",
    "manifold_parameters",
    "ordinary_parameters",
    "parameter_counts",
    "energy_rank",
    "saved_module_names",
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


def _conv_kwargs(mod: nn.Conv2d) -> dict:
    """``LowRankConv2d`` keyword arguments of a plain ``nn.Conv2d``; ``ValueError`` (the reason)
    for options it does not support."""
    if mod.groups != 1:
        raise ValueError(f"grouped convolutions (groups={mod.groups}) are not supported")
    if mod.padding_mode != "zeros":
        raise ValueError(f"padding_mode={mod.padding_mode!r} is not supported")
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
            raise ValueError(f"padding={padding!r} is not supported for this kernel")
    return dict(
        kernel_size=tuple(mod.kernel_size), stride=tuple(mod.stride), padding=tuple(padding),
        dilation=tuple(mod.dilation),
    )  # fmt: skip


def _unsupported(mod: nn.Module, rank: int | None) -> str | None:
    """Why ``mod`` cannot become a low-rank layer of this rank (None: it can)."""
    if isinstance(mod, nn.Embedding) and (mod.max_norm is not None or mod.scale_grad_by_freq
                                          or mod.sparse):  # fmt: skip
        return "nn.Embedding with max_norm, scale_grad_by_freq or sparse is not supported"
    if isinstance(mod, nn.Conv2d):
        try:
            _conv_kwargs(mod)
        except ValueError as e:
            return str(e)
    if not mod.weight.is_floating_point():
        return f"weight of dtype {mod.weight.dtype} (quantized?) is not supported"
    m, n = _flat_weight(mod).shape
    if rank is not None and rank > min(m, n):
        return f"rank={rank} exceeds min(out, in) = {min(m, n)}"
    return None


def _make_layer(mod: nn.Module, rank: int, base, seed) -> LowRankBase:
    """A low-rank layer of ``mod``'s kind and options; factors float32 for half weights."""
    w = mod.weight
    dtype = torch.float32 if w.dtype in HALF_DTYPES else w.dtype
    if isinstance(mod, nn.Embedding):
        return LowRankEmbedding(
            mod.num_embeddings, mod.embedding_dim, rank, padding_idx=mod.padding_idx, base=base,
            dtype=dtype, device=w.device, seed=seed,
        )  # fmt: skip
    if isinstance(mod, nn.Linear):
        layer = LowRankLinear(
            mod.in_features, mod.out_features, rank, bias=False, base=base, dtype=dtype,
            device=w.device, seed=seed,
        )  # fmt: skip
    else:
        layer = LowRankConv2d(
            mod.in_channels, mod.out_channels, rank=rank, bias=False, base=base, dtype=dtype,
            device=w.device, seed=seed, **_conv_kwargs(mod),
        )  # fmt: skip
    layer.bias = mod.bias
    return layer


def _check_rank(rank: Any, mode: str, energy: float | None) -> None:
    if mode not in ("adapter", "compress"):
        raise ValueError(f"mode must be 'adapter' or 'compress', got {mode!r}")
    if energy is not None and mode != "compress":
        raise ValueError("energy (rank from an energy threshold) applies to mode='compress' only")
    if rank is None:
        if energy is None:
            raise ValueError("give a rank, an energy threshold (mode='compress'), or both")
    elif isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank must be a positive integer (or None with energy=...), got {rank!r}")


def _module_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name of every submodule (a module shared by several parents has several)."""
    names: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), []).append(name)
    return names


def _param_owners(model: nn.Module) -> dict[int, dict[int, str]]:
    """For each parameter (by id): the modules holding it directly, ``{id(module): name}``."""
    owners: dict[int, dict[int, str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), {}).setdefault(id(mod), name)
    return owners


def _select(model, rank, target_modules, exclude_modules, modules_to_save):
    """``(targets, skipped)``: the modules to convert as ``[(name, module)]`` (first name of a
    shared module), and ``[(name, reason)]`` of those left alone. Explicit targets that cannot
    be converted raise ``ValueError``; with ``target_modules=None`` they are skipped."""
    kinds = (
        (nn.Linear, nn.Conv2d) if target_modules is None else (nn.Linear, nn.Conv2d, nn.Embedding)
    )
    keep = list(modules_to_save or ())
    cands = []
    for name, mod in model.named_modules():
        if type(mod) not in kinds or not _matches(name, target_modules):
            continue
        if exclude_modules is not None and _matches(name, exclude_modules):
            continue
        parts = name.split(".")
        if keep and any(_matches(".".join(parts[:i]), keep) for i in range(1, len(parts) + 1)):
            continue  # modules_to_save are trained whole, not adapted
        cands.append((name, mod))
    if not cands:
        raise ValueError(
            "no nn.Linear, nn.Conv2d or nn.Embedding module matches "
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r})"
        )
    targets, skipped = [], []
    for name, mod in cands:
        why = _unsupported(mod, rank)
        if why is None:
            targets.append((name, mod))
        elif target_modules is None:
            skipped.append((name, why))
        else:
            raise ValueError(f"module {name!r}: {why}; exclude it (exclude_modules=[{name!r}])")
    return targets, skipped


def _tie_groups(model, targets, skipped, explicit: bool) -> list[list[tuple[str, nn.Module]]]:
    """Targets grouped by shared weight (tied embedding / output head): converted together,
    they share one set of factors and stay tied. A target tied to a module that is not
    converted is refused (explicit targets) or skipped (``target_modules=None``)."""
    owners = _param_owners(model)
    by_weight: dict[int, list] = {}
    for name, mod in targets:
        by_weight.setdefault(id(mod.weight), []).append((name, mod))
    converted = {id(mod) for _, mod in targets}
    groups = []
    for group in by_weight.values():
        others = [n for mid, n in owners[id(group[0][1].weight)].items() if mid not in converted]
        shapes = {tuple(_flat_weight(mod).shape) for _, mod in group}
        why = None
        if others:
            why = (f"its weight is tied to {others[0]!r}, which is not converted (converting one "
                   "side would untie them): convert both, or neither")  # fmt: skip
        elif len(shapes) > 1:
            why = f"tied weights of different layouts {sorted(shapes)} are not supported"
        if why is None:
            groups.append(group)
        elif explicit:
            raise ValueError(f"module {group[0][0]!r}: {why}")
        else:
            skipped.extend((name, why) for name, _ in group)
    return groups


def _convert_group(group, rank, mode, energy, seed) -> list[LowRankBase]:
    """One low-rank layer per module of a tie group, all sharing the first one's factors."""
    name, mod = group[0]
    if mode == "adapter":
        layers = [_make_layer(m, rank, m.weight, seed) for _, m in group]
    else:
        W = _flat_weight(mod)
        u, s, vh = torch.linalg.svd(W.double(), full_matrices=False)
        k = energy_rank(s, energy) if energy is not None else rank
        k = k if rank is None else min(k, rank)
        if not float(s[k - 1]) > 0:
            raise ValueError(f"the weight of module {name!r} has rank < {k}: use a smaller rank")
        layers = [_make_layer(m, k, None, seed) for _, m in group]
        layers[0].set_factors(u[:, :k], s[:k], vh[:k].T)
    for layer in layers[1:]:  # tied: the same Parameter objects (one manifold point)
        layer.U, layer.S, layer.V = layers[0].U, layers[0].S, layers[0].V
        if layers[0].base_weight is not None:
            layer.base_weight = layers[0].base_weight
    return layers


def apply_low_rank(
    model: nn.Module,
    rank: int | None = 8,
    target_modules: Sequence[str] | str | re.Pattern | None = None,
    mode: str = "adapter",
    energy: float | None = None,
    modules_to_save: Sequence[str] | None = None,
    seed: int | None = None,
    exclude_modules: Sequence[str] | str | re.Pattern | None = None,
) -> nn.Module:
    r"""Replace selected ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding`` modules by low-rank layers.

    Parameters
    ----------
    model : nn.Module
        Converted in place (and returned).
    rank : int or None
        Rank of every converted layer (a positive integer); in "compress" mode with ``energy``
        an upper bound (None: no bound).
    target_modules : list of str, str, compiled regex or None
        A list matches module names by suffix (``"query"`` matches ``"encoder.layer.0.attention.self.query"``);
        a string or pattern is a regular expression matched against the full name. None selects
        every ``nn.Linear`` and ``nn.Conv2d`` that can be converted: the others (grouped or
        non-zero-padded convolutions, layers smaller than ``rank``, weights tied to a module that
        is not converted) are left as they are and listed in one warning. Named targets that
        cannot be converted raise ``ValueError``. ``nn.Embedding`` modules are converted only
        when named.
    mode : {"adapter", "compress"}
    energy : float in (0, 1], optional
        "compress" only: per layer, the smallest rank keeping this fraction of ``||W||_F^2``.
    modules_to_save : list of str, optional
        Modules (suffix match) trained whole and never converted, e.g. a new classification
        head. In "adapter" mode everything else except the adapters is frozen.
    seed : int, optional
        Seeds the adapters' random orthonormal factors (layer i uses ``seed + i``).
    exclude_modules : list of str, str, compiled regex or None
        Modules never converted (matched like ``target_modules``, as PEFT's option), e.g. the
        output head with ``target_modules=None``.

    Returns
    -------
    nn.Module
        ``model``, with ``model.rankopt_config`` recording the options (read by
        :func:`~rankopt.torch.save_adapters`).

    Notes
    -----
    Shared modules (one module object under several names) become one shared low-rank layer.
    Tied weights (e.g. an embedding and the output head holding one ``Parameter``) are
    converted together when both are targets and share one set of factors ``U, S, V`` (their
    gradients add up in the tangent space), so they stay tied; converting only one of them
    raises. Half-precision (fp16/bf16) layers get float32 factors (see
    :class:`~rankopt.torch.LowRankLinear`).

    Raises
    ------
    ValueError
        Unknown mode, a rank that is not a positive integer, no module matched, a named target
        that cannot be converted (rank above ``min(out, in)``, unsupported options, a tie to a
        module that is not converted), a weight of rank below the requested rank ("compress").
    """
    _check_rank(rank, mode, energy)
    targets, skipped = _select(model, rank, target_modules, exclude_modules, modules_to_save)
    groups = _tie_groups(model, targets, skipped, explicit=target_modules is not None)
    if skipped:
        warnings.warn(
            f"apply_low_rank(target_modules=None) left {len(skipped)} module(s) as they are: "
            + "; ".join(f"{n!r} ({why})" for n, why in skipped),
            UserWarning,
            stacklevel=2,
        )
    if not groups:
        raise ValueError(
            "no module could be converted: " + "; ".join(f"{n!r} ({w})" for n, w in skipped)
        )
    names = _module_names(model)
    new_layers = []
    for i, group in enumerate(groups):
        layers = _convert_group(group, rank, mode, energy, None if seed is None else seed + i)
        for (_, mod), layer in zip(group, layers, strict=True):
            for name in names[id(mod)]:  # a shared module stays shared
                _set_module(model, name, layer)
        new_layers += layers
    if mode == "adapter":
        # adapters converted by an earlier call stay trainable too (load_adapters converts
        # one rank per call)
        adapters = [m for m in model.modules()
                    if isinstance(m, (LowRankBase, LowRankEmbedding)) and m.base_weight is not None]  # fmt: skip
        keep = {id(p) for layer in (*new_layers, *adapters) for p in (layer.U, layer.S, layer.V)}
        for name, mod in model.named_modules():
            if name and _matches(name, list(modules_to_save or ())):
                keep.update(id(p) for p in mod.parameters())
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    model.rankopt_config = dict(
        mode=mode, rank=rank, energy=energy, target_modules=_jsonable(target_modules),
        exclude_modules=_jsonable(exclude_modules), modules_to_save=list(modules_to_save or ()),
    )  # fmt: skip
    return model


def _jsonable(target: Any) -> Any:
    if target is None or isinstance(target, str):
        return target
    if isinstance(target, re.Pattern):
        return target.pattern
    return list(target)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def merge(model: nn.Module) -> nn.Module:
    """Fold every low-rank layer back into a plain ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding``.

    The new weight is ``W0 + U S V^T`` (adapters) or ``U S V^T``, in the base's dtype; the bias
    is kept (same tensor); ``requires_grad`` of the new weight follows the factors'. Layers
    sharing factors (tied weights) get one shared weight; a shared layer stays shared.
    Returns ``model``.
    """
    if isinstance(model, LowRankBase):
        raise ValueError(
            "merge() takes a model containing low-rank layers; call layer.dense_weight() on a layer"
        )
    names = _module_names(model)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankBase)]
    weights: dict[int, nn.Parameter] = {}  # id(U) -> merged weight (tied layers share it)
    for _, layer in found:
        new = _plain_module(layer)
        w = weights.get(id(layer.U))
        if w is None:
            with torch.no_grad():
                new.weight.copy_(layer.dense_weight())
            new.weight.requires_grad_(layer.U.requires_grad)
            weights[id(layer.U)] = new.weight
        else:
            new.weight = w
        if getattr(layer, "bias", None) is not None:
            new.bias = layer.bias
        for name in names[id(layer)]:
            _set_module(model, name, new)
    return model


def _plain_module(layer: LowRankBase) -> nn.Module:
    W = layer.base_weight if layer.base_weight is not None else layer.U
    kw = dict(dtype=W.dtype, device=W.device)
    if isinstance(layer, LowRankEmbedding):
        return nn.Embedding(layer.num_embeddings, layer.embedding_dim, layer.padding_idx, **kw)
    if isinstance(layer, LowRankLinear):
        return nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, **kw)
    return nn.Conv2d(
        layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
        layer.dilation, bias=layer.bias is not None, **kw,
    )  # fmt: skip


def saved_module_names(model: nn.Module) -> list[str]:
    """Full names of the ``modules_to_save`` recorded by :func:`apply_low_rank` (suffix match,
    outermost module when several nest), e.g. ``["classifier"]``."""
    wanted = (getattr(model, "rankopt_config", None) or {}).get("modules_to_save") or []
    found: list[str] = []
    for name, _ in model.named_modules():
        if (
            name
            and _matches(name, list(wanted))
            and not any(name.startswith(f + ".") for f in found)
        ):
            found.append(name)
    return found


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
        if isinstance(m, LowRankBase)
    )
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "manifold_dim": int(dim),
    }
