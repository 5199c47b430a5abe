"""Encoding and writing, shared by every preparation path (local, Spark, synthetic-ctr).

The row-level steps (keys, split assignment, encoding, packing into blocks) are plain functions over
pandas frames, so the Spark engine runs the very same code inside ``applyInPandas``/``mapInPandas``
and both engines produce the same dataset from the same input. Shards go through ``SplitWriter``,
vocabularies and metadata through ``finish_dataset``; the output directory is ``datamodules.output``'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from datamodules.blocks import encode_block, mds_columns
from datamodules.config import PrepareConfig
from datamodules.schema import (
    SPLITS,
    DatasetMetadata,
    DenseFeature,
    SparseFeature,
    SplitInfo,
    default_corpus,
    history_description,
    write_metadata,
)
from datamodules.sources import FeatureSpec, RawTable

SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
ID_FEATURES = [FeatureSpec("user_id", "sparse", "user"), FeatureSpec("item_id", "sparse", "item")]
ID_COLUMNS = {"user_id": "user", "item_id": "item"}
VOCAB_DIR = "vocab"


# -- row-level steps shared with the Spark engine -----------------------------------------------------


def hash_key(seed: int) -> str:
    """The 16-character key of pandas' SipHash, derived from the seed."""
    return hashlib.sha256(str(seed).encode()).hexdigest()[:16]


def row_keys(frame: pd.DataFrame, seed: int) -> np.ndarray:
    """A deterministic pseudo-random uint64 per row from its content (same in every engine)."""
    cols = [c for c in ("user", "item", "timestamp", "rating", "label") if c in frame.columns]
    return pd.util.hash_pandas_object(frame[cols], index=False, hash_key=hash_key(seed)).to_numpy(np.uint64)


def pair_keys(frame: pd.DataFrame, seed: int) -> np.ndarray:
    """A deterministic pseudo-random uint64 per row from its (user, item) pair alone (ids as text, so
    integer and string ids of one pair agree, as they do in ``row_keys`` on every engine)."""
    ids = frame[["user", "item"]].astype(str)
    return pd.util.hash_pandas_object(ids, index=False, hash_key=hash_key(seed)).to_numpy(np.uint64)


def assign_split(frame: pd.DataFrame, rule: str, val_frac: float, test_frac: float, seed: int) -> np.ndarray:
    """Split code per row (0 train, 1 val, 2 test), decided per user over the user's distinct items
    (``frame`` needs user, item, key, timestamp): every row of one (user, item) pair goes to the same
    split, so a pair repeated in the source never sits in two splits.

    random: a user's pairs in order of their key; the first round(n*test_frac) go to test, the next
    round(n*val_frac) to val, the rest (always at least one) to train.
    temporal: leave-last-out over pairs by their latest interaction (ties by key); the latest pair
    goes to test and the one before to val (none with ``val_frac`` 0; users with fewer than 3 pairs
    keep theirs in train, except the latest of two -> test).
    A pair's key is its row's key, or for a repeated pair ``pair_keys`` (the smallest of its rows' keys
    would send pairs with many rows to test first). So which pairs are test depends on the rows, the
    seed and ``test_frac`` only, never on ``val_frac``: copies prepared with different ``--val-frac``
    share one test split, and a ``--val-frac 0`` copy's train is the other's train + val (the funnel
    recipe relies on it). A source without repeated pairs is split as it was row by row.
    """
    n_rows = len(frame)
    if n_rows == 0:
        return np.zeros(0, dtype=np.int8)
    # users and items as integer codes: sorting Python strings would compare them one pair at a time
    user = pd.factorize(frame["user"], sort=False)[0]
    item = pd.factorize(frame["item"], sort=False)[0]
    pair = pd.factorize(user.astype(np.int64) * (int(item.max()) + 1) + item, sort=False)[0]
    key = frame["key"].to_numpy()
    stamp = frame["timestamp"].to_numpy() if rule == "temporal" else np.zeros(n_rows, dtype=np.int8)
    # each pair stands for itself at one row: its latest (temporal; ties by key), else its first by key
    order = np.lexsort((key, -stamp, user))
    _, first = np.unique(pair[order], return_index=True)
    rep = order[first]  # by pair code
    rep_key = key[rep].astype(np.uint64)
    repeated = np.flatnonzero(np.bincount(pair, minlength=len(rep)) > 1)
    if len(repeated):
        rep_key[repeated] = pair_keys(frame.iloc[rep[repeated]], seed)
    rep = rep[np.lexsort((rep_key, -stamp[rep], user[rep]))]
    n_pairs = len(rep)
    users = user[rep]
    starts = np.r_[True, users[1:] != users[:-1]]
    group = np.cumsum(starts) - 1
    heads = np.flatnonzero(starts)
    sizes = np.diff(np.r_[heads, n_pairs])
    rank = np.arange(n_pairs) - heads[group]
    n = sizes[group]
    if rule == "temporal":
        n_test = (n >= 2).astype(np.int64)
        n_val = (n >= 3).astype(np.int64) if val_frac > 0 else np.zeros(n_pairs, dtype=np.int64)
    else:
        n_test = np.floor(n * test_frac + 0.5).astype(np.int64)
        n_val = np.floor(n * val_frac + 0.5).astype(np.int64)
        n_test = np.minimum(n_test, n - 1)
        n_val = np.minimum(n_val, n - 1 - n_test)
    code = np.where(rank < n_test, 2, np.where(rank < n_test + n_val, 1, 0)).astype(np.int8)
    of_pair = np.empty(n_pairs, dtype=np.int8)
    of_pair[pair[rep]] = code
    return of_pair[pair]


@dataclass
class EncodingPlan:
    """How canonical columns become model inputs; vocabularies and statistics come from train."""

    sparse: list[FeatureSpec]
    dense: list[FeatureSpec]
    vocabs: dict[str, Sequence[str]] = field(default_factory=dict)
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    _indexes: dict[str, pd.Index] = field(default_factory=dict, repr=False, compare=False)

    def index(self, name: str) -> pd.Index:
        """The vocabulary of ``name`` as a pandas Index (built once: chunked paths encode many chunks)."""
        if name not in self._indexes:
            self._indexes[name] = pd.Index(self.vocabs[name])
        return self._indexes[name]

    @property
    def single(self) -> list[FeatureSpec]:
        return [f for f in self.sparse if f.kind == "sparse"]

    @property
    def multi(self) -> list[FeatureSpec]:
        return [f for f in self.sparse if f.kind == "multi"]


def column_of(feature: FeatureSpec) -> str:
    return ID_COLUMNS.get(feature.name, feature.name)


def make_plan(features: list[FeatureSpec]) -> EncodingPlan:
    """Id features first, then side features; single-hot before multi-hot (the block layout)."""
    sparse = [
        *ID_FEATURES,
        *[f for f in features if f.kind == "sparse"],
        *[f for f in features if f.kind == "multi"],
    ]
    return EncodingPlan(sparse=sparse, dense=[f for f in features if f.kind == "dense"])


def build_vocab(values: pd.Series, multi: bool) -> list[str]:
    """Sorted distinct raw values (as strings) of a train column."""
    if multi:
        values = values.explode().dropna()
    return sorted(set(values.astype(str).tolist()))


def fit_plan(plan: EncodingPlan, train: pd.DataFrame) -> None:
    """Build vocabularies and dense statistics from the train rows only."""
    for f in plan.sparse:
        plan.vocabs[f.name] = build_vocab(train[column_of(f)], f.kind == "multi")
    for f in plan.dense:
        col = pd.to_numeric(train[column_of(f)], errors="coerce").astype(np.float64)
        mean = float(col.mean()) if col.notna().any() else 0.0
        std = float(col.std(ddof=0)) if col.notna().sum() > 1 else 1.0
        plan.stats[f.name] = (mean, std if std > 0 else 1.0)


def encode_frame(frame: pd.DataFrame, plan: EncodingPlan) -> dict[str, Any]:
    """Columns of model inputs for each row: dense, sparse indices, multi-hot (values, lengths), label."""
    n = len(frame)
    dense = np.zeros((n, len(plan.dense)), dtype=np.float32)
    for j, f in enumerate(plan.dense):
        mean, std = plan.stats[f.name]
        col = pd.to_numeric(frame[column_of(f)], errors="coerce").to_numpy(np.float64)
        dense[:, j] = np.nan_to_num((col - mean) / std, nan=0.0)
    sparse = np.zeros((n, len(plan.single)), dtype=np.int64)
    for j, f in enumerate(plan.single):
        sparse[:, j] = plan.index(f.name).get_indexer(frame[column_of(f)].astype(str)) + 1
    multi = []
    for f in plan.multi:
        lists = frame[column_of(f)]
        lengths = lists.map(len).to_numpy(np.int32)
        flat = lists.explode().dropna().astype(str)
        values = plan.index(f.name).get_indexer(flat) + 1
        multi.append((values.astype(np.int64), lengths))
    return {"dense": dense, "sparse": sparse, "multi": multi, "label": frame["label"].to_numpy(np.float32)}


def pack_blocks(enc: dict[str, Any], block_rows: int) -> Iterator[dict[str, Any]]:
    """Cut encoded rows (already in their shuffled order) into MDS block samples."""
    n = len(enc["label"])
    offsets = [np.r_[0, np.cumsum(lengths, dtype=np.int64)] for _, lengths in enc["multi"]]
    for lo in range(0, n, block_rows):
        hi = min(lo + block_rows, n)
        multi = [
            (values[off[lo] : off[hi]], lengths[lo:hi])
            for (values, lengths), off in zip(enc["multi"], offsets, strict=True)
        ]
        yield encode_block(enc["dense"][lo:hi], enc["sparse"][lo:hi], enc["label"][lo:hi], multi)


def label_frame(frame: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Add ``label`` (rating >= threshold) where the source has ratings but no label."""
    if "label" not in frame.columns:
        frame = frame.assign(label=(frame["rating"] >= threshold).astype(np.float32))
    return frame


# -- writing ------------------------------------------------------------------------------------------


def id_pairs(enc: dict[str, Any]) -> pd.DataFrame:
    """(user_id, item_id, label) of encoded rows: what retrieval evaluation reads."""
    return pd.DataFrame({"user_id": enc["sparse"][:, 0], "item_id": enc["sparse"][:, 1], "label": enc["label"]})


def write_split(enc: dict[str, Any], directory: Path, block_rows: int, num_multi: int) -> SplitInfo:
    """Write one split's encoded rows as MDS block shards."""
    from tqdm import tqdm

    n = len(enc["label"])
    with SplitWriter(directory, num_multi) as writer:
        for sample in tqdm(
            pack_blocks(enc, block_rows),
            total=-(-n // block_rows),
            desc=f"write {directory.name}",
            unit="block",
            leave=False,
            disable=n < 100_000,
        ):
            writer.write(sample)
    return writer.info()


class SplitWriter:
    """The MDS block shards of one split, counting rows, blocks and positives as they are written;
    every preparation path writes its splits through it (Spark's per-partition writers aside)."""

    def __init__(self, directory: Path, num_multi: int) -> None:
        from streaming import MDSWriter

        self.writer = MDSWriter(
            out=str(directory), columns=mds_columns(num_multi), compression="zstd", progress_bar=False
        )
        self.rows = self.blocks = 0
        self.positives = 0.0

    def write(self, sample: dict[str, Any]) -> None:
        self.writer.write(sample)
        self.rows += int(sample["n"])
        self.blocks += 1
        self.positives += float(np.frombuffer(sample["label"], dtype=np.float32).sum(dtype=np.float64))

    def info(self) -> SplitInfo:
        return SplitInfo(self.rows, self.blocks, self.positives / self.rows if self.rows else 0.0)

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None = None, *exc: object) -> None:
        if exc_type is None:
            self.writer.finish()  # the last shard and the index
        else:  # the error on its way out is the one to report, not a second one from writing the index
            self.writer.cancel_future_jobs()


def concat_encoded(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Encoded rows of several parts, one after the other."""
    if len(parts) == 1:
        return parts[0]
    return {
        "dense": np.concatenate([p["dense"] for p in parts]),
        "sparse": np.concatenate([p["sparse"] for p in parts]),
        "label": np.concatenate([p["label"] for p in parts]),
        "multi": [
            (np.concatenate([p["multi"][i][0] for p in parts]), np.concatenate([p["multi"][i][1] for p in parts]))
            for i in range(len(parts[0]["multi"]))
        ],
    }


def slice_encoded(enc: dict[str, Any], lo: int, hi: int) -> dict[str, Any]:
    """Rows ``lo:hi`` of encoded rows."""
    multi = []
    for values, lengths in enc["multi"]:
        start = int(lengths[:lo].sum(dtype=np.int64))
        stop = start + int(lengths[lo:hi].sum(dtype=np.int64))
        multi.append((values[start:stop], lengths[lo:hi]))
    return {"dense": enc["dense"][lo:hi], "sparse": enc["sparse"][lo:hi], "label": enc["label"][lo:hi], "multi": multi}


class BlockPacker:
    """Encoded rows arriving in parts (one bucket at a time), cut into the blocks ``pack_blocks`` would
    cut from all of them at once: a part's last partial block waits for the next part."""

    def __init__(self, writer: SplitWriter, block_rows: int) -> None:
        self.writer = writer
        self.block_rows = block_rows
        self.pending: dict[str, Any] | None = None

    def add(self, enc: dict[str, Any]) -> None:
        rows = concat_encoded([self.pending, enc]) if self.pending is not None else enc
        full = len(rows["label"]) // self.block_rows * self.block_rows
        for sample in pack_blocks(slice_encoded(rows, 0, full), self.block_rows):
            self.writer.write(sample)
        self.pending = slice_encoded(rows, full, len(rows["label"])) if full < len(rows["label"]) else None

    def finish(self) -> None:
        if self.pending is not None:
            for sample in pack_blocks(self.pending, self.block_rows):
                self.writer.write(sample)
            self.pending = None


class ParquetParts:
    """Parquet files written a part at a time: one writer per file, opened at its first part (the schema
    of later parts is cast to the first's); ``close`` finishes them all. As a context manager it closes
    them however the block ends (quietly when an error is on its way out: that error is the one to report)."""

    def __init__(self) -> None:
        self.writers: dict[Path, Any] = {}

    def write(self, path: Path, frame: pd.DataFrame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(frame, preserve_index=False)
        if path not in self.writers:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writers[path] = pq.ParquetWriter(path, table.schema)
        self.writers[path].write_table(table.cast(self.writers[path].schema))

    def close(self) -> None:
        """Finish every file, even when one fails (the first failure is raised once all are closed)."""
        failure: Exception | None = None
        for w in self.writers.values():
            try:
                w.close()
            except Exception as e:
                failure = failure or e
        self.writers.clear()
        if failure is not None:
            raise failure

    def __enter__(self) -> ParquetParts:
        return self

    def __exit__(self, exc_type: type[BaseException] | None = None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            with contextlib.suppress(Exception):
                self.close()


class SplitOutputs:
    """What a preparation path writes of its splits, a part at a time: each split's MDS shards (a
    ``SplitWriter`` behind a ``BlockPacker``) and its (user_id, item_id) pairs (``ParquetParts``). As a
    context manager it closes every writer however the block ends; ``finish`` (the end of the normal
    path) writes the last partial blocks and returns each split's counts."""

    def __init__(self, block_rows: int, num_multi: int) -> None:
        self.block_rows, self.num_multi = block_rows, num_multi
        self.writers: dict[str, SplitWriter] = {}
        self.packers: dict[str, BlockPacker] = {}
        self.pairs = ParquetParts()

    def open(self, name: str, directory: Path) -> None:
        """Start split ``name``'s shards in ``directory``."""
        self.writers[name] = SplitWriter(directory, self.num_multi)
        self.packers[name] = BlockPacker(self.writers[name], self.block_rows)

    def add(self, name: str, enc: dict[str, Any], pairs: Path) -> None:
        """Encoded rows of split ``name``: into its blocks, and their id pairs into the file ``pairs``."""
        self.packers[name].add(enc)
        self.pairs.write(pairs, id_pairs(enc))

    def finish(self) -> dict[str, SplitInfo]:
        for packer in self.packers.values():
            packer.finish()
        return {name: w.info() for name, w in self.writers.items()}

    def __enter__(self) -> SplitOutputs:
        return self

    def __exit__(self, exc_type: type[BaseException] | None = None, *exc: object) -> None:
        if exc_type is not None:  # the error on its way out is the one to report: close what can be closed
            for w in self.writers.values():
                w.__exit__(exc_type)
            self.pairs.__exit__(exc_type)
            return
        try:
            for w in self.writers.values():
                w.__exit__()
        finally:
            self.pairs.close()


def write_tables(user_rows: pd.DataFrame, item_rows: pd.DataFrame, plan: EncodingPlan, tmp: Path) -> None:
    """``users.parquet`` / ``items.parquet``: encoded features of each train user / item, by index.

    ``user_rows`` / ``item_rows`` hold one train row per user / item (side features are per entity).
    """
    for tower, rows in (("user", user_rows), ("item", item_rows)):
        rows = rows.assign(label=0.0)
        enc = encode_frame(rows, plan)
        table = tower_table(enc, plan, tower)
        table.sort_values(f"{tower}_id").reset_index(drop=True).to_parquet(tmp / f"{tower}s.parquet")


ITEM_TITLES = "item_titles.parquet"


def write_item_titles(raw: RawTable, tmp: Path) -> None:
    """``item_titles.parquet`` (raw ``item`` id, ``title``) beside the shards, when the source has titles."""
    if raw.item_titles is not None and len(raw.item_titles):
        raw.item_titles.astype(str).reset_index(drop=True).to_parquet(tmp / ITEM_TITLES)


def tower_table(enc: dict[str, Any], plan: EncodingPlan, tower: str) -> pd.DataFrame:
    """The columns of one tower's features from encoded rows."""
    cols: dict[str, Any] = {}
    for j, f in enumerate(plan.single):
        if f.tower == tower:
            cols[f.name] = enc["sparse"][:, j]
    for (values, lengths), f in zip(enc["multi"], plan.multi, strict=True):
        if f.tower == tower:
            cols[f.name] = list(np.split(values, np.cumsum(lengths)[:-1])) if len(lengths) else []
    for j, f in enumerate(plan.dense):
        if f.tower == tower:
            cols[f.name] = enc["dense"][:, j]
    return pd.DataFrame(cols)


def user_histories(train: pd.DataFrame, plan: EncodingPlan) -> pd.DataFrame:
    """One row per train user: ``user_id`` and ``items``, the distinct item indices the user had in
    train, oldest first (by timestamp, ties by item index; an item sits at its latest interaction).

    Both engines run this on the train rows (Spark one user group at a time), so they agree. Every
    train interaction counts, whatever its label: what a user touched describes them.
    """
    users = plan.index("user_id").get_indexer(train["user"].astype(str)) + 1
    items = plan.index("item_id").get_indexer(train["item"].astype(str)) + 1
    ts = train["timestamp"].to_numpy(np.int64) if "timestamp" in train.columns else np.zeros(len(train), np.int64)
    rows = pd.DataFrame({"user_id": users.astype(np.int64), "item_id": items.astype(np.int64), "ts": ts})
    rows = rows.sort_values(["user_id", "ts", "item_id"], kind="stable")
    rows = rows.drop_duplicates(["user_id", "item_id"], keep="last")
    user, item = rows["user_id"].to_numpy(), rows["item_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]]) if len(user) else np.zeros(0, np.int64)
    return pd.DataFrame({"user_id": user[starts], "items": np.split(item, starts[1:]) if len(user) else []})


def sparse_feature(name: str, vocab: Sequence[str], tower: str, multi_hot: bool) -> SparseFeature:
    """The metadata of a sparse feature whose vocabulary ``finish_dataset`` writes."""
    return SparseFeature(name, len(vocab) + 1, tower, multi_hot, f"{VOCAB_DIR}/{name}.json")


def finish_dataset(meta: DatasetMetadata, vocabs: Mapping[str, Sequence[str]], tmp: Path) -> None:
    """Write the vocabularies and, last, ``metadata.json`` (what makes the directory a dataset)."""
    (tmp / VOCAB_DIR).mkdir(exist_ok=True)
    for name, vocab in vocabs.items():
        write_vocab(tmp / VOCAB_DIR / f"{name}.json", vocab)
    write_metadata(meta, tmp)


def write_vocab(path: Path, vocab: Sequence[str], step: int = 1 << 16) -> None:
    """``json.dumps(list(vocab))``, written a slice at a time (a vocabulary of millions of ids is
    never one string in memory)."""
    with open(path, "w") as f:
        f.write("[")
        for lo in range(0, len(vocab), step):
            f.write((", " if lo else "") + json.dumps(list(vocab[lo : lo + step]))[1:-1])
        f.write("]")


def build_metadata(
    cfg: PrepareConfig,
    plan: EncodingPlan,
    raw: RawTable,
    splits: dict[str, SplitInfo],
    engine: str,
    label_from_rating: bool,
    corpus: dict[str, Any] | None = None,
) -> DatasetMetadata:
    """Assemble metadata.json from the fitted plan and the written splits."""
    rule: dict[str, Any] = {"rule": cfg.split, "seed": cfg.seed, "engine": engine, "per": "user"}
    if cfg.split == "random":
        rule.update(val_frac=cfg.val_frac, test_frac=cfg.test_frac)
    label: dict[str, Any] = (
        {"name": "label", "definition": f"rating >= {cfg.label_threshold}", "threshold": cfg.label_threshold}
        if label_from_rating
        else {"name": "label", "definition": raw.label_definition or "label column of the source"}
    )
    return DatasetMetadata(
        dataset=cfg.dataset,
        task="retrieval",
        block_rows=cfg.block_rows,
        dense_features=tuple(DenseFeature(f.name, f.tower, *plan.stats[f.name]) for f in plan.dense),
        sparse_features=tuple(
            sparse_feature(f.name, plan.vocabs[f.name], f.tower, f.kind == "multi") for f in plan.sparse
        ),
        label=label,
        splits=splits,
        split_rule=rule,
        source={**raw.source, "rows_cap": cfg.rows},
        user_id_feature="user_id",
        item_id_feature="item_id",
        corpus=corpus or default_corpus(),
        history=history_description(),
    )
