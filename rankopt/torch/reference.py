r"""The reproductions of published code, in one namespace: the authors' RAdamW and RAdaGrad.

:class:`ReferenceRAdamW` and :class:`ReferenceRAdaGrad` are the torch optimizers of the rules
:class:`rankopt.rules.ReferenceRAdamW` and :class:`rankopt.rules.ReferenceRAdaGrad` (the
RAdamW and RAdaGrad of the seed paper's public code, step for step; ``faithful=True``
reproduces its documented defects), generated from their registrations like every rankopt
optimizer (:mod:`rankopt.torch.optim`). They need the dense gradient ``G`` of each low-rank
layer, which the layers' backward then accumulates (an m x n matrix per layer, one O(b m n)
product per backward; see :mod:`rankopt.torch.captures` for how captures follow gradient
accumulation, clipping and GradScaler, and why DDP is not supported). ReferenceRAdamW also
keeps two m x n moments per layer. Ordinary parameters: AdamW (ReferenceRAdamW, with the rule's
``eps``) or plain SGD (ReferenceRAdaGrad, whose code integrates with ``torch.optim.SGD``).
``rankopt.torch.ReferenceRAdamW`` is the same class.
"""

from __future__ import annotations

from ..rules.registry import registered
from .optim import optimizer_class

__all__ = [reg.name for reg in registered("reference")]

ReferenceRAdamW = optimizer_class("ReferenceRAdamW")
ReferenceRAdaGrad = optimizer_class("ReferenceRAdaGrad")
