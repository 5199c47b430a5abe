"""The retrieval corpus of a prepared dataset: the train users and items with their encoded features
(``users.parquet``, ``items.parquet``), the (user_id, item_id, label) pairs of every split and each
user's train history (``histories.parquet``, see ``datamodules.histories``).

The files are part of the dataset's schema (``DatasetMetadata.corpus``) and are read from a local
directory or fetched from any remote StreamingDataset supports (``s3://``, ``gs://``, ...) alike.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from core.errors import RecsysError
from datamodules.histories import UserHistories
from datamodules.schema import SPLITS, DatasetMetadata, corpus_files, history_files
from datamodules.storage import fetch_file, is_remote


@dataclass
class RetrievalCorpus:
    """What full-corpus evaluation and corpus negatives need, read from a prepared retrieval dataset."""

    items: pd.DataFrame
    users: pd.DataFrame
    pairs: dict[str, pd.DataFrame]
    item_log_q: torch.Tensor
    """log of each item's share of train positives (index = item id), for the log-Q correction."""
    histories: UserHistories | None = None
    """Each user's train items (index = user id); None for datasets prepared without them."""

    @classmethod
    def load(cls, path: str | Path, meta: DatasetMetadata, cache: str | Path | None = None) -> RetrievalCorpus:
        """Read the corpus of the dataset at ``path`` (remote files are fetched into ``cache``)."""
        files = corpus_files(meta)
        root = str(path)

        def table(relative: list[str]) -> pd.DataFrame:
            return read_parquet(root, relative, cache)

        pairs = {s: table(files["pairs"][s]) for s in SPLITS}
        n_items = meta.feature(meta.item_id_feature or "item_id").cardinality
        train = pairs["train"]
        pos = train[train.label > 0.5]
        counts = np.bincount(pos.item_id.to_numpy(), minlength=n_items).astype(np.float64) + 1.0
        log_q = torch.tensor(np.log(counts / counts.sum()), dtype=torch.float32)
        histories = load_histories(path, meta, cache) if meta.history else None
        return cls(table(files["items"]), table(files["users"]), pairs, log_q, histories)


def load_histories(path: str | Path, meta: DatasetMetadata, cache: str | Path | None = None) -> UserHistories:
    """The users' train histories of the dataset at ``path`` alone (what a ranking model reading them
    needs); a dataset prepared without them is one line."""
    n_users = meta.feature(meta.user_id_feature or "user_id").cardinality
    return UserHistories.from_table(read_parquet(str(path), history_files(meta), cache), n_users)


def read_parquet(root: str, relative: list[str], cache: str | Path | None) -> pd.DataFrame:
    """One table from its Parquet files (a file, or the part files a Spark writer left) under ``root``."""
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


def tower_inputs(table: pd.DataFrame, meta: DatasetMetadata) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    """Dense matrix and KJT (all dataset keys) for rows of users.parquet / items.parquet.

    Features the table lacks (the other tower's) get empty bags and zero dense values.
    """
    n = len(table)
    dense = torch.zeros(n, len(meta.dense_features))
    for j, d in enumerate(meta.dense_features):
        if d.name in table.columns:
            dense[:, j] = torch.as_tensor(table[d.name].to_numpy(np.float32))
    values, lengths = [], []
    for f in meta.sparse_features:
        if f.name not in table.columns:
            lengths.append(torch.zeros(n, dtype=torch.int32))
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
            values.append(torch.as_tensor(table[f.name].to_numpy(np.int64)))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in meta.sparse_features],
        values=torch.cat(values) if values else torch.zeros(0, dtype=torch.int64),
        lengths=torch.cat(lengths),
    )
    return dense, kjt
