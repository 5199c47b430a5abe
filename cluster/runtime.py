"""What a launcher hands the per-worker function: the process it runs in, and the Lightning settings
that depend on the backend. The training code takes them as given and never asks which backend it is."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def _identity(trainer: Any) -> Any:
    return trainer


@dataclass
class WorkerRuntime:
    """One training process of a run."""

    rank: int = 0
    """Global rank of this process: only rank 0 opens the MLflow run."""
    world_size: int = 1
    """Training processes in the run (the global batch is batch_size x world_size)."""
    accelerator: str = "cpu"
    """cpu or gpu, resolved by the launcher from --accelerator."""
    devices: int | str = 1
    """Processes (or GPUs) per node that this run's Trainer spans."""
    num_nodes: int = 1
    plugins: list[Any] = field(default_factory=list)
    """Cluster-environment plugins (e.g. Ray's), when the launcher is not torchrun-like."""
    strategy_base: type | None = None
    """A backend's own DDP strategy class to build the TorchRec strategy on (None: Lightning's)."""
    prepare_trainer: Callable[[Any], Any] = _identity
    report: Callable[[dict[str, Any]], None] | None = None
    """Called with the final metrics on every rank (the Ray backend reports them)."""
    callbacks: list[Any] = field(default_factory=list)
    """Extra Lightning callbacks (benchmarks and tests observe training through them)."""
    resume_from: str | None = None
    """A checkpoint the backend restarts this worker from (Ray after a failure); overrides the config's."""


WorkerFn = Callable[[Any, WorkerRuntime], dict[str, Any]]
"""What a backend runs in every training process: ``fn(payload, runtime) -> metrics``."""
