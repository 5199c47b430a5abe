"""The baselines' search and scorers on tiny synthetic inputs (seconds, no dataset)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from bench.baselines import (
    Dimension,
    coordinate_search,
    ease_weights,
    holdout_split,
    interaction_matrix,
    item_knn_weights,
    popularity_scores,
    retrieval_metrics,
    widen,
)


def random_binary(n_users: int = 40, n_items: int = 15, density: float = 0.3, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    return sp.csr_matrix((rng.random((n_users, n_items)) < density).astype(np.float32))


def test_search_widens_past_an_edge_until_the_optimum_is_bracketed() -> None:
    dims = (Dimension("x", (1.0, 2.0, 4.0)), Dimension("n", (1, 2, 3), integer=True, lower=1))
    result = coordinate_search(lambda p: (-((np.log2(p["x"]) - 5) ** 2) - (p["n"] - 2) ** 2, {}), dims)
    assert result.best == {"x": 32.0, "n": 2.0}
    assert result.widened["x"] == [8.0, 16.0, 32.0, 64.0]
    assert result.edges == {"x": "interior", "n": "interior"}
    assert [v for v, _ in result.profile["x"]] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]


def test_search_reports_an_edge_held_by_a_hard_bound() -> None:
    dims = (Dimension("k", (2, 4, 8), integer=True, lower=1, upper=10),)
    result = coordinate_search(lambda p: (p["k"], {}), dims)
    assert result.best == {"k": 10.0}
    assert result.edges["k"] == "upper edge (hard bound 10)"


def test_widen_keeps_the_ladder_ratio_and_respects_bounds() -> None:
    assert widen(Dimension("r", (1.0, 3.0)), [1.0, 3.0, 10.0], upward=True) == 33.0
    assert widen(Dimension("r", (1.0, 3.0), lower=0.5), [1.0, 3.0], upward=False) == 0.5
    assert widen(Dimension("r", (1.0, 3.0), lower=1.0), [1.0, 3.0], upward=False) is None


def test_ease_weights_are_ridge_regressions_of_each_item_on_the_others() -> None:
    x, lam = random_binary(), 3.0
    b = ease_weights(x, lam)
    dense = x.toarray().astype(np.float64)
    for j in range(dense.shape[1]):
        others = np.delete(np.arange(dense.shape[1]), j)
        a = dense[:, others]
        ridge = np.linalg.solve(a.T @ a + lam * np.eye(len(others)), a.T @ dense[:, j])
        np.testing.assert_allclose(b[others, j], ridge, atol=1e-8)
        assert b[j, j] == 0.0


def test_item_knn_keeps_the_k_most_similar_items_per_column() -> None:
    x = random_binary()
    full = item_knn_weights(x, neighbours=100)
    pruned = item_knn_weights(x, neighbours=3)
    assert np.all(np.diag(full) == 0)
    assert np.all((pruned > 0).sum(axis=0) <= 3)
    for j in range(full.shape[1]):
        kept = np.flatnonzero(pruned[:, j])
        assert np.all(full[kept, j] >= np.sort(full[:, j])[-3] - 1e-6)


def test_holdout_is_per_user_disjoint_and_leaves_everyone_something() -> None:
    pairs = pd.DataFrame(
        {"user_id": np.repeat([1, 2, 3], [20, 10, 1]), "item_id": np.arange(31), "label": np.ones(31, np.float32)}
    )
    fit, hold = holdout_split(pairs, 0.15, seed=0)
    assert len(fit) + len(hold) == len(pairs)
    assert set(fit.index).isdisjoint(hold.index)
    assert hold.user_id.value_counts().to_dict() == {1: 3, 2: 2}
    assert set(fit.user_id) == {1, 2, 3}


@pytest.mark.parametrize("scores_of", ["truth", "popularity"])
def test_retrieval_metrics_of_a_perfect_and_a_popularity_scorer(scores_of: str) -> None:
    train = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [1, 2, 2], "label": [1.0, 1.0, 1.0]})
    test = pd.DataFrame({"user_id": [1, 2], "item_id": [3, 1], "label": [1.0, 1.0]})
    x = interaction_matrix(train, 3, 4)
    truth = interaction_matrix(test, 3, 4).toarray()
    scores = truth if scores_of == "truth" else np.asarray(popularity_scores(x))
    m = retrieval_metrics(scores, [1, 2, 3], train, test)
    if scores_of == "truth":
        assert m == {"recall@10": 1.0, "ndcg@10": 1.0}
    else:
        assert 0 < m["ndcg@10"] <= 1.0


def test_search_on_a_plateau_stays_near_the_start_and_says_the_edge_ties() -> None:
    dims = (Dimension("g", (10, 100, 300), integer=True, lower=1),)
    result = coordinate_search(lambda p: (1.0 if p["g"] <= 10 else 0.5, {}), dims, start={"g": 100})
    assert result.best == {"g": 10.0}
    assert result.edges["g"] == "interior (tied with the edge value 1)"


def test_report_renders_saved_results(tmp_path: Path) -> None:
    import pickle

    from bench.baselines import BaselineResult
    from bench.baselines_report import main

    dims = (Dimension("lam", (1.0, 10.0, 100.0)),)
    search = coordinate_search(lambda p: (1 - abs(np.log10(p["lam"]) - 1), {"ndcg@10": 0.2, "recall@10": 0.1}), dims)
    results = [
        BaselineResult(
            "retrieval",
            "EASE^R",
            seed,
            search,
            {"ndcg@10": 0.2, "recall@10": 0.1},
            {"ndcg@10": 0.48, "recall@10": 0.22},
            {"lam": 10.0},
        )
        for seed in (0, 1)
    ]
    saved = tmp_path / "results.pkl"
    saved.write_bytes(pickle.dumps({"results": results, "minutes": 1.0, "load": 0.5, "val_frac": 0.15}))
    main(["--render", str(saved), "--out", str(tmp_path / "b.md")])
    text = (tmp_path / "b.md").read_text()
    assert "| EASE^R | 0.2200 | 0.4800 | 0.2200 | 0.4800 | 0.4800 |" in text
    assert "| lam | 1: 0.0000 · **10: 1.0000** · 100: 0.0000 | interior |" in text
