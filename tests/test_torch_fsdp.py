"""rankopt.torch under FSDP2 (``torch.distributed.fsdp.fully_shard``; gloo, 2 processes, CPU).

One spawned run (2 processes) trains every rankopt optimizer in turn on a float64 model with
two adapters (their frozen bases sharded), a standalone low-rank layer and a plain ``nn.Linear``,
each of them ``fully_shard``-ed, with ``clip_grad_norm_`` on the DTensor gradients at every
step (it clips); then resumes RAdamW and DLRAAdam through ``torch.distributed.checkpoint``;
then checks the refusals. The main process runs every optimizer on the full batch without
FSDP. Dense weights ``U S V^T`` are compared (not factors), to the two-path tolerance of
``conftest.path_tolerance`` (7e-11 after 5 steps).
"""

from __future__ import annotations

import os
import socket

import pytest
from conftest import assert_paths_agree

torch = pytest.importorskip("torch", reason="PyTorch not installed (pip install -e '.[torch]')")
import torch.distributed as dist  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

from torch import nn  # noqa: E402

import rankopt.torch as rt  # noqa: E402

pytestmark = pytest.mark.slow

D = torch.float64
STEPS = 5
CLIP = 0.3  # below the gradient norms of these batches: clipping acts at every step
#: learning rates (any other option: the optimizer's default; rank-adaptive defaults off)
LR = {"RSGD": 0.05, "RHeavyBall": 0.05, "DLRAHeavyBall": 0.05, "RAdaGrad": 0.05,
      "ReferenceRAdaGrad": 0.05}  # fmt: skip
#: a fixed number of CG iterations: the two paths then differ by rounding only (a tolerance
#: stops them at different iterations, 4e-9 apart after 5 steps)
OPTIONS = {"RAdamWElementwise": {"cg_tol": None}}


def _optimizers() -> dict:
    """Every rankopt optimizer, at a fixed rank (FSDP2 keeps shapes fixed)."""
    out = {}
    for name, cls in rt.optim.rule_optimizers().items():
        kwargs = {"lr": LR.get(name, 0.01), **OPTIONS.get(name, {})}
        if cls.spec_class.hyperparameters().get("rank_tol") is not None:
            kwargs["rank_tol"] = None  # DLRA: the augmented BUG step at a fixed rank
        out[name] = (cls, kwargs)
    return out


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
        rt.LowRankLinear(16, 16, rank=3, seed=2), nn.Tanh(), nn.Linear(16, 5),
    ).to(D)  # fmt: skip
    # two adapters share a shape (one stack); layer 4 is a standalone low-rank layer
    return rt.apply_low_rank(
        model, rank=3, target_modules=["0", "2"], modules_to_save=["4", "6"], seed=1
    )


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(32, 12, dtype=D, generator=g), torch.randn(32, 5, dtype=D, generator=g)


def _train(model, opt, steps, rank: int = 0, world: int = 1, first: int = 0) -> None:
    for step in range(first, first + steps):
        x, t = _batch(step)
        half = x.shape[0] // world
        x, t = x[rank * half : (rank + 1) * half], t[rank * half : (rank + 1) * half]
        opt.zero_grad()
        (0.5 * ((model(x) - t) ** 2).sum(1).mean()).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        assert float(_whole(norm)) > CLIP
        opt.step()


def _whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _weights(model) -> dict:
    """Each low-rank layer's ``U S V^T`` and every trainable ordinary parameter (whole)."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, rt.LowRankLinear):
            U, S, V = (_whole(p.detach()) for p in (m.U, m.S, m.V))
            out[n] = U @ S @ V.T
    out.update({n: _whole(p.detach()) for n, p in model.named_parameters()
                if p.requires_grad and not rt.is_manifold_parameter(p)})  # fmt: skip
    return out


def _sharded_model():
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for i in (0, 2, 4, 6):
        fully_shard(model[i])
    fully_shard(model)
    return model


def _resume(name: str, rank: int, world: int, ckpt: str) -> dict:
    """3 steps, a torch.distributed.checkpoint save; a new model and optimizer loaded from it
    (DCP's state-dict API: its template step at lr 0), 2 more steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    cls, kwargs = _optimizers()[name]
    model = _sharded_model()
    opt = cls(model.parameters(), **kwargs)
    _train(model, opt, 3, rank, world)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    model = _sharded_model()
    opt = cls(model.parameters(), **kwargs)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _train(model, opt, STEPS - 3, rank, world, first=3)
    return _weights(model)


def _refusals() -> dict:
    """The error messages of the unsupported: rank-adaptive optimizers on sharded layers."""
    out = {}
    for key, (cls, kwargs) in {"rank_tol": (rt.RAdamW, dict(rank_tol=1e-3)),
                               "DLRAAdam": (rt.DLRAAdam, {})}.items():  # fmt: skip
        try:
            cls(_sharded_model().parameters(), lr=0.01, **kwargs)
            out[key] = ""
        except ValueError as e:
            out[key] = str(e)
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        out = {}
        for name, (cls, kwargs) in _optimizers().items():
            model = _sharded_model()
            assert all(rt.is_manifold_parameter(model[4].get_parameter(f)) for f in "USV")
            _train(model, cls(model.parameters(), **kwargs), STEPS, rank, world)
            out[name] = _weights(model)
        for name in ("RAdamW", "DLRAAdam"):
            out[f"resumed {name}"] = _resume(name, rank, world, os.path.join(out_dir, name))
        out["refusals"] = _refusals()
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """The two processes' results (one spawned run for every test of this module)."""
    out = tmp_path_factory.mktemp("fsdp")
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name", sorted(_optimizers()))
def test_fsdp_equals_one_process(fsdp_run, name, one_torch_thread):
    """Each optimizer on two FSDP2 processes (half of every batch each; factors, gradients and,
    for DLRA and the reference rules, the captured batches reduced) equals one process on the
    full batch, and both processes hold the same weights."""
    cls, kwargs = _optimizers()[name]
    single = _model()
    _train(single, cls(single.parameters(), **kwargs), STEPS)
    ref = _weights(single)
    assert_paths_agree(fsdp_run[0][name], fsdp_run[1][name], STEPS)
    assert_paths_agree(fsdp_run[0][name], ref, STEPS)
    assert float((ref["0"] - _model()[0].delta_weight()).norm()) > 0  # the adapters moved


@pytest.mark.parametrize("name", ["RAdamW", "DLRAAdam"])
def test_fsdp_resume_through_distributed_checkpoint(fsdp_run, name):
    """Saved after 3 steps with torch.distributed.checkpoint, loaded into a new model and
    optimizer, 2 more steps: the uninterrupted run's weights."""
    for r in range(2):
        assert_paths_agree(fsdp_run[r][f"resumed {name}"], fsdp_run[r][name], STEPS)


def test_fsdp_refuses_rank_adaptive_steps(fsdp_run):
    """A rank change would resize sharded parameters: refused when the optimizer is made,
    naming the fixed-rank alternative."""
    for r in range(2):
        msgs = fsdp_run[r]["refusals"]
        assert "rank_tol=None" in msgs["rank_tol"] and "FSDP2" in msgs["rank_tol"]
        assert "rank_tol=None" in msgs["DLRAAdam"] and "ignored_params" in msgs["DLRAAdam"]
