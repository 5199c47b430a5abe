"""synthetic-retrieval: users and items with planted latent factors and Zipf-like item popularity,
generated and written a chunk of users at a time, in memory that does not grow with ``--rows``.

The recipe, per interaction: its user draws ``CANDIDATES`` items from popularity and keeps the one
with the highest 2 x affinity + Gumbel noise (affinity: the planted factors' dot product over
sqrt(d)), i.e. a softmax pick among the candidates; its label is Bernoulli(sigmoid(2 affinity - 2)).
Every user has at least one interaction, the others are spread by a lognormal activity. Popularity
rank r (0 = most popular) has probability F(r + 2) - F(r + 1), F the CDF of the power law x^-zipf on
[1, items + 1): sampling inverts F (no table lookup per draw), and a random permutation maps ranks to
items. Raw ids are 0..N-1; raw id i is row i of the factors in ``ground_truth.npz``.

Seeding: users come in fixed blocks (``user_block``), each with its own random streams, and how many
interactions each block gets is drawn up front, block after block, from one more stream; so the data
depends on ``--seed`` and the sizes, never on ``--synthetic.chunk_rows``.

Writing (``prepare_synthetic_retrieval``), in passes over chunks of whole users:
1. generate a chunk; per user split (``encoding.assign_split``) and hash key (``encoding.row_keys``,
   on the same string ids as the in-memory table), so rows, split and order are those of the
   in-memory engine on ``generate_retrieval``'s table; count train rows per user and item; spill
   (key, user, item, label, split) to key-range buckets and each train user's distinct items to a
   sequential file (``datamodules.buckets``);
2. vocabularies and standardisation statistics from the counts (ids are known up front);
3. each key-range bucket, sorted by key, encoded by array lookups and cut into blocks; then the
   histories, the users and items tables and the ground truth.
"""

from __future__ import annotations

import logging
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import pandas as pd

from core.errors import require
from datamodules.buckets import Buckets, bucket_count, key_ranges
from datamodules.config import PrepareConfig
from datamodules.encoding import (
    SPLIT_CODES,
    EncodingPlan,
    SplitOutputs,
    assign_split,
    build_metadata,
    finish_dataset,
    make_plan,
    row_keys,
)
from datamodules.schema import DatasetMetadata, SplitInfo
from datamodules.sources import FeatureSpec, RawTable

log = logging.getLogger(__name__)

RETRIEVAL_FEATURES = [
    FeatureSpec("user_segment", "sparse", "user"),
    FeatureSpec("item_category", "sparse", "item"),
    FeatureSpec("item_tags", "multi", "item"),
    FeatureSpec("user_age", "dense", "user"),
    FeatureSpec("item_year", "dense", "item"),
]
CANDIDATES = 32
LABEL_DEFINITION = "Bernoulli(sigmoid(2 * planted affinity - 2))"
MAX_USERS = 10_000_000
MAX_ITEMS = 1_000_000
BLOCK_ROWS = 65_536
"""Interactions per block of users, on average: sets the (fixed) number of users per block."""
STEP_ROWS = 32_768
"""Interactions scored at once against their candidates (bounds the candidate arrays)."""
_USERS, _ROWS, _ITEMS, _ALLOCATION = 1, 2, 3, 4  # random streams
START_TIME = 1_500_000_000


def retrieval_sizes(rows: int, users: int | None = None, items: int | None = None) -> tuple[int, int]:
    """Users and items of a synthetic-retrieval set of ``rows`` interactions (defaults: rows / 40
    users, rows / 20 items up to 200,000)."""
    return (users if users is not None else max(20, rows // 40)), (
        items if items is not None else max(20, min(rows // 20, 200_000))
    )


def zipf_ranks(u: np.ndarray, n: int, s: float) -> np.ndarray:
    """Popularity ranks (0-based) for uniform draws ``u``: floor of the power law x^-s on [1, n + 1)."""
    a = 1.0 - s
    x = (n + 1.0) ** u if abs(a) < 1e-12 else (1.0 + u * ((n + 1.0) ** a - 1.0)) ** (1.0 / a)
    return np.clip(x.astype(np.int64) - 1, 0, n - 1)


def zipf_pmf(n: int, s: float) -> np.ndarray:
    """The probability of each popularity rank under ``zipf_ranks``."""
    a = 1.0 - s
    r = np.arange(1, n + 2, dtype=np.float64)
    cdf = np.log(r) / np.log(n + 1.0) if abs(a) < 1e-12 else (r**a - 1.0) / ((n + 1.0) ** a - 1.0)
    return np.diff(cdf)


@dataclass
class UserBlock:
    """One block of users: raw ids ``first..first + len - 1`` and their planted attributes."""

    first: int
    factors: np.ndarray
    activity: np.ndarray
    segment: np.ndarray
    age: np.ndarray


@dataclass
class RetrievalWorld:
    """The planted items and the per-block allocation of interactions: all that is held for every
    chunk (memory grows with items and user blocks, never with rows)."""

    seed: int
    rows: int
    n_users: int
    n_items: int
    zipf: float
    block_users: int
    item_factors: np.ndarray
    rank_to_item: np.ndarray
    block_extra: np.ndarray
    """Interactions of each block beyond one per user."""

    @classmethod
    def create(cls, cfg: PrepareConfig) -> RetrievalWorld:
        s = cfg.synthetic
        rows = cfg.rows or 100_000
        n_users, n_items = retrieval_sizes(rows, s.users, s.items)
        require(s.latent_dim >= 2, "--synthetic.latent_dim: must be at least 2")
        require(s.zipf >= 0, f"--synthetic.zipf: must be at least 0, got {s.zipf}")
        require(
            1 <= n_users <= min(rows, MAX_USERS),
            f"--synthetic.users: must be between 1 and {min(rows, MAX_USERS):,} (every user has an interaction), "
            f"got {n_users:,}",
        )
        require(2 <= n_items <= MAX_ITEMS, f"--synthetic.items: must be between 2 and {MAX_ITEMS:,}, got {n_items:,}")
        rng = np.random.default_rng([cfg.seed, _ITEMS])
        item_factors = rng.normal(size=(n_items, s.latent_dim)).astype(np.float32)
        rank_to_item = rng.permutation(n_items)
        block_users = int(np.clip(BLOCK_ROWS * n_users // rows, 1, 4096))
        world = cls(cfg.seed, rows, n_users, n_items, s.zipf, block_users, item_factors, rank_to_item, np.zeros(0))
        world.block_extra = world._allocate()
        return world

    @property
    def dim(self) -> int:
        return int(self.item_factors.shape[1])

    @property
    def n_blocks(self) -> int:
        return -(-self.n_users // self.block_users)

    def block_sizes(self) -> np.ndarray:
        """Interactions of every block (users + extra)."""
        users = np.full(self.n_blocks, self.block_users, dtype=np.int64)
        users[-1] = self.n_users - self.block_users * (self.n_blocks - 1)
        return users + self.block_extra

    def user_block(self, k: int) -> UserBlock:
        """The planted attributes of block ``k``'s users (their own stream: the same in every pass)."""
        first = k * self.block_users
        g = min(self.block_users, self.n_users - first)
        rng = np.random.default_rng([self.seed, _USERS, k])
        factors = rng.normal(size=(g, self.dim)).astype(np.float32)
        activity = rng.lognormal(0.0, 0.8, g)
        age = np.round(35 + 10 * factors[:, -1] + rng.normal(0, 3, g)).astype(np.float32)
        segment = np.argmax(factors[:, : min(4, self.dim)], axis=1).astype(np.int64)
        return UserBlock(first, factors, activity, segment, age)

    def _allocate(self) -> np.ndarray:
        """Interactions beyond one per user, per block: a multinomial over users by activity, drawn as
        one binomial per block (the block's share of what the blocks after it have not taken)."""
        weight = np.array([self.user_block(k).activity.sum() for k in range(self.n_blocks)])
        after = np.cumsum(weight[::-1])[::-1]
        rng = np.random.default_rng([self.seed, _ALLOCATION])
        left = self.rows - self.n_users
        extra = np.zeros(self.n_blocks, dtype=np.int64)
        for k in range(self.n_blocks):
            p = 1.0 if k == self.n_blocks - 1 else min(1.0, weight[k] / after[k])
            extra[k] = rng.binomial(left, p) if left > 0 else 0
            left -= int(extra[k])
        return extra

    def item_popularity(self) -> np.ndarray:
        """Each item's probability of being drawn as a candidate (index = raw item id)."""
        pop = np.empty(self.n_items)
        pop[self.rank_to_item] = zipf_pmf(self.n_items, self.zipf)
        return pop

    def item_features(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Category, two tags (the item's two largest factors) and year of every item."""
        f = self.item_factors
        category = np.argmax(f[:, : min(4, self.dim)], axis=1).astype(np.int64)
        tags = np.empty((self.n_items, 2), dtype=np.int64)
        for lo in range(0, self.n_items, 1 << 16):
            tags[lo : lo + (1 << 16)] = np.argsort(-f[lo : lo + (1 << 16)], axis=1)[:, :2]
        year = np.round(2000 + 8 * f[:, 1 % self.dim]).astype(np.float32)
        return category, tags, year

    def interactions(self, users: UserBlock, k: int) -> dict[str, np.ndarray]:
        """Block ``k``'s interactions, user by user and oldest first: user, item, label, timestamp."""
        rng = np.random.default_rng([self.seed, _ROWS, k])
        g = len(users.activity)
        counts = 1 + rng.multinomial(int(self.block_extra[k]), users.activity / users.activity.sum())
        local = np.repeat(np.arange(g), counts)
        m = len(local)
        item = np.empty(m, dtype=np.int64)
        affinity = np.empty(m, dtype=np.float32)
        scale = np.float32(1 / np.sqrt(self.dim))
        for lo in range(0, m, STEP_ROWS):
            u = local[lo : lo + STEP_ROWS]
            cand = self.rank_to_item[zipf_ranks(rng.random((len(u), CANDIDATES)), self.n_items, self.zipf)]
            aff = np.matmul(self.item_factors[cand], users.factors[u][:, :, None])[:, :, 0] * scale
            pick = np.argmax(2.0 * aff + rng.gumbel(size=aff.shape), axis=1)
            item[lo : lo + STEP_ROWS] = cand[np.arange(len(u)), pick]
            affinity[lo : lo + STEP_ROWS] = aff[np.arange(len(u)), pick]
        label = (rng.random(m) < 1 / (1 + np.exp(-(2.0 * affinity - 2.0)))).astype(np.float32)
        starts = np.cumsum(counts) - counts
        ts = START_TIME + (np.arange(m) - np.repeat(starts, counts)) * 60
        return {"user": users.first + local, "item": item, "label": label, "timestamp": ts.astype(np.int64)}

    def chunks(self, chunk_rows: int) -> list[list[int]]:
        """Consecutive blocks grouped into chunks of at least ``chunk_rows`` interactions (the last may
        hold fewer)."""
        chunks: list[list[int]] = [[]]
        rows = 0
        for k, size in enumerate(self.block_sizes()):
            if rows >= chunk_rows:
                chunks.append([])
                rows = 0
            chunks[-1].append(k)
            rows += int(size)
        return chunks

    def source(self) -> dict[str, Any]:
        return {"generator": "synthetic-retrieval", "seed": self.seed, "users": self.n_users, "items": self.n_items}


def keys_and_split(rows: dict[str, np.ndarray], cfg: PrepareConfig) -> tuple[np.ndarray, np.ndarray]:
    """The hash key and split code of each generated row, as the in-memory engine computes them."""
    text = pd.DataFrame(
        {
            "user": pd.Series(rows["user"]).astype(str),
            "item": pd.Series(rows["item"]).astype(str),
            "timestamp": rows["timestamp"],
            "label": rows["label"],
        }
    )
    key = row_keys(text, cfg.seed)
    frame = pd.DataFrame({"user": rows["user"], "item": rows["item"], "key": key, "timestamp": rows["timestamp"]})
    return key, assign_split(frame, cfg.split, cfg.val_frac, cfg.test_frac, cfg.seed)


# -- in memory ------------------------------------------------------------------------------------------


def generate_retrieval(cfg: PrepareConfig) -> RawTable:
    """The whole set as one in-memory table (for small sets and as the reference the chunked writer is
    tested against): the same rows ``prepare_synthetic_retrieval`` writes."""
    world = RetrievalWorld.create(cfg)
    blocks = [world.user_block(k) for k in range(world.n_blocks)]
    parts = [world.interactions(b, k) for k, b in enumerate(blocks)]
    rows = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    segment = np.concatenate([b.segment for b in blocks])
    age = np.concatenate([b.age for b in blocks])
    category, tags, year = world.item_features()
    u, i = rows["user"], rows["item"]
    frame = pd.DataFrame(
        {
            "user": pd.Series(u).astype(str),
            "item": pd.Series(i).astype(str),
            "label": rows["label"],
            "timestamp": rows["timestamp"],
            "user_segment": segment[u].astype(str),
            "user_age": age[u].astype(np.float64),
            "item_category": category[i].astype(str),
            "item_tags": [[f"t{a}", f"t{b}"] for a, b in tags[i]],
            "item_year": year[i].astype(np.float64),
        }
    )
    truth = {
        "user_factors": np.concatenate([b.factors for b in blocks]),
        "item_factors": world.item_factors,
        "item_popularity": world.item_popularity(),
    }
    return RawTable(frame, list(RETRIEVAL_FEATURES), world.source(), truth, label_definition=LABEL_DEFINITION)


def write_ground_truth(raw: RawTable, tmp: Path) -> None:
    """Save the planted factors of an in-memory table (raw user/item id i is row i) next to the shards."""
    np.savez(tmp / "ground_truth.npz", **raw.truth)


# -- chunked --------------------------------------------------------------------------------------------


def lexicographic(ids: np.ndarray) -> np.ndarray:
    """Non-negative integer ids in the order of their decimal strings ("1" < "10" < "2"), the order
    of a vocabulary built from string ids, without making a string per id."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0:
        return ids
    width = len(str(int(ids.max())))
    require(width <= 18, "ids above 10^18 cannot be ordered as strings here")
    ndigits = np.ones(len(ids), dtype=np.int64)
    for d in range(1, width):
        ndigits += ids >= 10**d
    key = np.zeros(len(ids), dtype=np.int64)
    for pos in range(width):  # digit by digit from the left; a missing digit sorts before "0"
        present = ndigits > pos
        digit = (ids // np.power(10, np.where(present, ndigits - 1 - pos, 0))) % 10
        key = key * 11 + np.where(present, digit + 1, 0)
    return ids[np.argsort(key, kind="stable")]


class IdVocab(Sequence[str]):
    """A vocabulary of integer ids (in vocabulary order) read as strings, without a string per id."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [str(x) for x in self.ids[i].tolist()]
        return str(int(self.ids[i]))


def index_of(ids: np.ndarray, size: int) -> np.ndarray:
    """Raw id -> vocabulary index (1-based; 0 for ids outside the vocabulary ``ids``)."""
    index = np.zeros(size, dtype=np.int64)
    index[ids] = np.arange(1, len(ids) + 1)
    return index


def code_vocab(codes: np.ndarray, prefix: str = "") -> tuple[list[str], np.ndarray]:
    """The sorted string vocabulary of small integer codes (as ``prefix`` + code) and code -> index."""
    present = np.unique(codes)
    vocab = sorted(f"{prefix}{c}" for c in present.tolist())
    index = np.zeros(int(codes.max()) + 1 if len(codes) else 1, dtype=np.int64)
    for position, value in enumerate(vocab, start=1):
        index[int(value[len(prefix) :])] = position
    return vocab, index


def weighted_stats(values: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """Mean and (population) standard deviation of ``values`` repeated ``weights`` times, as
    ``encoding.fit_plan`` computes them over the train rows (std 1 when there is no spread)."""
    n = weights.sum(dtype=np.float64)
    if n == 0:
        return 0.0, 1.0
    x = values.astype(np.float64)
    mean = float((weights * x).sum() / n)
    std = float(np.sqrt((weights * (x - mean) ** 2).sum() / n)) if n > 1 else 1.0
    return mean, (std if std > 0 else 1.0)


class GroundTruth:
    """``ground_truth.npz`` written as the users are generated (the user factors are never all in memory):
    the layout ``np.savez`` writes, one ``.npy`` member per array."""

    def __init__(self, path: Path, n_users: int, dim: int) -> None:
        self.zip = zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.users = self.zip.open("user_factors.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
        np.lib.format.write_array_header_1_0(self.users, {**header, "shape": (n_users, dim)})

    def add_users(self, factors: np.ndarray) -> None:
        self.users.write(np.ascontiguousarray(factors, dtype=np.float32).tobytes())

    def finish(self, item_factors: np.ndarray, item_popularity: np.ndarray) -> None:
        self.users.close()
        for name, array in (("item_factors", item_factors), ("item_popularity", item_popularity)):
            with self.zip.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array))
        self.zip.close()


@dataclass
class Counts:
    """What pass 1 keeps per user and item: train rows (for vocabularies and statistics) and the
    users' side features."""

    user_train: np.ndarray
    item_train: np.ndarray
    segment: np.ndarray
    age: np.ndarray


def prepare_synthetic_retrieval(cfg: PrepareConfig, tmp: Path) -> DatasetMetadata:
    """Generate synthetic-retrieval into ``tmp`` a chunk of users at a time (see the module docstring)."""
    from tqdm import tqdm

    started = time.time()
    world = RetrievalWorld.create(cfg)
    chunk_rows = cfg.synthetic.chunk_rows
    chunks = world.chunks(chunk_rows)
    log.info(
        "synthetic-retrieval: %s rows, %s users, %s items, %d chunks",
        f"{world.rows:,}",
        f"{world.n_users:,}",
        f"{world.n_items:,}",
        len(chunks),
    )
    spill = tmp / "_spill"
    by_key = Buckets(spill / "keys", bucket_count(world.rows, chunk_rows))
    history = Buckets(spill / "history", 1)
    counts = Counts(
        np.zeros(world.n_users, np.int32),
        np.zeros(world.n_items, np.int64),
        np.zeros(world.n_users, np.int8),
        np.zeros(world.n_users, np.float32),
    )
    truth = GroundTruth(tmp / "ground_truth.npz", world.n_users, world.dim)
    for chunk in tqdm(chunks, desc="generate", unit="chunk", disable=len(chunks) < 4):
        generate_chunk(world, chunk, cfg, counts, truth, by_key, history)
    truth.finish(world.item_factors, world.item_popularity())
    log.info("synthetic-retrieval: generated in %.1fs", time.time() - started)
    category, tags, year = world.item_features()
    plan, lookups = fit_synthetic_plan(counts, category, tags, year)
    splits = write_shards(by_key, plan, lookups, counts, (category, tags, year), cfg, tmp)
    write_histories(history, lookups, tmp / "histories.parquet")
    write_entity_tables(plan, lookups, counts, (category, tags, year), tmp)
    by_key.remove()
    history.remove()
    spill.rmdir()
    raw = RawTable(pd.DataFrame(), list(RETRIEVAL_FEATURES), world.source(), label_definition=LABEL_DEFINITION)
    meta = build_metadata(cfg, plan, raw, splits, engine="local", label_from_rating=False)
    finish_dataset(meta, plan.vocabs, tmp)
    rows = ", ".join(f"{k} {v.rows:,}" for k, v in meta.splits.items())
    log.info("prepared synthetic-retrieval: %s rows in %.1fs", rows, time.time() - started)
    return meta


def generate_chunk(
    world: RetrievalWorld,
    blocks: list[int],
    cfg: PrepareConfig,
    counts: Counts,
    truth: GroundTruth,
    by_key: Buckets,
    history: Buckets,
) -> None:
    """Pass 1 over one chunk of user blocks (the module docstring's step 1)."""
    parts = []
    for k in blocks:
        users = world.user_block(k)
        truth.add_users(users.factors)
        g = slice(users.first, users.first + len(users.activity))
        counts.segment[g] = users.segment
        counts.age[g] = users.age
        parts.append(world.interactions(users, k))
    rows = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    key, split = keys_and_split(rows, cfg)
    train = split == 0
    lo, hi = int(rows["user"][0]), int(rows["user"][-1]) + 1  # a chunk's users are consecutive
    counts.user_train[lo:hi] += np.bincount(rows["user"][train] - lo, minlength=hi - lo).astype(np.int32)
    counts.item_train += np.bincount(rows["item"][train], minlength=world.n_items)
    spilled = pd.DataFrame(
        {
            "key": key,
            "user": rows["user"].astype(np.int32),
            "item": rows["item"].astype(np.int32),
            "label": rows["label"],
            "split": split,
        }
    )
    by_key.write(key_ranges(key, by_key.count), spilled)
    # each user's distinct train items, oldest first (rows are by user, then time): an item sits at
    # its latest interaction, as encoding.user_histories orders them
    seen = pd.DataFrame({"user": spilled["user"][train], "item": spilled["item"][train]})
    seen = seen.drop_duplicates(keep="last")
    history.write(np.zeros(len(seen), dtype=np.int64), seen)


@dataclass
class Lookups:
    """Raw value -> vocabulary index of every sparse feature, as arrays."""

    user: np.ndarray
    item: np.ndarray
    segment: np.ndarray
    category: np.ndarray
    tags: np.ndarray
    user_order: np.ndarray
    item_order: np.ndarray


def fit_synthetic_plan(
    counts: Counts, category: np.ndarray, tags: np.ndarray, year: np.ndarray
) -> tuple[EncodingPlan, Lookups]:
    """Vocabularies and statistics of the train split from the per-user and per-item counts."""
    plan = make_plan(RETRIEVAL_FEATURES)
    train_users = np.flatnonzero(counts.user_train > 0)
    train_items = np.flatnonzero(counts.item_train > 0)
    user_order, item_order = lexicographic(train_users), lexicographic(train_items)
    segment_vocab, segment_index = code_vocab(counts.segment[train_users].astype(np.int64))
    category_vocab, category_index = code_vocab(category[train_items])
    tag_vocab, tag_index = code_vocab(tags[train_items].reshape(-1), prefix="t")
    plan.vocabs = {
        "user_id": IdVocab(user_order),
        "item_id": IdVocab(item_order),
        "user_segment": segment_vocab,
        "item_category": category_vocab,
        "item_tags": tag_vocab,
    }
    plan.stats = {
        "user_age": weighted_stats(counts.age, counts.user_train),
        "item_year": weighted_stats(year, counts.item_train),
    }
    lookups = Lookups(
        index_of(user_order, len(counts.user_train)),
        index_of(item_order, len(counts.item_train)),
        pad(segment_index, 256),
        pad(category_index, int(category.max()) + 1),
        pad(tag_index, int(tags.max()) + 1),
        user_order,
        item_order,
    )
    return plan, lookups


def pad(index: np.ndarray, size: int) -> np.ndarray:
    """A code -> index table covering codes up to ``size - 1`` (codes absent from train: index 0)."""
    return np.r_[index, np.zeros(max(0, size - len(index)), dtype=np.int64)]


def standardise(values: np.ndarray, stats: tuple[float, float]) -> np.ndarray:
    mean, std = stats
    return ((values.astype(np.float64) - mean) / std).astype(np.float32)


def encode_rows(
    user: np.ndarray,
    item: np.ndarray,
    label: np.ndarray,
    plan: EncodingPlan,
    lookups: Lookups,
    counts: Counts,
    items: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """``encoding.encode_frame`` of generated rows, by array lookups instead of strings."""
    category, tags, year = items
    sparse = np.stack(
        [
            lookups.user[user],
            lookups.item[item],
            lookups.segment[counts.segment[user]],
            lookups.category[category[item]],
        ],
        axis=1,
    )
    dense = np.stack(
        [standardise(counts.age[user], plan.stats["user_age"]), standardise(year[item], plan.stats["item_year"])],
        axis=1,
    )
    tag_values = lookups.tags[tags[item]].reshape(-1)
    return {
        "dense": dense,
        "sparse": sparse.astype(np.int64),
        "multi": [(tag_values, np.full(len(user), 2, dtype=np.int32))],
        "label": label.astype(np.float32),
    }


def write_shards(
    by_key: Buckets,
    plan: EncodingPlan,
    lookups: Lookups,
    counts: Counts,
    items: tuple[np.ndarray, np.ndarray, np.ndarray],
    cfg: PrepareConfig,
    tmp: Path,
) -> dict[str, SplitInfo]:
    """Pass 3: every split's rows in key order, cut into blocks, and their (user_id, item_id) pairs."""
    from tqdm import tqdm

    with SplitOutputs(cfg.block_rows, len(plan.multi)) as outputs:
        for name in SPLIT_CODES:
            outputs.open(name, tmp / name)
        for r in tqdm(range(by_key.count), desc="write", unit="bucket", disable=by_key.count < 4):
            part = by_key.read(r)
            if len(part) == 0:
                continue
            part = part.iloc[np.argsort(part["key"].to_numpy(), kind="stable")]
            code = part["split"].to_numpy()
            for name, c in SPLIT_CODES.items():
                sel = code == c
                enc = encode_rows(
                    part["user"].to_numpy()[sel].astype(np.int64),
                    part["item"].to_numpy()[sel].astype(np.int64),
                    part["label"].to_numpy()[sel],
                    plan,
                    lookups,
                    counts,
                    items,
                )
                outputs.add(name, enc, tmp / "pairs" / f"{name}.parquet")
        return outputs.finish()


def write_histories(history: Buckets, lookups: Lookups, path: Path) -> None:
    """``histories.parquet``: per train user, the item indices of the spilled train items in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("user_id", pa.int64()), ("items", pa.list_(pa.int64()))])

    def write(user: np.ndarray, item: np.ndarray) -> None:
        starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
        offsets = pa.array(np.r_[starts, len(user)].astype(np.int32))
        items = pa.ListArray.from_arrays(offsets, lookups.item[item])
        writer.write_table(pa.table({"user_id": lookups.user[user[starts]], "items": items}, schema=schema))

    with pq.ParquetWriter(path, schema) as writer:
        user, item = np.zeros(0, np.int64), np.zeros(0, np.int64)
        for batch in history.batches(0):
            user = np.r_[user, batch["user"].to_numpy().astype(np.int64)]
            item = np.r_[item, batch["item"].to_numpy().astype(np.int64)]
            last = np.searchsorted(user, user[-1])  # the last user may go on in the next batch
            if last:
                write(user[:last], item[:last])
                user, item = user[last:], item[last:]
        if len(user):
            write(user, item)


def write_entity_tables(
    plan: EncodingPlan,
    lookups: Lookups,
    counts: Counts,
    items: tuple[np.ndarray, np.ndarray, np.ndarray],
    tmp: Path,
) -> None:
    """``users.parquet`` / ``items.parquet`` (``encoding.write_tables``' columns), a slice at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    category, tags, year = items
    step = 1 << 20
    user_schema = pa.schema([("user_id", pa.int64()), ("user_segment", pa.int64()), ("user_age", pa.float32())])
    with pq.ParquetWriter(tmp / "users.parquet", user_schema) as writer:
        for lo in range(0, len(lookups.user_order), step):
            raw = lookups.user_order[lo : lo + step]
            cols = {
                "user_id": np.arange(lo + 1, lo + 1 + len(raw), dtype=np.int64),
                "user_segment": lookups.segment[counts.segment[raw]],
                "user_age": standardise(counts.age[raw], plan.stats["user_age"]),
            }
            writer.write_table(pa.table(cols, schema=user_schema))
    item_schema = pa.schema(
        [
            ("item_id", pa.int64()),
            ("item_category", pa.int64()),
            ("item_tags", pa.list_(pa.int64())),
            ("item_year", pa.float32()),
        ]
    )
    with pq.ParquetWriter(tmp / "items.parquet", item_schema) as writer:
        for lo in range(0, len(lookups.item_order), step):
            raw = lookups.item_order[lo : lo + step]
            offsets = pa.array(np.arange(0, 2 * len(raw) + 1, 2, dtype=np.int32))
            cols = {
                "item_id": np.arange(lo + 1, lo + 1 + len(raw), dtype=np.int64),
                "item_category": lookups.category[category[raw]],
                "item_tags": pa.ListArray.from_arrays(offsets, lookups.tags[tags[raw]].reshape(-1)),
                "item_year": standardise(year[raw], plan.stats["item_year"]),
            }
            writer.write_table(pa.table(cols, schema=item_schema))
