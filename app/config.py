"""``RunConfig``: the one typed object that flows from the command line to every layer of a training run.

Each section lives next to what builds it (``DataConfig`` in ``datamodules/``, ``ModelConfig`` and
``OptimConfig`` in ``modules/``, ``ClusterConfig`` in ``cluster/``); this module only composes them
with the sections the recipe itself owns (the Lightning loop and MLflow tracking). Unknown keys are
an error (jsonargparse rejects them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.config import ClusterConfig
from datamodules.config import DataConfig
from modules.config import ModelConfig, OptimConfig


@dataclass(frozen=True)
class TrainerConfig:
    """The Lightning loop."""

    max_epochs: int = 5
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: no limit)."""
    limit_val_batches: float = 1.0
    """Share (<= 1.0) or number of val batches per epoch; 0 switches validation off: no early stopping
    and no best epoch, the last epoch is tested and published."""
    seed: int = 0
    """Seeds the weights and, unless --data.seed is set, the data order."""
    monitor: str | None = None
    """Validation metric for early stopping and the best checkpoint (default: the model kind's, e.g.
    val/auroc, or val/ndcg_at_K for two-tower)."""
    patience: int = 3
    """Early stopping patience in epochs (0 disables early stopping)."""
    k: int = 10
    """Cut-off of Recall@K / NDCG@K."""
    eval_users: int = 0
    """Full-corpus Recall@K / NDCG@K over a sample of this many users, drawn with --seed (the same every
    epoch; logged as SPLIT/eval_users of SPLIT/eval_users_total); 0: every user with a positive in the
    split."""
    eval_block_memory: str = "256MiB"
    """Memory of one block of the full-corpus evaluation: the block's users x every item's float32
    scores (users per block = this / (4 bytes x items))."""
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
    """Default: MODEL-YYYYmmdd-HHMMSS-XXXX (distinct for every run)."""
    enabled: bool = True
    tags: dict[str, str] = field(default_factory=dict)
    """The user's own run tags (``recsys train --tag team=search --tag ...``), beside recsys's own."""
    preset: str | None = None
    """The ``--config`` preset the run started from (set by the CLI): tagged by its file name."""
    description: str | None = None
    """The run's description in MLflow (default: the preset's leading comment)."""


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
    verbose: bool = False
    """Show the libraries' warnings and info lines (planner, deprecations, Lightning's notices)."""
