"""A torch optimizer step is taken whole or not at all, and no hyperparameter is silently wrong.

* **A failed step changes nothing.** Every optimizer, on a model with low-rank layers and an
  ordinary ``nn.Linear`` (float64): a far too large ``lr`` (a non-finite update or a failed
  factorization inside the rule), a rule step that raises halfway through a step (after another
  stack of layers was computed), a rule step whose result is not finite. After the error every
  parameter, every optimizer state tensor and ``state_dict()`` are bitwise as before (nothing
  may have been written), and a later step with a sane ``lr`` goes through.
* **Hyperparameters are checked at every step**, also when set in ``param_groups`` after
  construction, by a ``ValueError`` naming the group, the option and its value.
* **Rank options the rule would ignore or clip are refused**, naming the layer, its rank and
  its rank budget.
"""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed (pip install -e '.[torch]')")
from torch import nn  # noqa: E402

import rankopt.torch as rt  # noqa: E402
from rankopt import FixedRankPoint  # noqa: E402

D = torch.float64
HUGE_LR = 1e308  # finite, but every optimizer's low-rank update overflows with it

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: every torch optimizer of rankopt
OPTIMIZERS = {
    "RAdamW": (rt.RAdamW, dict(lr=0.02, weight_decay=0.1)),
    "RAdaGrad": (rt.RAdaGrad, dict(lr=0.05, lr_decay=0.1)),
    "RSGD": (rt.RSGD, dict(lr=0.05, momentum=0.9)),
    "RHeavyBall": (rt.RHeavyBall, dict(lr=0.05)),
    "Riemannion": (rt.Riemannion, dict(lr=0.05)),
    "DLRAAdam": (rt.DLRAAdam, dict(lr=0.02)),
    "DLRAHeavyBall": (rt.DLRAHeavyBall, dict(lr=0.05)),
    "ReferenceRAdamW": (rt.ReferenceRAdamW, dict(lr=0.01)),
    "ReferenceRAdaGrad": (rt.ReferenceRAdaGrad, dict(lr=0.05)),
    "RAdamWElementwise": (rt.RAdamWElementwise, dict(lr=0.01)),
}
#: and the rank-adaptive retraction (per-layer results, resized parameters)
CASES = {**OPTIMIZERS, "RAdamW-rank_tol": (rt.RAdamW, dict(lr=0.02, rank_tol=1e-3))}


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


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _model(two_shapes: bool = False) -> nn.Module:
    """A low-rank layer 6 x 8 of rank 3 (and one 5 x 6 of rank 2: a second stack) and an
    ordinary ``nn.Linear``."""
    torch.manual_seed(0)
    mods = [rt.LowRankLinear(8, 6, 3, dtype=D, seed=0), nn.Tanh()]
    if two_shapes:
        mods += [rt.LowRankLinear(6, 5, 2, dtype=D, seed=1), nn.Tanh()]
    mods.append(nn.Linear(5 if two_shapes else 6, 2).double())
    return nn.Sequential(*mods)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(12, 8, dtype=D, generator=g), torch.randn(12, 2, dtype=D, generator=g)


def _backward(model, opt, seed: int = 0) -> None:
    x, t = _batch(seed)
    opt.zero_grad()
    ((model(x) - t) ** 2).sum().backward()


def _train(model, opt, steps: int) -> None:
    for i in range(steps):
        _backward(model, opt, i)
        opt.step()


def _snapshot(model, opt) -> dict:
    """Copies of the parameters (with their shapes), the optimizer's state and ``state_dict()``,
    the layers' ``started`` flags."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "state": {id(p): copy.deepcopy(dict(st)) for p, st in opt.state.items()},
        "state_dict": copy.deepcopy(opt.state_dict()),
        "started": [m.started for m in model.modules() if isinstance(m, rt.LowRankLinear)],
    }


def _assert_same(a, b, where: str = "") -> None:
    """Bitwise equality of nested dicts / lists of tensors and numbers."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(map(str, a)), sorted(b))
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _assert_same(u, v, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    else:
        assert a == b or (a != a and b != b), (where, a, b)


def _assert_unchanged(before: dict, model, opt) -> None:
    _assert_same(before, _snapshot(model, opt))


def _assert_step_taken(before: dict, model) -> None:
    after = {n: p.detach() for n, p in model.named_parameters()}
    assert all(bool(torch.isfinite(p).all()) for p in after.values())
    moved = [
        n
        for n, p in before["params"].items()
        if p.shape != after[n].shape or not torch.equal(p, after[n])
    ]
    assert "0.S" in moved and any(n.endswith(".bias") for n in moved), moved


# ---------------------------------------------------------------------------
# a failed step changes nothing
# ---------------------------------------------------------------------------


#: optimizers whose low-rank update grows with lr times the gradient; Riemannion's step is
#: orthogonalized (spectral norm lr), so lr = 1e308 gives finite weights (the test below)
OVERFLOWING = [name for name in CASES if name != "Riemannion"]


def test_riemannion_far_too_large_lr_is_a_finite_step_of_that_length():
    """Riemannion's step ``X - lr D`` has ``D`` the tangent part of an orthogonal factor (spectral
    norm of order 1, whatever the gradient): with lr = 1e308 the weights stay finite, the step is
    taken, and the moved weight has a spectral norm between lr / 2 and 2 lr."""
    model = _model()
    factors = list(rt.manifold_parameters(model))
    others = [p for p in model.parameters() if all(p is not q for q in factors)]
    # the ordinary parameters at a sane lr: torch's AdamW itself overflows at lr = 1e308
    opt = rt.Riemannion([{"params": factors, "lr": HUGE_LR}, {"params": others}], lr=0.01)
    _backward(model, opt, 7)
    before = _snapshot(model, opt)
    opt.step()
    _assert_step_taken(before, model)
    low = [m for m in model.modules() if isinstance(m, rt.LowRankLinear)]
    for layer in low:
        W = layer.delta_weight()
        assert bool(torch.isfinite(W).all())
        assert 0.5 <= float(torch.linalg.matrix_norm(W, 2)) / HUGE_LR <= 2.0


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # NumPy, in the rule
@pytest.mark.parametrize("steps_before", [0, 2])
@pytest.mark.parametrize("name", OVERFLOWING)
def test_a_far_too_large_lr_changes_nothing(name, steps_before):
    """lr = 1e308: the low-rank update overflows (a non-finite result, or a factorization of
    non-finite values inside the rule). The error names the layer and lr; parameters, state and
    state_dict are bitwise unchanged (also at the first step, when there is no state yet: none
    is created); the same gradients then step with a sane lr, and so does a new backward."""
    cls, kw = CASES[name]
    model = _model()
    opt = cls(model.parameters(), **kw)
    _train(model, opt, steps_before)
    opt.param_groups[0]["lr"] = HUGE_LR
    _backward(model, opt, 7)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError) as info:
        opt.step()
    msg = str(info.value)
    assert re.search(r"low-rank layer 6 x 8 of rank \d in param group 0", msg), msg
    assert "lr=1e+308 too large?" in msg and "step was not taken" in msg, msg
    _assert_unchanged(before, model, opt)
    opt.param_groups[0]["lr"] = kw["lr"]
    opt.step()  # the same backward: a failed step kept what it needs
    _assert_step_taken(before, model)
    _train(model, opt, 2)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_reference_radamw_lr_1e300_names_lr_and_leaves_the_bias():
    """The reported case: ReferenceRAdamW(lr=1e300), one step: the rule's SVD meets non-finite
    values. The error names the layer and lr; the bias (an ordinary parameter) is not moved."""
    model = _model()
    opt = rt.ReferenceRAdamW(model.parameters(), lr=1e300)
    _backward(model, opt)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"layer 6 x 8 of rank 3 .*LinAlgError.*lr=1e\+300 too"):
        opt.step()
    _assert_unchanged(before, model, opt)
    assert opt.state_dict()["state"] == {}


def _failing_rule_step(monkeypatch, cls, fail_at: int, poison: bool = False) -> list:
    """Make the ``fail_at``-th call of the rule's step raise after computing (``poison``:
    return a NaN point instead). Returns the list of calls made."""
    spec_class = cls.spec_class
    original = spec_class.step
    calls = []

    def step(self, *args, **kwargs):
        x, state = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == fail_at:
            if not poison:
                raise RuntimeError("the rule failed halfway through the step")
            bad = lambda p: FixedRankPoint(p.U, p.s * math.nan, p.V)  # noqa: E731
            x = [bad(x[0]), *x[1:]] if isinstance(x, list) else bad(x)
        return x, state

    monkeypatch.setattr(spec_class, "step", step)
    return calls


@pytest.mark.parametrize("check_finite", [True, False])
@pytest.mark.parametrize("steps_before", [0, 2])
@pytest.mark.parametrize("name", list(CASES))
def test_a_rule_that_raises_halfway_changes_nothing(name, steps_before, check_finite, monkeypatch):
    """Two stacks of layers (two shapes): the rule's second call raises after the first stack's
    step was computed. Nothing is written (no host read needed: also with check_finite=False);
    the error propagates, with a note naming the layer; the retried step goes through."""
    cls, kw = CASES[name]
    model = _model(two_shapes=True)
    opt = cls(model.parameters(), check_finite=check_finite, **kw)
    _train(model, opt, steps_before)
    _backward(model, opt, 7)
    before = _snapshot(model, opt)
    calls = _failing_rule_step(monkeypatch, cls, fail_at=2)
    with pytest.raises(RuntimeError, match="failed halfway") as info:
        opt.step()
    assert len(calls) == 2
    notes = " ".join(getattr(info.value, "__notes__", ["the step was not taken"]))
    assert "the step was not taken" in notes, notes
    _assert_unchanged(before, model, opt)
    monkeypatch.undo()
    opt.step()
    _assert_step_taken(before, model)


@pytest.mark.parametrize("name", list(CASES))
def test_a_non_finite_rule_result_is_refused(name, monkeypatch):
    """The rule returns a point with NaN for the second stack: the finite check names that layer
    and what is not finite, and nothing is written."""
    cls, kw = CASES[name]
    model = _model(two_shapes=True)
    opt = cls(model.parameters(), **kw)
    _train(model, opt, 1)
    _backward(model, opt, 7)
    before = _snapshot(model, opt)
    _failing_rule_step(monkeypatch, cls, fail_at=2, poison=True)
    with pytest.raises(
        ValueError, match=r"layer 5 x 6 of rank \d .*not finite \(inf or NaN in its"
    ):
        opt.step()
    _assert_unchanged(before, model, opt)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_adapters_stay_unstarted_after_a_failed_first_step(name, monkeypatch):
    """An adapter's first step that fails leaves it unstarted, with no optimizer state."""
    cls, kw = OPTIMIZERS[name]
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    model = rt.apply_low_rank(base, rank=3, target_modules=["0"], modules_to_save=["2"], seed=0)
    opt = cls(rt.trainable_parameters(model), **kw)
    _backward(model, opt)
    before = _snapshot(model, opt)
    assert before["started"] == [False]
    _failing_rule_step(monkeypatch, cls, fail_at=1)
    with pytest.raises(RuntimeError, match="failed halfway"):
        opt.step()
    _assert_unchanged(before, model, opt)
    monkeypatch.undo()
    opt.step()
    assert model[0].started


# ---------------------------------------------------------------------------
# hyperparameters set in param_groups are checked at every step
# ---------------------------------------------------------------------------

BAD_OPTIONS = [
    ("lr", -1.0),
    ("lr", math.nan),
    ("lr", math.inf),
    ("weight_decay", -0.1),
    ("weight_decay", math.inf),
    ("eps", 0.0),
    ("metric_eps", -1.0),
    ("betas", (0.9, 1.5)),
    ("momentum", -0.5),
    ("lr_decay", -1.0),
    ("initial_accumulator_value", -1.0),
    ("dampening", 1.5),
    ("rank_tol", -1.0),  # checked by the rule spec, named with the group
]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_bad_hyperparameters_in_param_groups_are_refused_at_the_step(name):
    """Each option the optimizer has, set to a bad value in param_groups after construction:
    the step raises a ValueError naming the group, the option and the value, before anything
    moves; with the option restored the step goes through."""
    cls, kw = OPTIMIZERS[name]
    model = _model()
    opt = cls(model.parameters(), **kw)
    _train(model, opt, 1)
    _backward(model, opt, 3)
    group = opt.param_groups[0]
    tried = 0
    for key, bad in BAD_OPTIONS:
        if key not in group:
            continue
        good, group[key] = group[key], bad
        before = _snapshot(model, opt)
        with pytest.raises(
            ValueError, match=rf"param group 0: invalid .*{re.escape(f'{key}={bad!r}')}"
        ):
            opt.step()
        _assert_unchanged(before, model, opt)
        group[key] = good
        tried += 1
    assert tried >= 5
    before = _snapshot(model, opt)
    opt.step()
    _assert_step_taken(before, model)


@pytest.mark.parametrize("name", ["RAdamW", "RSGD", "DLRAAdam"])
def test_negative_lr_in_a_second_group_moves_no_group(name):
    """The reported case (lr = -1 set after construction would step uphill): with two groups,
    a bad lr in group 1 is named, and group 0 is not moved either."""
    cls, kw = OPTIMIZERS[name]
    model = _model()
    opt = cls([{"params": model[0].parameters()}, {"params": model[2].parameters()}], **kw)
    _train(model, opt, 1)
    opt.param_groups[1]["lr"] = -1.0
    _backward(model, opt, 3)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"param group 1: invalid learning rate lr=-1\.0"):
        opt.step()
    _assert_unchanged(before, model, opt)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_tensor_lr(name):
    """A 0-d tensor lr (as torch accepts) steps as the same float lr (to rounding); a negative
    one is refused by the finite check before anything moves; one of another shape at once."""
    cls, kw = OPTIMIZERS[name]
    models = [_model(), _model()]
    opts = [
        cls(models[0].parameters(), **kw),
        cls(models[1].parameters(), **{**kw, "lr": torch.tensor(kw["lr"], dtype=D)}),
    ]
    for model, opt in zip(models, opts, strict=True):
        _train(model, opt, 2)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-13)
    model, opt = models[1], opts[1]
    opt.param_groups[0]["lr"] = torch.tensor(-1.0, dtype=D)
    _backward(model, opt, 5)
    before = _snapshot(model, opt)
    with pytest.raises(
        ValueError, match=r"param group 0: invalid learning rate lr=-1\.0 \(a tensor"
    ):
        opt.step()
    _assert_unchanged(before, model, opt)
    opt.param_groups[0]["lr"] = torch.tensor([0.01, 0.02], dtype=D)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="param group 0: invalid lr=.*0-d"):
        opt.step()
    _assert_unchanged(before, model, opt)


def test_tensor_lr_with_foreach_adamw_is_refused_as_torch_does():
    """torch's AdamW refuses a tensor lr with foreach=True (not capturable): so do the
    optimizers that use it for ordinary parameters, at construction."""
    model = _model()
    with pytest.raises(ValueError, match="param group 0: a tensor lr needs foreach=False"):
        rt.RAdamW(model.parameters(), lr=torch.tensor(0.01), foreach=True)


# ---------------------------------------------------------------------------
# rank options
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [rt.DLRAAdam, rt.DLRAHeavyBall])
def test_dlra_min_rank_above_the_rank_budget_is_refused(cls):
    """DLRA with max_rank=None keeps each layer's starting rank as its budget: min_rank=8 on a
    rank-3 layer would be clipped to 3 without a word. Refused at construction, and when set in
    param_groups later (at the step, nothing moved)."""
    model = _model()
    with pytest.raises(ValueError, match=r"min_rank=8 .*layer 6 x 8 of rank 3.*at most 3"):
        cls(model.parameters(), lr=0.01, min_rank=8)
    with pytest.raises(ValueError, match=r"min_rank=7 .*layer 6 x 8 of rank 3.*at most 6 \(min"):
        cls(model.parameters(), lr=0.01, min_rank=7, max_rank=8)
    opt = cls(model.parameters(), lr=0.01)
    _train(model, opt, 1)
    opt.param_groups[0]["min_rank"] = 8
    _backward(model, opt, 3)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"param group 0: min_rank=8 .*budget"):
        opt.step()
    _assert_unchanged(before, model, opt)


@pytest.mark.parametrize("cls", [rt.DLRAAdam, rt.DLRAHeavyBall])
def test_dlra_min_rank_within_the_budget_raises_the_rank(cls):
    """min_rank within the budget acts (no warning): rank 3 grows to min_rank=5 <= max_rank."""
    model = _model()
    opt = cls(model.parameters(), lr=0.01, min_rank=5, max_rank=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, opt, 1)
    assert model[0].rank >= 5


@pytest.mark.parametrize("cls", [rt.RAdamW, rt.RAdaGrad, rt.RSGD, rt.RAdamWElementwise])
def test_rank_options_without_rank_tol_are_refused(cls):
    """Without rank_tol the retraction keeps the rank: min_rank / max_rank would be ignored."""
    model = _model()
    with pytest.raises(ValueError, match=r"max_rank=4 would be ignored.*without rank_tol"):
        cls(model.parameters(), max_rank=4)
    with pytest.raises(ValueError, match=r"min_rank=2 would be ignored.*without rank_tol"):
        cls(model.parameters(), min_rank=2)
    with pytest.raises(ValueError, match=r"min_rank=7 .*layer 6 x 8 of rank 3.*at most 6"):
        cls(model.parameters(), rank_tol=1e-3, min_rank=7)
    opt = cls(model.parameters(), rank_tol=1e-3, min_rank=5)  # the rank grows towards it
    _train(model, opt, 1)
    assert model[0].rank >= 5


@pytest.mark.parametrize("cls", [rt.ReferenceRAdamW, rt.ReferenceRAdaGrad])
def test_reference_rank_options_are_checked(cls):
    """The reference rules never raise the rank; faithful=True hard-codes the smallest rank."""
    model = _model()
    with pytest.raises(ValueError, match=r"min_rank=4 .*layer 6 x 8 of rank 3.*at most 3"):
        cls(model.parameters(), rank_tol=0.1, min_rank=4)
    with pytest.raises(ValueError, match=r"min_rank=2 would be ignored.*faithful=True"):
        cls(model.parameters(), rank_tol=0.1, faithful=True, min_rank=2)
    with pytest.raises(ValueError, match=r"min_rank=2 would be ignored.*without rank_tol"):
        cls(model.parameters(), min_rank=2)
    cls(model.parameters(), rank_tol=0.1, min_rank=3)
