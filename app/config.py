"""Typed, frozen configuration: the one object that flows from the command line to every layer.

Each builder receives only its own slice (``PrepareConfig`` for data preparation, ``DataConfig`` for
the streaming DataModule, ...). Unknown keys are an error (jsonargparse rejects them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from core.errors import require

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
    chunk_rows: int = 262144
    """Rows generated per chunk: peak memory depends on this, not on --rows."""


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
    overwrite: bool = False
    """Replace an existing output directory."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class DataConfig:
    """The streaming DataModule over a prepared dataset."""

    path: str
    """Prepared dataset directory, local path or any remote URL StreamingDataset supports."""
    batch_size: int = 4096
    """Rows per training batch (a multiple of the dataset's block_rows)."""
    eval_batch_size: int | None = None
    """Rows per val/test batch (default: batch_size)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    shuffle: bool = True
    """Shuffle the training blocks across shards every epoch (seeded)."""
    seed: int = 0
    """Shuffle seed; the same seed gives the same order on every run."""
    cache_dir: str | None = None
    """Root of the local shard caches (default: a temporary directory)."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. Table sizes and feature lists come from the dataset's metadata.json."""

    embedding_dim: int = 32
    """Dimension of every embedding table."""
    tower_layers: list[int] = field(default_factory=lambda: [128, 64])
    """two-tower: MLP sizes of each tower (the last is the output embedding size)."""
    similarity: Literal["dot", "cosine"] = "dot"
    """two-tower: how user and item embeddings are compared."""
    temperature: float = 1.0
    """two-tower: logits = similarity / temperature."""
    loss: Literal["bce", "softmax"] = "bce"
    """two-tower: pointwise BCE on the label, or in-batch sampled softmax (positives only, log-Q corrected)."""
    logq_correction: bool = True
    """two-tower softmax: subtract log(expected count of the candidate among the negatives) from its
    logit (the sampled-softmax / log-Q correction; with mixed negatives the count is that of the mixture)."""
    uniform_negatives: int = 0
    """two-tower softmax: corpus items sampled uniformly per batch and scored as extra negatives next
    to the in-batch ones (mixed negative sampling, Yang et al. 2020); 0 = in-batch negatives only."""
    tower_features: Literal["all", "ids"] = "all"
    """two-tower: all: each tower sees its side's sparse and dense features; ids: the user/item id only."""
    dense_arch: list[int] = field(default_factory=lambda: [64])
    """dlrm/dcn: dense MLP hidden sizes (the embedding dimension is appended)."""
    over_arch: list[int] = field(default_factory=lambda: [128, 64])
    """dlrm/dcn: over-arch hidden sizes (the output logit is appended)."""
    dcn_layers: int = 3
    """dcn: cross layers."""
    dcn_low_rank: int = 16
    """dcn: rank of each cross layer."""
    deepfm_hidden: list[int] = field(default_factory=lambda: [128, 64])
    """deepfm: deep-part MLP hidden sizes."""

    def __post_init__(self) -> None:
        require(self.embedding_dim >= 1, f"--arch.embedding_dim: must be positive, got {self.embedding_dim}")
        require(self.temperature > 0, f"--arch.temperature: must be positive, got {self.temperature}")
        require(self.uniform_negatives >= 0, f"--arch.uniform_negatives: must be >= 0, got {self.uniform_negatives}")


@dataclass(frozen=True)
class OptimConfig:
    """Embedding tables: a fused in-backward sparse optimizer; the rest: a dense optimizer."""

    sparse: Literal["rowwise_adagrad", "adagrad", "sgd", "adam"] = "rowwise_adagrad"
    sparse_lr: float = 0.05
    dense: Literal["adam", "adagrad", "sgd"] = "adam"
    dense_lr: float = 1e-3
    weight_decay: float = 0.0
    """L2 penalty of the dense optimizer (MLP weights)."""

    def __post_init__(self) -> None:
        require(self.sparse_lr > 0, f"--optim.sparse_lr: must be positive, got {self.sparse_lr}")
        require(self.dense_lr > 0, f"--optim.dense_lr: must be positive, got {self.dense_lr}")
        require(self.weight_decay >= 0, f"--optim.weight_decay: must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True)
class TrainerConfig:
    """The Lightning loop."""

    max_epochs: int = 5
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: no limit)."""
    limit_val_batches: float = 1.0
    seed: int = 0
    monitor: str | None = None
    """Validation metric for early stopping and the best checkpoint (default: val/auroc, or
    val/ndcg_at_K for two-tower)."""
    patience: int = 3
    """Early stopping patience in epochs (0 disables early stopping)."""
    k: int = 10
    """Cut-off of Recall@K / NDCG@K."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    progress_bar: bool = True
    log_every_n_steps: int = 50
    output_dir: str = "runs"
    """Where checkpoints are written (one sub-directory per run)."""
    resume_from: str | None = None
    """A checkpoint directory to resume from."""


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking."""

    tracking_uri: str | None = None
    """Any MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)."""
    experiment: str = "recsys"
    run_name: str | None = None
    enabled: bool = True


@dataclass(frozen=True)
class ClusterConfig:
    """Where the training processes run (resolved in cluster/ only)."""

    backend: Literal["local", "ray", "spark"] = "local"
    num_workers: int = 1
    """Training processes (one per GPU on a GPU host)."""
    use_gpu: bool = False
    cpus_per_worker: int = 1
    """ray: CPUs reserved for each training worker."""
    ray_address: str | None = None
    """ray: address of a running cluster (host:port or ray://...); default: the cluster of the Ray job
    this runs in, else a local Ray started for the run."""
    max_failures: int = 2
    """ray: restarts of the worker group (from the last reported checkpoint) before giving up."""
    storage_path: str = "runs/ray"
    """ray: where Ray Train keeps run state and reported checkpoints."""
    spark_master: str | None = None
    """spark: master URL (default local[num_workers])."""
    spark_local_mode: bool = True
    """spark: True runs the processes on the driver; False runs them as barrier tasks on executors."""


@dataclass(frozen=True)
class RunConfig:
    """``recsys train``: everything one training run needs."""

    model: str
    """two-tower, dlrm, dcn or deepfm."""
    data: DataConfig
    arch: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
