"""The ``torch.nn`` bridge: low-rank layers, model conversion and ``torch.optim`` optimizers.

>>> import rankopt.torch as rt
>>> model = rt.apply_low_rank(model, rank=8, target_modules=["query", "value"])   # doctest: +SKIP
>>> opt = rt.RAdamW(rt.trainable_parameters(model), lr=1e-3)                    # doctest: +SKIP

Adapters travel as small files (:func:`save_adapters` / :func:`load_adapters`) or as PEFT
LoRA adapters (:func:`from_peft` / :func:`to_peft`); converted models work with
``transformers.Trainer`` checkpoints (adapter-only with :class:`AdapterCheckpointCallback`) and
``save_pretrained`` / ``from_pretrained`` (merged weights beside the factors,
:mod:`rankopt.torch.hf`).

See ``docs/torch.md`` for the design (what the backward stores, the adapter start, DDP/FSDP,
mixed precision) and measured results.
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401
except ImportError as _err:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "rankopt.torch needs PyTorch, which is not installed: pip install -e '.[torch]' "
        "(or torch itself, see https://pytorch.org for the CUDA/CPU builds)"
    ) from _err

from .adapters import load_adapters, save_adapters
from .attention import LowRankMultiheadAttention
from .conv1d import LowRankConv1D, LowRankConv1d
from .convert import (
    apply_low_rank,
    energy_rank,
    manifold_parameters,
    merge,
    ordinary_parameters,
    parameter_counts,
    saved_module_names,
    trainable_parameters,
)
from .embedding import LowRankEmbedding
from .hf import AdapterCheckpointCallback, patch_save_pretrained
from .layers import (
    LowRankConv2d,
    LowRankLinear,
    ManifoldLink,
    ManifoldParameter,
    is_manifold_parameter,
)
from .optim import optimizer_class, rule_optimizers
from .optimizer import RiemannianOptimizer
from .peft import from_peft, to_peft
from .plain import allow_plain_optimizers
from .report import ConversionReport
from .start import adapter_start

patch_save_pretrained()  # if transformers is loaded already (apply_low_rank does it otherwise)

# one named optimizer per registered rule, generated from its spec (rankopt.torch.optim)
# (RSGD, RAdamW, DLRAAdam, Riemannion, ...): nothing here names a rule
globals().update(rule_optimizers())

__all__ = [
    "LowRankLinear",
    "LowRankConv2d",
    "LowRankEmbedding",
    "LowRankConv1d",
    "LowRankConv1D",
    "LowRankMultiheadAttention",
    "ConversionReport",
    "AdapterCheckpointCallback",
    "ManifoldParameter",
    "ManifoldLink",
    "is_manifold_parameter",
    "apply_low_rank",
    "merge",
    "trainable_parameters",
    "manifold_parameters",
    "ordinary_parameters",
    "parameter_counts",
    "energy_rank",
    "saved_module_names",
    "save_adapters",
    "load_adapters",
    "from_peft",
    "to_peft",
    "RiemannianOptimizer",
    "optimizer_class",
    "rule_optimizers",
    *rule_optimizers(),
    "allow_plain_optimizers",
    "adapter_start",
]
