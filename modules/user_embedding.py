"""Embedding users and items with a trained two-tower model outside training.

A user tower that reads the user's history (``--arch.history true``) can embed a user it never saw
in training from the items they had, without retraining: ``embed_users_from_items``. Users unknown
to the model have no id and no side features, so those inputs are empty bags (zero vectors, the
neutral input; the out-of-vocabulary row was never trained) and dense features sit at their train
mean. Train with ``--arch.user_id_in_tower false`` for such users to embed like the training ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from core.errors import RecsysError
from datamodules.corpus import tower_inputs
from datamodules.histories import UserHistories, with_feature
from datamodules.schema import HISTORY_FEATURE, DatasetMetadata, read_vocab


def item_vocabulary(path: str | Path, meta: DatasetMetadata) -> dict[str, int]:
    """Raw item id -> item index, from a prepared dataset's train vocabulary."""
    vocab = read_vocab(path, meta.feature(meta.item_id_feature or "item_id"))
    return {raw: i + 1 for i, raw in enumerate(vocab)}


def _reads_history(model: nn.Module) -> bool:
    spec = getattr(model, "user_spec", None)
    return spec is not None and HISTORY_FEATURE in spec.sparse


@torch.no_grad()
def embed_users_from_items(
    model: nn.Module,
    meta: DatasetMetadata,
    item_index: dict[str, int],
    histories: Sequence[Sequence[str]],
    max_len: int = 0,
) -> torch.Tensor:
    """User-tower embeddings of users given only the raw ids of items they had (oldest first).

    ``model`` is a plain (unsharded) two-tower model trained with ``--arch.history true``;
    ``item_index`` maps raw item ids to indices (``item_vocabulary``); items unknown to the dataset are
    ignored; ``max_len`` > 0 keeps the most recent items (use the run's ``--arch.history_max_len``).
    """
    if not _reads_history(model):
        raise RecsysError("embedding users from items needs a two-tower model trained with --arch.history true")
    bags = [[item_index[str(i)] for i in items if str(i) in item_index] for items in histories]
    n = len(bags)
    dense, kjt = tower_inputs(pd.DataFrame(index=range(n)), meta)  # no user features: empty bags
    values, lengths = UserHistories.from_lists(bags).lookup(torch.arange(n), max_len=max_len)
    device = next(model.parameters()).device
    kjt = with_feature(kjt, HISTORY_FEATURE, values, lengths)
    user, _ = model.eval()(dense.to(device), kjt.to(device))
    return user.float().cpu()


@torch.no_grad()
def embed_items(model: nn.Module, meta: DatasetMetadata, items: pd.DataFrame) -> torch.Tensor:
    """Item-tower embeddings of ``items.parquet`` rows (any two-tower model, plain)."""
    dense, kjt = tower_inputs(items, meta)
    if _reads_history(model):
        n = len(items)
        kjt = with_feature(kjt, HISTORY_FEATURE, torch.zeros(0, dtype=torch.long), torch.zeros(n, dtype=torch.int32))
    device = next(model.parameters()).device
    _, item = model.eval()(dense.to(device), kjt.to(device))
    return item.float().cpu()
