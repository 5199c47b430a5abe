"""The recommender funnel over plain (unsharded) models, in raw ids from end to end.

    retrieval stage   user tower (or the mean of a history's item vectors) -> vector index top-N,
                      the user's train items excluded
    ranking stage     a ranking model scores the N candidates over the user's and items' features (and,
                      for a ranker trained on the retrieval stage's own candidates, the candidate
                      features of ``modules.candidate_features`` and the user's history)
    result            the top-K by the ranking probability (a ranker trained on candidates), else by
                      retrieval logit + log ranking probability; raw item ids with scores

Each stage reads raw ids through its own dataset's vocabularies, so the retrieval and the ranking
model may come from differently prepared copies of the same data. What the funnel knows about a
user (the items excluded from their recommendations, their history, the popularity of items) is the
retrieval stage's train split. Fallbacks: a user the retrieval model does not know (and who brings no
history) gets the most popular train items, marked ``popular``; history items the model does not know
are skipped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import InitVar, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from core.errors import RecsysError, printable, require
from datamodules.histories import UserHistories, with_feature
from datamodules.schema import HISTORY_FEATURE, DatasetMetadata
from modules.candidate_features import (
    CANDIDATE_TOWER,
    ITEM_ITEM_FEATURES,
    CandidateFeatures,
    ItemItem,
    ItemItemSpec,
    Known,
    csr_order,
    spec_from_record,
)
from modules.config import ModelConfig
from modules.index import VectorIndex
from modules.registry import ModelKind
from modules.vector_store import FaissSource, RetrievalSource

log = logging.getLogger(__name__)

MODEL = "model"
"""``Recommendation.source`` of model-made recommendations."""
POPULAR = "popular"
"""``Recommendation.source`` of the fallback: the most popular train items."""
RERANK_ROWS = 65_536
"""(user, item) rows per block of a ranking model that reads no history (passes: ``FORWARD_ROWS``)."""
HISTORY_ROWS = 8_192
"""Rows per block of a ranking model that reads the user's history (each row carries its bag)."""
FORWARD_ROWS = 2_048
"""Rows per forward pass of a ranking model: its activations (rows x the interaction's width, 448 floats
for the funnel's DCN on MovieLens) then stay in the CPU's cache; passes of 8,192 rows cost 1.6x the CPU
time of the shipped funnel on MovieLens, 65,536-row passes 1.9x the DLRM rerank's (docs/SCALE.md)."""


class FeatureTable:
    """The encoded features of one side (``user`` or ``item``) by vocabulary index, from
    ``users.parquet`` / ``items.parquet``. Row 0, the out-of-vocabulary index, holds OOV indices,
    empty multi-hot bags and zero (= train mean) dense values: what an unknown user or item is."""

    def __init__(self, table: pd.DataFrame, meta: DatasetMetadata, tower: str, size: int | None = None) -> None:
        id_name = meta.user_id_feature if tower == "user" else meta.item_id_feature
        require(id_name is not None, f"dataset {meta.dataset!r} has no {tower} id feature")
        assert id_name is not None
        self.tower = tower
        self.size = size if size is not None else meta.feature(id_name).cardinality
        """Rows (default: the id vocabulary's; a table of new items, ``modules.item_attributes``, its own)."""
        rows = table[id_name].to_numpy(np.int64)
        require(
            len(rows) == 0 or (int(rows.min()) >= 0 and int(rows.max()) < self.size),
            f"{tower}s table of dataset {meta.dataset!r} does not match its {id_name} vocabulary",
        )
        self.present = np.sort(rows)
        """The indices that have a row in the table (every train user / item)."""
        self.single: dict[str, torch.Tensor] = {}
        self.multi: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # values, lengths, offsets
        self.dense: dict[str, torch.Tensor] = {}
        for f in meta.sparse_features:
            if f.tower != tower or f.name not in table.columns:
                continue
            if f.multi_hot:
                bags: list[np.ndarray] = [np.zeros(0, np.int64)] * self.size
                for r, bag in zip(rows.tolist(), table[f.name].to_list(), strict=True):
                    bags[r] = np.asarray(bag, np.int64)
                lengths = torch.as_tensor(np.fromiter((len(b) for b in bags), np.int64, self.size))
                values = torch.as_tensor(np.concatenate(bags) if self.size else np.zeros(0, np.int64))
                self.multi[f.name] = (values, lengths, torch.cumsum(lengths, 0) - lengths)
            else:
                column = np.zeros(self.size, np.int64)
                column[rows] = table[f.name].to_numpy(np.int64)
                self.single[f.name] = torch.as_tensor(column)
        for d in meta.dense_features:
            if d.tower == tower and d.name in table.columns:
                column32 = np.zeros(self.size, np.float32)
                column32[rows] = table[d.name].to_numpy(np.float32)
                self.dense[d.name] = torch.as_tensor(column32)

    def sparse(self, name: str, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, lengths) of feature ``name`` for the rows ``idx``."""
        if name in self.single:
            return self.single[name][idx], torch.ones(len(idx), dtype=torch.int64)
        if name in self.multi:
            values, lengths, offsets = self.multi[name]
            ln = lengths[idx]
            starts = torch.repeat_interleave(offsets[idx], ln)
            within = torch.arange(int(ln.sum())) - torch.repeat_interleave(torch.cumsum(ln, 0) - ln, ln)
            return values[starts + within], ln
        return torch.zeros(0, dtype=torch.int64), torch.zeros(len(idx), dtype=torch.int64)


def model_inputs(
    meta: DatasetMetadata,
    n: int,
    sides: Sequence[tuple[FeatureTable, torch.Tensor]],
    candidate: Mapping[str, np.ndarray] | None = None,
) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    """Dense matrix and KJT (every key of the dataset) of ``n`` rows whose ``tower`` features are
    those of ``sides`` rows (table, indices); features of a tower not given get empty bags / zeros.
    Dense features of the ``candidate`` tower come from ``candidate`` (raw values by name, one per row),
    standardised with the dataset's statistics: the ranking data is encoded through here too
    (``app.candidate_data``), so that served rows are the rows the ranker trained on."""
    by_tower = {table.tower: (table, idx) for table, idx in sides}
    dense = torch.zeros(n, len(meta.dense_features))
    for j, d in enumerate(meta.dense_features):
        if d.tower == CANDIDATE_TOWER:
            if candidate is None or d.name not in candidate:
                raise RecsysError(f"dataset {meta.dataset!r}: no value for its candidate feature {d.name!r}")
            dense[:, j] = torch.as_tensor((np.asarray(candidate[d.name], np.float32) - d.mean) / d.std)
        elif d.tower in by_tower and d.name in by_tower[d.tower][0].dense:
            table, idx = by_tower[d.tower]
            dense[:, j] = table.dense[d.name][idx]
    values, lengths = [], []
    for f in meta.sparse_features:
        if f.tower in by_tower:
            table, idx = by_tower[f.tower]
            v, ln = table.sparse(f.name, idx)
        else:
            v, ln = torch.zeros(0, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)
        values.append(v)
        lengths.append(ln)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in meta.sparse_features],
        values=torch.cat(values) if values else torch.zeros(0, dtype=torch.int64),
        lengths=torch.cat(lengths).to(torch.int32) if lengths else torch.zeros(0, dtype=torch.int32),
    )
    return dense, kjt


def candidate_feature_names(meta: DatasetMetadata) -> list[str]:
    """The candidate features a ranking dataset's rows carry (empty for other datasets)."""
    return [d.name for d in meta.dense_features if d.tower == CANDIDATE_TOWER]


def dataset_fingerprint(meta: DatasetMetadata, user_vocab: Sequence[str], item_vocab: Sequence[str]) -> str:
    """What identifies a prepared dataset for the funnel: its source, split, train rows and id
    vocabularies (a ranking dataset built from it records this; a copy prepared the same way matches)."""
    digest = hashlib.sha256()
    source = {k: v for k, v in (meta.source or {}).items() if k != "path"}
    head = {"dataset": meta.dataset, "source": source, "split": meta.split_rule, "train": meta.splits["train"].rows}
    digest.update(json.dumps(head, sort_keys=True, default=str).encode())
    for vocab in (user_vocab, item_vocab):
        digest.update(json.dumps(list(vocab)).encode())
    return digest.hexdigest()


def index_of(vocab: Sequence[str]) -> dict[str, int]:
    """Raw id -> vocabulary index (position + 1; 0 is the unknown id)."""
    return {raw: i + 1 for i, raw in enumerate(vocab)}


@dataclass
class Stage:
    """A trained model and what it needs to read raw ids: kind, architecture, dataset metadata, the
    id vocabularies and the user/item feature tables of its dataset."""

    kind: ModelKind
    arch: ModelConfig
    meta: DatasetMetadata
    model: nn.Module
    """The plain model in eval mode, on CPU."""
    user_vocab: list[str]
    """Raw user ids in index order (index = position + 1)."""
    item_vocab: list[str]
    users: FeatureTable
    items: FeatureTable
    histories: UserHistories | None = None
    """Each user's train items, oldest first (``histories.parquet`` of the stage's dataset): what a user
    tower reading the history is fed, and the history a ranking stage reads in a funnel."""

    like: InitVar[Stage | None] = None
    """Another stage whose lookups this one shares where its vocabularies are the very same lists
    (``load_stage``'s ``like``: the two stages of a bundle on one dataset hold them once)."""

    def __post_init__(self, like: Stage | None) -> None:
        self._user_index: dict[str, int]
        self._item_index: dict[str, int]
        self.item_raw: np.ndarray
        if like is not None and like.user_vocab is self.user_vocab:
            self._user_index = like._user_index
        else:
            self._user_index = index_of(self.user_vocab)
        if like is not None and like.item_vocab is self.item_vocab:
            self._item_index, self.item_raw = like._item_index, like.item_raw
        else:
            self._item_index = index_of(self.item_vocab)
            self.item_raw = np.array(["", *self.item_vocab], dtype=object)
        self.scorer = self.kind.build_scorer(self.model, self.arch).eval()

    def user_index(self, raw: Sequence[str]) -> np.ndarray:
        """Vocabulary indices of raw user ids (0: unknown)."""
        return np.fromiter((self._user_index.get(str(u), 0) for u in raw), np.int64, len(raw))

    def item_index(self, raw: Sequence[str]) -> np.ndarray:
        """Vocabulary indices of raw item ids (0: unknown)."""
        return np.fromiter((self._item_index.get(str(i), 0) for i in raw), np.int64, len(raw))

    @torch.no_grad()
    def embed(
        self, tower: str, idx: np.ndarray, batch: int = 4096, progress: bool = False, table: FeatureTable | None = None
    ) -> np.ndarray:
        """Tower embeddings (float32) of users or items by vocabulary index (a retrieval stage); ``table``:
        rows of another feature table than the stage's (new items)."""
        require(self.kind.retrieves, f"--model {self.kind.name} has no user and item towers to retrieve with")
        assert self.kind.embed is not None
        table = table if table is not None else (self.users if tower == "user" else self.items)
        out = []
        for lo in progress_over(range(0, len(idx), batch), progress, desc=f"{tower} vectors", unit="batch"):
            rows = torch.as_tensor(idx[lo : lo + batch])
            dense, kjt = model_inputs(self.meta, len(rows), [(table, rows)])
            if self.arch.history:  # the user tower reads the history; the item tower gets empty bags
                bags = self.bags(rows) if tower == "user" else empty_bags(len(rows))
                kjt = with_feature(kjt, HISTORY_FEATURE, *bags)
            out.append(self.kind.embed(self.model, dense, kjt, tower).float().numpy())
        dim = self.arch.tower_layers[-1] if self.arch.tower_layers else self.arch.embedding_dim
        return np.concatenate(out) if out else np.zeros((0, dim), np.float32)

    def bags(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The history bags (values, lengths) of user indices, as training reads them (whole histories)."""
        if self.histories is None:
            raise RecsysError(
                f"a {self.kind.name} model reading user histories needs its dataset's histories.parquet "
                f"(dataset {self.meta.dataset!r} has none: prepare it again)"
            )
        return self.histories.lookup(users, max_len=self.arch.history_max_len)

    @torch.no_grad()
    def score_pairs(
        self,
        users: np.ndarray,
        items: np.ndarray,
        candidate: Mapping[str, np.ndarray] | None = None,
        bags: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """The model's probability for each (user index, item index) row; ``candidate``: the rows'
        candidate features (raw, by name); ``bags``: each row's history as (values, lengths) in this
        stage's item indices, for a model that reads it."""
        require(not self.arch.history or bags is not None, f"a {self.kind.name} ranking model here needs histories")
        step = FORWARD_ROWS
        starts = None if bags is None else np.r_[0, np.cumsum(bags[1])]
        out = []
        for lo in range(0, len(users), step):
            hi = min(lo + step, len(users))
            u, i = torch.as_tensor(users[lo:hi]), torch.as_tensor(items[lo:hi])
            chunk = None if candidate is None else {k: v[lo:hi] for k, v in candidate.items()}
            dense, kjt = model_inputs(self.meta, len(u), [(self.users, u), (self.items, i)], chunk)
            if self.arch.history and bags is not None and starts is not None:
                values = torch.as_tensor(bags[0][starts[lo] : starts[hi]])
                kjt = with_feature(kjt, HISTORY_FEATURE, values, torch.as_tensor(bags[1][lo:hi]).to(torch.int32))
            out.append(self.scorer(dense, kjt).float().reshape(-1).numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)


def empty_bags(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(0, dtype=torch.int64), torch.zeros(n, dtype=torch.int32)


def item_vectors(stage: Stage, batch: int = 4096, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(raw item ids, item tower vectors) of every item of the stage's corpus: what the index holds."""
    idx = stage.items.present[stage.items.present > 0]
    require(len(idx) > 0, f"dataset {stage.meta.dataset!r} has no items to index")
    return stage.item_raw[idx].astype(str), stage.embed("item", idx, batch, progress)


@dataclass
class Recommendation:
    """Top-K raw item ids, best first, with their scores; ``source``: ``model`` or ``popular``."""

    items: list[str]
    scores: list[float]
    source: str


@dataclass
class Candidates:
    """The retrieval stage's answer for a batch of queries: (queries, N) raw ids and scores, ``""`` /
    ``-inf`` where fewer than N items were left after the exclusions."""

    ids: np.ndarray
    scores: np.ndarray


class Recommender:
    """The funnel: retrieval stage + retrieval source + optional ranking stage, with the popularity fallback.

    ``source``: where candidates come from (``modules.vector_store``): the FAISS ``index`` in process by
    default, or a vector database's collection published from the same weights; ``index`` keeps the
    item vectors either way (a history's query is the mean of its items').

    ``pairs``: the retrieval stage's train pairs, from which ``seen[u]`` (raw ids of the items user
    index ``u`` had in train: never recommended to them), the popularity fallback (raw item ids, most
    popular first, with their share of train positives) and, for a ranking stage trained on
    candidates, the candidate features come; ``retrieval_run``: the retrieval stage's run id, checked
    against the run whose candidates such a ranker learned from.
    """

    def __init__(
        self,
        retrieval: Stage,
        index: VectorIndex,
        pairs: TrainPairs,
        ranking: Stage | None = None,
        retrieval_run: str | None = None,
        item_item: ItemItem | None = None,
        source: RetrievalSource | None = None,
    ) -> None:
        require(retrieval.kind.retrieves, f"--retrieval: a {retrieval.kind.name} model cannot retrieve (no towers)")
        self.retrieval, self.index, self.ranking = retrieval, index, ranking
        self.source: RetrievalSource = source if source is not None else FaissSource(index)
        self.seen = SeenItems(pairs, retrieval.item_raw)
        self.popular_ids, self.popular_scores = popularity(pairs, retrieval)
        self._index_position = index.positions()
        self.ranking_features = candidate_feature_names(ranking.meta) if ranking is not None else []
        """The candidate features the ranking stage reads (empty: a ranker trained on rated pairs)."""
        self.features: CandidateFeatures | None = None
        self.trained_candidates: int | None = None
        self._warned = False
        if ranking is not None and self.ranking_features:
            spec = check_candidates(ranking.meta, retrieval, retrieval_run)
            needs_item_item = bool(set(ITEM_ITEM_FEATURES) & set(self.ranking_features))
            if needs_item_item:
                wanted = item_item_spec_of(ranking.meta)
                require(
                    item_item is not None and item_item.spec == wanted,
                    f"the ranking stage reads the item-item model {wanted.text()}, which this bundle "
                    f"{'lacks' if item_item is None else 'holds as ' + item_item.spec.text()} "
                    "(assemble it again: recsys package / recommend --retrieval RUN --ranking RUN)",
                )
            self.features = CandidateFeatures(
                Known(pairs.indptr, pairs.items, pairs.positive),
                len(retrieval.item_raw),
                retrieval.item_index(index.ids.tolist()),
                index.vectors,
                item_item if needs_item_item else None,
            )
            self.trained_candidates = int(spec["candidates"])
        self._ranking_item = None
        if ranking is not None and ranking.arch.history:
            # the ranking stage's item index of each retrieval item index (0: unknown to the ranker)
            self._ranking_item = ranking.item_index(["", *retrieval.item_vocab])
            self._ranking_item[0] = 0

    # -- the stages ----------------------------------------------------------------------------------

    def candidates(
        self, queries: np.ndarray, exclude: Sequence[set[str]], n: int, filter: str | None = None
    ) -> Candidates:
        """Top-``n`` items of the source for each query vector, ``exclude[i]`` left out; ``filter``: a
        Milvus boolean expression over the items' attributes (``modules.vector_store``)."""
        n = min(n, self.source.count)
        scores, ids = self.source.search(queries, n, list(exclude), filter)
        return Candidates(ids.astype(str), scores)

    def rank(
        self, user_raw: Sequence[str], found: Candidates, histories: Sequence[Sequence[str]] | None = None
    ) -> np.ndarray:
        """The ranking stage's probability of each candidate (rows: users, as raw ids; "" = unknown).

        ``histories``: for anonymous queries, the raw ids of the items each brought (their history
        and likes); else each user's are the retrieval stage's train items. A ranker trained on
        candidates also reads the candidate features (``modules.candidate_features``), one that reads
        histories the user's history (in its own item vocabulary; items it does not know left out).
        """
        assert self.ranking is not None
        m, n = found.ids.shape
        step = max(1, (HISTORY_ROWS if self.ranking.arch.history else RERANK_ROWS) // max(n, 1))
        out = []
        for lo in range(0, m, step):
            rows = slice(lo, min(lo + step, m))
            given = None if histories is None else list(histories[rows])
            inputs = self.ranking_rows(list(user_raw[rows]), Candidates(found.ids[rows], found.scores[rows]), given)
            out.append(self.ranking.score_pairs(*inputs).reshape(-1, n))
        return np.concatenate(out) if out else np.zeros((0, n), np.float32)

    def ranking_rows(
        self, user_raw: Sequence[str], found: Candidates, histories: Sequence[Sequence[str]] | None = None
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray] | None, tuple[np.ndarray, np.ndarray] | None]:
        """What the ranking stage scores for ``found`` (see ``rank``), row by row (query-major): its user
        and item indices, the raw candidate features by name and the history bags (``Stage.score_pairs``'
        arguments; ``model_inputs`` encodes them as the ranking data was encoded)."""
        assert self.ranking is not None
        n = found.ids.shape[1]
        users = np.repeat(self.ranking.user_index(user_raw), n)
        items = self.ranking.item_index(found.ids.reshape(-1).tolist())
        candidate = None
        if self.features is not None:
            cand = self.retrieval.item_index(found.ids.reshape(-1).tolist()).reshape(found.ids.shape)
            if histories is None:
                known = self.features.rows_of(self.retrieval.user_index(user_raw))
            else:
                known = self.features.rows_of_histories([self.retrieval.item_index(list(h)) for h in histories])
            values = self.features.compute(cand, found.scores, known, anonymous=histories is not None)
            candidate = {name: values[name].reshape(-1) for name in self.ranking_features}
        bags = self.ranking_bags(user_raw, histories, n) if self.ranking.arch.history else None
        return users, items, candidate, bags

    def ranking_bags(
        self, user_raw: Sequence[str], histories: Sequence[Sequence[str]] | None, n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each row's history bag (values, lengths) in the ranking stage's item indices, every query's
        repeated for its ``n`` candidates: a user's train history (the retrieval stage's, oldest first),
        or an anonymous query's items; the most recent ``history_max_len`` kept."""
        assert self.ranking is not None and self._ranking_item is not None
        if histories is None:
            users = torch.as_tensor(self.retrieval.user_index(user_raw))
            values, lengths = self.retrieval.bags(users) if len(users) else empty_bags(0)
            ends = np.cumsum(lengths.numpy())
            mapped = self._ranking_item[values.numpy()]
            per_query = [mapped[e - ln : e] for e, ln in zip(ends, lengths.numpy(), strict=True)]
        else:
            per_query = [self.ranking.item_index([str(i) for i in h]) for h in histories]
        cap = self.ranking.arch.history_max_len
        per_query = [b[b > 0][-cap:] if cap > 0 else b[b > 0] for b in per_query]
        lengths_out = np.repeat([len(b) for b in per_query], n).astype(np.int32)
        values_out = np.concatenate([np.tile(b, n) for b in per_query]) if per_query else np.zeros(0, np.int64)
        return values_out.astype(np.int64), lengths_out

    def joint(self, found: Candidates, probabilities: np.ndarray) -> np.ndarray:
        """The reranking score: retrieval logit (similarity / temperature) + log of the ranking stage's
        probability. The two-tower's softmax scores which items a user picks, the ranking model whether
        a picked item is liked: ordering by the probability alone promotes well-liked items the user
        would not pick (docs/FUNNEL.md: NDCG@10 0.24 -> 0.06 on MovieLens), the sum keeps both."""
        logit = found.scores / self.retrieval.arch.temperature
        return logit + np.log(np.clip(probabilities, 1e-12, 1.0))

    def finish(self, found: Candidates, scores: np.ndarray, k: int) -> list[Recommendation]:
        """Top-``k`` of each row by ``scores`` (candidates the index could not fill dropped)."""
        out = []
        valid = found.ids != ""
        scores = np.where(valid, scores, -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        for row, cols in enumerate(order):
            cols = cols[valid[row, cols]]
            out.append(Recommendation(found.ids[row, cols].tolist(), scores[row, cols].astype(float).tolist(), MODEL))
        return out

    def nothing_left(self, user: str | None = None, history: Sequence[str] | None = None) -> str:
        """Why a user or a history got no recommendation: the items excluded (the user's train items,
        the history's items) leave nothing the index returns."""
        if history is not None:
            excluded, whose = len({str(i).strip() for i in history} & self._index_position.keys()), "the history's"
        else:
            excluded, whose = len(self.seen.get(int(self.retrieval.user_index([str(user)])[0]))), "the user's seen"
        count = self.source.count
        if excluded >= count:
            return (
                f"{whose} {excluded} items are every item the index holds ({count}): "
                "none is left once they are excluded"
            )
        return f"the index returned no item outside {whose} {excluded} items (of {count} indexed, before any --filter)"

    def most_popular(self, k: int, exclude: set[str] | None = None) -> Recommendation:
        """The fallback: the ``k`` most popular train items (``exclude`` left out)."""
        keep = [i for i, raw in enumerate(self.popular_ids.tolist()) if not exclude or raw not in exclude][:k]
        return Recommendation(
            self.popular_ids[keep].tolist(), self.popular_scores[keep].astype(float).tolist(), POPULAR
        )

    # -- requests ------------------------------------------------------------------------------------

    def recommend_users(
        self,
        users: Sequence[str],
        k: int = 10,
        candidates: int = 200,
        batch: int = 1024,
        progress: bool = False,
        filter: str | None = None,
    ) -> list[Recommendation]:
        """Recommendations for raw user ids; users the retrieval model does not know get the most popular
        items. ``filter``: only items it accepts are retrieved (``candidates``)."""
        check_sizes(k, candidates)
        users = [str(u) for u in users]
        out: list[Recommendation | None] = [None] * len(users)
        idx = self.retrieval.user_index(users)
        unknown = [users[i] for i in np.flatnonzero(idx == 0)]
        if unknown:  # ids come from a request or a file: their control characters escaped
            shown = printable(", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""))
            log.warning("%d unknown user(s) (%s): recommending the most popular items", len(unknown), shown)
        known = np.flatnonzero(idx > 0)
        bar = progress_bar(len(known), progress, desc="recommend", unit="user")
        for lo in range(0, len(known), batch):
            rows = known[lo : lo + batch]
            queries = self.retrieval.embed("user", idx[rows])
            exclude = [self.seen.get(int(u), set()) for u in idx[rows]]
            answers = self.run(queries, exclude, [users[r] for r in rows], k, candidates, filter=filter)
            for r, answer in zip(rows, answers, strict=True):
                out[r] = answer
            if bar is not None:
                bar.update(len(rows))
        if bar is not None:
            bar.close()
        for i in np.flatnonzero(idx == 0):
            out[i] = self.most_popular(k)
        return [r for r in out if r is not None]

    def recommend_histories(
        self, histories: Sequence[Sequence[str]], k: int = 10, candidates: int = 200, filter: str | None = None
    ) -> list[Recommendation]:
        """Recommendations for anonymous users given by the raw ids of items they liked.

        The two-tower's user tower reads user features, not histories, so a history's query is the
        mean of its items' vectors in the index (normalised for cosine): the items most like the
        history's. Its items are excluded; unknown item ids are skipped with a warning; a history with
        no known item gets the most popular items. The ranking stage scores the candidates for an
        unknown user (out-of-vocabulary user id, mean user features).
        """
        check_sizes(k, candidates)
        out: list[Recommendation | None] = [None] * len(histories)
        queries, rows, exclude = [], [], []
        for r, history in enumerate(histories):
            raw = [str(i).strip() for i in history if str(i).strip()]
            known = [i for i in raw if i in self._index_position]
            skipped = [i for i in raw if i not in self._index_position]
            if skipped:
                shown = printable(", ".join(skipped[:5]))
                log.warning("history %d: skipping %d unknown item id(s): %s", r, len(skipped), shown)
            if not known:
                out[r] = self.most_popular(k, set(raw))
                continue
            vectors = self.index.vectors[[self._index_position[i] for i in known]]
            queries.append(vectors.mean(axis=0))
            rows.append(r)
            exclude.append(set(known))
        if rows:
            given = [[i for i in histories[r] if str(i).strip() in self._index_position] for r in rows]
            answers = self.run(np.stack(queries), exclude, [""] * len(rows), k, candidates, given, filter)
            for r, answer in zip(rows, answers, strict=True):
                out[r] = answer
        return [r for r in out if r is not None]

    def run(
        self,
        queries: np.ndarray,
        exclude: Sequence[set[str]],
        user_raw: Sequence[str],
        k: int,
        candidates: int,
        histories: Sequence[Sequence[str]] | None = None,
        filter: str | None = None,
    ) -> list[Recommendation]:
        """Retrieve ``candidates`` per query (those ``filter`` accepts), rerank them when there is a ranking
        stage, keep the top ``k``: by the ranking probability for a ranker trained on candidates (the
        retrieval score is one of its features), else by ``joint``."""
        found = self.candidates(queries, exclude, max(candidates, k), filter)
        if self.ranking is None:
            return self.finish(found, found.scores, k)
        if self.trained_candidates not in (None, found.ids.shape[1]) and not self._warned:
            self._warned = True
            log.warning(
                "the ranking stage learned from %d candidates per user; reranking %d (pass --candidates %d)",
                self.trained_candidates,
                found.ids.shape[1],
                self.trained_candidates,
            )
        probabilities = self.rank(user_raw, found, histories)
        return self.finish(found, probabilities if self.features is not None else self.joint(found, probabilities), k)


def progress_over(steps: range, progress: bool, **bar: Any) -> Iterable[int]:
    """``steps``, with a tqdm bar when ``progress`` (a disabled bar still costs ~0.2 ms to build,
    a few percent of one user's request)."""
    if not progress:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, **bar)  # type: ignore[no-any-return]


def progress_bar(total: int, progress: bool, **bar: Any) -> Any:
    """A tqdm bar over ``total`` steps, or None without ``progress`` (see ``progress_over``)."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, **bar)


def check_sizes(k: int, candidates: int) -> None:
    require(k >= 1, f"--k: must be at least 1, got {k}")
    require(candidates >= 1, f"--candidates: must be at least 1, got {candidates}")


@dataclass
class TrainPairs:
    """The retrieval stage's train pairs by user index, CSR (``datamodules.corpus.write_csr``): user
    ``u``'s items are ``items[indptr[u]:indptr[u + 1]]``, ``positive`` each pair's label > 0.5 and
    ``item_positives`` each item's count of positive pairs. Memory-mapped from a bundle, so the workers
    of one machine share one copy in the page cache: 96M pairs of 2.5M users take 0.5 GB of arrays
    where a frame of them took 2.3 GB in every process (and a dict of sets 10 GB)."""

    indptr: np.ndarray
    items: np.ndarray
    positive: np.ndarray
    item_positives: np.ndarray

    @classmethod
    def from_frame(cls, pairs: pd.DataFrame, n_users: int, n_items: int) -> TrainPairs:
        """From (``user_id``, ``item_id``, ``label``) rows in memory (small sets, tests)."""
        indptr, order = csr_order(pairs.user_id.to_numpy(np.int64), n_users)
        items = pairs.item_id.to_numpy(np.int64)
        positive = pairs.label.to_numpy(np.float64) > 0.5
        return cls(indptr, items[order], positive[order], np.bincount(items[positive], minlength=n_items))

    @property
    def num_users(self) -> int:
        return len(self.indptr) - 1

    def frame(self) -> pd.DataFrame:
        """Every pair as (``user_id``, ``item_id``, ``label``) rows, users ascending (what the candidate
        features of a ranker trained on candidates are computed from: a whole-table step)."""
        users = np.repeat(np.arange(self.num_users, dtype=np.int64), np.diff(self.indptr))
        return pd.DataFrame(
            {"user_id": users, "item_id": np.asarray(self.items, np.int64), "label": self.positive.astype(np.float32)}
        )


class SeenItems:
    """User index -> raw ids of the items the user had in the train pairs (``TrainPairs``' CSR), turned
    into a set for the users asked about only. A dict of Python sets costs about 100 bytes a pair: 10 GB
    for the 96M train pairs of 2.5M users."""

    def __init__(self, pairs: TrainPairs, item_raw: np.ndarray) -> None:
        self.indptr, self.items, self.item_raw = pairs.indptr, pairs.items, item_raw

    def get(self, user: int, default: set[str] | None = None) -> set[str]:
        """The raw ids of ``user``'s items (``default``, else an empty set, when it has none)."""
        if 0 <= user < len(self.indptr) - 1 and self.indptr[user + 1] > self.indptr[user]:
            return set(self.item_raw[self.items[self.indptr[user] : self.indptr[user + 1]]].tolist())
        return set() if default is None else default

    def __getitem__(self, user: int) -> set[str]:
        found = self.get(user)
        if not found:
            raise KeyError(user)
        return found


def popularity(pairs: TrainPairs, stage: Stage) -> tuple[np.ndarray, np.ndarray]:
    """Raw item ids by decreasing count of train positives (ties: by id), with their share of positives
    (a train split without positives: by count of pairs)."""
    counts = np.zeros(len(stage.item_raw), dtype=np.int64)
    known = np.asarray(pairs.item_positives[: len(counts)], dtype=np.int64)
    counts[: len(known)] = known
    if counts[1:].sum() == 0:
        counts = np.bincount(np.asarray(pairs.items, np.int64), minlength=len(counts))[: len(counts)]
    counts[0] = 0
    order = np.lexsort((np.arange(len(counts)), -counts))
    order = order[counts[order] > 0]
    if len(order) == 0:
        raise RecsysError(f"dataset {stage.meta.dataset!r}: no train interactions to rank popular items by")
    return stage.item_raw[order].astype(str), counts[order] / max(int(counts.sum()), 1)


def raw_pairs(pairs: pd.DataFrame, stage: Stage) -> pd.DataFrame:
    """(user, item, label) in raw ids of a split's encoded user_id/item_id/label rows."""
    users = np.array(["", *stage.user_vocab], dtype=object)
    return pd.DataFrame(
        {
            "user": users[pairs.user_id.to_numpy(np.int64)],
            "item": stage.item_raw[pairs.item_id.to_numpy(np.int64)],
            "label": pairs.label.to_numpy(np.float32),
        }
    )


def check_candidates(meta: DatasetMetadata, retrieval: Stage, retrieval_run: str | None) -> dict[str, Any]:
    """The provenance of a ranking dataset built from a retrieval stage's candidates, after refusing
    (one line) a funnel whose retrieval stage is neither the run that produced the candidates nor the
    one they were built to be served with, or whose dataset is not that run's. Returns
    ``metadata.json: candidates``."""
    spec = meta.candidates
    require(bool(spec), f"dataset {meta.dataset!r} has candidate features but no candidates provenance")
    runs = {
        spec.get("retrieval_run"): spec.get("retrieval_dataset"),
        spec.get("serving_run"): spec.get("serving_dataset"),
    }
    if retrieval_run is not None and retrieval_run not in runs:
        raise RecsysError(
            f"--ranking: trained on the candidates of retrieval run {spec.get('retrieval_run')} "
            f"(served with {spec.get('serving_run')}), not {retrieval_run}: build its data with "
            "`recsys data candidates` for this retrieval run and train it again"
        )
    have = dataset_fingerprint(retrieval.meta, retrieval.user_vocab, retrieval.item_vocab)
    allowed = [runs[retrieval_run]] if retrieval_run is not None else list(runs.values())
    if have not in allowed:
        raise RecsysError(
            "--ranking: trained on candidates for another dataset than the retrieval stage's "
            f"({str(allowed[0])[:12]} vs {have[:12]}): build its data from this retrieval run and train it again"
        )
    return dict(spec)


def item_item_spec_of(meta: DatasetMetadata) -> ItemItemSpec:
    """The item-item model a ranking dataset's candidate features were computed with (one line for data
    built with the dense EASE^R model that recsys no longer computes)."""
    spec = meta.candidates or {}
    record = spec.get("item_item")
    require(
        isinstance(record, dict),
        f"dataset {meta.dataset!r}: its item-item candidate features come from the dense EASE^R model "
        "(item_item_lambda), which recsys no longer computes; build it again with recsys data candidates",
    )
    return spec_from_record(record, f"dataset {meta.dataset!r}: candidates.item_item")


def describe(rec: Recommendation, titles: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows (rank, item, score, source[, title]) of one recommendation."""
    rows = []
    for rank, (item, score) in enumerate(zip(rec.items, rec.scores, strict=True), 1):
        row: dict[str, Any] = {"rank": rank, "item": item, "score": score, "source": rec.source}
        if titles is not None:
            row["title"] = titles.get(item, "")
        rows.append(row)
    return rows
