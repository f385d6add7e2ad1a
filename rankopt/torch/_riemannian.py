r"""Base class of the rankopt torch optimizers, the adapter start, and the plain-optimizer guard.

See :mod:`rankopt.torch.optim` for the optimizers and :mod:`rankopt.torch.stacks` for how
same-shape layers are stacked and moved by one call of their rule.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import fields
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..containers import FixedRankPoint, TangentVector
from ..manifold import FixedRankManifold
from ..rules import Rule, state_arrays
from .compiled import CompiledSteps
from .layers import ManifoldParameter, resize_parameter_
from .stacks import (
    BucketUpdate,
    Layer,
    PointCache,
    StateStack,
    gather_tangent,
    work_dtype,
    write_point,
)

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


def adapter_start(manifold, Y, C, Z) -> tuple[FixedRankPoint, TangentVector, torch.Tensor]:
    r"""Start points and tangent vectors of a stack of adapters from their gradient sketches.

    ``Y = G V``, ``C = U^T G V``, ``Z = G^T U`` (stacked) for the random orthonormal test
    matrices U, V. Generalized Nystrom (Nakatsukasa, arXiv 2009.11392, 2020):
    ``G_hat = Y C_eps^+ Z^T``, with the pseudo-inverse dropping singular values of C below
    ``r * eps(dtype) * ||C||_2`` (the stable eps-pseudo-inverse variant). ``G_hat = U0 diag(sig)
    V0^T`` by QR of ``Y C^+`` and ``Z`` and an r x r SVD. Returns ``X0 = U0 diag(0) V0^T``,
    ``xi = U0 diag(sig) V0^T`` (as ``TangentVector(diag(sig), 0, 0)``) and a boolean per item
    that is False where the sketch is zero (that layer got no gradient and stays unstarted).
    Exact (``G_hat = G``) when ``rank G <= r``. Cost O((m + n) r^2 + r^3) per layer.
    """
    be = manifold.backend
    r = int(C.shape[-1])
    uc, sc, vch = torch.linalg.svd(C)
    smax = sc[..., :1]
    keep = sc > r * be.eps * smax
    inv = torch.where(keep, 1.0 / torch.where(keep, sc, torch.ones_like(sc)), torch.zeros_like(sc))
    A = Y @ ((vch.mT * inv[..., None, :]) @ uc.mT)
    qa, ra = torch.linalg.qr(A)
    qz, rz = torch.linalg.qr(Z)
    a, sig, bh = torch.linalg.svd(ra @ rz.mT)
    x0 = FixedRankPoint(qa @ a, torch.zeros_like(sig), qz @ bh.mT)
    xi = TangentVector(torch.diag_embed(sig), torch.zeros_like(Y), torch.zeros_like(Z))
    return x0, xi, smax[..., 0] > 0


# ---------------------------------------------------------------------------
# hyperparameters of a param group, checked at every step
# ---------------------------------------------------------------------------

#: param-group options that must be finite numbers >= 0, and those that must be > 0
_AT_LEAST_ZERO = ("weight_decay", "momentum", "lr_decay", "initial_accumulator_value")
_ABOVE_ZERO = ("eps", "metric_eps")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bad_option(index: int, name: str, value: Any, need: str) -> ValueError:
    return ValueError(
        f"param group {index}: invalid {name}={value!r}: {need}; the step was not taken"
    )


def check_group(index: int, group: dict) -> None:
    """Refuse an invalid hyperparameter of the param group ``index`` (``ValueError`` naming the
    group, the option and its value).

    Reads Python numbers only (microseconds, no device synchronization): ``lr`` a finite number
    >= 0 or a 0-d floating-point tensor (whose value the finite check reads), ``weight_decay``,
    ``momentum``, ``lr_decay``, ``initial_accumulator_value`` finite and >= 0, ``eps``,
    ``metric_eps`` finite and > 0, ``dampening`` in [0, 1], ``betas`` two numbers
    in [0, 1), ``nesterov`` a bool. The rule spec checks its other options when they change.
    """
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.ndim != 0 or not lr.is_floating_point():
            raise _bad_option(index, "lr", lr, "a tensor learning rate must be 0-d floating-point")
    elif not (_is_number(lr) and 0 <= lr < math.inf):
        raise ValueError(
            f"param group {index}: invalid learning rate lr={lr!r}: must be a finite number >= 0 "
            "(or a 0-d tensor); the step was not taken"
        )
    for name in _AT_LEAST_ZERO:
        v = group.get(name, 0.0)
        if not (_is_number(v) and 0 <= v < math.inf):
            raise _bad_option(index, name, v, "must be a finite number >= 0")
    for name in _ABOVE_ZERO:
        v = group.get(name, 1.0)
        if not (_is_number(v) and 0 < v < math.inf):
            raise _bad_option(index, name, v, "must be a finite number > 0")
    v = group.get("dampening", 0.0)
    if not (_is_number(v) and 0 <= v <= 1):
        raise _bad_option(index, "dampening", v, "must be in [0, 1] (above 1 reverses the step)")
    v = group.get("betas", (0.0, 0.0))
    if not (
        isinstance(v, (tuple, list))
        and len(v) == 2
        and all(_is_number(b) and 0 <= b < 1 for b in v)
    ):
        raise _bad_option(index, "betas", v, "two numbers, each in [0, 1)")
    if not isinstance(group.get("nesterov", False), bool):
        raise _bad_option(index, "nesterov", group["nesterov"], "must be True or False")


def _total(t: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor's entries, accumulated and returned in at least float32."""
    return t.sum(dtype=torch.promote_types(t.dtype, torch.float32))


def _describe(L: Layer) -> str:
    return f"{L.U.shape[0]} x {L.V.shape[0]} of rank {L.U.shape[1]}"


def _lr_text(lr: Any) -> str:
    return f"{lr.item()!r} (a tensor)" if isinstance(lr, torch.Tensor) else repr(lr)


# ---------------------------------------------------------------------------
# base class
# ---------------------------------------------------------------------------


class RiemannianOptimizer(torch.optim.Optimizer):
    """Base class: groups low-rank layers into stacks, checks gradients, handles GradScaler.

    A subclass names its rule spec (``spec_class``, from :mod:`rankopt.rules`), maps param-group
    keys to spec fields (``spec_keys``; all other spec fields keep the spec's defaults) and
    implements ``_euclidean_step`` (torch's rule for ordinary parameters).

    Per step and param group, the low-rank layers with gradients are bucketed by
    ``(m, n, r, dtype, device, started)``; each bucket is stacked and moved by ONE call of the
    rule (see :mod:`rankopt.torch.stacks`). Host synchronizations per step: one for the optional
    finite check (or GradScaler's inf check); rank-adaptive rules read the new ranks, and the
    first step of adapters reads which layers got a gradient.

    **A step is taken whole or not at all.** First every param group's hyperparameters are
    checked (:func:`check_group`; the rule spec checks its own options when they change) and the
    rank options against every layer's rank budget; then every low-rank bucket's new point and
    rule state are computed into new tensors; with ``check_finite`` one synchronization checks
    the gradients, a tensor ``lr`` and all those new tensors; only then do torch's rules move
    the ordinary parameters and the new points and states get written. A step that raises
    (an invalid option, a non-finite gradient or update, an error inside the rule) leaves every
    parameter and every optimizer state as it was. Nothing is copied for this: the rules
    compute into new tensors anyway.

    Every optimizer also takes two param-group options: ``stack_layers`` (default True; False
    moves each layer by its own call of the rule: the per-layer path, same results to rounding,
    slower when many layers share a shape) and ``compile`` (default False; True, a backend name
    or ``torch.compile`` keyword arguments: each stack's fixed-rank rule step is compiled, see
    :mod:`rankopt.torch.compiled`).

    Parameters
    ----------
    params : iterable
        Parameters, or dicts defining param groups (as for any ``torch.optim`` optimizer).
    defaults : dict
        Default hyperparameters of the param groups.
    check_finite : bool
        Raise ``ValueError`` on non-finite gradients, a non-finite low-rank update (e.g. a far
        too large ``lr``) or an invalid tensor ``lr``, before anything changes (one device
        synchronization per step). Under ``torch.amp.GradScaler`` the scaler's own inf check is
        used for the gradients instead, and a step with inf/NaN gradients is skipped with a
        ``RuntimeWarning``.
    """

    _rankopt_riemannian = True
    # GradScaler hands us ``grad_scale`` / ``found_inf`` instead of skipping silently
    _step_supports_amp_scaling = True
    #: the rule spec (a class of rankopt.rules)
    spec_class: type[Rule] = Rule
    #: param-group key of each spec field that the optimizer exposes (same name unless mapped)
    spec_keys: dict[str, str] = {}
    #: how the rule uses ``rank_tol``, ``min_rank``, ``max_rank``: "retraction" (``rank_tol``
    #: makes the retraction rank-adaptive, the rank may reach min(m, n)), "budget" (DLRA:
    #: truncation within ``[min_rank, max_rank]``, ``max_rank=None``: the starting rank) or
    #: "truncation" (reference rules: ``rank_tol`` truncates, the rank never grows)
    rank_options: str = "retraction"

    def __init__(self, params: Any, defaults: dict, check_finite: bool = True) -> None:
        self.check_finite = bool(check_finite)
        self._manifolds: dict = {}
        self._stacks: dict = {}
        self._specs: dict = {}
        self._splits: dict = {}
        self._points = PointCache()
        self._compiled: dict = {}
        # the spec's hyperparameters other than lr (read once: no dataclass introspection per step)
        self._spec_names = tuple(f.name for f in fields(self.spec_class) if f.name != "lr")
        super().__init__(params, defaults)

    # -- parameter bookkeeping --------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        index, group = len(self.param_groups) - 1, self.param_groups[-1]
        try:  # a layer's U, S, V complete within one group; options valid for every layer
            self._check_group(index, group)
            layers, _ = self._split(group)
            spec = self._spec(group, index)
            for L in layers:
                self._check_rank_budget(index, spec, [L])
        except ValueError:
            self.param_groups.pop()
            raise

    def _check_group(self, index: int, group: dict) -> None:
        """The checks of :func:`check_group` (a subclass adds those of its torch rule)."""
        check_group(index, group)

    def _split(self, group: dict) -> tuple[list[Layer], list[torch.Tensor]]:
        """``(layers, ordinary)``: the (U, S, V) of each low-rank layer, and all other parameters."""
        key = tuple(id(p) for p in group["params"])
        hit = self._splits.get(id(group))
        if hit is not None and hit[0] == key:
            return hit[1]
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
        layers = []
        for d in by_link.values():
            if set(d) != {"U", "S", "V"}:
                raise ValueError(
                    "a low-rank layer's factors must be given together, in one param group: got "
                    f"only {sorted(d)} of U, S, V (pass model.parameters() or all of "
                    "layer.parameters())"
                )
            layers.append(Layer(d["U"], d["S"], d["V"]))
        self._splits[id(group)] = (key, (layers, ordinary))
        return layers, ordinary

    def _index(self, group: dict, index: int | None) -> Any:
        if index is not None:
            return index
        return next((i for i, g in enumerate(self.param_groups) if g is group), "?")

    def _spec(self, group: dict, index: int | None = None) -> Rule:
        """The rule spec with this group's hyperparameters (``lr`` is passed per step).

        Built (and so checked by the spec) when the group's values change; a ``ValueError``
        names the group.
        """
        keys = self.spec_keys
        values = tuple(
            (n, _hashable(group[keys.get(n, n)]))
            for n in self._spec_names
            if keys.get(n, n) in group
        )
        spec = self._specs.get(values)
        if spec is None:
            try:
                spec = self.spec_class(**dict(values))
            except (TypeError, ValueError) as e:
                raise ValueError(f"param group {self._index(group, index)}: {e}") from None
            self._check_rank_options(spec, self._index(group, index))
            self._specs[values] = spec
        return spec

    def _check_rank_options(self, spec: Rule, index: Any) -> None:
        """Refuse rank options that the rule would ignore (checked once per spec)."""
        if self.rank_options == "budget":  # DLRA: min_rank / max_rank act even without rank_tol
            return
        unused, why = [], ""
        if spec.rank_tol is None:
            unused = [f"min_rank={spec.min_rank!r}"] if spec.min_rank != 1 else []
            unused += [f"max_rank={spec.max_rank!r}"] if spec.max_rank is not None else []
            why = "without rank_tol the rank is fixed (set rank_tol, e.g. 1e-3, to adapt it)"
        elif self.rank_options == "truncation":
            if spec.max_rank is not None:
                unused, why = [f"max_rank={spec.max_rank!r}"], "these rules never raise the rank"
            if getattr(spec, "faithful", False) and spec.min_rank != 1:
                unused += [f"min_rank={spec.min_rank!r}"]
                why = "faithful=True keeps the authors' smallest rank, 2"
        if unused:
            raise ValueError(
                f"param group {index}: {', '.join(unused)} would be ignored by "
                f"{type(self).__name__}: {why}"
            )

    def _check_rank_budget(self, index: int, spec: Rule, layers: list[Layer]) -> None:
        """Refuse a ``min_rank`` above the rank budget of layers of one shape and rank (which the
        rule would silently clip). Python integers; a budget is only looked up (for DLRA a host
        read of the saved budget) when ``min_rank`` exceeds the layers' rank."""
        r = layers[0].U.shape[1]
        if spec.min_rank <= r:  # every budget is at least the rank, or min_rank <= max_rank
            return
        m, n = layers[0].U.shape[0], layers[0].V.shape[0]
        for L in layers:
            budget, why = self._rank_budget(spec, L, min(m, n), r)
            if budget is not None and spec.min_rank > budget:
                hint = " or set max_rank" if self.rank_options == "budget" else ""
                raise ValueError(
                    f"param group {index}: min_rank={spec.min_rank} is above the rank budget of "
                    f"the low-rank layer {_describe(L)}: {type(self).__name__} keeps its rank "
                    f"at most {budget} ({why}); lower min_rank{hint}"
                )

    def _rank_budget(self, spec: Rule, L: Layer, mn: int, r: int) -> tuple[int | None, str]:
        """The largest rank the rule may give a layer of rank ``r`` (``mn = min(m, n)``), and
        why; None where ``min_rank`` does not act."""
        if self.rank_options == "budget":
            if spec.max_rank is not None:
                return min(mn, spec.max_rank), "min(m, n, max_rank)"
            cap = (self.state.get(L.U) or {}).get("rank_cap")
            cap = r if cap is None else round(float(cap))
            return min(mn, cap), f"max_rank=None: its starting rank {cap} is its budget"
        if spec.rank_tol is None:
            return None, ""
        if self.rank_options == "truncation":
            return (None if getattr(spec, "faithful", False) else r), "the rank never grows"
        return mn, "min(m, n)"

    def _manifold(self, m: int, n: int, r: int, dtype, device) -> FixedRankManifold:
        key = (m, n, r, dtype, device)
        man = self._manifolds.get(key)
        if man is None:
            man = FixedRankManifold(
                m, n, r, backend="torch", dtype=dtype, device=device, validate=False
            )
            self._manifolds[key] = man
        return man

    def _layer_manifold(self, L: Layer) -> FixedRankManifold:
        U = L.U
        return self._manifold(U.shape[0], L.V.shape[0], U.shape[1], work_dtype(U.dtype), U.device)

    # -- the step ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One optimization step (``closure`` re-evaluates the model and returns the loss).

        Taken whole or not at all (see the class docstring): a step that raises changes no
        parameter and no optimizer state.
        """
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
        plan = self._plan()  # checks every option and rank budget; nothing is written
        if grad_scale is not None:  # GradScaler passed the scale: unscale the stacked copies
            _unscale([t for _, _, buckets, _ in plan for b in buckets for t in b[2]], grad_scale)
        updates = self._updates(plan, grad_scale is None)
        if self.check_finite:
            error = self._nonfinite(plan, updates, grads=grad_scale is None)
            if error is not None:
                raise error
        # -- from here on the step is taken: torch's rules (they may still refuse their
        # options, before they write), then the low-rank layers' new points and states
        if grad_scale is not None:
            _unscale([p.grad for _, _, _, ordinary in plan for p in ordinary], grad_scale)
        for group, _, _, ordinary in plan:
            if ordinary:
                self._euclidean_step(group, ordinary)
        for _, u in updates:
            self._commit(u)
        return loss

    def _plan(self) -> list:
        """Per group: ``(group, spec, buckets, ordinary params with grads)``; each bucket is
        ``(layers, stacked point, stacked tangent vector or sketches)``. Checks every group's
        options and the layers' rank budgets first; writes nothing."""
        plan = []
        for index, group in enumerate(self.param_groups):
            self._check_group(index, group)
            layers, ordinary = self._split(group)
            ordinary = [p for p in ordinary if p.grad is not None]
            if any(p.grad.is_sparse for p in ordinary):
                raise ValueError("sparse gradients are not supported by rankopt optimizers")
            spec = self._spec(group, index)
            buckets = []
            for key, group_layers in self._buckets(group, layers).items():
                self._check_rank_budget(index, spec, group_layers)
                wd = work_dtype(key[3])
                x = self._points.get(group_layers, wd)
                buckets.append((group_layers, x, gather_tangent(group_layers, wd)))
            plan.append((group, spec, buckets, ordinary))
        return plan

    def _buckets(self, group: dict, layers: list[Layer]) -> dict[tuple, list[Layer]]:
        """The layers with gradients by ``Layer.key`` (each its own with ``stack_layers=False``)."""
        by_key: dict[tuple, list[Layer]] = {}
        alone = not group.get("stack_layers", True)
        for L in layers:
            gs = (L.U.grad, L.S.grad, L.V.grad)
            if all(g is None for g in gs):
                continue
            if any(g is None for g in gs):
                raise ValueError("a low-rank layer's U, S, V must all have gradients or none")
            by_key.setdefault(L.key + ((id(L.U),) if alone else ()), []).append(L)
        return by_key

    def _updates(self, plan: list, grads_unchecked: bool) -> list[tuple[int, BucketUpdate]]:
        """``(group index, update)`` of every bucket: its new point and state, computed into new
        tensors (nothing is written). An error inside a rule is explained (a non-finite gradient
        or ``lr`` when ``check_finite``, the layer and ``lr`` of a failed factorization)."""
        updates = []
        for index, (group, spec, buckets, _) in enumerate(plan):
            for layers, x, xi in buckets:
                try:
                    u = self._bucket_update(group, spec, layers, x, xi)
                except Exception as e:  # nothing was written: explain, re-raise
                    better = self._explain(e, plan, index, layers, grads_unchecked)
                    if better is None:
                        raise
                    raise better from e
                if u is not None:
                    updates.append((index, u))
        return updates

    def _explain(
        self, e: Exception, plan: list, index: int, layers: list[Layer], grads: bool
    ) -> ValueError | None:
        """A clearer error for ``e``, raised by the rule step of ``layers`` (None: re-raise
        ``e``, with a note where Python supports notes)."""
        if self.check_finite:  # non-finite inputs are the likeliest cause of any failure
            error = self._nonfinite(plan, [], grads)
            if error is not None:
                return error
        where = f"the low-rank layer {_describe(layers[0])} in param group {index}"
        if isinstance(e, torch.linalg.LinAlgError):
            return ValueError(
                f"the step of {where} failed (torch.linalg.LinAlgError: {e}): its update is "
                f"not finite or ill-conditioned; lr={_lr_text(plan[index][0]['lr'])} too large? "
                "The step was not taken (no parameter or optimizer state changed)."
            )
        if hasattr(e, "add_note"):  # Python >= 3.11
            e.add_note(
                f"rankopt: raised by the step of {where}; the step was not taken (no parameter "
                "or optimizer state changed)"
            )
        return None

    def _nonfinite(self, plan: list, updates: list, grads: bool) -> ValueError | None:
        """One synchronization: None if the gradients (``grads``), every tensor ``lr`` (a
        negative one counts) and every new point and state are finite, else the error for the
        first that is not, in that order.

        Fast path: one sum over all of them (small tensors concatenated, per device); only if it
        is not finite (a non-finite entry, or finite entries whose sum overflows) are they
        checked one by one, exactly.
        """
        flat = []
        for group, _, buckets, ordinary in plan:
            if grads:
                flat += [p.grad for p in ordinary]
                flat += [t for _, _, xi in buckets for t in xi]
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                flat.append(torch.where(lr >= 0, lr, torch.nan))
        for _, u in updates:
            flat += u.tensors()
        if not flat or bool(torch.isfinite(_probe(flat))):
            return None
        return self._locate(plan, updates, grads)

    def _locate(self, plan: list, updates: list, grads: bool) -> ValueError | None:
        """The error path of :meth:`_nonfinite`: the first non-finite gradient, ``lr`` or new
        point/state, by exact checks (None if all are finite: a sum overflowed)."""
        for gi, (group, _, buckets, ordinary) in enumerate(plan):
            for p in ordinary if grads else []:
                if not _finite(p.grad):
                    return _gradient_error(p, gi)
            for layers, _, xi in buckets if grads else []:
                for k, L in enumerate(layers):
                    if not all(_finite(t[k]) for t in xi):
                        return _gradient_error(L, gi)
            lr = group["lr"]
            if isinstance(lr, torch.Tensor) and not 0 <= float(lr) < math.inf:
                return ValueError(
                    f"param group {gi}: invalid learning rate lr={_lr_text(lr)}: must be a "
                    "finite number >= 0; the step was not taken"
                )
        for gi, u in updates:
            bad = _first_bad(u)
            if bad is not None:
                k, part = bad
                return ValueError(
                    f"the step of the low-rank layer {_describe(u.layers[k])} in param group "
                    f"{gi} is not finite (inf or NaN in its new {part}): "
                    f"lr={_lr_text(plan[gi][0]['lr'])} too large? The step was not taken (no "
                    "parameter or optimizer state changed). Lower the learning rate or check the "
                    "other hyperparameters; check_finite=False disables this check."
                )
        return None

    def _bucket_update(
        self, group: dict, spec: Rule, layers: list[Layer], x, xi
    ) -> BucketUpdate | None:
        """The new point and state of one bucket (None: no layer steps), nothing written."""
        man = self._layer_manifold(layers[0])
        begun = self._begin(spec, man, layers, x, xi)
        if begun is None:
            return None
        layers, x, xi, state, stack = begun
        if group.get("compile"):
            steps = self._compiled.get(id(group))
            if steps is None:
                steps = self._compiled[id(group)] = CompiledSteps(group["compile"])
            x_new, new_state = steps.step(spec, man, x, xi, state, group["lr"])
        else:
            x_new, new_state = spec.step(man, x, xi, state, lr=group["lr"])
        return BucketUpdate(layers, x_new, new_state, stack)

    def _begin(self, spec: Rule, man, layers: list[Layer], x, xi) -> tuple | None:
        """``(layers, x, xi, state, stack)`` of the layers that step: adapters' first step
        starts them (``stack`` None, state from ``init``; None if none got a gradient), other
        layers read their state stack. Writes nothing."""
        if not layers[0].U.link.started:
            x, xi, layers = self._start(man, layers, xi)
            if not layers:
                return None
            return layers, x, xi, spec.init(man, x), None
        stack = self._stack(spec, man, layers, x)
        return layers, x, xi, stack.state(), stack

    def _stack(self, spec: Rule, man, layers: list[Layer], x) -> StateStack:
        """The layers' state stack: the bound one, or one gathered from their entries (bound
        when the step is written, :meth:`_commit`)."""
        stack = self._stacks.get(tuple(id(L.U) for L in layers))
        if stack is None or not stack.valid_for(self.state, layers):
            stack = StateStack.gather(self.state, layers, spec.init(man, x))
        return stack

    def _start(self, man, layers: list[Layer], sketches: TangentVector):
        """Adapters' first step: start points from the sketches (one host read of which
        layers got a gradient); layers with a zero sketch stay unstarted. Sets no flag (the
        step's commit does)."""
        x0, xi, ok = adapter_start(man, sketches.Up, sketches.M, sketches.Vp)
        keep = ok.tolist()
        if all(keep):
            return x0, xi, layers
        idx = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long, device=ok.device)
        pick = lambda a: a.index_select(0, idx)  # noqa: E731
        x0 = FixedRankPoint(pick(x0.U), pick(x0.s), pick(x0.V))
        xi = TangentVector(pick(xi.M), pick(xi.Up), pick(xi.Vp))
        return x0, xi, [L for L, k in zip(layers, keep, strict=True) if k]

    def _commit(self, u: BucketUpdate) -> None:
        """Write a checked update: the new points into the factors, the new states."""
        for L in u.layers:
            L.U.link.started = True
        if isinstance(u.point, list):  # rank-adaptive: each layer its own rank
            self._write_items(u.layers, u.point, u.state)
            return
        write_point(u.layers, u.point)
        if u.cache_point:
            self._points.put(u.layers, u.point)
        key = tuple(id(L.U) for L in u.layers)
        if u.stack is None:  # adapters' first step: the state starts here
            self._stacks[key] = StateStack.build(self.state, u.layers, u.state)
            return
        if not u.stack.bound:
            u.stack.bind(self.state, u.layers)
            self._stacks[key] = u.stack
        u.stack.store(u.state)

    def _write_items(self, layers: list[Layer], points: list, states: list) -> None:
        """Write per-layer results of another rank (same Parameter objects, resized)."""
        for L, x, st in zip(layers, points, states, strict=True):
            for p, new in ((L.U, x.U), (L.S, torch.diag_embed(x.s)), (L.V, x.V)):
                new = new.to(p.dtype)
                if p.shape == new.shape:
                    p.copy_(new)
                else:
                    resize_parameter_(p, new.contiguous())
            entry = self.state[L.U]
            entry.clear()
            entry.update({k: v.clone() for k, v in state_arrays(st).items()})

    # -- state_dict: per-layer entries, checked on load ---------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by ``state_dict()``; manifold entries are checked and kept in
        the layers' working dtype (not cast to the factors' dtype)."""
        params = [p for g in self.param_groups for p in g["params"]]
        manifold, rest = {}, {}
        for k, v in state_dict["state"].items():
            p = params[int(k)] if int(k) < len(params) else None
            if isinstance(p, ManifoldParameter) and p.role == "U" and isinstance(v, dict):
                manifold[int(k)] = v
            else:
                rest[k] = v
        super().load_state_dict({**state_dict, "state": rest})
        layers = {id(L.U): (L, g) for g in self.param_groups for L in self._split(g)[0]}
        for k, v in manifold.items():
            L, group = layers[id(params[k])]
            self.state[L.U] = self._checked_entries(L, group, v)
        self._stacks.clear()
        self._points.clear()

    def _checked_entries(self, L: Layer, group: dict, saved: dict) -> dict:
        man = self._layer_manifold(L)
        x = FixedRankPoint(L.U.detach(), L.S.detach().diagonal(), L.V.detach())
        expected = state_arrays(self._spec(group).init(man, x))
        rule = self.spec_class.__name__
        missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        if missing or extra:
            raise ValueError(
                f"optimizer state for a low-rank layer (m, n, r) = {tuple(x.shape) + (x.rank,)} "
                f"does not match the rule {rule}: missing {missing}, unexpected {extra} (was it "
                "saved by another optimizer?)"
            )
        out = {}
        for k, ref in expected.items():
            v = torch.as_tensor(saved[k])
            ref = torch.as_tensor(ref)
            if tuple(v.shape) != tuple(ref.shape):
                raise ValueError(
                    f"optimizer state {k!r} of a low-rank layer has shape {tuple(v.shape)}, but "
                    f"the layer (m, n, r) = {tuple(x.shape) + (x.rank,)} needs "
                    f"{tuple(ref.shape)}: load the model's state (its ranks) first, or the "
                    "state of a model with the same ranks"
                )
            out[k] = v.to(dtype=ref.dtype, device=L.U.device, copy=True)
        return out

    # -- to be implemented ---------------------------------------------------------------
    def _euclidean_step(self, group: dict, params: list) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def _hashable(v: Any) -> Any:
    """A param-group value as a key of the spec cache (a list, e.g. ``betas``, as a tuple)."""
    return tuple(v) if isinstance(v, list) else v


def _unscale(tensors: list[torch.Tensor], grad_scale: torch.Tensor) -> None:
    """Divide by GradScaler's scale in place, exactly as its ``unscale_`` does."""
    inv = grad_scale.double().reciprocal().float()
    for t in tensors:
        t.mul_(inv.to(t.device))


#: tensors up to this many entries are concatenated for one sum (a copy costs less than a kernel)
_SMALL = 4096


def _probe(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The sum of all entries of ``tensors`` (0-d; not finite if one of them is not, or if the
    sum overflows): per device, small tensors concatenated and summed once, large ones apart."""
    by_device: dict = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    parts = []
    for ts in by_device.values():
        small = [t.reshape(-1) for t in ts if t.numel() <= _SMALL]
        parts += [_total(t) for t in ts if t.numel() > _SMALL]
        if small:
            parts.append(_total(torch.cat(small)))
    dev = parts[0].device
    return sum((p.to(dev) for p in parts[1:]), parts[0])


def _finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite (one host read; the error path)."""
    return bool(torch.isfinite(t).all())


def _gradient_error(what: Any, gi: int) -> ValueError:
    if isinstance(what, Layer):
        shape = (what.U.shape[0], what.V.shape[0], what.U.shape[1])
        desc = f"a low-rank layer of shape (m, n, r) = {shape}"
    else:
        desc = f"a parameter of shape {tuple(what.shape)}"
    return ValueError(
        f"non-finite gradient (inf or NaN) in {desc} (param group {gi}); the step was not "
        "taken. Lower the learning rate, clip gradients, or use torch.amp.GradScaler (which "
        "skips such steps); check_finite=False disables this check."
    )


def _first_bad(u: BucketUpdate) -> tuple[int, str] | None:
    """The first layer of ``u`` with a non-finite new factor or state entry, and which (None if
    all are finite)."""
    for k in range(len(u.layers)):
        for name, t in u.parts(k).items():
            if not _finite(t):
                return k, name
    return None
