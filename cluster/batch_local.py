"""``--backend local`` for batch jobs: this process (one worker), or ``--num-workers`` spawned processes
that each build the job's function once and take partitions as they free up."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator

from cluster.batch import PartitionJob, PartitionResult, PartitionTask, Worker, forget, threads_restored
from cluster.config import ClusterConfig

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
    pool = ctx.Pool(min(cluster.num_workers, len(tasks)), initializer=_start, initargs=(job,))
    try:
        yield from pool.imap_unordered(_run, tasks, chunksize=1)
    finally:
        pool.terminate()  # stopped early (an error, an interrupt): no partition keeps running
        pool.join()
