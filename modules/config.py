"""Configuration of the models (architecture and objective) and of their optimizers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from core.errors import require


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. Table sizes and feature lists come from the dataset's metadata.json."""

    embedding_dim: int = 32
    """Dimension of every embedding table."""
    tower_layers: list[int] = field(default_factory=lambda: [128, 64])
    """two-tower: MLP sizes of each tower (the last is the output embedding size)."""
    item_tower_layers: list[int] | None = None
    """two-tower: MLP sizes of the item tower alone (None: ``tower_layers``); [] leaves an item its
    pooled features as they are (with ids-only towers: its id embedding, Mult-DAE's output layer),
    which the user tower's last size must then equal."""
    tower_activation: Literal["relu", "tanh"] = "relu"
    """two-tower: the nonlinearity between tower layers."""
    similarity: Literal["dot", "cosine"] = "dot"
    """two-tower: how user and item embeddings are compared."""
    temperature: float = 1.0
    """two-tower: logits = similarity / temperature."""
    loss: Literal["bce", "softmax", "full_softmax", "multinomial"] = "bce"
    """ranking models: bce (pointwise), or softmax: listwise, a softmax over each user's candidate list
    (needs the lists of ``recsys data candidates``). two-tower: pointwise BCE on the label; in-batch
    sampled softmax (positives only, log-Q corrected);
    full_softmax: each positive against every corpus item, all scored every batch (small corpora); or
    multinomial (needs ``history``): Mult-DAE's objective (Liang et al. 2018): a user, embedded from
    the whole train history (history dropout its only corruption: no leave-one-out), against every
    corpus item, with the summed log-likelihood of all the user's history items; each positive row is
    kept with probability 1 / its user's history length, so an epoch visits each user about once and
    a batch of B rows trains about B / (mean history length) users."""
    logq_correction: bool = True
    """two-tower softmax: subtract log(expected count of the candidate among the negatives) from its
    logit (the sampled-softmax / log-Q correction; with mixed negatives the count is that of the mixture)."""
    uniform_negatives: int = 0
    """two-tower softmax: corpus items sampled uniformly per batch and scored as extra negatives next
    to the in-batch ones (mixed negative sampling, Yang et al. 2020); 0 = in-batch negatives only."""
    tower_features: Literal["all", "ids"] = "all"
    """two-tower: all: each tower sees its side's sparse and dense features; ids: the user/item id only."""
    history: bool = False
    """two-tower: the user tower also reads the user's train history, a mean-pooled bag of items
    (``metadata.json: history``; a training row's own item is left out of its bag)."""
    history_table: Literal["own", "item"] = "own"
    """two-tower history: embed history items with a table of their own, or share the item tower's
    item-id table (then pooled by mean for both features)."""
    history_max_len: int = 0
    """two-tower history: keep only the most recent N items of a bag (0 = all)."""
    history_dropout: float = 0.0
    """two-tower history: drop each history item with this probability in training batches; a summed
    bag is rescaled by 1/(1-p) (sqrt: 1/sqrt(1-p)) so that training bags match evaluation ones in
    expectation (inverted dropout; a mean needs none)."""
    history_pooling: Literal["mean", "sum", "sqrt"] = "mean"
    """two-tower history: pool a bag's item embeddings by their mean, their sum, or their sum over
    sqrt(bag length) (the L2-normalised multi-hot input of Mult-DAE/Mult-VAE)."""
    history_leave_one_out: bool = True
    """two-tower history: a training row's own item is masked out of its bag; false: every training
    row reads its user's whole train history (with ``history_dropout``, the denoising objective of
    Mult-DAE: the row's item is hidden only when dropout drops it)."""
    user_id_in_tower: bool = True
    """two-tower: the user tower reads the user id; false: a user is their history and side features
    alone, so users unseen in training embed exactly like the others."""
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
    drop_features: list[str] = field(default_factory=list)
    """dlrm/dcn/deepfm: sparse features of the dataset the model does not read (no table), e.g.
    ``[user_id, item_id]`` for a ranker of candidates that should score by their features, not memorise ids."""

    def __post_init__(self) -> None:
        require(self.embedding_dim >= 1, f"--arch.embedding_dim: must be positive, got {self.embedding_dim}")
        require(self.temperature > 0, f"--arch.temperature: must be positive, got {self.temperature}")
        require(self.uniform_negatives >= 0, f"--arch.uniform_negatives: must be >= 0, got {self.uniform_negatives}")
        require(self.history_max_len >= 0, f"--arch.history_max_len: must be >= 0, got {self.history_max_len}")
        require(0 <= self.history_dropout < 1, f"--arch.history_dropout: must be in [0, 1), got {self.history_dropout}")
        require(
            self.history or self.user_id_in_tower or self.tower_features == "all",
            "--arch.user_id_in_tower false: the user tower needs --arch.history true or side features",
        )
        require(self.history or self.loss != "multinomial", "--arch.loss multinomial: needs --arch.history true")


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
