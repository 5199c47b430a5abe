"""``train(cfg, runtime)``: one training run in this process, the same recipe on every backend.

    recsys train --config configs/dlrm-movielens.yaml --data data/demo/movielens-100k
    recsys train ... --num-workers 2 [--backend ray|spark]

``run_training(cfg)`` checks and resolves the configuration once, in the launching process
(``app.resolve``), then hands ``train`` to the backend in ``cluster/``, which runs it in every
training process: setup (data, task, tracking, Trainer), fit, test the best checkpoint, publish.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from app.config import RunConfig
from app.resolve import complete_defaults, resolve_run
from cluster.runtime import WorkerRuntime
from core.logs import setup_logging

log = logging.getLogger(__name__)


def run_training(cfg: RunConfig) -> dict[str, Any]:
    """Train ``cfg`` on the backend it names; returns rank 0's metrics.

    The MLflow run is opened here, in the launching process, and ended here when the training does not
    finish: FAILED after an error, KILLED after a stop signal (``core.signals``), with an end time,
    whichever process the backend ran rank 0 in (a resumed run that had finished stays as it was)."""
    from app.tracking import RunState, open_run, prepare_store
    from cluster.launch import launch

    cfg = resolve_run(cfg)  # fail fast, before any worker starts; workers get the resolved config
    continued: RunState | None = None
    run_id: str | None = None
    uri = cfg.tracking.tracking_uri
    if cfg.tracking.enabled and uri:
        prepare_store(uri)
        continued = RunState.of_checkpoint(uri, cfg.trainer.resume_from)
        run_id = continued.run_id if continued is not None else open_run(cfg)
    try:
        fn = functools.partial(train, run_id=run_id)
        return launch(fn, cfg, cfg.cluster, name=cfg.tracking.run_name or cfg.model)
    except BaseException as e:
        if uri and run_id is not None:
            end_unfinished_run(uri, run_id, continued, e, cfg.trainer.resume_from)
        raise


def end_unfinished_run(uri: str, run_id: str, continued: Any, error: BaseException, resume: str | None) -> None:
    """KILLED (a stop signal) or FAILED, with an end time; a failed resume puts the run it reopened back
    as it was. Never hides ``error``: a tracking store that fails now is only warned about."""
    from app.tracking import end_run
    from cluster.launch import one_line
    from core.signals import interruption

    status = "KILLED" if interruption(error) is not None else "FAILED"
    try:
        if continued is not None:
            continued.restore(uri, f"{resume}: {one_line(error)}", status)
        else:
            end_run(uri, run_id, status)
    except Exception as e:  # the store itself may be what failed
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, one_line(e))


def train(cfg: RunConfig, runtime: WorkerRuntime | None = None, run_id: str | None = None) -> dict[str, Any]:
    """Fit, test the best checkpoint, publish to MLflow (with the last epoch's checkpoint). Returns the
    test metrics (every rank; the MLflow run id on rank 0). ``run_id``: the MLflow run the launcher
    opened (None: rank 0 opens one)."""
    import lightning as L

    from app.tracking import Tracker
    from datamodules.streaming import StreamingDataModule

    runtime = runtime or WorkerRuntime()
    setup_logging(cfg.verbose, runtime.rank, runtime.world_size)
    cfg = complete_defaults(cfg)
    # setup
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    data = StreamingDataModule(cfg.data)
    task = build_task(cfg, data)
    resume_from = runtime.resume_from or cfg.trainer.resume_from
    tracker = Tracker(cfg, resume_from, run_id) if cfg.tracking.enabled and runtime.rank == 0 else None
    trainer, observers = build_trainer(cfg, runtime, tracker)
    if tracker is not None:
        tracker.log_params(trainer.world_size)
        tracker.describe(trainer.world_size, data.meta, data.digests)
    if runtime.rank == 0:
        log.info(
            "training %s on %s: %d process(es) x batch %d = global batch %d, %d epoch(s) at most",
            cfg.model,
            cfg.data.path,
            runtime.world_size,
            cfg.data.batch_size,
            cfg.data.batch_size * runtime.world_size,
            cfg.trainer.max_epochs,
        )
    try:
        # fit and test
        trainer.fit(task, datamodule=data, ckpt_path=resume_from)
        best_path = trainer.strategy.broadcast(observers["best"].best_model_path)
        last_path = trainer.strategy.broadcast(observers["best"].last_model_path)
        if not best_path and last_path:  # no validation ran (--max-steps ended the first epoch early)
            log.info("no validation ran: the last checkpoint is tested and published as the best")
            best_path = last_path
        tested: list[dict[str, Any]] = []
        if data.meta.splits["test"].rows:
            tested = trainer.test(task, datamodule=data, ckpt_path=best_path or None, verbose=False)
        elif runtime.rank == 0:
            log.info("%s has no test split: no test metrics", cfg.data.path)
        if tracker is not None and tested:
            tracker.log_figures(task.figure_data, cfg.trainer.k)
        metrics = run_metrics(trainer, tested, best_path, observers)
        metrics["last_checkpoint"] = last_path
        plan = getattr(trainer.strategy, "plan", None)
        if runtime.rank == 0 and plan is not None:
            from modules.sharding import format_plan, plan_rows

            plan_text = format_plan(plan_rows(plan))
            log.info("sharding plan:\n%s", plan_text)
            if tracker is not None:
                tracker.log_text(plan_text, "sharding_plan.txt")
        log.info("trained %d epoch(s)", metrics["epochs"])
        # publish
        exported = export_model(cfg, task, data.meta)  # a collective: every rank hands in its table shards
        if tracker is not None:
            metrics["run_id"] = tracker.run_id
            tracker.publish(best_path, last_path, *(exported or (None, None)))
        if runtime.report is not None:
            runtime.report(metrics)
        return metrics
    finally:
        data.teardown()  # its cache and shared memory, also when the run was stopped


def build_task(cfg: RunConfig, data: Any) -> Any:
    """The LightningModule of ``cfg.model`` around a fresh model (tables on ``meta``), for the
    dataset of ``data`` (a StreamingDataModule: its metadata, the corpus when the kind needs it, the
    users' train histories when the model reads them)."""
    from modules.registry import TaskInputs, model_kind
    from modules.sharding import parse_bytes

    kind = model_kind(cfg.model)
    corpus = data.corpus() if kind.needs_corpus else None
    histories = None
    if cfg.arch.history:
        histories = corpus.histories if corpus is not None else data.histories()
    inputs = TaskInputs(
        optim=cfg.optim,
        arch=cfg.arch,
        meta=data.meta,
        corpus=corpus,
        histories=histories,
        k=cfg.trainer.k,
        eval_batch=cfg.data.eval_batch_size or cfg.data.batch_size,
        eval_users=cfg.trainer.eval_users,
        eval_seed=cfg.trainer.seed,
        eval_block_bytes=parse_bytes(cfg.trainer.eval_block_memory, "--trainer.eval_block_memory"),
    )
    return kind.build_task(kind.build_model(data.meta, cfg.arch, "meta"), inputs)


def build_strategy(cfg: RunConfig, runtime: WorkerRuntime) -> Any:
    """The TorchRec strategy of this worker (training and evaluation alike)."""
    from modules.sharding import make_strategy, parse_bytes

    budget = cfg.cluster.memory_per_worker
    return make_strategy(
        runtime.strategy_base,
        memory_per_worker=parse_bytes(budget) if budget else None,
        # the planner sizes I/O buffers from the batch only when it must fit a budget: its choice of
        # sharding (and so the numbers a run gives) stays the default one otherwise
        batch_size=cfg.data.batch_size if budget else None,
        sharding=cfg.cluster.sharding,
        process_group_backend="nccl" if runtime.accelerator == "gpu" else "gloo",
    )


def build_trainer(cfg: RunConfig, runtime: WorkerRuntime, tracker: Any) -> tuple[Any, dict[str, Any]]:
    """The Lightning Trainer on the TorchRec strategy, and the callbacks whose results the run reports."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from modules.callbacks import EpochLosses, FirstStepTime, KeepStopSignals, RunIdInCheckpoint

    monitor = cfg.trainer.monitor  # None: validation is off (--trainer.limit_val_batches 0)
    mode = "min" if "loss" in (monitor or "") else "max"
    observers: dict[str, Any] = {
        # the best epoch (what is tested and packaged; without a monitor, the latest) and the last one
        # (where a resume continues)
        "best": ModelCheckpoint(monitor=monitor, mode=mode, save_top_k=1, filename="best-{epoch}", save_last=True),
        "losses": EpochLosses(),
        "first_step": FirstStepTime(),
    }
    logger = tracker.logger if tracker is not None else False
    callbacks: list[Any] = [*observers.values(), RunIdInCheckpoint(logger), KeepStopSignals(), *runtime.callbacks]
    if cfg.trainer.patience > 0 and monitor:
        # not strict: an epoch cut short by --max-steps ends before validation, with no value to compare
        # (the monitored name itself was checked against the model's metrics in resolve_run)
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=cfg.trainer.patience, strict=False))
    gpu = runtime.accelerator == "gpu"
    strategy = build_strategy(cfg, runtime)
    trainer = L.Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=runtime.devices,
        num_nodes=runtime.num_nodes,
        strategy=strategy,
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
    return runtime.prepare_trainer(trainer), observers


def run_metrics(
    trainer: Any, tested: list[dict[str, Any]], best_path: str, observers: dict[str, Any]
) -> dict[str, Any]:
    """What a run reports: test metrics, the training curve, where the tables were placed."""
    from modules.sharding import plan_rows, table_placement

    losses = observers["losses"].losses
    metrics: dict[str, Any] = {k: float(v) for k, v in (tested[0] if tested else {}).items()}
    if losses:
        metrics["train/loss"] = losses[-1]
    metrics["best_checkpoint"] = best_path
    metrics["epochs"] = trainer.current_epoch
    metrics["train_loss_per_epoch"] = losses
    metrics["first_step_unix_time"] = observers["first_step"].at
    metrics["world_size"] = trainer.world_size
    plan = getattr(trainer.strategy, "plan", None)
    metrics["table_ranks"] = table_placement(plan) if plan is not None else {}
    metrics["table_sharding"] = {row["table"]: row["sharding"] for row in plan_rows(plan)} if plan is not None else {}
    return metrics


def export_model(cfg: RunConfig, task: Any, meta: Any) -> tuple[Any, dict[str, Any]] | None:
    """Gather the sharded weights on rank 0 into a plain CPU scorer and the unsharded model's state
    dict (what serving rebuilds the model from); None elsewhere. A collective."""
    from modules.registry import model_kind
    from modules.sharding import gather_full_state

    full = gather_full_state(task.model)
    if full is None:
        return None
    kind = model_kind(cfg.model)
    plain = kind.build_model(meta, cfg.arch, "cpu")
    plain.load_state_dict(full)
    return kind.build_scorer(plain.eval(), cfg.arch), plain.state_dict()
