"""What a launcher tells the per-worker training function about the process it runs in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def _identity(trainer: Any) -> Any:
    return trainer


@dataclass
class WorkerRuntime:
    """Lightning settings that depend on the backend; the training code takes them as given."""

    rank: int = 0
    """Global rank of this process: only rank 0 opens the MLflow run."""
    devices: int | str = 1
    """Processes (or GPUs) per node that this run's Trainer spans."""
    num_nodes: int = 1
    plugins: list[Any] = field(default_factory=list)
    """Cluster-environment plugins (e.g. Ray's), when the launcher is not torchrun-like."""
    strategy_base: type | None = None
    """A backend's own DDP strategy class to build the TorchRec strategy on (None: Lightning's)."""
    prepare_trainer: Callable[[Any], Any] = _identity
    report: Callable[[dict[str, float]], None] | None = None
    """Called with the final metrics on every rank (the Ray backend reports them)."""
    callbacks: list[Any] = field(default_factory=list)
    """Extra Lightning callbacks (benchmarks and tests observe training through them)."""
    resume_from: str | None = None
    """A checkpoint the backend restarts this worker from (Ray after a failure); overrides the config's."""
