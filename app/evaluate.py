"""``recsys evaluate``: score a finished run (from MLflow) or a checkpoint on a split."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from app.config import RunConfig, TrackingConfig
from app.resolve import resolve_run
from app.tracking import existing_store
from app.train import build_strategy, build_task
from cluster.runtime import WorkerRuntime
from core.errors import RecsysError
from core.logs import setup_logging


def fetch_run(run_id: str, tracking_uri: str | None, dest: Path) -> tuple[Path, Path]:
    """Download a run's config.yaml and best checkpoint; returns their local paths."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(existing_store(tracking_uri))
    try:
        config = Path(client.download_artifacts(run_id, "config.yaml", str(dest)))
        checkpoint = Path(client.download_artifacts(run_id, "checkpoints/best", str(dest)))
    except MlflowException as e:
        raise RecsysError(f"--run-id {run_id}: {str(e).splitlines()[0]}") from None
    return config, checkpoint


def evaluate(cfg: RunConfig, checkpoint: str, split: str = "test") -> dict[str, float]:
    """Metrics of the checkpoint on ``split`` (val or test), on the processes ``cfg.cluster`` names (one
    by default: in this process). The checkpoint loads under this run's own sharding plan, whatever the
    world size and plan it was written with (``modules.safe_checkpoint.dcp_load``)."""
    from cluster.launch import launch
    from datamodules.streaming import fetch_metadata
    from modules.registry import model_kind
    from modules.safe_checkpoint import check_checkpoint, check_model_fits

    if split not in ("val", "test"):
        raise RecsysError(f"--split: must be val or test, got {split!r}")

    try:
        check_checkpoint(checkpoint)  # loads its pickles as plain data only, before the model is built
    except RecsysError as e:
        raise RecsysError(f"--checkpoint {e}") from None
    loop = dataclasses.replace(cfg.trainer, resume_from=None)
    cfg = resolve_run(dataclasses.replace(cfg, trainer=loop, tracking=TrackingConfig(enabled=False)))
    with tempfile.TemporaryDirectory() as tmp:
        meta = fetch_metadata(cfg.data.path, Path(tmp))
    try:  # the model it holds is this config's (before any worker starts)
        check_model_fits(checkpoint, model_kind(cfg.model).build_model(meta, cfg.arch, "meta"))
    except RecsysError as e:
        raise RecsysError(f"--checkpoint {e}") from None
    metrics = launch(evaluate_worker, (cfg, checkpoint, split), cfg.cluster, name="evaluate")
    return {k: float(v) for k, v in metrics.items()}


def evaluate_worker(payload: tuple[RunConfig, str, str], runtime: WorkerRuntime) -> dict[str, Any]:
    """One evaluating process: the model sharded over this run's processes, the checkpoint loaded into it."""
    import lightning as L

    from datamodules.streaming import StreamingDataModule
    from modules.callbacks import KeepStopSignals

    cfg, checkpoint, split = payload
    setup_logging(cfg.verbose, runtime.rank, runtime.world_size)
    dm = StreamingDataModule(cfg.data)
    task = build_task(cfg, dm)
    trainer = L.Trainer(
        accelerator="gpu" if runtime.accelerator == "gpu" else "cpu",
        devices=runtime.devices,
        num_nodes=runtime.num_nodes,
        plugins=runtime.plugins or None,
        logger=False,
        strategy=build_strategy(cfg, runtime),
        enable_progress_bar=cfg.trainer.progress_bar,
        enable_model_summary=False,
        callbacks=[KeepStopSignals()],
    )
    trainer = runtime.prepare_trainer(trainer)
    run: Any = trainer.test if split == "test" else trainer.validate
    out = run(task, datamodule=dm, ckpt_path=checkpoint, verbose=False)
    dm.teardown()
    metrics: dict[str, Any] = {k: float(v) for k, v in out[0].items()}
    if runtime.report is not None:
        runtime.report(metrics)
    return metrics


def format_metrics(metrics: dict[str, Any]) -> str:
    """A two-column table of the numeric metrics."""
    rows = [(k, v) for k, v in sorted(metrics.items()) if isinstance(v, float | int)]
    width = max((len(k) for k, _ in rows), default=6)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{k:<{width}}  {v:.4f}" for k, v in rows]
    return "\n".join(lines)


def evaluate_run(run_id: str, tracking_uri: str | None, split: str, load_config: Any) -> dict[str, float]:
    """Evaluate an MLflow run's best checkpoint with the config it was trained with."""
    from modules.safe_checkpoint import check_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        config, checkpoint = fetch_run(run_id, tracking_uri, Path(tmp))
        try:
            check_checkpoint(checkpoint)  # artifacts are files from elsewhere: plain data only
        except RecsysError as e:
            raise RecsysError(f"--run-id {run_id}: {e}") from None
        cfg = load_config(config)
        return evaluate(cfg, str(checkpoint), split)
