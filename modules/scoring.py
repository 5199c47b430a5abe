"""Plain scoring modules around an unsharded model: what is packaged into MLflow."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class RankingScorer(nn.Module):
    """``(dense_features, sparse_features) -> probability`` of a ranking model (DLRM, DCN, DeepFM)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, dense_features: torch.Tensor, sparse_features: Any) -> torch.Tensor:
        return torch.sigmoid(self.model(dense_features, sparse_features).squeeze(-1))


class PairScorer(nn.Module):
    """``(dense_features, sparse_features) -> probability`` of each (user, item) row for a two-tower model."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature

    def forward(self, dense_features: torch.Tensor, sparse_features: Any) -> torch.Tensor:
        user, item = self.model(dense_features, sparse_features)
        return torch.sigmoid((user * item).sum(-1) / self.temperature)
