"""One declaration per rule: a rule spec and its registration are all a rule needs.

A toy rule defined here, with no other code, gets a NumPy solver, a ``rankopt.solve`` method and
a torch optimizer (signature, defaults, docstring from its spec), each of which runs; a
registration refuses what would make the front ends wrong (an undocumented field, a clashing
method name, an unknown ordinary rule).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import rankopt as ro
from rankopt.problems import random_completion
from rankopt.rules import Rule, registry
from rankopt.rules.base import check_common, count_init, retract, state


@state
class ToyState:
    """State of :class:`ToyScaledSGD`: the step count."""

    count: Any


@dataclass(frozen=True, kw_only=True)
class ToyScaledSGD(Rule):
    """A toy rule: Riemannian SGD with its step scaled by a factor.

    Parameters
    ----------
    lr : float
        Learning rate.
    scale : float
        Factor of every step.
    """

    lr: float = 0.1
    scale: float = 1.0

    def __post_init__(self) -> None:
        check_common(self)

    def init(self, manifold, x) -> ToyState:
        return ToyState(count_init(manifold, x))

    def step(self, manifold, x, grad, st: ToyState, *, lr: Any = None):
        lr = self.lr if lr is None else lr
        return retract(self, manifold, x, grad, -lr * self.scale), ToyState(st.count + 1)


@pytest.fixture
def toy():
    registry.register(ToyScaledSGD, method="toy-scaled-sgd", ordinary="sgd")
    yield ToyScaledSGD
    registry.unregister("ToyScaledSGD")


def test_a_registered_rule_is_a_solve_method_and_a_numpy_solver(toy):
    p = random_completion(60, 50, 3, oversampling=4, seed=0)
    cls = ro.solvers.solver_class(toy)
    sig = inspect.signature(cls).parameters
    assert sig["scale"].default == 1.0 and sig["lr"].default == 0.1 and "max_iter" in sig
    assert "scale : float" in cls.__doc__ and "Factor of every step." in cls.__doc__
    assert "toy-scaled-sgd" in ro.solvers.METHODS and ro.solvers.METHODS["toy-scaled-sgd"] is cls
    assert "scale" in ro.solvers.method_options("toy-scaled-sgd")
    x0 = p.spectral_init(3, seed=0)
    res = cls(lr=0.5, scale=0.5, max_iter=30).run(p, x0)
    with pytest.warns(ro.solvers.ConvergenceWarning, match="toy-scaled-sgd"):
        res2 = ro.solve(p, 3, method="toy-scaled-sgd", lr=0.5, scale=0.5, max_iter=30, x0=x0)
    assert res.history.cost[-1] < 0.5 * res.history.cost[0]
    np.testing.assert_allclose(res.point.to_dense(), res2.point.to_dense(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="unknown options"):
        cls(learning_rate=0.1)


def test_a_registered_rule_is_a_torch_optimizer(toy):
    torch = pytest.importorskip("torch", reason="PyTorch not installed")
    import rankopt.torch as rt

    cls = rt.optimizer_class(toy)
    sig = inspect.signature(cls).parameters
    assert list(sig)[:6] == ["params", "lr", "momentum", "dampening", "weight_decay", "nesterov"]
    assert sig["scale"].default == 1.0 and sig["scale"].kind is inspect.Parameter.KEYWORD_ONLY
    assert "scale : float" in cls.__doc__ and cls.__mro__[1] is rt.RiemannianOptimizer

    def train(make):
        torch.manual_seed(0)
        layer = rt.LowRankLinear(8, 6, 2, dtype=torch.float64, seed=0)
        opt = make(layer.parameters())
        x, t = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 6, dtype=torch.float64)
        losses = []
        for _ in range(20):
            opt.zero_grad()
            loss = ((layer(x) - t) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return layer, losses

    layer, losses = train(lambda ps: cls(ps, lr=0.2, scale=0.5))
    generic, _ = train(lambda ps: rt.RiemannianOptimizer(ps, toy, lr=0.2, scale=0.5))
    assert losses[-1] < 0.7 * losses[0]
    assert torch.allclose(layer.delta_weight(), generic.delta_weight(), rtol=0, atol=1e-14)
    assert torch.equal(layer.bias, generic.bias)  # torch's SGD moved the bias in both


def test_registration_refuses_what_would_make_the_front_ends_wrong():
    @dataclass(frozen=True, kw_only=True)
    class Undocumented(Rule):
        """No Parameters section."""

        lr: float = 0.1

    with pytest.raises(ValueError, match=r"fields \['lr'\] have no documentation"):
        registry.register(Undocumented, method="undocumented", ordinary="sgd")
    with pytest.raises(ValueError, match="already registered for RAdamW"):
        registry.register(ToyScaledSGD, method="radamw", ordinary="sgd")
    with pytest.raises(ValueError, match="ordinary="):
        registry.register(ToyScaledSGD, method="toy", ordinary="lion")
    with pytest.raises(ValueError, match="lower case"):
        registry.register(ToyScaledSGD, method="Toy_SGD", ordinary="sgd")
    assert all(r.spec is not ToyScaledSGD for r in registry.registered())


@pytest.mark.parametrize("reg", registry.registered(), ids=lambda r: r.name)
def test_every_shipped_rule_documents_every_field(reg):
    docs = registry.field_docs(reg.spec)
    for name, (kind, text) in ((f, docs[f]) for f in reg.spec.hyperparameters()):
        assert kind and len(text) > 10, (reg.name, name)
