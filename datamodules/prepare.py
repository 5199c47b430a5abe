"""``recsys data prepare``: raw source -> split -> train vocabularies -> encoded blocks -> MDS shards.

This module picks the path for a dataset (the local pandas engine below, the Spark engine, or the
synthetic-ctr generator); all of them encode and write through ``datamodules.encoding``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from core.errors import RecsysError, require
from datamodules.config import DATASETS, PrepareConfig
from datamodules.encoding import (
    SPLIT_CODES,
    assign_split,
    build_metadata,
    encode_frame,
    finish_dataset,
    fit_plan,
    id_pairs,
    label_frame,
    make_plan,
    row_keys,
    user_histories,
    write_item_titles,
    write_split,
    write_tables,
)
from datamodules.output import atomic_output, check_output, refuse_inputs
from datamodules.schema import DatasetMetadata, SplitInfo
from datamodules.sources import READERS, RawTable

log = logging.getLogger(__name__)


# -- the local engine ---------------------------------------------------------------------------------


def prepare(cfg: PrepareConfig) -> DatasetMetadata:
    """Prepare ``cfg.dataset`` into ``cfg.out`` (atomically) and return its metadata."""
    validate(cfg)
    out = Path(cfg.out)
    check_output(out, cfg.overwrite, cfg.source)  # before reading anything; atomic_output checks again
    refuse_inputs(out, [(f"--source {cfg.source}", cfg.source)])
    if cfg.engine == "spark":
        from datamodules.spark_prepare import prepare_with_spark

        with atomic_output(out, cfg.overwrite) as tmp:
            return prepare_with_spark(cfg, tmp)
    if cfg.dataset in OUT_OF_CORE:
        with atomic_output(out, cfg.overwrite) as tmp:
            return out_of_core(cfg, tmp)
    raw = read_source(cfg)
    with atomic_output(out, cfg.overwrite) as tmp:
        return prepare_interactions(raw, cfg, tmp)


OUT_OF_CORE = ("synthetic-ctr", "synthetic-retrieval", "interactions")
"""Datasets the local engine prepares a chunk at a time (memory does not grow with their size)."""


def out_of_core(cfg: PrepareConfig, tmp: Path) -> DatasetMetadata:
    """The chunked local paths: generated sets, and interaction files read in chunks."""
    if cfg.dataset == "synthetic-ctr":
        from datamodules.synthetic import prepare_synthetic_ctr

        return prepare_synthetic_ctr(cfg, tmp)
    if cfg.dataset == "synthetic-retrieval":
        from datamodules.synthetic_retrieval import prepare_synthetic_retrieval

        return prepare_synthetic_retrieval(cfg, tmp)
    from datamodules.chunked import prepare_interactions_chunked

    return prepare_interactions_chunked(cfg, tmp)


def validate(cfg: PrepareConfig) -> None:
    """Reject bad flags before anything is read or written."""
    require(
        cfg.dataset in DATASETS,
        f"--dataset: unknown dataset {cfg.dataset!r} (choose from {', '.join(DATASETS)})",
    )
    require(
        0 <= cfg.val_frac < 1 and 0 <= cfg.test_frac < 1 and cfg.val_frac + cfg.test_frac < 1,
        "--val-frac/--test-frac: each must be in [0, 1) and together below 1",
    )
    require(cfg.rows is None or cfg.rows > 0, f"--rows: must be positive, got {cfg.rows}")
    require(cfg.block_rows > 0, f"--block-rows: must be positive, got {cfg.block_rows}")
    require(cfg.chunk_rows > 0, f"--chunk-rows: must be positive, got {cfg.chunk_rows}")
    require(cfg.synthetic.chunk_rows > 0, f"--synthetic.chunk_rows: must be positive, got {cfg.synthetic.chunk_rows}")
    if cfg.engine == "spark":
        require(
            cfg.dataset not in ("synthetic-ctr", "synthetic-retrieval"),
            f"--engine spark: {cfg.dataset} is generated locally in bounded memory; use --engine local",
        )


def read_source(cfg: PrepareConfig) -> RawTable:
    """Read (or generate) the canonical table of an interaction dataset, whole, in memory."""
    if cfg.dataset == "synthetic-retrieval":
        from datamodules.synthetic_retrieval import generate_retrieval

        return generate_retrieval(cfg)
    return READERS[cfg.dataset](cfg.source, cfg.rows, need_timestamp=cfg.needs_timestamp)


def prepare_interactions(raw: RawTable, cfg: PrepareConfig, tmp: Path) -> DatasetMetadata:
    """The local engine for interaction datasets (users x items), in memory with pandas (the chunked
    paths, ``datamodules.chunked`` and ``datamodules.synthetic_retrieval``, write what this writes)."""
    started = time.time()
    frame = label_frame(raw.frame, cfg.label_threshold)
    frame = frame.assign(key=row_keys(frame, cfg.seed))
    frame["split"] = assign_split(frame, cfg.split, cfg.val_frac, cfg.test_frac, cfg.seed)
    plan = make_plan(raw.features)
    fit_plan(plan, frame[frame["split"] == 0])
    splits: dict[str, SplitInfo] = {}
    for name, code in SPLIT_CODES.items():
        part = frame[frame["split"] == code].sort_values("key", kind="stable")
        enc = encode_frame(part, plan)
        splits[name] = write_split(enc, tmp / name, cfg.block_rows, len(plan.multi))
        (tmp / "pairs").mkdir(exist_ok=True)
        id_pairs(enc).to_parquet(tmp / "pairs" / f"{name}.parquet")
    train = frame[frame["split"] == 0]
    write_tables(train.drop_duplicates("user"), train.drop_duplicates("item"), plan, tmp)
    write_item_titles(raw, tmp)
    user_histories(train, plan).to_parquet(tmp / "histories.parquet")
    from_rating = "label" not in raw.frame.columns
    meta = build_metadata(cfg, plan, raw, splits, engine="local", label_from_rating=from_rating)
    finish_dataset(meta, plan.vocabs, tmp)
    _report(meta, time.time() - started)
    return meta


def _report(meta: DatasetMetadata, seconds: float) -> None:
    rows = ", ".join(f"{k} {v.rows:,}" for k, v in meta.splits.items())
    log.info("prepared %s: %s rows in %.1fs", meta.dataset, rows, seconds)


def split_digest_text(path: str, split: str) -> str:
    """``  digest D`` of a split (what MLflow shows of the dataset a run read); empty when its index is
    not there to read."""
    from datamodules.integrity import read_split_index, split_digest

    try:
        return f"  digest {split_digest(read_split_index(path, split))}"
    except RecsysError:
        return ""


def summarize(meta: DatasetMetadata, out: str) -> str:
    """A human summary of a prepared dataset (printed by the CLI)."""
    lines = [f"dataset      {meta.dataset} ({meta.task}) -> {out}"]
    lines.append(f"split        {meta.split_rule}")
    for name, s in meta.splits.items():
        line = f"{name:<12} {s.rows:>12,} rows  {s.blocks:>8,} blocks  label rate {s.label_rate:.3f}"
        lines.append(line + split_digest_text(out, name))
    lines.append(f"label        {meta.label['definition']}")
    for f in meta.sparse_features:
        kind = "multi-hot" if f.multi_hot else "sparse"
        lines.append(f"  {kind:<10} {f.name:<20} tower={f.tower:<8} cardinality {f.cardinality:,}")
    for d in meta.dense_features:
        lines.append(f"  {'dense':<10} {d.name:<20} tower={d.tower:<8} mean {d.mean:.3g} std {d.std:.3g}")
    for k, v in meta.extra.items():
        if not isinstance(v, dict | list):
            lines.append(f"{k:<12} {v}")
    return "\n".join(lines)
