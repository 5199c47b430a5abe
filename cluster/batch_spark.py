"""``--backend spark`` for batch jobs: ``mapInPandas`` over a DataFrame of the partitions.

One row per partition (its number and its keys) in a Spark partition of its own; the Python worker
that runs a task builds the job's function on its first task and keeps it for the next ones (Spark
reuses its Python workers: ``spark.python.worker.reuse``, on by default), so each of the
``--num-workers`` task slots loads it once. The session is the project's loopback one
(``core.spark``) on ``--spark-master`` (default ``local[num_workers]``); results come back when the
job ends (the caller's progress bar follows the partitions' files meanwhile).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from cluster.batch import PartitionJob, PartitionResult, PartitionTask, Worker, result_of
from cluster.config import ClusterConfig
from cluster.launch import one_line
from core.errors import RecsysError
from core.spark import spark_session

RESULT_SCHEMA = (
    "partition long, keys long, rows long, error string, pid long, loads long, seconds double, cpu_seconds double, "
    "peak_rss long"
)
RESULT_COLUMNS = [part.split()[0] for part in RESULT_SCHEMA.split(", ")]


def partition_mapper(job: PartitionJob) -> Any:
    """The ``mapInPandas`` function: every row of every batch is one whole partition."""

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        worker = Worker(job)  # built once per Python worker process (cached by the job's key)
        for batch in batches:
            done = [
                worker.run(PartitionTask(int(p), [str(k) for k in keys]))
                for p, keys in zip(batch["partition"], batch["keys"], strict=True)
            ]
            yield pd.DataFrame([vars(d) for d in done], columns=RESULT_COLUMNS)

    return run


def map_partitions(job: PartitionJob, tasks: list[PartitionTask], cluster: ClusterConfig) -> Iterator[PartitionResult]:
    """Run ``job`` over ``tasks`` as Spark tasks on ``--num-workers`` slots; results when the job ends."""
    from pyspark.sql.types import ArrayType, LongType, StringType, StructField, StructType

    master = cluster.spark_master or f"local[{cluster.num_workers}]"
    spark = spark_session(master, "recsys-recommend-all-users", "--backend spark")
    try:
        spark.sparkContext.setLogLevel("ERROR")
        schema = StructType(
            [StructField("partition", LongType(), False), StructField("keys", ArrayType(StringType()), False)]
        )
        rows = [(t.partition, list(t.keys)) for t in tasks]
        frame = spark.createDataFrame(spark.sparkContext.parallelize(rows, len(rows)), schema)
        try:
            collected = frame.mapInPandas(partition_mapper(job), RESULT_SCHEMA).collect()
        except Exception as e:  # a Python worker that died, a lost executor: Spark's error, as one line
            raise RecsysError(f"--backend spark: the batch job failed ({spark_error(e)})") from None
        for row in collected:
            yield result_of(row.asDict())
    finally:
        spark.stop()


def spark_error(error: BaseException) -> str:
    """The Python error inside Spark's wrapper (its last ``Type: message`` line), else its first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if ": " in line and line.split(": ", 1)[0].replace(".", "").isidentifier() and "Error" in line:
            return line[:400]
    return one_line(error)
