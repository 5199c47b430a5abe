"""``--backend local`` for batch jobs: this process (one worker), or ``--num-workers`` spawned processes
that each build the job's function once and take partitions as they free up."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator

from cluster.batch import PartitionJob, PartitionResult, PartitionTask, Worker, forget, threads_restored
from cluster.config import ClusterConfig
from core.errors import RecsysError
from core.output import os_reason

_WORKER: Worker | None = None


def _start(job: PartitionJob) -> None:
    global _WORKER
    _WORKER = Worker(job)


def _run(task: PartitionTask) -> PartitionResult:
    assert _WORKER is not None
    return _WORKER.run(task)


def map_partitions(job: PartitionJob, tasks: list[PartitionTask], cluster: ClusterConfig) -> Iterator[PartitionResult]:
    """Run ``job`` over ``tasks`` here (one worker) or in a pool of spawned processes."""
    if cluster.num_workers == 1:
        with threads_restored():  # the driver's own process: its thread settings back afterwards
            try:
                worker = Worker(job)
                for task in tasks:
                    yield worker.run(task)
            finally:
                forget(job.key)  # nor does it keep the job's function loaded
        return
    ctx = mp.get_context("spawn")  # no fork of a process that may hold torch/OpenMP threads
    workers = min(cluster.num_workers, len(tasks))
    try:
        pool = ctx.Pool(workers, initializer=_start, initargs=(job,))
    except OSError as e:  # a process limit, no memory for another interpreter: one line, not a traceback
        raise RecsysError(
            f"--num-workers {cluster.num_workers}: cannot start {workers} processes ({os_reason(e)})"
        ) from None
    try:
        yield from pool.imap_unordered(_run, tasks, chunksize=1)
    finally:
        pool.terminate()  # stopped early (an error, an interrupt): no partition keeps running
        pool.join()
