"""The one place that resolves ``--backend`` for batch jobs: a function over partitions of work.

    map_partitions(job, tasks, cluster) -> iterator of PartitionResult, as partitions finish

Each backend is a module with ``map_partitions(job, tasks, cluster)``: ``local`` (this process, or
``--num-workers`` spawned ones), ``ray`` (Ray Data: ``map_batches`` over a dataset of the partitions
with ``--num-workers`` actors) and ``spark`` (``mapInPandas`` over a DataFrame of them). Every worker
(process, actor, Spark Python worker) builds the job's function once (``job.factory()``: loading a
model, say) and runs it on the partitions it is given. Errors never escape a worker: the first
failing partition comes back as a result with its one-line ``error`` (so every engine reports it the
same way, once), and the caller stops there.

A new backend is a new module and one entry in ``BATCH_BACKENDS``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.config import ClusterConfig
from cluster.launch import one_line
from core.errors import RecsysError

log = logging.getLogger(__name__)

BATCH_BACKENDS = {"local": "cluster.batch_local", "ray": "cluster.batch_ray", "spark": "cluster.batch_spark"}

PartitionFn = Callable[[int, list[str]], int]
"""``fn(partition, keys) -> rows written``: the work of one partition."""


@dataclass(frozen=True)
class PartitionJob:
    """What every worker runs: ``factory()`` builds the partition function (once per worker process);
    ``key`` names what it loads, so that a worker process reused across jobs (Spark's Python workers)
    builds it again only for another key."""

    key: str
    factory: Callable[[], PartitionFn]
    threads: int = 1
    """Intra-op threads per worker (torch, OpenMP): one worker per core by default."""


@dataclass(frozen=True)
class PartitionTask:
    """One partition: its number and its keys (raw user ids)."""

    partition: int
    keys: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PartitionResult:
    """How a partition went: rows written, or the one-line error that stopped it."""

    partition: int
    keys: int
    rows: int = 0
    error: str = ""
    pid: int = 0
    """The worker process that ran it."""
    loads: int = 0
    """How many times that process had built the job's function so far (1 when it loads once)."""
    seconds: float = 0.0
    """Wall time of the partition's function in the worker."""
    cpu_seconds: float = 0.0
    """CPU time of the worker process meanwhile (what contention for the cores does not inflate)."""
    peak_rss: int = 0
    """The worker process's peak resident memory so far, bytes (its loaded bundle included)."""


RESULT_FIELDS = ("partition", "keys", "rows", "error", "pid", "loads", "seconds", "cpu_seconds", "peak_rss")


def check_batch_cluster(cluster: ClusterConfig) -> None:
    """Reject a bad backend choice before anything starts."""
    if cluster.backend not in BATCH_BACKENDS:
        raise RecsysError(f"--backend: {cluster.backend!r} is not available (available: {', '.join(BATCH_BACKENDS)})")
    if cluster.num_workers < 1:
        raise RecsysError(f"--num-workers: must be at least 1, got {cluster.num_workers}")
    if cluster.cpus_per_worker < 1:
        raise RecsysError(f"--cluster.cpus_per_worker: must be at least 1, got {cluster.cpus_per_worker}")


def map_partitions(
    job: PartitionJob, tasks: Sequence[PartitionTask], cluster: ClusterConfig
) -> Iterator[PartitionResult]:
    """Run ``job`` over ``tasks`` on the backend ``cluster`` names; results as partitions finish."""
    check_batch_cluster(cluster)
    if not tasks:
        return iter(())
    module = importlib.import_module(BATCH_BACKENDS[cluster.backend])
    results: Iterator[PartitionResult] = module.map_partitions(job, list(tasks), cluster)
    return results


# -- inside a worker ---------------------------------------------------------------------------------

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_LOADED: dict[str, tuple[PartitionFn | None, str]] = {}
_LOADS: dict[str, int] = {}


def limit_threads(threads: int) -> None:
    """This process's intra-op threads: torch's, and OpenMP's (FAISS) for what starts it later."""
    import sys

    import torch

    for var in THREAD_VARIABLES:
        os.environ[var] = str(threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    faiss = sys.modules.get("faiss")
    if faiss is not None:  # already started its OpenMP pool: the variable above comes too late
        faiss.omp_set_num_threads(threads)


@contextlib.contextmanager
def threads_restored() -> Iterator[None]:
    """Give back this process's thread settings afterwards (a job run in the driver's own process)."""
    import sys

    import torch

    env = {var: os.environ.get(var) for var in THREAD_VARIABLES}
    torch_threads = torch.get_num_threads()
    faiss = sys.modules.get("faiss")
    omp = faiss.omp_get_max_threads() if faiss is not None else None
    try:
        yield
    finally:
        for var, value in env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        torch.set_num_threads(torch_threads)
        faiss = sys.modules.get("faiss")
        if faiss is not None and omp is not None:
            faiss.omp_set_num_threads(omp)


class Worker:
    """A worker's state: the job's function, built on first use (or the one-line error building it gave)."""

    def __init__(self, job: PartitionJob) -> None:
        self.job = job
        if job.key not in _LOADED:
            limit_threads(job.threads)
            try:
                _LOADED[job.key] = (job.factory(), "")
            except BaseException as e:  # reported with every partition this worker is given
                if not isinstance(e, RecsysError):
                    log.debug("building the batch function failed", exc_info=True)
                _LOADED[job.key] = (None, one_line(e))
            _LOADS[job.key] = _LOADS.get(job.key, 0) + 1
            limit_threads(job.threads)  # the factory may have started FAISS's OpenMP pool
        self.fn, self.error = _LOADED[job.key]

    def run(self, task: PartitionTask) -> PartitionResult:
        """One partition, never raising: a failure is the result's ``error``."""
        done = {"partition": task.partition, "keys": len(task.keys), "pid": os.getpid(), "loads": _LOADS[self.job.key]}
        if self.fn is None:
            return PartitionResult(**done, error=self.error)  # type: ignore[arg-type]
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            rows = self.fn(task.partition, list(task.keys))
        except BaseException as e:
            if not isinstance(e, RecsysError):
                log.debug("partition %d failed", task.partition, exc_info=True)
            return PartitionResult(**done, error=one_line(e))  # type: ignore[arg-type]
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return PartitionResult(
            **done,  # type: ignore[arg-type]
            rows=int(rows),
            seconds=wall,
            cpu_seconds=cpu,
            peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        )


def forget(key: str) -> None:
    """Drop what this process built for ``key`` (the driver, after running a job in process)."""
    _LOADED.pop(key, None)


def result_of(row: Any) -> PartitionResult:
    """A PartitionResult from a row of an engine's output (a dict or a pandas row)."""
    return PartitionResult(
        partition=int(row["partition"]),
        keys=int(row["keys"]),
        rows=int(row["rows"]),
        error=str(row["error"] or ""),
        pid=int(row["pid"]),
        loads=int(row["loads"]),
        seconds=float(row["seconds"]),
        cpu_seconds=float(row["cpu_seconds"]),
        peak_rss=int(row.get("peak_rss", 0) or 0),
    )
