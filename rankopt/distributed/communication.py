r"""Counting what a distributed solve moves and holds: :func:`snapshot`, :func:`measure`.

Three sources, all read without stopping the cluster:

* client <-> cluster: :data:`rankopt.distributed._dask.STATS` (synchronizations, the bytes the
  client embeds in task graphs, the bytes it gathers), counted by this package;
* worker <-> worker: every worker's ``transfer_incoming_log`` (``distributed`` records each
  fetch of a dependency from another worker, with its size in bytes). The log keeps the last
  ``distributed.admin.low-level-log-length`` transfers (1000 by default): :func:`measure`
  reads it after the run, so raise that setting for runs of more transfers (the report
  says when the log was full);
* memory: the peak resident set size of every worker process (``ru_maxrss``), and the bytes
  of results each holds now (``dask_worker.data``).

Cost: one ``client.run`` round trip per call, O(W + logged transfers) on the client.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Any

from . import _dask

__all__ = ["Traffic", "snapshot", "measure", "worker_memory"]


@dataclass
class Traffic:
    """What moved between two snapshots.

    Attributes
    ----------
    syncs : int
        Computations whose result the client waited for (round trips).
    client_sent_bytes, client_gathered_bytes : int
        Bytes embedded in task graphs by the client, and gathered by it.
    worker_bytes : int
        Bytes fetched by workers from other workers (dependencies of their tasks).
    worker_transfers : int
        How many such fetches.
    log_full : bool
        Whether a worker's transfer log was full (older transfers were not counted).
    peak_rss_bytes : dict
        Peak resident memory of every worker process (address -> bytes), since its start.
    """

    syncs: int = 0
    client_sent_bytes: int = 0
    client_gathered_bytes: int = 0
    worker_bytes: int = 0
    worker_transfers: int = 0
    log_full: bool = False
    peak_rss_bytes: dict = field(default_factory=dict)

    def per_iteration(self, iterations: int) -> dict[str, float]:
        """Counts divided by ``iterations`` (the per-iteration figures of the benchmark)."""
        k = max(int(iterations), 1)
        return {
            "syncs": self.syncs / k,
            "client_bytes": (self.client_sent_bytes + self.client_gathered_bytes) / k,
            "worker_bytes": self.worker_bytes / k,
        }


def _worker_log(dask_worker: Any, since: float) -> tuple[int, int, bool]:
    """``(bytes, transfers, log full)`` of the fetches that ended after ``since`` (on a
    worker, through ``client.run``)."""
    log = dask_worker.transfer_incoming_log
    done = [e for e in log if e.get("stop", 0.0) >= since]
    full = log.maxlen is not None and len(log) == log.maxlen
    return int(sum(e.get("total", 0) for e in done)), len(done), full


def _peak_rss() -> int:
    """Peak resident set size of this process in bytes (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def worker_memory(client: Any = None) -> dict[str, int]:
    """Peak resident memory of every worker process, in bytes (address -> bytes)."""
    return dict(_dask.get_client(client).run(_peak_rss))


def snapshot() -> tuple[float, dict[str, int]]:
    """The start of a measurement: ``(wall-clock time, copy of STATS)``."""
    return time.time(), dict(_dask.STATS)


def measure(start: tuple[float, dict[str, int]], client: Any = None) -> Traffic:
    """What moved since ``start`` (a :func:`snapshot`), and the workers' peak memory."""
    since, stats = start
    client = _dask.get_client(client)
    logs = client.run(_worker_log, since=since)
    now = _dask.STATS
    return Traffic(
        syncs=now["syncs"] - stats["syncs"],
        client_sent_bytes=now["embedded_bytes"] - stats["embedded_bytes"],
        client_gathered_bytes=now["gathered_bytes"] - stats["gathered_bytes"],
        worker_bytes=sum(v[0] for v in logs.values()),
        worker_transfers=sum(v[1] for v in logs.values()),
        log_full=any(v[2] for v in logs.values()),
        peak_rss_bytes=worker_memory(client),
    )
