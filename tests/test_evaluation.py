"""Full-corpus evaluation streamed over blocks of users (issue 16): equal to the dense users x items
computation it replaced, in one process and over 2 gloo ranks, on a seeded sample of users; refused
before training when it cannot fit; validation switched off cleanly."""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import shrink

from app.cli import main
from cluster.config import ClusterConfig
from datamodules.corpus import RetrievalCorpus, UserItems
from datamodules.schema import read_metadata
from modules.config import ModelConfig, OptimConfig
from modules.evaluation import ScoreHistogram, block_curve_sums, block_sums, corpus_metrics, item_columns
from modules.registry import model_kind
from modules.tasks import RetrievalTask


def dense_reference(
    scores: torch.Tensor, users: list[int], items: list[int], train: pd.DataFrame, target: pd.DataFrame, k: int
) -> tuple[float, float]:
    """The dense computation the streamed one replaced (a users x items matrix, a loop over users),
    kept here as the oracle."""
    scores = scores.clone()
    column_of = {i: j for j, i in enumerate(items)}
    row_of = {u: r for r, u in enumerate(users)}
    seen = train[train.user_id.isin(row_of.keys()) & train.item_id.isin(column_of.keys())]
    rows = torch.as_tensor(seen.user_id.map(row_of).to_numpy(np.int64))
    cols = torch.as_tensor(seen.item_id.map(column_of).to_numpy(np.int64))
    scores[rows, cols] = -math.inf
    positives = target[(target.label > 0.5) & target.user_id.isin(row_of.keys())]
    grouped = positives.groupby("user_id").item_id.apply(list)
    relevant = [{column_of[int(i)] for i in grouped.get(u, []) if int(i) in column_of} for u in users]
    unseen = [sum(1 for i in grouped.get(u, []) if int(i) not in column_of) for u in users]
    top = torch.topk(scores, k=min(k, scores.shape[1]), dim=1).indices.tolist()
    discounts = [1.0 / math.log2(r + 2) for r in range(k)]
    recall = ndcg = 0.0
    for row, rel, extra in zip(top, relevant, unseen, strict=True):
        n_rel = len(rel) + extra
        hits = [1.0 if i in rel else 0.0 for i in row]
        recall += sum(hits) / n_rel
        ndcg += sum(h * d for h, d in zip(hits, discounts, strict=False)) / sum(discounts[: min(k, n_rel)])
    return recall / len(top), ndcg / len(top)


def random_case(seed: int) -> tuple[torch.Tensor, list[int], list[int], pd.DataFrame, pd.DataFrame]:
    """Scores of 40 users over a 30-item corpus (ids 1..35, some outside it), train pairs of every label,
    targets with duplicates, relevant items outside the corpus (id 0 = unseen in train) and relevant
    items the user also had in train."""
    rng = np.random.default_rng(seed)
    items = sorted(rng.choice(np.arange(1, 36), size=30, replace=False).tolist())
    users = list(range(1, 41))
    train = pd.DataFrame(
        {"user_id": rng.integers(1, 41, 600), "item_id": rng.integers(1, 36, 600), "label": rng.integers(0, 2, 600)}
    )
    target = pd.DataFrame(
        {"user_id": rng.integers(1, 41, 200), "item_id": rng.integers(0, 36, 200), "label": rng.integers(0, 2, 200)}
    )
    target = pd.concat([target, target.iloc[:20], pd.DataFrame({"user_id": users, "item_id": 0, "label": 1})])
    scores = torch.randn(len(users), len(items))
    return scores, users, items, train, target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_blocks_equal_the_dense_computation(seed: int) -> None:
    scores, users, items, train, target = random_case(seed)
    for k in (5, 10, 40):  # 40: more than the corpus
        expected = dense_reference(scores, users, items, train, target, k)
        assert corpus_metrics(scores, users, items, train, target, k) == pytest.approx(expected, abs=1e-12)
        # the same sums block by block, blocks of any size
        seen = UserItems.from_pairs(train.user_id.to_numpy(), train.item_id.to_numpy(), 41)
        pos = target[target.label > 0.5]
        relevant = UserItems.from_pairs(pos.user_id.to_numpy(), pos.item_id.to_numpy(), 41)
        column = item_columns(np.asarray(items), 36)
        for block in (1, 7, 40):
            total = np.zeros(2)
            for lo in range(0, len(users), block):
                picked = np.asarray(users[lo : lo + block])
                total += block_sums(
                    scores[lo : lo + block].clone(), seen.gather(picked), relevant.gather(picked), column, k
                )
            assert tuple(total / len(users)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_curve_at_every_k_equals_the_dense_computation_at_that_k(seed: int) -> None:
    """The test split's Recall/NDCG-at-K curve (K = 1..60, past the 35-item corpus) from one top-K."""
    scores, users, items, train, target = random_case(seed)
    seen = UserItems.from_pairs(train.user_id.to_numpy(), train.item_id.to_numpy(), 41)
    pos = target[target.label > 0.5]
    relevant = UserItems.from_pairs(pos.user_id.to_numpy(), pos.item_id.to_numpy(), 41)
    picked = np.asarray(users)
    recall, ndcg = block_curve_sums(
        scores.clone(), seen.gather(picked), relevant.gather(picked), item_columns(np.asarray(items), 36), 60
    )
    assert recall.shape == ndcg.shape == (60,)
    for k in (1, 2, 10, 35, 60):
        expected = dense_reference(scores, users, items, train, target, k)
        got = (float(recall[k - 1]) / len(users), float(ndcg[k - 1]) / len(users))
        assert got == pytest.approx(expected, abs=1e-12), k


def test_the_score_histogram_bins_positives_and_negatives() -> None:
    """Counts per bin and class, and each bin's mean score, as numpy computes them; added up over updates."""
    rng = np.random.default_rng(0)
    probs, labels = rng.random(1000), (rng.random(1000) < 0.3).astype(np.float32)
    metric = ScoreHistogram(bins=10)
    for lo in range(0, 1000, 300):
        metric.update(torch.as_tensor(probs[lo : lo + 300]), torch.as_tensor(labels[lo : lo + 300]))
    got = metric.compute()
    which = np.minimum((probs * 10).astype(int), 9)
    for cls, key in ((0, "negatives"), (1, "positives")):
        assert got[key] == np.bincount(which[labels == cls], minlength=10).tolist()
    means = [probs[which == b].mean() for b in range(10)]
    assert got["mean_score"] == pytest.approx(means, abs=1e-12)
    assert got["edges"] == pytest.approx(np.linspace(0, 1, 11).tolist())


def two_tower_task(path: Path, **eval_kw: Any) -> RetrievalTask:
    meta = read_metadata(path)
    arch = ModelConfig(embedding_dim=8, tower_layers=[8], loss="bce")
    torch.manual_seed(0)
    model = model_kind("two-tower").build_model(meta, arch, "cpu")
    return RetrievalTask(model, OptimConfig(), arch, meta, RetrievalCorpus.load(path, meta), eval_batch=16, **eval_kw)


def task_reference(task: RetrievalTask, path: Path, split: str, users: list[int] | None = None) -> tuple[float, float]:
    """The dense computation on the task's own towers: every user with a positive, x every item."""
    assert task.corpus is not None
    train = pd.read_parquet(path / "pairs" / "train.parquet")
    target = pd.read_parquet(path / "pairs" / f"{split}.parquet")
    if users is None:
        users = sorted(int(u) for u in target[(target.label > 0.5) & (target.user_id > 0)].user_id.unique())
    all_users = task.corpus.users.to_pandas().set_index("user_id")
    import pyarrow as pa

    rows = pa.Table.from_pandas(all_users.loc[users].reset_index(), preserve_index=False)
    with torch.no_grad():
        scores = task.embed(rows, 0) @ task.embed(task.corpus.items.table, 1).t()
    items = task.corpus.items.column("item_id").tolist()
    return dense_reference(scores, users, items, train, target, task.k)


def test_the_task_evaluates_in_blocks_as_the_dense_computation(ml_dataset: Path) -> None:
    for block_bytes in (256 * 1024**2, 7 * 4 * 50):  # everyone in one block; blocks of 7 users
        task = two_tower_task(ml_dataset, eval_block_bytes=block_bytes)
        for split in ("val", "test"):
            got = task.retrieval_metrics(split)
            expected = task_reference(task, ml_dataset, split)
            assert (got[f"{split}/recall_at_10"], got[f"{split}/ndcg_at_10"]) == pytest.approx(expected, abs=1e-6)
            assert got[f"{split}/eval_users"] == got[f"{split}/eval_users_total"] > 0
            assert got[f"{split}/eval_seconds"] > 0


def test_a_seeded_sample_of_users_is_the_same_every_time_and_reported(ml_dataset: Path) -> None:
    task = two_tower_task(ml_dataset, eval_users=9, eval_seed=3)
    first = task.retrieval_metrics("val")
    assert first == {**task.retrieval_metrics("val"), "val/eval_seconds": first["val/eval_seconds"]}
    users, total = task.evaluated_users("val")
    assert first["val/eval_users"] == len(users) == 9 and first["val/eval_users_total"] == total > 9
    assert (first["val/recall_at_10"], first["val/ndcg_at_10"]) == pytest.approx(
        task_reference(task, ml_dataset, "val", [int(u) for u in users]), abs=1e-6
    )
    other, _ = two_tower_task(ml_dataset, eval_users=9, eval_seed=4).evaluated_users("val")
    assert sorted(users) == list(users) and list(other) != list(users)


CASES: list[dict[str, Any]] = [{"eval_block_bytes": 5 * 4 * 50}, {"eval_users": 7}]
"""Blocks of 5 users (several per rank, the last one short); a sample of 7 users (4 and 3 per rank)."""


def _two_rank_worker(rank: int, port: int, path: str, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        metrics = []
        for case in CASES:
            task = two_tower_task(Path(path), **case)  # the same seeded weights on both ranks
            metrics.append({split: task.retrieval_metrics(split) for split in ("val", "test")})
        if rank == 0:
            torch.save(metrics, out)
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_score_half_the_users_each_and_sum_to_the_same(ml_dataset: Path, tmp_path: Path) -> None:
    from cluster.local import free_port

    ctx = mp.get_context("spawn")
    port, out = free_port(), str(tmp_path / "two.pt")
    procs = [ctx.Process(target=_two_rank_worker, args=(r, port, str(ml_dataset), out)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0]
    for case, two in zip(CASES, torch.load(out), strict=True):
        one = two_tower_task(ml_dataset, **case)
        for split in ("val", "test"):
            single = one.retrieval_metrics(split)
            for key in (f"{split}/recall_at_10", f"{split}/ndcg_at_10", f"{split}/eval_users"):
                assert two[split][key] == pytest.approx(single[key], abs=1e-6), (case, key)


def test_an_evaluation_that_cannot_fit_is_refused_before_training(
    ml_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = ["train", "--config", "configs/two-tower-movielens.yaml", "--data", str(ml_dataset)]
    base += ["--trainer.output_dir", str(tmp_path / "runs"), "--tracking.enabled", "false"]
    # 50 items x 2048 floats: 400 KiB of item vectors, more than the workers' budget
    wide = ["--arch.embedding_dim=4", "--arch.tower_layers=[2048]", "--cluster.memory_per_worker", "256KB"]
    assert main([*base, *wide]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evaluation:" in err[0] and "--cluster.memory_per_worker" in err[0], err
    assert "item vectors alone" in err[0]
    # without a budget: this machine's available memory
    import psutil

    class Scarce:
        available = 300 * 1024

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Scarce())
    assert main([*base, "--arch.embedding_dim=4", "--arch.tower_layers=[1024]", "--trainer.eval_block_memory=1MB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "available memory" in err[0] and "lower --trainer.eval_block_memory" in err[0], err
    assert not (tmp_path / "runs").exists()


def test_validation_off_tests_and_keeps_the_last_epoch(ml_dataset: Path, tmp_path: Path) -> None:
    from app.train import run_training

    cfg = shrink("two-tower-movielens", ml_dataset, tmp_path, "--max-epochs=2", "--trainer.limit_val_batches=0")
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, patience=3))  # no early stopping either
    metrics = run_training(dataclasses.replace(cfg, cluster=ClusterConfig(num_workers=1)))
    assert metrics["epochs"] == 2 and "epoch=1" in Path(metrics["best_checkpoint"]).name
    assert 0.0 <= metrics["test/ndcg_at_10"] <= 1.0 and metrics["test/eval_users"] > 0
