"""Plain TorchRec models, sized from a dataset's ``metadata.json``.

Every model takes ``(dense_features, sparse_features: KeyedJaggedTensor)``; all embedding tables
live in one ``EmbeddingBagCollection`` so the sharding planner places them freely. Tables are built
on the ``meta`` device (``build_model(..., device="meta")``) and materialised by sharding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from core.errors import RecsysError, require
from datamodules.schema import HISTORY_FEATURE, DatasetMetadata, history_files
from modules.config import ModelConfig


def table_configs(
    meta: DatasetMetadata,
    dim: int,
    history: str | None = None,
    history_pooling: str = "mean",
    drop: tuple[str, ...] = (),
) -> list[EmbeddingBagConfig]:
    """One table per sparse feature: ``cardinality`` rows (index 0 = out of vocabulary).

    ``history`` adds the multi-hot ``user_history`` feature (item indices, mean-pooled): with ``own``
    in a table of its own, with ``item`` read through the item-id table. Both are offered because
    they trade differently: an item as context (what a user had) and as target (what to recommend)
    may want different vectors -- FISM's two item matrices, YouTube DNN's watch embeddings -- which
    ``own`` allows (the default, the general choice); ``item`` halves the item parameters and lets
    the history and the item tower train the same rows, a regulariser on small data. On MovieLens-100K
    the shared table was the better of the two on validation (docs/HISTORY.md), so the preset shares.
    A shared table pools by mean, which leaves the single-hot item id as it is. ``history_pooling``
    ``sum`` or ``sqrt`` pools the history by sum (the model divides ``sqrt`` bags by sqrt(length)).
    Features in ``drop`` get no table: the model does not read them (the batches still carry them).
    """
    history_mean = history_pooling == "mean"
    item_key = meta.item_id_feature or "item_id"
    configs = []
    for f in meta.sparse_features:
        if f.name in drop:
            continue
        names = [f.name]
        mean = f.multi_hot
        if history == "item" and f.name == item_key:
            names, mean = [f.name, HISTORY_FEATURE], history_mean
        configs.append(
            EmbeddingBagConfig(
                name=f"t_{f.name}",
                embedding_dim=dim,
                num_embeddings=f.cardinality,
                feature_names=names,
                pooling=PoolingType.MEAN if mean else PoolingType.SUM,
            )
        )
    if history == "own":
        configs.append(
            EmbeddingBagConfig(
                name=f"t_{HISTORY_FEATURE}",
                embedding_dim=dim,
                num_embeddings=meta.feature(item_key).cardinality,
                feature_names=[HISTORY_FEATURE],
                pooling=PoolingType.MEAN if history_mean else PoolingType.SUM,
            )
        )
    return configs


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


def mlp(in_size: int, sizes: list[int], last_activation: bool = True, activation: str = "relu") -> nn.Sequential:
    """Linear layers with ``activation`` between them (and after the last one unless told otherwise)."""
    layers: list[nn.Module] = []
    for i, size in enumerate(sizes):
        layers.append(nn.Linear(in_size, size))
        if last_activation or i < len(sizes) - 1:
            layers.append(ACTIVATIONS[activation]())
        in_size = size
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class TowerSpec:
    """Which sparse features (by name) and dense columns (by position) feed a tower."""

    sparse: tuple[str, ...]
    dense: tuple[int, ...]


class TwoTower(nn.Module):
    """User and item towers over shared-collection embeddings; ``forward`` returns both embeddings.

    Each tower concatenates its features' pooled embeddings with its dense features and applies an
    MLP whose last layer is linear; ``cosine`` similarity L2-normalises the outputs. The sum-pooled
    embeddings of the features in ``sqrt_pooled`` are divided by the square root of their bag's length;
    ``bag_scale`` multiplies the history's pooled embedding in training (inverted dropout: the task
    drops history items, so a summed training bag would be smaller than the evaluation one).
    """

    def __init__(
        self,
        ebc: EmbeddingBagCollection,
        user: TowerSpec,
        item: TowerSpec,
        layers: list[int],
        cosine: bool,
        activation: str = "relu",
        sqrt_pooled: tuple[str, ...] = (),
        bag_scale: float = 1.0,
        item_layers: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.ebc = ebc
        self.user_spec, self.item_spec = user, item
        dim = ebc.embedding_bag_configs()[0].embedding_dim
        item_in = dim * len(item.sparse) + len(item.dense)
        item_layers = layers if item_layers is None else item_layers
        user_out, item_out = (layers or [dim * len(user.sparse) + len(user.dense)])[-1], (item_layers or [item_in])[-1]
        if user_out != item_out:
            raise RecsysError(f"two-tower: the user tower gives {user_out} numbers, the item tower {item_out}")
        self.out_dim = user_out
        """Numbers in a user or item vector (what full-corpus evaluation and the index hold per item)."""
        self.user_mlp = mlp(dim * len(user.sparse) + len(user.dense), layers, False, activation)
        self.item_mlp = mlp(item_in, item_layers, False, activation)
        self.cosine = cosine
        self.sqrt_pooled = sqrt_pooled
        self.bag_scale = bag_scale

    def _pool(self, sparse_features: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        pooled = self.ebc(sparse_features).to_dict()
        for name in self.sqrt_pooled:
            lengths = sparse_features[name].lengths().clamp(min=1).to(pooled[name].dtype)
            pooled[name] = pooled[name] / lengths.sqrt().unsqueeze(1)
        if self.training and self.bag_scale != 1.0 and HISTORY_FEATURE in pooled:
            pooled[HISTORY_FEATURE] = pooled[HISTORY_FEATURE] * self.bag_scale
        return pooled

    def _tower(
        self, pooled: dict[str, torch.Tensor], dense: torch.Tensor, spec: TowerSpec, net: nn.Module
    ) -> torch.Tensor:
        parts = [pooled[name] for name in spec.sparse]
        if spec.dense:
            parts.append(dense[:, list(spec.dense)])
        out = net(torch.cat(parts, dim=1))
        return nn.functional.normalize(out, dim=1) if self.cosine else out

    def forward(
        self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self._pool(sparse_features)
        user = self._tower(pooled, dense_features, self.user_spec, self.user_mlp)
        item = self._tower(pooled, dense_features, self.item_spec, self.item_mlp)
        return user, item

    def embed(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor, tower: str) -> torch.Tensor:
        """The embeddings of one tower (``user`` or ``item``) alone: the other tower's inputs may be empty."""
        pooled = self._pool(sparse_features)
        if tower == "user":
            return self._tower(pooled, dense_features, self.user_spec, self.user_mlp)
        return self._tower(pooled, dense_features, self.item_spec, self.item_mlp)


class DeepFM(nn.Module):
    """DeepFM: a first-order term, a factorisation machine over the field embeddings and an MLP.

    Written from torchrec building blocks rather than ``torchrec.models.deepfm.SimpleDeepFMNN``
    because that model ends in a Sigmoid; the training loss wants logits (numerically stable BCE).
    The dense features enter as one more field, projected to the embedding dimension.
    """

    def __init__(self, ebc: EmbeddingBagCollection, num_dense: int, hidden: list[int]) -> None:
        super().__init__()
        self.ebc = ebc
        configs = ebc.embedding_bag_configs()
        dim = configs[0].embedding_dim
        self.names = [n for c in configs for n in c.feature_names]
        self.num_dense = num_dense
        self.dense_proj = nn.Linear(max(num_dense, 1), dim)
        fields = len(self.names) + 1
        self.first_order = nn.Linear(max(num_dense, 1) + fields * dim, 1)
        self.deep = mlp(fields * dim, [*hidden, 1], last_activation=False)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        dense = dense_features if self.num_dense else dense_features.new_zeros(dense_features.shape[0], 1)
        pooled = self.ebc(sparse_features).to_dict()
        fields = torch.stack([self.dense_proj(dense), *[pooled[n] for n in self.names]], dim=1)  # B x F x D
        square_of_sum = fields.sum(dim=1).pow(2)
        sum_of_square = fields.pow(2).sum(dim=1)
        fm = 0.5 * (square_of_sum - sum_of_square).sum(dim=1, keepdim=True)
        flat = fields.flatten(1)
        return self.first_order(torch.cat([dense, flat], dim=1)) + fm + self.deep(flat)


class DenseOrZero(nn.Module):
    """Adapter for datasets without dense features: DLRM's dense arch then sees one zero column."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        return self.model(dense_features.new_zeros(dense_features.shape[0], 1), sparse_features)


def tower_spec(meta: DatasetMetadata, tower: str, ids_only: bool = False) -> TowerSpec:
    """The features of one tower: all of its side's, or (``ids_only``) just its id feature."""
    if ids_only:
        name = meta.user_id_feature if tower == "user" else meta.item_id_feature
        return TowerSpec(sparse=(name,) if name else (), dense=())
    return TowerSpec(
        sparse=tuple(f.name for f in meta.sparse_features if f.tower == tower),
        dense=tuple(i for i, d in enumerate(meta.dense_features) if d.tower == tower),
    )


def history_table(meta: DatasetMetadata, cfg: ModelConfig) -> str | None:
    """How the model embeds ``user_history`` (``--arch.history_table``), or None without history; a
    dataset prepared without histories is one line here."""
    if not cfg.history:
        return None
    history_files(meta)
    return cfg.history_table


def new_collection(
    meta: DatasetMetadata, cfg: ModelConfig, device: str | torch.device, drop: tuple[str, ...] = ()
) -> EmbeddingBagCollection:
    """One EmbeddingBagCollection with a table per sparse feature of the dataset (and, with
    ``--arch.history``, the history feature's, see ``table_configs``; ``drop``: features left out), on ``device``."""
    tables = table_configs(meta, cfg.embedding_dim, history_table(meta, cfg), cfg.history_pooling, drop)
    return EmbeddingBagCollection(tables=tables, device=torch.device(device))


def ranking_collection(meta: DatasetMetadata, cfg: ModelConfig, device: str | torch.device) -> EmbeddingBagCollection:
    """The tables of a ranking model: every sparse feature is one more field of its interaction, the
    history (``--arch.history``) a mean-pooled multi-hot one beside them."""
    require(
        not cfg.history or (cfg.history_pooling == "mean" and cfg.history_leave_one_out),
        "ranking models read the history mean-pooled and leave-one-out "
        "(--arch.history_pooling mean, --arch.history_leave_one_out true)",
    )
    names = [f.name for f in meta.sparse_features]
    unknown = [n for n in cfg.drop_features if n not in names]
    require(not unknown, f"--arch.drop_features: dataset {meta.dataset!r} has no feature {', '.join(unknown)}")
    drop = tuple(cfg.drop_features)
    require(
        not (cfg.history and cfg.history_table == "item" and (meta.item_id_feature or "item_id") in drop),
        "--arch.drop_features: the history reads the item id table (--arch.history_table item); keep the item id",
    )
    require(len(drop) < len(names) or cfg.history, "--arch.drop_features: the model would read no sparse feature")
    return new_collection(meta, cfg, device, drop)


def build_two_tower(meta: DatasetMetadata, cfg: ModelConfig, device: str | torch.device = "meta") -> nn.Module:
    """A two-tower model; the towers read their side's features (or only the ids), the user tower
    also the user's train history (``--arch.history``) and, unless told otherwise, the user id."""
    ids_only = cfg.tower_features == "ids"
    user, item = tower_spec(meta, "user", ids_only), tower_spec(meta, "item", ids_only)
    if not cfg.user_id_in_tower:
        user = dataclasses.replace(user, sparse=tuple(n for n in user.sparse if n != meta.user_id_feature))
    if cfg.history:
        user = dataclasses.replace(user, sparse=(*user.sparse, HISTORY_FEATURE))
    ebc = new_collection(meta, cfg, device)
    sqrt_pooled = (HISTORY_FEATURE,) if cfg.history and cfg.history_pooling == "sqrt" else ()
    # inverted dropout: E[sum of kept items] = (1-p) sum; a sum over sqrt(kept length) ~ sqrt(1-p) x
    keep = 1.0 - cfg.history_dropout
    bag_scale = {"mean": 1.0, "sum": 1.0 / keep, "sqrt": keep**-0.5}[cfg.history_pooling] if cfg.history else 1.0
    cosine = cfg.similarity == "cosine"
    item_layers = None if cfg.item_tower_layers is None else list(cfg.item_tower_layers)
    layers = list(cfg.tower_layers)
    return TwoTower(ebc, user, item, layers, cosine, cfg.tower_activation, sqrt_pooled, bag_scale, item_layers)


def build_deepfm(meta: DatasetMetadata, cfg: ModelConfig, device: str | torch.device = "meta") -> nn.Module:
    """DeepFM over every sparse feature (and the history) plus the dense ones as one field."""
    return DeepFM(ranking_collection(meta, cfg, device), len(meta.dense_features), list(cfg.deepfm_hidden))


def build_dlrm(meta: DatasetMetadata, cfg: ModelConfig, device: str | torch.device = "meta") -> nn.Module:
    """torchrec's DLRM (dot interaction)."""
    from torchrec.models.dlrm import DLRM

    return _with_dense(
        meta, lambda dense_in, dense, over: DLRM(ranking_collection(meta, cfg, device), dense_in, dense, over), cfg
    )


def build_dcn(meta: DatasetMetadata, cfg: ModelConfig, device: str | torch.device = "meta") -> nn.Module:
    """torchrec's DLRM_DCN (low-rank DCN-v2 cross layers as the interaction)."""
    from torchrec.models.dlrm import DLRM_DCN

    def make(dense_in: int, dense: list[int], over: list[int]) -> nn.Module:
        ebc = ranking_collection(meta, cfg, device)
        return DLRM_DCN(ebc, dense_in, dense, over, cfg.dcn_layers, cfg.dcn_low_rank)

    return _with_dense(meta, make, cfg)


def _with_dense(meta: DatasetMetadata, make: Any, cfg: ModelConfig) -> nn.Module:
    """A DLRM-family model; datasets without dense features feed its dense arch one zero column."""
    num_dense = len(meta.dense_features)
    dense_arch = [*cfg.dense_arch, cfg.embedding_dim]  # DLRM's dense arch must end in the embedding dimension
    model: nn.Module = make(max(num_dense, 1), dense_arch, [*cfg.over_arch, 1])
    return model if num_dense else DenseOrZero(model)
