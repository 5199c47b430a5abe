"""The one place that resolves ``--backend``: each backend is a module with ``launch(cfg)``."""

from __future__ import annotations

import importlib
from typing import Any

from app.config import RunConfig
from app.errors import RecsysError

BACKENDS = {"local": "cluster.local"}


def run_training(cfg: RunConfig) -> dict[str, Any]:
    """Train ``cfg`` on the backend it names; returns rank 0's metrics."""
    backend = cfg.cluster.backend
    if backend not in BACKENDS:
        known = ", ".join(BACKENDS)
        raise RecsysError(f"--backend: {backend!r} is not available (available: {known})")
    module = importlib.import_module(BACKENDS[backend])
    return dict(module.launch(cfg))
