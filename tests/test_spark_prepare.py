"""--engine spark produces the same dataset as the local engine (a real local Spark session)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import ratings_frame, tiny_prepare, write_ml100k
from test_prepare import read_rows

from app.cli import main
from datamodules.prepare import prepare

pytestmark = pytest.mark.cluster


def history_rows(path: Path, corpus: dict[str, Any]) -> list[tuple[int, list[int]]]:
    """The per-user train histories of a dataset (from its part files), by user."""
    table = pd.concat([pd.read_parquet(path / f) for f in corpus["histories"]], ignore_index=True)
    assert len(table) > 0
    return sorted((int(u), [int(i) for i in items]) for u, items in zip(table.user_id, table["items"], strict=True))


def _assert_same_dataset(a: Path, b: Path, cache: Path) -> None:
    ma, mb = (json.loads((p / "metadata.json").read_text()) for p in (a, b))
    assert ma["split_rule"].pop("engine") == "local" and mb["split_rule"].pop("engine") == "spark"
    for m in (ma, mb):
        for s in m["splits"].values():
            s.pop("blocks")  # partitions may end in partial blocks at different places
    for da, db in zip(ma.pop("dense_features"), mb.pop("dense_features"), strict=True):
        assert da["name"] == db["name"]
        assert da["mean"] == pytest.approx(db["mean"], rel=1e-9) and da["std"] == pytest.approx(db["std"], rel=1e-9)
    for sa, sb in zip(ma["splits"].values(), mb["splits"].values(), strict=True):
        assert sa["rows"] == sb["rows"] and sa["label_rate"] == pytest.approx(sb["label_rate"], abs=1e-6)
    ma.pop("splits"), mb.pop("splits")
    # the same corpus tables; Spark lists its part files
    ca, cb = ma.pop("corpus"), mb.pop("corpus")
    assert ca.keys() == cb.keys() and ca["pairs"].keys() == cb["pairs"].keys()
    assert ma == mb
    for f in ma["sparse_features"]:
        assert (a / f["vocab_file"]).read_text() == (b / f["vocab_file"]).read_text()
    ra, rb = read_rows(a, cache / "a"), read_rows(b, cache / "b")
    for split in ra:
        cols = list(ra[split].columns)
        x = ra[split].round(4).astype(str).sort_values(cols).reset_index(drop=True)
        y = rb[split][cols].round(4).astype(str).sort_values(cols).reset_index(drop=True)
        pd.testing.assert_frame_equal(x, y)
    assert history_rows(a, ca) == history_rows(b, cb)
    for table in ("users.parquet", "items.parquet"):
        ta, tb = pd.read_parquet(a / table), pd.read_parquet(b / table)
        assert list(ta.columns) == list(tb.columns) and len(ta) == len(tb)
        for c in ta.columns:
            va, vb = ta[c].to_numpy(), tb[c].to_numpy()
            if va.dtype == object:
                assert [list(x) for x in va] == [list(x) for x in vb]
            else:
                assert np.allclose(va, vb, rtol=1e-6)


@pytest.mark.parametrize("split", ["random", "temporal"])
def test_local_and_spark_engines_agree(tmp_path: Path, split: str) -> None:
    src = write_ml100k(tmp_path / "ml", ratings_frame(n_users=25, n_items=30, per_user=10))
    local = tmp_path / "local"
    spark = tmp_path / "spark"
    prepare(tiny_prepare(local, "movielens-100k", source=str(src), split=split))
    prepare(
        tiny_prepare(spark, "movielens-100k", source=str(src), split=split, engine="spark", spark_master="local[2]")
    )
    _assert_same_dataset(local, spark, tmp_path / "cache")


def test_spark_reads_csv_natively_and_reports_bad_values(
    tmp_path: Path, sets2019_zip: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local, spark = tmp_path / "local", tmp_path / "spark"
    prepare(tiny_prepare(local, "sets2019", source=str(sets2019_zip)))
    prepare(tiny_prepare(spark, "sets2019", source=str(sets2019_zip), engine="spark", spark_master="local[2]"))
    _assert_same_dataset(local, spark, tmp_path / "cache")
    bad = tmp_path / "item_ratings.csv"
    bad.write_text("userId,movieId,rating\n1,2,3\n1,3,good\n")
    out = tmp_path / "bad-out"
    code = main(
        [
            "data",
            "prepare",
            "--dataset",
            "sets2019",
            "--source",
            str(bad),
            "--out",
            str(out),
            "--engine",
            "spark",
            "--spark-master",
            "local[1]",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "non-numeric value 'good'" in err[0] and "item_ratings.csv" in err[0]
    assert not out.exists()


def test_both_engines_refuse_the_same_values_with_the_same_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One set of rules (``sources.canonical_interactions``) for both engines: a NaN rating, a label
    outside {0, 1}, a missing id and floating-point ids are refused by each, with one line (the local
    engine adds the line number)."""
    import re

    sources = {
        "nan.csv": "user,item,rating\n1,2,3\n1,3,NaN\n",
        "graded.csv": "user,item,label\n1,2,0\n1,3,7\n",
    }
    for name, text in sources.items():
        (tmp_path / name).write_text(text)
    pd.DataFrame({"user": [69, None, 71], "item": ["a", "b", "c"], "label": [0, 1, 1]}).to_parquet(
        tmp_path / "null-id.parquet"
    )
    pd.DataFrame({"user": ["1", "2"], "item": [3.0, 4.0], "label": [0, 1]}).to_parquet(tmp_path / "float.parquet")
    for name in [*sources, "null-id.parquet", "float.parquet"]:
        lines = {}
        for engine in ("local", "spark"):
            out = tmp_path / f"out-{engine}"
            argv = ["data", "prepare", "--dataset", "interactions", "--source", str(tmp_path / name), "--out", str(out)]
            code = main([*argv, "--engine", engine, "--spark-master", "local[1]"])
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(err) == 1 and str(tmp_path / name) in err[0], (name, engine, err)
            assert not out.exists()
            lines[engine] = re.sub(r" at line \d+", "", err[0])
        assert lines["local"] == lines["spark"], name
