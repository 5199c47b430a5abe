"""The retrieval corpus of a prepared dataset: the train users and items with their encoded features
(``users.parquet``, ``items.parquet``), the (user_id, item_id, label) pairs of every split and each
user's train history (``histories.parquet``, see ``datamodules.histories``).

The files are part of the dataset's schema (``DatasetMetadata.corpus``) and are read from a local
directory or fetched from any remote StreamingDataset supports (``s3://``, ``gs://``, ...) alike.

Per-process memory stays bounded: no table of every row is ever a pandas frame. On first use the
files are converted, one Parquet record batch at a time, into a cache of their own
(``<cache>/corpus-<key>/``, the key a hash of the dataset's location, metadata and files): users and
items as Arrow IPC files, each split's pairs and the histories as CSR arrays by user id (``.npy``).
Every process then memory-maps them: the processes of one machine build them once (under a file lock)
and share one copy in the page cache, which the kernel pages in as it is read and may evict, instead
of each holding the tables in its own heap. The cache is kept for later runs on the same dataset and
may be deleted at any time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from core.errors import RecsysError, require
from datamodules.histories import UserHistories
from datamodules.schema import SPLITS, DatasetMetadata, corpus_files, history_files
from datamodules.storage import fetch_file, is_remote

CACHE_VERSION = 1
"""Bumped when the layout of the derived arrays changes (old caches are then ignored)."""
READ_ROWS = 1 << 20
"""Rows per record batch streamed from the Parquet files while building the arrays."""
DONE = "complete"


def default_cache() -> Path:
    """Where derived arrays go when the caller names no cache (the DataModule names its own)."""
    return Path(tempfile.gettempdir()) / "recsys-corpus"


# -- the memory-mapped pieces ----------------------------------------------------------------------


@dataclass
class FeatureRows:
    """Rows of ``users.parquet`` or ``items.parquet`` as a memory-mapped Arrow table: blocks of rows
    become model inputs (``tower_inputs``) on demand, the whole table never does."""

    table: pa.Table

    def __len__(self) -> int:
        return int(self.table.num_rows)

    def slice(self, lo: int, hi: int) -> pa.Table:
        """Rows ``lo`` to ``hi`` (exclusive)."""
        return self.table.slice(lo, max(0, min(hi, len(self)) - lo))

    def take(self, rows: np.ndarray) -> pa.Table:
        """The rows at positions ``rows``, in that order."""
        return self.table.take(pa.array(np.asarray(rows, dtype=np.int64)))

    def column(self, name: str) -> np.ndarray:
        """One column as a numpy array."""
        return np.asarray(self.table.column(name).to_numpy())

    def to_pandas(self) -> pd.DataFrame:
        """The whole table as a frame (small tables and tests only)."""
        return self.table.to_pandas()


@dataclass
class UserItems:
    """Items by user id, CSR: user ``u``'s items are ``items[indptr[u]:indptr[u + 1]]`` (in file order,
    duplicates kept); both arrays memory-mapped."""

    indptr: np.ndarray
    items: np.ndarray

    @property
    def num_users(self) -> int:
        return len(self.indptr) - 1

    def users(self) -> np.ndarray:
        """The user ids with at least one item, ascending."""
        return np.flatnonzero(np.diff(self.indptr))

    def gather(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(lengths, items)`` of ``users``: each user's items in turn, as int64."""
        users = np.asarray(users, dtype=np.int64)
        starts = np.asarray(self.indptr[users], dtype=np.int64)
        lengths = np.asarray(self.indptr[users + 1], dtype=np.int64) - starts
        total = int(lengths.sum())
        first = np.cumsum(lengths) - lengths
        index = np.repeat(starts - first, lengths) + np.arange(total, dtype=np.int64)
        return lengths, np.asarray(self.items[index], dtype=np.int64)

    @classmethod
    def from_pairs(cls, users: np.ndarray, items: np.ndarray, num_users: int) -> UserItems:
        """In memory, from parallel arrays of user and item ids (small sets, tests, benches)."""
        users = np.asarray(users, dtype=np.int64)
        order = np.argsort(users, kind="stable")
        indptr = np.zeros(num_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(users, minlength=num_users), out=indptr[1:])
        return cls(indptr, np.asarray(items, dtype=np.int64)[order])


@dataclass
class RetrievalCorpus:
    """What full-corpus evaluation and corpus negatives need, read from a prepared retrieval dataset."""

    items: FeatureRows
    users: FeatureRows
    user_rows: np.ndarray
    """The row of ``users`` of each user id (-1: none)."""
    train: UserItems
    """Every train pair (whatever its label): the items excluded from a user's ranking."""
    targets: dict[str, UserItems]
    """The positive (label 1) pairs of ``val`` and ``test``: the relevant items."""
    item_log_q: torch.Tensor
    """log of each item's share of train positives (index = item id), for the log-Q correction."""
    histories: UserHistories | None = None
    """Each user's train items (index = user id); None for datasets prepared without them."""

    @classmethod
    def load(cls, path: str | Path, meta: DatasetMetadata, cache: str | Path | None = None) -> RetrievalCorpus:
        """The corpus of the dataset at ``path``, its arrays built under ``cache`` on first use."""
        files = corpus_files(meta)
        root = str(path)
        where = cache_dir(root, meta, cache)
        n_users = cardinality(meta, meta.user_id_feature or "user_id")
        n_items = cardinality(meta, meta.item_id_feature or "item_id")

        def build_users(out: Path) -> None:
            rows = np.full(n_users, -1, dtype=np.int64)
            key = meta.user_id_feature or "user_id"
            seen = 0
            for batch in write_arrow(root, files["users"], out / "rows.arrow", out):
                ids = batch.column(key).to_numpy(zero_copy_only=False)
                check_ids(ids, n_users, f"{root}/{files['users'][0]}: {key}")
                rows[ids] = np.arange(seen, seen + len(ids))
                seen += len(ids)
            np.save(out / "user_rows.npy", rows)

        def build_items(out: Path) -> None:
            for _ in write_arrow(root, files["items"], out / "rows.arrow", out):
                pass

        def build_pairs(out: Path) -> None:
            positives = np.zeros(n_items, dtype=np.int64)
            write_csr(root, files["pairs"]["train"], n_users, n_items, out / "train", out, positives)
            np.save(out / "item_positives.npy", positives)
            for split in SPLITS:
                if split != "train":
                    write_csr(root, files["pairs"][split], n_users, n_items, out / split, out, positives_only=True)

        users_dir = build_once(where, "users", build_users)
        items_dir = build_once(where, "items", build_items)
        pairs_dir = build_once(where, "pairs", build_pairs)
        counts = load_array(pairs_dir / "item_positives.npy").astype(np.float64) + 1.0
        log_q = torch.tensor(np.log(counts / counts.sum()), dtype=torch.float32)
        histories = load_histories(path, meta, cache) if meta.history else None
        return cls(
            items=FeatureRows(map_arrow(items_dir / "rows.arrow")),
            users=FeatureRows(map_arrow(users_dir / "rows.arrow")),
            user_rows=load_array(users_dir / "user_rows.npy"),
            train=load_csr(pairs_dir / "train"),
            targets={s: load_csr(pairs_dir / s) for s in SPLITS if s != "train"},
            item_log_q=log_q,
            histories=histories,
        )


def load_histories(path: str | Path, meta: DatasetMetadata, cache: str | Path | None = None) -> UserHistories:
    """The users' train histories of the dataset at ``path`` alone (what a ranking model reading them
    needs), memory-mapped; a dataset prepared without them is one line."""
    files = history_files(meta)
    root = str(path)
    n_users = cardinality(meta, meta.user_id_feature or "user_id")
    n_items = cardinality(meta, meta.item_id_feature or "item_id")

    def build(out: Path) -> None:
        write_history_csr(root, files, n_users, n_items, out)

    done = build_once(cache_dir(root, meta, cache), "histories", build)
    return UserHistories(
        torch.from_numpy(load_array(done / "offsets.npy")), torch.from_numpy(load_array(done / "values.npy"))
    )


def cardinality(meta: DatasetMetadata, feature: str) -> int:
    return meta.feature(feature).cardinality


def read_parquet(root: str, relative: list[str], cache: str | Path | None) -> pd.DataFrame:
    """One whole table from its Parquet files (a file, or the part files a Spark writer left) under
    ``root`` (remote files fetched into ``cache``): for copying small tables, not for training."""
    import io

    frames = []
    for rel in relative:
        where = f"{root.rstrip('/')}/{rel}"
        try:
            if is_remote(root):
                if cache is None:
                    raise RecsysError(f"{where}: a remote dataset needs a cache directory to read its corpus")
                data: Any = io.BytesIO(Path(fetch_file(root, rel, Path(cache))).read_bytes())
            else:
                data = Path(root) / rel
            frames.append(pd.read_parquet(data))
        except (OSError, ValueError) as e:
            raise RecsysError(f"{where}: cannot read the corpus file ({str(e).splitlines()[0]})") from None
    if not frames:
        return pd.DataFrame({"user_id": [], "item_id": [], "label": []})
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


# -- the cache -------------------------------------------------------------------------------------


def cache_dir(root: str, meta: DatasetMetadata, cache: str | Path | None) -> Path:
    """``<cache>/corpus-<key>``: the key changes when the dataset at ``root`` is prepared again."""
    stats: list[Any] = []
    if not is_remote(root):
        files = corpus_files(meta)
        relative = [*files.get("users", []), *files.get("items", []), *files.get("histories", [])]
        relative += [f for split in files.get("pairs", {}).values() for f in split]
        for rel in relative:
            with contextlib.suppress(OSError):
                st = (Path(root) / rel).stat()
                stats.append([rel, st.st_size, st.st_mtime_ns])
        root = str(Path(root).resolve())
    blob = json.dumps([CACHE_VERSION, root, meta.to_dict(), stats], sort_keys=True, default=str)
    key = hashlib.sha256(blob.encode()).hexdigest()[:20]
    return Path(cache or default_cache()) / f"corpus-{key}"


def build_once(where: Path, name: str, build: Callable[[Path], None]) -> Path:
    """``where/name``, built by ``build(tmp_dir)`` unless already there. Processes of one machine take
    turns under a file lock, so one builds and the others map its result; the directory appears
    complete or not at all (built aside, then renamed)."""
    final = where / name
    if (final / DONE).exists():
        return final
    where.mkdir(parents=True, exist_ok=True)
    with open(where / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (final / DONE).exists():
                return final
            for stale in where.glob(f".{name}-*"):  # left by a build that was killed
                shutil.rmtree(stale, ignore_errors=True)
            work = where / f".{name}-{uuid.uuid4().hex[:8]}"
            work.mkdir()
            try:
                build(work)
                (work / DONE).touch()
                shutil.rmtree(work / "fetched", ignore_errors=True)
                try:
                    work.rename(final)
                except OSError:  # another machine sharing this cache built it first: same content
                    if not (final / DONE).exists():
                        raise
            finally:
                shutil.rmtree(work, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


def load_array(path: Path) -> np.ndarray:
    """A ``.npy`` array memory-mapped copy-on-write (pages read on demand, writes stay private)."""
    return np.load(path, mmap_mode="c")


def map_arrow(path: Path) -> pa.Table:
    """An Arrow IPC file as a table whose buffers are the memory-mapped file."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def load_csr(prefix: Path) -> UserItems:
    return UserItems(load_array(prefix.with_suffix(".indptr.npy")), load_array(prefix.with_suffix(".items.npy")))


def checked_array(path: Path, kind: str, shown: str) -> np.ndarray:
    """A 1-d ``.npy`` array of ``kind`` (numpy kind codes: ``"iu"`` integers, ``"b"`` flags) memory-mapped,
    or one line naming the file: no pickled objects, another shape or kind of values."""
    try:
        array = np.load(path, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise RecsysError(f"{shown}: unreadable ({str(e).splitlines()[0]})") from None
    require(array.ndim == 1 and array.dtype.kind in kind, f"{shown}: not a flat array of {kind!r} values")
    return array


def checked_csr(offsets: Path, values: Path, n_users: int, n_items: int, shown: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a CSR by user id (``write_csr``, ``write_history_csr``) memory-mapped, after
    checking that they are one: ``n_users + 1`` non-decreasing offsets from 0 to the number of values,
    every value an item id below ``n_items``. One line naming ``shown`` otherwise (a truncated or crafted
    file is refused here rather than indexing out of bounds later)."""
    indptr = checked_array(offsets, "iu", f"{shown}/{offsets.name}")
    items = checked_array(values, "iu", f"{shown}/{values.name}")
    require(
        len(indptr) == n_users + 1 and int(indptr[0]) == 0 and int(indptr[-1]) == len(items),
        f"{shown}/{offsets.name}: {len(indptr)} offsets ending at {int(indptr[-1]) if len(indptr) else None} "
        f"do not index {len(items)} values of {n_users} users",
    )
    require(bool(np.all(np.diff(indptr) >= 0)), f"{shown}/{offsets.name}: offsets decrease")
    require(
        len(items) == 0 or (int(items.min()) >= 0 and int(items.max()) < n_items),
        f"{shown}/{values.name}: item ids outside 0..{n_items - 1}",
    )
    return indptr, items


# -- building, one record batch at a time ----------------------------------------------------------


def local_files(root: str, relative: list[str], work: Path) -> list[tuple[str, Path]]:
    """(shown name, local path) of each file; remote ones are fetched into ``work/fetched``."""
    return [(f"{root.rstrip('/')}/{rel}", fetch_file(root, rel, work / "fetched")) for rel in relative]


def record_batches(root: str, relative: list[str], work: Path, columns: list[str] | None = None) -> Iterator[Any]:
    """The record batches of a table's Parquet files in turn; an unreadable file is one line."""
    for shown, local in local_files(root, relative, work):
        try:
            reader = pq.ParquetFile(local)
            yield from reader.iter_batches(batch_size=READ_ROWS, columns=columns)
        except (OSError, ValueError, KeyError, pa.ArrowException) as e:
            raise RecsysError(f"{shown}: cannot read the corpus file ({str(e).splitlines()[0]})") from None


def check_ids(ids: np.ndarray, bound: int, what: str) -> None:
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= bound):
        raise RecsysError(f"{what}: ids outside 0..{bound - 1} (the metadata's cardinality); prepare it again")


def write_arrow(root: str, relative: list[str], out: Path, work: Path) -> Iterator[Any]:
    """Copy a table's Parquet files into one Arrow IPC file, yielding each record batch as written."""
    writer: Any = None
    schema: Any = None
    try:
        for batch in record_batches(root, relative, work):
            if writer is None:
                schema = batch.schema
                writer = pa.ipc.new_file(str(out), schema)
            elif batch.schema != schema:
                batch = pa.Table.from_batches([batch]).cast(schema).combine_chunks().to_batches()[0]
            writer.write_batch(batch)
            yield batch
        if writer is None:  # no rows: an empty table with the files' schema (or none)
            schema = pq.read_schema(local_files(root, relative, work)[0][1]) if relative else pa.schema([])
            writer = pa.ipc.new_file(str(out), schema)
    finally:
        if writer is not None:
            writer.close()


def id_dtype(bound: int) -> type:
    return np.int32 if bound < 2**31 else np.int64


def write_csr(
    root: str,
    relative: list[str],
    n_users: int,
    n_items: int,
    prefix: Path,
    work: Path,
    item_positives: np.ndarray | None = None,
    positives_only: bool = False,
    flags: bool = False,
) -> None:
    """CSR of a split's pairs by user (every pair, or its positives only), in two passes over the
    files: count per user, then place each pair; memory is O(users + one record batch), the item
    array being written into a memory-mapped file. ``item_positives`` receives each item's count of
    positive pairs; ``flags`` also writes ``.positive.npy``, each placed pair's label > 0.5."""
    shown = f"{root.rstrip('/')}/{relative[0]}" if relative else root
    counts = np.zeros(n_users, dtype=np.int64)
    for batch in record_batches(root, relative, work, ["user_id", "item_id", "label"]):
        users, items, positive = pair_columns(batch)
        check_ids(users, n_users, f"{shown}: user_id")
        check_ids(items, n_items, f"{shown}: item_id")
        if item_positives is not None:
            item_positives += np.bincount(items[positive], minlength=n_items)
        counts += np.bincount(users[positive] if positives_only else users, minlength=n_users)
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    np.save(prefix.with_suffix(".indptr.npy"), indptr)
    values = np.lib.format.open_memmap(
        prefix.with_suffix(".items.npy"), mode="w+", dtype=id_dtype(n_items), shape=(int(indptr[-1]),)
    )
    labels = (
        np.lib.format.open_memmap(prefix.with_suffix(".positive.npy"), mode="w+", dtype=np.bool_, shape=values.shape)
        if flags
        else None
    )
    cursor = indptr[:-1].copy()
    for batch in record_batches(root, relative, work, ["user_id", "item_id", "label"]):
        users, items, positive = pair_columns(batch)
        if positives_only:
            users, items, positive = users[positive], items[positive], positive[positive]
        place(values, cursor, users, items, (labels, positive) if labels is not None else None)
    values.flush()
    if labels is not None:
        labels.flush()
    del values, labels


def pair_columns(batch: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    users = batch.column("user_id").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    items = batch.column("item_id").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    positive = batch.column("label").to_numpy(zero_copy_only=False) > 0.5
    return users, items, positive


def place(
    values: np.ndarray,
    cursor: np.ndarray,
    users: np.ndarray,
    items: np.ndarray,
    also: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """Write ``items`` at each one's user's cursor (in their order within the batch), advancing the
    cursors; ``also`` = (target, source): ``source`` (one value a pair) placed alike into ``target``."""
    if not len(users):
        return
    order = np.argsort(users, kind="stable")
    users, items = users[order], items[order]
    starts = np.r_[0, np.flatnonzero(users[1:] != users[:-1]) + 1]
    runs = np.diff(np.r_[starts, len(users)])
    within = np.arange(len(users)) - np.repeat(starts, runs)
    where = cursor[users] + within
    values[where] = items
    if also is not None:
        also[0][where] = also[1][order]
    cursor[users[starts]] += runs


def write_history_csr(root: str, relative: list[str], n_users: int, n_items: int, out: Path) -> None:
    """``offsets.npy`` / ``values.npy`` of ``UserHistories`` from ``histories.parquet`` rows (one per
    user, ``items`` oldest first), in two passes with memory O(users + one record batch)."""
    shown = f"{root.rstrip('/')}/{relative[0]}" if relative else root
    lengths = np.zeros(n_users, dtype=np.int64)
    for batch in record_batches(root, relative, out, ["user_id", "items"]):
        users = batch.column("user_id").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        check_ids(users, n_users, f"{shown}: user_id")
        lengths[users] = pc.list_value_length(batch.column("items")).fill_null(0).to_numpy(zero_copy_only=False)
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    np.save(out / "offsets.npy", offsets)
    values = np.lib.format.open_memmap(
        out / "values.npy", mode="w+", dtype=id_dtype(n_items), shape=(int(offsets[-1]),)
    )
    for batch in record_batches(root, relative, out, ["user_id", "items"]):
        users = batch.column("user_id").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        bags = batch.column("items")
        lens = pc.list_value_length(bags).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = np.asarray(pc.list_flatten(bags).to_numpy(zero_copy_only=False), dtype=np.int64)
        check_ids(flat, n_items, f"{shown}: items")
        first = np.cumsum(lens) - lens
        values[np.repeat(offsets[users] - first, lens) + np.arange(len(flat))] = flat
    values.flush()
    del values


# -- model inputs ----------------------------------------------------------------------------------


def tower_inputs(table: pd.DataFrame | pa.Table, meta: DatasetMetadata) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    """Dense matrix and KJT (all dataset keys) for rows of users.parquet / items.parquet (a frame, or
    an Arrow table such as ``FeatureRows.slice``).

    Features the table lacks (the other tower's) get empty bags and zero dense values.
    """
    arrow = isinstance(table, pa.Table)
    n = int(table.num_rows) if arrow else len(table)
    names = set(table.column_names if arrow else table.columns)
    dense = torch.zeros(n, len(meta.dense_features))
    for j, d in enumerate(meta.dense_features):
        if d.name in names:
            column = table.column(d.name).to_numpy() if arrow else table[d.name].to_numpy()
            dense[:, j] = torch.as_tensor(np.array(column, dtype=np.float32))  # a copy: Arrow's may be read-only
    values, lengths = [], []
    for f in meta.sparse_features:
        if f.name not in names:
            lengths.append(torch.zeros(n, dtype=torch.int32))
        elif f.multi_hot and arrow:
            bags = table.column(f.name)
            lengths.append(torch.as_tensor(pc.list_value_length(bags).fill_null(0).to_numpy().astype(np.int32)))
            values.append(torch.as_tensor(np.array(pc.list_flatten(bags).to_numpy(), dtype=np.int64)))
        elif f.multi_hot:
            lists = table[f.name].to_list()
            lengths.append(torch.tensor([len(x) for x in lists], dtype=torch.int32))
            values.append(
                torch.as_tensor(
                    np.concatenate([np.asarray(x, np.int64) for x in lists]) if n else np.zeros(0, np.int64)
                )
            )
        else:
            lengths.append(torch.ones(n, dtype=torch.int32))
            column = table.column(f.name).to_numpy() if arrow else table[f.name].to_numpy()
            values.append(torch.as_tensor(np.array(column, dtype=np.int64)))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in meta.sparse_features],
        values=torch.cat(values) if values else torch.zeros(0, dtype=torch.int64),
        lengths=torch.cat(lengths),
    )
    return dense, kjt
