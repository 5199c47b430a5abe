"""Rows spilled to disk in buckets: how the local engine prepares data larger than memory.

Two kinds of bucket, both files of Arrow IPC batches under the output's temporary directory:

- by **user** (a hash of the raw user id): every row of a user lands in one bucket, so a bucket at a
  time is enough for the per-user split and the per-user histories;
- by **key range** (the row's seeded hash key, ``encoding.row_keys``): bucket ``r`` holds keys below
  those of bucket ``r + 1``, so sorting each bucket by key and reading them in order gives every
  split in the global key order the in-memory engine writes (an external bucket sort, as Spark's
  ``repartitionByRange`` + ``sortWithinPartitions`` does).

Memory is one bucket (about ``--chunk-rows`` rows) at a time, whatever the size of the source.
Arrow IPC rather than Parquet: the files live for one prepare, are read once or twice, and need no
row groups, statistics or compression.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def bucket_count(rows: int, chunk_rows: int) -> int:
    """Buckets of about ``chunk_rows`` rows for ``rows`` rows (at least one)."""
    return max(1, math.ceil(rows / max(chunk_rows, 1)))


def key_ranges(keys: np.ndarray, buckets: int) -> np.ndarray:
    """The key-range bucket of each uint64 key: monotone in the key, about equal ranges."""
    if buckets == 1:
        return np.zeros(len(keys), dtype=np.int64)
    # the top 53 bits as an exact float in [0, 1): floor(x * buckets) never decreases with the key
    top = (np.asarray(keys, dtype=np.uint64) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.minimum((top * buckets).astype(np.int64), buckets - 1)


USER_HASH_KEY = "recsys-user-buck"
"""A fixed SipHash key (16 characters) for user buckets: which bucket a user lands in never matters
to the output, only that all of a user's rows land in the same one."""


def user_buckets(users: pd.Series, buckets: int) -> np.ndarray:
    """The user bucket of each row (a hash of its raw user id)."""
    if buckets == 1:
        return np.zeros(len(users), dtype=np.int64)
    h = pd.util.hash_array(users.to_numpy(dtype=object), hash_key=USER_HASH_KEY, categorize=False)
    return (h % np.uint64(buckets)).astype(np.int64)


class Buckets:
    """``count`` append-only files of rows with the same columns, under ``directory``.

    ``write`` appends each row of a frame to the bucket named for it (rows keep their order within
    a bucket); ``read`` returns one bucket whole. Writers stay open until ``close`` (or the first
    ``read``); ``remove`` deletes the files.
    """

    def __init__(self, directory: Path, count: int) -> None:
        self.directory = directory
        self.count = count
        self.rows = 0
        directory.mkdir(parents=True, exist_ok=True)
        self._writers: dict[int, Any] = {}
        self._schema: Any = None

    def _path(self, bucket: int) -> Path:
        return self.directory / f"{bucket:06d}.arrow"

    def write(self, bucket_of_row: np.ndarray, frame: pd.DataFrame) -> None:
        """Append ``frame``'s rows, row i to bucket ``bucket_of_row[i]``."""
        import pyarrow as pa

        if len(frame) == 0:
            return
        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self._schema is None:
            self._schema = table.schema
        table = table.cast(self._schema)
        order = np.argsort(bucket_of_row, kind="stable")
        sorted_buckets = bucket_of_row[order]
        present = np.flatnonzero(np.r_[True, sorted_buckets[1:] != sorted_buckets[:-1]])
        ends = np.r_[present[1:], len(order)]
        table = table.take(pa.array(order))
        for lo, hi in zip(present, ends, strict=True):
            self._writer(int(sorted_buckets[lo])).write_table(table.slice(lo, hi - lo).combine_chunks())
        self.rows += len(frame)

    def _writer(self, bucket: int) -> Any:
        import pyarrow as pa

        if bucket not in self._writers:
            sink = pa.OSFile(str(self._path(bucket)), "wb")
            self._writers[bucket] = (pa.ipc.new_stream(sink, self._schema), sink)
        return self._writers[bucket][0]

    def close(self) -> None:
        for writer, sink in self._writers.values():
            writer.close()
            sink.close()
        self._writers.clear()

    def read(self, bucket: int) -> pd.DataFrame:
        """Every row of one bucket, in the order written (an empty frame for an empty bucket)."""
        import pyarrow as pa

        self.close()
        path = self._path(bucket)
        if not path.exists():
            if self._schema is None:
                return pd.DataFrame()
            return self._schema.empty_table().to_pandas()
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all().to_pandas()

    def batches(self, bucket: int) -> Iterator[pd.DataFrame]:
        """The rows of one bucket a ``write`` at a time (for buckets larger than memory).

        Read, not memory-mapped: the pages of a mapped file that have been read stay in the process's
        resident set until the map is closed, so a mapped bucket of several hundred MB (the histories
        spill of a 100M-row synthetic-retrieval set) would count whole towards peak RSS."""
        import pyarrow as pa

        self.close()
        path = self._path(bucket)
        if not path.exists():
            return
        with pa.OSFile(str(path), "rb") as source:
            for batch in pa.ipc.open_stream(source):
                yield batch.to_pandas()

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)
