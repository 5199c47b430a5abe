"""Small Lightning callbacks used by training."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback


class EpochLosses(Callback):
    """Collects the mean training loss of every epoch."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        value = trainer.callback_metrics.get("train/loss_epoch")
        if value is not None:
            self.losses.append(float(value))


class FirstStepTime(Callback):
    """Wall-clock time (Unix seconds) when the first training batch starts: launch latency."""

    def __init__(self) -> None:
        self.at: float | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.at is None:
            import time

            self.at = time.time()


class RunIdInCheckpoint(Callback):
    """Stores the MLflow run id in every checkpoint, so that a resumed training continues the same run."""

    KEY = "mlflow_run_id"

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self.logger:
            checkpoint[self.KEY] = self.logger.run_id


class KeepStopSignals(Callback):
    """Keeps the process's stop-signal policy (``core.signals``) in force while Lightning runs a stage.

    For the length of a fit Lightning takes SIGTERM for itself: it ends the loop at the next step, as a
    success (exit status 0 for a killed run), after a collective broadcast made from inside the signal
    handler. Its hooks at the start of each stage run after it has done so; the handlers it saved are
    the policy's, and it puts them back at teardown."""

    def _keep(self) -> None:
        from core.signals import reinstall

        reinstall()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._keep()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._keep()

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._keep()

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._keep()
