"""recsys data prepare: every source format, split rules, vocabularies, metadata, round trip, errors."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ratings_frame, tiny_prepare, write_ml100k, write_sets2019_zip

from app.cli import main
from datamodules.config import DataConfig, SyntheticConfig
from datamodules.prepare import prepare
from datamodules.schema import read_metadata, read_vocab
from datamodules.streaming import StreamingDataModule

SPLITS = ("train", "val", "test")


def read_rows(path: Path, cache: Path) -> dict[str, pd.DataFrame]:
    """Every row of every split, decoded back to raw values through the vocabularies."""
    meta = read_metadata(path)
    dm = StreamingDataModule(
        DataConfig(path=str(path), batch_size=meta.block_rows * 4, shuffle=False, cache_dir=str(cache))
    )
    vocabs = {f.name: [None, *read_vocab(path, f)] for f in meta.sparse_features}
    out = {}
    for split, loader in (
        ("train", dm.train_dataloader()),
        ("val", dm.val_dataloader()),
        ("test", dm.test_dataloader()),
    ):
        parts = []
        for b in loader:
            kjt = b.sparse_features.to_dict()
            cols = {"label": b.labels.numpy()}
            for f in meta.sparse_features:
                jt = kjt[f.name]
                if f.multi_hot:
                    cols[f.name] = [tuple(sorted(vocabs[f.name][int(v)] or "" for v in row)) for row in jt.to_dense()]
                else:
                    cols[f.name] = [vocabs[f.name][int(v)] for v in jt.values()]
            for j, d in enumerate(meta.dense_features):
                cols[d.name] = b.dense_features[:, j].numpy() * d.std + d.mean
            parts.append(pd.DataFrame(cols))
        out[split] = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    dm.teardown()
    return out


def test_sets2019_zip_round_trip(tmp_path: Path, sets2019_zip: Path, ratings: pd.DataFrame) -> None:
    out = tmp_path / "out"
    meta = prepare(tiny_prepare(out, "sets2019", source=str(sets2019_zip)))
    rows = read_rows(out, tmp_path / "cache")
    assert sum(len(r) for r in rows.values()) == len(ratings)
    assert {k: v.rows for k, v in meta.splits.items()} == {k: len(v) for k, v in rows.items()}
    train_items = set(read_vocab(out, meta.feature("item_id")))
    # every source row comes back once; items unseen in train come back as the OOV index (None)
    got = pd.concat(rows.values())
    expected = ratings.assign(
        user_id=ratings.userId.astype(str),
        item_id=ratings.movieId.astype(str),
        label=(ratings.rating >= 4.0).astype(np.float32),
    )
    expected.loc[~expected.item_id.isin(train_items), "item_id"] = None
    key = ["user_id", "item_id", "label"]
    a = got[key].fillna("<oov>").sort_values(key).reset_index(drop=True)
    b = expected[key].fillna("<oov>").sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_dtype=False)
    assert rows["train"].item_id.notna().all() and rows["train"].user_id.notna().all()


def test_sets2019_csv_and_label_threshold(tmp_path: Path, ratings: pd.DataFrame) -> None:
    csv = tmp_path / "item_ratings.csv"
    ratings.to_csv(csv, index=False)
    meta = prepare(tiny_prepare(tmp_path / "out", "sets2019", source=str(csv), label_threshold=3.0))
    total = sum(s.rows for s in meta.splits.values())
    rate = sum(s.rows * s.label_rate for s in meta.splits.values()) / total
    assert total == len(ratings)
    assert rate == pytest.approx(float((ratings.rating >= 3.0).mean()), abs=1e-6)
    assert meta.label["threshold"] == 3.0


@pytest.mark.parametrize("layout", ["grouplens", "grouplens-zip", "recbole", "recbole-wheel"])
def test_movielens_layouts(tmp_path: Path, ratings: pd.DataFrame, layout: str) -> None:
    src = write_ml100k(tmp_path / "ml", ratings, recbole=layout.startswith("recbole"))
    if layout.endswith("zip") or layout.endswith("wheel"):
        archive = tmp_path / ("recbole-1.2.1-py3-none-any.whl" if layout.endswith("wheel") else "ml-100k.zip")
        prefix = "recbole/dataset_example/ml-100k/" if layout.endswith("wheel") else "ml-100k/"
        with zipfile.ZipFile(archive, "w") as z:
            for p in src.iterdir():
                z.write(p, prefix + p.name)
        src = archive
    out = tmp_path / "out"
    meta = prepare(tiny_prepare(out, "movielens-100k", source=str(src)))
    names = [f.name for f in meta.sparse_features]
    assert names == ["user_id", "item_id", "user_gender", "user_occupation", "user_zip", "item_genres"]
    assert [d.name for d in meta.dense_features] == ["user_age", "item_year"]
    assert meta.feature("item_genres").multi_hot
    assert meta.feature("user_gender").cardinality == 3  # M, F + OOV
    rows = read_rows(out, tmp_path / "cache")
    train = rows["train"]
    # side features come back with the user they belong to
    uid = train.user_id.astype(int)
    assert np.allclose(train.user_age, 20 + uid % 40, atol=1e-3)
    assert (train.user_gender == np.where(uid % 2 == 0, "M", "F")).all()
    assert (train.item_genres.map(len) >= 1).all()
    users = pd.read_parquet(out / "users.parquet")
    items = pd.read_parquet(out / "items.parquet")
    assert list(users.user_id) == list(range(1, meta.feature("user_id").cardinality))
    assert list(items.item_id) == list(range(1, meta.feature("item_id").cardinality))
    assert {"user_gender", "user_age"} <= set(users.columns) and {"item_genres", "item_year"} <= set(items.columns)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_interactions_csv_parquet(tmp_path: Path, ratings: pd.DataFrame, fmt: str) -> None:
    frame = ratings.rename(columns={"userId": "user_id", "movieId": "item_id"})
    frame["label"] = (frame.rating > 3).astype(int)
    src = tmp_path / f"inter.{fmt}"
    frame.to_csv(src, index=False) if fmt == "csv" else frame.to_parquet(src)
    meta = prepare(tiny_prepare(tmp_path / "out", "interactions", source=str(src), rows=200))
    assert sum(s.rows for s in meta.splits.values()) == 200
    assert meta.label["definition"] == "label column of the source"


def test_random_split_rule(tmp_path: Path) -> None:
    ratings = ratings_frame(n_users=40, per_user=20)
    csv = tmp_path / "r.csv"
    ratings.to_csv(csv, index=False)
    out = tmp_path / "out"
    meta = prepare(tiny_prepare(out, "sets2019", source=str(csv), val_frac=0.1, test_frac=0.2))
    rows = read_rows(out, tmp_path / "cache")
    for user, count in rows["test"].user_id.value_counts().items():
        assert count == 4, user  # round(20 * 0.2) per user
    assert (rows["val"].user_id.value_counts() == 2).all()
    assert set(rows["train"].user_id) == {str(u) for u in ratings.userId.unique()}
    # vocabularies hold exactly the train values
    assert set(read_vocab(out, meta.feature("item_id"))) == set(rows["train"].item_id)
    assert set(read_vocab(out, meta.feature("user_id"))) == set(rows["train"].user_id)
    assert meta.split_rule["rule"] == "random" and meta.split_rule["test_frac"] == 0.2


def test_temporal_split_rule(tmp_path: Path, ratings: pd.DataFrame) -> None:
    csv = tmp_path / "r.csv"
    ratings.to_csv(csv, index=False)
    out = tmp_path / "out"
    prepare(tiny_prepare(out, "sets2019", source=str(csv), split="temporal"))
    meta = read_metadata(out)
    assert meta.splits["test"].rows == meta.splits["val"].rows == ratings.userId.nunique()
    # no leakage from the future: every user's test interaction is their latest, val the one before
    ts = ratings.assign(user=ratings.userId.astype(str)).groupby("user").timestamp
    latest, second = ts.max(), ts.apply(lambda s: s.nlargest(2).iloc[-1])
    rows = read_rows(out, tmp_path / "cache")
    by_split = {k: v.assign(user=v.user_id) for k, v in rows.items()}
    # recover timestamps by joining rows back to the source (user, item) pairs
    src = ratings.assign(user=ratings.userId.astype(str), item_id=ratings.movieId.astype(str))
    test = by_split["test"].dropna(subset=["item_id"]).merge(src, on=["user", "item_id"])
    assert (test.timestamp.to_numpy() == latest.loc[test.user].to_numpy()).all()
    val = by_split["val"].dropna(subset=["item_id"]).merge(src, on=["user", "item_id"])
    assert (val.timestamp.to_numpy() == second.loc[val.user].to_numpy()).all()
    train = by_split["train"].merge(src, on=["user", "item_id"])
    assert (train.timestamp.to_numpy() < second.loc[train.user].to_numpy()).all()


def test_synthetic_retrieval(tmp_path: Path) -> None:
    out = tmp_path / "out"
    meta = prepare(tiny_prepare(out, "synthetic-retrieval", rows=3000))
    assert sum(s.rows for s in meta.splits.values()) == 3000
    truth = np.load(out / "ground_truth.npz")
    assert truth["user_factors"].shape[1] == truth["item_factors"].shape[1] == 8
    assert meta.feature("item_tags").multi_hot
    assert 0.2 < meta.splits["train"].label_rate < 0.9
    # popularity is skewed: the top 10% of items take far more than 10% of interactions
    counts = np.sort(np.bincount(read_rows(out, tmp_path / "c")["train"].item_id.astype(int)))[::-1]
    assert counts[: max(1, len(counts) // 10)].sum() > 0.25 * counts.sum()


def test_synthetic_ctr_metadata(ctr_dataset: Path) -> None:
    meta = read_metadata(ctr_dataset)
    assert meta.task == "ctr" and len(meta.dense_features) == 4
    assert [f.multi_hot for f in meta.sparse_features] == [False, False, True]
    assert all(f.cardinality <= c + 1 for f, c in zip(meta.sparse_features, [5, 50, 20], strict=True))
    assert 0.6 < meta.extra["planted_test_auc"] < 1.0
    assert sum(s.rows for s in meta.splits.values()) == 2048
    assert meta.splits["train"].rows > 1500


def test_synthetic_ctr_signal_sits_in_popular_ids(ctr_dataset: Path, tmp_path: Path) -> None:
    from datamodules.config import PrepareConfig
    from datamodules.synthetic import MIN_ID_COUNT, PlantedCtr

    planted = PlantedCtr.create(PrepareConfig(dataset="synthetic-ctr", out=str(tmp_path)))
    by_rank = planted.effects[-1][planted.perms[-1]]  # the 100k-value feature, most popular id first
    assert by_rank[:50].std() > 20 * by_rank[10_000:].std()
    # ids seen fewer than MIN_ID_COUNT times in train are out of vocabulary (decoded as None)
    single = read_rows(ctr_dataset, tmp_path / "c")["train"].C2
    counts = single[single.notna()].value_counts()
    assert len(counts) and counts.min() >= MIN_ID_COUNT and single.isna().any()


def test_synthetic_ctr_cardinalities_default_and_temporal(tmp_path: Path) -> None:
    meta = prepare(
        tiny_prepare(
            tmp_path / "o", "synthetic-ctr", rows=500, split="temporal", synthetic=SyntheticConfig(chunk_rows=128)
        )
    )
    assert len(meta.sparse_features) == 26 and len(meta.dense_features) == 13
    assert meta.splits["test"].rows == 50 and meta.splits["val"].rows == 50


def test_metadata_contents(tmp_path: Path, sets2019_zip: Path) -> None:
    out = tmp_path / "out"
    prepare(tiny_prepare(out, "sets2019", source=str(sets2019_zip)))
    raw = json.loads((out / "metadata.json").read_text())
    assert raw["source"]["sha256"] and raw["source"]["path"] == str(sets2019_zip)
    for f in raw["sparse_features"]:
        assert f["cardinality"] == len(json.loads((out / f["vocab_file"]).read_text())) + 1
    for split in SPLITS:
        index = json.loads((out / split / "index.json").read_text())
        assert sum(s["samples"] for s in index["shards"]) == raw["splits"][split]["blocks"]
        assert all(s["compression"] == "zstd" for s in index["shards"])


def test_existing_output_and_overwrite(tmp_path: Path, sets2019_zip: Path) -> None:
    out = tmp_path / "out"
    argv = [
        "data",
        "prepare",
        "--dataset",
        "sets2019",
        "--source",
        str(sets2019_zip),
        "--out",
        str(out),
        "--block-rows",
        "8",
    ]
    assert main(argv) == 0
    assert main(argv) == 2
    assert main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sets.zip"]


def _corrupt_zip(tmp_path: Path) -> Path:
    good = write_sets2019_zip(tmp_path / "good.zip", ratings_frame())
    data = bytearray(good.read_bytes())
    data[40:80] = b"\x00" * 40
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(data))
    return bad


BAD_INPUTS = {
    "missing file": (lambda p: p / "nope.zip", "no such file"),
    "corrupt zip": (_corrupt_zip, "corrupt zip"),
    "missing column": (lambda p: _csv(p, "userId,movieId,timestamp\n1,2,3\n"), "missing rating column"),
    "misnamed column": (lambda p: _csv(p, "uid,movieId,rating\n1,2,3\n"), "missing user id column"),
    "non-numeric rating": (lambda p: _csv(p, "userId,movieId,rating\n1,2,3\n1,3,good\n"), "non-numeric value 'good'"),
    "NaN rating": (lambda p: _csv(p, "userId,movieId,rating\n1,2,3\n1,3,NaN\n"), "'NaN' at line 3"),
    "infinite rating": (lambda p: _csv(p, "userId,movieId,rating\n1,2,3\n1,3,inf\n"), "not a finite number, 'inf'"),
    "label outside 0/1": (
        lambda p: _csv(p, "userId,movieId,label\n1,2,0\n1,3,7\n"),
        "column 'label' has the value '7' at line 3; labels must be 0 or 1",
    ),
    "empty user id": (lambda p: _csv(p, "userId,movieId,rating\n1,2,3\n ,3,4\n"), "empty or missing id at line 3"),
    "empty file": (lambda p: _csv(p, ""), "file is empty"),
    "header only": (lambda p: _csv(p, "userId,movieId,rating\n"), "no data rows"),
}


def _csv(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "item_ratings.csv"
    p.write_text(text)
    return p


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_error_and_no_output(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    make, message = BAD_INPUTS[case]
    src = make(tmp_path)
    out = tmp_path / "out"
    before = set(tmp_path.iterdir())
    code = main(["data", "prepare", "--dataset", "sets2019", "--source", str(src), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err and str(src.name) in err, err
    assert set(tmp_path.iterdir()) == before  # nothing half-written, no temporary left behind


def test_parquet_ids_stay_as_written_and_missing_or_float_ids_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    users = [69, 70, 71, 72] * 6
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"user": users, "item": [str(i % 5) for i in range(24)], "label": [0, 1] * 12}), good)
    out = tmp_path / "out"
    assert main(["data", "prepare", "--dataset", "interactions", "--source", str(good), "--out", str(out)]) == 0
    assert json.loads((out / "vocab" / "user_id.json").read_text()) == ["69", "70", "71", "72"]
    capsys.readouterr()
    bad = {
        # pandas writes an integer column with a null as doubles: "69" would have become "69.0"
        "null id": (
            pd.DataFrame({"user": [69, None, 71], "item": ["a", "b", "c"], "label": [0, 1, 1]}),
            "empty or missing id",
        ),
        "float ids": (
            pd.DataFrame({"user": [69.0, 70.0], "item": ["a", "b"], "label": [0, 1]}),
            "column 'user' holds floating-point numbers (double); ids must be integers or strings",
        ),
    }
    for name, (frame, message) in bad.items():
        src = tmp_path / f"{name.replace(' ', '-')}.parquet"
        frame.to_parquet(src)
        code = main(
            ["data", "prepare", "--dataset", "interactions", "--source", str(src), "--out", str(tmp_path / "o")]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0] and str(src) in err[0], (name, err)
        assert not (tmp_path / "o").exists()


def test_a_device_or_pipe_as_source_is_one_line_at_once(tmp_path: Path) -> None:
    """/dev/urandom (or a FIFO) never ends: refused before it is opened. Run in a child process whose
    address space is capped, so that a regression fails with MemoryError instead of eating the host."""
    import os
    import resource
    import subprocess
    import sys

    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    script = (
        "import sys\nfrom app.cli import main\n"
        "for dataset, source in [('interactions', '/dev/urandom'), ('sets2019', '/dev/urandom'), "
        "('movielens-100k', '/dev/urandom'), ('interactions', sys.argv[1])]:\n"
        "    print(main(['data', 'prepare', '--dataset', dataset, '--source', source, '--out', sys.argv[2]]))\n"
    )

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    done = subprocess.run(
        [sys.executable, "-c", script, str(fifo), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=cap,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert done.stdout.split() == ["2"] * 4, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 4 and all("not a regular file" in line for line in lines), lines
    assert not (tmp_path / "out").exists()


def test_bad_dataset_name_and_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "prepare", "--dataset", "nope", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown dataset 'nope'" in err
    assert main(["data", "prepare", "--dataset", "sets2019", "--out", str(tmp_path / "o"), "--split", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "split" in err
    assert main(["data", "prepare", "--dataset", "synthetic-ctr", "--out", str(tmp_path / "o"), "--bogus", "1"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_download_movielens_from_the_recbole_wheel(tmp_path: Path) -> None:
    """The offline-friendly path: the recbole wheel from PyPI, read with zipfile, never installed."""
    dest = tmp_path / "ml"
    assert main(["data", "download", "movielens-100k", "--dest", str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["ml-100k.inter", "ml-100k.item", "ml-100k.user"]
    meta = prepare(tiny_prepare(tmp_path / "out", "movielens-100k", source=str(dest), rows=5000, block_rows=64))
    assert sum(s.rows for s in meta.splits.values()) == 5000
    assert meta.feature("item_genres").cardinality > 10
