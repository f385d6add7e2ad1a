r"""Base class of the rankopt torch optimizers, the adapter start, and the plain-optimizer guard.

See :mod:`rankopt.torch.optim` for the optimizers and :mod:`rankopt.torch.stacks` for how
same-shape layers are stacked and moved by one call of their rule.
"""

from __future__ import annotations

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
from .stacks import Layer, PointCache, StateStack, gather_tangent, work_dtype, write_point

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
        Raise ``ValueError`` on non-finite gradients before anything changes (one device
        synchronization per step). Under ``torch.amp.GradScaler`` the scaler's own inf check is
        used instead, and a step with inf/NaN gradients is skipped with a ``RuntimeWarning``.
    """

    _rankopt_riemannian = True
    # GradScaler hands us ``grad_scale`` / ``found_inf`` instead of skipping silently
    _step_supports_amp_scaling = True
    #: the rule spec (a class of rankopt.rules)
    spec_class: type[Rule] = Rule
    #: param-group key of each spec field that the optimizer exposes (same name unless mapped)
    spec_keys: dict[str, str] = {}

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
        try:  # a layer's U, S, V must be complete within one group; hyperparameters valid
            self._split(self.param_groups[-1])
            self._spec(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

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

    def _spec(self, group: dict) -> Rule:
        """The rule spec with this group's hyperparameters (``lr`` is passed per step)."""
        names = self._spec_names
        values = tuple(
            (n, group[self.spec_keys.get(n, n)]) for n in names if self.spec_keys.get(n, n) in group
        )
        spec = self._specs.get(values)
        if spec is None:
            spec = self.spec_class(lr=group["lr"], **dict(values))
            self._specs[values] = spec
        return spec

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
        plan = self._plan()
        if grad_scale is not None:  # GradScaler passed the scale instead of unscaling
            grads = [p.grad for _, _, _, ordinary in plan for p in ordinary]
            grads += [t for _, _, buckets, _ in plan for b in buckets for t in b[2]]
            inv = grad_scale.double().reciprocal().float()
            for gr in grads:
                gr.mul_(inv.to(gr.device))
        elif self.check_finite:
            self._raise_if_nonfinite(plan)
        for group, spec, buckets, ordinary in plan:
            if ordinary:
                self._euclidean_step(group, ordinary)
            for layers, x, xi in buckets:
                self._bucket_step(group, spec, layers, x, xi)
        return loss

    def _plan(self) -> list:
        """Per group: ``(group, spec, buckets, ordinary params with grads)``; each bucket is
        ``(layers, stacked point, stacked tangent vector or sketches)``."""
        plan = []
        for group in self.param_groups:
            layers, ordinary = self._split(group)
            ordinary = [p for p in ordinary if p.grad is not None]
            if any(p.grad.is_sparse for p in ordinary):
                raise ValueError("sparse gradients are not supported by rankopt optimizers")
            by_key: dict[tuple, list[Layer]] = {}
            alone = not group.get("stack_layers", True)
            for L in layers:
                gs = (L.U.grad, L.S.grad, L.V.grad)
                if all(g is None for g in gs):
                    continue
                if any(g is None for g in gs):
                    raise ValueError("a low-rank layer's U, S, V must all have gradients or none")
                by_key.setdefault(L.key + ((id(L.U),) if alone else ()), []).append(L)
            buckets = []
            for key, group_layers in by_key.items():
                wd = work_dtype(key[3])
                x = self._points.get(group_layers, wd)
                buckets.append((group_layers, x, gather_tangent(group_layers, wd)))
            plan.append((group, self._spec(group), buckets, ordinary))
        return plan

    def _raise_if_nonfinite(self, plan: list) -> None:
        """One synchronization: every gradient finite, else ``ValueError`` naming the first bad one.

        Reads each gradient once (a sum per low-rank layer and per parameter; a gradient whose
        entries are finite but whose sum overflows, |entries| ~ 1e38 in float32, counts as
        non-finite). The stacked sketches/tangent pieces of a bucket give one sum per layer.
        """
        sums, where = [], []
        for gi, (_, _, buckets, ordinary) in enumerate(plan):
            for p in ordinary:
                sums.append(p.grad.sum().reshape(1).float())
                where.append((gi, p))
            for layers, _, xi in buckets:
                sums.append(
                    (xi.M.sum((-2, -1)) + xi.Up.sum((-2, -1)) + xi.Vp.sum((-2, -1))).float()
                )
                where.extend((gi, L) for L in layers)
        if not sums:
            return
        dev = sums[0].device
        ok = torch.isfinite(torch.cat([t.to(dev) for t in sums]))
        if bool(ok.all()):
            return
        gi, what = where[int((~ok).nonzero()[0, 0])]
        if isinstance(what, Layer):
            shape = (what.U.shape[0], what.V.shape[0], what.U.shape[1])
            desc = f"a low-rank layer of shape (m, n, r) = {shape}"
        else:
            desc = f"a parameter of shape {tuple(what.shape)}"
        raise ValueError(
            f"non-finite gradient (inf or NaN) in {desc} (param group {gi}); the step was not "
            "taken. Lower the learning rate, clip gradients, or use torch.amp.GradScaler (which "
            "skips such steps); check_finite=False disables this check."
        )

    def _bucket_step(self, group: dict, spec: Rule, layers: list[Layer], x, xi) -> None:
        man = self._layer_manifold(layers[0])
        if not layers[0].U.link.started:
            x, xi, layers = self._start(man, layers, xi)
            if not layers:
                return
            state = spec.init(man, x)
            stack = None
        else:
            stack = self._stack(spec, man, layers, x)
            state = stack.state()
        if group.get("compile"):
            steps = self._compiled.get(id(group))
            if steps is None:
                steps = self._compiled[id(group)] = CompiledSteps(group["compile"])
            x_new, new_state = steps.step(spec, man, x, xi, state, group["lr"])
        else:
            x_new, new_state = spec.step(man, x, xi, state, lr=group["lr"])
        if isinstance(x_new, list):  # rank-adaptive: each layer its own rank
            self._write_items(layers, x_new, new_state)
            return
        write_point(layers, x_new)
        self._points.put(layers, x_new)
        if stack is None:
            self._stacks[tuple(id(L.U) for L in layers)] = StateStack.build(
                self.state, layers, new_state
            )
        else:
            stack.store(new_state)

    def _stack(self, spec: Rule, man, layers: list[Layer], x) -> StateStack:
        key = tuple(id(L.U) for L in layers)
        stack = self._stacks.get(key)
        if stack is None or not stack.valid_for(self.state, layers):
            stack = StateStack.build(self.state, layers, spec.init(man, x))
            self._stacks[key] = stack
        return stack

    def _start(self, man, layers: list[Layer], sketches: TangentVector):
        """Adapters' first step: start points from the sketches (one host read of which
        layers got a gradient); layers with a zero sketch stay unstarted."""
        x0, xi, ok = adapter_start(man, sketches.Up, sketches.M, sketches.Vp)
        keep = ok.tolist()
        for L, k in zip(layers, keep, strict=True):
            L.U.link.started = bool(k) or L.U.link.started
        if all(keep):
            return x0, xi, layers
        idx = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long, device=ok.device)
        pick = lambda a: a.index_select(0, idx)  # noqa: E731
        x0 = FixedRankPoint(pick(x0.U), pick(x0.s), pick(x0.V))
        xi = TangentVector(pick(xi.M), pick(xi.Up), pick(xi.Vp))
        return x0, xi, [L for L, k in zip(layers, keep, strict=True) if k]

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
