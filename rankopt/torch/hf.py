r"""Hugging Face ``save_pretrained`` / ``from_pretrained`` and ``Trainer`` checkpoints.

A converted model's state dict holds ``<layer>.base_weight``, ``U``, ``S``, ``V`` where the
plain model has ``<layer>.weight``: ``from_pretrained`` alone would leave those weights
random. So, once :func:`~rankopt.torch.apply_low_rank` has converted a module and
transformers is loaded, ``PreTrainedModel.save_pretrained`` is wrapped
(:func:`patch_save_pretrained`; a model without rankopt layers is saved exactly as before).
For a model with rankopt layers it writes, in the same ``model.safetensors``:

* the converted model's whole state dict (frozen bases, factors, the ``adapter_started``
  flags), so that ``model.load_state_dict`` of a freshly converted model, and hence
  ``Trainer``'s resume, restores it exactly; and
* the **merged** weights under the plain model's names (``<layer>.weight = W0 + U S V^T`` in
  the plain layout, an attention's packed ``in_proj_weight``), so that ``from_pretrained``
  builds the plain model computing the trained function (its load report lists the rankopt
  tensors as unexpected keys: they are what a converted model needs).

Each low-rank layer (and unpacked attention) drops those merged copies when a state dict
holding its own tensors is loaded, and **refuses** a state dict that holds a plain weight but
no factors (a plain or merged checkpoint: loading it would silently keep the layer's current
factors): :func:`guard_merged_keys`.

**Adapter-only Trainer checkpoints.** With ``callbacks=[rt.AdapterCheckpointCallback()]``,
while ``Trainer.train`` runs, ``save_pretrained`` writes only what training changes (every
trainable parameter, the ``adapter_started`` flags, the ``modules_to_save`` tensors): not the
frozen base. ``Trainer(...).train(resume_from_checkpoint=...)`` on a freshly converted model
resumes exactly (Trainer loads it with ``strict=False``). Such a folder cannot make a model by
itself, so each merged weight's name holds a one-element marker: ``from_pretrained`` stops
with a size-mismatch error instead of loading random base weights, and a ``README.md`` in the
folder says how to load it. After training (``trainer.save_model()``) the full save is back.
"""

from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attention import PROJECTIONS, LowRankMultiheadAttention, to_multihead_attention
from .layers import LowRankBase
from .names import saved_module_names

__all__ = [
    "patch_save_pretrained",
    "save_state_dict",
    "guard_merged_keys",
    "AdapterCheckpointCallback",
    "ADAPTER_CHECKPOINT_FLAG",
]

#: the model attribute :class:`AdapterCheckpointCallback` sets while ``Trainer.train`` runs
ADAPTER_CHECKPOINT_FLAG = "rankopt_adapter_checkpoints"
_PLAIN_ATTENTION = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
                    "v_proj_weight")  # fmt: skip

README = """# rankopt adapter checkpoint

This folder holds only the trained tensors of a model converted by `rankopt.torch`
(low-rank factors, `adapter_started` flags, `modules_to_save`), not its frozen base weights:
`from_pretrained` refuses it (the names of the merged weights hold one-element markers).

* Resume training: convert a fresh base model exactly as before
  (`rt.apply_low_rank(...)`), then
  `Trainer(model, ..., callbacks=[rt.AdapterCheckpointCallback()]).train(resume_from_checkpoint=<this folder>)`.
* Load it: convert a fresh base model as before, then
  `model.load_state_dict(safetensors.torch.load_file("<this folder>/model.safetensors"), strict=False)`.
"""


def _has_low_rank(model: nn.Module) -> bool:
    return any(isinstance(m, (LowRankBase, LowRankMultiheadAttention)) for m in model.modules())


def _merged(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's tensors that the converted state dict lacks: each low-rank layer's
    merged weight (``<name>.weight``) and each unpacked attention's plain parameters."""
    out: dict[str, torch.Tensor] = {}
    atts = []
    for name, mod in model.named_modules(remove_duplicate=False):
        prefix = name + "." if name else ""
        if isinstance(mod, LowRankMultiheadAttention):
            atts.append((prefix, mod))
        elif isinstance(mod, LowRankBase):
            with torch.no_grad():
                out[prefix + "weight"] = mod.dense_weight().detach()
    for prefix, att in atts:
        with torch.no_grad():
            sd = to_multihead_attention(att).state_dict()
        out.update({prefix + k: v for k, v in sd.items() if k in _PLAIN_ATTENTION})
    return out


def _trained_keys(model: nn.Module, state_dict: dict) -> dict[str, torch.Tensor]:
    """What training changes: trainable parameters, ``adapter_started`` flags, the
    ``modules_to_save`` tensors (buffers too)."""
    keep = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    saved = tuple(n + "." for n in saved_module_names(model))
    return {k: v for k, v in state_dict.items()
            if k in keep or k.endswith("adapter_started") or (saved and k.startswith(saved))}  # fmt: skip


def save_state_dict(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The state dict the wrapped ``save_pretrained`` writes for a model with rankopt layers.

    Full (default): ``state_dict`` (or ``model.state_dict()``) plus the merged weights under
    the plain model's names. While :class:`AdapterCheckpointCallback` marks a training run:
    the trained tensors only, plus a one-element marker under each merged weight's name.
    """
    sd = dict(model.state_dict() if state_dict is None else state_dict)
    merged = _merged(model)
    if not getattr(model, ADAPTER_CHECKPOINT_FLAG, False):
        return {**sd, **{k: v for k, v in merged.items() if k not in sd}}
    out = _trained_keys(model, sd)
    out.update({k: torch.zeros(1, dtype=v.dtype) for k, v in merged.items() if k not in sd})
    return out


def patch_save_pretrained() -> None:
    """Wrap ``transformers.PreTrainedModel.save_pretrained`` (once; only if transformers is
    loaded): models with rankopt layers are saved with :func:`save_state_dict`."""
    mu = sys.modules.get("transformers.modeling_utils")
    cls = getattr(mu, "PreTrainedModel", None)
    if cls is None or getattr(cls.save_pretrained, "rankopt_wrapped", False):
        return
    original = cls.save_pretrained
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        if not _has_low_rank(self):
            return original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        bound.arguments["state_dict"] = save_state_dict(self, bound.arguments.get("state_dict"))
        result = original(*bound.args, **bound.kwargs)
        if getattr(self, ADAPTER_CHECKPOINT_FLAG, False) and bound.arguments.get(
            "is_main_process", True
        ):
            (Path(bound.arguments["save_directory"]) / "README.md").write_text(README)
        return result

    save_pretrained.rankopt_wrapped = True
    cls.save_pretrained = save_pretrained


def _layer_hook(module, state_dict, prefix, *args) -> None:
    """Drop the merged copy ``<prefix>weight`` next to the layer's factors; refuse it alone."""
    key = prefix + "weight"
    if key not in state_dict:
        return
    if any(prefix + k in state_dict for k in ("U", "S", "V")):
        del state_dict[key]
        return
    raise ValueError(
        f"the state dict holds {key!r} but no factors {prefix}U/S/V: a plain or merged "
        "checkpoint, which would leave this rankopt layer as it is. Load it into the plain "
        "model (before apply_low_rank, or after rt.merge), or load rankopt checkpoints here"
    )


def _attention_hook(module, state_dict, prefix, *args) -> None:
    """Drop an unpacked attention's plain (merged) tensors next to its own; refuse them alone."""
    plain = [prefix + k for k in _PLAIN_ATTENTION if prefix + k in state_dict]
    if not plain:
        return
    own = tuple(f"{prefix}{p}." for p in PROJECTIONS[:3])
    if any(k.startswith(own) for k in state_dict) or prefix + "out_proj.U" in state_dict:
        for k in plain:
            del state_dict[k]
        return
    raise ValueError(
        f"the state dict holds the plain nn.MultiheadAttention tensors {plain} but none of "
        f"the unpacked attention {prefix[:-1]!r} (q_proj, k_proj, v_proj): a plain or merged "
        "checkpoint; load it into the plain model (before apply_low_rank, or after rt.merge)"
    )


def guard_merged_keys(module: nn.Module) -> None:
    """Register the load hook that handles merged copies (see the module doc) on a low-rank
    layer or an unpacked attention (once)."""
    hook = _attention_hook if isinstance(module, LowRankMultiheadAttention) else _layer_hook
    if not getattr(module, "rankopt_guarded", False):
        module.register_load_state_dict_pre_hook(hook)
        module.rankopt_guarded = True


class AdapterCheckpointCallback:
    """A ``transformers.TrainerCallback``: adapter-only checkpoints while ``Trainer.train`` runs.

    ``Trainer(model, args, callbacks=[rt.AdapterCheckpointCallback()], ...)``: from
    ``on_train_begin`` to ``on_train_end`` the model's ``save_pretrained`` writes only the
    trained tensors (see the module doc); resuming needs the callback too only for the
    checkpoints it writes next. Every other ``on_*`` event does nothing.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        if model is not None:
            setattr(model, ADAPTER_CHECKPOINT_FLAG, True)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        if model is not None:
            setattr(model, ADAPTER_CHECKPOINT_FLAG, False)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return _nothing
        raise AttributeError(name)


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None
