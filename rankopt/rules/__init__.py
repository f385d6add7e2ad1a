r"""Update rules on the fixed-rank manifold: one spec per rule, shared by every front end.

The NumPy solvers (:mod:`rankopt.solvers`) and the torch optimizers (:mod:`rankopt.torch`) take
their hyperparameters and defaults from these specs and call their ``init`` / ``step``; each
rule's defaults are written once, here. Rules call only the manifold's public fast path
(:class:`rankopt.geometry.Geometry`) and work on one point or a stack of same-shape points.

=====================  =======================================================================
spec                   what a step does
=====================  =======================================================================
``RSGD``               Riemannian SGD, heavy-ball / Nesterov momentum (torch.optim.SGD conventions)
``RHeavyBall``         ``RSGD`` with momentum 0.9
``RAdaGrad``           step along the Riemannian gradient of the AdaGrad-statistics metric
``RAdamW``             Adam first moment (transported) + Adafactor-factored Adam metric + decay
``RAdamWElementwise``  ``RAdamW`` under the elementwise Adam metric (m x n second moment)
``DLRAHeavyBall``      augmented BUG integrator, heavy ball on the core, rank-adaptive
``DLRAAdam``           augmented BUG integrator, Adam on the core, rank-adaptive
``ReferenceRAdamW``    the authors' code's RAdamW: dense m x n AdamW moments, project, retract
``ReferenceRAdaGrad``  the authors' code's RAdaGrad: per-step preconditioned dense SGD, retract
``Riemannion``         heavy ball (transported), Muon's orthogonalized step, SVD retraction
=====================  =======================================================================

What a rule's ``step`` needs besides the tangent gradient ``P_x(G)`` is its ``gradient_input``
(absent means ``"tangent"``): ``"normal"`` (the DLRA rules: ``step(..., normal=f)`` with
``f(Q_u, Q_v) = Q_u^T G Q_v``, see :func:`normal_block_of`) or ``"dense"`` (the reference rules:
``step(..., egrad=G)``, the dense m x n gradient). Every rule with ``rank_tol`` set is
rank-adaptive (``RSGD``/``RAdamW``/``RAdaGrad`` with ``rank_tol``: a tangent step and a
rank-adaptive retraction, which is not the DLRA integrator).

See :mod:`rankopt.rules.base` for the protocol (specs, states, stacks).
"""

from __future__ import annotations

from .adaptive import AdaGradState, AdamState, RAdaGrad, RAdamW
from .base import Rule, state_arrays, state_from_arrays
from .dlra import DLRAAdam, DLRAAdamState, DLRAHeavyBall, DLRAState, normal_block_of
from .elementwise import ElementwiseAdamState, RAdamWElementwise
from .reference import ReferenceAdamState, ReferenceRAdaGrad, ReferenceRAdamW, ReferenceState
from .riemannion import Riemannion, RiemannionState
from .sgd import RSGD, RHeavyBall, SGDState

__all__ = [
    "Rule",
    "RSGD",
    "RHeavyBall",
    "RAdaGrad",
    "RAdamW",
    "RAdamWElementwise",
    "DLRAHeavyBall",
    "DLRAAdam",
    "ReferenceRAdamW",
    "ReferenceRAdaGrad",
    "Riemannion",
    "SGDState",
    "AdamState",
    "AdaGradState",
    "ElementwiseAdamState",
    "DLRAState",
    "DLRAAdamState",
    "ReferenceAdamState",
    "ReferenceState",
    "RiemannionState",
    "normal_block_of",
    "gradient_input",
    "state_arrays",
    "state_from_arrays",
    "STATE_CLASSES",
]

#: state classes by name (for checks when loading saved states)
STATE_CLASSES = {
    c.__name__: c
    for c in (
        SGDState,
        AdamState,
        AdaGradState,
        ElementwiseAdamState,
        DLRAState,
        DLRAAdamState,
        ReferenceAdamState,
        ReferenceState,
        RiemannionState,
    )
}


def gradient_input(spec: Rule) -> str:
    """What ``spec.step`` needs besides the tangent gradient: ``"tangent"`` (nothing),
    ``"normal"`` (``normal=f``, the DLRA rules) or ``"dense"`` (``egrad=G``, the reference rules)."""
    return getattr(spec, "gradient_input", "tangent")
