"""``--engine spark``: the same prepared dataset as the local engine, computed by PySpark.

Reading, the per-user split (``applyInPandas`` over user groups), vocabularies and statistics (Spark
aggregations over the train split) and shard writing (``streaming``'s ``dataframe_to_mds``, one writer
per partition, indexes merged) all run on the cluster; the row-level functions are the local engine's
own (``assign_split``, ``encode_frame``, ``pack_blocks``), so both engines give the same rows.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.errors import RecsysError
from core.spark import spark_session
from datamodules.blocks import mds_columns
from datamodules.config import PrepareConfig
from datamodules.encoding import (
    SPLIT_CODES,
    EncodingPlan,
    SplitWriter,
    assign_split,
    build_metadata,
    column_of,
    encode_frame,
    finish_dataset,
    id_pairs,
    make_plan,
    pack_blocks,
    row_keys,
    user_histories,
    write_item_titles,
    write_tables,
)
from datamodules.schema import SPLITS, SplitInfo
from datamodules.sources import (
    RawTable,
    canonical_interactions,
    check_id_types,
    interaction_columns,
    interactions_path,
    locate_sets2019,
    read_movielens_100k,
    sha256_of,
)

log = logging.getLogger(__name__)


def prepare_with_spark(cfg: PrepareConfig, tmp: Path) -> Any:
    """Prepare an interaction dataset with Spark into ``tmp``; returns the metadata."""
    from pyspark.sql import functions as F

    started = time.time()
    # streaming warns that a local `out` might be FUSE storage and that udf columns are unchecked.
    logging.getLogger("streaming.base.converters.dataframe_to_mds").setLevel(logging.ERROR)
    spark = spark_session(cfg.spark_master)
    spark.sparkContext.setLogLevel("ERROR")
    try:
        df, raw = read_with_spark(cfg, spark, tmp)
        from_rating = "label" not in df.columns
        if from_rating:
            df = df.withColumn("label", (F.col("rating") >= F.lit(cfg.label_threshold)).cast("float"))
        df = with_split(df, cfg).cache()
        train = df.filter(F.col("split") == 0)
        plan = make_plan(raw.features)
        fit_plan_spark(plan, train)
        counts = {
            r["split"]: (int(r["n"]), float(r["rate"] or 0.0))
            for r in df.groupBy("split").agg(F.count("*").alias("n"), F.avg("label").alias("rate")).collect()
        }
        splits = {}
        for name, code in SPLIT_CODES.items():
            rows, rate = counts.get(code, (0, 0.0))
            blocks = write_split_spark(df.filter(F.col("split") == code), plan, cfg, tmp / name) if rows else 0
            if not rows:
                write_empty_split(tmp / name, len(plan.multi))
            splits[name] = SplitInfo(rows=rows, blocks=blocks, label_rate=rate)
            write_pairs_spark(df.filter(F.col("split") == code), plan, tmp / "pairs" / f"{name}.parquet")
        user_rows = train.dropDuplicates(["user"]).drop("key", "split").toPandas()
        item_rows = train.dropDuplicates(["item"]).drop("key", "split").toPandas()
        write_tables(_lists(user_rows), _lists(item_rows), plan, tmp)
        write_item_titles(raw, tmp)
        write_histories_spark(train, plan, tmp / "histories")
        corpus = {
            "users": ["users.parquet"],
            "items": ["items.parquet"],
            "pairs": {
                s: sorted(str(p.relative_to(tmp)) for p in (tmp / "pairs" / f"{s}.parquet").glob("*.parquet"))
                for s in SPLITS
            },
            "histories": sorted(str(p.relative_to(tmp)) for p in (tmp / "histories").glob("*.parquet")),
        }
        meta = build_metadata(cfg, plan, raw, splits, engine="spark", label_from_rating=from_rating, corpus=corpus)
        shutil.rmtree(tmp / "_source", ignore_errors=True)
        finish_dataset(meta, plan.vocabs, tmp)
        log.info(
            "prepared %s with Spark (%s): %s rows in %.1fs",
            cfg.dataset,
            cfg.spark_master,
            ", ".join(f"{k} {v.rows:,}" for k, v in splits.items()),
            time.time() - started,
        )
        return meta
    finally:
        spark.stop()


def read_with_spark(cfg: PrepareConfig, spark: Any, tmp: Path) -> tuple[Any, RawTable]:
    """The canonical table as a Spark DataFrame (side features joined) and its description."""
    if cfg.dataset == "movielens-100k":
        # 100k rows: parsed by the local reader (three small pipe/tab files), then distributed.
        raw = read_movielens_100k(cfg.source, cfg.rows)
        frame = raw.frame.copy()
        frame["item_year"] = frame["item_year"].astype("float64")
        return spark.createDataFrame(frame), raw
    if cfg.dataset == "sets2019":
        path, files, name = locate_sets2019(cfg.source)
        csv = path if files.zip is None and path.is_file() else tmp / "_source" / "item_ratings.csv"
        if csv != path:
            csv.parent.mkdir(parents=True, exist_ok=True)
            csv.write_bytes(files.read(name))
        where = files.display(name)
    else:
        path = csv = interactions_path(cfg.source)
        where = str(path)
    df = read_table_spark(spark, csv, where)
    if cfg.rows is not None:
        df = df.limit(cfg.rows)
    return canonical_spark(df, where), RawTable(pd.DataFrame(), [], {"path": str(path), "sha256": sha256_of(path)})


def read_table_spark(spark: Any, path: Path, where: str) -> Any:
    """CSV (all strings) or Parquet into Spark, with the local reader's errors."""
    if path.stat().st_size == 0:
        raise RecsysError(f"{where}: file is empty")
    if path.suffix.lower() in (".parquet", ".pq"):
        df = spark.read.parquet(str(path))
    else:
        df = spark.read.option("header", True).option("inferSchema", False).option("mode", "FAILFAST").csv(str(path))
    if df.isEmpty():
        raise RecsysError(f"{where}: no data rows")
    return df


def canonical_spark(df: Any, where: str) -> Any:
    """Rename and type the columns like ``sources.canonical_interactions``, after checking every value
    by that very function (one set of rules for both engines)."""
    from pyspark.sql import functions as F

    user, item, label, rating, ts = interaction_columns(df.columns, where)
    types = {f.name: f.dataType.simpleString() for f in df.schema.fields}
    problem = first_problem(df, where, [c for c in (user, item, label, rating, ts) if c is not None])
    if problem is not None:
        raise RecsysError(problem)
    check_id_types(where, {c: types[c] for c in (user, item)})
    cols = [
        F.trim(F.col(user).cast("string")).alias("user"),
        F.trim(F.col(item).cast("string")).alias("item"),
    ]
    for src, dst in [(rating, "rating"), (label, "label"), (ts, "timestamp")]:
        if src is not None:
            as_double = F.trim(F.col(src).cast("string")).try_cast("double")
            cols.append(as_double.cast("long").alias(dst) if dst == "timestamp" else as_double.alias(dst))
    if ts is None:
        cols.append(F.lit(0).cast("long").alias("timestamp"))
    return df.select(*cols)


def first_problem(df: Any, where: str, columns: list[str]) -> str | None:
    """The first value the local engine would refuse (``canonical_interactions`` run over each Arrow
    batch of the columns as text), as its one-line message; None when every row passes. One pass."""
    from pyspark.sql import functions as F

    text = df.select(*[F.col(f"`{c}`").cast("string").alias(c) for c in columns])

    def check(batches: Any) -> Any:
        for pdf in batches:
            try:
                canonical_interactions(pdf, where, offset=None)
            except RecsysError as e:
                yield pd.DataFrame({"problem": [str(e)]})
                return

    rows = text.mapInPandas(check, schema="problem string").limit(1).collect()
    return str(rows[0]["problem"]) if rows else None


def with_split(df: Any, cfg: PrepareConfig) -> Any:
    """Add ``key`` and ``split`` with the local engine's functions, one user group at a time."""
    from pyspark.sql.types import ByteType, LongType, StructField, StructType

    seed, rule, val_frac, test_frac = cfg.seed, cfg.split, cfg.val_frac, cfg.test_frac
    schema = StructType([*df.schema.fields, StructField("key", LongType()), StructField("split", ByteType())])

    def add_split(pdf: pd.DataFrame) -> pd.DataFrame:
        keys = row_keys(pdf, seed)
        pdf = pdf.assign(key=keys)
        pdf["split"] = assign_split(pdf, rule, val_frac, test_frac)
        pdf["key"] = keys.view(np.int64)
        return pdf

    return df.groupBy("user").applyInPandas(add_split, schema=schema)


def fit_plan_spark(plan: EncodingPlan, train: Any) -> None:
    """Vocabularies (sorted distinct strings) and dense mean/std of the train split."""
    from pyspark.sql import functions as F

    for f in plan.sparse:
        col = F.col(column_of(f))
        values = train.select(F.explode(col) if f.kind == "multi" else col).distinct().dropna()
        plan.vocabs[f.name] = sorted({str(r[0]) for r in values.collect()})
    for f in plan.dense:
        c = F.col(column_of(f)).try_cast("double")
        c = F.when(F.isnan(c), None).otherwise(c)
        row = train.agg(F.avg(c).alias("m"), F.stddev_pop(c).alias("s"), F.count(c).alias("n")).first()
        mean = float(row["m"]) if row["m"] is not None else 0.0
        std = float(row["s"]) if row["n"] > 1 and row["s"] else 1.0
        plan.stats[f.name] = (mean, std)


def write_split_spark(part: Any, plan: EncodingPlan, cfg: PrepareConfig, out: Path) -> int:
    """Shuffle by key, encode each partition into blocks and write them with ``dataframe_to_mds``."""
    from streaming.base.converters import dataframe_to_mds

    block_rows = cfg.block_rows
    partitions = max(1, min(64, part.rdd.getNumPartitions()))
    ordered = part.repartitionByRange(partitions, "key").sortWithinPartitions("key")

    def to_blocks(pdf: pd.DataFrame) -> Any:
        return pack_blocks(encode_frame(_lists(pdf), plan), block_rows)

    dataframe_to_mds(
        ordered,
        merge_index=True,
        mds_kwargs={"out": str(out), "columns": mds_columns(len(plan.multi)), "compression": "zstd"},
        udf_iterable=to_blocks,
    )
    index = json.loads((out / "index.json").read_text())
    return int(sum(s["samples"] for s in index["shards"]))


def write_pairs_spark(part: Any, plan: EncodingPlan, out: Path) -> None:
    """(user_id, item_id, label) per row as Parquet, for retrieval evaluation."""
    from pyspark.sql.types import FloatType, LongType, StructField, StructType

    schema = StructType(
        [StructField("user_id", LongType()), StructField("item_id", LongType()), StructField("label", FloatType())]
    )

    def encode(frames: Any) -> Any:
        for pdf in frames:
            yield id_pairs(encode_frame(_lists(pdf), plan))

    part.mapInPandas(encode, schema=schema).write.parquet(str(out))


def write_histories_spark(train: Any, plan: EncodingPlan, out: Path) -> None:
    """The per-user train histories (``encoding.user_histories``, one user group at a time) as Parquet."""
    from pyspark.sql.types import ArrayType, LongType, StructField, StructType

    schema = StructType([StructField("user_id", LongType()), StructField("items", ArrayType(LongType()))])

    def histories(pdf: pd.DataFrame) -> pd.DataFrame:
        return user_histories(pdf, plan).assign(items=lambda t: t["items"].map(list))

    train.select("user", "item", "timestamp").groupBy("user").applyInPandas(histories, schema=schema).write.parquet(
        str(out)
    )


def write_empty_split(out: Path, num_multi: int) -> None:
    """An empty split still gets an (empty) MDS index so loaders can open it."""
    with SplitWriter(out, num_multi):
        pass


def _lists(pdf: pd.DataFrame) -> pd.DataFrame:
    """Arrow hands array columns to pandas as numpy arrays; the encoders accept any list-like."""
    for c in pdf.columns:
        if pdf[c].dtype == object and len(pdf) and isinstance(pdf[c].iloc[0], np.ndarray):
            pdf[c] = pdf[c].map(list)
    return pdf
