"""The finetune benchmark's methods: a model and its optimizer for each setup.

``METHODS`` (adapters at rank 8 on the model's ``targets``: query/value for the classification
tasks, GPT-2's ``c_attn`` for the LM task; its ``saved`` modules trained whole) and
``COMPRESS_METHODS`` (the compression task): key -> :class:`Method`, whose ``build(model, lr,
seed)`` returns ``(model, optimizer)`` and whose ``grid`` holds its 3 starting learning rates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import rankopt.torch as rt
from benchmarks.finetune.models import COMPRESS_RANK, RANK, FactorLinear

#: what a method's ``build`` returns: the model to train and its optimizer
Built = tuple[nn.Module, Any]


def _fan_in_fan_out(model: nn.Module) -> bool:
    """True when the targets are transformers' Conv1D (GPT-2): weight stored (in, out)."""
    return any(type(m).__name__ == "Conv1D" for m in model.modules())


def _peft(model: nn.Module, **lora_kwargs: Any) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=model.targets,
                     modules_to_save=model.saved or None, fan_in_fan_out=_fan_in_fan_out(model),
                     **lora_kwargs)  # fmt: skip
    return get_peft_model(model, cfg)


def _adamw(params: list, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def m_lora(model: nn.Module, lr: float, seed: int) -> Built:
    """PEFT LoRA (r = alpha = 8) on query/value + AdamW."""
    model = _peft(model)
    return model, _adamw(rt.trainable_parameters(model), lr)


def m_dora(model: nn.Module, lr: float, seed: int) -> Built:
    """PEFT DoRA (``use_dora=True``) + AdamW."""
    model = _peft(model, use_dora=True)
    return model, _adamw(rt.trainable_parameters(model), lr)


def m_lora_riemannian(model: nn.Module, lr: float, seed: int) -> Built:
    """PEFT LoRA + PEFT's Riemannian-preconditioned AdamW."""
    from peft.optimizers import create_riemannian_optimizer

    model = _peft(model)
    return model, create_riemannian_optimizer(model, torch.optim.AdamW, lr=lr, weight_decay=0.0)


def m_loraplus(model: nn.Module, lr: float, seed: int) -> Built:
    """PEFT LoRA + LoRA+ (AdamW, ``loraplus_lr_ratio=16``)."""
    from peft.optimizers import create_loraplus_optimizer

    model = _peft(model)
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=16,
                                    weight_decay=0.0)  # fmt: skip
    return model, opt


def m_galore(model: nn.Module, lr: float, seed: int) -> Built:
    """The full target weights (query/value, or c_attn) and the head by GaLore AdamW (rank 8,
    gap 50)."""
    from galore_torch import GaLoreAdamW

    for p in model.parameters():
        p.requires_grad_(False)
    mats = [m.weight for n, m in model.named_modules()
            if n.rsplit(".", 1)[-1] in model.targets and getattr(m, "weight", None) is not None]  # fmt: skip
    head = [p for name in model.saved for p in model.get_submodule(name).parameters()]
    for p in mats + head:
        p.requires_grad_(True)
    groups = [{"params": head}] * bool(head) + [
              {"params": mats, "rank": RANK, "update_proj_gap": 50, "scale": 1.0,
               "proj_type": "std"}]  # fmt: skip
    return model, GaLoreAdamW(groups, lr=lr, weight_decay=0.0, no_deprecation_warning=True)


#: the LOI start's singular values (``start_scale``; the same as benchmarks/optimizers.py's)
LOI_SCALE = 1e-3


def _rankopt_adapter(model: nn.Module, seed: int, start_loss: Callable | None = None) -> nn.Module:
    """rankopt adapters on the targets; with ``start_loss``, started by LOI from its gradient."""
    loi = {} if start_loss is None else dict(start="loi", start_loss=start_loss,
                                             start_scale=LOI_SCALE)  # fmt: skip
    return rt.apply_low_rank(model, rank=RANK, target_modules=model.targets,
                             modules_to_save=model.saved or None, seed=seed, **loi)  # fmt: skip


def m_radamw(model: nn.Module, lr: float, seed: int) -> Built:
    """rankopt adapters + ``rt.RAdamW``."""
    model = _rankopt_adapter(model, seed)
    return model, rt.RAdamW(rt.trainable_parameters(model), lr=lr, weight_decay=0.0)


def m_radagrad(model: nn.Module, lr: float, seed: int) -> Built:
    """rankopt adapters + ``rt.RAdaGrad``."""
    model = _rankopt_adapter(model, seed)
    return model, rt.RAdaGrad(rt.trainable_parameters(model), lr=lr)


def m_dlraadam(model: nn.Module, lr: float, seed: int) -> Built:
    """rankopt adapters + ``rt.DLRAAdam`` (rank at most 8)."""
    model = _rankopt_adapter(model, seed)
    return model, rt.DLRAAdam(
        rt.trainable_parameters(model), lr=lr, weight_decay=0.0, max_rank=RANK
    )  # equal rank: never above the others' 8


def m_riemannion(
    model: nn.Module, lr: float, seed: int, start_loss: Callable | None = None
) -> Built:
    """rankopt adapters + ``rt.Riemannion`` (its defaults: momentum 0.9, exact matrix sign;
    the head by AdamW at the same rate); with ``start_loss`` the adapters start by LOI."""
    model = _rankopt_adapter(model, seed, start_loss)
    return model, rt.Riemannion(rt.trainable_parameters(model), lr=lr, weight_decay=0.0)


def _reference_radamw(params: list, lr: float) -> Any:
    """The authors' RAdamW (``rt.ReferenceRAdamW``) under this protocol's ``weight_decay=0``."""
    return rt.ReferenceRAdamW(params, lr=lr, weight_decay=0.0)


def m_radamw_reference(model: nn.Module, lr: float, seed: int) -> Built:
    """rankopt adapters + the authors' RAdamW (``rt.ReferenceRAdamW``)."""
    model = _rankopt_adapter(model, seed)
    return model, _reference_radamw(rt.trainable_parameters(model), lr)


# -- compression task ---------------------------------------------------------------


def _all_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("layers.")]  # fmt: skip


def _train_only(model: nn.Module, params: list) -> None:
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def c_svd_adamw(model: nn.Module, lr: float, seed: int) -> Built:
    """Every top-layer linear as truncated SVD factors (rank 32) + AdamW."""
    for name, lin in _all_linears(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, FactorLinear(lin, COMPRESS_RANK))
    factors = [p for m in model.modules() if isinstance(m, FactorLinear) for p in m.parameters()]
    _train_only(model, factors + list(model.head.parameters()))
    return model, _adamw(rt.trainable_parameters(model), lr)


def _rankopt_compress(model: nn.Module) -> nn.Module:
    rt.apply_low_rank(model, rank=COMPRESS_RANK, target_modules=r"layers\..*", mode="compress")
    low = [p for m in model.modules() if isinstance(m, (rt.LowRankLinear,))
           for p in m.parameters() if p is not getattr(m, "base_weight", None)]  # fmt: skip
    _train_only(model, low + list(model.head.parameters()))
    return model


def c_radamw(model: nn.Module, lr: float, seed: int) -> Built:
    """Every top-layer linear compressed by rankopt (rank 32) + ``rt.RAdamW``."""
    model = _rankopt_compress(model)
    return model, rt.RAdamW(rt.trainable_parameters(model), lr=lr, weight_decay=0.0)


def c_radagrad(model: nn.Module, lr: float, seed: int) -> Built:
    """Every top-layer linear compressed by rankopt (rank 32) + ``rt.RAdaGrad``."""
    model = _rankopt_compress(model)
    return model, rt.RAdaGrad(rt.trainable_parameters(model), lr=lr)


def c_dlraadam(model: nn.Module, lr: float, seed: int) -> Built:
    """Every top-layer linear compressed by rankopt + ``rt.DLRAAdam`` (at most 32)."""
    model = _rankopt_compress(model)
    return model, rt.DLRAAdam(
        rt.trainable_parameters(model), lr=lr, weight_decay=0.0, max_rank=COMPRESS_RANK
    )


def c_riemannion(model: nn.Module, lr: float, seed: int) -> Built:
    """Every top-layer linear compressed by rankopt (rank 32) + ``rt.Riemannion``."""
    model = _rankopt_compress(model)
    return model, rt.Riemannion(rt.trainable_parameters(model), lr=lr, weight_decay=0.0)


@dataclass
class Method:
    """A method: its label in the tables, ``build(model, lr, seed) -> (model, optimizer)``,
    its starting learning-rate grid, whether it is rankopt's (bold, red), and whether its
    adapters start by LOI (``build`` then takes ``start_loss=``: the loss of the run's first
    batch)."""

    label: str
    build: Callable[..., Built]
    grid: tuple[float, ...]
    rankopt: bool = False
    loi: bool = False


G_LORA = (1e-3, 3e-3, 1e-2)
G_ADAM = (3e-4, 1e-3, 3e-3)
METHODS = {
    "lora": Method("LoRA + AdamW (PEFT)", m_lora, G_LORA),
    "dora": Method("DoRA + AdamW (PEFT)", m_dora, G_LORA),
    "lora_riemannian": Method("LoRA + Riemannian-precond. AdamW (PEFT)", m_lora_riemannian, G_LORA),
    "loraplus": Method("LoRA+ (PEFT, ratio 16)", m_loraplus, G_ADAM),
    "galore": Method("GaLore AdamW (full q/v)", m_galore, (1e-4, 3e-4, 1e-3)),
    "radamw": Method("rankopt RAdamW", m_radamw, G_ADAM, True),
    "radagrad": Method("rankopt RAdaGrad", m_radagrad, (3e-3, 1e-2, 3e-2), True),
    "dlraadam": Method("rankopt DLRAAdam", m_dlraadam, G_ADAM, True),
    "radamw_reference": Method("authors' RAdamW (reference)", m_radamw_reference, G_ADAM, True),
    "riemannion": Method("rankopt Riemannion", m_riemannion, G_LORA, True),
    "riemannion_loi": Method("rankopt Riemannion + LOI", m_riemannion, G_LORA, True, loi=True),
}
COMPRESS_METHODS = {
    "svd_adamw": Method("truncated SVD factors + AdamW", c_svd_adamw, G_ADAM),
    "radamw": Method("rankopt RAdamW", c_radamw, G_ADAM, True),
    "radagrad": Method("rankopt RAdaGrad", c_radagrad, (3e-3, 1e-2, 3e-2), True),
    "dlraadam": Method("rankopt DLRAAdam", c_dlraadam, G_ADAM, True),
    "riemannion": Method("rankopt Riemannion", c_riemannion, G_LORA, True),
}
