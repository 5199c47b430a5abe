"""``--engine spark``: the same prepared dataset as the local engine, computed by PySpark.

Reading and checking (``sources.canonical_interactions`` over every batch), the per-user split
(``mapInPandas`` over hash partitions of whole users), vocabularies and statistics (Spark aggregations
over the train split) and shard writing (one range-partitioned pass, one writer per partition, indexes
merged) all run on the cluster, with a line per stage on stderr; the row-level functions are the local
engine's own (``assign_split``, ``encode_frame``, ``BlockPacker``), so both engines give the same rows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.errors import RecsysError
from core.output import WRITE_ERRORS
from core.spark import spark_session
from datamodules.config import PrepareConfig
from datamodules.encoding import (
    SPLIT_CODES,
    EncodingPlan,
    SplitOutputs,
    SplitWriter,
    assign_split,
    build_metadata,
    column_of,
    encode_frame,
    finish_dataset,
    make_plan,
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


class Stages:
    """One line per stage on stderr (``spark: STAGE: WHAT (N.Ns, CPU N.Ns, total N.Ns)``): Spark's UI
    and progress bar are off, and a prepare of millions of rows must not look hung. CPU counts this
    process and its children (Spark's JVM and its Python workers)."""

    def __init__(self) -> None:
        self.started = self.last = time.time()
        self.cpu = self._cpu()

    @staticmethod
    def _cpu() -> float:
        import psutil

        me = psutil.Process()
        total = 0.0
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass  # a Python worker that just ended
        return total

    def done(self, stage: str, what: str = "") -> None:
        now, cpu = time.time(), self._cpu()
        what = f": {what}" if what else ""
        log.info(
            "spark: %s%s (%.1fs, CPU %.1fs, total %.1fs)",
            stage,
            what,
            now - self.last,
            cpu - self.cpu,
            now - self.started,
        )
        self.last, self.cpu = now, cpu


def prepare_with_spark(cfg: PrepareConfig, tmp: Path) -> Any:
    """Prepare an interaction dataset with Spark into ``tmp``; returns the metadata."""
    from pyspark.sql import functions as F

    stages = Stages()
    # streaming warns that a local `out` might be FUSE storage and that udf columns are unchecked.
    logging.getLogger("streaming.base.converters.dataframe_to_mds").setLevel(logging.ERROR)
    spark = spark_session(cfg.spark_master)
    spark.sparkContext.setLogLevel("ERROR")
    # pandas calls over 100k rows rather than 10k: a tenth of the Python round trips, blocks and row groups
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "100000")
    try:
        df, raw = read_with_spark(cfg, spark, tmp)
        # the first line only once the source passed its checks: bad input is one line, the error
        slots = spark.sparkContext.defaultParallelism
        stages.done(
            "read and checked", f"{raw.source.get('path', cfg.dataset)} on {cfg.spark_master} ({slots} task slots)"
        )
        from_rating = "label" not in df.columns
        if from_rating:
            df = df.withColumn("label", (F.col("rating") >= F.lit(cfg.label_threshold)).cast("float"))
        groups = user_groups(spark, raw)
        df = with_split(df, cfg, groups).cache()
        counts = {
            r["split"]: (int(r["n"]), float(r["rate"] or 0.0))
            for r in df.groupBy("split").agg(F.count("*").alias("n"), F.avg("label").alias("rate")).collect()
        }
        sizes = ", ".join(f"{name} {counts.get(code, (0, 0.0))[0]:,}" for name, code in SPLIT_CODES.items())
        stages.done("split per user", f"{groups} groups of users; {sizes} rows")
        train = df.filter(F.col("split") == 0)
        plan = make_plan(raw.features)
        fit_plan_spark(plan, train)
        stages.done("vocabularies", ", ".join(f"{k} {len(v):,}" for k, v in plan.vocabs.items()))
        with writing_output(spark):
            written = write_splits_spark(df, plan, cfg, tmp, groups)
        splits = {}
        for name, code in SPLIT_CODES.items():
            rows, rate = counts.get(code, (0, 0.0))
            splits[name] = SplitInfo(rows=rows, blocks=written[name]["blocks"], label_rate=rate)
        stages.done("wrote the splits", ", ".join(f"{k} {v.blocks:,} blocks" for k, v in splits.items()))
        if raw.features:
            user_rows = _lists(train.dropDuplicates(["user"]).drop("key", "split").toPandas())
            item_rows = _lists(train.dropDuplicates(["item"]).drop("key", "split").toPandas())
        else:  # ids alone: the tables are the vocabularies
            user_rows = pd.DataFrame({"user": list(plan.vocabs["user_id"]), "item": ""})
            item_rows = pd.DataFrame({"user": "", "item": list(plan.vocabs["item_id"])})
        write_tables(user_rows, item_rows, plan, tmp)
        write_item_titles(raw, tmp)
        with writing_output(spark):
            write_histories_spark(train, plan, tmp / "histories")
        stages.done("users, items and histories")
        corpus = {
            "users": ["users.parquet"],
            "items": ["items.parquet"],
            "pairs": {s: written[s]["pairs"] for s in SPLITS},
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
            time.time() - stages.started,
        )
        return meta
    finally:
        spark.stop()


@contextlib.contextmanager
def writing_output(spark: Any) -> Iterator[None]:
    """Around a Spark job that writes the output: an executor's write error that no check beforehand
    can prevent (no space, a quota, a filesystem gone read-only: ``core.output.WRITE_ERRORS``) reaches
    the driver as Spark's own exception, holding a Python worker's traceback or a JVM stack trace; it
    is raised again as that ``OSError``, which ``atomic_output`` reports in one line. The JVM's own
    log stays quiet meanwhile (it would print each failed task's stack trace on stderr; any other
    failure still reaches the driver with its stack trace)."""
    spark.sparkContext.setLogLevel("OFF")
    try:
        yield
    except Exception as e:  # the session is stopped next, its log left off (killed tasks log as they end)
        cause = None if isinstance(e, OSError | RecsysError) else write_error_in(str(e))
        if cause is None:
            raise
        raise cause from None
    spark.sparkContext.setLogLevel("ERROR")


def write_error_in(text: str) -> OSError | None:
    """The write error (``core.output.WRITE_ERRORS``) a failed Spark job's message reports, by the
    system's own words: a Python worker's ``[Errno 28]``, the JVM's ``IOException: No space left on
    device``; None when it reports none."""
    for code in sorted(WRITE_ERRORS):
        words = os.strerror(code)
        if f"rrno {code}]" in text or f"IOException: {words}" in text:
            return OSError(code, words)
    return None


GROUP_BYTES = 64 << 20
"""Source bytes per group of users handed to one pandas call (the split, the histories)."""


def user_groups(spark: Any, raw: RawTable) -> int:
    """How many groups of users the per-user steps run over: enough to keep every task slot busy,
    and more for a large source so that one group stays small in a Python worker's memory."""
    size = Path(raw.source["path"]).stat().st_size if "path" in raw.source else 0
    return max(2 * spark.sparkContext.defaultParallelism, -(-size // GROUP_BYTES))


def read_with_spark(cfg: PrepareConfig, spark: Any, tmp: Path) -> tuple[Any, RawTable]:
    """The canonical table as a Spark DataFrame (side features joined) and its description."""
    if cfg.dataset == "movielens-100k":
        # 100k rows: parsed by the local reader (three small pipe/tab files), then distributed.
        raw = read_movielens_100k(cfg.source, cfg.rows, need_timestamp=cfg.needs_timestamp)
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
    raw = RawTable(pd.DataFrame(), [], {"path": str(path), "sha256": sha256_of(path)})
    return canonical_spark(df, where, cfg.needs_timestamp), raw


def read_table_spark(spark: Any, path: Path, where: str) -> Any:
    """CSV (all strings) or Parquet into Spark, with the local reader's errors."""
    if path.stat().st_size == 0:
        raise RecsysError(f"{where}: file is empty")
    # at least 4 input splits per task slot (Spark's default, 128 MB a split, parses a 130 MB file in
    # one task); at most Spark's default size
    split_bytes = min(128 << 20, max(4 << 20, -(-path.stat().st_size // (4 * spark.sparkContext.defaultParallelism))))
    spark.conf.set("spark.sql.files.maxPartitionBytes", str(split_bytes))
    if path.suffix.lower() in (".parquet", ".pq"):
        df = spark.read.parquet(str(path))
    else:
        df = spark.read.option("header", True).option("inferSchema", False).option("mode", "FAILFAST").csv(str(path))
    df = df.cache()  # checked, then split: parsed once
    if df.isEmpty():
        raise RecsysError(f"{where}: no data rows")
    return df


def canonical_spark(df: Any, where: str, need_timestamp: bool = False) -> Any:
    """Rename and type the columns like ``sources.canonical_interactions``, after checking every value
    by that very function (one set of rules for both engines)."""
    from pyspark.sql import functions as F

    user, item, label, rating, ts = interaction_columns(df.columns, where, need_timestamp=need_timestamp)
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


def with_split(df: Any, cfg: PrepareConfig, groups: int) -> Any:
    """Add ``key`` and ``split`` with the local engine's functions, over partitions of whole users.

    The rows are hash-partitioned by user into ``groups`` partitions and each partition is one pandas
    call: ``assign_split`` splits many users at once, where a call per user (``groupBy("user")``)
    costs a Python round trip per user, and ``groupBy(...).applyInPandas`` would sort every row by
    its group first. The result keeps that partitioning (``write_histories_spark`` relies on it).
    """
    from pyspark.sql.types import ByteType, LongType, StructField, StructType

    seed, rule, val_frac, test_frac = cfg.seed, cfg.split, cfg.val_frac, cfg.test_frac
    kept = [f for f in df.schema.fields if f.name != "rating"]  # in the key and the label, no longer needed
    schema = StructType([*kept, StructField("key", LongType()), StructField("split", ByteType())])

    def add_split(batches: Any) -> Any:
        pdf = whole(batches)
        if pdf is None:
            return
        keys = row_keys(pdf, seed)
        pdf = pdf.assign(key=keys)
        pdf["split"] = assign_split(pdf, rule, val_frac, test_frac, seed)
        pdf["key"] = keys.view(np.int64)
        yield pdf[[f.name for f in schema.fields]]

    return df.repartition(groups, "user").mapInPandas(add_split, schema=schema)


def whole(batches: Any) -> pd.DataFrame | None:
    """All the Arrow batches of one partition as one frame (None for an empty partition)."""
    frames = list(batches)
    return pd.concat(frames, ignore_index=True) if frames else None


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


MIN_LONG = -(1 << 63)


def write_splits_spark(df: Any, plan: EncodingPlan, cfg: PrepareConfig, tmp: Path, partitions: int) -> dict[str, Any]:
    """Every split's shards and (user_id, item_id, label) pairs in one pass over the rows.

    The rows are range-partitioned by (split, key) and sorted, so each split comes in the local engine's
    key order (the key compared as unsigned, as numpy sorts it), and each partition is encoded once and
    written by one task: MDS shards in ``SPLIT/PARTITION/`` (blocks cut across the partition's Arrow
    batches) and its pairs in ``pairs/SPLIT.parquet/``; the driver merges each split's shard indexes
    (``merge_mds_indexes``). Not streaming's ``dataframe_to_mds``: it writes one DataFrame
    (split) per call, spends a job checking that it is not empty, and cuts a partial block at the end of
    every Arrow batch. Returns, per split, its blocks and pairs files (of the successful task attempts).
    """
    from pyspark import TaskContext
    from pyspark.sql import functions as F

    block_rows, num_multi, root = cfg.block_rows, len(plan.multi), str(tmp)
    names = {code: name for name, code in SPLIT_CODES.items()}
    order = F.col("key").bitwiseXOR(F.lit(MIN_LONG))
    needed = {"label", "key", "split", *(column_of(f) for f in plan.sparse), *(column_of(f) for f in plan.dense)}
    rows = df.select(*[c for c in df.columns if c in needed])  # no more than the encoder reads, shuffled
    ordered = rows.repartitionByRange(partitions, "split", order).sortWithinPartitions("split", order)

    def write(batches: Any) -> Any:
        context = TaskContext.get()
        part = f"{context.partitionId():05d}-{context.attemptNumber()}" if context else "00000-0"
        with SplitOutputs(block_rows, num_multi) as outputs:
            for pdf in batches:
                for code, rows in pdf.groupby("split", sort=True):
                    name = names[int(code)]
                    if name not in outputs.writers:
                        outputs.open(name, Path(root) / name / part)
                    pairs = Path(root) / "pairs" / f"{name}.parquet" / f"part-{part}.parquet"
                    outputs.add(name, encode_frame(_lists(rows), plan), pairs)
            outputs.finish()
        yield pd.DataFrame(
            {
                "split": list(outputs.writers),
                "part": part,
                "blocks": [w.blocks for w in outputs.writers.values()],
                "pairs": [f"pairs/{name}.parquet/part-{part}.parquet" for name in outputs.writers],
            }
        )

    written = ordered.mapInPandas(write, schema="split string, part string, blocks long, pairs string").collect()
    out: dict[str, Any] = {}
    for name in SPLIT_CODES:
        parts = sorted((r["part"], r["blocks"], r["pairs"]) for r in written if r["split"] == name)
        if parts:
            merge_mds_indexes(tmp / name, [p for p, _, _ in parts])
        else:
            write_empty_split(tmp / name, num_multi)
        out[name] = {"blocks": sum(b for _, b, _ in parts), "pairs": [f for _, _, f in parts]}
    return out


def merge_mds_indexes(split: Path, parts: list[str]) -> None:
    """``split/index.json`` listing the shards of every ``split/PART/index.json``, in ``parts`` order.

    What ``streaming.base.util.merge_index`` does for local directories; not called because importing
    ``streaming`` costs the driver about 10 s of CPU (it imports transformers and torch) for a JSON
    concatenation."""
    shards = []
    for part in parts:
        for shard in json.loads((split / part / "index.json").read_text())["shards"]:
            for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if shard.get(key):
                    shard[key]["basename"] = f"{part}/{shard[key]['basename']}"
            shards.append(shard)
    (split / "index.json").write_text(json.dumps({"version": 2, "shards": shards}))


def write_histories_spark(train: Any, plan: EncodingPlan, out: Path) -> None:
    """The per-user train histories (``encoding.user_histories``, one partition of whole users at a
    time) as Parquet. ``train`` is ``with_split``'s output filtered: its partitions still hold whole
    users, so no second shuffle is needed (Spark cannot know it: the rows came out of Python)."""
    from pyspark.sql.types import ArrayType, LongType, StructField, StructType

    schema = StructType([StructField("user_id", LongType()), StructField("items", ArrayType(LongType()))])

    def histories(batches: Any) -> Any:
        pdf = whole(batches)
        if pdf is not None:
            yield user_histories(pdf, plan)  # Arrow takes the numpy arrays as they are

    train.select("user", "item", "timestamp").mapInPandas(histories, schema=schema).write.parquet(str(out))


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
