"""Torch optimizers whose rules need the layers' captured batch: DLRA (augmented BUG) and the
authors' reference rules. Each is compared (float64) with its rule fed from a dense copy of
the layer (the normal block ``Q_u^T G Q_v`` or the dense ``G`` of the same batch)."""

from __future__ import annotations

import gc

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed (pip install -e '.[torch]')")
from torch import nn  # noqa: E402

import rankopt as ro  # noqa: E402
import rankopt.torch as rt  # noqa: E402
from rankopt import rules  # noqa: E402
from rankopt.torch._autograd import get_capture  # noqa: E402
from rankopt.torch.start import adapter_start  # noqa: E402

D = torch.float64
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _linear_case(seed, b=24, n=10, m=7):
    g = _gen(seed)
    x, t = torch.randn(b, n, dtype=D, generator=g), torch.randn(b, m, dtype=D, generator=g)

    def loss(out):
        return 0.5 * ((out - t) ** 2).sum(1).mean()

    return x, loss


def _dense_grad(layer, x, loss, kind="linear"):
    """The Euclidean gradient G = dL/dW of the layer's low-rank part, from a dense copy."""
    W = layer.delta_weight().clone().requires_grad_(True)
    if kind == "linear":
        base = 0 if layer.base_weight is None else x @ layer.base_weight.T
        loss(base + x @ W.T).backward()
    elif kind == "conv":
        k = W.reshape(layer._kernel_shape)  # noqa: SLF001 - the test reads the kernel shape
        loss(nn.functional.conv2d(x, k, None, layer.stride, layer.padding)).backward()
    else:
        loss(nn.functional.embedding(x, W, padding_idx=layer.padding_idx)).backward()
    return W.grad


def _rule_step(spec, x, xi, state, G):
    man = ro.FixedRankManifold(*x.shape, x.rank, backend="torch", validate=False)
    state = spec.init(man, x) if state is None else state
    kind = rules.gradient_input(spec)
    extra = {
        "normal": {"normal": rules.normal_block_of(man, G)},
        "dense": {"egrad": G},
        "tangent": {},
    }[kind]
    return spec.step(man, x, xi, state, **extra)


def _tangent(layer):
    return ro.TangentVector(layer.S.grad.clone(), layer.U.grad.clone(), layer.V.grad.clone())


CASES = {
    "DLRAHeavyBall": (rt.DLRAHeavyBall, dict(lr=0.1, rank_tol=1e-6, max_rank=5),
                      rules.DLRAHeavyBall(lr=0.1, rank_tol=1e-6, max_rank=5)),
    "DLRAAdam": (rt.DLRAAdam, dict(lr=0.05, rank_tol=1e-6, max_rank=5),
                 rules.DLRAAdam(lr=0.05, rank_tol=1e-6, max_rank=5)),
    "DLRAAdam-core": (rt.DLRAAdam, dict(lr=0.05, rank_tol=1e-2, second_moment="core", metric_eps=1e-4),
                      rules.DLRAAdam(lr=0.05, rank_tol=1e-2, second_moment="core", metric_eps=1e-4)),
    "ReferenceRAdamW": (rt.ReferenceRAdamW, dict(lr=0.01), rules.ReferenceRAdamW(lr=0.01)),
    "ReferenceRAdaGrad": (rt.ReferenceRAdaGrad, dict(lr=0.2, faithful=True),
                          rules.ReferenceRAdaGrad(lr=0.2, faithful=True)),
    "RAdamWElementwise": (rt.RAdamWElementwise, dict(lr=0.01, cg_tol=1e-13, cg_maxiter=200),
                          rules.RAdamWElementwise(lr=0.01, cg_tol=1e-13, cg_maxiter=200)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("adapter", [False, True])
def test_linear_layer_follows_the_rule(name, adapter):
    """Four steps of the optimizer equal four steps of the rule fed from a dense copy of the
    layer (1e-12). Adapter: the first step starts at the Nystrom point of the sketches (for the
    reference rules: X = 0, so the code's dense first step H_r(W'))."""
    cls, kw, spec = CASES[name]
    base = torch.randn(7, 10, dtype=D, generator=_gen(5)) if adapter else None
    layer = rt.LowRankLinear(10, 7, 3, bias=False, base=base, dtype=D, seed=0)
    opt = cls(layer.parameters(), **kw)
    x, state = ro.FixedRankPoint(*layer.factors()), None
    for i in range(4):
        inp, loss = _linear_case(i)
        G = _dense_grad(layer, inp, loss)
        opt.zero_grad()
        loss(layer(inp)).backward()
        xi = _tangent(layer)
        if i == 0 and adapter:  # the optimizer's own start from the sketches
            man = ro.FixedRankManifold(7, 10, 3, backend="torch", validate=False)
            x0, xi0, _ = adapter_start(man, xi.Up[None], xi.M[None], xi.Vp[None])
            x = ro.FixedRankPoint(x0.U[0], x0.s[0], x0.V[0])
            xi = ro.TangentVector(xi0.M[0], xi0.Up[0], xi0.Vp[0])
        x, state = _rule_step(spec, x, xi, state, G)
        opt.step()
        assert layer.rank == x.rank
        np.testing.assert_allclose(layer.delta_weight().numpy(), x.to_dense().numpy(), atol=1e-12)
    if name.startswith("DLRA") and not adapter:
        assert layer.rank != 3 or name == "DLRAAdam-core"


@pytest.mark.parametrize("name", ["DLRAAdam", "ReferenceRAdamW"])
def test_adapter_without_gradient_stays_unstarted(name):
    """Two same-shape adapters in one bucket, the second with a zero gradient: the first starts
    and follows its rule, the second stays exactly zero (and unstarted) until it gets a gradient.
    Regression: the bucket's captures were matched to the started layers with ``==`` on layers
    (tensor comparison), which raised."""
    cls, kw, _ = CASES[name]
    base = torch.randn(7, 10, dtype=D, generator=_gen(5))
    used, idle = (
        rt.LowRankLinear(10, 7, 3, bias=False, base=base, dtype=D, seed=s) for s in (0, 1)
    )
    opt = cls([*used.parameters(), *idle.parameters()], **kw)
    for i in range(3):
        inp, loss = _linear_case(i)
        opt.zero_grad()
        loss(used(inp) + 0.0 * idle(inp)).backward()  # a zero gradient for idle
        opt.step()
    assert used.delta_weight().abs().max() > 0
    assert idle.delta_weight().abs().max() == 0
    inp, loss = _linear_case(9)
    opt.zero_grad()
    loss(idle(inp)).backward()
    opt.step()
    assert idle.delta_weight().abs().max() > 0


def test_conv_and_embedding_layers_follow_the_rule():
    """The captured batch of a convolution and of an embedding (rows gathered by index, a
    padding row) gives the same normal block as the dense gradient."""
    spec = rules.DLRAAdam(lr=0.05, rank_tol=1e-6, max_rank=6)
    conv = rt.LowRankConv2d(3, 8, 3, 3, padding=1, bias=False, dtype=D, seed=0)
    emb = rt.LowRankEmbedding(12, 9, 3, padding_idx=0, dtype=D, seed=1)
    g = _gen(0)
    img, tgt = (
        torch.randn(4, 3, 6, 6, dtype=D, generator=g),
        torch.randn(4, 8, 6, 6, dtype=D, generator=g),
    )
    idx = torch.randint(0, 12, (5, 7), generator=g)
    etgt = torch.randn(5, 7, 9, dtype=D, generator=g)
    for layer, inp, tgt_, kind in ((conv, img, tgt, "conv"), (emb, idx, etgt, "emb")):
        opt = rt.DLRAAdam(layer.parameters(), lr=0.05, rank_tol=1e-6, max_rank=6)
        x, state = ro.FixedRankPoint(*layer.factors()), None

        def loss(out, tgt_=tgt_):
            return 0.5 * ((out - tgt_) ** 2).sum()

        for _ in range(2):
            G = _dense_grad(layer, inp, loss, kind)
            opt.zero_grad()
            loss(layer(inp)).backward()
            x, state = _rule_step(spec, x, _tangent(layer), state, G)
            opt.step()
            np.testing.assert_allclose(
                layer.delta_weight().numpy(), x.to_dense().numpy(), atol=1e-11
            )
        assert layer.rank > 3


def _part_loss(inp, part, layer):
    """Backward of this micro-batch's share of the full-batch loss."""
    t = torch.randn(24, 7, dtype=D, generator=_gen(99))
    loss = 0.5 * ((layer(inp[part]) - t[part]) ** 2).sum() / 24
    loss.backward()
    return loss


@pytest.mark.parametrize("name", ["DLRAAdam", "DLRAHeavyBall", "ReferenceRAdamW"])
def test_gradient_accumulation_and_clipping(name):
    """Three micro-batches accumulate to the full-batch step (the captures accumulate like
    .grad); clip_grad_norm_ scales the captured batch like the gradients (checked against the
    rule with the clipped dense gradient)."""
    cls, kw, spec = CASES[name]

    def make():
        return rt.LowRankLinear(10, 7, 3, bias=False, dtype=D, seed=0)

    inp = torch.randn(24, 10, dtype=D, generator=_gen(1))
    results = []
    for micro, clip in ((1, None), (3, None), (3, 0.05)):
        layer = make()
        opt = cls(layer.parameters(), **kw)
        x, state = ro.FixedRankPoint(*layer.factors()), None
        for _ in range(2):
            W = layer.delta_weight().clone().requires_grad_(True)
            t = torch.randn(24, 7, dtype=D, generator=_gen(99))
            (0.5 * ((inp @ W.T - t) ** 2).sum() / 24).backward()
            G = W.grad
            opt.zero_grad()
            for part in torch.chunk(torch.arange(24), micro):
                _part_loss(inp, part, layer)
            xi = _tangent(layer)
            if clip is not None:
                norm = float(torch.sqrt(sum((g**2).sum() for g in (xi.M, xi.Up, xi.Vp))))
                torch.nn.utils.clip_grad_norm_(layer.parameters(), clip)
                c = min(1.0, clip / (norm + 1e-6))
                G, xi = G * c, xi * c
            x, state = _rule_step(spec, x, xi, state, G)
            opt.step()
            np.testing.assert_allclose(
                layer.delta_weight().numpy(), x.to_dense().numpy(), atol=1e-12
            )
        results.append(layer.delta_weight())
    assert torch.allclose(results[0], results[1], atol=1e-12)


def test_inconsistent_gradients_raise_and_captures_are_managed():
    layer = rt.LowRankLinear(10, 7, 3, bias=False, dtype=D, seed=0)
    inp, loss = _linear_case(0)
    loss(layer(inp)).backward()  # before the optimizer exists: nothing captured
    opt = rt.DLRAAdam(layer.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="no captured batch"):
        opt.step()
    opt.zero_grad()
    assert get_capture(layer.U.link).empty
    loss(layer(inp)).backward()
    torch.nn.utils.clip_grad_value_(layer.parameters(), 1e-3)  # not a common factor
    with pytest.raises(ValueError, match="not a multiple"):
        opt.step()
    opt.zero_grad()
    loss(layer(inp)).backward()
    opt.step()
    assert get_capture(layer.U.link).empty  # consumed by the step
    del opt
    gc.collect()
    assert get_capture(layer.U.link) is None  # the capture ends with its optimizer
    loss(layer(inp)).backward()  # no capture, no error


def test_grad_scaler_scales_the_capture():
    """GradScaler passes its scale to the optimizer: the captured (scaled) batch is unscaled
    like the gradients; the result equals the unscaled run."""
    out = []
    for use_scaler in (False, True):
        layer = rt.LowRankLinear(10, 7, 3, bias=False, dtype=D, seed=0)
        opt = rt.DLRAAdam(layer.parameters(), lr=0.05, rank_tol=1e-6, max_rank=5)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if use_scaler else None
        for i in range(3):
            inp, loss = _linear_case(i)
            opt.zero_grad()
            lv = loss(layer(inp))
            if scaler is None:
                lv.backward()
                opt.step()
            else:
                scaler.scale(lv).backward()
                scaler.step(opt)
                scaler.update()
        out.append(layer.delta_weight())
    assert torch.allclose(out[0], out[1], atol=1e-12)


def test_compression_never_exceeds_the_starting_rank():
    """A compressed MLP trained with DLRAAdam/DLRAHeavyBall (default max_rank: the starting
    rank): ranks may fall, never rise above the start."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    ).double()
    rt.apply_low_rank(model, rank=6, target_modules=["2"], mode="compress", seed=0)
    layer = model[2]
    x, y = torch.randn(64, 16, dtype=D), torch.randint(0, 4, (64,))
    for cls, lr in ((rt.DLRAAdam, 1e-2), (rt.DLRAHeavyBall, 0.1)):
        opt = cls(model.parameters(), lr=lr, rank_tol=1e-2)
        for _ in range(15):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            assert layer.rank <= 6
        del opt
