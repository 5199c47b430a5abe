"""The one place that resolves ``--backend``: each backend is a module with
``launch(fn, payload, cluster, name)`` that runs ``fn(payload, runtime)`` in every training process
and returns rank 0's result. A new backend is a new module and one entry here."""

from __future__ import annotations

import importlib
import re
from typing import Any

from cluster.config import ClusterConfig
from cluster.runtime import WorkerFn
from core.errors import RecsysError
from core.signals import Interrupted

BACKENDS = {"local": "cluster.local", "ray": "cluster.ray_train", "spark": "cluster.spark_distributor"}


def check_cluster(cluster: ClusterConfig) -> None:
    """Reject a bad backend choice before anything starts."""
    if cluster.backend not in BACKENDS:
        known = ", ".join(BACKENDS)
        raise RecsysError(f"--backend: {cluster.backend!r} is not available (available: {known})")
    if cluster.num_workers < 1:
        raise RecsysError(f"--num-workers: must be at least 1, got {cluster.num_workers}")
    if cluster.accelerator == "gpu":
        import torch

        if cluster.backend != "ray" and not torch.cuda.is_available():
            raise RecsysError("--accelerator gpu: no CUDA GPU on this host (use --accelerator cpu or auto)")


def launch(fn: WorkerFn, payload: Any, cluster: ClusterConfig, name: str) -> dict[str, Any]:
    """Run ``fn(payload, runtime)`` on the backend ``cluster`` names; returns rank 0's result."""
    check_cluster(cluster)
    module = importlib.import_module(BACKENDS[cluster.backend])
    return dict(module.launch(fn, payload, cluster, name))


def local_accelerator(choice: str) -> str:
    """cpu or gpu for processes on this host."""
    if choice == "auto":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    return choice


def workers_here(cluster: ClusterConfig) -> int:
    """How many of the run's processes run on this machine: every one for the local backend and Spark's
    local mode (processes on the driver), none known for the others (their hosts are the cluster's)."""
    here = cluster.backend == "local" or (cluster.backend == "spark" and cluster.spark_local_mode)
    return cluster.num_workers if here else 0


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(error: BaseException) -> str:
    """A worker's error as one line without terminal colours: its message, or its type and first line
    when it is not ours."""
    text = ANSI.sub("", str(error))
    if isinstance(error, RecsysError | Interrupted):
        return " ".join(text.split())
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first}"[:400]
