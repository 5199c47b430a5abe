"""Full-corpus Recall@K and NDCG@K, streamed over blocks of users.

A block of users is scored against every corpus item at once (a ``block x items`` matrix: the memory
of the evaluation is the item vectors plus one block, never ``users x items``), the items each user
had in train are set to -inf by scatter, and only each row's top K is kept (``torch.topk``), the way
RecBole's full-sort evaluation works. Hand-written rather than torchmetrics' retrieval metrics: those
take one (query, item, score) triple per element, i.e. users x items entries, where a top-k per block
is enough.

The definitions: a user is evaluated when they have a positive (label 1) pair in the split; their
relevant items are those positives; relevant items outside the corpus (unseen in train) cannot be
ranked and count as misses; Recall@K = hits / relevant, NDCG@K = DCG@K / the ideal DCG of min(K,
relevant) hits; both are means over users. ``block_sums`` returns sums, so that blocks and processes
add up (``RetrievalTask.retrieval_metrics`` all-reduces them).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torchmetrics

from datamodules.corpus import UserItems

SCORE_BYTES = 4
"""float32 scores and vectors."""
CURVE_CUTOFFS = 100
"""The test split of a retrieval run is also measured at every K = 1..100 (the run's Recall/NDCG-at-K curve)."""


def block_users(n_items: int, budget_bytes: int) -> int:
    """Users per block whose ``block x items`` scores fit ``budget_bytes`` (at least one)."""
    return max(1, budget_bytes // (SCORE_BYTES * max(n_items, 1)))


def memory_needed(n_items: int, dim: int, block: int) -> int:
    """Bytes one process's evaluation holds at once: every item's vector and one block's scores and
    user vectors (the few top-K and index arrays beside them are left out)."""
    return SCORE_BYTES * (n_items * dim + block * (n_items + dim))


def item_columns(corpus_ids: np.ndarray, cardinality: int) -> torch.Tensor:
    """The column of each item id among the corpus items (-1: not in the corpus)."""
    column = torch.full((cardinality,), -1, dtype=torch.long)
    column[torch.as_tensor(np.array(corpus_ids, dtype=np.int64))] = torch.arange(len(corpus_ids))
    return column


def _rows_of(lengths: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.repeat_interleave(
        torch.arange(len(lengths), device=device), torch.as_tensor(lengths, device=device, dtype=torch.long)
    )


def discount_tables(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``1 / log2(rank + 2)`` for ranks 0..k-1 and the ideal DCG of 1..k hits (index 0: one hit), in
    float64, summed term by term as the per-user loop they replace did."""
    discounts = [1.0 / math.log2(r + 2) for r in range(k)]
    ideal = [sum(discounts[: m + 1]) for m in range(k)]
    return torch.tensor(discounts, dtype=torch.float64), torch.tensor(ideal, dtype=torch.float64)


def block_sums(
    scores: torch.Tensor,
    seen: tuple[np.ndarray, np.ndarray],
    relevant: tuple[np.ndarray, np.ndarray],
    column: torch.Tensor,
    k: int,
) -> tuple[float, float]:
    """Sums over a block of users of Recall@K and NDCG@K (``block_curve_sums`` at ``k`` alone).

    ``scores``: block x items (changed in place: seen items become -inf); ``seen``, ``relevant``:
    (lengths, item ids) of each row's user, as ``UserItems.gather`` gives them; ``column``: each item
    id's column (``item_columns``).
    """
    recall, ndcg = block_curve_sums(scores, seen, relevant, column, k)
    return float(recall[-1]), float(ndcg[-1])


def block_curve_sums(
    scores: torch.Tensor,
    seen: tuple[np.ndarray, np.ndarray],
    relevant: tuple[np.ndarray, np.ndarray],
    column: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over a block of users of Recall@K and NDCG@K for every K = 1..k (float64 tensors of length
    k; index K-1 holds the cut-off K), from one top-k per row: a curve costs no more than its last point.
    Arguments as ``block_sums``."""
    device = scores.device
    n_items = scores.shape[1]
    column = column.to(device)
    lengths, items = seen
    cols = column[torch.as_tensor(items, device=device)]
    rows = _rows_of(lengths, device)
    inside = cols >= 0
    scores[rows[inside], cols[inside]] = -math.inf
    lengths, items = relevant
    cols = column[torch.as_tensor(items, device=device)]
    rows = _rows_of(lengths, device)
    inside = cols >= 0
    # relevant corpus items once each; relevant items outside the corpus each count as a miss
    keys = torch.unique(rows[inside] * n_items + cols[inside])
    n_rel = torch.bincount(keys // n_items, minlength=len(scores)) + torch.bincount(
        rows[~inside], minlength=len(scores)
    )
    top = torch.topk(scores, k=min(k, n_items), dim=1).indices
    hits = torch.zeros(len(scores), k, dtype=torch.float64, device=device)  # past the corpus: no hit
    hits[:, : top.shape[1]] = torch.isin(torch.arange(len(scores), device=device).unsqueeze(1) * n_items + top, keys)
    discounts, ideal = (t.to(device) for t in discount_tables(k))
    cutoffs = torch.arange(1, k + 1, device=device)
    recall = hits.cumsum(1) / n_rel.unsqueeze(1)
    best = torch.minimum(n_rel.clamp(min=1).unsqueeze(1), cutoffs.unsqueeze(0)) - 1
    ndcg = (hits * discounts).cumsum(1) / ideal[best]
    return recall.sum(0).cpu(), ndcg.sum(0).cpu()


def corpus_metrics(
    scores: torch.Tensor, users: list[int], items: list[int], train: pd.DataFrame, target: pd.DataFrame, k: int
) -> tuple[float, float]:
    """Mean Recall@K / NDCG@K of a dense score matrix (rows ``users``, columns ``items``), for scorers
    that produce one (the baselines): the same sums as the streamed evaluation, over one block.

    Items a user interacted with in ``train`` are excluded; the relevant items are the user's
    positives (label 1) in ``target``; relevant items outside the corpus count as misses.
    """
    if not users:
        return 0.0, 0.0
    cardinality = max(max(items, default=0), _largest(train.item_id), _largest(target.item_id)) + 1
    n_users = max(max(users), _largest(train.user_id), _largest(target.user_id)) + 1
    positives = target[target.label > 0.5]
    seen = UserItems.from_pairs(train.user_id.to_numpy(), train.item_id.to_numpy(), n_users)
    relevant = UserItems.from_pairs(positives.user_id.to_numpy(), positives.item_id.to_numpy(), n_users)
    picked = np.asarray(users, dtype=np.int64)
    recall, ndcg = block_sums(
        scores.clone(), seen.gather(picked), relevant.gather(picked), item_columns(np.asarray(items), cardinality), k
    )
    return recall / len(users), ndcg / len(users)


def _largest(ids: pd.Series) -> int:
    return int(ids.max()) if len(ids) else 0


class ScoreHistogram(torchmetrics.Metric):
    """Predicted probabilities binned on [0, 1]: per bin, how many negatives and positives fell there and
    their summed probability. Fixed-size sums (synced across ranks by torchmetrics), so the calibration
    curve and the score histogram of a ranking run cost the same memory at any test-set size; torchmetrics
    computes calibration *errors* (``BinaryCalibrationError``), not the curve, so this keeps the bins."""

    full_state_update = False
    counts: torch.Tensor
    score_sums: torch.Tensor

    def __init__(self, bins: int = 20) -> None:
        super().__init__()
        self.bins = bins
        self.add_state("counts", default=torch.zeros(2, bins, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("score_sums", default=torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        probs = probs.detach().double().clamp(0.0, 1.0)
        which = (probs * self.bins).long().clamp(max=self.bins - 1)
        positive = (labels > 0.5).long()
        self.counts.index_put_((positive, which), torch.ones_like(probs), accumulate=True)
        self.score_sums.index_add_(0, which, probs)

    def compute(self) -> dict[str, list[float]]:
        """``edges`` (bins + 1), per bin ``negatives`` and ``positives`` (counts) and ``mean_score``
        (NaN in an empty bin)."""
        total = self.counts.sum(0)
        return {
            "edges": torch.linspace(0.0, 1.0, self.bins + 1).tolist(),
            "negatives": self.counts[0].tolist(),
            "positives": self.counts[1].tolist(),
            "mean_score": (self.score_sums / total).tolist(),
        }
