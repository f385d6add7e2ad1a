r"""Low-rank layers under FSDP2 (``torch.distributed.fsdp.fully_shard``): gather, step, keep shards.

``fully_shard`` replaces every parameter by a ``DTensor`` sharded along dim 0 (placement
``Shard(0)``; HSDP adds ``Replicate()`` mesh dimensions): each process holds a block of rows of
``U`` (m x r), ``S`` (r x r) and ``V`` (n x r) and, after the backward's reduce-scatter, the same
rows of their gradients. The manifold step needs whole factors (a QR of ``[U, U_p]``, an SVD of
a 2r x 2r core), so per step the optimizer

1. **gathers** the thin factors and their gradients of every sharded layer with ONE all-gather
   per process group and dtype (:func:`gather_full`): ``2 (m + n + r) r`` numbers per layer, each
   process receiving the other processes' rows;
2. **steps** on the whole factors, the same computation on every process (same inputs, same
   result), with the rule state kept whole on every process (O((m + n) r) per layer, replicated);
3. **keeps its shard**: each process writes its own rows of the new factors into its local shard
   (:func:`local_pairs`), with no communication.

The rules that need the backward's batch (:mod:`rankopt.torch.captures`) all-reduce what they
read of it (:func:`all_reduce_parts`): the sketches ``G V``, ``G^T U``, ``U^T G V`` of the local
batch (``(m + n + r) r`` numbers per layer) and the DLRA normal block (``4 r^2``), or the dense
``m x n`` gradient of the reference rules. Ranks are fixed: FSDP2's parameters have fixed
shapes, so rank-adaptive steps are refused (:func:`check_fixed_rank`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

try:  # torch built without distributed support: nothing is ever sharded
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = Replicate = Shard = None

__all__ = [
    "is_sharded",
    "any_sharded",
    "gather_full",
    "local_pairs",
    "all_reduce_parts",
    "sum_over_shards",
    "full_tensor",
    "local",
    "check_fixed_rank",
    "check_same_rank",
]


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter or gradient of an FSDP2-sharded module)."""
    return DTensor is not None and isinstance(t, DTensor)


def any_sharded(tensors: Any) -> bool:
    """Whether one of ``tensors`` is sharded (Python isinstance checks only)."""
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a ``DTensor`` (in place: writing it writes the parameter), else ``t``."""
    return t.to_local() if is_sharded(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ``DTensor`` (a collective: every process must call it), else ``t``."""
    return t.full_tensor() if is_sharded(t) else t


def _shard_dim(t: Any) -> int:
    """The mesh dimension along which ``t`` is sharded (its rows); refuses other layouts."""
    dims = [d for d, p in enumerate(t.placements) if not isinstance(p, Replicate)]
    if len(dims) != 1 or t.placements[dims[0]] != Shard(0):
        raise ValueError(
            f"a low-rank factor of shape {tuple(t.shape)} has the placements {t.placements}: "
            "rankopt's optimizers support FSDP2's row sharding (Shard(0), with Replicate() mesh "
            "dimensions for HSDP) only; use fully_shard without shard_placement_fn for the "
            "low-rank layers"
        )
    return dims[0]


def _rows(t: Any) -> tuple[int, int, int, Any]:
    """``(start, stop, chunk, group)``: this process's rows of ``t`` (``torch.chunk`` layout, as
    FSDP2 and DTensor split), the rows per process, and the process group of the shards."""
    d = _shard_dim(t)
    mesh = t.device_mesh
    world, me, m = mesh.size(d), mesh.get_local_rank(d), t.shape[0]
    chunk = -(-m // world)
    start = min(me * chunk, m)
    stop = min(start + chunk, m)
    if t.to_local().shape[0] != stop - start:
        raise ValueError(
            f"a sharded low-rank factor of shape {tuple(t.shape)} holds "
            f"{t.to_local().shape[0]} rows on this process, not the {stop - start} of an even "
            "Shard(0) split: rankopt's optimizers support FSDP2's default layout only"
        )
    return start, stop, chunk, mesh.get_group(d)


def gather_full(tensors: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """``{id(t): whole tensor}`` of the ``DTensor`` among ``tensors``: one all-gather per process
    group, dtype and device (every process must call it with the same list). Each process sends
    its rows padded to the chunk size; the whole tensor is the first ``m`` gathered rows."""
    by_key: dict[tuple, list] = {}
    for t in tensors:
        if is_sharded(t):
            start, stop, chunk, group = _rows(t)
            by_key.setdefault((id(group), t.dtype, t.device), []).append((t, chunk, group))
    out: dict[int, torch.Tensor] = {}
    for items in by_key.values():
        group = items[0][2]
        world = dist.get_world_size(group)
        parts, sizes = [], []
        for t, chunk, _ in items:
            row = math.prod(t.shape[1:])
            mine = t.to_local().detach().reshape(-1)
            parts.append(torch.nn.functional.pad(mine, (0, chunk * row - mine.numel())))
            sizes.append(chunk * row)
        send = torch.cat(parts)
        recv = send.new_empty(world * send.numel())
        _all_gather(recv, send, group)
        recv = recv.view(world, send.numel())
        offset = 0
        for (t, chunk, _), size in zip(items, sizes, strict=True):
            rows = recv[:, offset : offset + size].reshape(world * chunk, *t.shape[1:])
            out[id(t)] = rows[: t.shape[0]]
            offset += size
    return out


def _all_gather(recv: torch.Tensor, send: torch.Tensor, group: Any) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(recv, send, group=group)


def local_pairs(dst: list[torch.Tensor], src: list[torch.Tensor]) -> tuple[list, list]:
    """``(dst, src)`` for a copy of whole tensors ``src`` into parameters ``dst``: a sharded
    parameter becomes its local shard and its source this process's rows."""
    out_dst, out_src = [], []
    for d, s in zip(dst, src, strict=True):
        if is_sharded(d):
            start, stop, _, _ = _rows(d)
            d, s = d.to_local(), s[start:stop]
        out_dst.append(d)
        out_src.append(s)
    return out_dst, out_src


def _groups(like: torch.Tensor, dims: str) -> list:
    """The process groups of ``like``'s mesh: of every dimension (``"all"``: every process has
    its own batch) or of the dimensions that are not replicated (``"shards"``)."""
    mesh = like.device_mesh
    return [mesh.get_group(d) for d, p in enumerate(like.placements)
            if dims == "all" or not isinstance(p, Replicate)]  # fmt: skip


def all_reduce_parts(parts: list[torch.Tensor], like: list[Any]) -> list[torch.Tensor]:
    """The sums over all processes of the tensors ``parts[k]`` whose ``like[k]`` is a sharded
    factor (the others are returned as they are): one all-reduce per mesh dimension of the
    packed parts (every process must call it with parts of the same shapes)."""
    idx = [k for k, t in enumerate(like) if is_sharded(t)]
    if not idx:
        return parts
    flat = torch.cat([parts[k].reshape(-1) for k in idx])
    for group in _groups(like[idx[0]], "all"):
        dist.all_reduce(flat, group=group)
    out, offset = list(parts), 0
    for k in idx:
        n = parts[k].numel()
        out[k] = flat[offset : offset + n].reshape(parts[k].shape)
        offset += n
    return out


def sum_over_shards(value: torch.Tensor, like: list[Any]) -> torch.Tensor:
    """A 0-d ``value`` computed from local shards of ``like`` summed over the processes that
    hold the other shards (one all-reduce of one number per distinct process group)."""
    seen: dict[int, Any] = {}
    for t in like:
        for group in _groups(t, "shards"):
            seen.setdefault(id(group), group)
    out = value.clone()
    for group in seen.values():
        dist.all_reduce(out, group=group)
    return out


def check_fixed_rank(spec: Any, layers: list, index: Any, owner: str) -> None:
    """Refuse a rank-adaptive rule on FSDP2-sharded layers (their shapes are fixed)."""
    if spec.rank_adaptive and any(is_sharded(L.U) for L in layers):
        raise ValueError(
            f"param group {index}: {owner}(rank_tol={spec.rank_tol!r}) changes ranks, which "
            "resizes U, S, V, but FSDP2 (fully_shard) keeps every parameter's shape fixed. "
            "Set rank_tol=None (DLRAAdam and DLRAHeavyBall then take the augmented BUG step at "
            "a fixed rank), or keep the low-rank layers out of fully_shard (ignored_params) "
            "and train rank-adaptively without FSDP"
        )


def check_same_rank(layers: list, old_rank: int, new_ranks: list[int], index: Any) -> None:
    """Refuse a step that would change the rank of FSDP2-sharded layers (before anything is
    written: e.g. a fixed-rank DLRA step that drops exactly zero singular values)."""
    if any(is_sharded(L.U) for L in layers) and any(r != old_rank for r in new_ranks):
        raise ValueError(
            f"param group {index}: the step would change the rank of FSDP2-sharded low-rank "
            f"layers from {old_rank} to {sorted(set(new_ranks))} (exactly zero singular values "
            "are dropped), which fully_shard's fixed parameter shapes do not allow; the step "
            "was not taken"
        )
