"""``train(cfg)``: one training run in this process, the same function on every backend.

The launcher (``cluster/``) decides where and how many processes run it and passes a
``WorkerRuntime``; this function builds the data, the model, the task and the Trainer inside the
worker, fits, tests the best checkpoint and logs everything to MLflow from rank 0.

    recsys train --model dlrm --data data/demo/movielens-100k --max-epochs 3
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from app.config import RunConfig
from cluster.runtime import WorkerRuntime
from core.errors import RecsysError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> dotted keys (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def resolve_tracking_uri(uri: str | None) -> str:
    """The tracking URI in force: the flag, else $MLFLOW_TRACKING_URI, else a SQLite file here."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def check_tracking_uri(uri: str) -> None:
    """Fail fast when an MLflow server cannot be reached (before any training starts)."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                r.read()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RecsysError(f"--tracking-uri {uri}: MLflow server unreachable ({reason})") from None
    elif uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///") :]).parent
        if not parent.is_dir():
            raise RecsysError(f"--tracking-uri {uri}: directory {parent} does not exist")


def validate_run(cfg: RunConfig) -> Any:
    """Check the configuration against the dataset before anything heavy starts; returns metadata."""
    from datamodules.schema import read_metadata
    from modules.models import MODELS

    if cfg.model not in MODELS:
        raise RecsysError(f"--model: unknown model {cfg.model!r} (choose from {', '.join(MODELS)})")
    if "://" not in cfg.data.path and not Path(cfg.data.path).exists():
        raise RecsysError(f"--data {cfg.data.path}: no such dataset directory (run `recsys data prepare`)")
    meta = read_metadata(cfg.data.path) if "://" not in cfg.data.path else None
    if meta is not None:  # every shard there with its size: fail here, once, before any worker starts
        from datamodules.integrity import check_dataset

        check_dataset(cfg.data.path, meta.splits)
    if meta is not None and cfg.model == "two-tower" and meta.task != "retrieval":
        raise RecsysError(
            f"--model two-tower: dataset {meta.dataset!r} has no users/items (task {meta.task}); "
            "use dlrm, dcn or deepfm"
        )
    resume = cfg.trainer.resume_from
    if resume and "://" not in resume:
        from modules.safe_checkpoint import check_checkpoint

        try:
            check_checkpoint(resume)  # loads its pickles as plain data only, before anything starts
        except RecsysError as e:
            raise RecsysError(f"--resume-from {e}") from None
    if cfg.tracking.enabled:
        check_tracking_uri(resolve_tracking_uri(cfg.tracking.tracking_uri))
    return meta


def prepare_tracking(cfg: RunConfig) -> None:
    """Create the tracking store once, in the launching process, before workers race to migrate it."""
    if cfg.tracking.enabled:
        from mlflow.tracking import MlflowClient

        MlflowClient(resolve_tracking_uri(cfg.tracking.tracking_uri)).search_experiments(max_results=1)


def build_task(cfg: RunConfig, meta: Any) -> Any:
    """The LightningModule for ``cfg.model`` around a fresh model (tables on ``meta``)."""
    from modules.models import build_model
    from modules.tasks import RankingTask, RetrievalCorpus, RetrievalTask

    model = build_model(cfg.model, meta, cfg.arch, device="meta")
    if cfg.model == "two-tower":
        corpus = RetrievalCorpus.load(cfg.data.path, meta) if "://" not in cfg.data.path else None
        return RetrievalTask(
            model,
            cfg.optim,
            cfg.arch,
            meta,
            corpus,
            k=cfg.trainer.k,
            eval_batch=cfg.data.eval_batch_size or cfg.data.batch_size,
        )
    return RankingTask(model, cfg.optim)


def monitor_of(cfg: RunConfig) -> str:
    return cfg.trainer.monitor or (f"val/ndcg_at_{cfg.trainer.k}" if cfg.model == "two-tower" else "val/auroc")


def quiet_known_warnings() -> None:
    """Silence warnings that are about the libraries' internals, not about this run."""
    import logging
    import warnings

    # Epoch metrics come from torchmetrics objects, which synchronise across ranks themselves.
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
    # TorchRec's state dicts still use ShardedTensor; torch.distributed.checkpoint warns about it.
    warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)  # the pickle-format notice


def train(cfg: RunConfig, runtime: WorkerRuntime | None = None) -> dict[str, Any]:
    """Fit, test the best checkpoint, log to MLflow. Returns the test metrics and run id (every rank)."""
    quiet_known_warnings()
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from datamodules.streaming import StreamingDataModule
    from modules.callbacks import EpochLosses, FirstStepTime, RunIdInCheckpoint
    from modules.sharding import make_strategy, table_placement

    runtime = runtime or WorkerRuntime()
    validate_run(cfg)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    dm = StreamingDataModule(cfg.data)
    task = build_task(cfg, dm.meta)
    resume_from = runtime.resume_from or cfg.trainer.resume_from
    logger: Any = False
    continued = None
    if cfg.tracking.enabled and runtime.rank == 0:  # one run, written by rank 0 only
        from lightning.pytorch.loggers import MLFlowLogger

        continued = previous_run_id(cfg, resume_from)
        logger = MLFlowLogger(
            experiment_name=cfg.tracking.experiment,
            run_name=cfg.tracking.run_name,
            tracking_uri=resolve_tracking_uri(cfg.tracking.tracking_uri),
            log_model=False,
            run_id=continued,
        )
    monitor = monitor_of(cfg)
    mode = "min" if "loss" in monitor else "max"
    best = ModelCheckpoint(monitor=monitor, mode=mode, save_top_k=1, filename="best-{epoch}")
    losses, first_step = EpochLosses(), FirstStepTime()
    callbacks: list[Any] = [best, losses, first_step, RunIdInCheckpoint(logger), *runtime.callbacks]
    if cfg.trainer.patience > 0:
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=cfg.trainer.patience))
    use_gpu = cfg.trainer.accelerator == "gpu" or (cfg.trainer.accelerator == "auto" and torch.cuda.is_available())
    trainer = L.Trainer(
        accelerator="gpu" if use_gpu else "cpu",
        devices=runtime.devices,
        num_nodes=runtime.num_nodes,
        strategy=make_strategy(runtime.strategy_base, process_group_backend="nccl" if use_gpu else "gloo"),
        plugins=runtime.plugins or None,
        max_epochs=cfg.trainer.max_epochs,
        max_steps=cfg.trainer.max_steps,
        limit_val_batches=cfg.trainer.limit_val_batches,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=cfg.trainer.output_dir,
        enable_progress_bar=cfg.trainer.progress_bar,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )
    trainer = runtime.prepare_trainer(trainer)
    if logger and trainer.is_global_zero:
        if continued:  # params are already in the run (and MLflow refuses to change them)
            logger.experiment.set_tag(logger.run_id, "recsys.resumed_from", resume_from)
        else:
            logger.log_hyperparams(flatten(dataclasses.asdict(cfg)))
    trainer.fit(task, datamodule=dm, ckpt_path=resume_from)
    best_path = trainer.strategy.broadcast(best.best_model_path)
    tested = trainer.test(task, datamodule=dm, ckpt_path=best_path or None, verbose=False)
    metrics: dict[str, Any] = {k: float(v) for k, v in (tested[0] if tested else {}).items()}
    metrics["best_checkpoint"] = best_path
    metrics["epochs"] = trainer.current_epoch
    metrics["train_loss_per_epoch"] = losses.losses
    metrics["first_step_unix_time"] = first_step.at
    metrics["world_size"] = trainer.world_size
    plan = getattr(trainer.strategy, "plan", None)
    metrics["table_ranks"] = table_placement(plan) if plan is not None else {}
    exported = export_model(cfg, task, dm.meta)
    if logger and trainer.is_global_zero:
        metrics["run_id"] = logger.run_id
        log_artifacts(logger, cfg, best_path, exported)
    if runtime.report is not None:
        runtime.report(metrics)
    dm.teardown()
    return metrics


def previous_run_id(cfg: RunConfig, checkpoint: str | None) -> str | None:
    """The MLflow run a checkpoint was written by, when it is in this tracking store: resuming
    continues that run (one run per training, also across a Ray restart)."""
    if not checkpoint:
        return None
    from modules.callbacks import RunIdInCheckpoint
    from modules.sharding import read_trainer_state

    run_id = read_trainer_state(checkpoint).get(RunIdInCheckpoint.KEY)
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(resolve_tracking_uri(cfg.tracking.tracking_uri)).get_run(run_id)
    except MlflowException:
        return None  # another store: start a new run
    return str(run_id)


def export_model(cfg: RunConfig, task: Any, meta: Any) -> Any:
    """Gather the sharded weights into a plain CPU model on rank 0 (a collective call)."""
    from modules.models import build_model
    from modules.scoring import build_scorer
    from modules.sharding import gather_full_state

    full = gather_full_state(task.model)
    if full is None:
        return None
    plain = build_model(cfg.model, meta, cfg.arch, device="cpu")
    plain.load_state_dict(full)
    return build_scorer(cfg.model, plain.eval(), cfg.arch.temperature)


def log_artifacts(logger: Any, cfg: RunConfig, best_path: str, scorer: Any) -> None:
    """Rank 0: config, dataset metadata, best checkpoint and the packaged model into the run."""
    import mlflow

    client = logger.experiment
    run_id = logger.run_id
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(config_yaml(cfg))
        client.log_artifact(run_id, str(Path(tmp) / "config.yaml"))
    if "://" not in cfg.data.path:
        client.log_artifact(run_id, str(Path(cfg.data.path) / "metadata.json"), "dataset")
    if best_path:
        client.log_artifacts(run_id, best_path, "checkpoints/best")
    if scorer is not None:
        mlflow.set_tracking_uri(resolve_tracking_uri(cfg.tracking.tracking_uri))
        with mlflow.start_run(run_id=run_id):
            # pickle, not the default pt2 graph: a KeyedJaggedTensor input does not trace from an example
            mlflow.pytorch.log_model(scorer, name="model", serialization_format="pickle")
            mlflow.log_text(json.dumps({"model": cfg.model, "dataset": cfg.data.path}), "model_info.json")
