"""Configuration of data preparation (``recsys data prepare``) and of the streaming DataModule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DATASETS = ("sets2019", "movielens-100k", "interactions", "synthetic-retrieval", "synthetic-ctr")


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic generators (sizes come from ``--rows``)."""

    num_dense: int = 13
    """synthetic-ctr: number of dense features."""
    num_sparse: int = 26
    """synthetic-ctr: number of sparse (categorical) features."""
    cardinalities: list[int] | None = None
    """synthetic-ctr: raw cardinality per sparse feature (default: log-spaced from 10 to 100000)."""
    multi_hot: int = 0
    """synthetic-ctr: how many of the sparse features are multi-hot (the last ones)."""
    max_hot: int = 4
    """synthetic-ctr: most values a multi-hot feature has in one row."""
    zipf: float = 1.1
    """Popularity skew of ids (Zipf exponent)."""
    latent_dim: int = 8
    """synthetic-retrieval: dimension of the planted user/item factors."""
    users: int | None = None
    """synthetic-retrieval: number of users, up to 10,000,000 and --rows (default: rows / 40)."""
    items: int | None = None
    """synthetic-retrieval: number of items, up to 1,000,000 (default: rows / 20, at most 200,000)."""
    chunk_rows: int = 262144
    """Rows generated (and, for synthetic-retrieval, spilled and written) per chunk: peak memory depends
    on this, not on --rows."""


@dataclass(frozen=True)
class PrepareConfig:
    """``recsys data prepare``: turn a source into a prepared dataset directory."""

    dataset: str
    """One of: sets2019, movielens-100k, interactions, synthetic-retrieval, synthetic-ctr."""
    out: str
    """Output directory (built in a temporary sibling and renamed when complete)."""
    source: str | None = None
    """Local file/dir/zip (or URL for sets2019); synthetic sets need none."""
    rows: int | None = None
    """Size of a synthetic set; a cap on the rows read from a real one."""
    split: Literal["random", "temporal"] = "random"
    """random: per-user random split; temporal: per-user leave-last-out by timestamp."""
    val_frac: float = 0.1
    """Per-user fraction of interactions for validation (random split)."""
    test_frac: float = 0.1
    """Per-user fraction of interactions for test (random split)."""
    label_threshold: float = 4.0
    """label = rating >= threshold (rating datasets)."""
    seed: int = 0
    """Seed of splitting, shuffling and synthetic generation."""
    engine: Literal["local", "spark"] = "local"
    """local: pandas/numpy in this process; spark: PySpark (file sources)."""
    spark_master: str = "local[*]"
    """Spark master URL for --engine spark."""
    block_rows: int = 512
    """Rows stored together in one MDS sample (the unit of shuffling across shards)."""
    chunk_rows: int = 1_000_000
    """--dataset interactions, local engine: rows read, and held, at a time; the file is spilled to
    buckets of about this many rows on disk, so peak memory depends on this, not on the file's size."""
    overwrite: bool = False
    """Replace an existing output directory."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    @property
    def needs_timestamp(self) -> bool:
        """Whether a source must have a timestamp column: ``--split temporal`` orders each user's
        interactions by it (without one every row would get time 0, and the split be random)."""
        return self.split == "temporal"


@dataclass(frozen=True)
class DataConfig:
    """The streaming DataModule over a prepared dataset."""

    path: str
    """Prepared dataset directory, local path or any remote URL StreamingDataset supports."""
    batch_size: int = 4096
    """Rows per training batch *per process* (a multiple of the dataset's block_rows); the global batch
    is batch_size x the number of training processes."""
    eval_batch_size: int | None = None
    """Rows per val/test batch (default: batch_size)."""
    loader_workers: int = 0
    """DataLoader worker processes per training process (not the training processes: --num-workers)."""
    shuffle: bool = True
    """Shuffle the training blocks across shards every epoch (seeded)."""
    seed: int | None = None
    """Shuffle seed; the same seed gives the same order on every run (default: the run's --seed)."""
    cache_dir: str | None = None
    """Root of the local shard caches (default: a temporary directory)."""
