"""``torch.compile`` of models with rankopt layers and of the rankopt optimizer step.

The backend is ``aot_eager``: it runs Dynamo (graph capture, graph breaks) and AOT autograd
(the custom backward of the layers traced into the joint graph) without inductor's C++
compilation, which would add minutes on a 2-core CI machine and tests nothing of ours.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed (pip install -e '.[torch]')")
import torch._dynamo as dynamo  # noqa: E402
from torch import nn  # noqa: E402

import rankopt.torch as rt  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 12), nn.Tanh(),
        nn.Linear(12, 4),
    )  # fmt: skip
    return rt.apply_low_rank(model, rank=2, target_modules=["0", "3"], modules_to_save=["5"],
                             seed=0)  # fmt: skip


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 4, 4, generator=g), torch.randint(0, 4, (8,), generator=g)


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def test_model_forward_has_no_graph_break():
    """The layers' forward (input checks, precision context, custom autograd functions) is one
    graph."""
    model = _model()
    x, _ = _data()
    ex = dynamo.explain(model)(x)
    assert ex.graph_break_count == 0, [b.reason for b in ex.break_reasons]
    assert ex.graph_count == 1


def test_compiled_model_and_step_train_like_eager():
    """Compiled model (forward + custom backward) and compiled ``opt.step`` (finite check off)
    give the eager parameters (float32, 1e-5): the adapters' first step (which reads which
    layers got a gradient: a host synchronization by design) runs eagerly, then 2 compiled
    steps."""
    eager, compiled = _model(), _model()
    x, y = _data()
    opt_e = rt.RAdamW(rt.trainable_parameters(eager), lr=1e-2, check_finite=False)
    opt_c = rt.RAdamW(rt.trainable_parameters(compiled), lr=1e-2, check_finite=False)
    for model, opt in ((eager, opt_e), (compiled, opt_c)):
        _loss(model, x, y).backward()
        opt.step()
    assert compiled[0].started and compiled[3].started
    cmodel = torch.compile(compiled, backend="aot_eager")
    cstep = torch.compile(opt_c.step, backend="aot_eager")
    for _ in range(2):
        for model, opt, step in ((eager, opt_e, opt_e.step), (cmodel, opt_c, cstep)):
            opt.zero_grad()
            _loss(model, x, y).backward()
            step()
    ref = dict(eager.named_parameters())
    for name, p in compiled.named_parameters():
        assert torch.allclose(p, ref[name], rtol=1e-5, atol=1e-5), name
    assert not torch.equal(ref["3.S"], _model().get_parameter("3.S"))


def test_optimizer_step_has_no_graph_break():
    """With ``check_finite=False`` and started layers, ``opt.step`` is one graph (no host
    synchronization, nothing Dynamo cannot trace)."""
    model = _model()
    x, y = _data()
    opt = rt.RAdamW(rt.trainable_parameters(model), lr=1e-2, check_finite=False)
    _loss(model, x, y).backward()
    opt.step()  # the adapters' start reads which layers got a gradient (a documented host read)
    opt.zero_grad()
    _loss(model, x, y).backward()
    ex = dynamo.explain(opt.step)()
    assert ex.graph_break_count == 0, [b.reason.splitlines()[0] for b in ex.break_reasons]
