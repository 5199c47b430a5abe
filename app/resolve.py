"""Check and resolve a run's configuration once, in the launching process, before any worker starts.

Workers receive the resolved config: the tracking URI, the dataset path and the other local paths
made absolute, the monitored metric, the data seed and the run name filled in. A problem is one
``RecsysError`` line here, never an error in every worker after a wasted start.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

from app.config import RunConfig, TrainerConfig
from core.errors import RecsysError
from datamodules.schema import DatasetMetadata

log = logging.getLogger(__name__)


def absolute(path: str) -> str:
    """A local path made absolute (workers may run elsewhere); remote URIs pass unchanged."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def complete_defaults(cfg: RunConfig) -> RunConfig:
    """Fill what the config leaves to defaults: the data seed (the run's --seed) and the monitored
    metric (the model kind's). Cheap and idempotent: ``train`` applies it too, for direct callers."""
    from modules.registry import model_kind

    data, trainer = cfg.data, cfg.trainer
    if data.seed is None:
        data = dataclasses.replace(data, seed=trainer.seed)
    if not validates(trainer):  # nothing to monitor: no early stopping, the last epoch is the one kept
        if str(trainer.monitor).startswith("val/"):
            trainer = dataclasses.replace(trainer, monitor=None)
    elif trainer.monitor is None:
        trainer = dataclasses.replace(trainer, monitor=model_kind(cfg.model).monitor(trainer.k))
    return dataclasses.replace(cfg, data=data, trainer=trainer)


def validates(trainer: TrainerConfig) -> bool:
    """Whether the run validates every epoch (``--trainer.limit_val_batches 0`` switches it off)."""
    return trainer.limit_val_batches != 0


def resolve_run(cfg: RunConfig) -> RunConfig:
    """The checked, resolved configuration of a run (raises RecsysError with one line)."""
    from app.tracking import check_tracking_uri, new_run_name, resolve_tracking_uri
    from cluster.launch import check_cluster
    from datamodules.streaming import blocks_per_batch, fetch_metadata
    from modules.registry import model_kind

    kind = model_kind(cfg.model)
    check_cluster(cfg.cluster)
    if cfg.trainer.k < 1:
        raise RecsysError(f"--trainer.k: must be at least 1, got {cfg.trainer.k}")
    if cfg.trainer.max_epochs < 1 and cfg.trainer.max_steps < 1:
        raise RecsysError(f"--max-epochs: must be at least 1, got {cfg.trainer.max_epochs}")
    if cfg.trainer.limit_val_batches < 0:
        raise RecsysError(f"--trainer.limit_val_batches: must be 0 (off) or more, got {cfg.trainer.limit_val_batches}")
    if cfg.trainer.eval_users < 0:
        raise RecsysError(f"--trainer.eval_users: must be 0 (every user) or more, got {cfg.trainer.eval_users}")
    path = absolute(cfg.data.path)
    if "://" not in path and not Path(path).exists():
        raise RecsysError(f"--data {cfg.data.path}: no such dataset directory (run `recsys data prepare`)")
    with tempfile.TemporaryDirectory() as tmp:
        meta = fetch_metadata(path, Path(tmp))
    if "://" not in path:  # every shard there with its size: fail here, once, before any worker starts
        from datamodules.integrity import check_dataset

        check_dataset(path, meta.splits)
    kind.check_dataset(meta)
    lists = cfg.arch.loss == "softmax" or str(cfg.trainer.monitor).startswith("val/ndcg_at_")
    if kind.dataset_task is None and not meta.candidates and lists:  # a ranking model on rated pairs
        raise RecsysError(
            f"--data {cfg.data.path}: listwise training and val/ndcg_at_K need the candidate lists of "
            "`recsys data candidates`"
        )
    check_evaluation(cfg, meta)
    blocks_per_batch(cfg.data.batch_size, meta.block_rows, "--data.batch_size")
    blocks_per_batch(cfg.data.eval_batch_size or cfg.data.batch_size, meta.block_rows, "--data.eval_batch_size")
    cfg = complete_defaults(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=path)))
    trainer = cfg.trainer
    known = kind.metrics(trainer.k)
    if trainer.monitor is not None and trainer.monitor not in known:
        raise RecsysError(
            f"--trainer.monitor: {trainer.monitor!r} is not a metric of {kind.name} (one of {', '.join(known)})"
        )
    check_val_labels(cfg, meta)
    no_val = str(trainer.monitor).startswith("val/") and meta.splits["val"].rows == 0
    if no_val:
        trainer = dataclasses.replace(trainer, monitor="train/loss_epoch")
    resume = trainer.resume_from
    if resume:
        from modules.safe_checkpoint import check_checkpoint, check_model_fits

        if resume.startswith("runs:/"):  # a run's logged checkpoint (checkpoints/last or checkpoints/best)
            from app.tracking import download_checkpoint, resolve_tracking_uri

            uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
            resume = download_checkpoint(resume, uri, Path(absolute(trainer.output_dir)) / "resumed")
        resume = absolute(resume)
        if "://" not in resume:
            try:
                check_checkpoint(resume)  # loads its pickles as plain data only, before anything starts
                check_model_fits(resume, kind.build_model(meta, cfg.arch, "meta"))
            except RecsysError as e:
                raise RecsysError(f"--resume-from {e}") from None
    trainer = dataclasses.replace(trainer, resume_from=resume, output_dir=absolute(trainer.output_dir))
    tracking = cfg.tracking
    if tracking.enabled:
        uri = resolve_tracking_uri(tracking.tracking_uri)
        check_tracking_uri(uri)
        tracking = dataclasses.replace(
            tracking, tracking_uri=uri, run_name=tracking.run_name or new_run_name(cfg.model)
        )
    if cfg.cluster.memory_per_worker is not None or cfg.cluster.sharding:
        # plan here: a model that fits no plan, or a sharding no plan gives, is one line now
        from cluster.launch import local_accelerator
        from modules.sharding import check_plan, parse_bytes

        budget = parse_bytes(cfg.cluster.memory_per_worker) if cfg.cluster.memory_per_worker else None
        device = "cuda" if local_accelerator(cfg.cluster.accelerator) == "gpu" else "cpu"
        model = kind.build_model(meta, cfg.arch, "meta")
        batch = cfg.data.batch_size if budget else None
        check_plan(model, cfg.cluster.num_workers, device, budget, batch, cfg.cluster.sharding)
    cluster = dataclasses.replace(cfg.cluster, storage_path=absolute(cfg.cluster.storage_path))
    if no_val:
        log.info("%s has no validation split: monitoring train/loss_epoch instead of %s", path, cfg.trainer.monitor)
    if not validates(trainer):
        log.info("validation is off (--trainer.limit_val_batches 0): no early stopping; the last epoch is tested")
    return dataclasses.replace(cfg, trainer=trainer, tracking=tracking, cluster=cluster)


def check_val_labels(cfg: RunConfig, meta: DatasetMetadata) -> None:
    """Refuse, before the first epoch, a monitored val metric that the val split's labels cannot give
    (from ``metadata.json``'s label rate): every metric but the log loss needs a liked row, and AUROC
    an unliked one too. Without this the run trains a whole epoch and then fails on the monitor."""
    monitor, val = str(cfg.trainer.monitor), meta.splits.get("val")
    if not validates(cfg.trainer) or not monitor.startswith("val/") or val is None or val.rows == 0:
        return  # nothing validated (an empty val split: train/loss_epoch is monitored instead)
    metric = monitor.removeprefix("val/")
    if metric != "logloss" and val.label_rate <= 0:
        labels = "no positive label (label rate 0)"
    elif metric == "auroc" and val.label_rate >= 1:
        labels = "only positive labels (label rate 1)"
    else:
        return
    rebuild = (
        "rebuild it with `recsys data candidates` so that the val users' lists hold a liked item (more --candidates, "
        "other --val-users/--val-fold/--seed), or "
        if meta.candidates
        else ""
    )
    raise RecsysError(
        f"--data {cfg.data.path}: its val split ({val.rows:,} rows) holds {labels}, so the monitored {monitor} "
        f"cannot be computed (the run would fail after its first epoch); {rebuild}monitor another metric "
        "(--trainer.monitor val/logloss) or switch validation off (--trainer.limit_val_batches 0)"
    )


def check_evaluation(cfg: RunConfig, meta: DatasetMetadata) -> None:
    """Refuse, before any worker starts, a full-corpus evaluation that cannot fit one worker. Its memory
    is known from the metadata: every corpus item's vector plus one block of users x items scores
    (``modules.evaluation``), against ``--cluster.memory_per_worker``, else (local processes) this
    machine's available memory shared by its workers."""
    from cluster.launch import workers_here
    from modules.evaluation import block_users, memory_needed
    from modules.registry import model_kind
    from modules.sharding import parse_bytes

    block_bytes = parse_bytes(cfg.trainer.eval_block_memory, "--trainer.eval_block_memory")
    kind = model_kind(cfg.model)
    splits = meta.splits
    evaluated = (validates(cfg.trainer) and splits["val"].rows > 0) or splits["test"].rows > 0
    if not kind.needs_corpus or not evaluated:
        return
    workers = max(cfg.cluster.num_workers, 1)
    if cfg.cluster.memory_per_worker:
        budget, against = parse_bytes(cfg.cluster.memory_per_worker), "--cluster.memory_per_worker"
    elif workers_here(cfg.cluster):
        import psutil

        budget, against = psutil.virtual_memory().available // workers, f"this machine's available memory / {workers}"
    else:
        return  # the workers' machines are not known here
    n_items = max(meta.feature(meta.item_id_feature or "item_id").cardinality - 1, 1)
    users = max(meta.feature(meta.user_id_feature or "user_id").cardinality - 1, 1)
    if cfg.trainer.eval_users:
        users = min(users, cfg.trainer.eval_users)
    dim = int(getattr(kind.build_model(meta, cfg.arch, "meta"), "out_dim", 1))
    block = min(-(-users // workers), block_users(n_items, block_bytes))
    need = memory_needed(n_items, dim, block)
    if need <= budget:
        return
    vectors = memory_needed(n_items, dim, 0)
    if memory_needed(n_items, dim, 1) > budget:
        remedy = "the item vectors alone do not fit: give each worker more memory or use a smaller tower output"
    else:
        remedy = "lower --trainer.eval_block_memory"
    raise RecsysError(
        f"evaluation: {n_items:,} corpus items x {dim} floats ({mib(vectors)}) plus a block of {block:,} users' "
        f"scores ({mib(need - vectors)}) need {mib(need)} per worker, more than {against} ({mib(budget)}); {remedy}"
    )


def mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"
