r"""PEFT interop: LoRA adapters in, rankopt fixed-rank adapters out, and back.

* :func:`from_peft` turns a ``peft.PeftModel`` with LoRA adapters (or its saved folder) into the
  base model with rankopt low-rank layers computing the same function. Each LoRA update
  ``(alpha / r) B A`` becomes a point ``U diag(s) V^T`` by a thin SVD computed from the
  factors, never from the m x n product: ``B = Q_B R_B``, ``A^T = Q_A R_A`` (QR),
  ``R_B R_A^T = u diag(s) v^T`` (an r x r SVD), ``U = Q_B u``, ``V = Q_A v``, with PEFT's scaling
  ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA) **folded into s**: the rankopt layer has
  no separate scale. Cost O((m + n) r^2) per layer. A LoRA whose ``B`` is still zero (never
  trained) becomes a new rankopt adapter (``S = 0``), which also computes exactly the base.
* :func:`to_peft` writes rankopt adapters as a PEFT LoRA adapter folder that
  ``PeftModel.from_pretrained(base_model, path)`` loads with the same outputs: rank-r factors
  ``B = U diag(sqrt(s))``, ``A = diag(sqrt(s)) V^T`` with ``lora_alpha = r`` (scaling 1, the
  scale folded in), per-layer ranks in ``rank_pattern`` / ``alpha_pattern`` under anchored keys
  (``^sub\.q``: PEFT matches a key as a regex suffix, so a bare ``q`` would match ``sub.q``).

Supported: LoRA on ``nn.Linear``, ``nn.Embedding``, ``nn.Conv1d``, ``nn.Conv2d`` and transformers'
``Conv1D`` (GPT-2; PEFT's ``fan_in_fan_out=True``, which :func:`to_peft` sets when it writes
``Conv1D`` layers),
one adapter at a time (:func:`from_peft` converts the named or active adapter and removes the
others; merged adapters are unmerged first, with a warning). Not supported (``ValueError``):
DoRA and other LoRA variants (their weight is not ``W0`` plus a low-rank matrix),
``lora_bias``, LoRA on ``nn.MultiheadAttention`` (PEFT adapts its packed ``in_proj`` as one
matrix, rankopt its q/k/v blocks), compressed layers (``mode="compress"``: no frozen base) in
:func:`to_peft`. LoRA dropout has no rankopt counterpart and is dropped (a
warning); outputs in eval mode are unchanged.
"""

from __future__ import annotations

import collections
import copy
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attention import LowRankMultiheadAttention
from .convert import apply_low_rank, saved_module_names
from .embedding import LowRankEmbedding
from .kinds import LOW_RANK_TYPES, is_hf_conv1d, plain_module

__all__ = ["from_peft", "to_peft"]


def _peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - exercised without peft
        raise ImportError(
            "rankopt.torch.from_peft / to_peft need PEFT: pip install -e '.[data]' (or peft)"
        ) from err
    return peft


def thin_svd_of_product(P: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, ...]:
    r"""``(U, s, V)`` with ``P Q^T = U diag(s) V^T`` (thin SVD, float64), from the factors.

    ``P`` is m x r, ``Q`` n x r: two QRs and an r x r SVD, O((m + n) r^2); the m x n product is
    never formed.
    """
    qp, rp = torch.linalg.qr(P.detach().double())
    qq, rq = torch.linalg.qr(Q.detach().double())
    u, s, vh = torch.linalg.svd(rp @ rq.T)
    return qp @ u, s, qq @ vh.T


def _lora_factors(mod: nn.Module, name: str, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, Q)`` with the LoRA update of ``mod`` (in the layer's weight layout, conv kernels
    flattened ``out x (in kh kw)``) equal to ``P Q^T``, PEFT's scaling folded into ``P``."""
    lora = _peft().tuners.lora
    if adapter in getattr(mod, "lora_variant", {}):
        raise ValueError(f"module {name!r}: LoRA variants (DoRA, ...) are not supported; its "
                         "weight is not the base plus a low-rank matrix")  # fmt: skip
    if getattr(mod, "lora_bias", {}).get(adapter):
        raise ValueError(f"module {name!r}: lora_bias=True is not supported")
    scale = float(mod.scaling[adapter])
    if isinstance(mod, lora.Embedding):  # delta table = (B A)^T * scale, A: r x num, B: dim x r
        return mod.lora_embedding_A[adapter].T * scale, mod.lora_embedding_B[adapter]
    A, B = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
    if isinstance(mod, (lora.Conv2d, lora.layer.Conv1d)):
        return B.reshape(B.shape[0], -1) * scale, A.reshape(A.shape[0], -1).T
    base = mod.get_base_layer()
    if isinstance(mod, lora.Linear) and (type(base) is nn.Linear or is_hf_conv1d(base)):
        if bool(getattr(mod, "fan_in_fan_out", False)) != is_hf_conv1d(base):
            raise ValueError(f"module {name!r}: fan_in_fan_out={mod.fan_in_fan_out} on a "
                             f"{type(base).__name__} (PEFT sets it for Conv1D only)")  # fmt: skip
        return B * scale, A.T  # the out x in update (Conv1D stores its transpose)
    raise ValueError(
        f"module {name!r}: LoRA on {type(mod.get_base_layer()).__name__} is not supported"
    )


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def from_peft(
    peft_model: Any, base_model: nn.Module | None = None, adapter_name: str | None = None
) -> nn.Module:
    """Convert a PEFT LoRA model into its base model with rankopt adapters (same outputs).

    Parameters
    ----------
    peft_model : peft.PeftModel, or str / Path of a saved PEFT adapter folder
        Consumed: its base model is modified in place and returned.
    base_model : nn.Module, optional
        With a folder: the base model to load it onto (``PeftModel.from_pretrained``).
    adapter_name : str, optional
        Which adapter (default: the active one). Exactly this adapter is converted; the other
        adapters of the model are removed (their layers become the plain base layers again).

    Returns
    -------
    nn.Module
        The base model: each LoRA layer of the adapter replaced by a rankopt low-rank layer of
        the same rank (adapter mode, frozen base), each ``modules_to_save`` wrapper by the
        adapter's trained module (or the original module where the adapter has none); the
        adapters and saved modules trainable, everything else frozen. It computes what the
        PEFT model computes with only ``adapter_name`` active and nothing merged. Train it with
        :class:`~rankopt.torch.RAdamW` & co, write it back with :func:`to_peft`.

    Raises
    ------
    ValueError
        ``adapter_name`` is not an adapter of the model, several adapters are active and none
        is named, the adapter is not LoRA or has no LoRA layer, unsupported LoRA options (see
        the module docstring), tuner layers or wrappers other than LoRA and
        ``modules_to_save`` (checked before the model is changed).

    Notes
    -----
    Adapters merged into the base weights (``merge_adapter()``) are unmerged first, as PEFT's
    ``unmerge_adapter()`` does (a ``UserWarning`` says so): the frozen base is the pretrained
    weight again, to rounding (``W0 + d - d``), and the adapter is not counted twice.
    """
    peft = _peft()
    if isinstance(peft_model, (str, Path)):
        if base_model is None:
            raise ValueError("from_peft(path) needs the base model: from_peft(path, base_model)")
        peft_model = peft.PeftModel.from_pretrained(base_model, str(peft_model))
    if not isinstance(peft_model, peft.PeftModel):
        raise TypeError(
            f"from_peft takes a peft.PeftModel or a folder, got {type(peft_model).__name__}"
        )
    adapter = _adapter_to_convert(peft_model, adapter_name)
    root = peft_model.get_base_model()
    factors = _collect_factors(root, adapter)
    _unmerge(root)
    saved = _unwrap(root, adapter)
    if "peft_config" in vars(root):  # PEFT's bookkeeping on the base model: no longer true
        del root.peft_config
    _convert(root, factors, saved)
    return root


def _adapter_to_convert(peft_model: Any, adapter_name: str | None) -> str:
    """The adapter to convert: ``adapter_name`` (checked) or the one active adapter (LoRA)."""
    names = list(peft_model.peft_config)
    if adapter_name is None:
        active = list(peft_model.active_adapters)
        if len(active) != 1:
            raise ValueError(f"several adapters are active ({active}): pass adapter_name=, one "
                             f"of {names}")  # fmt: skip
        adapter_name = active[0]
    elif adapter_name not in peft_model.peft_config:
        raise ValueError(f"adapter_name={adapter_name!r}: the PeftModel has no such adapter; it "
                         f"has {names}")  # fmt: skip
    config = peft_model.peft_config[adapter_name]
    if str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
        raise ValueError(f"adapter {adapter_name!r} is {config.peft_type}, not LoRA")
    return adapter_name


def _collect_factors(root: nn.Module, adapter: str) -> dict[str, tuple[torch.Tensor, ...]]:
    """``{name: (P, Q)}`` of the adapter's LoRA layers; every check before the model changes."""
    peft = _peft()
    lora, other = peft.tuners.lora.LoraLayer, peft.utils.other
    factors = {}
    for name, mod in root.named_modules():
        if isinstance(mod, lora):
            if adapter in getattr(mod, "scaling", {}):
                factors[name] = _lora_factors(mod, name, adapter)
                if float(getattr(mod.lora_dropout[adapter], "p", 0.0)) > 0:
                    warnings.warn(f"{name}: LoRA dropout is dropped (rankopt adapters have none)",
                                  stacklevel=3)  # fmt: skip
        elif isinstance(mod, peft.tuners.tuners_utils.BaseTunerLayer):
            raise ValueError(f"module {name!r} is a {type(mod).__name__}: only LoRA layers are "
                             "supported")  # fmt: skip
        elif isinstance(mod, other.AuxiliaryTrainingWrapper) and not isinstance(
            mod, other.ModulesToSaveWrapper
        ):
            raise ValueError(f"module {name!r} is a {type(mod).__name__} (e.g. "
                             "trainable_token_indices): not supported, only modules_to_save")  # fmt: skip
    if not factors:
        raise ValueError(f"no LoRA layer of adapter {adapter!r} found")
    return factors


def _unmerge(root: nn.Module) -> None:
    """Unmerge every merged LoRA layer (PEFT's ``unmerge_adapter()``), with a warning."""
    lora = _peft().tuners.lora.LoraLayer
    merged = [m for m in root.modules() if isinstance(m, lora) and m.merged]
    if merged:
        names = sorted({a for m in merged for a in m.merged_adapters})
        warnings.warn(f"from_peft: adapter(s) {names} were merged into the base weights "
                      "(merge_adapter()); unmerged them first as unmerge_adapter() does, so that "
                      "the frozen base is the pretrained weight (to rounding)", stacklevel=3)  # fmt: skip
        for mod in merged:
            mod.unmerge()


def _unwrap(root: nn.Module, adapter: str) -> list[str]:
    """Every LoRA layer becomes its base layer, every ``modules_to_save`` wrapper the adapter's
    module (or the original one where the adapter has none); returns the saved modules' names."""
    peft = _peft()
    saved = []
    for name, mod in list(root.named_modules()):
        if isinstance(mod, peft.tuners.lora.LoraLayer):
            _set_module(root, name, mod.get_base_layer())
        elif isinstance(mod, peft.utils.other.ModulesToSaveWrapper):
            if adapter in mod.modules_to_save:
                _set_module(root, name, mod.modules_to_save[adapter])
                saved.append(name)
            else:
                _set_module(root, name, mod.original_module)
    return saved


def _convert(root: nn.Module, factors: dict, saved: list[str]) -> None:
    """Convert the named base layers (one ``apply_low_rank`` call per rank), set the points."""
    by_rank = collections.defaultdict(list)
    for name, (P, _) in factors.items():
        by_rank[int(P.shape[1])].append(name)
    for rank, names in by_rank.items():
        pattern = re.compile("|".join(re.escape(n) for n in names))
        apply_low_rank(root, rank=rank, target_modules=pattern, modules_to_save=saved)
    for name, (P, Q) in factors.items():
        U, s, V = thin_svd_of_product(P, Q)
        if bool((s > 0).any()):  # else a LoRA never trained (B = 0): a new adapter, S = 0
            root.get_submodule(name).set_factors(U, s, V)
    root.rankopt_config = dict(mode="adapter", rank=None, energy=None,
                               target_modules=sorted(factors), exclude_modules=None,
                               modules_to_save=saved)  # fmt: skip


def _plain_like(layer: nn.Module) -> nn.Module:
    """The plain module of a low-rank adapter, holding its frozen base (the same storage, no
    copy) and bias."""
    return plain_module(layer, layer.base_weight.detach(), requires_grad=False)


def to_peft(
    model: nn.Module,
    path: str | Path | None = None,
    adapter_name: str = "default",
    modules_to_save: list[str] | None = None,
) -> Any:
    """Export rankopt adapters as a PEFT LoRA adapter (saved to ``path`` when given).

    Parameters
    ----------
    model : nn.Module
        A model with rankopt adapters (adapter mode). Not modified.
    path : str or Path, optional
        Folder for ``PeftModel.save_pretrained`` (``adapter_config.json`` +
        ``adapter_model.safetensors``).
    adapter_name : str
    modules_to_save : list of str, optional
        Full names of modules to save whole (default: those recorded by ``apply_low_rank``).

    Returns
    -------
    peft.PeftModel
        A copy of the model as a PEFT LoRA model (frozen base weights shared with ``model``,
        not copied): ``lora_B = U diag(sqrt(s))``, ``lora_A = diag(sqrt(s)) V^T``,
        ``lora_alpha = r`` per layer. ``PeftModel.from_pretrained(base, path)`` gives the same
        outputs as ``model``.
    """
    peft = _peft()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LOW_RANK_TYPES)}
    if not layers:
        raise ValueError("the model has no rankopt low-rank layers")
    att = [n for n, m in model.named_modules() if isinstance(m, LowRankMultiheadAttention)]
    if att:
        raise ValueError(f"to_peft: {att[0]!r} is an unpacked nn.MultiheadAttention (rankopt "
                         "adapts its q/k/v blocks separately, PEFT the packed in_proj as one "
                         "matrix): no PEFT LoRA counterpart; use save_adapters")  # fmt: skip
    bad = [n for n, m in layers.items() if m.base_weight is None]
    if bad:
        raise ValueError(f"to_peft exports adapters (a frozen base plus U S V^T); {bad[0]!r} is a "
                         "compressed layer with no base (use save_adapters)")  # fmt: skip
    shared = {id(p): p for p in model.parameters() if not p.requires_grad}
    plain = copy.deepcopy(model, memo=shared)  # trainable tensors copied, frozen ones shared
    for name, layer in list(plain.named_modules()):
        if isinstance(layer, LOW_RANK_TYPES):
            _set_module(plain, name, _plain_like(layer))
    if modules_to_save is None:
        modules_to_save = saved_module_names(model)
    ranks = {n: m.rank for n, m in layers.items()}
    r0 = collections.Counter(ranks.values()).most_common(1)[0][0]
    # PEFT looks a module up in rank_pattern with re.match(rf"(.*\.)?({key})$", name): a bare
    # name "q" would match "sub.q" too; "^q" matches only the module named "q"
    pattern = {"^" + re.escape(n): r for n, r in ranks.items() if r != r0}
    config = peft.LoraConfig(
        r=r0, lora_alpha=r0, rank_pattern=pattern, alpha_pattern=dict(pattern), lora_dropout=0.0,
        target_modules="|".join(re.escape(n) for n in layers), modules_to_save=modules_to_save or None,
        fan_in_fan_out=any(is_hf_conv1d(m) for m in plain.modules()),
    )  # fmt: skip
    out = peft.get_peft_model(plain, config, adapter_name=adapter_name)
    inner = out.get_base_model()
    for name, layer in layers.items():
        _write_lora(inner.get_submodule(name), layer, adapter_name)
    if path is not None:
        out.save_pretrained(str(path))
    return out


def _write_lora(mod: nn.Module, layer: nn.Module, adapter: str) -> None:
    """Set PEFT's ``lora_A``/``lora_B`` of ``mod`` so that their product is ``U diag(s) V^T``."""
    U, s, V = (t.double() for t in layer.factors())
    root = s.sqrt()
    left, right = U * root, V * root  # left right^T = U diag(s) V^T
    if not layer.started:  # S = 0: B = 0 as a new LoRA, A from the random V (not zero)
        left, right = torch.zeros_like(U), V
    with torch.no_grad():
        if isinstance(layer, LowRankEmbedding):  # delta table = A^T B^T, A: r x num, B: dim x r
            A, B = mod.lora_embedding_A[adapter], mod.lora_embedding_B[adapter]
            A.copy_(left.T.to(A.dtype))
            B.copy_(right.to(B.dtype))
        else:  # delta weight = B A, A: r x n (conv: r x in x kh x kw), B: m x r (x 1 x 1)
            A, B = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
            A.copy_(right.T.reshape(A.shape).to(A.dtype))
            B.copy_(left.reshape(B.shape).to(B.dtype))
