"""``--backend spark``: Spark's TorchDistributor runs ``train(cfg)`` on ``--num-workers`` processes.

``--cluster.spark_local_mode true`` (default) starts the processes on the driver;
``false`` runs them as barrier tasks on the executors of ``--cluster.spark_master`` (any master URL;
default ``local[num_workers]``). TorchDistributor waits silently when the cluster has fewer task
slots than processes, so that is checked before it starts.
"""

from __future__ import annotations

import os
from typing import Any

from app.config import RunConfig
from core.errors import RecsysError
from cluster.runtime import WorkerRuntime


def single_host(master: str) -> bool:
    """local[N] and local-cluster[...] masters run every executor on this machine."""
    return master.startswith("local")


def worker(cfg: RunConfig, colocated: bool = False) -> dict[str, Any]:
    """Runs inside each process torchrun starts for TorchDistributor (torchrun's environment is set)."""
    from app.train import train

    if colocated and os.environ.get("LOCAL_WORLD_SIZE") != os.environ.get("WORLD_SIZE"):
        # Barrier tasks on executors of one machine each get a one-process torchrun "node"; they
        # really share a host (and /dev/shm, which StreamingDataset coordinates through), so
        # present them as the ranks of one node.
        os.environ.update(
            LOCAL_RANK=os.environ["RANK"], LOCAL_WORLD_SIZE=os.environ["WORLD_SIZE"], GROUP_RANK="0", NODE_RANK="0"
        )
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return train(
        cfg, WorkerRuntime(rank=int(os.environ.get("RANK", "0")), devices=local, num_nodes=max(world // local, 1))
    )


def master_of(cfg: RunConfig) -> str:
    return cfg.cluster.spark_master or f"local[{cfg.cluster.num_workers}]"


def launch(cfg: RunConfig) -> dict[str, Any]:
    """Run ``cfg`` with TorchDistributor; returns rank 0's metrics."""
    from pyspark.ml.torch.distributor import TorchDistributor

    from datamodules.spark_prepare import spark_session

    master = master_of(cfg)
    spark = spark_session(master, f"recsys-train-{cfg.model}", "--backend spark")
    try:
        n = cfg.cluster.num_workers
        if not cfg.cluster.spark_local_mode:
            slots = spark.sparkContext.defaultParallelism
            if slots < n:
                raise RecsysError(
                    f"--num-workers {n}: the Spark cluster has {slots} task slots (TorchDistributor would wait forever)"
                )
        distributor = TorchDistributor(
            num_processes=n, local_mode=cfg.cluster.spark_local_mode, use_gpu=cfg.cluster.use_gpu
        )
        try:
            result = distributor.run(worker, cfg, single_host(master))
        except Exception as e:  # a failed torchrun surfaces as a RuntimeError with its whole log
            raise RecsysError(f"--backend spark: training failed ({str(e).splitlines()[0][:300]})") from None
        return dict(result or {})
    finally:
        spark.stop()
