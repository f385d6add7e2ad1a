r"""``torch.compile`` of a rule's step on one stack of layers (the optimizers' ``compile=`` option).

The rules of :mod:`rankopt.rules` are plain tensor code, so a fixed-rank rule's step compiles
into one graph per stack shape: inductor fuses the elementwise work and drops most temporaries
and Python overhead (measured in ``benchmarks/optimizer_step.py``). Compilation costs seconds
to a minute per ``(rule, m, n, r, number of layers, dtype, device)`` at the first step; the
learning rate enters as a 0-d tensor, so schedulers do not recompile. Rank-adaptive rules read
ranks on the host and rules that need the backward's captured batch (DLRA, the reference rules)
take inputs that are not tensors: both run eagerly, and a ``RuntimeWarning`` says so once. Results agree with the eager step to rounding (the
compiled graph may order floating-point operations differently).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..containers import FixedRankPoint, TangentVector
from ..rules import Rule, state_arrays, state_from_arrays

__all__ = ["CompiledSteps"]


class CompiledSteps:
    """Compiled ``spec.step`` functions, one per rule spec and stack shape.

    Parameters
    ----------
    options : bool, str or dict
        ``True``: ``torch.compile`` with its defaults (inductor); a string: the backend name
        (e.g. ``"aot_eager"``, which traces without generating code); a dict: keyword arguments
        of ``torch.compile``.
    """

    def __init__(self, options: Any) -> None:
        if isinstance(options, str):
            options = {"backend": options}
        elif options is True:
            options = {}
        self.options = dict(options)
        self.options.setdefault("dynamic", False)
        self._fns: dict = {}
        self._told: set[str] = set()
        self.failed = False

    def step(
        self,
        spec: Rule,
        man,
        x: FixedRankPoint,
        xi: TangentVector,
        state: Any,
        lr: float,
        extra: dict | None = None,
    ):
        """``spec.step(man, x, xi, state, lr=lr, **extra)``, compiled; eager if compilation
        failed, for a rank-adaptive rule (it reads ranks on the host) and for a rule that needs
        inputs besides the tangent gradient (``extra``: the backward's batch), each said once by
        a ``RuntimeWarning``."""
        if extra or spec.rank_adaptive:
            self._eager_once(spec, "it reads ranks on the host" if spec.rank_adaptive
                             else "it needs the backward's captured batch")  # fmt: skip
            return spec.step(man, x, xi, state, lr=lr, **(extra or {}))
        if self.failed:
            return spec.step(man, x, xi, state, lr=lr)
        arrays = state_arrays(state)
        names = tuple(arrays)
        key = (spec, id(man), tuple(x.U.shape), tuple(x.V.shape), type(state), names)
        fn = self._fns.get(key)
        if fn is None:
            fn = torch.compile(_pure_step(spec, man, type(state), names), **self.options)
            self._fns[key] = fn
        lr_t = torch.as_tensor(lr, dtype=x.U.dtype, device=x.U.device)
        try:
            out = fn(x.U, x.s, x.V, xi.M, xi.Up, xi.Vp, lr_t, *(arrays[k] for k in names))
        except Exception as e:  # noqa: BLE001 - any compiler failure: fall back, say so
            warnings.warn(
                f"rankopt: torch.compile of the {type(spec).__name__} step failed "
                f"({type(e).__name__}: {e}); continuing without compiling",
                RuntimeWarning,
                stacklevel=3,
            )
            self.failed = True
            return spec.step(man, x, xi, state, lr=lr)
        y = FixedRankPoint(*out[:3])
        return y, state_from_arrays(type(state), dict(zip(names, out[3:], strict=True)))

    def _eager_once(self, spec: Rule, why: str) -> None:
        name = type(spec).__name__
        if name not in self._told:
            self._told.add(name)
            warnings.warn(
                f"rankopt: compile= is not applied to {name} ({why}); its step runs eagerly",
                RuntimeWarning,
                stacklevel=4,
            )


def _pure_step(spec: Rule, man, cls: type, names: tuple):
    """The step as a function of tensors only (what ``torch.compile`` traces)."""

    def pure(U, s, V, M, Up, Vp, lr, *flat):
        state = state_from_arrays(cls, dict(zip(names, flat, strict=True)))
        y, new = spec.step(man, FixedRankPoint(U, s, V), TangentVector(M, Up, Vp), state, lr=lr)
        arrays = state_arrays(new)
        return (y.U, y.s, y.V, *(arrays[k] for k in names))

    return pure
