"""rankopt.torch optimizers: one rule implementation, exact Euclidean rules, torch integration."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest
from conftest import CONTINUITY_GAIN, assert_paths_agree

torch = pytest.importorskip("torch", reason="PyTorch not installed (pip install -e '.[torch]')")
from torch import nn  # noqa: E402

import rankopt as ro  # noqa: E402
import rankopt.torch as rt  # noqa: E402
from rankopt import rules  # noqa: E402

D = torch.float64


# tiny tensors: intra-op threads only add contention (fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(seed: int, b: int = 24, n: int = 10, m: int = 7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, dtype=D, generator=g), torch.randn(b, m, dtype=D, generator=g)


def _loss(y, t):
    return 0.5 * ((y - t) ** 2).sum(1).mean()


RULES = {
    "RAdamW": (rt.RAdamW, dict(lr=0.05, weight_decay=0.1), rules.RAdamW(lr=0.05, weight_decay=0.1)),
    "RAdaGrad": (rt.RAdaGrad, dict(lr=0.05, weight_decay=0.1, lr_decay=0.1),
                 rules.RAdaGrad(lr=0.05, weight_decay=0.1, lr_decay=0.1)),
    "RSGD": (rt.RSGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
             rules.RSGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
    "DLRAHeavyBall": (rt.DLRAHeavyBall, dict(lr=0.05, rank_tol=1e-8, max_rank=5),
                      rules.DLRAHeavyBall(lr=0.05, rank_tol=1e-8, max_rank=5)),
    "DLRAAdam": (rt.DLRAAdam, dict(lr=0.05, rank_tol=1e-8, max_rank=5),
                 rules.DLRAAdam(lr=0.05, rank_tol=1e-8, max_rank=5)),
    "Riemannion": (rt.Riemannion, dict(lr=0.05, weight_decay=0.1),
                   rules.Riemannion(lr=0.05, weight_decay=0.1)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(RULES))
def test_manifold_parameters_follow_the_rule(name):
    """Each torch optimizer moves a low-rank layer as its rule spec (rankopt.rules, the same the
    NumPy solvers use) does on the same point and tangent gradient (float64, 1e-13)."""
    cls, kw, spec = RULES[name]
    layer = rt.LowRankLinear(10, 7, 3, bias=False, dtype=D, seed=0)
    opt = cls(layer.parameters(), **kw)
    x = ro.FixedRankPoint(*layer.factors())
    state = None
    for i in range(4):
        opt.zero_grad()
        _loss(layer(*_data(i)[:1]), _data(i)[1]).backward()
        man = ro.FixedRankManifold(7, 10, x.rank, backend="torch", validate=False)
        xi = ro.TangentVector(layer.S.grad.clone(), layer.U.grad.clone(), layer.V.grad.clone())
        state = spec.init(man, x) if state is None else state
        extra = {}
        if rules.gradient_input(spec) == "normal":  # the DLRA rules: Q_u^T G Q_v of the dense G
            W = layer.dense_weight().clone().requires_grad_(True)
            _loss(_data(i)[0] @ W.T, _data(i)[1]).backward()
            extra["normal"] = rules.normal_block_of(man, W.grad)
        x, state = spec.step(man, x, xi, state, **extra)
        opt.step()
        U, s, V = layer.factors()
        assert U.shape == x.U.shape
        for a, b in ((U, x.U), (s, x.s), (V, x.V)):
            assert torch.allclose(a, b, rtol=0, atol=1e-13)
    if name.startswith("DLRA"):
        assert layer.rank != 3  # the rank-adaptive rules did change the rank


class _Mixed(nn.Module):
    """Low-rank layers of mixed shapes and ranks (several sharing a shape), a conv layer, an
    adapter on a frozen base, and ordinary parameters, all in one model."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.ModuleList(rt.LowRankLinear(10, 10, 2, dtype=D, seed=i) for i in range(3))
        self.b = nn.ModuleList(rt.LowRankLinear(10, 10, 3, dtype=D, seed=10 + i) for i in range(2))
        self.c = rt.LowRankLinear(10, 7, 2, dtype=D, seed=20)
        self.d = rt.LowRankLinear(10, 7, 2, base=torch.randn(7, 10, dtype=D), dtype=D, seed=21)
        self.conv = rt.LowRankConv2d(1, 3, 3, 2, padding=1, dtype=D, seed=22)
        self.head = nn.Linear(7, 7, dtype=D)  # drawn in float64: the same on any numerics path

    def forward(self, x):
        h = x
        for m in [*self.a, *self.b]:
            h = torch.tanh(m(h))
        z = self.conv(x[:, None, None, :]).mean((1, 2))[:, :10]
        return self.head(self.c(h) + self.d(z))


OPTS = {
    "RAdamW": (rt.RAdamW, dict(lr=0.02, weight_decay=0.1)),
    "RAdaGrad": (rt.RAdaGrad, dict(lr=0.05, lr_decay=0.1)),
    "RSGD": (rt.RSGD, dict(lr=0.05, momentum=0.9)),
    "DLRAAdam": (rt.DLRAAdam, dict(lr=0.02, rank_tol=1e-3)),
    "DLRAHeavyBall": (rt.DLRAHeavyBall, dict(lr=0.05, rank_tol=1e-3)),
    "ReferenceRAdamW": (rt.ReferenceRAdamW, dict(lr=0.01)),
    "ReferenceRAdaGrad": (rt.ReferenceRAdaGrad, dict(lr=0.05)),
    "RAdamWElementwise": (rt.RAdamWElementwise, dict(lr=0.01, cg_tol=1e-13, cg_maxiter=200)),
    "Riemannion": (rt.Riemannion, dict(lr=0.02, weight_decay=0.1)),
}


def _train_steps(model, opt, steps, scaler=None, clip=None, freeze=None):
    for i in steps:
        x, t = _data(i, n=10)
        opt.zero_grad()
        loss = _loss(model(x), t)
        if freeze is not None and i in freeze:  # a layer without gradients: the stacks regroup
            loss = loss + 0 * sum(p.sum() for p in freeze[i].parameters())
            loss.backward()
            for p in freeze[i].parameters():
                p.grad = None
        elif scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if clip is not None:
            if scaler is not None:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()


def _weights(model) -> dict:
    """The model's weights as matrices that do not depend on how a low-rank weight is factored:
    each low-rank layer's ``U S V^T`` (and its rank), every ordinary parameter."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (rt.LowRankLinear, rt.LowRankConv2d)):
            out[f"{name}.rank"] = torch.tensor(float(mod.rank), dtype=D)
            out[f"{name}.USV"] = mod.delta_weight()
    for name, p in model.named_parameters():
        if not rt.is_manifold_parameter(p):
            out[name] = p.detach()
    return out


def _assert_same(m1, m2, steps):
    """Two computation paths of ``steps`` steps give the same weights to the tolerance that
    the continuity tests justify (conftest.path_tolerance), whatever each path's rounding."""
    assert_paths_agree(_weights(m1), _weights(m2), steps)


@pytest.mark.parametrize("name", list(OPTS))
@pytest.mark.parametrize("extra", ["plain", "clip", "scaler", "regroup"])
def test_grouped_step_equals_per_layer_path(name, extra):
    """Stacked groups of same-shape layers move as each layer alone (``stack_layers=False``),
    with mixed shapes and ranks in one model (float64, to the two-path tolerance that the
    continuity tests justify), also with gradient clipping, GradScaler, and layers dropping out
    of a step (regrouping)."""
    cls, kw = OPTS[name]
    models = [_Mixed(), _Mixed()]
    opts = [
        cls(models[0].parameters(), **kw),
        cls(models[1].parameters(), stack_layers=False, **kw),
    ]
    for model, opt in zip(models, opts, strict=True):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if extra == "scaler" else None
        freeze = {2: model.a[1], 3: model.b[0]} if extra == "regroup" else None
        _train_steps(model, opt, range(5), scaler, 0.5 if extra == "clip" else None, freeze)
    _assert_same(*models, steps=5)
    state = [sum(v.numel() for st in o.state.values() for v in st.values() if torch.is_tensor(v))
             for o in opts]  # fmt: skip
    assert state[0] == state[1] > 0


@pytest.mark.parametrize("name", list(OPTS))
def test_state_dict_roundtrip_across_regrouping(name):
    """optimizer.state_dict() -> load into a fresh optimizer whose layers are grouped
    differently (per-layer path), training continues alike (two-path tolerance). The low-rank
    layers'
    entries are copied on load (torch itself aliases ordinary parameters' state tensors when
    dtype and device match, hence the deepcopy, as torch.save/torch.load would do)."""
    cls, kw = OPTS[name]
    model = _Mixed()
    opt = cls(model.parameters(), **kw)
    _train_steps(model, opt, range(3))
    twin = copy.deepcopy(model)
    opt2 = cls(twin.parameters(), stack_layers=False, **kw)
    sd = opt.state_dict()
    opt2.load_state_dict(
        {
            **copy.deepcopy(sd),
            "state": {k: (v if "count" in v else copy.deepcopy(v)) for k, v in sd["state"].items()},
        }
    )
    ptrs = {t.data_ptr() for st in opt.state.values() for t in st.values() if torch.is_tensor(t)}
    for p in twin.parameters():
        if getattr(p, "role", None) == "U" and p.requires_grad:
            assert all(t.data_ptr() not in ptrs for t in opt2.state[p].values())
    _train_steps(model, opt, range(3, 6))
    _train_steps(twin, opt2, range(3, 6))
    _assert_same(model, twin, steps=6)


def test_optimizer_state_is_findable_and_small():
    """A plain walk of optimizer.state finds every tensor the optimizer holds; RAdamW keeps
    O((m + n) r) per layer, less than AdamW on LoRA factors of the same rank."""
    model = nn.ModuleList(
        rt.LowRankLinear(64, 48, 8, bias=False, dtype=D, seed=i) for i in range(4)
    )
    opt = rt.RAdamW(model.parameters(), lr=1e-3)
    x = torch.randn(16, 64, dtype=D)
    sum(m(x).square().sum() for m in model).backward()
    opt.step()
    ours = sum(v.numel() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    # first moment (M, Up, Vp) + row/col statistics + count per layer
    assert ours == 4 * ((64 + 48) * 8 + 8 * 8 + 64 + 48 + 1)
    adamw_lora = 4 * 2 * (64 + 48) * 8
    assert ours <= 0.7 * adamw_lora


def test_loading_mismatched_state_raises_clearly():
    """A state of another rank or another rule fails at load time, naming what does not match."""
    a = rt.LowRankLinear(10, 7, 3, bias=False, dtype=D, seed=0)
    b = rt.LowRankLinear(10, 7, 4, bias=False, dtype=D, seed=0)
    opt_a = rt.RAdamW(a.parameters(), lr=0.01)
    _loss(a(_data(0)[0]), _data(0)[1]).backward()
    opt_a.step()
    with pytest.raises(ValueError, match=r"has shape \(3, 3\).*needs \(4, 4\)"):
        rt.RAdamW(b.parameters(), lr=0.01).load_state_dict(opt_a.state_dict())
    opt_s = rt.RSGD(a.parameters(), lr=0.01, momentum=0.9)
    _loss(a(_data(0)[0]), _data(0)[1]).backward()
    opt_s.step()
    with pytest.raises(
        ValueError,
        match=r"does not match the rule RAdamW: missing \['col_stats'.*unexpected \['momentum_buf",
    ):
        rt.RAdamW(a.parameters(), lr=0.01).load_state_dict(opt_s.state_dict())


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
    "Riemannion": (rt.Riemannion, torch.optim.AdamW, dict(lr=0.03, eps=1e-6, weight_decay=0.05)),
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
def test_save_load_mid_training_resumes(cls):
    """model.state_dict() + optimizer.state_dict() saved mid-training (torch.save) and loaded
    into fresh objects continue as the uninterrupted run (also after rank changes), to the
    two-path tolerance."""
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
    _assert_same(model, model2, steps=6)


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
    spec = rules.RSGD(lr=0.05)
    x0 = ro.FixedRankPoint(U, s, V)
    ref, _ = spec.step(man, x0, xi * clip, spec.init(man, x0))
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
    with pytest.raises(ValueError, match=r"non-finite gradient .* low-rank layer of shape"):
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


def test_cached_point_sees_changes_made_outside_the_optimizer():
    """Between steps the optimizer reuses the stacked point it wrote; an outside change of a
    layer's factors (set_factors, an in-place edit) is seen at the next step."""
    layers = nn.ModuleList(
        rt.LowRankLinear(10, 7, 3, bias=False, dtype=D, seed=i) for i in range(2)
    )
    opt = rt.RSGD(layers.parameters(), lr=0.05)
    x, t = _data(0)

    def step():
        opt.zero_grad()
        sum(_loss(L(x), t) for L in layers).backward()
        opt.step()

    step()
    fresh = rt.LowRankLinear(10, 7, 3, bias=False, dtype=D, seed=7)
    layers[1].set_factors(*fresh.factors())
    with torch.no_grad():
        layers[0].U.mul_(-1.0)  # the same point with another sign of U and V
        layers[0].V.mul_(-1.0)
    expect = []
    for L in layers:
        opt.zero_grad()
        _loss(L(x), t).backward()
        man = ro.FixedRankManifold(7, 10, 3, backend="torch", validate=False)
        p = ro.FixedRankPoint(*L.factors())
        xi = ro.TangentVector(L.S.grad.clone(), L.U.grad.clone(), L.V.grad.clone())
        spec = rules.RSGD(lr=0.05)
        expect.append(spec.step(man, p, xi, spec.init(man, p))[0].to_dense())
    step()
    for L, e in zip(layers, expect, strict=True):
        assert torch.allclose(L.delta_weight(), e, rtol=0, atol=1e-13)


@pytest.mark.parametrize("cls", [rt.RAdamW, rt.RAdaGrad, rt.RSGD])
def test_step_compiles_without_graph_breaks(cls):
    """torch.compile(opt.step) traces the whole step as one graph when the finite check is off
    (the check itself reads one value on the host, and rank-adaptive rules read ranks)."""
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    model = nn.Sequential(
        rt.LowRankLinear(10, 8, 3, dtype=D, seed=0), nn.Tanh(),
        rt.LowRankLinear(8, 8, 3, dtype=D, seed=1), nn.Linear(8, 3).double(),
    )  # fmt: skip
    opt = cls(model.parameters(), lr=0.01, check_finite=False)
    x, t = _data(0, n=10, m=3)
    for _ in range(2):
        opt.zero_grad()
        _loss(model(x), t).backward()
        if _ == 0:
            opt.step()
    dynamo.reset()
    explained = dynamo.explain(opt.step)()
    assert explained.graph_break_count == 0, explained.break_reasons


def test_compile_option_matches_eager():
    """RAdamW(compile=...) compiles each stack's rule step (here with the 'aot_eager' backend,
    which traces through dynamo and AOT autograd without generating code) and agrees with the
    eager step to rounding (float64)."""
    models = [_Mixed(), _Mixed()]
    opts = [rt.RAdamW(models[0].parameters(), lr=0.02),
            rt.RAdamW(models[1].parameters(), lr=0.02, compile="aot_eager")]  # fmt: skip
    for model, opt in zip(models, opts, strict=True):
        _train_steps(model, opt, range(3))
    _assert_same(*models, steps=3)


@pytest.mark.parametrize("name", list(OPTS))
def test_mixed_model_steps_are_continuous(name):
    """The mixed model (its pooled convolution has a rank-1 gradient), per-layer path: 1e-13
    added to one layer's core moves every weight after three steps by at most
    CONTINUITY_GAIN * 1e-13 relative (tests/test_continuity.py covers the cases one by one)."""
    cls, kw = OPTS[name]
    models = [_Mixed(), _Mixed()]
    with torch.no_grad():
        models[1].a[0].S.add_(1e-13 * torch.eye(2, dtype=D))
    for model in models:
        _train_steps(model, cls(model.parameters(), stack_layers=False, **kw), range(3))
    a, b = _weights(models[0]), _weights(models[1])
    for k in a:
        change = float((a[k] - b[k]).norm() / max(float(a[k].norm()), 1e-300))
        assert change <= CONTINUITY_GAIN * 1e-13, (name, k, change)


#: a second numerics path: MKL's conditional-numerical-reproducibility code path and ATen's
#: unvectorized kernels (set before the libraries load, hence a fresh process)
OTHER_NUMERICS = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default"}

_OTHER_PATH_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import test_torch_optim as T
out = {{}}
for name, (cls, kw) in T.OPTS.items():
    model = T._Mixed()
    T._train_steps(model, cls(model.parameters(), stack_layers=False, **kw), range(3))
    out[name] = T._weights(model)
torch.save(out, {path!r})
"""


def test_another_numerics_path_gives_the_same_weights(tmp_path):
    """Three steps of every optimizer on the mixed model, stacked here and per layer in a
    process with another numerics path (OTHER_NUMERICS), agree to the two-path tolerance."""
    import os
    import subprocess
    import sys

    path = tmp_path / "other.pt"
    script = _OTHER_PATH_SCRIPT.format(tests=str(Path(__file__).parent), path=str(path))
    env = {**os.environ, **OTHER_NUMERICS}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    other = torch.load(path)
    for name, (cls, kw) in OPTS.items():
        model = _Mixed()
        _train_steps(model, cls(model.parameters(), **kw), range(3))
        assert_paths_agree(_weights(model), other[name], 3, name)
