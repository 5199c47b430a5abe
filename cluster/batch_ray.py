"""``--backend ray`` for batch jobs: Ray Data over a dataset of the partitions.

One row per partition (its number and its keys), one block per row; ``map_batches`` with a callable
class runs ``--num-workers`` actors (``--cluster.cpus_per_worker`` CPUs each) that build the job's
function once, in their constructor, and take one partition per call; results stream back to the
driver as partitions finish. Ray is the one a training run uses: ``--ray-address`` (or the Ray job's
cluster), else a local Ray on 127.0.0.1 only (``cluster.ray_node``), shut down at the end. Ray Data's
own progress bars are off (the caller shows one bar for every engine) unless ``--verbose``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from cluster.batch import RESULT_FIELDS, PartitionJob, PartitionResult, PartitionTask, Worker, result_of
from cluster.config import ClusterConfig
from cluster.ray_train import connect, worker_error
from core.errors import RecsysError

log = logging.getLogger(__name__)


class PartitionActor:
    """A Ray Data actor: the job's function built once; each call is a batch of whole partitions."""

    def __init__(self, job: PartitionJob) -> None:
        self.worker = Worker(job)

    def __call__(self, batch: Any) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {name: [] for name in RESULT_FIELDS}
        for partition, keys in zip(batch["partition"], batch["keys"], strict=True):
            done = self.worker.run(PartitionTask(int(partition), [str(k) for k in keys]))
            for name in RESULT_FIELDS:
                out[name].append(getattr(done, name))
        return out


def check_cpus(cluster: ClusterConfig) -> None:
    """Refuse more actors than the Ray cluster has CPUs for (Ray Data would wait for them forever)."""
    import ray

    need = cluster.num_workers * cluster.cpus_per_worker
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if cpus < need:
        raise RecsysError(f"--num-workers {cluster.num_workers}: needs {need} CPUs, the Ray cluster has {cpus}")


def map_partitions(job: PartitionJob, tasks: list[PartitionTask], cluster: ClusterConfig) -> Iterator[PartitionResult]:
    """Run ``job`` over ``tasks`` on ``cluster.num_workers`` Ray Data actors; results as they finish."""
    import ray

    started = not ray.is_initialized()
    connect(cluster)
    try:
        check_cpus(cluster)
        import ray.data

        context = ray.data.DataContext.get_current()
        verbose = logging.getLogger("cluster").isEnabledFor(logging.DEBUG)
        context.enable_progress_bars = verbose
        context.print_on_execution_start = verbose
        if not verbose:
            logging.getLogger("ray.data").setLevel(logging.ERROR)
        rows = [{"partition": t.partition, "keys": list(t.keys)} for t in tasks]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            PartitionActor,
            fn_constructor_args=(job,),
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(cluster.num_workers, len(tasks))),
            num_cpus=cluster.cpus_per_worker,
            udf_modifying_row_count=False,  # one result row per partition row
        )
        try:
            for row in dataset.iter_rows():
                yield result_of(row)
        except RecsysError:
            raise
        except Exception as e:  # an actor that died, a cluster that went away: Ray's wrappers, as one line
            raise RecsysError(f"--backend ray: the batch job failed ({worker_error(e)})") from None
    finally:
        if started:
            ray.shutdown()
