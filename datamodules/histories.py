"""Per-user train histories: the bag of items each user had in train, looked up per batch by user id.

A prepared retrieval dataset stores them once per user (``histories.parquet``, listed in
``metadata.json: corpus.histories`` and described in ``metadata.json: history``), so storage grows with
the number of train interactions, never as rows x history length. In memory they are one CSR over
user indices (``offsets``, ``values``; memory-mapped from the corpus cache when loaded from a
dataset, see ``datamodules.corpus``); ``lookup`` gathers a batch's bags with tensor operations,
masking a training row's own item out of its user's bag (leave-one-out) instead of storing a copy
of the history per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor


@dataclass
class UserHistories:
    """CSR of item indices by user index: user ``u``'s items, oldest first, are
    ``values[offsets[u]:offsets[u + 1]]``; users without a train history (index 0 included) have none.
    ``values`` may be int32 (what a dataset's cache stores); lookups return int64."""

    offsets: torch.Tensor
    values: torch.Tensor

    @classmethod
    def from_table(cls, table: pd.DataFrame, num_users: int) -> UserHistories:
        """From ``histories.parquet`` rows (``user_id``, ``items``); ``num_users`` = user cardinality."""
        lengths = np.zeros(num_users, dtype=np.int64)
        users = table["user_id"].to_numpy(np.int64)
        lists = [np.asarray(x, dtype=np.int64) for x in table["items"]]
        order = np.argsort(users, kind="stable")
        lengths[users] = [len(x) for x in lists]
        values = np.concatenate([lists[i] for i in order]) if lists else np.zeros(0, np.int64)
        offsets = np.r_[0, np.cumsum(lengths)]
        return cls(torch.as_tensor(offsets), torch.as_tensor(values))

    @classmethod
    def from_lists(cls, bags: list[list[int]]) -> UserHistories:
        """Histories of users 0..len(bags)-1 given as item indices (oldest first)."""
        table = pd.DataFrame({"user_id": np.arange(len(bags), dtype=np.int64), "items": bags})
        return cls.from_table(table, len(bags))

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    def of(self, user: int) -> list[int]:
        """The items of one user index, oldest first."""
        lo, hi = int(self.offsets[user]), int(self.offsets[user + 1])
        return [int(v) for v in self.values[lo:hi]]

    def to(self, device: torch.device) -> UserHistories:
        if self.values.device == device:
            return self
        return UserHistories(self.offsets.to(device), self.values.to(device))

    def lookup(
        self,
        users: torch.Tensor,
        exclude: torch.Tensor | None = None,
        max_len: int = 0,
        dropout: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The bags of ``users`` (one user index per row) as (values, lengths).

        ``exclude``: one item index per row, masked out of that row's bag (a training row's own item);
        ``max_len`` > 0 keeps the most recent items of each bag; ``dropout`` drops each remaining item
        with that probability (training only). Users outside the table get empty bags.
        """
        device = users.device
        users = users.to(self.offsets.device).long()
        known = (users >= 0) & (users < self.num_users)
        safe = torch.where(known, users, torch.zeros_like(users))
        starts = self.offsets[safe]
        full = torch.where(known, self.offsets[safe + 1] - starts, torch.zeros_like(starts))
        row = torch.repeat_interleave(torch.arange(len(users), device=users.device), full)
        first = torch.cumsum(full, 0) - full
        position = torch.arange(int(full.sum()), device=users.device) - first[row]
        values = self.values[starts[row] + position].long()
        keep = torch.ones_like(values, dtype=torch.bool)
        if exclude is not None:
            keep &= values != exclude.to(values.device).long()[row]
        if max_len > 0:
            # rank of each kept item counted from the end of its bag (0 = most recent)
            kept = keep.long()
            inclusive = torch.cumsum(kept, 0)
            before_row = (inclusive - kept)[first.clamp(max=max(len(values) - 1, 0))] if len(values) else kept
            total = torch.zeros(len(users), dtype=torch.long, device=users.device).index_add_(0, row, kept)
            from_end = total[row] - (inclusive - before_row[row])
            keep &= from_end < max_len
        if dropout > 0:
            keep &= torch.rand(len(values), device=values.device) >= dropout
        lengths = torch.zeros(len(users), dtype=torch.int32, device=users.device).index_add_(
            0, row, keep.to(torch.int32)
        )
        return values[keep].to(device), lengths.to(device)


def with_feature(kjt: KeyedJaggedTensor, key: str, values: torch.Tensor, lengths: torch.Tensor) -> KeyedJaggedTensor:
    """``kjt`` with one more key appended (one bag per row of ``kjt``)."""
    extra = KeyedJaggedTensor.from_jt_dict({key: JaggedTensor(values=values, lengths=lengths)})
    return KeyedJaggedTensor.concat([kjt, extra])


def single_ids(kjt: KeyedJaggedTensor, key: str) -> torch.Tensor:
    """The id of every row in a single-hot feature of ``kjt``; rows whose bag is empty get index 0."""
    jt = kjt[key]
    lengths = jt.lengths()
    if len(jt.values()) == len(lengths):
        return jt.values()
    ids = torch.zeros(len(lengths), dtype=jt.values().dtype, device=jt.values().device)
    ids[lengths > 0] = jt.values()
    return ids
