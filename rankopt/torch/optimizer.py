r"""The rankopt torch optimizer: any registered rule on the low-rank layers of a model.

:class:`RiemannianOptimizer` is a ``torch.optim.Optimizer`` driven by a rule of
:mod:`rankopt.rules` (the same spec the NumPy solvers step with); the named optimizers of
:mod:`rankopt.torch.optim` are generated from it, one per registered rule. Same-shape layers are
stacked and moved by one call of their rule (:mod:`rankopt.torch.stacks`).
"""

from __future__ import annotations

import warnings
from dataclasses import fields
from typing import Any

import torch

from .. import rules
from ..containers import FixedRankPoint, TangentVector
from ..manifold import FixedRankManifold
from ..rules import Rule, state_arrays
from ..rules.registry import Registration, registration
from .captures import (
    CAPTURE_KINDS,
    clear_captures,
    extra_inputs,
    layer_captures,
    register_captures,
    split_items,
)
from .checks import (
    check_group,
    check_rank_budget,
    check_rank_options,
    describe,
    lr_text,
)
from .compiled import CompiledSteps
from .finite import nonfinite_error, unscale
from .layers import ManifoldParameter, resize_parameter_
from .ordinary import ORDINARY
from .stacks import (
    BucketUpdate,
    Layer,
    StateStack,
    gather_point,
    gather_tangent,
    work_dtype,
    write_point,
)
from .start import adapter_start

__all__ = ["RiemannianOptimizer", "optimizer_defaults", "COMMON_OPTIONS"]

#: options every rankopt optimizer takes besides its rule's and its ordinary rule's, and their
#: defaults (``check_finite`` is a constructor argument, not a param-group option)
COMMON_OPTIONS = {"foreach": None, "fused": None, "stack_layers": True, "compile": False}


def _rule_key(rule: Any) -> Any:
    if rule is None:
        raise TypeError(
            "RiemannianOptimizer needs a rule: RiemannianOptimizer(params, rankopt.rules.RAdamW, "
            "lr=...) (or use a named optimizer, rankopt.torch.RAdamW)"
        )
    return rule


def optimizer_defaults(reg: Registration, base: Rule | None, options: dict) -> dict:
    """The param-group defaults of an optimizer with the rule ``reg``: the spec's fields (from
    ``options``, else from the instance ``base``, else the spec's defaults), the ordinary rule's
    options (shared by name with the spec, fixed by the registration, or from ``options`` with
    torch's default) and :data:`COMMON_OPTIONS`. Raises ``TypeError`` naming unknown options."""
    options = dict(options)
    spec_values = {f.name: getattr(base, f.name) if base is not None else f.default
                   for f in fields(reg.spec)}  # fmt: skip
    defaults = {k: options.pop(k, v) for k, v in spec_values.items()}
    ordinary = ORDINARY[reg.ordinary]
    for key in ordinary.keys:
        if key in defaults:
            continue
        if key in reg.ordinary_fixed:
            defaults[key] = reg.ordinary_fixed[key]
        else:
            defaults[key] = options.pop(key, ordinary.default(key))
    defaults.update({k: options.pop(k, v) for k, v in COMMON_OPTIONS.items()})
    if options:
        known = sorted(defaults)
        raise TypeError(f"{reg.name} got unknown options {sorted(options)}; it takes {known}")
    if isinstance(defaults.get("betas"), list):
        defaults["betas"] = tuple(defaults["betas"])
    return defaults


class RiemannianOptimizer(torch.optim.Optimizer):
    """A ``torch.optim`` optimizer driven by a registered rule of :mod:`rankopt.rules`.

    ``RiemannianOptimizer(params, rule, **options)`` moves the low-rank layers among ``params``
    with the rule (a spec class, a spec instance whose fields give the defaults, or a registered
    name) and every other parameter with torch's rule named by the rule's registration
    (:mod:`rankopt.torch.ordinary`: AdamW, Adagrad or SGD). ``options`` are the spec's fields,
    the ordinary rule's own options (``eps``, ...) and the options below; they become the param
    groups' defaults (a param-group dict may override them). The named optimizers
    (:class:`RAdamW`, :class:`DLRAAdam`, ...) are this class with one rule each, generated from
    the registry with explicit signatures (:func:`rankopt.torch.optim.optimizer_class`).

    Per step and param group, the low-rank layers with gradients are bucketed by
    ``(m, n, r, dtype, device, started)``; each bucket is stacked and moved by ONE call of the
    rule (see :mod:`rankopt.torch.stacks`). Host synchronizations per step: one for the optional
    finite check (or GradScaler's inf check); rank-adaptive rules read the new ranks, the first
    step of adapters reads which layers got a gradient, and rules that need the backward's batch
    (:mod:`rankopt.torch.captures`) read one scale per layer.

    **A step is taken whole or not at all.** First every param group's hyperparameters are
    checked (:func:`rankopt.torch.checks.check_group`; the rule spec checks its own options when
    they change) and the rank options against every layer's rank budget; then every low-rank
    bucket's new point and rule state are computed into new tensors; with ``check_finite`` one
    synchronization checks the gradients, a tensor ``lr`` and all those new tensors; only then
    do torch's rules move the ordinary parameters and the new points and states get written. A
    step that raises (an invalid option, a non-finite gradient or update, an error inside the
    rule) leaves every parameter and every optimizer state as it was. Nothing is copied for
    this: the rules compute into new tensors anyway.

    Parameters
    ----------
    params : iterable
        Parameters, or dicts defining param groups (as for any ``torch.optim`` optimizer).
    rule : rule spec class, spec instance or registered name
        The rule of the low-rank layers (:func:`rankopt.rules.registry.registered`).
    check_finite : bool
        Raise ``ValueError`` on non-finite gradients, a non-finite low-rank update (e.g. a far
        too large ``lr``) or an invalid tensor ``lr``, before anything changes (one device
        synchronization per step). Under ``torch.amp.GradScaler`` the scaler's own inf check is
        used for the gradients instead, and a step with inf/NaN gradients is skipped with a
        ``RuntimeWarning``.
    **options
        The rule's fields, the ordinary rule's own options (see above), and the options every
        rankopt optimizer takes: ``foreach`` and ``fused`` (torch's kernels for the ordinary
        parameters; None: torch's choice); ``stack_layers`` (True: same-shape layers are
        stacked and moved by one call of the rule; False moves each layer by its own call, the
        per-layer path: the same results to rounding, slower when many layers share a shape);
        ``compile`` (False; True, a backend name or ``torch.compile`` keyword arguments: each
        stack's fixed-rank rule step is compiled, :mod:`rankopt.torch.compiled`; a rule that
        reads ranks on the host or needs the backward's batch runs eagerly, with a warning).
    """

    _rankopt_riemannian = True
    #: the rule spec (set on the named optimizers; a ``RiemannianOptimizer`` takes ``rule``)
    spec_class: type | None = None
    # GradScaler hands us ``grad_scale`` / ``found_inf`` instead of skipping silently
    _step_supports_amp_scaling = True

    def __init__(
        self, params: Any, rule: Any = None, *, check_finite: bool = True, **options: Any
    ) -> None:
        self.registration = registration(_rule_key(rule if rule is not None else self.spec_class))
        self.spec_class = self.registration.spec
        self.ordinary = ORDINARY[self.registration.ordinary]
        self.capture_kind = CAPTURE_KINDS[rules.gradient_input(self.spec_class)]
        self.check_finite = bool(check_finite)
        self._manifolds: dict = {}
        self._stacks: dict = {}
        self._specs: dict = {}
        self._splits: dict = {}
        self._compiled: dict = {}
        # the spec's hyperparameters other than lr (read once: no dataclass introspection per step)
        self._spec_names = tuple(f.name for f in fields(self.spec_class) if f.name != "lr")
        base = rule if isinstance(rule, Rule) else None
        super().__init__(params, optimizer_defaults(self.registration, base, options))

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
        if self.capture_kind is not None:
            register_captures(layers, self.capture_kind, self)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._clear_captures()

    def _clear_captures(self) -> None:
        if self.capture_kind is not None:
            for group in self.param_groups:
                clear_captures(self._split(group)[0])

    def _check_group(self, index: int, group: dict) -> None:
        """:func:`~rankopt.torch.checks.check_group` and the ordinary rule's own refusals."""
        check_group(index, group)
        if self.ordinary.check is not None:
            self.ordinary.check(index, group)

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
        values = tuple((n, _hashable(group[n])) for n in self._spec_names if n in group)
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
        check_rank_options(spec, index, type(self).__name__)

    def _check_rank_budget(self, index: int, spec: Rule, layers: list[Layer]) -> None:
        check_rank_budget(spec, index, layers, self.state, type(self).__name__)

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
            unscale([t for _, _, buckets, _ in plan for b in buckets for t in b[2]], grad_scale)
        updates = self._updates(plan, grad_scale is None)
        if self.check_finite:
            error = nonfinite_error(plan, updates, grads=grad_scale is None)
            if error is not None:
                raise error
        # -- from here on the step is taken: torch's rules (they may still refuse their
        # options, before they write), then the low-rank layers' new points and states
        if grad_scale is not None:
            unscale([p.grad for _, _, _, ordinary in plan for p in ordinary], grad_scale)
        for group, _, _, ordinary in plan:
            if ordinary:
                self._euclidean_step(group, ordinary)
        for _, u in updates:
            self._commit(u)
        self._clear_captures()  # consumed (a step that raised keeps them, with the gradients)
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
                x = gather_point(group_layers, wd)
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
            error = nonfinite_error(plan, [], grads)
            if error is not None:
                return error
        where = f"the low-rank layer {describe(layers[0])} in param group {index}"
        if isinstance(e, torch.linalg.LinAlgError):
            return ValueError(
                f"the step of {where} failed (torch.linalg.LinAlgError: {e}): its update is "
                f"not finite or ill-conditioned; lr={lr_text(plan[index][0]['lr'])} too large? "
                "The step was not taken (no parameter or optimizer state changed)."
            )
        if hasattr(e, "add_note"):  # Python >= 3.11
            e.add_note(
                f"rankopt: raised by the step of {where}; the step was not taken (no parameter "
                "or optimizer state changed)"
            )
        return None

    def _bucket_update(
        self, group: dict, spec: Rule, layers: list[Layer], x, xi
    ) -> BucketUpdate | None:
        """The new point and state of one bucket (None: no layer steps), nothing written."""
        caps = None
        if self.capture_kind is not None:
            inv = getattr(self, "grad_scale", None)
            default = 1.0 if inv is None else float(inv.double().reciprocal())
            started = layers[0].U.link.started
            found = layer_captures(layers, x, xi, started, default, type(self).__name__)
            caps = {id(L): c for L, c in zip(layers, found, strict=True)}
        man = self._layer_manifold(layers[0])
        begun = self._begin(spec, man, layers, x, xi)
        if begun is None:
            return None
        layers, x, xi, state, stack = begun
        if caps is not None:
            extra = extra_inputs(spec, [caps[id(L)] for L in layers], x)
            x_new, new_state = self._rule_step(group, spec, man, x, xi, state, extra)
        else:
            x_new, new_state = self._rule_step(group, spec, man, x, xi, state, {})
        if not isinstance(x_new, list) and x_new.rank != x.rank:
            x_new, new_state = split_items(x_new, new_state)
        return BucketUpdate(layers, x_new, new_state, stack)

    def _rule_step(self, group: dict, spec: Rule, man, x, xi, state, extra: dict) -> tuple:
        """``spec.step``, compiled when the group asks for it (:mod:`rankopt.torch.compiled`)."""
        if not group.get("compile"):
            return spec.step(man, x, xi, state, lr=group["lr"], **extra)
        steps = self._compiled.get(id(group))
        if steps is None:
            steps = self._compiled[id(group)] = CompiledSteps(group["compile"])
        return steps.step(spec, man, x, xi, state, group["lr"], extra)

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

    def _checked_entries(self, L: Layer, group: dict, saved: dict) -> dict:
        man = self._layer_manifold(L)
        x = FixedRankPoint(L.U.detach(), L.S.detach().diagonal(), L.V.detach())
        expected = state_arrays(self._spec(group).init(man, x))
        rule = self.registration.name
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

    def _euclidean_step(self, group: dict, params: list) -> None:
        """torch's rule of the ordinary parameters (:mod:`rankopt.torch.ordinary`)."""
        self.ordinary.step(self, group, params)


def _hashable(v: Any) -> Any:
    """A param-group value as a key of the spec cache (a list, e.g. ``betas``, as a tuple)."""
    return tuple(v) if isinstance(v, list) else v
