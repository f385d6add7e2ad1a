"""rankopt.torch optimizers: one rule implementation, exact Euclidean rules, torch integration."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed (pip install 'rankopt[torch]')")
from torch import nn  # noqa: E402

import rankopt as ro  # noqa: E402
import rankopt.torch as rt  # noqa: E402
from rankopt.solvers import rules  # noqa: E402

D = torch.float64


# tiny tensors: intra-op threads only add contention (fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(seed: int, b: int = 24, n: int = 10, m: int = 7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, dtype=D, generator=g), torch.randn(b, m, dtype=D, generator=g)


def _loss(y, t):
    return 0.5 * ((y - t) ** 2).sum(1).mean()


RULES = {
    "RAdamW": (rt.RAdamW, dict(lr=0.05, weight_decay=0.1), rules.radamw_init, rules.radamw_step,
               dict(lr=0.05, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)),
    "RAdaGrad": (rt.RAdaGrad, dict(lr=0.05, weight_decay=0.1), rules.radagrad_init,
                 rules.radagrad_step, dict(lr=0.05, weight_decay=0.1)),
    "RSGD": (rt.RSGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1), rules.rsgd_init,
             rules.rsgd_step, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
    "DLRAHeavyBall": (rt.DLRAHeavyBall, dict(lr=0.05, rank_tol=1e-8), rules.dlra_heavyball_init,
                      rules.dlra_heavyball_step, dict(lr=0.05, momentum=0.9, rank_tol=1e-8)),
    "DLRAAdam": (rt.DLRAAdam, dict(lr=0.05, rank_tol=1e-8), rules.dlra_adam_init, rules.dlra_adam_step,
                 dict(lr=0.05, rank_tol=1e-8, eps=1e-8)),
}  # fmt: skip


INIT = {k: dict(cg_tol=1e-4) for k in ("RAdamW", "RAdaGrad", "DLRAAdam")}  # the torch default


@pytest.mark.parametrize("name", list(RULES))
def test_manifold_parameters_follow_the_solvers_rule_bitwise(name):
    """Each torch optimizer moves a low-rank layer exactly (bitwise, float64) as the shared rule
    function of rankopt.solvers.rules does on the same point and tangent gradient."""
    cls, kw, init, step, rule_kw = RULES[name]
    layer = rt.LowRankLinear(10, 7, 3, bias=False, dtype=D, seed=0)
    opt = cls(layer.parameters(), **kw)
    x = ro.FixedRankPoint(*layer.factors())
    state = None
    for i in range(4):
        opt.zero_grad()
        _loss(layer(*_data(i)[:1]), _data(i)[1]).backward()
        man = ro.FixedRankManifold(7, 10, x.rank, backend="torch", validate=False)
        xi = ro.TangentVector(layer.S.grad.clone(), layer.U.grad.clone(), layer.V.grad.clone())
        state = init(man, x, **INIT.get(name, {})) if state is None else state
        x, state = step(man, x, xi, state, **rule_kw)
        opt.step()
        U, s, V = layer.factors()
        assert U.shape == x.U.shape
        assert torch.equal(U, x.U) and torch.equal(s, x.s) and torch.equal(V, x.V)
    if name.startswith("DLRA"):
        assert layer.rank != 3  # the rank-adaptive rules did change the rank


class _TwoBranch(nn.Module):
    """An ordinary MLP branch plus an independent low-rank branch (same optimizer)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mlp = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 7)).double()
        self.low = rt.LowRankLinear(10, 7, 2, dtype=D, seed=0)

    def forward(self, x):
        return self.mlp(x), self.low(x)


EUCLID = {
    "RAdamW": (rt.RAdamW, torch.optim.AdamW, dict(lr=0.03, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)),
    "RAdaGrad": (rt.RAdaGrad, torch.optim.Adagrad,
                 dict(lr=0.1, lr_decay=0.01, weight_decay=0.02, initial_accumulator_value=0.1)),
    "RSGD": (rt.RSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "RSGD-nesterov": (rt.RSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.8, nesterov=True)),
    "DLRAHeavyBall": (rt.DLRAHeavyBall, torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    "DLRAAdam": (rt.DLRAAdam, torch.optim.AdamW, dict(lr=0.03, weight_decay=0.0)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(EUCLID))
def test_ordinary_parameters_match_torch_optimizers(name):
    """Ordinary parameters in a rankopt optimizer (next to manifold ones) follow torch's
    AdamW / Adagrad / SGD to 1e-6 (in fact bitwise: torch's functional code is called)."""
    ours_cls, torch_cls, kw = EUCLID[name]
    model = _TwoBranch()
    ref = copy.deepcopy(model.mlp)
    opt = ours_cls(model.parameters(), **kw)
    ropt = torch_cls(ref.parameters(), **kw)
    for i in range(6):
        x, t = _data(i)
        opt.zero_grad()
        ropt.zero_grad()
        y, z = model(x)
        (_loss(y, t) + _loss(z, t)).backward()
        _loss(ref(x), t).backward()
        opt.step()
        ropt.step()
    for p, q in zip(model.mlp.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-6)
        assert torch.equal(p, q)


def _adapter_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 7)
    ).double()
    return rt.apply_low_rank(
        model, rank=3, target_modules=["0", "2"], modules_to_save=["4"], seed=1
    )


@pytest.mark.parametrize("cls", [rt.RAdamW, rt.DLRAAdam, rt.RSGD])
def test_save_load_mid_training_resumes_bitwise(cls):
    """model.state_dict() + optimizer.state_dict() saved mid-training (torch.save) and loaded
    into fresh objects continue bit for bit (also after rank changes)."""
    kw = {"momentum": 0.9} if cls is rt.RSGD else {}
    model = _adapter_model()
    opt = cls(rt.trainable_parameters(model), lr=0.02, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    def train(model, opt, sched, steps):
        for i in steps:
            x, t = _data(i)
            opt.zero_grad()
            _loss(model(x), t).backward()
            opt.step()
            sched.step()

    train(model, opt, sched, range(3))
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf
    )
    train(model, opt, sched, range(3, 6))
    buf.seek(0)
    ckpt = torch.load(buf)  # weights_only: the state is plain tensors, numbers and strings
    model2 = _adapter_model(seed=5)
    opt2 = cls(rt.trainable_parameters(model2), lr=0.02, **kw)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    train(model2, opt2, sched2, range(3, 6))
    for (n1, p), (n2, q) in zip(
        model.state_dict().items(), model2.state_dict().items(), strict=True
    ):
        assert n1 == n2
        if isinstance(p, torch.Tensor):
            assert torch.equal(p, q), n1


def _illcond(seed=0, m=50, n=40, r=4, N=400):
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, r)))
    V, _ = np.linalg.qr(rng.standard_normal((n, r)))
    W = (U * np.geomspace(1.0, 1e-2, r)) @ V.T  # condition number 100
    X = rng.standard_normal((N, n))
    return torch.tensor(X, dtype=D), torch.tensor(X @ W.T, dtype=D)


class _LoRA(nn.Module):
    """W = A B^T, PEFT-style start (A = 0, B random)."""

    def __init__(self, m, n, r, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(torch.zeros(m, r, dtype=D))
        self.B = nn.Parameter(torch.randn(n, r, generator=g, dtype=D) / n**0.5)

    def forward(self, x):
        return (x @ self.B) @ self.A.T


def test_radamw_beats_factorized_adamw_on_ill_conditioned_regression():
    """Learning a rank-4, kappa=100 matrix from y = W x: RAdamW (adapter from 0) reaches a loss
    >= 100x lower than LoRA-style W = A B^T with AdamW, same steps, each at its best lr."""
    X, Y = _illcond()
    steps, grid = 150, (3e-3, 1e-2, 3e-2, 1e-1)

    def run(kind, lr):
        if kind == "lora":
            mod = _LoRA(50, 40, 4, 0)
            opt = torch.optim.AdamW(mod.parameters(), lr=lr, weight_decay=0.0)
        else:
            mod = rt.LowRankLinear(40, 50, 4, bias=False, base=torch.zeros(50, 40, dtype=D), seed=0)
            opt = rt.RAdamW(mod.parameters(), lr=lr, weight_decay=0.0)
        for _ in range(steps):
            opt.zero_grad()
            _loss(mod(X), Y).backward()
            opt.step()
        with torch.no_grad():
            return float(_loss(mod(X), Y))

    best_lora = min(run("lora", lr) for lr in grid)
    best_radamw = min(run("radamw", lr) for lr in grid)
    assert best_radamw < best_lora / 100, (best_radamw, best_lora)


def test_lr_scheduler_zero_grad_and_clipping():
    """Schedulers change the lr the rule gets; zero_grad(set_to_none) works on the factors;
    clip_grad_norm_ sees the Riemannian gradient norm ||P_X(G)||_F and scales the tangent vector."""
    layer = rt.LowRankLinear(10, 7, 3, bias=False, dtype=D, seed=0)
    opt = rt.RSGD(layer.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.25)
    assert opt.param_groups[0]["lr"] == 0.05
    x, t = _data(0)
    y = layer(x)
    _loss(y, t).backward()
    W = layer.dense_weight()
    G = ((x @ W.T - t) / x.shape[0]).T @ x
    U, s, V = layer.factors()
    PG = U @ U.T @ G + G @ V @ V.T - U @ U.T @ G @ V @ V.T
    xi = ro.TangentVector(layer.S.grad.clone(), layer.U.grad.clone(), layer.V.grad.clone())
    norm = torch.nn.utils.clip_grad_norm_(layer.parameters(), max_norm=float(PG.norm()) / 2)
    assert abs(float(norm) - float(PG.norm())) < 1e-12 * float(PG.norm())
    man = ro.FixedRankManifold(7, 10, 3, backend="torch", validate=False)
    clip = float(PG.norm()) / 2 / (float(norm) + 1e-6)  # torch's clip coefficient
    ref, _ = rules.rsgd_step(
        man, ro.FixedRankPoint(U, s, V), xi * clip, rules.rsgd_init(man, None), lr=0.05
    )
    opt.step()
    sched.step()
    assert torch.allclose(layer.delta_weight(), ref.to_dense(), rtol=0, atol=1e-14)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in layer.parameters())
    opt.zero_grad()  # set_to_none=True is torch's default
    assert all(p.grad is None for p in layer.parameters())
    before = [p.detach().clone() for p in layer.parameters()]
    opt.step()  # no gradients: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters(), strict=True))


def test_grad_scaler_skips_inf_and_matches_unscaled_step():
    """With torch.amp.GradScaler a finite step equals the plain step bitwise (power-of-two
    scale), an inf gradient skips the step with a RuntimeWarning and lowers the scale; without
    a scaler a non-finite gradient raises a ValueError naming the parameter."""
    model = _adapter_model()
    twin = copy.deepcopy(model)
    opt = rt.RAdamW(rt.trainable_parameters(model), lr=0.02)
    opt2 = rt.RAdamW(rt.trainable_parameters(twin), lr=0.02)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, t = _data(0)
    scaler.scale(_loss(model(x), t)).backward()
    scaler.step(opt)
    scaler.update()
    _loss(twin(x), t).backward()
    opt2.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(_loss(model(x), t) * float("inf")).backward()
    with pytest.warns(RuntimeWarning, match="inf/NaN gradients; this step is skipped"):
        scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**10
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    opt.zero_grad()
    _loss(model(x), t).backward()
    model[0].U.grad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite gradient .* factor 'U'"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_bad_hyperparameters():
    layer = rt.LowRankLinear(5, 4, 2, seed=0)
    with pytest.raises(ValueError, match="invalid learning rate"):
        rt.RAdamW(layer.parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        rt.RAdamW(layer.parameters(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="Nesterov"):
        rt.RSGD(layer.parameters(), nesterov=True)
    with pytest.raises(ValueError, match="factors must be given together, in one param group"):
        rt.RSGD([{"params": [layer.U, layer.S]}, {"params": [layer.V, layer.bias]}])
