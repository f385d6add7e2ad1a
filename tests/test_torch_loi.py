"""``apply_low_rank(..., start="loi")``: adapters started at the locally optimal point of
Bogachev et al. (arXiv 2507.12142) from the gradient of a loss the user gives.

The start is checked against its defining property, computed independently of rankopt: with
``G`` the weight's gradient of the plain model (``loss.backward()`` on an untouched copy) and
``D = U S V^T`` the adapter's start, ``D`` has rank r and singular values ``|start_scale|``, and
its tangent space holds the top 2r singular directions of ``G``:
``||G - P_D G||_F^2 = sum_{i > 2r} sigma_i(G)^2``. In float64 both sides are sums of squares
of O(||G||) numbers: equal to ~1e-14 ||G||^2; the tests use 1e-10 ||G||_F^2 (the SVDs'
accuracy for singular values separated by more than 1e-3 ||G||, which the random data have).
"""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import rankopt.torch as rt  # noqa: E402
from rankopt.starts import LOIWarning  # noqa: E402

D = torch.float64
R = 2


class _Net(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Linear(12, 10, dtype=D)
        self.b = nn.Linear(10, 9, dtype=D)
        self.c = nn.Conv1d(3, 8, 3, padding=1, dtype=D)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=D) / 3)
        self.register_buffer("P", torch.randn(8, 9, generator=g, dtype=D))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))) + self.c(z).mean(-1) @ self.P


def _batch(seed: int = 1, n: int = 32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g, dtype=D)
    z = torch.randn(n, 3, 7, generator=g, dtype=D)
    return x, z, torch.randn(n, 9, generator=g, dtype=D)


def _loss_fn(batch):
    x, z, y = batch
    return lambda model: ((model(x, z) - y) ** 2).mean()


def _plain_grads(model: nn.Module, loss_fn) -> dict[str, torch.Tensor]:
    """The weights' gradients of an untouched copy (``.backward()``, nothing of rankopt)."""
    twin = copy.deepcopy(model)
    loss_fn(twin).backward()
    return {n: p.grad for n, p in twin.named_parameters() if n.endswith("weight")}


def _tangent_residual(Dm: torch.Tensor, G: torch.Tensor, r: int) -> torch.Tensor:
    """``||G - P_D G||_F^2`` with ``P_D G = P_U G + G P_V - P_U G P_V`` (U, V: D's column and
    row spaces, from its SVD)."""
    u, _, vh = torch.linalg.svd(Dm)
    U, V = u[:, :r], vh[:r].T
    PG = U @ (U.T @ G) + (G @ V) @ V.T - U @ (U.T @ G @ V) @ V.T
    return ((G - PG) ** 2).sum()


def _check_start(layer, G: torch.Tensor, scale: float) -> None:
    Dm = layer.delta_weight()
    sv = torch.linalg.svdvals(Dm)
    assert torch.allclose(sv[:R], torch.full((R,), abs(scale), dtype=D), rtol=1e-12, atol=0)
    assert float(sv[R:].max()) <= 1e-14 * abs(scale)
    tail = (torch.linalg.svdvals(G)[2 * R :] ** 2).sum()
    res = _tangent_residual(Dm, G, R)
    assert abs(float(res - tail)) <= 1e-10 * float((G**2).sum())
    # not a test that cannot fail: a start from the wrong singular vectors misses most of G
    assert float(res) < 0.9 * float((G**2).sum())


@pytest.mark.parametrize("scale", [1e-3, -0.5])
def test_loi_start_is_locally_optimal_for_each_layer(scale):
    """Linear and Conv1d adapters start where the tangent space holds the top 2r directions
    of their own weight's gradient (conv: the (out, in * k) matrix), singular values |scale|."""
    model, loss_fn = _Net(), _loss_fn(_batch())
    G = _plain_grads(model, loss_fn)
    rt.apply_low_rank(model, rank=R, target_modules=["a", "b", "c"], start="loi",
                      start_loss=loss_fn, start_scale=scale)  # fmt: skip
    for name in ("a", "b", "c"):
        layer = model.get_submodule(name)
        assert layer.started
        _check_start(layer, G[f"{name}.weight"].reshape(layer.delta_weight().shape), scale)
    assert model.rankopt_config["start"] == "loi"
    assert model.rankopt_config["start_scale"] == scale


def test_loi_changes_the_function_by_order_scale():
    """At conversion the outputs move by a rank-r term of norm |scale|: linearly in it."""
    batch = _batch()
    out0 = _Net()(*batch[:2]).detach()
    changes = []
    for scale in (1e-3, 1e-6):
        model = rt.apply_low_rank(_Net(), rank=R, target_modules=["a", "b", "c"], start="loi",
                                  start_loss=_loss_fn(batch), start_scale=scale)  # fmt: skip
        changes.append(float((model(*batch[:2]).detach() - out0).abs().max()))
    assert 0 < changes[1] < changes[0]
    assert changes[0] / changes[1] == pytest.approx(1e3, rel=1e-2)  # O(scale^2) curvature


def test_loi_changes_nothing_else_and_writes_no_grad():
    """Only the adapters and saved modules train afterwards (as with start='zero'); the pass
    wrote no ``.grad`` anywhere."""
    model = _Net()
    rt.apply_low_rank(model, rank=R, target_modules=["a"], start="loi",
                      start_loss=_loss_fn(_batch()))  # fmt: skip
    assert all(p.grad is None for p in model.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"a.U", "a.S", "a.V"}


def test_loi_on_gpt2_conv1d_and_tied_heads():
    """GPT-2's Conv1D (weight stored (in, out)): the start is locally optimal for the (out, in)
    matrix of the layer; c_attn, c_proj and c_fc of every block."""
    transformers = pytest.importorskip("transformers", reason="pip install -e '.[data]'")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=8,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).to(D).eval()
    ids = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(0))

    def loss_fn(m):
        return m(input_ids=ids, labels=ids).loss

    G = _plain_grads(model, loss_fn)
    rt.apply_low_rank(model, rank=R, target_modules=["c_attn", "c_proj", "c_fc"], start="loi",
                      start_loss=loss_fn)  # fmt: skip
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"):
        layer = model.get_submodule(name)
        _check_start(layer, G[f"{name}.weight"].T, 1e-3)  # Conv1D: (in, out) stored


def test_loi_on_attention_projections():
    """nn.MultiheadAttention's q/k/v blocks of in_proj_weight and out_proj each start from the
    block of the packed weight's gradient."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, dtype=D)
    q = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(1), dtype=D)

    class _Att(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = mha

        def forward(self, x):
            return self.att(x, x, x)[0]

    model = _Att()

    def loss_fn(m):
        return (m(q) ** 2).mean()

    G = _plain_grads(model, loss_fn)
    rt.apply_low_rank(model, rank=R, target_modules=["att"], start="loi", start_loss=loss_fn)
    E = 8
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        _check_start(getattr(model.att, proj), G["att.in_proj_weight"][i * E : (i + 1) * E], 1e-3)
    _check_start(model.att.out_proj, G["att.out_proj.weight"], 1e-3)


OPTIMIZERS = {
    "RAdamW": (rt.RAdamW, dict(lr=1e-3)),
    "RAdaGrad": (rt.RAdaGrad, dict(lr=1e-3)),
    "RSGD": (rt.RSGD, dict(lr=1e-3)),
    "RHeavyBall": (rt.RHeavyBall, dict(lr=1e-3)),
    "DLRAAdam": (rt.DLRAAdam, dict(lr=1e-3)),
    "DLRAHeavyBall": (rt.DLRAHeavyBall, dict(lr=1e-3)),
    "ReferenceRAdamW": (rt.ReferenceRAdamW, dict(lr=1e-3)),
    "ReferenceRAdaGrad": (rt.ReferenceRAdaGrad, dict(lr=1e-3)),
    "RAdamWElementwise": (rt.RAdamWElementwise, dict(lr=1e-3)),
    "Riemannion": (rt.Riemannion, dict(lr=1e-3)),
}


def test_every_optimizer_is_listed():
    """The table below covers every optimizer rankopt.torch exports."""
    exported = {n for n in rt.__all__ if isinstance(getattr(rt, n), type)
                and issubclass(getattr(rt, n), rt.RiemannianOptimizer)
                and getattr(rt, n) is not rt.RiemannianOptimizer}  # fmt: skip
    assert exported == set(OPTIMIZERS)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_steps_from_the_loi_start(name):
    """The first step starts from the LOI point (no adapter-start step: the layer is started)
    and, with a small learning rate, lowers the loss of the batch the start was taken on."""
    cls, kw = OPTIMIZERS[name]
    batch = _batch()
    loss_fn = _loss_fn(batch)
    model = rt.apply_low_rank(_Net(), rank=R, target_modules=["a", "b"], start="loi",
                              start_loss=loss_fn, start_scale=0.1)  # fmt: skip
    opt = cls(rt.trainable_parameters(model), **kw)
    before = float(loss_fn(model).detach())
    delta0 = model.a.delta_weight().clone()
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
    assert float(loss_fn(model).detach()) < before
    assert float((model.a.delta_weight() - delta0).norm()) > 0


def test_loi_adapters_save_and_load(tmp_path):
    """A LOI-started adapter file loads into a fresh model with the same outputs."""
    batch = _batch()
    model = rt.apply_low_rank(_Net(), rank=R, target_modules=["a", "c"], start="loi",
                              start_loss=_loss_fn(batch))  # fmt: skip
    rt.save_adapters(model, tmp_path / "ad")
    other = rt.load_adapters(_Net(), tmp_path / "ad")
    assert torch.equal(model(*batch[:2]), other(*batch[:2]))


def test_gradient_of_low_rank_warns_naming_the_module():
    """A batch of one sample gives ``a`` a gradient of rank 1 < 2r: LOIWarning names it."""
    loss_fn = _loss_fn(_batch(n=1))
    with pytest.warns(LOIWarning, match="'a'"):
        rt.apply_low_rank(_Net(), rank=R, target_modules=["a"], start="loi", start_loss=loss_fn)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(start="loi"), "start='loi' needs start_loss"),
        (dict(start="lo1", start_loss=lambda m: 0), "start must be 'zero' or 'loi'"),
        (dict(start="zero", start_loss=lambda m: 0), "start_loss is used by start='loi' only"),
        (dict(start="loi", start_loss=lambda m: 0, mode="compress"), "needs mode='adapter'"),
        (dict(start="loi", start_loss=lambda m: 0, start_scale=0.0), "start_scale must be"),
        (dict(start="loi", start_loss=lambda m: 0, start_scale=float("nan")), "start_scale"),
        (dict(start="loi", start_loss=lambda m: torch.ones(2)), "must return a scalar tensor"),
        (dict(start="loi", start_loss=lambda m: m.b.weight.sum().detach()), "does not depend"),
        (dict(start="loi", start_loss=lambda m: m.b.weight.sum()), r"no gradient reached .*'a'"),
        (dict(start="loi", start_loss=lambda m: m.a.weight.sum() * float("nan") + m.b.weight.sum()),
         "not finite"),
        (dict(start="loi", start_loss=lambda m: m.a.weight.sum(), rank=6), r"2 rank <= min"),
    ],
)  # fmt: skip
def test_bad_input_raises_before_the_model_changes(kw, msg):
    model = _Net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    kw = {"rank": R, "target_modules": ["a", "b"], **kw}
    with pytest.raises(ValueError, match=msg):
        rt.apply_low_rank(model, **kw)
    assert type(model.a) is nn.Linear and type(model.b) is nn.Linear
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert flags == [p.requires_grad for p in model.parameters()]
    assert all(p.grad is None for p in model.parameters())


def test_zero_start_is_unchanged():
    """start='zero' (the default): the function is unchanged and adapters wait for a gradient."""
    batch = _batch()
    out0 = _Net()(*batch[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = rt.apply_low_rank(_Net(), rank=R, target_modules=["a"])
    assert torch.equal(model(*batch[:2]), out0)
    assert not model.a.started
