"""``torch.compile(opt.step)`` compiles once, with torch's default ``zero_grad()`` (set_to_none).

A backend counts the graphs Dynamo compiles at each of 20 steps and the calls of compiled graphs
(Dynamo's graphs run as they are: what recompiles is decided by Dynamo's guards, not by the
backend; the finite-check test uses ``aot_eager``, whose functionalized graphs apply the writes
after the graph, as inductor's do). The first step starts the adapters: that bucket's update
(which layers got a gradient: a host read) runs eagerly inside the compiled step
(``torch.compiler.disable``, one graph break), the rest of it is compiled; the second step
compiles the step of started layers, ONE graph without a break with the default
``check_finite=True`` (the finite check's host read is an operator of the graph); later steps
compile nothing and call that graph. Rank-adaptive rules read the new ranks on the host: their
update runs eagerly in the same way, and nothing recompiles while the ranks do not change.
"""

from __future__ import annotations

import pytest
from conftest import assert_paths_agree

torch = pytest.importorskip("torch", reason="PyTorch not installed (pip install -e '.[torch]')")
import torch._dynamo as dynamo  # noqa: E402
from torch import nn  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import rankopt.torch as rt  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

STEPS = 20


class _Counting:
    """A ``torch.compile`` backend counting compiled graphs and their calls (runs them as
    Dynamo traced them)."""

    def __init__(self) -> None:
        self.compiled = 0
        self.calls = 0

    def __call__(self, gm, example_inputs):
        self.compiled += 1

        def run(*args):
            self.calls += 1
            return gm.forward(*args)

        return run


def _model(dtype=torch.float32):
    """An adapter (started by the first step), a standalone low-rank layer and a plain
    ``nn.Linear`` (torch's rule: the ``.grad`` that ``zero_grad()`` replaces at every step)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 12), nn.Tanh(), rt.LowRankLinear(12, 12, rank=2, seed=3), nn.Tanh(),
        nn.Linear(12, 4),
    ).to(dtype)  # fmt: skip
    return rt.apply_low_rank(model, rank=2, target_modules=["0"], modules_to_save=["2", "4"],
                             seed=0)  # fmt: skip


def _data(step: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 16, generator=g, dtype=dtype), torch.randint(0, 4, (8,), generator=g)


def _ranks(model) -> list[int]:
    return [m.rank for m in model.modules() if isinstance(m, rt.LowRankLinear)]


def _run(make_opt, steps: int = STEPS) -> dict:
    """Train ``steps`` compiled steps; per step: graphs compiled, compiled-graph calls, graph
    breaks met while compiling, and the ranks after the step."""
    dynamo.reset()  # the recompile limit counts per code object: start from a clean cache
    model = _model()
    opt = make_opt(rt.trainable_parameters(model))
    backend = _Counting()
    step = torch.compile(opt.step, backend=backend)
    out = {"compiled": [], "calls": [], "breaks": [], "ranks": []}
    for i in range(steps):
        x, y = _data(i)
        opt.zero_grad()  # set_to_none=True: new .grad tensors at every backward
        nn.functional.cross_entropy(model(x), y).backward()
        c0, k0, b0 = backend.compiled, backend.calls, sum(counters["graph_break"].values())
        step()
        out["compiled"].append(backend.compiled - c0)
        out["calls"].append(backend.calls - k0)
        out["breaks"].append(sum(counters["graph_break"].values()) - b0)
        out["ranks"].append(_ranks(model))
    return out


FIXED = {
    "RAdamW": lambda p: rt.RAdamW(p, lr=1e-2),
    "RSGD": lambda p: rt.RSGD(p, lr=1e-2),
}


@pytest.mark.parametrize("name", sorted(FIXED))
def test_fixed_rank_step_compiles_at_most_twice(name):
    """Default ``zero_grad()`` and ``check_finite=True``: graphs are compiled at the first
    (adapter-start) step (the graphs around the eager start, and those around the retraction's
    NumPy draw of its test matrix, once per shape: 16 measured) and at the second; the second
    is ONE graph (no break); steps 3 to 20 compile nothing and each calls that graph."""
    out = _run(FIXED[name])
    assert out["compiled"][0] > 0 and out["compiled"][1] == 1, out["compiled"]
    assert out["breaks"][1:] == [0] * (STEPS - 1), out["breaks"]
    assert out["compiled"][2:] == [0] * (STEPS - 2), out["compiled"]
    assert out["calls"][2:] == [1] * (STEPS - 2), out["calls"]


ADAPTIVE = {
    "DLRAAdam": lambda p: rt.DLRAAdam(p, lr=1e-2),  # rank_tol=1e-3, budget: the start rank
    "RAdamW-rank_tol": lambda p: rt.RAdamW(p, lr=1e-2, rank_tol=1e-3, max_rank=2),
}


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_rank_adaptive_step_compiles_at_most_twice_while_ranks_stay(name):
    """Rank-adaptive optimizers read the new ranks on the host: their update runs eagerly in
    the compiled step (a graph break by design), the graphs around it are compiled at the first
    two steps, and nothing is compiled after the second step while the ranks do not change
    (they do not here); every later step calls the same compiled graphs."""
    out = _run(ADAPTIVE[name])
    assert all(r == out["ranks"][0] for r in out["ranks"]), out["ranks"]
    assert out["compiled"][2:] == [0] * (STEPS - 2), out["compiled"]
    assert out["calls"][2] > 0 and len(set(out["calls"][2:])) == 1, out["calls"]


def test_compiled_finite_check_raises_and_changes_nothing():
    """A NaN gradient in a compiled step (``aot_eager``): the eager message (naming the
    layer), no parameter and no optimizer state changed; the next step goes through. Before
    that, the compiled step with the check (its writes gated on the check's result) gives the
    eager optimizer's low-rank weights (float64, 5 steps; the path tolerance of ``conftest``)."""
    dynamo.reset()
    runs = {}
    for compiled in (True, False):
        model = _model(torch.float64)
        # the low-rank layers only: torch's compiled AdamW keeps its step count in float32
        # (bias corrections ~1e-7 off in float64; eager reads it as a Python float)
        params = [p for p in rt.trainable_parameters(model) if rt.is_manifold_parameter(p)]
        opt = rt.RAdamW(params, lr=1e-2)
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for i in range(5):
            x, y = _data(i, torch.float64)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            step()
        runs[compiled] = (model, opt, step)
    weights = {c: {k: v.detach() for k, v in runs[c][0].named_parameters()} for c in runs}
    assert_paths_agree(weights[True], weights[False], 5)
    model, opt, step = runs[True]
    x, y = _data(5, torch.float64)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved = [
        {k: v.clone() for k, v in st.items() if torch.is_tensor(v)} for st in opt.state.values()
    ]
    model[2].U.grad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite gradient .* \(m, n, r\) = \(12, 12, 2\)"):
        step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    after = [{k: v for k, v in st.items() if torch.is_tensor(v)} for st in opt.state.values()]
    assert all(torch.equal(a[k], s[k]) for a, s in zip(after, saved, strict=True) for k in s)
    model[2].U.grad[0, 0] = 0.0
    step()
    assert not torch.equal(before["2.S"], model.state_dict()["2.S"])
