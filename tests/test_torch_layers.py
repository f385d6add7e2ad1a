"""rankopt.torch layers and conversion: custom backward, adapter start, conversion, merge."""

from __future__ import annotations

import copy
import io
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed (pip install -e '.[torch]')")
from torch import nn  # noqa: E402

import rankopt as ro  # noqa: E402
import rankopt.torch as rt  # noqa: E402
from rankopt import rules  # noqa: E402

D = torch.float64


# tiny tensors: intra-op threads only add contention (fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _dense_grad(layer, x, loss_fn):
    """``G = dL/dW`` by autograd through the dense weight (reference), plus input/bias grads."""
    W = layer.dense_weight().clone().requires_grad_(True)
    b = None if layer.bias is None else layer.bias.detach().clone().requires_grad_(True)
    xx = x.detach().clone().requires_grad_(True)
    if isinstance(layer, rt.LowRankLinear):
        y = nn.functional.linear(xx, W, b)
    else:
        y = nn.functional.conv2d(xx, W, b, layer.stride, layer.padding, layer.dilation)
    loss_fn(y).backward()
    return W.grad.reshape(W.shape[0], -1), xx.grad, None if b is None else b.grad


def _loss(y):
    return (torch.sin(y) * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape)).sum()


LAYERS = {
    "linear": lambda base: rt.LowRankLinear(9, 7, 3, base=base, dtype=D, seed=0),
    "conv": lambda base: rt.LowRankConv2d(3, 5, (3, 2), 4, stride=(2, 1), padding=(1, 0),
                                           dilation=(1, 2), base=base, dtype=D, seed=0),
}  # fmt: skip
INPUTS = {"linear": (2, 4, 9), "conv": (2, 3, 7, 8)}
BASES = {"linear": (7, 9), "conv": (5, 3, 3, 2)}


def _started(kind: str, adapter: bool, rng: np.random.Generator):
    base = torch.tensor(rng.standard_normal(BASES[kind]), dtype=D) if adapter else None
    layer = LAYERS[kind](base)
    if adapter:  # a started adapter at a random point
        m, n = layer.U.shape[0], layer.V.shape[0]
        x = ro.FixedRankManifold(m, n, layer.rank, backend="torch").random_point(seed=1)
        layer.set_factors(x.U, x.s, x.V)
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("adapter", [False, True])
def test_backward_matches_dense_autograd(kind, adapter):
    """S.grad = U^T G V, U.grad = G V - U M, V.grad = G^T U - V M^T with G from dense autograd;
    input and bias gradients pass torch.autograd.gradcheck in float64."""
    rng = np.random.default_rng(0)
    layer = _started(kind, adapter, rng)
    x = torch.tensor(rng.standard_normal(INPUTS[kind]), dtype=D, requires_grad=True)
    _loss(layer(x)).backward()
    G, gx, gb = _dense_grad(layer, x, _loss)
    U, _, V = layer.factors()
    M = U.T @ G @ V
    assert torch.allclose(layer.S.grad, M, rtol=0, atol=1e-11 * G.abs().max())
    assert torch.allclose(layer.U.grad, G @ V - U @ M, rtol=0, atol=1e-11 * G.abs().max())
    assert torch.allclose(layer.V.grad, G.T @ U - V @ M.T, rtol=0, atol=1e-11 * G.abs().max())
    assert torch.allclose(x.grad, gx, rtol=1e-12, atol=1e-12)
    assert torch.allclose(layer.bias.grad, gb, rtol=1e-12, atol=1e-12)
    # the tangent pieces are tangent: U^T Up = 0, V^T Vp = 0
    assert (U.T @ layer.U.grad).abs().max() < 1e-11 * G.abs().max()
    assert (V.T @ layer.V.grad).abs().max() < 1e-11 * G.abs().max()
    xx = x.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: layer(a) + 0 * b.sum(), (xx, layer.bias))
    assert torch.autograd.gradcheck(lambda b: layer(x.detach()) * b.sum(), (layer.bias,))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_new_adapter_is_exact_and_returns_sketches(kind):
    """Before its first step an adapter computes exactly x W0^T (+ b) and its factor gradients
    are the raw sketches G V, U^T G V, G^T U (linear in G, so DDP/accumulation stay exact)."""
    rng = np.random.default_rng(1)
    base = torch.tensor(rng.standard_normal(BASES[kind]), dtype=D)
    layer = LAYERS[kind](base)
    assert not layer.started and layer.rank == (3 if kind == "linear" else 4)
    x = torch.tensor(rng.standard_normal(INPUTS[kind]), dtype=D, requires_grad=True)
    y = layer(x)
    if kind == "linear":
        ref = x @ base.T + layer.bias
    else:
        ref = nn.functional.conv2d(x, base, layer.bias, layer.stride, layer.padding, layer.dilation)
    assert torch.equal(y, ref)
    _loss(y).backward()
    G, gx, _ = _dense_grad(layer, x, _loss)
    U, s, V = layer.factors()
    assert torch.count_nonzero(s) == 0
    assert torch.allclose(layer.U.grad, G @ V, atol=1e-11 * G.abs().max(), rtol=0)
    assert torch.allclose(layer.V.grad, G.T @ U, atol=1e-11 * G.abs().max(), rtol=0)
    assert torch.allclose(layer.S.grad, U.T @ G @ V, atol=1e-11 * G.abs().max(), rtol=0)
    assert torch.allclose(x.grad, gx, rtol=1e-12, atol=1e-12)


def test_adapter_first_step_is_truncated_gradient_step():
    """RSGD's first step from a new adapter is X1 = H_r(-lr G) exactly when rank G <= r
    (generalized Nystrom of the sketches); with rank G > r it keeps G's dominant subspaces."""
    rng = np.random.default_rng(2)
    base = torch.tensor(rng.standard_normal((12, 10)), dtype=D)
    for batch in (2, 3):  # rank G = batch <= r = 3
        layer = rt.LowRankLinear(10, 12, 3, bias=False, base=base, seed=3)
        x = torch.tensor(rng.standard_normal((batch, 10)), dtype=D)
        t = torch.tensor(rng.standard_normal((batch, 12)), dtype=D)
        ((layer(x) - t) ** 2).sum().backward()
        G = 2 * (x @ base.T - t).T @ x
        rt.RSGD(layer.parameters(), lr=0.1).step()
        assert layer.started
        assert torch.dist(layer.delta_weight(), -0.1 * G) < 1e-12 * G.norm()
        U, _, V = layer.factors()
        assert torch.dist(U.T @ U, torch.eye(3, dtype=D)) < 1e-12
        assert torch.dist(V.T @ V, torch.eye(3, dtype=D)) < 1e-12
    # rank G > r with a dominant rank-3 part: X1 captures it (Nystrom accuracy, not exact)
    layer = rt.LowRankLinear(10, 12, 3, bias=False, base=torch.zeros(12, 10, dtype=D), seed=4)
    A = torch.tensor(rng.standard_normal((12, 3)) @ rng.standard_normal((3, 10)), dtype=D)
    x = torch.tensor(rng.standard_normal((40, 10)), dtype=D)
    noise = 1e-3 * torch.tensor(rng.standard_normal((40, 12)), dtype=D)
    t = x @ A.T + noise
    (0.5 * ((layer(x) - t) ** 2).sum()).backward()
    G = -(t.T @ x)
    u, s, vh = torch.linalg.svd(G)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    rt.RSGD(layer.parameters(), lr=0.01).step()
    assert torch.dist(layer.delta_weight(), -0.01 * best) < 1e-3 * 0.01 * best.norm()


def test_adapter_first_step_equals_rule_at_start_point():
    """RAdamW's first adapter step is its rule's step at the Nystrom start point (one rule)."""
    from rankopt.torch.start import adapter_start

    rng = np.random.default_rng(5)
    layer = rt.LowRankLinear(8, 6, 2, bias=False, base=torch.zeros(6, 8, dtype=D), seed=0)
    x = torch.tensor(rng.standard_normal((5, 8)), dtype=D)
    _loss(layer(x)).backward()
    man = ro.FixedRankManifold(6, 8, 2, backend="torch", validate=False)
    x0, xi, ok = adapter_start(man, layer.U.grad, layer.S.grad, layer.V.grad)
    assert bool(ok)
    spec = rules.RAdamW(lr=0.05, weight_decay=0.01)
    ref, _ = spec.step(man, x0, xi, spec.init(man, x0))
    rt.RAdamW(layer.parameters(), lr=0.05, weight_decay=0.01).step()
    assert torch.allclose(layer.delta_weight(), ref.to_dense(), rtol=0, atol=1e-14)
    assert float(layer.factors()[1].min()) > 0


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(6 * 5 * 5, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3),
    ).double()  # fmt: skip


def test_apply_adapter_unchanged_then_merge_plain_and_low_rank_delta():
    """Adapter conversion leaves outputs unchanged; after training steps merge() gives plain
    nn.Linear/nn.Conv2d with identical outputs and weight changes of rank <= r."""
    model = _mlp()
    ref_model = copy.deepcopy(model)
    x = torch.randn(4, 2, 5, 5, dtype=D, generator=torch.Generator().manual_seed(0))
    y0 = model(x)
    ptr = model[3].weight.data_ptr()
    rt.apply_low_rank(model, rank=2, target_modules=["0", "3", "5"], modules_to_save=["7"], seed=0)
    assert isinstance(model[0], rt.LowRankConv2d) and isinstance(model[3], rt.LowRankLinear)
    assert isinstance(model[7], nn.Linear)  # not targeted
    assert torch.equal(model(x), y0)
    assert model[3].base_weight.data_ptr() == ptr  # the frozen base is not copied
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"{i}.{f}" for i in (0, 3, 5) for f in "USV"} | {"7.weight", "7.bias"}
    opt = rt.RAdamW(rt.trainable_parameters(model), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        _loss(model(x)).backward()
        opt.step()
    y = model(x)
    assert not torch.allclose(y, y0)
    rt.merge(model)
    assert all(not isinstance(m, (rt.LowRankLinear, rt.LowRankConv2d)) for m in model.modules())
    assert type(model[3]) is nn.Linear and type(model[0]) is nn.Conv2d
    assert torch.allclose(model(x), y, rtol=1e-12, atol=1e-12)
    for i in (0, 3, 5):
        delta = (
            (model[i].weight - ref_model[i].weight).detach().reshape(model[i].weight.shape[0], -1)
        )
        sv = torch.linalg.svdvals(delta)
        assert sv[2:].max() < 1e-12 * sv[0]  # rank <= 2


def test_compress_exact_rank_keeps_function_and_energy_rank():
    """Compressing layers whose weights have rank exactly r keeps the model's function;
    energy thresholds pick the smallest rank holding that fraction of ||W||_F^2."""
    model = _mlp(1)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for i, r in ((3, 4), (5, 3)):
            w = model[i].weight
            w.copy_(
                torch.tensor(
                    rng.standard_normal((w.shape[0], r)) @ rng.standard_normal((r, w.shape[1]))
                )
            )
    x = torch.randn(3, 2, 5, 5, dtype=D, generator=torch.Generator().manual_seed(1))
    y0 = model(x)
    rt.apply_low_rank(model, rank=None, target_modules=r"[35]", mode="compress", energy=1.0 - 1e-12)
    assert (model[3].rank, model[5].rank) == (4, 3)
    assert torch.allclose(model(x), y0, rtol=1e-10, atol=1e-10)
    assert all(p.requires_grad for p in model.parameters())  # compress freezes nothing
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])
    assert [rt.energy_rank(s, e) for e in (0.6, 0.9, 0.98, 1.0)] == [1, 2, 3, 4]


def test_bad_input_messages():
    with pytest.raises(ValueError, match=r"rank=6 must satisfy 1 <= rank <= min\(out, in\)"):
        rt.LowRankLinear(5, 8, 6)
    with pytest.raises(
        ValueError, match=r"base has shape \(4, 4\), but this LowRankLinear needs \(8, 5\)"
    ):
        rt.LowRankLinear(5, 8, 2, base=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="base has shape"):
        rt.LowRankConv2d(3, 4, 3, 2, base=torch.zeros(4, 3, 2, 2))
    with pytest.raises(ValueError, match=r"module '7': rank=4 exceeds min\(out, in\) = 3"):
        rt.apply_low_rank(_mlp(), rank=4, target_modules=["3", "7"])  # the last layer is 16 -> 3
    with pytest.warns(UserWarning, match=r"left 1 module\(s\) as they are: '7' \(rank=4 exceeds"):
        rt.apply_low_rank(_mlp(), rank=4)  # target_modules=None: skipped, listed
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=f"rank must be a positive integer.*got {bad!r}"):
            rt.apply_low_rank(_mlp(), rank=bad)
    with pytest.raises(ValueError, match="no nn.Linear, nn.Conv2d or nn.Embedding module matches"):
        rt.apply_low_rank(_mlp(), rank=2, target_modules=["nope"])
    with pytest.raises(ValueError, match="mode must be"):
        rt.apply_low_rank(_mlp(), rank=2, mode="lora")
    with pytest.raises(ValueError, match="grouped convolutions"):
        rt.apply_low_rank(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), rank=2, target_modules=["0"])
    layer = rt.LowRankLinear(5, 8, 2, seed=0)
    with pytest.raises(ValueError, match="factors must be given together"):
        rt.RAdamW([layer.U, layer.V])


def test_plain_torch_optimizer_is_detected():
    """A manifold factor handed to torch.optim.AdamW raises an explanatory ValueError at the
    first step (global step pre-hook), before any parameter changes; ordinary parameters pass."""
    layer = rt.LowRankLinear(5, 4, 2, seed=0)
    layer(torch.randn(3, 5)).sum().backward()
    U0 = layer.U.detach().clone()
    opt = torch.optim.AdamW(layer.parameters())
    with pytest.raises(ValueError, match="tangent-space piece.*RAdamW"):
        opt.step()
    assert torch.equal(layer.U.detach(), U0)
    torch.optim.AdamW(rt.ordinary_parameters(layer)).step()  # the bias alone is fine
    rt.allow_plain_optimizers(True)
    try:
        torch.optim.SGD(layer.parameters(), lr=0.0).step()
    finally:
        rt.allow_plain_optimizers(False)


def test_deepcopy_pickle_and_rank_change_state_dict():
    """Copies keep the U/S/V grouping (a new link per copy); a state_dict saved after a
    rank-adaptive step loads into a fresh layer of the original rank (factors resized)."""
    layer = rt.LowRankLinear(6, 5, 2, base=torch.randn(5, 6, dtype=D), dtype=D, seed=0)
    twin = copy.deepcopy(layer)
    assert twin.U.link is twin.S.link is twin.V.link and twin.U.link is not layer.U.link
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.U.link is loaded.V.link and isinstance(loaded.S, rt.ManifoldParameter)
    x = torch.randn(30, 6, dtype=D, generator=torch.Generator().manual_seed(0))
    opt = rt.DLRAHeavyBall(layer.parameters(), lr=0.05, rank_tol=1e-6, max_rank=4)
    for _ in range(2):
        opt.zero_grad()
        _loss(layer(x)).backward()
        opt.step()
    assert layer.rank > 2 and layer.started
    fresh = rt.LowRankLinear(6, 5, 2, base=torch.zeros(5, 6, dtype=D), dtype=D, seed=9)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.rank == layer.rank and fresh.started
    assert torch.equal(fresh(x), layer(x))
    assert re.search(r"rank=\d", repr(fresh))


def test_autocast_bf16_keeps_float32_manifold():
    """Under CPU bf16 autocast the output is bf16, the factor gradients are float32 tangent
    pieces close to the float32 ones, and the optimizer keeps U, V orthonormal in float32."""
    torch.manual_seed(0)
    layer = rt.LowRankLinear(32, 24, 4, seed=0)
    x, t = torch.randn(16, 32), torch.randn(16, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert y.dtype == torch.bfloat16
        (y.float() - t).pow(2).sum().backward()
    g16 = [p.grad.clone() for p in (layer.U, layer.S, layer.V)]
    assert all(g.dtype == torch.float32 for g in g16)
    layer.zero_grad()
    (layer(x) - t).pow(2).sum().backward()
    for a, b in zip(g16, (layer.U.grad, layer.S.grad, layer.V.grad), strict=True):
        assert torch.dist(a, b) < 0.05 * b.norm()
    opt = rt.RAdamW(layer.parameters(), lr=1e-2)
    opt.step()
    U, _, V = layer.factors()
    assert torch.dist(U.T @ U, torch.eye(4)) < 1e-5 and torch.dist(V.T @ V, torch.eye(4)) < 1e-5


@pytest.mark.parametrize("adapter", [False, True])
def test_embedding_backward_and_conversion(adapter):
    """LowRankEmbedding: tangent pieces of G = dL/dE (repeated indices summed, padding row
    excluded) against dense autograd; adapter conversion is exact and merge gives nn.Embedding."""
    rng = np.random.default_rng(3)
    base = torch.tensor(rng.standard_normal((11, 6)), dtype=D) if adapter else None
    layer = rt.LowRankEmbedding(11, 6, 3, padding_idx=2, base=base, dtype=D, seed=0)
    if adapter:
        x = ro.FixedRankManifold(11, 6, 3, backend="torch").random_point(seed=1)
        layer.set_factors(x.U, x.s, x.V)
    idx = torch.tensor([[1, 2, 5, 1], [7, 2, 10, 1]])
    _loss(layer(idx)).backward()
    E = layer.dense_weight().clone().requires_grad_(True)
    _loss(nn.functional.embedding(idx, E, padding_idx=2)).backward()
    G = E.grad
    assert torch.count_nonzero(G[2]) == 0 and torch.count_nonzero(G[1]) > 0
    U, _, V = layer.factors()
    M = U.T @ G @ V
    assert torch.allclose(layer.S.grad, M, rtol=0, atol=1e-12 * G.abs().max())
    assert torch.allclose(layer.U.grad, G @ V - U @ M, rtol=0, atol=1e-12 * G.abs().max())
    assert torch.allclose(layer.V.grad, G.T @ U - V @ M.T, rtol=0, atol=1e-12 * G.abs().max())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 6, padding_idx=0), nn.Linear(6, 4)).double()
    y0 = model(idx)
    rt.apply_low_rank(model, rank=2, target_modules=["0"], modules_to_save=["1"], seed=0)
    assert isinstance(model[0], rt.LowRankEmbedding) and torch.equal(model(idx), y0)
    opt = rt.RAdamW(rt.trainable_parameters(model), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        _loss(model(idx)).backward()
        opt.step()
    y = model(idx)
    rt.merge(model)
    assert type(model[0]) is nn.Embedding and torch.allclose(model(idx), y, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- issue 11 items


def test_half_precision_policy_enforce_and_upcast():
    """Factors are float32/float64: dtype=float16/bfloat16 is refused with a hint (enforce);
    adapters on a half-precision model get float32 factors (upcast) and compute in the input's
    dtype; RAdamW keeps U, V orthonormal and finite over steps (it produced an SVD of
    non-finite values at step 3 with float16 factors); model.half() after conversion refuses
    to train but still runs under no_grad."""
    for dt in (torch.float16, torch.bfloat16):
        with pytest.raises(ValueError, match="half-precision factors cannot be trained"):
            rt.LowRankLinear(16, 12, 3, dtype=dt)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4)).to(torch.bfloat16)
    rt.apply_low_rank(model, rank=3, target_modules=["0"], modules_to_save=["2"], seed=0)
    layer = model[0]
    assert layer.U.dtype == torch.float32 and layer.base_weight.dtype == torch.bfloat16
    x = torch.randn(32, 16, dtype=torch.bfloat16)
    y0 = model(x)
    assert y0.dtype == torch.bfloat16
    opt = rt.RAdamW(rt.trainable_parameters(model), lr=1e-2)
    for _ in range(6):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()
    U, s, V = layer.factors()
    assert bool(torch.isfinite(s).all()) and float(s.max()) > 0
    assert torch.dist(U.T @ U, torch.eye(3)) < 1e-5 and torch.dist(V.T @ V, torch.eye(3)) < 1e-5
    model.half()
    with pytest.raises(ValueError, match=r"factors are torch.float16 \(model.half\(\)"):
        model(x.half())
    with torch.no_grad():
        assert model(x.half()).dtype == torch.float16
    with pytest.raises(ValueError, match="input dtype torch.float64 does not match"):
        rt.LowRankLinear(4, 3, 2, dtype=torch.float32)(torch.zeros(2, 4, dtype=D))


def test_set_factors_validates_the_point():
    """2 U (not orthonormal), negative s, NaN in U, rank 0 or wrong shapes: ValueError; a thin
    SVD in float32 or float64 passes."""
    layer = rt.LowRankLinear(8, 6, 2, seed=0)
    x = ro.FixedRankManifold(6, 8, 2, backend="torch").random_point(seed=1)
    U, s, V = x.U.float(), x.s.float(), x.V.float()
    with pytest.raises(
        ValueError, match=r"U must have orthonormal columns: \|\|U\^T U - I\|\|_F = 4.24"
    ):
        layer.set_factors(2 * U, s, V)
    with pytest.raises(ValueError, match="V must have orthonormal columns"):
        layer.set_factors(U, s, V + 0.01)
    with pytest.raises(ValueError, match=r"s must hold singular values >= 0, got min\(s\) = -1"):
        layer.set_factors(U, torch.tensor([1.0, -1.0]), V)
    bad = U.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="U has non-finite entries"):
        layer.set_factors(bad, s, V)
    with pytest.raises(ValueError, match="rank r=0"):
        layer.set_factors(U[:, :0], s[:0], V[:, :0])
    with pytest.raises(ValueError, match="factors must have shapes"):
        layer.set_factors(U.T, s, V)
    U0 = layer.U.detach().clone()
    assert torch.equal(layer.U.detach(), U0)  # nothing changed by the refused calls
    layer.set_factors(x.U, x.s, x.V)  # float64 input into float32 factors
    layer.set_factors(U, s, V)


def test_wrong_input_width_names_the_layer_not_the_factors():
    lin = rt.LowRankLinear(16, 4, 2, seed=0)
    with pytest.raises(ValueError, match=r"LowRankLinear\(in_features=16, out_features=4\) got an "
                       r"input of shape \(4, 15\): its last dimension must be 16"):  # fmt: skip
        lin(torch.zeros(4, 15))
    conv = rt.LowRankConv2d(3, 5, 3, 2, seed=0)
    with pytest.raises(ValueError, match=r"needs \(batch, 3, height, width\)"):
        conv(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="integer indices"):
        rt.LowRankEmbedding(10, 4, 2, seed=0)(torch.zeros(3))


class _Tied(nn.Module):
    """A language-model shape: the output head is tied to the embedding (one Parameter), and
    one block is shared by two positions."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.block = nn.Linear(8, 8)
        self.again = self.block  # the same module under a second name
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        h = torch.tanh(self.again(torch.tanh(self.block(self.emb(idx)))))
        return self.head(h)


@pytest.mark.parametrize("mode", ["adapter", "compress"])
def test_tied_weights_and_shared_modules_stay_tied(mode):
    """Converting both the embedding and the tied head shares one set of factors: after
    RAdamW steps their dense weights are equal (they differed by 0.27-0.52 before); a shared
    module stays one module; merge keeps the tie; converting one side alone raises."""
    model = _Tied().double()
    idx = torch.tensor([[1, 5, 7], [3, 3, 19]])
    rt.apply_low_rank(model, rank=3, target_modules=["emb", "head", "block"], mode=mode, seed=0)
    assert model.head.U is model.emb.U and model.again is model.block
    if mode == "adapter":
        assert model.head.base_weight is model.emb.base_weight
    opt = rt.RAdamW(rt.trainable_parameters(model), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        _loss(model(idx)).backward()
        opt.step()
    assert model.emb.started and float(model.emb.factors()[1].min()) > 0
    assert torch.equal(model.emb.dense_weight(), model.head.dense_weight())
    y = model(idx)
    rt.merge(model)
    assert model.head.weight is model.emb.weight and model.again is model.block
    assert torch.allclose(model(idx), y, rtol=1e-12, atol=1e-12)
    with pytest.raises(
        ValueError, match="'head': its weight is tied to 'emb', which is not converted"
    ):
        rt.apply_low_rank(_Tied(), rank=2, target_modules=["head"])
    with pytest.warns(UserWarning, match=r"'head' \(its weight is tied to 'emb'"):
        m = rt.apply_low_rank(_Tied(), rank=2)  # target_modules=None: nn.Embedding is not a target
    assert isinstance(m.block, rt.LowRankLinear) and type(m.head) is nn.Linear


def test_target_none_skips_grouped_conv_and_lists_it_once():
    """apply_low_rank(target_modules=None) on a model with a grouped convolution converts the
    rest and warns once, listing what it skipped (and why); exclude_modules keeps the head."""
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, groups=2, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(8 * 16, 10),
        nn.Linear(10, 3),
    ).double()  # fmt: skip
    x = torch.randn(2, 4, 4, 4, dtype=D)
    y0 = model(x)
    with pytest.warns(UserWarning) as rec:
        rt.apply_low_rank(model, rank=2, exclude_modules=["5"])
    msgs = [str(w.message) for w in rec if "apply_low_rank" in str(w.message)]
    assert len(msgs) == 1
    assert "left 2 module(s)" in msgs[0] and "'1' (grouped convolutions (groups=2)" in msgs[0]
    assert "'2' (padding_mode='reflect'" in msgs[0]
    assert isinstance(model[0], rt.LowRankConv2d) and isinstance(model[4], rt.LowRankLinear)
    assert (
        type(model[1]) is nn.Conv2d and type(model[2]) is nn.Conv2d and type(model[5]) is nn.Linear
    )
    assert torch.equal(model(x), y0)
    assert model.rankopt_config["exclude_modules"] == ["5"]
    # modules_to_save are trained whole, never converted (the classifier head, as in PEFT)
    other = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    rt.apply_low_rank(other, rank=2, modules_to_save=["2"])
    assert isinstance(other[0], rt.LowRankLinear) and type(other[2]) is nn.Linear
    assert other[2].weight.requires_grad and not other[0].base_weight.requires_grad


def test_import_without_torch_gives_install_hint():
    """``import rankopt.torch`` without PyTorch: an ImportError that says how to install it."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "try:\n    import rankopt.torch\nexcept ImportError as e:\n    print('IMPORTERROR:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "IMPORTERROR:" in out.stdout and "pip install -e '.[torch]'" in out.stdout, out
