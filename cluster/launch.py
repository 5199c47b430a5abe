"""The one place that resolves ``--backend``: each backend is a module with ``launch(cfg)``."""

from __future__ import annotations

import importlib
from typing import Any

from app.config import RunConfig
from core.errors import RecsysError

BACKENDS = {"local": "cluster.local", "ray": "cluster.ray_train", "spark": "cluster.spark_distributor"}


def run_training(cfg: RunConfig) -> dict[str, Any]:
    """Train ``cfg`` on the backend it names; returns rank 0's metrics."""
    backend = cfg.cluster.backend
    if backend not in BACKENDS:
        known = ", ".join(BACKENDS)
        raise RecsysError(f"--backend: {backend!r} is not available (available: {known})")
    from app.train import prepare_tracking, validate_run

    validate_run(cfg)  # fail fast, before any worker starts
    prepare_tracking(cfg)
    module = importlib.import_module(BACKENDS[backend])
    return dict(module.launch(cfg))
