"""The local engine for ``--dataset interactions`` files of any size: read in chunks, spilled to disk.

Memory holds about ``--chunk-rows`` rows at a time (plus the vocabularies), whatever the size of the
file; the spill (``datamodules.buckets``) lives in the output's temporary directory and takes about
twice the file's size while the prepare runs. The output is the in-memory engine's
(``prepare.prepare_interactions`` on ``sources.read_interactions``' table): the same rows, in the same
order, in the same blocks, the same vocabularies and metadata; a test checks it.

1. Read (``pyarrow.csv.open_csv`` / ``ParquetFile.iter_batches``), check and label each chunk with the
   readers' own functions, give every row its hash key, and spill it to its user's bucket.
2. Per user bucket (all of a user's rows): the per-user split; train vocabularies; spill the rows to
   key-range buckets.
3. Per key-range bucket, in order: sort by key, encode, cut into blocks (a bucket's last partial block
   waits for the next bucket), append the (user_id, item_id) pairs.
4. Per user bucket again: the users' train histories; then the users and items tables.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.errors import RecsysError
from datamodules.buckets import Buckets, bucket_count, key_ranges, user_buckets
from datamodules.config import PrepareConfig
from datamodules.encoding import (
    SPLIT_CODES,
    ParquetParts,
    SplitOutputs,
    assign_split,
    build_metadata,
    encode_frame,
    finish_dataset,
    label_frame,
    make_plan,
    row_keys,
    user_histories,
    write_tables,
)
from datamodules.schema import DatasetMetadata
from datamodules.sources import (
    RawTable,
    arrow_as_text,
    canonical_interactions,
    check_id_types,
    interaction_columns,
    interactions_path,
    sha256_of,
)

log = logging.getLogger(__name__)

SPILLED = ["user", "item", "label", "timestamp", "key"]
CSV_BLOCK_BYTES = 4 << 20


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def raw_chunks(path: Path, chunk_rows: int, need_timestamp: bool = False) -> Iterator[pd.DataFrame]:
    """The file's rows, ``chunk_rows`` at a time, every column as text (the header checked first:
    ``need_timestamp``, a timestamp column is required)."""
    import pyarrow as pa

    where = str(path)
    if is_parquet(path):
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
            whole_file = parquet_id_types(parquet, where, need_timestamp)
            for batch in parquet.iter_batches(batch_size=chunk_rows):
                yield arrow_as_text(pa.Table.from_batches([batch]), where, check_types=not whole_file)
        except (pa.ArrowException, OSError) as e:
            raise RecsysError(f"{path}: cannot read Parquet ({str(e).splitlines()[0]})") from None
        return
    from pyarrow import csv

    with open(path, "rb") as f:
        head = f.read(1 << 20)
    if not head.strip() and path.stat().st_size <= len(head):
        raise RecsysError(f"{where}: file is empty")
    try:
        names = csv.open_csv(path, read_options=csv.ReadOptions(block_size=1 << 20)).schema.names
        interaction_columns(names, where, need_rating=False, need_timestamp=need_timestamp)
        reader = csv.open_csv(
            path,
            read_options=csv.ReadOptions(block_size=CSV_BLOCK_BYTES),
            convert_options=csv.ConvertOptions(column_types={n: pa.string() for n in names}),
        )
        pending: list[Any] = []
        rows = 0
        for batch in reader:
            pending.append(batch)
            rows += batch.num_rows
            if rows >= chunk_rows:
                table = pa.Table.from_batches(pending)
                full = rows - rows % chunk_rows
                for lo in range(0, full, chunk_rows):
                    yield table.slice(lo, chunk_rows).to_pandas()
                pending, rows = table.slice(full).to_batches(), rows - full
        if rows:
            yield pa.Table.from_batches(pending, schema=reader.schema).to_pandas()
    except pa.ArrowInvalid as e:
        raise RecsysError(f"{where}: cannot parse ({str(e).splitlines()[0]})") from None


def parquet_id_types(parquet: Any, where: str, need_timestamp: bool = False) -> bool:
    """The whole-file reader's id-type check from the file's footer, before any row is read: an id
    column of floating-point type without a null (per its row groups' statistics) is refused; one with
    a null is left to the canonical checks, which name the missing id. False where a row group lacks
    the statistics: then each chunk is checked as the whole file would be."""
    names = [str(n) for n in parquet.schema_arrow.names]
    user, item, *_ = interaction_columns(names, where, need_rating=False, need_timestamp=need_timestamp)
    meta = parquet.metadata
    leaves = [meta.schema.column(k).path for k in range(meta.num_columns)]  # nested columns have several
    types = {}
    for name in (user, item):
        j = leaves.index(name)
        nulls = 0
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(j).statistics
            if stats is None or not stats.has_null_count:
                return False
            nulls += stats.null_count
        if nulls == 0:
            types[name] = str(parquet.schema_arrow.field(name).type)
    check_id_types(where, types)
    return True


def interaction_chunks(
    path: Path, rows: int | None, chunk_rows: int, need_timestamp: bool = False
) -> Iterator[pd.DataFrame]:
    """Canonical interaction rows of the file (``sources.canonical_interactions``, errors naming the
    line), at most ``rows`` of them, ``chunk_rows`` at a time."""
    seen = 0
    lines = not is_parquet(path)  # Parquet has no lines: its errors name the value alone, as the whole-file reader's
    for raw in raw_chunks(path, chunk_rows, need_timestamp):
        if rows is not None:
            raw = raw.iloc[: rows - seen]
        if len(raw):
            offset = 2 + seen if lines else None
            yield canonical_interactions(raw, str(path), need_timestamp=need_timestamp, offset=offset)
        seen += len(raw)
        if rows is not None and seen >= rows:
            break
    if seen == 0:
        raise RecsysError(f"{path}: no data rows")


def estimated_rows(path: Path) -> int:
    """Rows of the file (Parquet: from its footer; CSV: from its size and its first lines)."""
    if is_parquet(path):
        import pyarrow.parquet as pq

        try:
            return int(pq.ParquetFile(path).metadata.num_rows)
        except Exception:  # a damaged file is reported by the reader, with its own message
            return 1
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    lines = max(1, head.count(b"\n"))
    return max(1, int(path.stat().st_size / (len(head) / lines)))


def prepare_interactions_chunked(cfg: PrepareConfig, tmp: Path) -> DatasetMetadata:
    """Prepare ``--dataset interactions`` into ``tmp`` in chunks (see the module docstring)."""
    started = time.time()
    path = interactions_path(cfg.source)
    spill = tmp / "_spill"
    expected = estimated_rows(path) if cfg.rows is None else min(cfg.rows, estimated_rows(path))
    by_user = Buckets(spill / "users", bucket_count(expected, cfg.chunk_rows))
    from_rating = True
    for frame in interaction_chunks(path, cfg.rows, cfg.chunk_rows, need_timestamp=cfg.needs_timestamp):
        from_rating = "label" not in frame.columns
        frame = label_frame(frame, cfg.label_threshold)
        frame["key"] = row_keys(frame, cfg.seed)
        by_user.write(user_buckets(frame["user"], by_user.count), frame[SPILLED])
    log.info("read %s rows into %d user buckets (%.1fs)", f"{by_user.rows:,}", by_user.count, time.time() - started)

    by_key = Buckets(spill / "keys", bucket_count(by_user.rows, cfg.chunk_rows))
    users: set[str] = set()
    items: set[str] = set()
    for b in range(by_user.count):
        part = with_split(by_user.read(b), cfg)
        train = part[part["split"] == 0]
        users.update(train["user"].unique().tolist())
        items.update(train["item"].unique().tolist())
        by_key.write(key_ranges(part["key"].to_numpy(), by_key.count), part.drop(columns="timestamp"))
    plan = make_plan([])
    plan.vocabs = {"user_id": sorted(users), "item_id": sorted(items)}
    del users, items
    log.info("split and vocabularies (%.1fs)", time.time() - started)

    with SplitOutputs(cfg.block_rows, 0) as outputs:
        for name in SPLIT_CODES:
            outputs.open(name, tmp / name)
        for r in range(by_key.count):
            part = by_key.read(r)
            part = part.iloc[np.argsort(part["key"].to_numpy(), kind="stable")] if len(part) else part
            for name, code in SPLIT_CODES.items():
                outputs.add(name, encode_frame(part[part["split"] == code], plan), tmp / "pairs" / f"{name}.parquet")
        splits = outputs.finish()
    by_key.remove()
    log.info("wrote the splits (%.1fs)", time.time() - started)

    with ParquetParts() as histories:
        for b in range(by_user.count):
            part = with_split(by_user.read(b), cfg)
            table = user_histories(part[part["split"] == 0], plan)
            if len(table):
                histories.write(tmp / "histories.parquet", table)
    by_user.remove()
    spill.rmdir()
    user_rows = pd.DataFrame({"user": list(plan.vocabs["user_id"]), "item": ""})
    item_rows = pd.DataFrame({"user": "", "item": list(plan.vocabs["item_id"])})
    write_tables(user_rows, item_rows, plan, tmp)
    raw = RawTable(pd.DataFrame(), [], {"path": str(path), "sha256": sha256_of(path)})
    meta = build_metadata(cfg, plan, raw, splits, engine="local", label_from_rating=from_rating)
    finish_dataset(meta, plan.vocabs, tmp)
    rows = ", ".join(f"{k} {v.rows:,}" for k, v in meta.splits.items())
    log.info("prepared %s: %s rows in %.1fs", cfg.dataset, rows, time.time() - started)
    return meta


def with_split(part: pd.DataFrame, cfg: PrepareConfig) -> pd.DataFrame:
    """A user bucket's rows with their split code (the bucket holds all of its users' rows)."""
    return part.assign(split=assign_split(part, cfg.split, cfg.val_frac, cfg.test_frac, cfg.seed))
