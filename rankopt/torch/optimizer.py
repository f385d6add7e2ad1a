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
from ..containers import TangentVector
from ..manifold import FixedRankManifold
from ..rules import Rule, state_arrays
from ..rules.registry import registration
from .captures import (
    CAPTURE_KINDS,
    clear_captures,
    extra_inputs,
    layer_captures,
    register_captures,
    split_items,
)
from .checks import (
    COMMON_OPTIONS,
    check_group,
    check_rank_budget,
    check_rank_options,
    optimizer_defaults,
)
from .compiled import CompiledSteps
from .finite import (
    finite_gate,
    finite_inputs,
    nonfinite_error,
    register_locator,
    rule_error,
    unscale,
)
from .layers import ManifoldParameter
from .ordinary import ORDINARY
from .sharded import any_sharded, check_fixed_rank, check_same_rank, gather_full
from .stacks import (
    BucketUpdate,
    Layer,
    StateStack,
    checked_entries,
    gather_point,
    gather_tangent,
    pick_items,
    template_point,
    work_dtype,
    write_items,
    write_point,
)
from .start import adapter_start

__all__ = ["RiemannianOptimizer", "optimizer_defaults", "COMMON_OPTIONS"]


def _rule_key(rule: Any) -> Any:
    if rule is None:
        raise TypeError(
            "RiemannianOptimizer needs a rule: RiemannianOptimizer(params, rankopt.rules.RAdamW, "
            "lr=...) (or use a named optimizer, rankopt.torch.RAdamW)"
        )
    return rule


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
    (:mod:`rankopt.torch.captures`) read one scale per layer. Under ``torch.compile(opt.step)``
    the updates that read the host run eagerly, the rest compiled (:meth:`_updates`).

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
        #: the key of this optimizer's eager error locator (the compiled finite check's callback)
        self._locator = register_locator(self._located_error)
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
        check_fixed_rank(spec, layers, index, type(self).__name__)  # FSDP2: fixed shapes

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
        updates, grads = self._prepare(plan)
        if self.check_finite:
            updates = self._finite(plan, updates, grads)
        # -- from here on the step is taken: torch's rules (they may still refuse their
        # options, before they write), then the low-rank layers' new points and states
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is not None:
            unscale([p.grad for _, _, _, ordinary in plan for p in ordinary], grad_scale)
        for index, (_, _, _, ordinary) in enumerate(plan):
            if ordinary:
                self._euclidean_step(index)
        for _, u in updates:
            self._commit(u)
        resized = [u for _, u in updates if isinstance(u.point, list)]
        if resized:  # one call outside the loop: a compiled step breaks its graph once here
            write_items(resized, self.state)
        if any(u.stack is None and u.layers for _, u in updates):
            self._restack()  # adapters started
        self._clear_captures()  # consumed (a step that raised keeps them, with the gradients)
        return loss

    def _prepare(self, plan: list) -> tuple[list, bool]:
        """``(updates, grads)`` of the step (:meth:`_updates`; ``grads``: whether the finite
        check reads the gradients, False when GradScaler checked them, whose scale is then
        divided out of the stacked copies). Writes nothing."""
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is not None:
            unscale([t for _, _, buckets, _ in plan for b in buckets for t in b[2]], grad_scale)
        elif self.check_finite and torch.compiler.is_compiling():
            plan = finite_inputs(plan)  # compiled: non-finite gradients reach no factorization
        return self._updates(plan, grad_scale is None), grad_scale is None

    def _finite(self, plan: list, updates: list, grads: bool) -> list:
        """The finite check (a ``ValueError`` before anything is written). Under
        ``torch.compile``: an operator of the graph (:func:`~rankopt.torch.finite.finite_gate`)
        whose result every write depends on: the new points and states, and the ordinary
        parameters' gradients that torch's rules read (multiplied by True: the same values)."""
        if not torch.compiler.is_compiling():
            error = nonfinite_error(plan, updates, grads)
            if error is not None:
                raise error
            return updates
        ok = finite_gate(plan, updates, grads, self._locator)
        for _, _, _, ordinary in plan:
            for p in ordinary:
                p.grad.mul_(ok)
        return [(index, u.gated(ok)) for index, u in updates]

    def _located_error(self) -> ValueError | None:
        """The eager finite check of the step about to be taken (the compiled check's locator)."""
        plan = self._plan()
        updates, grads = self._prepare(plan)
        return nonfinite_error(plan, updates, grads)

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
            buckets = list(self._buckets(group, layers).values())
            for group_layers in buckets:
                self._check_rank_budget(index, spec, group_layers)
            plan.append((group, spec, buckets, ordinary))
        full = self._gathered([L for _, _, buckets, _ in plan for b in buckets for L in b])
        out = []
        for group, spec, buckets, ordinary in plan:
            stacked = []
            for ls in buckets:
                wd = work_dtype(ls[0].U.dtype)
                stacked.append((ls, gather_point(ls, wd, full), gather_tangent(ls, wd, full)))
            out.append((group, spec, stacked, ordinary))
        return out

    def _gathered(self, layers: list[Layer]) -> Any:
        """None, or for FSDP2-sharded factors a map to their whole tensors and gradients (one
        all-gather, :func:`~rankopt.torch.sharded.gather_full`)."""
        tensors = [t for L in layers for p in (L.U, L.S, L.V) for t in (p, p.grad)]
        if not any_sharded(tensors):
            return None
        found = gather_full(tensors)
        return lambda t: found.get(id(t), t)

    def _buckets(self, group: dict, layers: list[Layer], grads: bool = True) -> dict:
        """The layers with gradients (``grads=False``: all) by ``Layer.key`` (each its own with
        ``stack_layers=False``)."""
        by_key: dict[tuple, list[Layer]] = {}
        alone = not group.get("stack_layers", True)
        for L in layers:
            gs = (L.U.grad, L.S.grad, L.V.grad)
            if grads and all(g is None for g in gs):
                continue
            if grads and any(g is None for g in gs):
                raise ValueError("a low-rank layer's U, S, V must all have gradients or none")
            by_key.setdefault(L.key + ((id(L.U),) if alone else ()), []).append(L)
        return by_key

    def _updates(self, plan: list, grads_unchecked: bool) -> list[tuple[int, BucketUpdate]]:
        """``(group index, update)`` of every bucket: its new point and state, computed into new
        tensors (nothing is written). In a compiled step the buckets whose update reads the host
        (:meth:`_reads_host`) are computed first, eagerly, by one call outside any loop (one
        graph break, after which Dynamo resumes; nothing in it to recompile)."""
        host = [(i, k) for i, (_, spec, buckets, _) in enumerate(plan)
                for k, (layers, _, _) in enumerate(buckets) if self._reads_host(spec, layers)]  # fmt: skip
        early = self._eager_updates(plan, host, grads_unchecked) if host and _compiling() else {}
        updates = []
        for index, (_, _, buckets, _) in enumerate(plan):
            for k, (layers, x, xi) in enumerate(buckets):
                if (index, k) in early:
                    u = early[(index, k)]
                else:
                    u = self._explained_update(plan, index, layers, x, xi, grads_unchecked)
                if u is not None:
                    if u.layers:  # FSDP2: the shapes of sharded layers are fixed
                        ranks = [p.rank for p in u.point] if isinstance(u.point, list) else []
                        check_same_rank(u.layers, x.rank, ranks or [u.point.rank], index)
                    updates.append((index, u))
        return updates

    @torch.compiler.disable
    def _eager_updates(self, plan: list, which: list, grads_unchecked: bool) -> dict:
        """``{(group index, bucket index): update}`` of the buckets ``which``, eagerly."""
        return {(i, k): self._explained_update(plan, i, *plan[i][2][k], grads_unchecked)
                for i, k in which}  # fmt: skip

    def _explained_update(
        self, plan: list, index: int, layers: list[Layer], x, xi, grads_unchecked: bool
    ) -> BucketUpdate | None:
        """:meth:`_bucket_update` of a bucket of param group ``index``; an error inside the rule
        is explained (a non-finite gradient or ``lr`` when ``check_finite``, the layer and
        ``lr`` of a failed factorization) and re-raised (nothing was written)."""
        group, spec = plan[index][0], plan[index][1]
        try:
            return self._bucket_update(group, spec, layers, x, xi)
        except Exception as e:
            better = rule_error(e, plan, index, layers, grads_unchecked, self.check_finite)
            if better is None:
                raise
            raise better from e

    def _reads_host(self, spec: Rule, layers: list[Layer]) -> bool:
        """Whether a bucket's update reads values on the host: adapters' first step (which got a
        gradient), a rank-adaptive rule (the new ranks), captured batches (one scale per layer)."""
        return not layers[0].U.link.started or spec.rank_adaptive or self.capture_kind is not None

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
        layers, x, xi, state, stack, idle = self._begin(spec, man, layers, x, xi)
        if not layers:  # adapters without a gradient: they only get their state entries
            return BucketUpdate([], None, None, None, idle) if idle[0] else None
        if caps is not None:
            extra = extra_inputs(spec, [caps[id(L)] for L in layers], x)
            x_new, new_state = self._rule_step(group, spec, man, x, xi, state, extra)
        else:
            x_new, new_state = self._rule_step(group, spec, man, x, xi, state, {})
        if not isinstance(x_new, list) and x_new.rank != x.rank:
            x_new, new_state = split_items(x_new, new_state)
        return BucketUpdate(layers, x_new, new_state, stack, idle)

    def _rule_step(self, group: dict, spec: Rule, man, x, xi, state, extra: dict) -> tuple:
        """``spec.step``, compiled when the group asks for it (:mod:`rankopt.torch.compiled`)."""
        if not group.get("compile"):
            return spec.step(man, x, xi, state, lr=group["lr"], **extra)
        steps = self._compiled.get(id(group))
        if steps is None:
            steps = self._compiled[id(group)] = CompiledSteps(group["compile"])
        return steps.step(spec, man, x, xi, state, group["lr"], extra)

    def _begin(self, spec: Rule, man, layers: list[Layer], x, xi) -> tuple:
        """``(layers, x, xi, state, stack, idle)`` of the layers that step: adapters' first step
        starts them (``stack`` None, state from ``init``; ``idle``: those without a gradient, and
        the ``init`` state of their points), other layers read their state stack. Writes
        nothing."""
        if not layers[0].U.link.started:
            x0, xi, on, off = self._start(man, layers, xi)
            idle = ([layers[i] for i in off], spec.init(man, pick_items(x, off)) if off else None)
            if not on:
                return [], None, None, None, None, idle
            return [layers[i] for i in on], x0, xi, spec.init(man, x0), None, idle
        stack = self._stack(spec, man, layers, x)
        return layers, x, xi, stack.state(), stack, ([], None)

    def _restack(self) -> None:
        """Bind a state stack to each bucket of started layers (adapters that started join the
        layers of their shape): the next step reads the stacks it keeps (compiles no more)."""
        for index, group in enumerate(self.param_groups):
            for ls in self._buckets(group, self._split(group)[0], grads=False).values():
                key = tuple(id(L.U) for L in ls)
                if key in self._stacks or not all(self.state.get(L.U) for L in ls):
                    continue
                init = self._spec(group, index).init(
                    self._layer_manifold(ls[0]), template_point(ls[0], (len(ls),))
                )
                self._stacks[key] = StateStack.build(self.state, ls, init)

    def _stack(self, spec: Rule, man, layers: list[Layer], x) -> StateStack:
        """The layers' state stack: the bound one, or one gathered from their entries (bound
        when the step is written, :meth:`_commit`)."""
        stack = self._stacks.get(tuple(id(L.U) for L in layers))
        if stack is None or not stack.valid_for(self.state, layers):
            stack = StateStack.gather(self.state, layers, spec.init(man, x))
        return stack

    def _start(self, man, layers: list[Layer], sketches: TangentVector) -> tuple:
        """Adapters' first step: ``(x0, xi, on, off)``, the start points from the sketches of
        the layers ``on`` (indices), and the indices ``off`` of the layers with a zero sketch
        (they stay unstarted). One host read (which layers got a gradient); sets no flag (the
        step's commit does)."""
        x0, xi, ok = adapter_start(man, sketches.Up, sketches.M, sketches.Vp)
        keep = ok.tolist()
        on = [i for i, k in enumerate(keep) if k]
        off = [i for i, k in enumerate(keep) if not k]
        if not off:
            return x0, xi, on, off
        x0 = pick_items(x0, on)
        xi = pick_items(xi, on)
        return x0, xi, on, off

    def _commit(self, u: BucketUpdate) -> None:
        """Write a checked update: the new points into the factors, the new states (and the
        ``init`` entries of idle adapters that have none: a state_dict template, e.g. of
        ``torch.distributed.checkpoint``, then holds every layer)."""
        idle, init = u.idle
        for k, L in enumerate(idle):
            if not self.state.get(L.U):
                self.state[L.U] = {n: v[k].clone() for n, v in state_arrays(init).items()}
        for L in (*idle, *u.layers):  # S, V: empty entries (a stepped parameter has one)
            self.state.setdefault(L.S, {})
            self.state.setdefault(L.V, {})
        if not u.layers:
            return
        for L in u.layers:
            L.U.link.started = True
        if isinstance(u.point, list):  # rank-adaptive: each layer its own rank (write_items)
            return
        write_point(u.layers, u.point)
        key = tuple(id(L.U) for L in u.layers)
        if u.stack is None:  # adapters' first step: the state starts here
            self._stacks[key] = StateStack.fresh(self.state, u.layers, u.state)
            return
        if not u.stack.bound:
            u.stack.bind(self.state, u.layers)
            self._stacks[key] = u.stack
        u.stack.store(u.state)

    # -- state_dict: per-layer entries, checked on load ---------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by ``state_dict()``; manifold entries are checked and kept in
        the layers' working dtype (not cast to the factors' dtype). Parameters are matched as
        torch does, by their order in the saved param groups (their keys may be indices or, from
        ``torch.distributed.checkpoint``'s state-dict API, names)."""
        saved = [k for g in state_dict["param_groups"] for k in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_key = dict(zip(saved, params, strict=False))  # torch's load checks the lengths
        manifold, rest = {}, {}
        for k, v in state_dict["state"].items():
            p = by_key.get(k)
            if isinstance(p, ManifoldParameter) and p.role == "U" and isinstance(v, dict):
                manifold[k] = v
            else:
                rest[k] = v
        super().load_state_dict({**state_dict, "state": rest})
        layers = {id(L.U): (L, g) for g in self.param_groups for L in self._split(g)[0]}
        for k, v in manifold.items():
            L, group = layers[id(by_key[k])]
            self.state[L.U] = self._checked_entries(L, group, v)
        self._stacks.clear()

    def _checked_entries(self, L: Layer, group: dict, saved: dict) -> dict:
        x = template_point(L)
        expected = state_arrays(self._spec(group).init(self._layer_manifold(L), x))
        mnr = (x.shape[0], x.shape[1], x.rank)
        return checked_entries(expected, saved, mnr, self.registration.name, L.U.device)

    def _euclidean_step(self, index: int) -> None:
        """torch's rule (:mod:`rankopt.torch.ordinary`) of the param group ``index``'s ordinary
        parameters with gradients, read from ``param_groups``: a compiled step that resumes after
        a graph break guards them as ``.grad`` of the parameters, not by identity (which
        ``zero_grad(set_to_none=True)`` breaks at every step)."""
        group = self.param_groups[index]
        params = [p for p in self._split(group)[1] if p.grad is not None]
        self.ordinary.step(self, group, params)


def _compiling() -> bool:
    """Whether Dynamo is tracing the step (``torch.compile(opt.step)``)."""
    return torch.compiler.is_compiling()


def _hashable(v: Any) -> Any:
    """A param-group value as a key of the spec cache (a list, e.g. ``betas``, as a tuple)."""
    return tuple(v) if isinstance(v, list) else v
