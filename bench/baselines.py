"""Tuned baselines on MovieLens-100K, every hyperparameter chosen on validation data, never on test.

    .venv/bin/python -m bench.baselines_report    # from the repository root: both split seeds, docs/BASELINES.md

Retrieval uses the protocol of ``bench/quality.py``'s movielens-retrieval section (every rating an
interaction, per-user random 75/25 split, full-corpus ranking with train items excluded, the project's
``corpus_metrics``); each baseline is tuned on a per-user random hold-out carved from train, then
refit on the whole train split for the test figures. Ranking uses the movielens-ranking section's
split (label rating >= 4, per-user random 80/10/10) and tunes on its val split.

Searches are coordinate-wise over value ladders that widen while the best value sits on an edge,
so every reported choice is bracketed by a worse value on each side unless a hard bound stopped it
(which the result says).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from datamodules.config import DataConfig, PrepareConfig
from datamodules.download import movielens_100k_source
from datamodules.prepare import prepare
from datamodules.schema import DatasetMetadata, read_metadata
from modules.tasks import corpus_metrics

K = 10
INIT_SEEDS = 5
THREADS = 1
"""Threads of ALS and LightGBM: on 2 shared, busy cores OpenMP's spin-waiting made 2 threads 2-13x slower than 1."""
Params = dict[str, float]
Objective = Callable[[Params], tuple[float, dict[str, float]]]

# -- hyperparameter search -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Dimension:
    """One hyperparameter: an ascending ladder of values, widened geometrically within its bounds."""

    name: str
    values: tuple[float, ...]
    integer: bool = False
    lower: float | None = None
    upper: float | None = None


@dataclass
class SearchResult:
    """What a search tried, what it chose, and whether each choice is bracketed."""

    dimensions: tuple[Dimension, ...]
    explored: dict[str, list[float]]
    """Every value tried per dimension (the initial ladder plus the widened values), ascending."""
    widened: dict[str, list[float]]
    """Values added because the best sat on the edge of the ladder."""
    trials: dict[tuple[float, ...], tuple[float, dict[str, float]]]
    best: Params
    best_score: float
    profile: dict[str, list[tuple[float, float]]]
    """For each dimension, the score of every explored value with the others at their best."""
    edges: dict[str, str]
    """'interior', or which edge the chosen value sits on and why the search did not go past it."""

    @property
    def best_extra(self) -> dict[str, float]:
        return self.trials[self.key(self.best)][1]

    def key(self, params: Mapping[str, float]) -> tuple[float, ...]:
        return tuple(float(params[d.name]) for d in self.dimensions)


def widen(dim: Dimension, ladder: list[float], upward: bool) -> float | None:
    """The next value past one end of ``ladder`` (same ratio as the last step), or None at a bound."""
    lo, hi = (ladder[-2], ladder[-1]) if upward else (ladder[1], ladder[0])
    nxt = hi * (hi / lo) if lo > 0 else hi + (hi - lo)
    if dim.integer:
        nxt = float(round(nxt))
        if nxt == hi:
            nxt = hi + (1 if upward else -1)
    else:
        nxt = float(f"{nxt:.2g}")  # 33.33 -> 33: readable values on an already geometric ladder
    if dim.upper is not None and nxt > dim.upper:
        nxt = dim.upper
    if dim.lower is not None and nxt < dim.lower:
        nxt = dim.lower
    return None if nxt == hi else nxt


def coordinate_search(
    objective: Objective,
    dimensions: Sequence[Dimension],
    start: Mapping[str, float] | None = None,
    max_rounds: int = 5,
    max_widen: int = 6,
    log: Callable[[str], None] | None = None,
) -> SearchResult:
    """Maximise ``objective`` one dimension at a time, widening a ladder whenever its best is an edge."""
    # It stops after a round that changes nothing, so every dimension's whole ladder has been evaluated
    # through the result (its profile), or after max_rounds; ties go to the value nearest the current one.
    dims = tuple(dimensions)
    require_ladders(dims)
    ladders = {d.name: sorted(float(v) for v in d.values) for d in dims}
    widened: dict[str, list[float]] = {d.name: [] for d in dims}
    capped: dict[str, bool] = {d.name: False for d in dims}
    current: Params = dict(start) if start else {d.name: ladders[d.name][len(d.values) // 2] for d in dims}
    trials: dict[tuple[float, ...], tuple[float, dict[str, float]]] = {}

    def evaluate(params: Params) -> float:
        key = tuple(float(params[d.name]) for d in dims)
        if key not in trials:
            started = time.time()
            score, extra = objective(params)
            trials[key] = (score, {**extra, "seconds": time.time() - started})
            if log:
                shown = ", ".join(f"{d.name}={fmt(params[d.name])}" for d in dims)
                log(f"  {shown}: {score:.4f} ({trials[key][1]['seconds']:.1f}s)")
        return trials[key][0]

    for _ in range(max_rounds):
        changed = False
        for d in dims:
            ladder = ladders[d.name]
            steps = 0
            while True:
                scores = {v: evaluate({**current, d.name: v}) for v in ladder}
                best_v = pick(scores, current[d.name])
                at_edge = best_v in (ladder[0], ladder[-1]) and len(ladder) > 1
                if not at_edge:
                    break
                nxt = widen(d, ladder, upward=best_v == ladder[-1])
                if nxt is None or nxt in ladder:
                    break
                if steps >= max_widen:
                    capped[d.name] = True
                    break
                steps += 1
                ladder.append(nxt)
                ladder.sort()
                widened[d.name].append(nxt)
            if best_v != current[d.name]:
                current[d.name] = best_v
                changed = True
        if not changed:
            break
    profile = {d.name: [(v, evaluate({**current, d.name: v})) for v in ladders[d.name]] for d in dims}
    edges = {d.name: edge_flag(d, profile[d.name], current[d.name], capped[d.name]) for d in dims}
    return SearchResult(
        dimensions=dims,
        explored={k: sorted(v) for k, v in ladders.items()},
        widened={k: sorted(v) for k, v in widened.items()},
        trials=trials,
        best=dict(current),
        best_score=evaluate(current),
        profile=profile,
        edges=edges,
    )


def pick(scores: Mapping[float, float], current: float) -> float:
    """The best-scoring value; among ties the one nearest ``current`` (in log space), so plateaus don't drift."""

    def distance(v: float) -> float:
        return abs(math.log(v / current)) if v > 0 and current > 0 else abs(v - current)

    top = max(scores.values())
    return min((v for v, score in scores.items() if score == top), key=lambda v: (distance(v), v))


def require_ladders(dims: Sequence[Dimension]) -> None:
    """Every ladder needs two distinct values (so it has a step to widen by)."""
    for d in dims:
        if len(set(d.values)) < 2:
            raise ValueError(f"{d.name}: a ladder needs at least two distinct values, got {d.values}")


def edge_flag(dim: Dimension, profile: list[tuple[float, float]], chosen: float, capped: bool) -> str:
    """Whether ``chosen`` is bracketed on its profile, and if not, what stopped the widening."""
    ladder, score = [v for v, _ in profile], dict(profile)
    if ladder[0] < chosen < ladder[-1]:
        ties = [v for v in (ladder[0], ladder[-1]) if score[v] == score[chosen]]
        return "interior" + "".join(f" (tied with the edge value {fmt(v)})" for v in ties)
    side, bound = ("lower", dim.lower) if chosen == ladder[0] else ("upper", dim.upper)
    if bound is not None and chosen == bound:
        return f"{side} edge (hard bound {fmt(bound)})"
    return f"{side} edge (widening {'cap' if capped else 'stopped'})"


def fmt(value: float) -> str:
    """A hyperparameter value as a short string (integers without a decimal point)."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e9 else f"{value:g}"


# -- data ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrievalData:
    """The train/test pairs of a prepared retrieval dataset and its full item corpus."""

    train: pd.DataFrame
    test: pd.DataFrame
    items: list[int]
    n_users: int
    n_items: int


def prepare_retrieval(out: Path, seed: int) -> Path:
    """MovieLens-100K as bench/quality.py's retrieval section prepares it (every rating, 75/25)."""
    prepare(
        PrepareConfig(
            dataset="movielens-100k",
            source=movielens_100k_source(),
            out=str(out),
            val_frac=0.0,
            test_frac=0.25,
            label_threshold=0.0,
            seed=seed,
            overwrite=True,
        )
    )
    return out


def prepare_ranking(out: Path, seed: int) -> Path:
    """MovieLens-100K as bench/quality.py's ranking section prepares it (rating >= 4, 80/10/10)."""
    prepare(
        PrepareConfig(dataset="movielens-100k", source=movielens_100k_source(), out=str(out), seed=seed, overwrite=True)
    )
    return out


def load_retrieval(path: Path) -> RetrievalData:
    """Train/test id pairs, the corpus (every train item) and the table sizes of a prepared dataset."""
    meta = read_metadata(path)
    return RetrievalData(
        train=pd.read_parquet(path / "pairs" / "train.parquet"),
        test=pd.read_parquet(path / "pairs" / "test.parquet"),
        items=sorted(int(i) for i in pd.read_parquet(path / "items.parquet").item_id),
        n_users=meta.feature("user_id").cardinality,
        n_items=meta.feature("item_id").cardinality,
    )


def holdout_split(pairs: pd.DataFrame, frac: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-user random hold-out: round(n * frac) of each user's n rows (never all of them)."""
    rng = np.random.default_rng(seed)
    user = pairs.user_id.to_numpy()
    order = np.lexsort((rng.random(len(pairs)), user))
    sorted_users = user[order]
    starts = np.r_[True, sorted_users[1:] != sorted_users[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    sizes = np.diff(np.r_[first, len(pairs)])
    rank = np.arange(len(pairs)) - first[group]
    n_hold = np.minimum(np.floor(sizes * frac + 0.5), sizes - 1)[group]
    hold = np.empty(len(pairs), dtype=bool)
    hold[order] = rank < n_hold
    return pairs[~hold], pairs[hold]


def target_users(target: pd.DataFrame) -> list[int]:
    """Users (in vocabulary) with at least one positive in ``target``."""
    return sorted(int(u) for u in target[(target.label > 0.5) & (target.user_id > 0)].user_id.unique())


def interaction_matrix(pairs: pd.DataFrame, n_users: int, n_items: int) -> sp.csr_matrix:
    """Binary users x items matrix of the positive pairs."""
    pos = pairs[pairs.label > 0.5].drop_duplicates(["user_id", "item_id"])
    data = np.ones(len(pos), dtype=np.float32)
    return sp.csr_matrix((data, (pos.user_id, pos.item_id)), shape=(n_users, n_items))


def retrieval_metrics(
    scores: np.ndarray, items: list[int], train: pd.DataFrame, target: pd.DataFrame
) -> dict[str, float]:
    """Recall@K and NDCG@K of a full users x items score matrix, by the project's corpus_metrics."""
    users = target_users(target)
    block = torch.as_tensor(np.ascontiguousarray(scores[np.ix_(users, items)]), dtype=torch.float32)
    recall, ndcg = corpus_metrics(block, users, items, train, target, K)
    return {f"recall@{K}": recall, f"ndcg@{K}": ndcg}


# -- retrieval scorers: binary users x items matrix -> dense users x items scores -------------------------


def popularity_scores(x: sp.csr_matrix) -> np.ndarray:
    """Every user gets the items' train interaction counts."""
    counts = np.asarray(x.sum(axis=0)).ravel().astype(np.float32)
    return np.broadcast_to(counts, x.shape)


def als_scores(
    x: sp.csr_matrix,
    factors: int,
    regularization: float,
    alpha: float,
    iterations: int,
    random_state: int = 0,
    threads: int = THREADS,
) -> np.ndarray:
    """Implicit-feedback ALS (Hu, Koren, Volinsky 2008) from the ``implicit`` package."""
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):  # implicit runs its own threads; BLAS threads would oversubscribe
        model = AlternatingLeastSquares(
            factors=factors,
            regularization=regularization,
            alpha=alpha,
            iterations=iterations,
            random_state=random_state,
            num_threads=threads,
        )
        model.fit(x, show_progress=False)
    uf, itf = np.asarray(model.user_factors), np.asarray(model.item_factors)
    return uf @ itf.T


def ease_weights(x: sp.csr_matrix, lam: float) -> np.ndarray:
    """EASE^R item-item weights (Steck 2019): B = I - P diag(1/diag(P)), P = (X^T X + lam I)^-1."""
    from threadpoolctl import threadpool_limits

    gram = (x.T @ x).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += lam
    with threadpool_limits(THREADS, "blas"):
        p = np.linalg.inv(gram)
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return b


def ease_scores(x: sp.csr_matrix, lam: float) -> np.ndarray:
    """EASE^R scores X B."""
    return np.asarray(x @ ease_weights(x, lam), dtype=np.float32)


def item_knn_weights(x: sp.csr_matrix, neighbours: int) -> np.ndarray:
    """Cosine item-item similarities, each target item keeping only its ``neighbours`` most similar items."""
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=0)).ravel())
    xn = x @ sp.diags(1.0 / np.maximum(norms, 1e-12))
    sim = (xn.T @ xn).toarray().astype(np.float32)
    np.fill_diagonal(sim, 0.0)
    k = min(neighbours, sim.shape[0] - 1)
    if k < sim.shape[0] - 1:
        drop = np.argpartition(-sim, k, axis=0)[k:]  # per column: all but the k largest
        np.put_along_axis(sim, drop, 0.0, axis=0)
    return sim


def item_knn_scores(x: sp.csr_matrix, neighbours: int) -> np.ndarray:
    """Item-kNN scores: sum of the similarities between a candidate and the user's items."""
    return np.asarray(x @ item_knn_weights(x, neighbours), dtype=np.float32)


SCORERS: dict[str, Callable[..., np.ndarray]] = {
    "most-popular": popularity_scores,
    "ALS (implicit)": als_scores,
    "EASE^R": ease_scores,
    "item-kNN (cosine)": item_knn_scores,
}

RETRIEVAL_GRIDS: dict[str, tuple[Dimension, ...]] = {
    "most-popular": (),
    "ALS (implicit)": (
        Dimension("factors", (8, 16, 24, 32, 64, 128), integer=True, lower=1, upper=1024),
        Dimension("regularization", (0.1, 0.3, 1.0, 3.0, 10.0, 30.0), lower=1e-4),
        Dimension("alpha", (0.3, 1.0, 2.0, 3.0, 5.0, 10.0), lower=1e-3),
        Dimension("iterations", (5, 10, 15, 20, 30, 50), integer=True, lower=1, upper=200),
    ),
    "EASE^R": (Dimension("lam", (25.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1600.0, 3200.0), lower=1e-2),),
    "item-kNN (cosine)": (Dimension("neighbours", (10, 25, 50, 100, 200, 300, 400, 600, 800), integer=True, lower=1),),
}
"""Initial ladders; the search widens any whose best value lands on an edge."""

RETRIEVAL_STARTS: dict[str, Params] = {
    "ALS (implicit)": {"factors": 32, "regularization": 1.0, "alpha": 1.0, "iterations": 15},  # quality.py's
}


def typed(dims: Sequence[Dimension], params: Mapping[str, float]) -> dict[str, Any]:
    """Parameters cast to int where the dimension is integer."""
    kinds = {d.name: d.integer for d in dims}
    return {k: int(v) if kinds.get(k) else float(v) for k, v in params.items()}


# -- results ---------------------------------------------------------------------------------------------


@dataclass
class BaselineResult:
    """One baseline on one split seed: its search (if tuned), validation and test metrics."""

    task: str
    name: str
    seed: int
    search: SearchResult | None
    val: dict[str, float]
    test: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    init_seeds: dict[str, list[float]] = field(default_factory=dict)
    """For randomly initialised models: val and test NDCG@K of the chosen parameters per init seed."""


def tune_retrieval(
    name: str,
    data: RetrievalData,
    seed: int,
    val_frac: float = 0.15,
    log: Callable[[str], None] | None = None,
) -> BaselineResult:
    """Tune one retrieval baseline on a hold-out of train, refit on all of train, score on test."""
    started = time.time()
    scorer, dims = SCORERS[name], RETRIEVAL_GRIDS[name]
    fit, hold = holdout_split(data.train, val_frac, seed)
    x_fit = interaction_matrix(fit, data.n_users, data.n_items)

    def objective(params: Params) -> tuple[float, dict[str, float]]:
        m = retrieval_metrics(scorer(x_fit, **typed(dims, params)), data.items, fit, hold)
        return m[f"ndcg@{K}"], m

    search = None
    if dims:
        search = coordinate_search(objective, dims, RETRIEVAL_STARTS.get(name), log=log)
        params = typed(dims, search.best)
        val = {k: v for k, v in search.best_extra.items() if k != "seconds"}
    else:
        params = {}
        val = objective({})[1]
    x_train = interaction_matrix(data.train, data.n_users, data.n_items)
    test = retrieval_metrics(scorer(x_train, **params), data.items, data.train, data.test)
    spread: dict[str, list[float]] = {}
    if "random_state" in inspect.signature(scorer).parameters:  # how much of a margin is initialisation luck
        for state in range(INIT_SEEDS):
            val_s = retrieval_metrics(scorer(x_fit, **params, random_state=state), data.items, fit, hold)
            test_s = retrieval_metrics(scorer(x_train, **params, random_state=state), data.items, data.train, data.test)
            spread.setdefault("val", []).append(val_s[f"ndcg@{K}"])
            spread.setdefault("test", []).append(test_s[f"ndcg@{K}"])
    return BaselineResult("retrieval", name, seed, search, val, test, params, time.time() - started, spread)


def run_retrieval(
    work: Path, seed: int, val_frac: float = 0.15, log: Callable[[str], None] | None = None
) -> list[BaselineResult]:
    """Every retrieval baseline on the split of ``seed``."""
    data = load_retrieval(prepare_retrieval(work / f"ml-retrieval-{seed}", seed))
    results = []
    for name in SCORERS:
        if log:
            log(f"[baselines] retrieval seed {seed}: {name}")
        results.append(tune_retrieval(name, data, seed, val_frac, log))
    return results


# -- ranking ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tabular:
    """The encoded features of every row of one split, read back from its MDS shards."""

    dense: np.ndarray
    """(rows, dense features), standardised with train statistics."""
    categorical: np.ndarray
    """(rows, single-hot sparse features): vocabulary indices, 0 out of vocabulary."""
    multi: list[sp.csr_matrix]
    """One 0/1 (rows, cardinality) matrix per multi-hot feature."""
    labels: np.ndarray


def load_tabular(path: Path, split: str, cache: Path) -> Tabular:
    """Read one split of a prepared dataset through the project's StreamingDataModule."""
    from datamodules.streaming import StreamingDataModule

    meta = read_metadata(path)
    single = [f for f in meta.sparse_features if not f.multi_hot]
    multi = [f for f in meta.sparse_features if f.multi_hot]
    dm = StreamingDataModule(
        DataConfig(path=str(path), batch_size=meta.block_rows * 8, shuffle=False, cache_dir=str(cache))
    )
    loader = {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[split]()
    dense, cats, labels = [], [], []
    multis: list[list[sp.csr_matrix]] = [[] for _ in multi]
    for b in loader:
        n = len(b.labels)
        dense.append(b.dense_features.numpy())
        cats.append(np.stack([b.sparse_features[f.name].values().numpy() for f in single], axis=1))
        for j, f in enumerate(multi):
            jt = b.sparse_features[f.name]
            rows = np.repeat(np.arange(n), jt.lengths().numpy())
            ones = np.ones(len(rows), dtype=np.float32)
            multis[j].append(sp.csr_matrix((ones, (rows, jt.values().numpy())), shape=(n, f.cardinality)))
        labels.append(b.labels.numpy())
    dm.teardown()
    return Tabular(
        dense=np.concatenate(dense),
        categorical=np.concatenate(cats),
        multi=[sp.vstack(parts).tocsr() for parts in multis],
        labels=np.concatenate(labels),
    )


def onehot_features(tab: Tabular, meta: DatasetMetadata) -> sp.csr_matrix:
    """bench/quality.py's logistic-regression features: dense, one-hot single, averaged multi-hot."""
    n = len(tab.labels)
    single = [f for f in meta.sparse_features if not f.multi_hot]
    parts = [sp.csr_matrix(tab.dense)]
    for j, f in enumerate(single):
        ones = np.ones(n, dtype=np.float32)
        parts.append(sp.csr_matrix((ones, (np.arange(n), tab.categorical[:, j])), shape=(n, f.cardinality)))
    for m in tab.multi:
        counts = np.asarray(m.sum(axis=1)).ravel()
        parts.append(sp.diags(1.0 / np.maximum(counts, 1)) @ m)
    return sp.hstack(parts).tocsr()


def lightgbm_frame(tab: Tabular, meta: DatasetMetadata) -> pd.DataFrame:
    """LightGBM's table: dense columns, single-hot features as categoricals, multi-hot as 0/1 columns."""
    cols: dict[str, Any] = {f.name: tab.dense[:, j] for j, f in enumerate(meta.dense_features)}
    single = [f for f in meta.sparse_features if not f.multi_hot]
    multi = [f for f in meta.sparse_features if f.multi_hot]
    for j, f in enumerate(single):
        cols[f.name] = tab.categorical[:, j].astype(np.int32)
    for m, f in zip(tab.multi, multi, strict=True):
        dense_m = m.toarray()
        for v in range(1, f.cardinality):
            cols[f"{f.name}_{v}"] = dense_m[:, v].astype(np.float32)
    return pd.DataFrame(cols)


def categorical_columns(meta: DatasetMetadata) -> list[str]:
    """Names of LightGBM's categorical columns (every single-hot sparse feature, ids included)."""
    return [f.name for f in meta.sparse_features if not f.multi_hot]


LOGREG_GRID = (Dimension("C", (0.01, 0.03, 0.1, 0.3, 1.0, 3.0), lower=1e-5, upper=1e4),)
"""bench/quality.py's C grid, widened by the search if its best lands on an edge."""

LIGHTGBM_GRID = (
    Dimension("num_leaves", (7, 15, 31, 63), integer=True, lower=2, upper=1024),
    Dimension("learning_rate", (0.02, 0.05, 0.1), lower=0.01, upper=0.5),
    Dimension("min_data_in_leaf", (10, 30, 100, 300), integer=True, lower=1, upper=5000),
    Dimension("cat_smooth", (1.0, 10.0, 100.0), lower=0.01, upper=1e4),
    Dimension("cat_l2", (1.0, 10.0, 100.0), lower=0.01, upper=1e4),
    Dimension("min_data_per_group", (10, 100, 300), integer=True, lower=1, upper=5000),
)
"""Initial ladders; learning_rate stops at 0.01 (lower rates only buy slower training)."""

LIGHTGBM_START: Params = {
    "num_leaves": 31,
    "learning_rate": 0.05,
    "min_data_in_leaf": 30,
    "cat_smooth": 10.0,
    "cat_l2": 10.0,
    "min_data_per_group": 100,
}
MAX_ROUNDS = 3000
EARLY_STOP = 100


def logreg_auc(xtr: sp.csr_matrix, ytr: np.ndarray, xev: sp.csr_matrix, yev: np.ndarray, c: float) -> float:
    """AUC on (xev, yev) of an L2 logistic regression fitted on (xtr, ytr)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    model = LogisticRegression(C=c, max_iter=2000).fit(xtr, ytr)
    return float(roc_auc_score(yev, model.decision_function(xev)))


def lightgbm_fit(
    params: Mapping[str, Any],
    train: tuple[pd.DataFrame, np.ndarray],
    val: tuple[pd.DataFrame, np.ndarray],
    categorical: list[str],
    threads: int = THREADS,
) -> Any:
    """A binary LightGBM booster on train, early-stopped on val AUC (at most MAX_ROUNDS trees)."""
    import lightgbm as lgb

    full = {
        "objective": "binary",
        "metric": "auc",
        "verbosity": -1,
        "num_threads": threads,
        "seed": 0,
        "deterministic": True,
        "force_row_wise": True,
        **params,
    }
    dtrain = lgb.Dataset(train[0], train[1], categorical_feature=categorical, free_raw_data=False)
    dval = lgb.Dataset(val[0], val[1], reference=dtrain, categorical_feature=categorical)
    return lgb.train(
        full,
        dtrain,
        num_boost_round=MAX_ROUNDS,
        valid_sets=[dval],
        callbacks=[lgb.early_stopping(EARLY_STOP, verbose=False)],
    )


def run_ranking(work: Path, seed: int, log: Callable[[str], None] | None = None) -> list[BaselineResult]:
    """Logistic regression and LightGBM on the ranking split of ``seed``, tuned on its val split."""
    from sklearn.metrics import roc_auc_score

    path = prepare_ranking(work / f"ml-ranking-{seed}", seed)
    meta = read_metadata(path)
    tabs = {s: load_tabular(path, s, work / f"cache-{seed}-{s}") for s in ("train", "val", "test")}
    y = {s: t.labels for s, t in tabs.items()}
    results = []

    if log:
        log(f"[baselines] ranking seed {seed}: logistic regression")
    started = time.time()
    xo = {s: onehot_features(t, meta) for s, t in tabs.items()}
    search = coordinate_search(
        lambda p: (logreg_auc(xo["train"], y["train"], xo["val"], y["val"], p["C"]), {}), LOGREG_GRID, log=log
    )
    c = search.best["C"]
    test = {"AUC": logreg_auc(xo["train"], y["train"], xo["test"], y["test"], c)}
    results.append(
        BaselineResult(
            "ranking",
            "logistic regression",
            seed,
            search,
            {"AUC": search.best_score},
            test,
            {"C": c},
            time.time() - started,
        )
    )

    if log:
        log(f"[baselines] ranking seed {seed}: LightGBM")
    started = time.time()
    frames = {s: lightgbm_frame(t, meta) for s, t in tabs.items()}
    cats = categorical_columns(meta)

    def objective(params: Params) -> tuple[float, dict[str, float]]:
        booster = lightgbm_fit(
            typed(LIGHTGBM_GRID, params), (frames["train"], y["train"]), (frames["val"], y["val"]), cats
        )
        return float(booster.best_score["valid_0"]["auc"]), {"n_estimators": float(booster.best_iteration)}

    search = coordinate_search(objective, LIGHTGBM_GRID, LIGHTGBM_START, log=log)
    params = typed(LIGHTGBM_GRID, search.best)
    booster = lightgbm_fit(params, (frames["train"], y["train"]), (frames["val"], y["val"]), cats)
    scores = booster.predict(frames["test"], num_iteration=booster.best_iteration)
    test = {"AUC": float(roc_auc_score(y["test"], scores))}
    params["n_estimators"] = int(booster.best_iteration)
    results.append(
        BaselineResult(
            "ranking", "LightGBM", seed, search, {"AUC": search.best_score}, test, params, time.time() - started
        )
    )
    return results


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean (NaN for an empty sequence)."""
    return float(np.mean(values)) if len(values) else math.nan
