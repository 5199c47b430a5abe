"""``--backend ray``: Ray Train's TorchTrainer runs ``train(cfg)`` on ``--num-workers`` workers.

Connects to ``--ray-address``, else to the cluster of the Ray job this runs in (``RAY_ADDRESS``, set
by ``ray job submit``), else starts a local Ray. The TorchRec strategy is built on Ray's own
``RayDDPStrategy`` (``prepare_trainer`` accepts nothing else) with ``RayLightningEnvironment``; each
epoch's checkpoint (every rank's shards) is reported to Ray, so when a worker dies the worker group
restarts from the last reported checkpoint (``FailureConfig``).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from app.config import RunConfig
from core.errors import RecsysError
from cluster.runtime import WorkerRuntime

CHECKPOINT = "checkpoint.ckpt"  # the name RayTrainReportCallback gives Lightning's checkpoint
METRICS = "final_metrics.json"


def connect(cfg: RunConfig) -> None:
    """Attach to (or start) Ray; an unreachable address fails fast with one line."""
    import ray

    address = cfg.cluster.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            num_cpus=max(os.cpu_count() or 1, cfg.cluster.num_workers * cfg.cluster.cpus_per_worker),
            include_dashboard=False,
            log_to_driver=True,
        )


def check_reachable(address: str) -> None:
    """TCP-probe host:port (GCS) or http(s)/ray:// addresses before Ray retries for minutes."""
    target = address.split("://", 1)[-1].rstrip("/")
    if target in ("auto", "local"):
        return
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise RecsysError(f"--ray-address {address}: expected host:port")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            pass
    except OSError as e:
        raise RecsysError(f"--ray-address {address}: unreachable ({e.strerror or e})") from None


def check_capacity(cfg: RunConfig) -> None:
    """Refuse a worker group the cluster cannot place (Ray would wait for resources forever)."""
    import ray

    total = ray.cluster_resources()
    need_cpu = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
    if total.get("CPU", 0) < need_cpu:
        raise RecsysError(
            f"--num-workers {cfg.cluster.num_workers}: needs {need_cpu} CPUs, the Ray cluster has "
            f"{int(total.get('CPU', 0))}"
        )
    if cfg.cluster.use_gpu and total.get("GPU", 0) < cfg.cluster.num_workers:
        raise RecsysError(
            f"--num-workers {cfg.cluster.num_workers} --use-gpu: the Ray cluster has {int(total.get('GPU', 0))} GPUs"
        )


def worker(config: dict[str, Any]) -> None:
    """The per-worker loop: resume from Ray's latest checkpoint if there is one, then ``train``."""
    import ray.train
    from ray.train.lightning import (
        RayDDPStrategy,
        RayLightningEnvironment,
        RayTrainReportCallback,
        prepare_trainer,
    )

    from app.train import train

    cfg: RunConfig = config["cfg"]
    latest = ray.train.get_checkpoint()  # set when Ray restarted the worker group after a failure
    resume = str(Path(latest.to_directory()) / CHECKPOINT) if latest is not None else None

    def report(metrics: dict[str, Any]) -> None:
        # Ray Train returns only metrics reported with a checkpoint: rank 0 ships them as one.
        if ray.train.get_context().get_world_rank() != 0:
            ray.train.report({"done": 1}, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / METRICS).write_text(json.dumps(metrics, default=str))
            ray.train.report({"done": 1}, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    runtime = WorkerRuntime(
        rank=ray.train.get_context().get_world_rank(),
        devices="auto",
        plugins=[RayLightningEnvironment()],
        strategy_base=RayDDPStrategy,
        prepare_trainer=prepare_trainer,
        callbacks=[RayTrainReportCallback()],
        report=report,
        resume_from=resume,
    )
    train(cfg, runtime)


def launch(cfg: RunConfig) -> dict[str, Any]:
    """Run ``cfg`` with Ray Train; returns rank 0's final metrics."""
    import ray.train
    from ray.train.torch import TorchTrainer

    connect(cfg)
    check_capacity(cfg)
    trainer = TorchTrainer(
        worker,
        train_loop_config={"cfg": cfg},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.cluster.num_workers,
            use_gpu=cfg.cluster.use_gpu,
            resources_per_worker={"CPU": cfg.cluster.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.tracking.run_name or f"recsys-{cfg.model}",
            storage_path=str(Path(cfg.cluster.storage_path).resolve()),
            failure_config=ray.train.FailureConfig(max_failures=cfg.cluster.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=3),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors in its own types
        raise RecsysError(f"--backend ray: training failed ({str(e).splitlines()[0]})") from None
    if result.checkpoint is None:
        raise RecsysError("--backend ray: the run finished without reporting its metrics")
    with result.checkpoint.as_directory() as d:
        return dict(json.loads((Path(d) / METRICS).read_text()))
