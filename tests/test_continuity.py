r"""Every torch optimizer's step is a continuous function of the point and the gradient, and does
not depend on how the point is factored (float64).

* **Continuity.** A relative change ``DELTA = 1e-13`` of the point (its singular values and its
  left singular vectors) or of the gradient (the inputs of every batch) moves the weights after
  three steps by at most ``CONTINUITY_GAIN * DELTA`` relative (the conftest constant, which the
  equality tests of two computation paths derive their tolerance from). The cases are where a
  discontinuity hides: gradients of rank below the layer's rank (summed outputs, a pooled
  convolution, a batch smaller than the rank, dead inputs and unused outputs), small shapes with
  ``m - r = 1``, adapters from their start (``S = 0``), and starts with equal singular values.
* **Factorization invariance.** The same matrix given by other factors (signs of the singular
  vector pairs, their order, and a rotation within equal singular values) gives the same
  weights after one and three steps, to ``INVARIANCE_RTOL`` relative.

The rank-adaptive optimizers (DLRA) keep the rank decisions of both runs equal here: the cases
sit far from a truncation threshold, and a test fails if a rank differs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import CONTINUITY_GAIN, INVARIANCE_RTOL

torch = pytest.importorskip("torch", reason="PyTorch not installed (pip install -e '.[torch]')")
from torch import nn  # noqa: E402

import rankopt as ro  # noqa: E402
import rankopt.torch as rt  # noqa: E402
from rankopt import rules  # noqa: E402

D = torch.float64
DELTA = 1e-13
STEPS = 3

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: every torch optimizer of rankopt, with settings that exercise its options
OPTIMIZERS = {
    "RAdamW": (rt.RAdamW, dict(lr=0.02, weight_decay=0.1)),
    "RAdaGrad": (rt.RAdaGrad, dict(lr=0.05, lr_decay=0.1)),
    "RSGD": (rt.RSGD, dict(lr=0.05, momentum=0.9)),
    "RHeavyBall": (rt.RHeavyBall, dict(lr=0.05, nesterov=True)),
    # Muon's Newton-Schulz: the paper's exact matrix sign is discontinuous (tests/test_riemannion.py)
    "Riemannion": (rt.Riemannion, dict(lr=0.05, weight_decay=0.1, ns_steps=5)),
    "DLRAAdam": (rt.DLRAAdam, dict(lr=0.02, rank_tol=1e-3)),
    "DLRAHeavyBall": (rt.DLRAHeavyBall, dict(lr=0.05, rank_tol=1e-3)),
    "ReferenceRAdamW": (rt.ReferenceRAdamW, dict(lr=0.01)),
    "ReferenceRAdaGrad": (rt.ReferenceRAdaGrad, dict(lr=0.05)),
    "RAdamWElementwise": (rt.RAdamWElementwise, dict(lr=0.01, cg_tol=1e-13, cg_maxiter=200)),
}


def test_every_optimizer_is_covered():
    """A new torch optimizer must be added to OPTIMIZERS (and so to every test here)."""
    ours = {
        name
        for name in rt.__all__
        if isinstance(getattr(rt, name), type)
        and issubclass(getattr(rt, name), torch.optim.Optimizer)
        and getattr(rt, name) is not rt.RiemannianOptimizer
    }
    assert ours == set(OPTIMIZERS)


class _Case(nn.Module):
    """One low-rank layer and a loss whose gradient has the structure named by ``kind``."""

    def __init__(self, kind: str, m: int, n: int, r: int, batch: int, adapter: bool = False):
        super().__init__()
        base = torch.randn(m, n, dtype=D, generator=torch.Generator().manual_seed(9))
        if kind == "conv-pooled":  # 3 output channels of a 3 x 3 kernel: 3 x 9, rank 2
            self.layer = rt.LowRankConv2d(1, m, 3, r, padding=1, dtype=D, seed=3)
        else:
            self.layer = rt.LowRankLinear(n, m, r, dtype=D, seed=3, base=base if adapter else None)
        self.head = nn.Linear(1, 1).double()  # an ordinary parameter next to the manifold ones
        self.kind, self.n, self.batch = kind, n, batch

    def data(self, step: int, scale: torch.Tensor | None = None):
        g = torch.Generator().manual_seed(100 + step)
        shape = (self.batch, 1, 4, 4) if self.kind == "conv-pooled" else (self.batch, self.n)
        x = torch.randn(*shape, dtype=D, generator=g)
        if self.kind == "dead":  # dead inputs: zero columns of the gradient
            x[..., :2] = 0.0
        t = torch.randn(self.batch, dtype=D, generator=g)
        return (x if scale is None else x * (1.0 + DELTA * scale[: x.numel()].reshape(x.shape))), t

    def loss(self, x, t):
        y = self.layer(x)
        if self.kind == "conv-pooled":  # pooled over channels and pixels: a rank-1 gradient
            z = y.mean((1, 2, 3))
        elif self.kind == "summed":  # outputs summed: a rank-1 gradient
            z = y.sum(1)
        elif self.kind == "dead":  # unused outputs: zero rows of the gradient
            z = y[:, :-2].sum(1) + 0.3 * y[:, 0] ** 2
        else:  # "batch": a batch smaller than the rank, or a full-rank gradient
            z = (y**2).sum(1) + y[:, 0]
        z = self.head(z[:, None])[:, 0]
        return 0.5 * ((z - t) ** 2).mean()


#: name -> (kind, m, n, r, batch, adapter)
CASES = {
    "summed-3x8-r2": ("summed", 3, 8, 2, 6, False),
    "summed-4x8-r3": ("summed", 4, 8, 3, 6, False),
    "summed-5x7-r2": ("summed", 5, 7, 2, 6, False),
    "summed-6x9-r2": ("summed", 6, 9, 2, 6, False),
    "conv-pooled-3x9-r2": ("conv-pooled", 3, 9, 2, 5, False),
    "batch-1-below-rank-3": ("batch", 7, 6, 3, 1, False),
    "dead-rows-and-columns": ("dead", 7, 9, 3, 8, False),
    "full-rank-gradient": ("batch", 7, 10, 3, 24, False),
    "adapter-summed": ("summed", 6, 9, 2, 6, True),
    "adapter-full-rank": ("batch", 7, 10, 3, 24, True),
}


def _model(case: str) -> _Case:
    torch.manual_seed(0)
    return _Case(*CASES[case])


def _train(model: _Case, name: str, scale: torch.Tensor | None = None, steps: int = STEPS):
    cls, kw = OPTIMIZERS[name]
    opt = cls(model.parameters(), **kw)
    for i in range(steps):
        opt.zero_grad()
        model.loss(*model.data(i, scale)).backward()
        opt.step()
    return model


def relative_change(a: _Case, b: _Case) -> float:
    """Largest relative change of the low-rank weight ``U S V^T`` and the ordinary parameters;
    infinite when the ranks differ."""
    if a.layer.rank != b.layer.rank:
        return math.inf
    pairs = [(a.layer.delta_weight(), b.layer.delta_weight())]
    pairs += [
        (p.detach(), q.detach())
        for p, q in zip(a.head.parameters(), b.head.parameters(), strict=True)
    ]
    return max(float((p - q).norm() / max(float(p.norm()), 1e-300)) for p, q in pairs)


def _perturb_point(model: _Case, seed: int) -> None:
    """``s <- s (1 + DELTA xi)``, ``U <- qf(U + DELTA Xi)``: a relative change of DELTA."""
    L = model.layer
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        s = L.S.diagonal() * (1.0 + DELTA * torch.randn(L.rank, dtype=D, generator=g))
        Q, R = torch.linalg.qr(L.U + DELTA * torch.randn(L.U.shape, dtype=D, generator=g))
        L.set_factors(Q * torch.sign(R.diagonal()), s, L.V.clone())


#: (case, what is changed): an adapter starts at S = 0, a point with no relative change
CHANGES = [
    (c, w) for c in CASES for w in ("point", "gradient") if w == "gradient" or not CASES[c][5]
]


@pytest.mark.parametrize(("case", "what"), CHANGES)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_three_steps_are_continuous(name, case, what):
    """A relative change of 1e-13 of the point or of every batch's inputs changes the weights
    after three steps by at most CONTINUITY_GAIN * 1e-13 relative (and keeps the ranks)."""
    ref = _train(_model(case), name)
    twin = _model(case)
    scale = None
    if what == "point":
        _perturb_point(twin, seed=7)
    else:
        scale = torch.randn(4096, dtype=D, generator=torch.Generator().manual_seed(7))
    change = relative_change(ref, _train(twin, name, scale))
    assert change <= CONTINUITY_GAIN * DELTA, (name, case, change)


def _refactor(model: _Case, how: str) -> None:
    """The same matrix ``U diag(s) V^T`` given by other factors."""
    L = model.layer
    U, s, V = L.factors()
    r = L.rank
    if how == "signs":
        d = torch.tensor([(-1.0) ** (k + 1) for k in range(r)], dtype=D)
        U, V = U * d, V * d
    elif how == "order":
        p = torch.arange(r - 1, -1, -1)
        U, s, V = U[:, p], s[p], V[:, p]
    else:  # a rotation within equal singular values (a fresh layer's are all equal)
        assert torch.allclose(s, s[0].expand(r), rtol=0, atol=0)
        A = torch.randn(r, r, dtype=D, generator=torch.Generator().manual_seed(5))
        O, _ = torch.linalg.qr(A)
        U, V = U @ O, V @ O
    L.set_factors(U.contiguous(), s, V.contiguous())


@pytest.mark.parametrize("case", ["summed-5x7-r2", "full-rank-gradient", "batch-1-below-rank-3"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("how", ["signs", "order", "rotation"])
def test_steps_do_not_depend_on_the_factorization(name, case, how):
    """Other signs, another order, or a rotation within equal singular values of the same
    matrix give the same weights after one and after three steps (INVARIANCE_RTOL)."""
    for steps in (1, STEPS):
        ref = _train(_model(case), name, steps=steps)
        twin = _model(case)
        _refactor(twin, how)
        torch.testing.assert_close(
            twin.layer.delta_weight(), _model(case).layer.delta_weight(), rtol=0, atol=1e-15
        )
        change = relative_change(ref, _train(twin, name, steps=steps))
        assert change <= INVARIANCE_RTOL, (name, case, how, steps, change)


#: every rule spec (the NumPy solvers and the torch optimizers both step with these)
RULES = {
    "RSGD": lambda: rules.RSGD(lr=0.05, momentum=0.9, nesterov=True),
    "RHeavyBall": lambda: rules.RHeavyBall(lr=0.05),
    "Riemannion": lambda: rules.Riemannion(lr=0.05, weight_decay=0.1, ns_steps=5),
    "RAdaGrad": lambda: rules.RAdaGrad(lr=0.05),
    "RAdamW": lambda: rules.RAdamW(lr=0.02, weight_decay=0.1),
    "RAdamW-rank_tol": lambda: rules.RAdamW(lr=0.02, rank_tol=1e-3, max_rank=4),
    "RAdamWElementwise": lambda: rules.RAdamWElementwise(lr=0.01, cg_tol=1e-13, cg_maxiter=200),
    "DLRAHeavyBall": lambda: rules.DLRAHeavyBall(lr=0.05),
    "DLRAAdam": lambda: rules.DLRAAdam(lr=0.02),
    "DLRAAdam-core": lambda: rules.DLRAAdam(lr=0.02, second_moment="core"),
    "ReferenceRAdamW": lambda: rules.ReferenceRAdamW(lr=0.01),
    "ReferenceRAdaGrad": lambda: rules.ReferenceRAdaGrad(lr=0.05),
}


def test_every_rule_is_covered():
    specs = {n for n in rules.__all__ if isinstance(getattr(rules, n), type)}
    specs = {n for n in specs if issubclass(getattr(rules, n), rules.Rule) and n != "Rule"}
    assert specs == {name.split("-")[0] for name in RULES}


def _rule_run(spec, x, grads):
    """Steps of ``spec`` (NumPy) from ``x`` with the ambient gradients ``grads``."""
    st = None
    for G in grads:
        M = ro.FixedRankManifold(*x.shape, x.rank, validate=False)
        st = spec.init(M, x) if st is None else st
        kind = rules.gradient_input(spec)
        extra = {"normal": rules.normal_block_of(M, G)} if kind == "normal" else {}
        extra = {"egrad": G} if kind == "dense" else extra
        x, st = spec.step(M, x, M.geometry.project(x, G), st, **extra)
    return x.to_dense()


@pytest.mark.parametrize("what", ["point", "gradient"])
@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("grad_rank", [1, 2])
def test_rule_steps_are_continuous_on_numpy(name, what, grad_rank):
    """The rule specs on the NumPy backend (what the solvers run): a relative change of 1e-13
    of the point or of the gradients (of rank below the point's rank 3; shape 7 x 9) moves the
    matrix after three steps by at most CONTINUITY_GAIN * 1e-13 relative."""
    rng = np.random.default_rng(grad_rank)
    x = ro.FixedRankManifold(7, 9, 3).random_point(seed=1)
    grads = [rng.standard_normal((7, grad_rank)) @ rng.standard_normal((grad_rank, 9))
             for _ in range(STEPS)]  # fmt: skip
    y, xp, gp = x, x, grads
    if what == "point":
        U, _ = np.linalg.qr(x.U + DELTA * rng.standard_normal(x.U.shape))
        xp = ro.FixedRankPoint(
            U * np.sign(np.sum(U * x.U, 0)), x.s * (1 + DELTA * rng.standard_normal(3)), x.V
        )
    else:
        gp = [G * (1 + DELTA * rng.standard_normal(G.shape)) for G in grads]
    a, b = _rule_run(RULES[name](), y, grads), _rule_run(RULES[name](), xp, gp)
    assert a.shape == b.shape
    change = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert change <= CONTINUITY_GAIN * DELTA, (name, what, change)


def test_benchmark_prints_the_perturbation_table(tmp_path, run_script):
    """``python -m benchmarks.continuity --quick`` (the mixed model of the reported case, every
    optimizer): it runs as a user runs it, and every relative change it reports is within the
    continuity bound."""
    proc = run_script(["-m", "benchmarks.continuity", "--quick", "--out", tmp_path])
    rows = [line.strip("|").split("|") for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| optimizer")]  # fmt: skip
    assert {r[0].strip() for r in rows} >= set(OPTIMIZERS)
    assert all(float(r[3]) <= CONTINUITY_GAIN * DELTA for r in rows), rows
    assert (tmp_path / "continuity.png").stat().st_size > 10_000
