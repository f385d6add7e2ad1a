r"""Update rules on the fixed-rank manifold: one spec per rule, shared by every front end.

The NumPy solvers (:mod:`rankopt.solvers`) and the torch optimizers (:mod:`rankopt.torch`) take
their hyperparameters and defaults from these specs and call their ``init`` / ``step``; each
rule's defaults are written once, here. Rules call only the manifold's public fast path
(:class:`rankopt.geometry.Geometry`) and work on one point or a stack of same-shape points.

=================  ===========================================================================
spec               what a step does
=================  ===========================================================================
``RSGD``           Riemannian SGD, heavy-ball / Nesterov momentum (torch.optim.SGD conventions)
``RHeavyBall``     ``RSGD`` with momentum 0.9
``RAdaGrad``       step along the Riemannian gradient of the AdaGrad-statistics metric
``RAdamW``         Adam first moment (transported) + Adam-statistics metric + decoupled decay
``DLRAHeavyBall``  ``RSGD`` with momentum 0.9 and the rank-adaptive retraction
``DLRAAdam``       ``RAdamW`` with the rank-adaptive retraction
=================  ===========================================================================

See :mod:`rankopt.rules.base` for the protocol (specs, states, stacks).
"""

from __future__ import annotations

from .adaptive import AdaGradState, AdamState, DLRAAdam, RAdaGrad, RAdamW
from .base import Rule, state_arrays, state_from_arrays
from .sgd import RSGD, DLRAHeavyBall, RHeavyBall, SGDState

__all__ = [
    "Rule",
    "RSGD",
    "RHeavyBall",
    "RAdaGrad",
    "RAdamW",
    "DLRAHeavyBall",
    "DLRAAdam",
    "SGDState",
    "AdamState",
    "AdaGradState",
    "state_arrays",
    "state_from_arrays",
    "STATE_CLASSES",
]

#: state classes by name (for checks when loading saved states)
STATE_CLASSES = {c.__name__: c for c in (SGDState, AdamState, AdaGradState)}
