r"""Base class of the rankopt torch optimizers, the adapter start, and the plain-optimizer guard.

See :mod:`rankopt.torch.optim` for the optimizers and the overall design.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..containers import FixedRankPoint, TangentVector
from ..manifold import FixedRankManifold
from ..solvers import rules
from .layers import ManifoldParameter, resize_parameter_

# ---------------------------------------------------------------------------
# detection of manifold parameters in plain torch optimizers
# ---------------------------------------------------------------------------

_GUARD = {"enabled": True}
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def allow_plain_optimizers(allow: bool = True) -> None:
    """Turn off (``allow=True``) or on the check for manifold parameters in plain optimizers."""
    _GUARD["enabled"] = not allow


def _guard_hook(optimizer, args, kwargs) -> None:
    if not _GUARD["enabled"] or getattr(optimizer, "_rankopt_riemannian", False):
        return
    count = sum(len(g["params"]) for g in optimizer.param_groups)
    if _CHECKED.get(optimizer) == count:
        return
    for g in optimizer.param_groups:
        for p in g["params"]:
            if isinstance(p, ManifoldParameter) and p.requires_grad:
                raise ValueError(
                    f"{type(optimizer).__name__} got the factor {p.role!r} {tuple(p.shape)} of a "
                    "rankopt low-rank layer. Its .grad holds a tangent-space piece of the weight "
                    "gradient, not the Euclidean gradient of the factor, so a plain torch optimizer "
                    "would not minimize the loss and would break the orthonormality of U and V. "
                    "Use rankopt.torch.RAdamW / RAdaGrad / RSGD / DLRAHeavyBall / DLRAAdam (they "
                    "apply AdamW / Adagrad / SGD to all other parameters), or leave the factors out "
                    "(rankopt.torch.ordinary_parameters(model)). "
                    "rankopt.torch.allow_plain_optimizers() disables this check."
                )
    _CHECKED[optimizer] = count


_HOOK_HANDLE = register_optimizer_step_pre_hook(_guard_hook)


# ---------------------------------------------------------------------------
# adapter start
# ---------------------------------------------------------------------------


def _adapter_start(manifold, Y, C, Z) -> tuple[FixedRankPoint, TangentVector] | None:
    r"""Start point and tangent vector of an adapter from its gradient sketches.

    ``Y = G V``, ``C = U^T G V``, ``Z = G^T U`` for the random orthonormal test matrices U, V.
    Generalized Nystrom (Nakatsukasa, arXiv 2009.11392, 2020): ``G_hat = Y C_eps^+ Z^T``, with the
    pseudo-inverse dropping singular values of C below ``r * eps(dtype) * ||C||_2`` (the stable
    eps-pseudo-inverse variant). ``G_hat = U0 diag(sig) V0^T`` by QR of ``Y C^+`` and ``Z`` and an
    r x r SVD. Returns ``X0 = U0 diag(0) V0^T`` and ``xi = U0 diag(sig) V0^T`` (as
    ``TangentVector(diag(sig), 0, 0)``), or None when the sketch is zero (the layer got no
    gradient). Exact (``G_hat = G``) when ``rank G <= r``. Cost O((m + n) r^2 + r^3).
    """
    be = manifold.backend
    r = int(C.shape[0])
    uc, sc, vch = be.svd(C)
    smax = be.to_float(sc[0])
    if not smax > 0:
        return None
    keep = sc > r * be.eps * smax
    inv = torch.where(keep, 1.0 / torch.where(keep, sc, torch.ones_like(sc)), torch.zeros_like(sc))
    A = Y @ ((vch.T * inv[None, :]) @ uc.T)
    qa, ra = be.qr(A)
    qz, rz = be.qr(Z)
    a, sig, bh = be.svd(ra @ rz.T)
    x0 = FixedRankPoint(qa @ a, torch.zeros_like(sig), qz @ bh.T)
    xi = TangentVector(be.diag(sig), be.zeros((Y.shape[0], r)), be.zeros((Z.shape[0], r)))
    return x0, xi


# ---------------------------------------------------------------------------
# base class
# ---------------------------------------------------------------------------


class RiemannianOptimizer(torch.optim.Optimizer):
    """Base class: groups manifold factors per layer, checks gradients, handles GradScaler.

    Subclasses implement ``_rule_init``, ``_rule_step`` (the manifold rule) and
    ``_euclidean_step`` (torch's rule for ordinary parameters).

    Parameters
    ----------
    params : iterable of parameters or of dicts (param groups)
    defaults : dict
    check_finite : bool
        Raise ``ValueError`` on non-finite gradients (one device synchronization per step).
        Under ``torch.amp.GradScaler`` the scaler's own inf check is used instead, and a step
        with inf/NaN gradients is skipped with a ``RuntimeWarning``.
    """

    _rankopt_riemannian = True
    # GradScaler hands us ``grad_scale`` / ``found_inf`` instead of skipping silently
    _step_supports_amp_scaling = True

    def __init__(self, params: Any, defaults: dict, check_finite: bool = True) -> None:
        self.check_finite = bool(check_finite)
        self._manifolds: dict = {}
        super().__init__(params, defaults)

    # -- parameter bookkeeping --------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:  # a layer's U, S, V must be complete within one group (torch forbids duplicates)
            self._split(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    @staticmethod
    def _split(group: dict) -> tuple[list[tuple[Any, Any, Any]], list[torch.Tensor]]:
        """``(triples, ordinary)``: (U, S, V) per low-rank layer, and all other parameters."""
        by_link: dict[int, dict[str, Any]] = {}
        ordinary = []
        for p in group["params"]:
            if isinstance(p, ManifoldParameter):
                d = by_link.setdefault(id(p.link), {})
                if p.role in d:
                    raise ValueError(f"factor {p.role!r} of one low-rank layer appears twice")
                d[p.role] = p
            else:
                ordinary.append(p)
        triples = []
        for d in by_link.values():
            if set(d) != {"U", "S", "V"}:
                raise ValueError(
                    "a low-rank layer's factors must be given together, in one param group: got "
                    f"only {sorted(d)} of U, S, V (pass model.parameters() or all of "
                    "layer.parameters())"
                )
            triples.append((d["U"], d["S"], d["V"]))
        return triples, ordinary

    def _manifold(self, m: int, n: int, r: int, dtype, device) -> FixedRankManifold:
        key = (m, n, r, dtype, device)
        man = self._manifolds.get(key)
        if man is None:
            man = FixedRankManifold(
                m, n, r, backend="torch", dtype=dtype, device=device, validate=False
            )
            self._manifolds[key] = man
        return man

    # -- state_dict: rule states are frozen dataclasses, stored as plain dicts -----------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        state = {}
        for k, v in sd["state"].items():
            if "rule_state" in v:
                v = dict(v)
                v["rule_state"] = rules.state_to_dict(v["rule_state"])
            state[k] = v
        sd["state"] = state
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        rule_states, state = {}, {}
        for k, v in state_dict["state"].items():
            if isinstance(v, dict) and "rule_state" in v:
                v = dict(v)
                rule_states[k] = v.pop("rule_state")
            state[k] = v
        super().load_state_dict({**state_dict, "state": state})
        params = [p for g in self.param_groups for p in g["params"]]
        for k, d in rule_states.items():
            p = params[int(k)]
            self.state[p]["rule_state"] = rules.state_from_dict(_to_device(d, p.device))

    # -- the step ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One optimization step (``closure`` re-evaluates the model and returns the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) > 0:
            warnings.warn(
                "rankopt: GradScaler found inf/NaN gradients; this step is skipped "
                "(the scaler lowers its scale in update())",
                RuntimeWarning,
                stacklevel=2,
            )
            return loss
        splits = [self._split(g) for g in self.param_groups]
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grad_scale is not None:  # GradScaler passed the scale instead of unscaling
            inv = grad_scale.double().reciprocal().float()
            for gr in grads:
                gr.mul_(inv.to(gr.device))
        elif self.check_finite and grads:
            self._raise_if_nonfinite()
        for group, (triples, ordinary) in zip(self.param_groups, splits, strict=True):
            params = [p for p in ordinary if p.grad is not None]
            if params:
                if any(p.grad.is_sparse for p in params):
                    raise ValueError("sparse gradients are not supported by rankopt optimizers")
                self._euclidean_step(group, params)
            for U, S, V in triples:
                self._manifold_step(group, U, S, V)
        return loss

    def _raise_if_nonfinite(self) -> None:
        named = [
            (gi, p)
            for gi, g in enumerate(self.param_groups)
            for p in g["params"]
            if p.grad is not None
        ]
        dev = named[0][1].grad.device
        ok = torch.stack([torch.isfinite(p.grad).all().to(dev) for _, p in named])
        if bool(ok.all()):
            return
        i = int((~ok).nonzero()[0, 0])
        gi, p = named[i]
        what = (
            f"factor {p.role!r} of a low-rank layer"
            if isinstance(p, ManifoldParameter)
            else "parameter"
        )
        raise ValueError(
            f"non-finite gradient (inf or NaN) in {what} of shape {tuple(p.shape)} (param group {gi}); "
            "the step was not taken. Lower the learning rate, clip gradients, or use "
            "torch.amp.GradScaler (which skips such steps); check_finite=False disables this check."
        )

    def _manifold_step(self, group: dict, U, S, V) -> None:
        gs = (U.grad, S.grad, V.grad)
        if all(g is None for g in gs):
            return
        if any(g is None for g in gs):
            raise ValueError("a low-rank layer's U, S, V must all have gradients or none")
        wd = U.dtype if U.dtype in (torch.float32, torch.float64) else torch.float32
        m, n, r = U.shape[0], V.shape[0], S.shape[0]
        man = self._manifold(m, n, r, wd, U.device)
        state = self.state[U]
        link = U.link
        if not link.started:
            start = _adapter_start(man, U.grad.to(wd), S.grad.to(wd), V.grad.to(wd))
            if start is None:
                return
            x, xi = start
            rule_state = self._rule_init(man, x, group)
        else:
            x = FixedRankPoint(U.detach().to(wd), S.detach().diagonal().to(wd), V.detach().to(wd))
            xi = TangentVector(S.grad.to(wd), U.grad.to(wd), V.grad.to(wd))
            rule_state = state.get("rule_state")
            if rule_state is None:
                rule_state = self._rule_init(man, x, group)
        x_new, rule_state = self._rule_step(man, x, xi, rule_state, group)
        state["rule_state"] = rule_state
        for p, new in ((U, x_new.U), (S, torch.diag(x_new.s)), (V, x_new.V)):
            new = new.to(p.dtype)
            if p.shape == new.shape:
                p.copy_(new)
            else:  # rank-adaptive rules: same Parameter object, new shape
                resize_parameter_(p, new)
        link.started = True

    # -- to be implemented ---------------------------------------------------------------
    def _rule_init(self, manifold, x, group):  # pragma: no cover - abstract
        raise NotImplementedError

    def _rule_step(self, manifold, x, xi, state, group):  # pragma: no cover - abstract
        raise NotImplementedError

    def _euclidean_step(self, group: dict, params: list) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def _to_device(d: Any, device) -> Any:
    if isinstance(d, torch.Tensor):
        return d.to(device)
    if isinstance(d, dict):
        return {k: _to_device(v, device) for k, v in d.items()}
    return d


def _check_hyper(
    lr: float, eps: float | None = None, betas=None, weight_decay: float = 0.0
) -> None:
    if not (isinstance(lr, (int, float)) and lr >= 0 and math.isfinite(lr)):
        raise ValueError(f"invalid learning rate lr={lr!r}: must be a finite number >= 0")
    if eps is not None and not eps > 0:
        raise ValueError(f"invalid eps={eps!r}: must be > 0")
    if betas is not None and not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"invalid betas={betas!r}: each must lie in [0, 1)")
    if not weight_decay >= 0:
        raise ValueError(f"invalid weight_decay={weight_decay!r}: must be >= 0")
