"""The funnel's candidate features from arrays (issue 22): equal to the per-user dict computation they
replaced, the low-rank EASE^R item-item model against a dense reference, and a crafted model refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.checksums import sha256_file
from core.errors import RecsysError
from modules.candidate_features import (
    LIKE_RATE_PRIOR,
    CandidateFeatures,
    ItemItem,
    ItemItemSpec,
    Known,
    fit_item_item,
    fit_low_rank_ease,
    gram_eigenpairs,
    list_rank,
    load_item_item,
    save_item_item,
    user_item_matrix,
)

N_ITEMS = 40  # vocabulary size + 1 (index 0 is padding)
N_USERS = 30


def tiny(seed: int = 0) -> tuple[Known, np.ndarray, np.ndarray]:
    """Known pairs of N_USERS - 1 users (some without any), the indexed items and their vectors."""
    rng = np.random.default_rng(seed)
    users, items, labels = [], [], []
    for u in range(1, N_USERS):
        if u % 7 == 0:
            continue  # users without known interactions
        mine = rng.choice(np.arange(1, N_ITEMS), size=int(rng.integers(1, 15)), replace=False)
        users += [u] * len(mine)
        items += mine.tolist()
        labels += (rng.random(len(mine)) < 0.6).astype(float).tolist()
    known = Known.from_pairs(np.array(users), np.array(items), np.array(labels), N_USERS)
    index_items = rng.permutation(np.arange(1, N_ITEMS))  # the index's own order
    vectors = rng.normal(size=(len(index_items), 8)).astype(np.float32)
    return known, index_items, vectors


def dense_ease(x: np.ndarray, lam: float) -> np.ndarray:
    """Steck 2019's closed form, dense: B = I - P diag(1/diag P), P = (X^T X + lam I)^-1."""
    p = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))
    b = np.eye(x.shape[1]) - p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


def dense_of(model: object) -> np.ndarray:
    """The items x items B of a ``LowRankEase``, dense (tiny sets only)."""
    v = np.asarray(model.vectors, np.float64)  # type: ignore[attr-defined]
    p = (v * np.asarray(model.coef, np.float64)) @ v.T + np.eye(len(v)) / model.lam  # type: ignore[attr-defined]
    return np.eye(len(v)) - p / np.asarray(model.diag, np.float64)[None, :]  # type: ignore[attr-defined]


def dict_path(
    known: Known,
    index_items: np.ndarray,
    vectors: np.ndarray,
    liked_b: np.ndarray,
    touched_b: np.ndarray,
    users: list[int],
    cand: np.ndarray,
    scores: np.ndarray,
) -> dict[str, np.ndarray]:
    """The computation this module replaced (a dict of arrays per user, a loop over queries), with the same
    item-item weights as dense matrices: the reference the array path must equal."""
    position = {int(i): p for p, i in enumerate(index_items)}
    rows = pd.DataFrame(
        {
            "user": np.repeat(np.arange(known.rows), np.diff(known.indptr)),
            "item": [position.get(int(i), -1) for i in known.items],
            "liked": known.positive,
        }
    )
    rows = rows[rows.item >= 0]
    n = len(index_items)
    positives = np.bincount(rows.item[rows.liked], minlength=n).astype(np.float64)
    counts = np.bincount(rows.item, minlength=n).astype(np.float64)
    rate = float(rows.liked.mean())
    popularity = np.log((positives + 1.0) / (positives.sum() + n)).astype(np.float32)
    like_rate = ((positives + LIKE_RATE_PRIOR * rate) / (counts + LIKE_RATE_PRIOR)).astype(np.float32)
    touched = {int(u): g.to_numpy() for u, g in rows.groupby("user").item}
    likes = {int(u): g.to_numpy() for u, g in rows[rows.liked].groupby("user").item}
    user_rate = {
        int(u): float((r["sum"] + LIKE_RATE_PRIOR * rate) / (r["count"] + LIKE_RATE_PRIOR))
        for u, r in rows.groupby("user").liked.agg(["sum", "count"]).iterrows()
    }
    m, width = cand.shape
    pos = np.vectorize(lambda i: position.get(int(i), 0))(cand)
    out = {k: np.zeros((m, width), np.float32) for k in ("sim_mean", "sim_max", "ii", "tii")}
    by_item = np.zeros((N_ITEMS,), np.int64)
    by_item[index_items] = np.arange(n)
    for q, u in enumerate(users):
        t, li = touched.get(u, np.zeros(0, np.int64)), likes.get(u, np.zeros(0, np.int64))
        if len(t):
            sims = vectors[t] @ vectors[pos[q]].T
            out["sim_mean"][q], out["sim_max"][q] = sims.mean(axis=0), sims.max(axis=0)
        items_t, items_l = index_items[t], index_items[li]
        out["ii"][q] = liked_b[items_l][:, cand[q]].sum(axis=0)
        out["tii"][q] = touched_b[items_t][:, cand[q]].sum(axis=0)
    finite = scores.astype(np.float32)
    best = out["ii"].max(axis=1, keepdims=True)
    return {
        "retrieval_score": finite,
        "retrieval_gap": finite - finite[:, :1],
        "retrieval_rank": np.broadcast_to(np.log1p(np.arange(width, dtype=np.float32)), (m, width)),
        "item_popularity": popularity[pos],
        "item_like_rate": like_rate[pos],
        "user_activity": np.repeat(np.log1p([len(touched.get(u, [])) for u in users])[:, None], width, 1),
        "user_like_rate": np.repeat(np.array([user_rate.get(u, rate) for u in users])[:, None], width, 1),
        "history_similarity_mean": out["sim_mean"],
        "history_similarity_max": out["sim_max"],
        "item_item_score": out["ii"],
        "item_item_gap": out["ii"] - best,
        "item_item_rank": list_rank(out["ii"]),
        "popularity_rank": list_rank(popularity[pos]),
        "touched_item_item_score": out["tii"],
    }


def test_features_from_arrays_equal_the_per_user_dict_path() -> None:
    known, index_items, vectors = tiny()
    model = fit_item_item(known, N_ITEMS, ItemItemSpec(rank=12, lam=5.0))
    features = CandidateFeatures(known, N_ITEMS, index_items, vectors, model)
    rng = np.random.default_rng(1)
    users = list(range(N_USERS))  # user 0 and users without pairs: nothing known
    seen = [set(known.items[known.indptr[u] : known.indptr[u + 1]].tolist()) for u in users]
    cand = np.stack([rng.choice([i for i in index_items if i not in s], 6, replace=False) for s in seen])
    scores = -np.sort(-rng.random(cand.shape), axis=1).astype(np.float32)
    got = features.compute(cand, scores, features.rows_of(np.array(users)))
    want = dict_path(known, index_items, vectors, dense_of(model.liked), dense_of(model.touched), users, cand, scores)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_features_of_a_block_equal_those_of_each_query_alone_and_padding_is_zero() -> None:
    known, index_items, vectors = tiny(2)
    model = fit_item_item(known, N_ITEMS, ItemItemSpec(rank=8, lam=3.0))
    features = CandidateFeatures(known, N_ITEMS, index_items, vectors, model)
    cand = np.tile(index_items[:5], (N_USERS, 1))
    cand[3, 2:] = 0  # the index had no more for this query
    scores = np.where(cand > 0, 0.5, -np.inf).astype(np.float32)
    users = np.arange(N_USERS)
    block = features.compute(cand, scores, features.rows_of(users))
    for u in (1, 3, 9):
        alone = features.compute(cand[u : u + 1], scores[u : u + 1], features.rows_of(users[u : u + 1]))
        for name, value in alone.items():
            np.testing.assert_allclose(block[name][u : u + 1], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert all((value[3, 2:] == 0).all() for value in block.values())
    history = features.compute(cand[:1], scores[:1], features.rows_of_histories([index_items[5:9]]), anonymous=True)
    assert np.allclose(history["user_like_rate"], features.prior_like_rate)


def test_low_rank_ease_at_full_rank_is_dense_ease_and_scores_match_it() -> None:
    known, _, _ = tiny(3)
    x = user_item_matrix(known.indptr, known.items, known.positive, N_ITEMS)
    rank = min(x.shape) - 1
    model = fit_low_rank_ease(x, ItemItemSpec(rank=rank, lam=4.0))
    reference = dense_ease(x.toarray().astype(np.float64), 4.0)
    # the Gram's rank is at most the number of items with a like: past it the truncation is exact
    np.testing.assert_allclose(dense_of(model), reference, atol=2e-4)
    features = CandidateFeatures(known, N_ITEMS, np.arange(1, N_ITEMS), np.zeros((N_ITEMS - 1, 4), np.float32))
    features.item_item = ItemItem(model_spec := ItemItemSpec(rank, 4.0), model, model)
    assert model_spec.rank == rank
    cand = np.tile(np.arange(1, 11), (N_USERS, 1))
    got = features.compute(cand, np.zeros(cand.shape, np.float32), features.rows_of(np.arange(N_USERS)))
    want = (x.toarray() @ reference)[:, 1:11]
    np.testing.assert_allclose(got["item_item_score"], want, atol=2e-3)


def test_a_truncated_gram_stays_close_to_dense_ease_and_memory_is_items_times_rank() -> None:
    known, _, _ = tiny(4)
    x = user_item_matrix(known.indptr, known.items, known.positive, N_ITEMS)
    model = fit_low_rank_ease(x, ItemItemSpec(rank=6, lam=50.0))
    assert model.vectors.shape == (N_ITEMS, 6)
    reference = dense_ease(x.toarray().astype(np.float64), 50.0)
    assert np.abs(dense_of(model) - reference).max() < 0.05  # heavy regularisation: the tail matters little


def test_gram_eigenpairs_by_user_blocks_match_scikit_learn_and_a_dense_eigendecomposition() -> None:
    """The blocked range finder (the Gram applied a few users at a time) finds what scikit-learn's
    randomized SVD of X finds (its squared singular values and right singular vectors) and numpy's
    eigh of the dense Gram, whatever the block size."""
    from scipy import sparse
    from sklearn.utils.extmath import randomized_svd

    rng = np.random.default_rng(7)
    # a low-rank-plus-noise interaction matrix: a decaying spectrum, as real data has
    users, items, rank = 600, 120, 10
    scales = 3.0 * 0.8 ** np.arange(30)
    taste = (rng.normal(size=(users, 30)) * scales) @ rng.normal(size=(30, items)) + rng.normal(size=(users, items))
    x = sparse.csr_matrix((taste > 2.0).astype(np.float32))
    dense = np.linalg.eigh(x.T.toarray().astype(np.float64) @ x.toarray())
    want_values, want_vectors = dense[0][::-1][:rank], dense[1][:, ::-1][:, :rank]
    _, singular, vt = randomized_svd(x, n_components=rank, n_iter=4, random_state=0)
    for block_nnz in (1, 97, 10**9):  # one user per block, a few dozen, all at once
        values, vectors = gram_eigenpairs(x, rank, block_nnz=block_nnz)
        assert vectors.shape == (items, rank) and vectors.dtype == np.float32
        np.testing.assert_allclose(values, want_values, rtol=3e-3)  # scikit-learn's own error here: 2.8e-3
        np.testing.assert_allclose(values, singular.astype(np.float64) ** 2, rtol=5e-3)
        # the same directions (up to sign): |cosine| with the reference's eigenvectors ~ 1
        np.testing.assert_allclose(np.abs(np.sum(vectors * want_vectors, axis=0)), 1.0, atol=3e-3)
        np.testing.assert_allclose(np.abs(np.sum(vectors * vt.T, axis=0)), 1.0, atol=5e-3)


def saved(tmp_path: Path) -> tuple[Path, Known]:
    known, _, _ = tiny(5)
    save_item_item(fit_item_item(known, N_ITEMS, ItemItemSpec(rank=8, lam=5.0)), tmp_path / "ii", "fp1")
    return tmp_path / "ii", known


def reseal(directory: Path, name: str) -> None:
    """Record a file's new SHA-256 in the manifest: a crafted model whose checksums agree."""
    manifest = json.loads((directory / "item_item.json").read_text())
    manifest["files"][name] = sha256_file(directory / name)
    (directory / "item_item.json").write_text(json.dumps(manifest))


def test_a_saved_model_loads_memory_mapped_and_scores_the_same(tmp_path: Path) -> None:
    directory, known = saved(tmp_path)
    loaded = load_item_item(directory, "fp1", N_ITEMS, "bundle/item_item")
    assert isinstance(loaded.liked.vectors, np.memmap)
    fitted = fit_item_item(known, N_ITEMS, ItemItemSpec(rank=8, lam=5.0))
    np.testing.assert_allclose(np.asarray(loaded.touched.vectors), fitted.touched.vectors, atol=1e-6)


@pytest.mark.parametrize(
    ("craft", "message"),
    [
        (lambda d: np.save(d / "liked.diag.npy", -np.ones(N_ITEMS, np.float32)), "liked.diag: a value that is not"),
        (lambda d: np.save(d / "touched.vectors.npy", np.ones((N_ITEMS - 3, 8), np.float32)), "rows for 40 items"),
        (lambda d: np.save(d / "liked.coef.npy", np.ones(8, np.float32)), "not EASE^R coefficients"),
        (lambda d: np.save(d / "liked.vectors.npy", np.ones((N_ITEMS, 8), np.float64)), "2-d float32 array"),
        (lambda d: np.save(d / "liked.coef.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True), "readable"),
    ],
)
def test_a_crafted_array_with_agreeing_checksums_is_refused_in_one_line(tmp_path: Path, craft, message) -> None:
    directory, _ = saved(tmp_path)
    before = {p.name for p in directory.iterdir()}
    craft(directory)
    changed = [p.name for p in directory.iterdir() if p.suffix == ".npy"]
    for name in changed:
        reseal(directory, name)
    assert {p.name for p in directory.iterdir()} == before
    with pytest.raises(RecsysError) as e:
        load_item_item(directory, "fp1", N_ITEMS, "bundle/item_item")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_changed_array_another_dataset_or_a_missing_manifest_is_refused(tmp_path: Path) -> None:
    directory, _ = saved(tmp_path)
    with pytest.raises(RecsysError, match="fitted on another dataset"):
        load_item_item(directory, "fp2", N_ITEMS, "bundle/item_item")
    with pytest.raises(RecsysError, match="holds 40 items"):
        load_item_item(directory, "fp1", N_ITEMS + 1, "bundle/item_item")
    np.save(directory / "liked.diag.npy", np.ones(N_ITEMS, np.float32))
    with pytest.raises(RecsysError, match=r"liked.diag.npy: its SHA-256 is not the recorded one"):
        load_item_item(directory, "fp1", N_ITEMS, "bundle/item_item")
    (directory / "item_item.json").unlink()
    with pytest.raises(RecsysError, match=r"no item_item\.json"):
        load_item_item(directory, "fp1", N_ITEMS, "bundle/item_item")
