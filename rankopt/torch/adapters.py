r"""Adapter files: the low-rank factors (and ``modules_to_save``) alone, in safetensors + JSON.

A model converted by :func:`~rankopt.torch.apply_low_rank` holds the pretrained weights (frozen,
in adapter mode) and a few small factors per layer. :func:`save_adapters` writes only what
training changed, so the file is about the size of the factors (``(m + n + 1) r`` numbers per
layer, ``s`` stored as a vector) plus the trained ``modules_to_save``; :func:`load_adapters`
converts a fresh copy of the base model and loads them, with outputs identical to the trained
model's. Merge after loading with :func:`~rankopt.torch.merge`.

Files in the folder ``path``:

* ``rankopt_adapters.safetensors``: ``<layer>.U`` (m x r), ``<layer>.s`` (r), ``<layer>.V``
  (n x r) per low-rank layer (``<layer>.bias`` too for compressed layers, which have no frozen
  base), and ``modules_to_save.<module>.<name>`` for each tensor of each saved module;
* ``rankopt_adapters.json``: format version, mode, per layer its kind, shape, rank, whether the
  adapter has started, the layer it is tied to; the ``modules_to_save`` names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .convert import apply_low_rank, saved_module_names
from .embedding import LowRankEmbedding
from .layers import LowRankConv2d, LowRankLinear

__all__ = ["save_adapters", "load_adapters", "ADAPTER_FILE", "CONFIG_FILE"]

ADAPTER_FILE = "rankopt_adapters.safetensors"
CONFIG_FILE = "rankopt_adapters.json"
FORMAT = "rankopt.adapters"
VERSION = 1
_LOW_RANK = (LowRankLinear, LowRankConv2d, LowRankEmbedding)
_KINDS = {LowRankLinear: "linear", LowRankConv2d: "conv2d", LowRankEmbedding: "embedding"}


def _low_rank_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _LOW_RANK)]


def _layer_entry(layer: nn.Module, tied_to: str | None) -> dict[str, Any]:
    return dict(
        kind=_KINDS[type(layer)], shape=[int(layer.U.shape[0]), int(layer.V.shape[0])],
        rank=layer.rank, started=layer.started, adapter=layer.base_weight is not None,
        bias=layer.base_weight is None and layer.bias is not None, tied_to=tied_to,
        dtype=str(layer.U.dtype).removeprefix("torch."),
    )  # fmt: skip


def save_adapters(
    model: nn.Module, path: str | Path, modules_to_save: list[str] | None = None
) -> Path:
    """Write the low-rank factors of ``model`` (and its ``modules_to_save``) to the folder ``path``.

    Parameters
    ----------
    model : nn.Module
        A model with rankopt low-rank layers (:func:`~rankopt.torch.apply_low_rank`,
        :func:`~rankopt.torch.from_peft`).
    path : str or Path
        A folder (created); holds ``rankopt_adapters.safetensors`` and ``rankopt_adapters.json``.
    modules_to_save : list of str, optional
        Full names of further modules to save whole (default: those given to
        ``apply_low_rank``, from ``model.rankopt_config``, resolved to full names).

    Returns
    -------
    Path
        The folder.

    Notes
    -----
    Per layer ``U``, ``s = diag(S)`` and ``V`` in the factors' dtype: ``(m + n + 1) r`` numbers.
    The frozen base weights are not written (load onto the same base model). Layers sharing
    factors (tied weights) are written once.
    """
    from safetensors.torch import save_file

    layers = _low_rank_layers(model)
    if not layers:
        raise ValueError("the model has no rankopt low-rank layers (apply_low_rank first)")
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    first: dict[int, str] = {}  # id(U) -> name of the first layer holding those factors
    for name, layer in layers:
        tied = first.setdefault(id(layer.U), name)
        entries[name] = _layer_entry(layer, None if tied == name else tied)
        if tied != name:
            continue
        S = layer.S.detach()
        if not torch.equal(S, torch.diag(torch.diagonal(S))):
            raise ValueError(
                f"layer {name!r}: S is not diagonal (was it trained by a plain optimizer?)"
            )
        tensors.update({f"{name}.U": layer.U.detach(), f"{name}.s": torch.diagonal(S),
                        f"{name}.V": layer.V.detach()})  # fmt: skip
        if entries[name]["bias"]:
            tensors[f"{name}.bias"] = layer.bias.detach()
    if modules_to_save is not None:
        for n in modules_to_save:
            model.get_submodule(n)  # AttributeError naming a missing module
    saved = list(modules_to_save) if modules_to_save is not None else saved_module_names(model)
    for mname in saved:
        for k, v in model.get_submodule(mname).state_dict().items():
            tensors[f"modules_to_save.{mname}.{k}"] = v.detach()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / ADAPTER_FILE))
    conf = getattr(model, "rankopt_config", {}) or {}
    config = dict(format=FORMAT, version=VERSION, mode=conf.get("mode", "adapter"),
                  layers=entries, modules_to_save=saved)  # fmt: skip
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return out


def load_adapters(model: nn.Module, path: str | Path) -> nn.Module:
    """Load adapters written by :func:`save_adapters` into ``model`` (converted as needed).

    ``model`` is the base model the adapters were trained on (a fresh copy), or one already
    converted with the same layers. Plain modules named in the file are converted (adapter
    mode: the pretrained weight is the frozen base; everything but adapters and
    ``modules_to_save`` is frozen), then the factors, biases and saved modules are loaded.
    The result computes exactly what the saved model computed.

    Returns
    -------
    nn.Module
        ``model``.
    """
    from safetensors.torch import load_file

    folder = Path(path)
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ValueError(
            f"{folder / CONFIG_FILE} is not a rankopt adapter file of version {VERSION}"
        )
    tensors = load_file(str(folder / ADAPTER_FILE))
    _convert_missing(model, config)
    for name, e in config["layers"].items():
        layer = model.get_submodule(name)
        if not isinstance(layer, _LOW_RANK) or _KINDS[type(layer)] != e["kind"]:
            raise ValueError(
                f"module {name!r} is {type(layer).__name__}, the file has a {e['kind']} layer"
            )
        if e["tied_to"] is None:
            _load_factors(layer, name, e, tensors)
    for mname in config["modules_to_save"]:
        mod = model.get_submodule(mname)
        prefix = f"modules_to_save.{mname}."
        mod.load_state_dict(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        )
        mod.requires_grad_(True)
    model.rankopt_config = dict(getattr(model, "rankopt_config", None) or {}, mode=config["mode"],
                                modules_to_save=list(config["modules_to_save"]))  # fmt: skip
    return model


def _convert_missing(model: nn.Module, config: dict) -> None:
    """Convert the plain modules named in the file, one ``apply_low_rank`` call per rank
    (tied layers share a rank, so they are converted together and stay tied)."""
    by_rank: dict[int, list[str]] = {}
    for name, e in config["layers"].items():
        if not isinstance(model.get_submodule(name), _LOW_RANK):
            by_rank.setdefault(e["rank"], []).append(name)
    for rank, names in by_rank.items():
        pattern = re.compile("|".join(re.escape(n) for n in names))
        apply_low_rank(model, rank=rank, target_modules=pattern, mode=config["mode"],
                       modules_to_save=config["modules_to_save"])  # fmt: skip


def _load_factors(layer: nn.Module, name: str, e: dict, tensors: dict) -> None:
    U, s, V = (tensors[f"{name}.{k}"] for k in ("U", "s", "V"))
    if (U.shape[0], V.shape[0]) != (layer.U.shape[0], layer.V.shape[0]):
        raise ValueError(f"layer {name!r}: the file has shape {tuple(e['shape'])}, the model "
                         f"{(layer.U.shape[0], layer.V.shape[0])}")  # fmt: skip
    if e["started"]:
        layer.set_factors(U, s, V)  # checks orthonormality, resizes to the saved rank
    else:  # an adapter that never took a step: S = 0, its random U, V as saved
        if layer.rank != s.shape[0]:
            raise ValueError(f"layer {name!r}: rank {layer.rank} in the model, {s.shape[0]} saved")
        with torch.no_grad():
            layer.U.copy_(U)
            layer.V.copy_(V)
            layer.S.zero_()
        layer.U.link.started = False
    if e["bias"]:
        with torch.no_grad():
            layer.bias.copy_(tensors[f"{name}.bias"])
