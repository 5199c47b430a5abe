"""``--backend spark``: Spark's TorchDistributor runs the training function on ``--num-workers`` processes.

``--cluster.spark_local_mode true`` (default) starts the processes on the driver;
``false`` runs them as barrier tasks on the executors of ``--cluster.spark_master`` (any master URL;
default ``local[num_workers]``). TorchDistributor waits silently when the cluster has fewer task
slots than processes, so that is checked before it starts; executors of a standalone (or any cluster
manager's) master register after the session starts, so the check waits for them first. Processes on
executors that all run on one machine (``local-cluster``, or a standalone worker on this host) are
presented as the ranks of one node: they share that machine's ``/dev/shm``, which StreamingDataset
coordinates through.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from cluster.config import ClusterConfig
from cluster.launch import local_accelerator, one_line
from cluster.runtime import WorkerFn, WorkerRuntime
from core.errors import RecsysError
from core.signals import interruption, stop_signals
from core.spark import spark_session

ERROR_MARK = "recsys-worker-error: "


def single_host(master: str) -> bool:
    """local[N] and local-cluster[...] masters run every executor on this machine."""
    return master.startswith("local")


def worker(fn: WorkerFn, payload: Any, accelerator: str, colocated: bool = False) -> Any:
    """Runs inside each process torchrun starts for TorchDistributor (torchrun's environment is set)."""
    if colocated and os.environ.get("LOCAL_WORLD_SIZE") != os.environ.get("WORLD_SIZE"):
        # Barrier tasks on executors of one machine each get a one-process torchrun "node"; they
        # really share a host (and /dev/shm, which StreamingDataset coordinates through), so
        # present them as the ranks of one node.
        os.environ.update(
            LOCAL_RANK=os.environ["RANK"], LOCAL_WORLD_SIZE=os.environ["WORLD_SIZE"], GROUP_RANK="0", NODE_RANK="0"
        )
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    runtime = WorkerRuntime(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world,
        accelerator=accelerator,
        devices=local,
        num_nodes=max(world // local, 1),
    )
    with stop_signals():  # torchrun's SIGTERM, when the launcher stops, unwinds this worker
        try:
            return fn(payload, runtime)
        except BaseException as e:
            stop = interruption(e)
            if stop is not None:
                raise SystemExit(stop.exit_code) from None
            if not isinstance(e, RecsysError):
                raise
            print(f"{ERROR_MARK}{one_line(e)}", file=sys.stderr, flush=True)  # torchrun's log would bury it
            raise SystemExit(2) from None


def failure_line(log: str) -> str:
    """The worker's own one-line error from torchrun's log, else the log's first line."""
    for line in log.splitlines():
        if ERROR_MARK in line:
            return line.split(ERROR_MARK, 1)[1].strip()
    return (log.splitlines() or [""])[0][:300]


def executor_hosts(spark: Any, n: int, wait_s: float = 60.0) -> tuple[set[str], int]:
    """The hosts of the driver and the application's executors, and the task slots, once executors
    offer ``n`` slots (or ``wait_s`` passed): a cluster manager starts them after the session is up."""
    sc = spark.sparkContext
    tracker = sc._jsc.sc().statusTracker()
    deadline = time.monotonic() + wait_s
    while True:
        infos = tracker.getExecutorInfos()  # the driver's entry and one per executor
        slots = int(sc.defaultParallelism)
        if (len(infos) > 1 and slots >= n) or time.monotonic() > deadline:
            return {i.host() for i in infos}, slots
        time.sleep(0.5)


def master_of(cluster: ClusterConfig) -> str:
    return cluster.spark_master or f"local[{cluster.num_workers}]"


def launch(fn: WorkerFn, payload: Any, cluster: ClusterConfig, name: str) -> dict[str, Any]:
    """Run ``fn`` with TorchDistributor; returns rank 0's metrics."""
    from pyspark.ml.torch.distributor import TorchDistributor

    master = master_of(cluster)
    accelerator = local_accelerator(cluster.accelerator)
    spark = spark_session(master, f"recsys-{name}", "--backend spark")
    try:
        n = cluster.num_workers
        colocated = single_host(master)
        if not cluster.spark_local_mode:
            if colocated:
                slots = spark.sparkContext.defaultParallelism
            else:
                hosts, slots = executor_hosts(spark, n)
                colocated = len(hosts) == 1  # driver and executors on one machine
            if slots < n:
                raise RecsysError(
                    f"--num-workers {n}: the Spark cluster has {slots} task slots (TorchDistributor would wait forever)"
                )
        distributor = TorchDistributor(
            num_processes=n, local_mode=cluster.spark_local_mode, use_gpu=accelerator == "gpu"
        )
        try:
            result = distributor.run(worker, fn, payload, accelerator, colocated)
        except Exception as e:  # a failed torchrun surfaces as a RuntimeError with its whole log
            raise RecsysError(f"--backend spark: training failed ({failure_line(str(e))})") from None
        return dict(result or {})
    finally:
        spark.stop()
