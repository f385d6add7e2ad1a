r"""The Dask plumbing of :mod:`rankopt.distributed`: lazy imports, the client, task graphs.

Dask and distributed are imported on first use (``import rankopt.distributed`` works without
them; building a problem raises an ImportError that names the extra to install). Every graph
here is a plain task graph (legacy tuple tasks) with unique key names, computed and persisted
with ``optimize_graph=False``: a key always means the same task, so a key submitted twice (by
a persist and by a later compute that depends on it) is computed once by the scheduler.

:data:`STATS` counts what passes between the client and the cluster (synchronizations, bytes
embedded in graphs, bytes gathered), for :mod:`rankopt.distributed.communication`.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

__all__ = [
    "STATS",
    "require",
    "get_client",
    "new_name",
    "array_from_graph",
    "object_from_graph",
    "tree_sum",
    "persist",
    "compute",
    "embed",
]

#: Client <-> cluster traffic counted by this package: ``syncs`` (computations whose result
#: the client waits for), ``embedded_bytes`` (NumPy data put into task graphs, i.e. sent to
#: the cluster), ``gathered_bytes`` (results fetched by the client).
STATS: dict[str, int] = {"syncs": 0, "embedded_bytes": 0, "gathered_bytes": 0}

#: Partial results summed per task of a reduction tree (fan-in).
FAN_IN = 8


def require() -> tuple[Any, Any, Any]:
    """``(dask, dask.array, distributed)``; ImportError naming the extra when missing."""
    try:
        import dask
        import dask.array as da
        import distributed
    except ImportError as e:  # pragma: no cover - exercised without the extra
        raise ImportError(
            "rankopt.distributed needs dask and distributed: pip install -e '.[distributed]'"
        ) from e
    return dask, da, distributed


def get_client(client: Any = None) -> Any:
    """``client``, or the current ``distributed.Client``; ValueError when there is none."""
    if client is not None:
        return client
    _, _, distributed = require()
    try:
        return distributed.get_client()
    except ValueError:
        raise ValueError(
            "rankopt.distributed runs on a distributed.Client: start one first, e.g. "
            "client = distributed.Client(distributed.LocalCluster(n_workers=2))"
        ) from None


def new_name(prefix: str) -> str:
    """A fresh, unique key name (``prefix-<32 hex digits>``)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def array_from_graph(
    name: str, dsk: dict, deps: list, chunks: tuple, dtype: Any = np.float64
) -> Any:
    """A dask array over the keys ``(name, i, ...)`` of ``dsk``, on top of the collections
    ``deps`` (their graphs stay the lineage of the result)."""
    _, da, _ = require()
    from dask.highlevelgraph import HighLevelGraph

    graph = HighLevelGraph.from_collections(name, dsk, dependencies=list(deps))
    return da.Array(graph, name, chunks=chunks, dtype=dtype)


def object_from_graph(key: str, dsk: dict, deps: list) -> Any:
    """A dask ``Delayed`` for the Python object at the (string) ``key`` of ``dsk`` (any
    result: a list, a tuple of arrays), on top of the collections ``deps``."""
    require()
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    return Delayed(key, HighLevelGraph.from_collections(key, dsk, dependencies=list(deps)))


def _sum(*parts: Any) -> Any:
    """The sum of the parts (arrays of one shape, or floats), in a fresh array."""
    out = parts[0].copy() if hasattr(parts[0], "copy") else parts[0]
    for p in parts[1:]:
        out = out + p
    return out


def tree_sum(dsk: dict, name: str, keys: list, final: Any) -> Any:
    r"""Add tasks to ``dsk`` that sum the results at ``keys`` into the key ``final``: a tree of
    fan-in ``FAN_IN`` (depth ``ceil(log_8 len(keys))``, every partial sum moves once).
    Returns ``final``."""
    level = 0
    keys = list(keys)
    while len(keys) > FAN_IN:
        nxt = []
        for i in range(0, len(keys), FAN_IN):
            k = (f"{name}-t{level}", final, i)
            dsk[k] = (_sum, *keys[i : i + FAN_IN])
            nxt.append(k)
        keys, level = nxt, level + 1
    dsk[final] = (_sum, *keys)
    return final


def persist(collections: list) -> list:
    """Persist dask collections (no graph optimization: keys keep their tasks); returns the
    persisted collections, whose graphs hold only futures."""
    dask, _, _ = require()
    if not collections:
        return []
    return list(dask.persist(*collections, optimize_graph=False))


def compute(*collections: Any) -> tuple:
    """Compute dask collections and wait (a synchronization, counted in :data:`STATS`)."""
    dask, _, _ = require()
    out = dask.compute(*collections, optimize_graph=False)
    STATS["syncs"] += 1
    STATS["gathered_bytes"] += sum(_nbytes(o) for o in out)
    return out


def _nbytes(x: Any) -> int:
    if isinstance(x, np.ndarray):
        return int(x.nbytes)
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return 8


def embed(a: np.ndarray) -> np.ndarray:
    """``a``, counted as data the client sends to the cluster inside a task graph."""
    STATS["embedded_bytes"] += int(np.asarray(a).nbytes)
    return a
