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

:func:`load_adapters` loads a file or refuses it with an error naming the layer and the file:
both files are checked against each other, every adapter's values (finite, a valid point,
``s = 0`` for an adapter that never stepped) and the model (each layer present with the file's
kind, shape and mode, no other low-rank layer, the same ties); see its docstring.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attention import find_module
from .convert import apply_low_rank, saved_module_names
from .kinds import KINDS, LOW_RANK_TYPES, flat_weight, layer_kind, plain_kind
from .layers import check_factors

__all__ = ["save_adapters", "load_adapters", "ADAPTER_FILE", "CONFIG_FILE"]

ADAPTER_FILE = "rankopt_adapters.safetensors"
CONFIG_FILE = "rankopt_adapters.json"
FORMAT = "rankopt.adapters"
VERSION = 1
_KIND_NAMES = tuple(k.name for k in KINDS)


def _low_rank_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LOW_RANK_TYPES)]


def _layer_entry(layer: nn.Module, tied_to: str | None) -> dict[str, Any]:
    return dict(
        kind=layer_kind(layer).name, shape=[int(layer.U.shape[0]), int(layer.V.shape[0])],
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
        if tied == name:
            tensors.update(_layer_tensors(name, layer, entries[name]["bias"]))
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


def _layer_tensors(name: str, layer: nn.Module, bias: bool) -> dict[str, torch.Tensor]:
    """``U``, ``s``, ``V`` (and the bias) of a layer to save, checked as :func:`load_adapters`
    will check them: S diagonal, a valid point, ``S = 0`` if the adapter never took a step."""
    S = layer.S.detach()
    if not torch.equal(S, torch.diag(torch.diagonal(S))):
        raise ValueError(
            f"layer {name!r}: S is not diagonal (was it trained by a plain optimizer?)"
        )
    if not layer.started and bool(torch.count_nonzero(S)):
        raise ValueError(f"layer {name!r}: the adapter never took a step but S != 0 (set by "
                         "hand?); set a point with layer.set_factors(U, s, V), which marks it "
                         "started")  # fmt: skip
    out = {f"{name}.U": layer.U.detach(), f"{name}.s": torch.diagonal(S),
           f"{name}.V": layer.V.detach()}  # fmt: skip
    try:
        check_factors(*out.values())
    except ValueError as err:
        raise ValueError(f"layer {name!r}: {err}; the file would not load") from err
    if bias:
        out[f"{name}.bias"] = layer.bias.detach()
    return out


def load_adapters(model: nn.Module, path: str | Path) -> nn.Module:
    """Load adapters written by :func:`save_adapters` into ``model`` (converted as needed).

    ``model`` is the base model the adapters were trained on (a fresh copy), or one already
    converted with the same layers. Plain modules named in the file are converted (adapter
    mode: the pretrained weight is the frozen base; everything but adapters and
    ``modules_to_save`` is frozen), then the factors, biases and saved modules are loaded.
    The result computes what the saved model computed (the same factors, bitwise; the same
    outputs to rounding).

    Parameters
    ----------
    model : nn.Module
        The base model, or the base model converted with exactly the file's layers.
    path : str or Path
        A folder written by :func:`save_adapters`.

    Returns
    -------
    nn.Module
        ``model``.

    Raises
    ------
    FileNotFoundError
        ``path`` lacks one of the two files.
    ValueError
        Before anything is changed: a damaged file (not JSON / safetensors, tensors missing or
        not listed, shapes that disagree with the config); factors that are not a valid point
        (NaN or inf, ``s < 0``, ``U`` or ``V`` without orthonormal columns, ``s != 0`` for an
        adapter that never took a step); a layer of the file that the model lacks, or of
        another kind or shape; a converted layer of the other mode (adapter / compress); a
        converted layer the file does not hold. After converting: layers tied in the file but
        not in the model, or the reverse.

    Notes
    -----
    Each converted layer takes the rank saved in the file (a rank-adaptive optimizer may have
    changed it). A never-stepped adapter holds what a fresh adapter holds: ``s = 0`` exactly
    and orthonormal ``U``, ``V`` (its random draw cannot be checked: the seed is not saved).
    ``modules_to_save`` tensors are loaded as saved (not checked for finiteness: buffers such
    as attention masks may hold ``-inf``).
    """
    folder = Path(path)
    config = _read_config(folder)
    tensors = _read_tensors(folder, config)
    where = folder / ADAPTER_FILE
    for name, e in config["layers"].items():
        if e["tied_to"] is None:
            _check_values(name, e, tensors, where)
    _check_model(model, config, where)
    _check_saved_modules(model, config, tensors, where)
    _convert_missing(model, config)
    _check_ties(model, config, where)
    for name, e in config["layers"].items():
        if e["tied_to"] is None:
            _load_factors(model.get_submodule(name), name, e, tensors)
    for mname in config["modules_to_save"]:
        _load_saved_module(model.get_submodule(mname), mname, tensors)
    model.rankopt_config = dict(getattr(model, "rankopt_config", None) or {}, mode=config["mode"],
                                modules_to_save=list(config["modules_to_save"]))  # fmt: skip
    return model


_ENTRY_KEYS = ("kind", "shape", "rank", "started", "adapter", "bias", "tied_to")
_MODES = {True: "an adapter (mode='adapter': frozen base + U S V^T)",
          False: "a compressed layer (mode='compress': U S V^T, no base)"}  # fmt: skip
_REWRITE = "the file is damaged or was changed after save_adapters: write it again"


def _read_config(folder: Path) -> dict:
    """The JSON config of an adapter folder, its structure checked (errors name the file)."""
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {folder} is not a folder written by "
                                "rt.save_adapters")  # fmt: skip
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); {_REWRITE}") from err
    header = (config.get("format"), config.get("version")) if isinstance(config, dict) else None
    if header != (FORMAT, VERSION):
        raise ValueError(f"{file} is not a rankopt adapter file of version {VERSION}")
    layers = config.get("layers")
    if (config.get("mode") not in ("adapter", "compress") or not isinstance(layers, dict)
            or not layers or not isinstance(config.get("modules_to_save"), list)):  # fmt: skip
        raise ValueError(f"{file}: 'mode', 'layers' or 'modules_to_save' missing or invalid; "
                         f"{_REWRITE}")  # fmt: skip
    for name, e in layers.items():
        bad = not isinstance(e, dict) or any(k not in e for k in _ENTRY_KEYS)
        if bad or e["kind"] not in _KIND_NAMES or not _shape_and_rank_ok(e):
            raise ValueError(f"{file}: the entry of layer {name!r} is incomplete or invalid "
                             f"(needs {', '.join(_ENTRY_KEYS)}); {_REWRITE}")  # fmt: skip
        tied = e["tied_to"]
        if tied is not None and (tied not in layers or layers[tied]["tied_to"] is not None):
            raise ValueError(f"{file}: layer {name!r} is tied to {tied!r}, which holds no "
                             f"factors in the file; {_REWRITE}")  # fmt: skip
    return config


def _shape_and_rank_ok(e: dict) -> bool:
    shape, rank = e["shape"], e["rank"]
    ints = [*shape, rank] if isinstance(shape, list) else []
    return len(ints) == 3 and all(isinstance(i, int) and not isinstance(i, bool) for i in ints)


def _read_tensors(folder: Path, config: dict) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder; exactly those its config lists (errors name the file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = folder / ADAPTER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {folder} is not a folder written by "
                                "rt.save_adapters")  # fmt: skip
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file} is not a readable safetensors file ({err}); {_REWRITE}") from err
    expected = set()
    for name, e in config["layers"].items():
        if e["tied_to"] is None:
            expected.update(f"{name}.{k}" for k in ("U", "s", "V") + ("bias",) * bool(e["bias"]))
    saved = tuple(f"modules_to_save.{m}." for m in config["modules_to_save"])
    missing = sorted(expected - set(tensors))
    extra = sorted(k for k in tensors if k not in expected and not k.startswith(saved))
    if missing or extra:
        raise ValueError(f"{file} does not match {folder / CONFIG_FILE}: tensors missing "
                         f"{missing[:5]}, not listed {extra[:5]} (files of two different saves?); "
                         f"{_REWRITE}")  # fmt: skip
    return tensors


def _check_values(name: str, e: dict, tensors: dict, where: Path) -> None:
    """``ValueError`` unless the file's factors of layer ``name`` agree with its entry and are a
    valid point (finite, ``s >= 0``, orthonormal ``U``, ``V``; ``s = 0`` if never stepped)."""
    U, s, V = (tensors[f"{name}.{k}"] for k in ("U", "s", "V"))
    (m, n), r = e["shape"], e["rank"]
    if (tuple(U.shape), tuple(s.shape), tuple(V.shape)) != ((m, r), (r,), (n, r)):
        raise ValueError(f"layer {name!r} in {where}: U{tuple(U.shape)}, s{tuple(s.shape)}, "
                         f"V{tuple(V.shape)} do not fit its entry (shape {m} x {n}, rank {r}); "
                         f"{_REWRITE}")  # fmt: skip
    try:
        check_factors(U, s, V)
    except ValueError as err:
        raise ValueError(f"layer {name!r} in {where}: {err}; {_REWRITE}") from err
    if not e["started"] and bool((s != 0).any()):
        raise ValueError(f"layer {name!r} in {where}: the adapter never took a step, so s must be "
                         f"0 as in a fresh adapter; it holds max |s| = {float(s.abs().max()):.3g}; "
                         f"{_REWRITE}")  # fmt: skip
    if e["bias"] and not bool(torch.isfinite(tensors[f"{name}.bias"]).all()):
        raise ValueError(f"layer {name!r} in {where}: the bias has NaN or inf; {_REWRITE}")


def _flat_shape(mod: nn.Module) -> list[int]:
    if isinstance(mod, LOW_RANK_TYPES):
        return [int(mod.U.shape[0]), int(mod.V.shape[0])]
    return [int(d) for d in flat_weight(mod).shape]


def _check_model(model: nn.Module, config: dict, where: Path) -> None:
    """``ValueError`` unless every layer of the file is a module of its kind, shape and mode in
    ``model`` (or a plain module to convert), and ``model`` has no other low-rank layer."""
    layers = config["layers"]
    extra = [n for n, _ in _low_rank_layers(model) if n not in layers]
    if extra:
        raise ValueError(f"the model has low-rank layers that {where} does not hold: {extra}; load "
                         "into a fresh copy of the base model, or one converted with exactly the "
                         f"file's layers {sorted(layers)}")  # fmt: skip
    for name, e in layers.items():
        try:
            mod = find_module(model, name)
        except AttributeError:
            raise ValueError(f"{where} holds layer {name!r}, which the model does not have: load "
                             "onto the base model the adapters were trained on") from None  # fmt: skip
        _check_module(mod, name, e, where)


def _check_module(mod: nn.Module, name: str, e: dict, where: Path) -> None:
    """``ValueError`` unless ``mod`` can hold the file's layer ``name``: same kind and shape,
    and (if already converted) same mode and, for a compressed layer, a bias as saved."""
    kinds = (layer_kind(mod), plain_kind(mod))
    kind = next((k.name for k in kinds if k is not None), None)
    shape = _flat_shape(mod) if kind is not None else None
    if kind != e["kind"] or shape != list(e["shape"]):
        raise ValueError(f"module {name!r} is a {type(mod).__name__} (shape {shape}); {where} "
                         f"holds a {e['kind']} layer of shape {list(e['shape'])} (out x in): not "
                         "the model the adapters were trained on")  # fmt: skip
    adapter = mod.base_weight is not None if isinstance(mod, LOW_RANK_TYPES) else e["adapter"]
    if adapter != e["adapter"]:
        raise ValueError(f"layer {name!r}: {where} holds {_MODES[e['adapter']]}, the model has "
                         f"{_MODES[adapter]}; load into a fresh copy of the base model "
                         "(load_adapters converts it in the file's mode)")  # fmt: skip
    has_bias = getattr(mod, "bias", None) is not None
    if not adapter and has_bias != bool(e["bias"]):
        raise ValueError(f"layer {name!r}: the compressed layer in {where} has "
                         f"{'a' if e['bias'] else 'no'} bias, the model's module "
                         f"{'has' if has_bias else 'has none'}")  # fmt: skip


def _check_saved_modules(model: nn.Module, config: dict, tensors: dict, where: Path) -> None:
    """``ValueError`` unless each saved module exists with the tensor names and shapes saved."""
    for mname in config["modules_to_save"]:
        try:
            mod = model.get_submodule(mname)
        except AttributeError:
            raise ValueError(f"{where} holds the saved module {mname!r}, which the model does not "
                             "have: load onto the base model it was trained on") from None  # fmt: skip
        prefix = f"modules_to_save.{mname}."
        have = {k: tuple(v.shape) for k, v in mod.state_dict().items()}
        saved = {k[len(prefix) :]: tuple(v.shape) for k, v in tensors.items()
                 if k.startswith(prefix)}  # fmt: skip
        if have != saved:
            diff = sorted(k for k in have.keys() | saved.keys() if have.get(k) != saved.get(k))
            raise ValueError(f"saved module {mname!r} in {where} does not fit the model's module: "
                             f"tensors {diff[:5]} differ in name or shape (model: "
                             f"{[have.get(k) for k in diff[:5]]}, file: "
                             f"{[saved.get(k) for k in diff[:5]]})")  # fmt: skip


def _check_ties(model: nn.Module, config: dict, where: Path) -> None:
    """``ValueError`` unless the layers sharing factors in ``model`` are those tied in the file."""
    first: dict[int, str] = {}
    for name, layer in _low_rank_layers(model):
        tied = first.setdefault(id(layer.U), name)
        tied = None if tied == name else tied
        if tied != config["layers"][name]["tied_to"]:
            raise ValueError(f"layer {name!r}: tied to {config['layers'][name]['tied_to']!r} in "
                             f"{where}, to {tied!r} in the model (tied weights are converted "
                             "together): load into a fresh copy of the base model")  # fmt: skip


def _convert_missing(model: nn.Module, config: dict) -> None:
    """Convert the plain modules named in the file, one ``apply_low_rank`` call per mode and
    rank (tied layers share a rank, so they are converted together and stay tied)."""
    groups: dict[tuple[bool, int], list[str]] = {}
    for name, e in config["layers"].items():
        if not isinstance(find_module(model, name), LOW_RANK_TYPES):
            groups.setdefault((bool(e["adapter"]), e["rank"]), []).append(name)
    for (adapter, rank), names in groups.items():
        pattern = re.compile("|".join(re.escape(n) for n in names))
        apply_low_rank(model, rank=rank, target_modules=pattern,
                       mode="adapter" if adapter else "compress",
                       modules_to_save=config["modules_to_save"])  # fmt: skip


def _load_factors(layer: nn.Module, name: str, e: dict, tensors: dict) -> None:
    """Set the (checked) factors: the layer takes the saved rank; a never-stepped adapter keeps
    ``S = 0`` with its saved ``U``, ``V`` and stays unstarted."""
    U, s, V = (tensors[f"{name}.{k}"] for k in ("U", "s", "V"))
    layer.set_factors(U, s, V)  # resizes to the saved rank, marks the layer started
    if not e["started"]:  # s = 0 (checked): a new adapter with the saved U, V
        layer.U.link.started = False
    if e["bias"]:
        with torch.no_grad():
            layer.bias.copy_(tensors[f"{name}.bias"])


def _load_saved_module(mod: nn.Module, mname: str, tensors: dict) -> None:
    prefix = f"modules_to_save.{mname}."
    mod.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    mod.requires_grad_(True)
