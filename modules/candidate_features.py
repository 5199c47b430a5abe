"""The candidate features of the funnel's ranking stage: what a ranker trained on the retrieval stage's
own candidates (``recsys data candidates``) reads beside the user's and item's features.

One implementation computes them for the ranking data and at serving time, from the same inputs: the
retrieval stage's answer (raw ids and similarities, best first) and what the funnel *knows* about
users, i.e. the interactions of the retrieval stage's train split (the items a user touched and the
ones they liked). When the ranking data is built, that is the split the retriever trained on and the
labels come from interactions it did not see; when the funnel serves, it is the retrieval run's own
train split. Scores are made comparable across retrievers by gaps and ranks beside the raw values.

Features (raw values; a dataset stores them standardised with its train statistics, see
``DenseFeature``):

  retrieval_score           the retrieval stage's similarity
  retrieval_gap             the similarity minus the query's best candidate's (<= 0)
  retrieval_rank            log(1 + position) in the retrieval order
  item_popularity           log of the item's share of the known likes (+1 smoothing)
  item_like_rate            the item's share of liked among its known interactions, shrunk to the mean
  user_activity             log(1 + the number of items the user is known to have touched)
  history_similarity_mean   mean similarity of the candidate to the user's known items (retrieval vectors)
  history_similarity_max    the largest of those similarities
  item_item_score           EASE^R (Steck 2019) score of the candidate from the user's known likes
  item_item_gap             that score minus the best one among the query's candidates (<= 0)
  item_item_rank            log(1 + position) of the candidate among the query's by that score
  popularity_rank           log(1 + position) of the candidate among the query's by popularity
  touched_item_item_score   EASE^R score from every item the user touched (liked or not), fitted on
                            every known interaction: what the user will rate, beside what they will like
  user_like_rate            the user's share of liked among their known interactions, shrunk to the mean

The ranks and gaps place a candidate within its list (what a listwise reranker compares); they assume
the ranker is served the number of candidates it learned from.

EASE^R is a second, closed-form scorer of the candidates: an items x items matrix fitted from the known
likes (a regularised least-squares item-item model), so it is bounded to catalogues of tens of
thousands of items (``MAX_ITEM_ITEM``); set its lambda to 0 to leave it out beyond that.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from core.errors import RecsysError, require

CANDIDATE_TOWER = "candidate"
"""``DenseFeature.tower`` of the features computed per (query, candidate) by the funnel."""
FEATURES = (
    "retrieval_score",
    "retrieval_gap",
    "retrieval_rank",
    "item_popularity",
    "item_like_rate",
    "user_activity",
    "history_similarity_mean",
    "history_similarity_max",
    "item_item_score",
    "item_item_gap",
    "item_item_rank",
    "popularity_rank",
    "touched_item_item_score",
    "user_like_rate",
)
ITEM_ITEM_FEATURES = ("item_item_score", "item_item_gap", "item_item_rank", "touched_item_item_score")
MAX_ITEM_ITEM = 50_000
"""Most items the EASE^R feature accepts: its items x items matrix (float64 while fitted) grows as the
square of the catalogue (50k items: 20 GB)."""
LIKE_RATE_PRIOR = 5.0
"""Pseudo-interactions at the global like rate added to each item's own (shrinks rare items' rates)."""


def ease_weights(liked: np.ndarray, n_items: int, lam: float) -> np.ndarray:
    """EASE^R item-item weights B (float32, zero diagonal) from (user row, item column) pairs of likes:
    B = I - P diag(1/diag(P)), P = (X^T X + lam I)^-1 (Steck 2019's closed form)."""
    require(
        n_items <= MAX_ITEM_ITEM,
        f"item-item feature: {n_items} items is more than {MAX_ITEM_ITEM}; set its lambda to 0",
    )
    import scipy.sparse as sp

    users, items = liked[:, 0], liked[:, 1]
    x = sp.csr_matrix((np.ones(len(users), np.float64), (users, items)), shape=(int(users.max(initial=0)) + 1, n_items))
    gram = (x.T @ x).toarray()
    gram[np.diag_indices_from(gram)] += lam
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return b.astype(np.float32)


def list_rank(values: np.ndarray) -> np.ndarray:
    """log(1 + position) of each entry within its row, largest first (ties: the earlier entry first)."""
    order = np.argsort(-values, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(values.shape[1])[None, :].repeat(len(values), 0), axis=1)
    return np.log1p(rank.astype(np.float32))


class CandidateFeatures:
    """Computes ``FEATURES`` for candidates given as positions in the retrieval index.

    ``item_ids``: the index's raw item ids (position order); ``vectors``: its vectors (what similarity
    the index searches by); ``pairs``: the known interactions in raw ids (columns ``user``, ``item``,
    ``label``); ``item_item_lambda`` > 0 fits EASE^R on the known likes (0: those features are zero).
    """

    def __init__(
        self, item_ids: np.ndarray, vectors: np.ndarray, pairs: pd.DataFrame, item_item_lambda: float = 0.0
    ) -> None:
        self.item_ids = np.asarray(item_ids).astype(str)
        self.vectors = vectors
        position = {raw: i for i, raw in enumerate(self.item_ids.tolist())}
        self.position = position
        n = len(self.item_ids)
        items = pairs["item"].astype(str).map(position).fillna(-1).to_numpy(np.int64)
        users = pairs["user"].astype(str).to_numpy()
        liked = pairs["label"].to_numpy(np.float64) > 0.5
        known = items >= 0
        items, users, liked = items[known], users[known], liked[known]
        positives = np.bincount(items[liked], minlength=n).astype(np.float64)
        counts = np.bincount(items, minlength=n).astype(np.float64)
        rate = float(liked.mean()) if len(liked) else 0.5
        self.popularity = np.log((positives + 1.0) / (positives.sum() + n)).astype(np.float32)
        self.like_rate = ((positives + LIKE_RATE_PRIOR * rate) / (counts + LIKE_RATE_PRIOR)).astype(np.float32)
        frame = pd.DataFrame({"user": users, "item": items, "liked": liked})
        self.touched = {str(u): g.to_numpy(np.int64) for u, g in frame.groupby("user").item}
        self.likes = {str(u): g.to_numpy(np.int64) for u, g in frame[frame.liked].groupby("user").item}
        user_rate = frame.groupby("user").liked.agg(["sum", "count"])
        self.user_like_rate = {
            str(u): float((row["sum"] + LIKE_RATE_PRIOR * rate) / (row["count"] + LIKE_RATE_PRIOR))
            for u, row in user_rate.iterrows()
        }
        self.prior_like_rate = rate
        self.item_item: np.ndarray | None = None
        self.touched_item_item: np.ndarray | None = None
        if item_item_lambda > 0:
            codes, _ = pd.factorize(frame.user[frame.liked])
            self.item_item = ease_weights(np.stack([codes, frame.item[frame.liked].to_numpy()], 1), n, item_item_lambda)
            codes, _ = pd.factorize(frame.user)
            self.touched_item_item = ease_weights(np.stack([codes, frame.item.to_numpy()], 1), n, item_item_lambda)

    def like_rate_of(self, user: str | None) -> float:
        """A known user's like rate (shrunk); the global rate for a stranger or an anonymous history."""
        return self.user_like_rate.get(str(user), self.prior_like_rate) if user is not None else self.prior_like_rate

    def known(self, user: str) -> tuple[np.ndarray, np.ndarray]:
        """Positions of the items a known user touched and of those they liked (empty for a stranger)."""
        empty = np.zeros(0, np.int64)
        return self.touched.get(str(user), empty), self.likes.get(str(user), empty)

    def positions(self, raw: Sequence[str]) -> np.ndarray:
        """Index positions of raw item ids (unknown ones left out)."""
        return np.fromiter((self.position[r] for r in map(str, raw) if r in self.position), np.int64)

    def compute(
        self,
        ids: np.ndarray,
        scores: np.ndarray,
        touched: Sequence[np.ndarray],
        liked: Sequence[np.ndarray],
        users: Sequence[str | None] | None = None,
    ) -> dict[str, np.ndarray]:
        """(queries, N) float32 arrays of every feature for candidates ``ids`` (raw, ``""`` where the index
        had no more) with similarities ``scores``, best first; ``touched[q]`` / ``liked[q]``: index
        positions of the query's known items and likes; ``users[q]``: the raw user id (None: anonymous)."""
        m, n = ids.shape
        valid = ids != ""
        pos = np.fromiter((self.position.get(str(i), -1) for i in ids.reshape(-1)), np.int64, m * n).reshape(m, n)
        if not (pos[valid] >= 0).all():
            raise RecsysError("candidate features: a candidate is not in the retrieval index")
        safe = np.where(valid, pos, 0)
        finite = np.where(valid, scores, 0.0).astype(np.float32)
        out = {
            "retrieval_score": finite,
            "retrieval_gap": finite - finite[:, :1],
            "retrieval_rank": np.broadcast_to(np.log1p(np.arange(n, dtype=np.float32)), (m, n)).copy(),
            "item_popularity": self.popularity[safe],
            "item_like_rate": self.like_rate[safe],
            "user_activity": np.repeat(np.log1p([len(t) for t in touched]).astype(np.float32)[:, None], n, 1),
        }
        rates = [self.like_rate_of(u) for u in (users if users is not None else [None] * m)]
        out["user_like_rate"] = np.repeat(np.asarray(rates, np.float32)[:, None], n, 1)
        sim_mean = np.zeros((m, n), np.float32)
        sim_max = np.zeros((m, n), np.float32)
        item_item = np.zeros((m, n), np.float32)
        touched_item_item = np.zeros((m, n), np.float32)
        for q in range(m):
            if len(touched[q]):
                sims = self.vectors[touched[q]] @ self.vectors[safe[q]].T
                sim_mean[q], sim_max[q] = sims.mean(axis=0), sims.max(axis=0)
            if self.item_item is not None and len(liked[q]):
                item_item[q] = self.item_item[liked[q]][:, safe[q]].sum(axis=0)
            if self.touched_item_item is not None and len(touched[q]):
                touched_item_item[q] = self.touched_item_item[touched[q]][:, safe[q]].sum(axis=0)
        best = np.where(valid, item_item, -np.inf).max(axis=1, keepdims=True)
        out.update(
            history_similarity_mean=sim_mean,
            history_similarity_max=sim_max,
            item_item_score=item_item,
            item_item_gap=np.where(np.isfinite(best), item_item - best, 0.0).astype(np.float32),
            item_item_rank=list_rank(np.where(valid, item_item, -np.inf)),
            popularity_rank=list_rank(np.where(valid, out["item_popularity"], -np.inf)),
            touched_item_item_score=touched_item_item,
        )
        return {name: np.where(valid, value, 0.0).astype(np.float32) for name, value in out.items()}
