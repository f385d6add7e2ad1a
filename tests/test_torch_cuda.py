"""rankopt.torch on a CUDA GPU (skipped without one): the CPU guarantees hold on the device."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed (pip install -e '.[torch]')")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU: torch.cuda.is_available() is False", allow_module_level=True)

from torch import nn  # noqa: E402

import rankopt as ro  # noqa: E402
import rankopt.torch as rt  # noqa: E402
from rankopt import rules  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_cuda_backward_matches_dense_autograd(kind, dtype):
    g = torch.Generator(device=DEV).manual_seed(0)
    if kind == "linear":
        layer = rt.LowRankLinear(64, 48, 8, dtype=dtype, device=DEV, seed=0)
        x = torch.randn(4, 16, 64, dtype=dtype, device=DEV, generator=g)
    else:
        layer = rt.LowRankConv2d(6, 10, 3, 4, padding=1, dtype=dtype, device=DEV, seed=0)
        x = torch.randn(3, 6, 9, 9, dtype=dtype, device=DEV, generator=g)
    assert layer.U.device.type == "cuda"
    y = layer(x)
    (y.sin().sum()).backward()
    W = layer.dense_weight().clone().requires_grad_(True)
    if kind == "linear":
        yd = nn.functional.linear(x, W, layer.bias.detach())
    else:
        yd = nn.functional.conv2d(x, W, layer.bias.detach(), padding=1)
    yd.sin().sum().backward()
    G = W.grad.reshape(W.shape[0], -1)
    U, _, V = layer.factors()
    M = U.T @ G @ V
    tol = (1e-4 if dtype == torch.float32 else 1e-10) * float(G.abs().max())
    assert float((layer.S.grad - M).abs().max()) < tol
    assert float((layer.U.grad - (G @ V - U @ M)).abs().max()) < tol
    assert float((layer.V.grad - (G.T @ U - V @ M.T)).abs().max()) < tol


@pytest.mark.parametrize("name", ["RAdamW", "RSGD", "DLRAAdam"])
def test_cuda_optimizer_equals_rule(name):
    cls, spec, kw = {
        "RAdamW": (rt.RAdamW, rules.RAdamW, dict(lr=0.05, weight_decay=0.01)),
        "RSGD": (rt.RSGD, rules.RSGD, dict(lr=0.05, momentum=0.9)),
        "DLRAAdam": (rt.DLRAAdam, rules.DLRAAdam, dict(lr=0.05, rank_tol=1e-6, max_rank=6)),
    }[name]
    spec = spec(**kw)
    layer = rt.LowRankLinear(40, 30, 4, bias=False, dtype=torch.float64, device=DEV, seed=0)
    opt = cls(layer.parameters(), **kw)
    x = ro.FixedRankPoint(*layer.factors())
    state = None
    g = torch.Generator(device=DEV).manual_seed(1)
    for _ in range(3):
        inp = torch.randn(16, 40, dtype=torch.float64, device=DEV, generator=g)
        opt.zero_grad()
        (layer(inp) ** 2).sum().backward()
        man = ro.FixedRankManifold(30, 40, x.rank, backend="torch", device=DEV, validate=False)
        xi = ro.TangentVector(layer.S.grad.clone(), layer.U.grad.clone(), layer.V.grad.clone())
        state = spec.init(man, x) if state is None else state
        extra = {}
        if rules.gradient_input(spec) == "normal":  # DLRA: Q_u^T G Q_v of the dense gradient
            W = layer.dense_weight().clone().requires_grad_(True)
            ((inp @ W.T) ** 2).sum().backward()
            extra["normal"] = rules.normal_block_of(man, W.grad)
        x, state = spec.step(man, x, xi, state, **extra)
        opt.step()
        U, s, V = layer.factors()
        assert torch.allclose(U @ torch.diag(s) @ V.T, x.to_dense(), rtol=0, atol=1e-12)


def test_cuda_amp_fp16_gradscaler_and_bf16():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10)).to(DEV)
    rt.apply_low_rank(model, rank=8, target_modules=["0"], modules_to_save=["2"], seed=0)
    ref = copy.deepcopy(model)
    x = torch.randn(32, 64, device=DEV)
    t = torch.randint(0, 10, (32,), device=DEV)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))  # the adapter starts at zero
    opt = rt.RAdamW(rt.trainable_parameters(model), lr=1e-2)
    scaler = torch.amp.GradScaler("cuda")
    losses = []
    for _ in range(20):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), t)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    assert model[0].U.dtype == torch.float32
    U, _, V = model[0].factors()
    assert float((U.T @ U - torch.eye(8, device=DEV)).abs().max()) < 1e-5
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
