"""The funnel recipe's two copies of one source (``--val-frac 0.3`` to label, ``--val-frac 0`` to refit)
share one test split on every engine and dataset kind: the same test rows, no test pair in either
copy's train, and the refit copy's train = the labelling copy's train + val (issue 22).

Every source here repeats (user, item) pairs, as synthetic-retrieval and real logs do: a split per row
put a pair's repeats in test and in val, so the refit copy trained on test pairs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ratings_frame, tiny_prepare, write_ml100k, write_sets2019_zip
from test_prepare import read_rows
from test_prepare_scale import in_memory

from datamodules.config import PrepareConfig, SyntheticConfig
from datamodules.encoding import assign_split, row_keys
from datamodules.prepare import prepare
from datamodules.schema import SPLITS, corpus_files, read_metadata, read_vocab

LABEL, REFIT = 0.3, 0.0
"""``--val-frac`` of the labelling and of the refit copy."""

Rows = Counter[tuple[str, str, float]]


def repeated_ratings(seed: int = 0) -> pd.DataFrame:
    """GroupLens-layout ratings where a third of the (user, item) pairs come back later, rated again."""
    frame = ratings_frame(n_users=24, n_items=15, per_user=10, seed=seed)
    again = frame.sample(frac=0.35, random_state=seed)
    again = again.assign(timestamp=again.timestamp + 5_000_000, rating=5.5 - again.rating)
    return pd.concat([frame, again], ignore_index=True)


def split_rows(out: Path) -> dict[str, Rows]:
    """Each split's (user, item, label) rows as raw ids, from the corpus pair files (a multiset)."""
    meta = read_metadata(out)
    files = corpus_files(meta)["pairs"]
    users = [None, *read_vocab(out, meta.feature("user_id"))]
    items = [None, *read_vocab(out, meta.feature("item_id"))]
    rows: dict[str, Rows] = {}
    for split in SPLITS:
        if not files[split]:  # Spark lists no part file for an empty split
            rows[split] = Counter()
            continue
        pairs = pd.concat([pd.read_parquet(out / f) for f in files[split]], ignore_index=True)
        # the test data covers every user and item in train, so no row decodes to out-of-vocabulary
        assert (pairs.user_id > 0).all() and (pairs.item_id > 0).all(), (out, split)
        rows[split] = Counter(
            (str(users[u]), str(items[i]), float(y))
            for u, i, y in zip(pairs.user_id, pairs.item_id, pairs.label, strict=True)
        )
    return rows


def assert_one_test_split(label: dict[str, Rows], refit: dict[str, Rows]) -> None:
    assert sum(label["val"].values()) > 0 and not refit["val"]
    assert label["test"] == refit["test"] and sum(label["test"].values()) > 0
    assert refit["train"] == label["train"] + label["val"]
    test_pairs = {(u, i) for u, i, _ in label["test"]}
    for copy in (label, refit):
        assert not test_pairs & {(u, i) for u, i, _ in copy["train"]}  # what `data candidates` checks
    assert not test_pairs & {(u, i) for u, i, _ in label["val"]}


Make = Callable[[Path, float], Path]
"""Prepare the source into a directory under the given one with that ``--val-frac``; its path."""


def both_copies(tmp_path: Path, make: Make) -> None:
    label = make(tmp_path / "label", LABEL)
    refit = make(tmp_path / "refit", REFIT)
    assert_one_test_split(split_rows(label), split_rows(refit))


def source(tmp_path: Path, kind: str) -> tuple[str, Path]:
    """The dataset name and source path of each file-backed kind, all holding ``repeated_ratings``."""
    frame = repeated_ratings()
    if kind == "csv":
        frame.to_csv(tmp_path / "r.csv", index=False)
        return "interactions", tmp_path / "r.csv"
    if kind == "parquet":
        frame.to_parquet(tmp_path / "r.parquet")
        return "interactions", tmp_path / "r.parquet"
    if kind == "sets2019":
        return "sets2019", write_sets2019_zip(tmp_path / "sets.zip", frame)
    return "movielens-100k", write_ml100k(tmp_path / kind, frame, recbole=kind == "recbole")


def prepared(tmp_path: Path, kind: str, split: str, **kw: object) -> Make:
    dataset, src = source(tmp_path, kind)

    def make(out: Path, val_frac: float) -> Path:
        prepare(tiny_prepare(out, dataset, source=str(src), split=split, val_frac=val_frac, **kw))
        return out

    return make


# -- the local engine: in chunks (interactions files) or whole (sets2019, MovieLens) --------------------


@pytest.mark.parametrize("split", ["random", "temporal"])
@pytest.mark.parametrize("kind", ["csv", "parquet", "sets2019", "movielens", "recbole"])
def test_local_engine(tmp_path: Path, kind: str, split: str) -> None:
    both_copies(tmp_path, prepared(tmp_path, kind, split, chunk_rows=37))


@pytest.mark.parametrize("split", ["random", "temporal"])
def test_in_memory_engine_on_an_interactions_file(tmp_path: Path, split: str) -> None:
    _, src = source(tmp_path, "csv")

    def make(out: Path, val_frac: float) -> Path:
        cfg = tiny_prepare(out, "interactions", source=str(src), split=split, val_frac=val_frac)
        return in_memory(cfg, out)

    both_copies(tmp_path, make)


def retrieval_config(out: Path, split: str, val_frac: float, chunk_rows: int) -> PrepareConfig:
    """A synthetic-retrieval set whose 40 users draw their 3,000 rows from 30 items: pairs repeat."""
    synthetic = SyntheticConfig(users=40, items=30, chunk_rows=chunk_rows)
    return tiny_prepare(out, "synthetic-retrieval", rows=3000, split=split, val_frac=val_frac, synthetic=synthetic)


@pytest.mark.parametrize("split", ["random", "temporal"])
def test_synthetic_retrieval_in_chunks(tmp_path: Path, split: str) -> None:
    def make(out: Path, val_frac: float) -> Path:
        prepare(retrieval_config(out, split, val_frac, chunk_rows=500))
        return out

    both_copies(tmp_path, make)


@pytest.mark.parametrize("split", ["random", "temporal"])
def test_synthetic_retrieval_in_memory(tmp_path: Path, split: str) -> None:
    both_copies(tmp_path, lambda out, val_frac: in_memory(retrieval_config(out, split, val_frac, 1), out))


@pytest.mark.parametrize("split", ["random", "temporal"])
def test_synthetic_ctr(tmp_path: Path, split: str) -> None:
    """No users or items: the rows themselves (label and dense values) are the test split."""
    synthetic = SyntheticConfig(num_dense=2, num_sparse=2, cardinalities=[3, 4], chunk_rows=128)
    rows: dict[str, dict[str, np.ndarray]] = {}
    for name, val_frac in (("label", LABEL), ("refit", REFIT)):
        out = tmp_path / name
        meta = prepare(
            tiny_prepare(out, "synthetic-ctr", rows=400, split=split, val_frac=val_frac, synthetic=synthetic)
        )
        cols = ["label", *(d.name for d in meta.dense_features)]
        rows[name] = {s: f.reindex(columns=cols).to_numpy() for s, f in read_rows(out, tmp_path / name / "c").items()}
    label, refit = rows["label"], rows["refit"]
    assert len(label["val"]) and not len(refit["val"])
    # dense values decode through each copy's own train statistics: equal to float32 precision
    assert_same_rows(label["test"], refit["test"])
    assert_same_rows(refit["train"], np.concatenate([label["train"], label["val"]]))


def assert_same_rows(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and len(a)
    x, y = (r[np.lexsort(np.round(r, 2).T[::-1])] for r in (a, b))
    np.testing.assert_allclose(x, y, atol=1e-3)


# -- the Spark engine -------------------------------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.parametrize(("kind", "split"), [("csv", "random"), ("movielens", "temporal")])
def test_spark_engine(tmp_path: Path, kind: str, split: str) -> None:
    both_copies(tmp_path, prepared(tmp_path, kind, split, engine="spark", spark_master="local[2]"))


# -- the rule itself --------------------------------------------------------------------------------------


def row_level_split(frame: pd.DataFrame, rule: str, val_frac: float, test_frac: float) -> np.ndarray:
    """The rule before pairs were kept together, a row at a time (what a source without repeated
    pairs must still get: MovieLens's published figures rest on it); a temporal split with
    ``val_frac`` 0 now leaves val empty, as the random one does."""
    user = pd.factorize(frame["user"])[0]
    ts = -frame["timestamp"].to_numpy() if rule == "temporal" else np.zeros(len(frame))
    order = np.lexsort((frame["key"].to_numpy(), ts, user))
    code = np.zeros(len(frame), dtype=np.int8)
    for _, rows in pd.Series(order).groupby(user[order], sort=False):
        n = len(rows)
        if rule == "temporal":
            n_test, n_val = int(n >= 2), int(n >= 3 and val_frac > 0)
        else:
            n_test = min(int(np.floor(n * test_frac + 0.5)), n - 1)
            n_val = min(int(np.floor(n * val_frac + 0.5)), n - 1 - n_test)
        code[rows.to_numpy()[:n_test]] = 2
        code[rows.to_numpy()[n_test : n_test + n_val]] = 1
    return code


@pytest.mark.parametrize("split", ["random", "temporal"])
def test_without_repeated_pairs_the_split_is_the_row_level_one(split: str) -> None:
    frame = ratings_frame(n_users=50, n_items=40, per_user=15, seed=4)
    frame = frame.rename(columns={"userId": "user", "movieId": "item"}).astype({"user": str, "item": str})
    frame = frame.assign(key=row_keys(frame, 0))
    for val_frac, test_frac in ((0.1, 0.1), (0.3, 0.2), (0.0, 0.25)):
        np.testing.assert_array_equal(
            assign_split(frame, split, val_frac, test_frac, 0), row_level_split(frame, split, val_frac, test_frac)
        )
