"""Data larger than memory: synthetic-retrieval generated in chunks and interaction files read in chunks
give exactly the dataset the in-memory engine writes (same rows, order, blocks, vocabularies, metadata)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ratings_frame, tiny_prepare

from app.cli import main
from core.errors import RecsysError
from datamodules.chunked import interaction_chunks
from datamodules.config import PrepareConfig, SyntheticConfig
from datamodules.integrity import record_shard_hashes
from datamodules.prepare import prepare, prepare_interactions
from datamodules.sources import read_interactions
from datamodules.synthetic_retrieval import generate_retrieval, lexicographic, write_ground_truth


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def assert_same_dataset(a: Path, b: Path, exact_stats: bool = True) -> None:
    """Every file equal: shards, vocabularies, metadata byte for byte; Parquet tables by content
    (row groups may be cut elsewhere; histories may list their users in another order).

    ``exact_stats=False``: the dense features' mean and std may differ in their last bits (the chunked
    writer sums per user and item, pandas per row); the shards still match byte for byte here, as a
    standardised value moves to another float32 only once in ~10^8 rows.
    """
    assert files(a) == files(b)
    for name in files(a):
        if name == "metadata.json" and not exact_stats:
            x, y = (json.loads((d / name).read_text()) for d in (a, b))
            for dx, dy in zip(x.pop("dense_features"), y.pop("dense_features"), strict=True):
                assert dx == {**dy, "mean": pytest.approx(dy["mean"]), "std": pytest.approx(dy["std"])}
            assert x == y
        elif name.endswith(".parquet"):
            x, y = pd.read_parquet(a / name), pd.read_parquet(b / name)
            if name == "histories.parquet":
                x, y = (t.sort_values("user_id").reset_index(drop=True) for t in (x, y))
            assert list(x.columns) == list(y.columns) and list(x.dtypes) == list(y.dtypes), name
            for c in x.columns:
                assert [np.asarray(v).tolist() for v in x[c]] == [np.asarray(v).tolist() for v in y[c]], (name, c)
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def in_memory(cfg: PrepareConfig, out: Path) -> Path:
    """The in-memory engine's dataset (``prepare_interactions`` on the whole table) in ``out``."""
    out.mkdir()
    if cfg.dataset == "synthetic-retrieval":
        raw = generate_retrieval(cfg)
        write_ground_truth(raw, out)
    else:
        raw = read_interactions(cfg.source, cfg.rows)
    prepare_interactions(raw, cfg, out)
    record_shard_hashes(out)
    return out


@pytest.mark.parametrize("split", ["random", "temporal"])
def test_synthetic_retrieval_in_chunks_equals_in_memory(tmp_path: Path, split: str) -> None:
    def cfg(out: str, chunk_rows: int) -> PrepareConfig:
        synthetic = SyntheticConfig(chunk_rows=chunk_rows, users=60, items=300)
        return tiny_prepare(tmp_path / out, "synthetic-retrieval", rows=2500, split=split, synthetic=synthetic)

    meta = prepare(cfg("small", 97))
    prepare(cfg("large", 1 << 20))
    assert_same_dataset(tmp_path / "small", tmp_path / "large")
    assert_same_dataset(tmp_path / "small", in_memory(cfg("reference", 1), tmp_path / "reference"), exact_stats=False)
    assert meta.source["users"] == 60 and meta.source["items"] == 300
    assert sum(s.rows for s in meta.splits.values()) == 2500
    assert meta.feature("user_id").cardinality == 61 and meta.feature("item_id").cardinality <= 301
    truth = np.load(tmp_path / "small" / "ground_truth.npz")
    assert truth["user_factors"].shape == (60, 8) and truth["item_popularity"].sum() == pytest.approx(1.0)


@pytest.mark.parametrize(("fmt", "split"), [("csv", "random"), ("parquet", "temporal")])
def test_interactions_in_chunks_equal_the_whole_file(tmp_path: Path, fmt: str, split: str) -> None:
    frame = ratings_frame(n_users=40, n_items=30, per_user=12)
    frame = pd.concat([frame.iloc[:7], frame], ignore_index=True)  # duplicated rows share a key
    src = tmp_path / f"ratings.{fmt}"
    frame.to_csv(src, index=False) if fmt == "csv" else frame.to_parquet(src)
    chunked = tmp_path / "chunked"
    # 23 rows per chunk: 22 user buckets and 22 key ranges for 480 rows, blocks straddling ranges
    prepare(tiny_prepare(chunked, "interactions", source=str(src), chunk_rows=23, split=split, rows=480))
    reference = tiny_prepare(tmp_path / "whole", "interactions", source=str(src), split=split, rows=480)
    assert_same_dataset(chunked, in_memory(reference, tmp_path / "whole"))
    meta = json.loads((chunked / "metadata.json").read_text())
    assert sum(s["rows"] for s in meta["splits"].values()) == 480


def test_a_bad_value_in_a_later_chunk_names_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "ratings.csv"
    lines = ["user,item,rating", *[f"{i % 7},{i % 5},3" for i in range(50)], "3,4,good"]
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    argv = ["data", "prepare", "--dataset", "interactions", "--source", str(src), "--out", str(out)]
    assert main([*argv, "--chunk-rows", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-numeric value 'good' at line 52" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ratings.csv"]


def test_synthetic_sizes_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["data", "prepare", "--dataset", "synthetic-retrieval", "--rows", "3000", "--block-rows", "16"]
    out = tmp_path / "out"
    assert main([*base, "--out", str(out), "--synthetic.users", "30", "--synthetic.items", "5000"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["source"]["users"] == 30 and meta["source"]["items"] == 5000
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "bad"), "--synthetic.users", "3001"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--synthetic.users" in err[0], err
    assert not (tmp_path / "bad").exists()


def test_ids_ordered_as_strings_without_strings() -> None:
    ids = np.r_[np.arange(0, 1200), [9_999_999, 1_000_000, 10_000, 99_999]]
    np.random.default_rng(0).shuffle(ids)
    assert [str(i) for i in lexicographic(ids)] == sorted(str(i) for i in ids)


def test_parquet_in_chunks_refuses_what_the_whole_file_refuses(tmp_path: Path) -> None:
    """Null ids in a later chunk, float ids, a label outside {0, 1} in a later chunk: the chunked reader's
    one-line error is the whole-file reader's (no line numbers: Parquet has none)."""
    good = pd.DataFrame({"user": range(40), "item": [str(i % 5) for i in range(40)], "label": [0, 1] * 20})
    cases = {
        "null id late": good.assign(user=[*range(39), None]),  # an integer column with a null: doubles
        "float ids": good.assign(user=good["user"].astype(float)),
        "label late": good.assign(label=[0] * 39 + [7]),
    }
    for name, frame in cases.items():
        src = tmp_path / f"{name.replace(' ', '-')}.parquet"
        frame.to_parquet(src)
        with pytest.raises(RecsysError) as whole:
            read_interactions(str(src), None)
        out = tmp_path / "out"
        argv = ["data", "prepare", "--dataset", "interactions", "--source", str(src), "--out", str(out)]
        with pytest.raises(RecsysError) as chunked:
            list(interaction_chunks(src, None, 8))
        assert str(chunked.value) == str(whole.value), name
        assert main([*argv, "--chunk-rows", "8"]) == 2 and not out.exists(), name
