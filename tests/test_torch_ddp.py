"""rankopt.torch under DistributedDataParallel (gloo backend, 2 processes on localhost)."""

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

D = torch.float64
STEPS = 4


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
        nn.Linear(16, 5),
    ).double()  # fmt: skip
    # two adapters share a shape (one stack), one does not
    return rt.apply_low_rank(
        model, rank=3, target_modules=["0", "2", "4"], modules_to_save=["6"], seed=1
    )


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(32, 12, dtype=D, generator=g), torch.randn(32, 5, dtype=D, generator=g)


def _train(model, rank: int = 0, world: int = 1, stack_layers: bool = True):
    opt = rt.RAdamW(rt.trainable_parameters(model), lr=0.05, stack_layers=stack_layers)
    for step in range(STEPS):
        x, t = _batch(step)
        half = x.shape[0] // world
        x, t = x[rank * half : (rank + 1) * half], t[rank * half : (rank + 1) * half]
        opt.zero_grad()
        (0.5 * ((model(x) - t) ** 2).sum(1).mean()).backward()
        opt.step()
    return opt


def _weights(model) -> dict:
    """Each adapter's ``U S V^T`` (independent of how it is factored) and every ordinary
    parameter."""
    out = {n: m.delta_weight() for n, m in model.named_modules() if isinstance(m, rt.LowRankLinear)}
    out.update({n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
    return {k: v for k, v in out.items() if not k.endswith((".U", ".S", ".V"))}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        _train(ddp, rank, world)
        torch.save(_weights(model), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_replicas_agree_and_equal_single_process(tmp_path):
    """Two gloo replicas, each on half of every batch, with stacked layer groups: the
    all-reduced tangent pieces (and the adapter's first-step sketches) give replicas that agree,
    and equal one process on the full batch moving each layer alone (``stack_layers=False``, the
    per-layer path), to the two-path tolerance (conftest.path_tolerance: the averaged gradients
    round differently from the full batch's)."""
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    torch.set_num_threads(1)
    single = _model()
    _train(single, stack_layers=False)
    ref = _weights(single)
    assert_paths_agree(r0, r1, STEPS)
    assert_paths_agree(r0, ref, STEPS)
    assert all(float(ref[k].norm()) > 0 for k in ("0", "2", "4"))  # every adapter moved (from 0)
