"""The streaming DataModule: Batch contract, seeded shuffling, rank partitioning, resumption, caches."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_prepare

from cluster.local import free_port
from core.errors import RecsysError
from datamodules.config import DataConfig, SyntheticConfig
from datamodules.prepare import prepare
from datamodules.schema import read_metadata
from datamodules.streaming import StreamingDataModule


def row_ids(batch) -> list[float]:  # type: ignore[no-untyped-def]
    """The first dense feature is a continuous random value: it identifies a row."""
    return [round(float(x), 6) for x in batch.dense_features[:, 0]]


def flat(batches: Iterable[list[float]]) -> list[float]:
    return [x for b in batches for x in b]


def module(path: Path, cache: Path, **kw: object) -> StreamingDataModule:
    kw.setdefault("batch_size", 64)
    return StreamingDataModule(DataConfig(path=str(path), cache_dir=str(cache), **kw))  # type: ignore[arg-type]


def epoch(dm: StreamingDataModule) -> list[list[float]]:
    return [row_ids(b) for b in dm.train_dataloader()]


def test_batch_contract(ctr_dataset: Path, tmp_path: Path) -> None:
    meta = read_metadata(ctr_dataset)
    dm = module(ctr_dataset, tmp_path)
    b = next(iter(dm.train_dataloader()))
    kjt = b.sparse_features
    assert b.dense_features.shape == (64, 4) and b.dense_features.dtype == torch.float32
    assert b.labels.shape == (64,) and set(b.labels.unique().tolist()) <= {0.0, 1.0}
    assert kjt.keys() == ["C1", "C2", "C3"]
    lengths = kjt.lengths().view(3, 64)
    assert (lengths[:2] == 1).all() and (lengths[2] >= 1).all()
    for f, values in zip(meta.sparse_features, kjt.to_dict().values(), strict=True):
        assert int(values.values().max()) < f.cardinality and int(values.values().min()) >= 0
    dm.teardown()


def test_oov_index_zero_is_an_ordinary_id(tmp_path: Path) -> None:
    # rare ids seen only outside train map to index 0, which must survive as a real value (not padding)
    out = tmp_path / "d"
    prepare(
        tiny_prepare(
            out,
            "synthetic-ctr",
            rows=3000,
            synthetic=SyntheticConfig(num_dense=2, num_sparse=2, cardinalities=[3, 5000], chunk_rows=1000),
        )
    )
    dm = module(out, tmp_path / "c")
    zeros = 0
    for b in dm.test_dataloader():
        c2 = b.sparse_features["C2"]
        assert (c2.lengths() == 1).all()
        zeros += int((c2.values() == 0).sum())
    assert zeros > 0
    dm.teardown()


def test_seeded_shuffle_is_reproducible(ctr_dataset: Path, tmp_path: Path) -> None:
    a = epoch(module(ctr_dataset, tmp_path / "a", seed=7))
    b = epoch(module(ctr_dataset, tmp_path / "b", seed=7))
    c = epoch(module(ctr_dataset, tmp_path / "c", seed=8))
    assert a == b
    assert a != c and sorted(flat(a)) == sorted(flat(c))
    unshuffled = epoch(module(ctr_dataset, tmp_path / "d", shuffle=False))
    assert flat(unshuffled) != flat(a)


def test_workers_deliver_the_same_rows(ctr_dataset: Path, tmp_path: Path) -> None:
    base = sorted(flat(epoch(module(ctr_dataset, tmp_path / "a"))))
    with_workers = sorted(flat(epoch(module(ctr_dataset, tmp_path / "b", loader_workers=2))))
    assert base == with_workers


def test_concurrent_modules_get_their_own_cache(ctr_dataset: Path) -> None:
    dm1 = StreamingDataModule(DataConfig(path=str(ctr_dataset), batch_size=64))
    dm2 = StreamingDataModule(DataConfig(path=str(ctr_dataset), batch_size=64))
    it1, it2 = iter(dm1.train_dataloader()), iter(dm2.train_dataloader())
    assert len(next(it1).labels) == len(next(it2).labels) == 64
    del it1, it2
    dm1.teardown()
    dm2.teardown()


def test_mid_epoch_resume(ctr_dataset: Path, tmp_path: Path) -> None:
    dm = module(ctr_dataset, tmp_path / "a", seed=3)
    it = iter(dm.train_dataloader())
    seen = [row_ids(next(it)) for _ in range(5)]
    state = dm.state_dict()
    rest = [row_ids(b) for b in it]
    resumed = module(ctr_dataset, tmp_path / "b", seed=3)
    resumed.load_state_dict(state)
    after = [row_ids(b) for b in resumed.train_dataloader()]
    assert after == rest
    assert not set(flat(seen)) & set(flat(after))


def test_batch_size_must_be_whole_blocks(ctr_dataset: Path) -> None:
    with pytest.raises(RecsysError, match="block_rows 8"):
        StreamingDataModule(DataConfig(path=str(ctr_dataset), batch_size=60))


def test_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RecsysError, match="not a prepared dataset"):
        StreamingDataModule(DataConfig(path=str(tmp_path)))


def _rank_worker(rank: int, world: int, port: int, path: str, cache: str, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    dm = StreamingDataModule(DataConfig(path=path, batch_size=16, cache_dir=cache))
    dm.prepare_data()
    dm.setup("fit")
    ids = flat(row_ids(b) for b in dm.train_dataloader())
    np.save(out, np.array(ids))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_two_ranks_see_disjoint_parts_covering_the_epoch(tmp_path: Path) -> None:
    out = tmp_path / "d"
    meta = prepare(
        tiny_prepare(
            out,
            "synthetic-ctr",
            rows=2560,
            split="temporal",
            synthetic=SyntheticConfig(num_dense=2, num_sparse=2, cardinalities=[10, 10], chunk_rows=1000),
        )
    )
    assert meta.splits["train"].blocks % 4 == 0  # no padding needed for 2 ranks x batches of 2 blocks
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_worker, args=(r, 2, port, str(out), str(tmp_path / "cache"), str(tmp_path / f"r{r}.npy"))
        )
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    r0, r1 = (set(np.load(tmp_path / f"r{r}.npy").tolist()) for r in range(2))
    everything = set(flat(epoch(module(out, tmp_path / "all", shuffle=False))))
    assert r0 and r1 and not r0 & r1
    assert r0 | r1 == everything


def _crash_while_reading(path: str, cache: str) -> None:
    dm = StreamingDataModule(DataConfig(path=path, batch_size=16, cache_dir=cache))
    next(iter(dm.train_dataloader()))
    os.kill(os.getpid(), signal.SIGKILL)


def test_stale_shared_memory_from_a_crash_is_cleaned(ctr_dataset: Path, tmp_path: Path) -> None:
    before = set(os.listdir("/dev/shm"))
    p = mp.get_context("spawn").Process(target=_crash_while_reading, args=(str(ctr_dataset), str(tmp_path / "c")))
    p.start()
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    left = set(os.listdir("/dev/shm")) - before
    assert left, "the crashed reader should have left shared memory behind"
    dm = module(ctr_dataset, tmp_path / "c")  # the same cache dir the crashed run used
    dm.prepare_data()
    time.sleep(0.1)
    assert not (left & set(os.listdir("/dev/shm")))
    assert len(next(iter(dm.train_dataloader())).labels) == 64
    dm.teardown()


def test_the_corpus_is_memory_mapped_arrays_equal_to_its_files(ml_dataset: Path, tmp_path: Path) -> None:
    import json
    import shutil

    import pandas as pd

    from datamodules.corpus import RetrievalCorpus, load_histories

    meta = read_metadata(ml_dataset)
    corpus = RetrievalCorpus.load(ml_dataset, meta, tmp_path / "cache")
    assert isinstance(corpus.train.items, np.memmap) and isinstance(corpus.user_rows, np.memmap)
    train = pd.read_parquet(ml_dataset / "pairs" / "train.parquet")
    for user, rows in train.groupby("user_id"):
        assert sorted(corpus.train.gather(np.array([user]))[1]) == sorted(rows.item_id)
    val = pd.read_parquet(ml_dataset / "pairs" / "val.parquet")
    positives = val[val.label > 0.5]
    assert corpus.targets["val"].users().tolist() == sorted(positives.user_id.unique())
    lengths, items = corpus.targets["val"].gather(np.array(sorted(positives.user_id.unique())))
    assert sum(lengths) == len(positives) and sorted(items) == sorted(positives.item_id)
    users = pd.read_parquet(ml_dataset / "users.parquet")
    assert corpus.users.to_pandas().equals(users)
    assert (corpus.user_rows[users.user_id.to_numpy()] == np.arange(len(users))).all()
    table = pd.read_parquet(ml_dataset / "histories.parquet")
    histories = load_histories(ml_dataset, meta, tmp_path / "cache")
    for user, bag in zip(table.user_id, table["items"], strict=True):
        assert histories.of(int(user)) == list(bag)
    # built once: a second load maps the same files
    (built,) = (tmp_path / "cache").glob("corpus-*")
    before = {p: p.stat().st_mtime_ns for p in built.rglob("*.npy")}
    RetrievalCorpus.load(ml_dataset, meta, tmp_path / "cache")
    assert {p: p.stat().st_mtime_ns for p in built.rglob("*.npy")} == before
    # tables written as several part files (Spark's writer) give the same arrays, under a new key
    parts = tmp_path / "parts"
    shutil.copytree(ml_dataset, parts)
    (parts / "pairs" / "train.parquet").unlink()
    half = len(train) // 2
    train.iloc[:half].to_parquet(parts / "pairs" / "part-0.parquet")
    train.iloc[half:].to_parquet(parts / "pairs" / "part-1.parquet")
    raw = json.loads((parts / "metadata.json").read_text())
    raw["corpus"]["pairs"]["train"] = ["pairs/part-0.parquet", "pairs/part-1.parquet"]
    (parts / "metadata.json").write_text(json.dumps(raw))
    split = RetrievalCorpus.load(parts, read_metadata(parts), tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("corpus-*"))) == 2
    assert (np.asarray(split.train.indptr) == np.asarray(corpus.train.indptr)).all()
    assert (np.asarray(split.train.items) == np.asarray(corpus.train.items)).all()
    assert torch.equal(split.item_log_q, corpus.item_log_q)


def test_a_corpus_file_with_ids_outside_the_metadata_is_one_line(ml_dataset: Path, tmp_path: Path) -> None:
    import shutil

    import pandas as pd

    from datamodules.corpus import RetrievalCorpus

    bad = tmp_path / "bad"
    shutil.copytree(ml_dataset, bad)
    pairs = pd.read_parquet(bad / "pairs" / "val.parquet")
    pairs.loc[0, "item_id"] = 10**6
    pairs.to_parquet(bad / "pairs" / "val.parquet")
    with pytest.raises(RecsysError, match=r"pairs/val.parquet: item_id: ids outside"):
        RetrievalCorpus.load(bad, read_metadata(bad), tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_dir() and p.name == "pairs"]
