"""Configuration of where the training processes run (resolved in ``cluster/`` only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ShardingType = Literal["data_parallel", "table_wise", "row_wise", "column_wise", "table_row_wise"]
"""How TorchRec may place one embedding table (``torchrec.distributed.types.ShardingType`` values)."""


@dataclass(frozen=True)
class ClusterConfig:
    """Where the training processes run (resolved in cluster/ only)."""

    backend: Literal["local", "ray", "spark"] = "local"
    num_workers: int = 1
    """Training processes (one per GPU on a GPU host)."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """The one GPU switch of every backend: gpu (one GPU per process), cpu, or auto (GPUs when the
    processes' hosts have them: CUDA here for local/spark, GPUs in the cluster for ray)."""
    memory_per_worker: str | None = None
    """Memory each training process may give its embedding tables and their optimizer state (GPU
    memory on GPUs, host memory on CPUs), e.g. 512MB or 8GiB: the sharding planner splits a table
    that does not fit one worker over several (row- or column-wise). Default: the planner's own."""
    sharding: dict[str, ShardingType] = field(default_factory=dict)
    """How the planner must shard named tables (``t_FEATURE``): data_parallel (a replica on every
    worker), table_wise (whole on one worker), row_wise, column_wise or table_row_wise, e.g.
    ``--cluster.sharding '{"t_C1": "row_wise", "t_C2": "data_parallel"}'``; tables not named are left
    to the planner. It is no part of the model: a checkpoint loads under any plan (and world size)."""
    cpus_per_worker: int = 1
    """ray: CPUs reserved for each training worker."""
    ray_address: str | None = None
    """ray: address of a running cluster (host:port or ray://...); default: the cluster of the Ray job
    this runs in, else a local Ray started for the run."""
    max_failures: int = 2
    """ray: restarts of the worker group (from the last reported checkpoint) before giving up."""
    storage_path: str = "runs/ray"
    """ray: where Ray Train keeps run state and reported checkpoints."""
    spark_master: str | None = None
    """spark: master URL (default local[num_workers])."""
    spark_local_mode: bool = True
    """spark: True runs the processes on the driver; False runs them as barrier tasks on executors."""
