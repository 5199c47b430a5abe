"""``--backend ray``: Ray Train's TorchTrainer runs the training function on ``--num-workers`` workers.

Connects to ``--ray-address``, else to the cluster of the Ray job this runs in (``RAY_ADDRESS``, set
by ``ray job submit``), else starts a local Ray whose servers all listen on 127.0.0.1 only
(``cluster.ray_node``). The TorchRec strategy is built on Ray's own
``RayDDPStrategy`` (``prepare_trainer`` accepts nothing else) with ``RayLightningEnvironment``; each
epoch's checkpoint (every rank's shards) is reported to Ray, so when a worker dies the worker group
restarts from the last reported checkpoint (``FailureConfig``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from cluster.config import ClusterConfig
from cluster.launch import one_line
from cluster.ray_node import (
    LOOPBACK_IP,
    TOKEN_HINT,
    check_token,
    is_loopback,
    private_token,
    single_host_mode,
)
from cluster.runtime import WorkerFn, WorkerRuntime
from core.errors import RecsysError
from core.logs import setup_logging
from core.rendezvous import host_loopback_store, is_loopback_host
from core.signals import STOP_SIGNALS, Interrupted, interruption
from core.signals import reinstall as reinstall_stop_signals

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.ckpt"  # the name RayTrainReportCallback gives Lightning's checkpoint
METRICS = "final_metrics.json"


def connect(cluster: ClusterConfig) -> None:
    """Attach to (or start) Ray; an unreachable address fails fast with one line."""
    import ray
    from ray.exceptions import AuthenticationError

    address = cluster.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
    if ray.is_initialized():
        return
    private_token(create=not address)  # a new local Ray turns token auth on and would write the token
    if address and "://" not in address and address not in ("auto", "local"):
        # a GCS address: a refused token is one line now, not 30 s of retries
        check_token(address)
    try:
        if address:
            # a loopback address must stay loopback (Ray would swap in this host's routable IP)
            with single_host_mode() if is_loopback(address) else contextlib.nullcontext():
                ray.init(address=address, log_to_driver=True)
        else:
            with single_host_mode():
                ray.init(
                    num_cpus=max(os.cpu_count() or 1, cluster.num_workers * cluster.cpus_per_worker),
                    include_dashboard=False,
                    log_to_driver=True,
                    _node_ip_address=LOOPBACK_IP,
                )
    except AuthenticationError as e:  # token auth on in this client, and no token to send
        raise RecsysError(f"--ray-address {address}: {' '.join(str(e).split())[:200]}; {TOKEN_HINT}") from None
    except SystemExit as e:  # ray.init's own SIGTERM handler, while it started, is sys.exit(signum)
        if e.code in STOP_SIGNALS:
            raise Interrupted(int(e.code)) from None  # type: ignore[arg-type]
        raise
    finally:
        reinstall_stop_signals()  # and its core worker's native one dumps a stack trace and aborts


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


def use_gpu(cluster: ClusterConfig) -> bool:
    """--accelerator against the cluster's resources; a worker group Ray cannot place is refused
    (Ray would wait for resources forever)."""
    import ray

    total = ray.cluster_resources()
    need_cpu = cluster.num_workers * cluster.cpus_per_worker
    cpus = int(total.get("CPU", 0))
    if cpus < need_cpu:
        raise RecsysError(f"--num-workers {cluster.num_workers}: needs {need_cpu} CPUs, the Ray cluster has {cpus}")
    gpus = int(total.get("GPU", 0))
    if cluster.accelerator == "gpu" and gpus < cluster.num_workers:
        raise RecsysError(f"--num-workers {cluster.num_workers} --accelerator gpu: the Ray cluster has {gpus} GPUs")
    return cluster.accelerator == "gpu" or (cluster.accelerator == "auto" and gpus >= cluster.num_workers)


def worker(config: dict[str, Any]) -> None:
    """The per-worker loop: resume from Ray's latest checkpoint if there is one, then run the function."""
    import ray.train
    from ray.train.lightning import (
        RayDDPStrategy,
        RayLightningEnvironment,
        RayTrainReportCallback,
        prepare_trainer,
    )

    context = ray.train.get_context()
    setup_logging(rank=context.get_world_rank(), world_size=context.get_world_size())
    log.info("runs on Ray node %s (%s)", ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address())
    latest = ray.train.get_checkpoint()  # set when Ray restarted the worker group after a failure
    resume = str(Path(latest.to_directory()) / CHECKPOINT) if latest is not None else None

    def report(metrics: dict[str, Any]) -> None:
        # Ray Train returns only metrics reported with a checkpoint: rank 0 ships them as one.
        if context.get_world_rank() != 0:
            ray.train.report({"done": 1}, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / METRICS).write_text(json.dumps(metrics, default=str))
            ray.train.report({"done": 1}, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    runtime = WorkerRuntime(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        accelerator="gpu" if config["use_gpu"] else "cpu",
        devices="auto",
        plugins=[RayLightningEnvironment()],
        strategy_base=RayDDPStrategy,
        prepare_trainer=prepare_trainer,
        callbacks=[RayTrainReportCallback()],
        report=report,
        resume_from=resume,
    )
    fn: WorkerFn = config["fn"]
    fn(config["payload"], runtime)


def worker_error(error: BaseException) -> str:
    """The first worker's own error inside Ray's wrapper, as one line."""
    failures = getattr(error, "worker_failures", None) or {}
    for failure in failures.values() if isinstance(failures, dict) else failures:
        return one_line(getattr(failure, "cause", None) or failure)
    cause = error.__cause__ or getattr(error, "cause", None)
    if isinstance(cause, BaseException) and cause is not error:
        return worker_error(cause)
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.endswith("worker errors:")] or lines
    return lines[-1][:400] if lines else type(error).__name__


def loopback_torch_config() -> Any:
    """Ray Train's ``TorchConfig`` whose process group, when worker 0 is on a loopback address (Ray's
    single-host mode), meets at a store listening on that address only: Ray's own backend has torch
    bind every interface. Worker 0 first hosts a multi-tenant store server on the port Ray picks
    (``core.rendezvous``); Ray's ``init_process_group`` there then reuses it. Ray's backend is reused
    as is, only its choice of address and port is made once beforehand (a private hook, checked by
    ``tests/test_cluster.py``)."""
    import ray.train.torch.config as ray_torch
    from ray.train.torch.config import TorchConfig, _TorchBackend

    class LoopbackTorchBackend(_TorchBackend):  # type: ignore[misc]
        def on_start(self, worker_group: Any, backend_config: Any) -> None:
            pick = ray_torch.get_address_and_port
            addr, port = worker_group.execute_single(0, pick)
            if is_loopback_host(addr):
                worker_group.execute_single(0, host_loopback_store, addr, port, len(worker_group))
            ray_torch.get_address_and_port = lambda: (addr, port)
            try:
                super().on_start(worker_group, backend_config)
            finally:
                ray_torch.get_address_and_port = pick

    class LoopbackTorchConfig(TorchConfig):  # type: ignore[misc]
        @property
        def backend_cls(self) -> type:
            return LoopbackTorchBackend

    return LoopbackTorchConfig()


def stoppable_trainer_class() -> type:
    """Ray Train's ``TorchTrainer`` without its own SIGINT handler, keeping the controller's handle.

    ``fit()`` installs a SIGINT handler that aborts the run and then calls ``sys.exit(0)`` (a stopped
    run exiting 0, its MLflow run left RUNNING), and only for SIGINT. Overriding the (private) hook that
    installs it keeps the process's one policy (``core.signals``) for every stop signal; ``launch``
    then aborts the run the way that handler does, through the controller."""
    from ray.train.torch import TorchTrainer

    class StoppableTorchTrainer(TorchTrainer):  # type: ignore[misc]
        controller: Any = None

        def _register_sigint_handler(self, controller: Any) -> None:
            self.controller = controller

    return StoppableTorchTrainer


def abort(trainer: Any, wait_s: float = 60.0) -> None:
    """Abort a run being fitted: Ray's controller stops the worker group (its processes end), as Ray's
    own SIGINT handler does."""
    import ray

    if trainer.controller is None:
        return
    try:
        ray.get(trainer.controller.abort.remote(), timeout=wait_s)
    except Exception:  # the controller ends its own process once the workers are gone: that is success
        log.debug("Ray Train controller after abort", exc_info=True)


def launch(fn: WorkerFn, payload: Any, cluster: ClusterConfig, name: str) -> dict[str, Any]:
    """Run ``fn`` with Ray Train; returns rank 0's final metrics."""
    import ray.train

    connect(cluster)
    gpu = use_gpu(cluster)
    trainer = stoppable_trainer_class()(
        worker,
        train_loop_config={"fn": fn, "payload": payload, "use_gpu": gpu},
        torch_config=loopback_torch_config(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cluster.num_workers,
            use_gpu=gpu,
            resources_per_worker={"CPU": cluster.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(Path(cluster.storage_path).resolve()),
            failure_config=ray.train.FailureConfig(max_failures=cluster.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=3),
        ),
    )
    try:
        result = trainer.fit()
    except BaseException as e:
        stop = interruption(e)  # the signal's exception raised inside ray.get comes out as Ray's own
        if stop is not None:
            abort(trainer)
            raise stop from None
        if not isinstance(e, Exception):
            raise
        raise RecsysError(f"--backend ray: training failed ({worker_error(e)})") from None  # Ray wraps worker errors
    if result.checkpoint is None:
        raise RecsysError("--backend ray: the run finished without reporting its metrics")
    with result.checkpoint.as_directory() as d:
        return dict(json.loads((Path(d) / METRICS).read_text()))
