r"""Model conversion in the PEFT spirit: low-rank adapters, compression, merging back.

* :func:`apply_low_rank` replaces selected modules by low-rank layers (the kinds of
  :mod:`rankopt.torch.kinds`: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding``,
  transformers' ``Conv1D``; and the projections of ``nn.MultiheadAttention``, through
  :mod:`rankopt.torch.attention`):

  - ``mode="adapter"``: ``W = W0 + U S V^T`` with the pretrained ``W0`` frozen (kept by
    reference, no copy) and ``S = 0``, so the converted model computes exactly the original
    function until the optimizer's first step (see :mod:`rankopt.torch.layers` for how the
    first step enters the manifold). All other parameters of the model are frozen, except those
    of modules named in ``modules_to_save``.
  - ``mode="compress"``: ``W ~ U diag(s) V^T``, the truncated SVD of the pretrained weight
    (conv kernels reshaped ``out x (in k...)``), optionally with a rank per layer chosen from
    an energy threshold. Cost O(m n min(m, n)) per layer, once.

  What it converted and skipped (and why) is ``model.rankopt_report``
  (:class:`~rankopt.torch.report.ConversionReport`).

* :func:`~rankopt.torch.merge.merge` folds every low-rank layer back into the plain module it
  replaced.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .attention import LowRankMultiheadAttention, projection_stand_ins
from .hf import guard_merged_keys, patch_save_pretrained
from .kinds import flat_weight, layer_kind, make_layer, plain_kind, unsupported
from .layers import LowRankBase, is_manifold_parameter
from .loi import START_SCALE, check_start, loi_starts
from .merge import merge
from .names import matches, module_names, saved_module_names, set_module
from .report import WARNED, ConversionReport, ConvertedModule, no_match_message

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


def energy_rank(s: torch.Tensor, energy: float) -> int:
    r"""Smallest k with ``sum_{i<k} s_i^2 >= energy * sum_i s_i^2`` (s descending)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must lie in (0, 1], got {energy}")
    e = torch.cumsum(s.double() ** 2, 0)
    total = float(e[-1])
    if total == 0:
        return 1
    return int(torch.searchsorted(e, torch.tensor(energy * total, dtype=e.dtype)).item()) + 1


def _walk(model: nn.Module):
    """``(name, module, attention)`` for every module that could be converted or reported:
    plain modules (``attention`` None) and, for each ``nn.MultiheadAttention`` named ``a``, its
    projections ``a.q_proj`` ... ``a.out_proj`` as meta-device stand-ins (``attention`` = a)."""
    inside: tuple[str, ...] = ()
    for name, mod in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if type(mod) is nn.MultiheadAttention:
            inside += (name + ".",)
            for proj, stand_in in projection_stand_ins(mod).items():
                yield f"{name}.{proj}" if name else proj, stand_in, name
        elif not isinstance(mod, (LowRankBase, LowRankMultiheadAttention)):
            yield name, mod, None


def _has_matrix_weight(mod: nn.Module) -> bool:
    w = dict(mod.named_parameters(recurse=False)).get("weight")
    return w is not None and w.dim() >= 2


def _select(model, rank, target_modules, exclude_modules, modules_to_save, report):
    """The modules to convert, ``[(name, module, attention)]`` (first name of a shared module).
    Skipped ones go to ``report``; explicit targets that cannot be converted raise."""
    explicit = target_modules is not None
    keep = list(modules_to_save or ())
    cands, matched, convertible = [], [], []
    for name, mod, att in _walk(model):
        kind = plain_kind(mod)
        if kind is not None:
            convertible.append((name, type(mod).__name__))
        if not (
            matches(name, target_modules) or (explicit and att and matches(att, target_modules))
        ):
            continue
        if kind is None:
            matched.append((name, type(mod).__name__))
            if _has_matrix_weight(mod):
                report.skip(name, mod, "unsupported type", "not a module type rankopt converts")
        elif not explicit and kind.name == "embedding":
            report.skip(name, mod, "not targeted", "nn.Embedding is converted only when named")
        elif exclude_modules is not None and any(
            matches(n, exclude_modules) for n in (name, att) if n
        ):
            report.skip(name, mod, "excluded", "named by exclude_modules")
        elif keep and _in_saved(name, keep):
            report.skip(name, mod, "modules_to_save", "trained whole (modules_to_save)")
        else:
            cands.append((name, mod, att))
    if not cands:
        raise ValueError(no_match_message(target_modules, exclude_modules, matched, convertible))
    targets = []
    for name, mod, att in cands:
        why = unsupported(mod, rank)
        if why is None:
            targets.append((name, mod, att))
        elif explicit:
            raise ValueError(f"module {name!r}: {why[1]}; exclude it (exclude_modules=[{name!r}])")
        else:
            report.skip(name, mod, *why)
    return targets


def _in_saved(name: str, keep: list[str]) -> bool:
    parts = name.split(".")
    return any(matches(".".join(parts[:i]), keep) for i in range(1, len(parts) + 1))


def _param_owners(model: nn.Module) -> dict[int, dict[int, str]]:
    """For each parameter (by id): the modules holding it directly, ``{id(module): name}``."""
    owners: dict[int, dict[int, str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), {}).setdefault(id(mod), name)
    return owners


def _tie_groups(model, targets, report, explicit: bool) -> list[list[tuple[str, nn.Module]]]:
    """Targets grouped by shared weight (tied embedding / output head): converted together,
    they share one set of factors and stay tied. A target tied to a module that is not
    converted is refused (explicit targets) or skipped (``target_modules=None``). Attention
    projections (fresh blocks) are never tied."""
    owners = _param_owners(model)
    by_weight: dict[int, list] = {}
    groups = []
    for name, mod, att in targets:
        if att is not None:
            groups.append([(name, mod)])
        else:
            by_weight.setdefault(id(mod.weight), []).append((name, mod))
    converted = {id(mod) for _, mod, _ in targets}
    for group in by_weight.values():
        others = [n for mid, n in owners[id(group[0][1].weight)].items() if mid not in converted]
        shapes = {tuple(flat_weight(mod).shape) for _, mod in group}
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
            for name, mod in group:
                report.skip(name, mod, "tied", why)
    return groups


def _unpack_attention(model: nn.Module, groups: list) -> list:
    """Replace each ``nn.MultiheadAttention`` with a targeted projection by its unpacked
    :class:`LowRankMultiheadAttention` (under all its names) and the projections' stand-ins in
    ``groups`` by the new modules."""
    names = module_names(model)
    unpacked: dict[str, LowRankMultiheadAttention] = {}
    out = []
    for group in groups:
        name, mod = group[0]
        parent, _, proj = name.rpartition(".")
        if mod.weight.is_meta:  # an attention projection's stand-in
            if parent not in unpacked:
                mha = model.get_submodule(parent) if parent else model
                unpacked[parent] = LowRankMultiheadAttention(mha)
                for n in names[id(mha)]:
                    set_module(model, n, unpacked[parent])
            group = [(name, getattr(unpacked[parent], proj))]
        out.append(group)
    return out


def _convert_group(group, rank, mode, energy, seed) -> list[LowRankBase]:
    """One low-rank layer per module of a tie group, all sharing the first one's factors."""
    name, mod = group[0]
    if mode == "adapter":
        layers = [make_layer(m, rank, m.weight, seed) for _, m in group]
    else:
        W = flat_weight(mod)
        u, s, vh = torch.linalg.svd(W.double(), full_matrices=False)
        k = energy_rank(s, energy) if energy is not None else rank
        k = k if rank is None else min(k, rank)
        if not float(s[k - 1]) > 0:
            raise ValueError(f"the weight of module {name!r} has rank < {k}: use a smaller rank")
        layers = [make_layer(m, k, None, seed) for _, m in group]
        layers[0].set_factors(u[:, :k], s[:k], vh[:k].T)
    for layer in layers[1:]:  # tied: the same Parameter objects (one manifold point)
        layer.U, layer.S, layer.V = layers[0].U, layers[0].S, layers[0].V
        if layers[0].base_weight is not None:
            layer.base_weight = layers[0].base_weight
    return layers


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


def _warn_skipped(report: ConversionReport) -> None:
    skipped = report.skipped_for(*WARNED)
    if skipped:
        warnings.warn(
            f"apply_low_rank(target_modules=None) left {len(skipped)} module(s) as they are: "
            + "; ".join(f"{s.name!r} ({s.detail})" for s in skipped),
            UserWarning,
            stacklevel=3,
        )


def apply_low_rank(
    model: nn.Module,
    rank: int | None = 8,
    target_modules: Sequence[str] | str | re.Pattern | None = None,
    mode: str = "adapter",
    energy: float | None = None,
    modules_to_save: Sequence[str] | None = None,
    seed: int | None = None,
    exclude_modules: Sequence[str] | str | re.Pattern | None = None,
    start: str = "zero",
    start_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    start_scale: float = START_SCALE,
) -> nn.Module:
    r"""Replace selected modules by low-rank layers (adapters or compression).

    Converts ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, transformers' ``Conv1D`` (GPT-2's,
    weight stored ``(in, out)``: PEFT's ``fan_in_fan_out``), the projections of
    ``nn.MultiheadAttention`` (``a.q_proj``, ``a.k_proj``, ``a.v_proj`` from the packed
    ``in_proj_weight``, and ``a.out_proj``; the attention is unpacked, see
    :mod:`rankopt.torch.attention`), and ``nn.Embedding`` when named.

    Parameters
    ----------
    model : nn.Module
        Converted in place (and returned).
    rank : int or None
        Rank of every converted layer (a positive integer); in "compress" mode with ``energy``
        an upper bound (None: no bound).
    target_modules : list of str, str, compiled regex or None
        A list matches module names by suffix (``"query"`` matches ``"encoder.layer.0.attention.self.query"``);
        a string or pattern is a regular expression matched against the full name. Naming an
        ``nn.MultiheadAttention`` converts its four projections. None selects every module
        that can be converted (embeddings excepted): the others (grouped or non-zero-padded
        convolutions, layers smaller than ``rank``, weights tied to a module that is not
        converted, unsupported types) are left as they are and listed in one warning. Named
        targets that cannot be converted raise ``ValueError``; a ``target_modules`` that
        matches nothing convertible raises, naming the close candidates.
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
    start : {"zero", "loi"}
        Adapter mode: where the adapters start. "zero" (default): ``U S V^T = 0``, the model's
        function unchanged; the first optimizer step starts each adapter from its gradient.
        "loi": the locally optimal start of Bogachev et al. (arXiv 2507.12142,
        :func:`rankopt.locally_optimal_start`), ``U S V^T = start_scale U_{1..r} V_{r+1..2r}^T``
        from the SVD of the weight's gradient of ``start_loss`` (one forward and backward of the
        plain model before anything is converted; see :mod:`rankopt.torch.loi`): the tangent
        space at the start holds the gradient's top 2r singular directions. The function
        changes at conversion by a rank-r term of spectral norm ``|start_scale|``.
    start_loss : callable, optional
        ``start="loi"`` only: ``model -> scalar loss tensor`` on a batch you choose.
    start_scale : float
        ``start="loi"`` only: the start's singular values (default 1e-3; nonzero, finite).

    Returns
    -------
    nn.Module
        ``model``, with ``model.rankopt_config`` recording the options (read by
        :func:`~rankopt.torch.save_adapters`) and ``model.rankopt_report`` (a
        :class:`~rankopt.torch.report.ConversionReport`: converted and skipped modules, and
        why).

    Notes
    -----
    Shared modules (one module object under several names) become one shared low-rank layer.
    Tied weights (e.g. an embedding and the output head holding one ``Parameter``) are
    converted together when both are targets and share one set of factors ``U, S, V`` (their
    gradients add up in the tangent space), so they stay tied; converting only one of them
    raises. Half-precision (fp16/bf16) layers get float32 factors (see
    :class:`~rankopt.torch.LowRankLinear`). A Hugging Face model's ``save_pretrained`` then
    also writes the merged weights, so that ``from_pretrained`` loads the trained function
    (:mod:`rankopt.torch.hf`).

    Raises
    ------
    ValueError
        Unknown mode, a rank that is not a positive integer, no module matched, a named target
        that cannot be converted (rank above ``min(out, in)``, unsupported options, a tie to a
        module that is not converted), a weight of rank below the requested rank ("compress").
    """
    _check_rank(rank, mode, energy)
    check_start(start, mode, start_loss, start_scale)
    report = ConversionReport(target_modules=target_modules)
    targets = _select(model, rank, target_modules, exclude_modules, modules_to_save, report)
    groups = _tie_groups(model, targets, report, explicit=target_modules is not None)
    if target_modules is None:
        _warn_skipped(report)
    if not groups:
        raise ValueError(
            "no module could be converted: "
            + "; ".join(f"{s.name!r} ({s.detail})" for s in report.skipped_for(*WARNED))
        )
    # LOI reads the plain model's gradients: before anything (attention included) changes
    starts = loi_starts(model, groups, rank, start_loss, start_scale) if start == "loi" else None
    groups = _unpack_attention(model, groups)
    names = module_names(model)
    new_layers = []
    for i, group in enumerate(groups):
        layers = _convert_group(group, rank, mode, energy, None if seed is None else seed + i)
        if starts is not None:  # tied layers share the factors: set once
            layers[0].set_factors(starts[i].U, starts[i].s, starts[i].V)
        for (name, mod), layer in zip(group, layers, strict=True):
            for n in names[id(mod)]:  # a shared module stays shared
                set_module(model, n, layer)
            guard_merged_keys(layer)
            m, n_ = layer.U.shape[0], layer.V.shape[0]
            tied = group[0][0] if layer is not layers[0] else None
            report.converted.append(ConvertedModule(name, layer_kind(layer).name, (m, n_), layer.rank,
                                                    mode, tied))  # fmt: skip
        new_layers += layers
    for att in model.modules():
        if isinstance(att, LowRankMultiheadAttention):
            guard_merged_keys(att)
    if mode == "adapter":
        _freeze_all_but_adapters(model, new_layers, modules_to_save)
    model.rankopt_config = dict(
        mode=mode, rank=rank, energy=energy, target_modules=_jsonable(target_modules),
        exclude_modules=_jsonable(exclude_modules), modules_to_save=list(modules_to_save or ()),
        start=start, start_scale=start_scale if start == "loi" else None,
    )  # fmt: skip
    model.rankopt_report = report
    patch_save_pretrained()
    return model


def _freeze_all_but_adapters(model: nn.Module, new_layers: list, modules_to_save: Any) -> None:
    """Only the adapters (this call's and earlier ones': load_adapters converts one rank per
    call) and the ``modules_to_save`` stay trainable."""
    adapters = [m for m in model.modules()
                if isinstance(m, LowRankBase) and m.base_weight is not None]  # fmt: skip
    keep = {id(p) for layer in (*new_layers, *adapters) for p in (layer.U, layer.S, layer.V)}
    for name, mod in model.named_modules():
        if name and matches(name, list(modules_to_save or ())):
            keep.update(id(p) for p in mod.parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def _jsonable(target: Any) -> Any:
    if target is None or isinstance(target, str):
        return target
    if isinstance(target, re.Pattern):
        return target.pattern
    return list(target)


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
