"""User histories in the data contract and the history-aware two-tower (issue 10).

The bag of train items per user is stored once per user and looked up per batch; a training row's
own item is masked out of its bag; val/test rows read the train history only; both preparation
engines give the same histories; a user unseen in training embeds from a list of raw item ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ratings_frame, shrink, tiny_prepare, write_ml100k

from app.cli import main
from core.errors import RecsysError
from datamodules.config import DataConfig
from datamodules.corpus import RetrievalCorpus, tower_inputs
from datamodules.histories import UserHistories
from datamodules.prepare import prepare
from datamodules.schema import HISTORY_FEATURE, history_files, read_metadata
from datamodules.streaming import StreamingDataModule
from modules.config import ModelConfig, OptimConfig
from modules.registry import model_kind
from modules.tasks import RetrievalTask

HISTORY_FLAGS = ("--arch.history=true",)


def history_table(path: Path) -> dict[int, list[int]]:
    """user index -> item indices, from the dataset's history files (any engine's part files)."""
    meta = read_metadata(path)
    table = pd.concat([pd.read_parquet(path / f) for f in history_files(meta)], ignore_index=True)
    return {int(u): [int(i) for i in items] for u, items in zip(table.user_id, table["items"], strict=True)}


def history_task(path: Path, loss: str = "softmax", **arch: Any) -> RetrievalTask:
    meta = read_metadata(path)
    cfg = ModelConfig(**{"embedding_dim": 8, "tower_layers": [8], "loss": loss, "history": True, **arch})
    model = model_kind("two-tower").build_model(meta, cfg, "cpu")
    return RetrievalTask(model, OptimConfig(), cfg, meta, RetrievalCorpus.load(path, meta))


def bags(kjt: Any) -> list[list[int]]:
    return [t.tolist() for t in kjt[HISTORY_FEATURE].to_dense()]


def test_histories_are_train_items_stored_once_per_user(ml_dataset: Path) -> None:
    meta = read_metadata(ml_dataset)
    assert meta.history["feature"] == HISTORY_FEATURE and meta.history["split"] == "train"
    assert history_files(meta) == ["histories.parquet"]
    train = pd.read_parquet(ml_dataset / "pairs" / "train.parquet")
    hist = history_table(ml_dataset)
    # one row per train user; as many values as distinct train (user, item) pairs: no per-row copies
    assert sorted(hist) == sorted(train.user_id.unique())
    assert sum(len(v) for v in hist.values()) == len(train.drop_duplicates(["user_id", "item_id"]))
    for user, items in train.groupby("user_id").item_id:
        assert sorted(hist[int(user)]) == sorted(set(items.tolist()))
    # val/test items never enter a history unless the user also had them in train
    for split in ("val", "test"):
        held = pd.read_parquet(ml_dataset / "pairs" / f"{split}.parquet")
        trained = set(zip(train.user_id, train.item_id, strict=True))
        for u, i in zip(held.user_id, held.item_id, strict=True):
            assert i not in hist.get(int(u), []) or (u, i) in trained


def test_histories_are_ordered_oldest_first(tmp_path: Path) -> None:
    frame = ratings_frame(n_users=6, n_items=20, per_user=8)
    src = write_ml100k(tmp_path / "src", frame)
    out = tmp_path / "data"
    meta = prepare(tiny_prepare(out, "movielens-100k", source=str(src), val_frac=0.0, test_frac=0.0))
    users = json.loads((out / meta.feature("user_id").vocab_file).read_text())  # type: ignore[operator]
    items = json.loads((out / meta.feature("item_id").vocab_file).read_text())  # type: ignore[operator]
    hist = history_table(out)
    for u, rows in frame.groupby("userId"):
        expected = rows.sort_values("timestamp").movieId.astype(str).tolist()
        assert [items[i - 1] for i in hist[users.index(str(u)) + 1]] == expected


def test_lookup_masks_the_row_item_keeps_the_most_recent_and_drops() -> None:
    h = UserHistories.from_lists([[], [1, 2, 3, 4], [5], [6, 7, 6]])
    values, lengths = h.lookup(torch.tensor([1, 0, 2, 3, 9]), exclude=torch.tensor([3, 1, 5, 6, 1]))
    assert lengths.tolist() == [3, 0, 0, 1, 0] and values.tolist() == [1, 2, 4, 7]
    values, lengths = h.lookup(torch.tensor([1, 1, 3]), exclude=torch.tensor([4, 9, 7]), max_len=2)
    assert lengths.tolist() == [2, 2, 2] and values.tolist() == [2, 3, 3, 4, 6, 6]
    torch.manual_seed(0)
    big = UserHistories.from_lists([list(range(1, 1001))])
    _, lengths = big.lookup(torch.tensor([0]), dropout=0.3)
    assert 600 < int(lengths[0]) < 800


def test_a_training_row_never_sees_its_own_item_and_eval_rows_see_the_train_history(
    ml_dataset: Path, tmp_path: Path
) -> None:
    task = history_task(ml_dataset)
    hist = history_table(ml_dataset)
    dm = StreamingDataModule(DataConfig(path=str(ml_dataset), batch_size=64, shuffle=False, cache_dir=str(tmp_path)))
    seen_own = 0
    for batch in dm.train_dataloader():
        kjt = batch.sparse_features
        users, items = kjt["user_id"].values().tolist(), kjt["item_id"].values().tolist()
        for u, i, bag in zip(users, items, bags(task.with_history(kjt, training=True)), strict=True):
            assert i not in bag
            assert bag == [x for x in hist[u] if x != i]  # the masked lookup, nothing else removed
            seen_own += i in hist[u]
        for u, bag in zip(users, bags(task.with_history(kjt, training=False)), strict=True):
            assert bag == hist[u]
    assert seen_own > 0  # the own item really was in the stored history, and was masked
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        for batch in loader:
            kjt = batch.sparse_features
            extended = task.with_history(kjt, training=False)
            for u, bag in zip(kjt["user_id"].values().tolist(), bags(extended), strict=True):
                assert bag == hist.get(u, [])
    dm.teardown()


def test_without_leave_one_out_a_training_row_reads_the_whole_history(ml_dataset: Path, tmp_path: Path) -> None:
    task = history_task(ml_dataset, history_leave_one_out=False)
    hist = history_table(ml_dataset)
    dm = StreamingDataModule(DataConfig(path=str(ml_dataset), batch_size=64, shuffle=False, cache_dir=str(tmp_path)))
    batch = next(iter(dm.train_dataloader()))
    kjt = batch.sparse_features
    assert bags(task.with_history(kjt, training=True)) == [hist[u] for u in kjt["user_id"].values().tolist()]
    dm.teardown()


@pytest.mark.parametrize("pooling", ["mean", "sum", "sqrt"])
@pytest.mark.parametrize("table", ["own", "item"])
def test_history_pooling_is_the_mean_the_sum_or_the_sum_over_sqrt_length(
    ml_dataset: Path, pooling: str, table: str
) -> None:
    task = history_task(
        ml_dataset, history_pooling=pooling, history_table=table, tower_activation="tanh", tower_layers=[8, 8]
    )
    model: Any = task.model
    assert any(isinstance(m, torch.nn.Tanh) for m in model.user_mlp.modules())
    assert task.corpus is not None
    _, kjt = tower_inputs(task.corpus.users.slice(0, 3), task.meta)
    extended = task.with_history(kjt, training=False)
    pooled = model._pool(extended)
    assert all(bags(extended))
    tables = dict(model.ebc.embedding_bags.items())
    weights = tables[f"t_{HISTORY_FEATURE if table == 'own' else 'item_id'}"].weight
    for row, bag in enumerate(bags(extended)):
        scale = {"mean": len(bag), "sum": 1.0, "sqrt": len(bag) ** 0.5}[pooling]
        expected = weights[torch.tensor(bag, dtype=torch.long)].sum(0) / scale
        torch.testing.assert_close(pooled[HISTORY_FEATURE][row], expected, rtol=1e-5, atol=1e-6)
    # a shared table's single-hot item id is its own row whatever the history's pooling
    _, items = tower_inputs(task.corpus.items.slice(0, 3), task.meta)
    ids = items["item_id"].values()
    torch.testing.assert_close(
        model._pool(task.with_history(items, training=False))["item_id"], tables["t_item_id"].weight[ids]
    )


def test_history_two_tower_trains_with_sampled_and_full_softmax(ml_dataset: Path, tmp_path: Path) -> None:
    from app.train import train

    cfg = shrink("two-tower-history-movielens", ml_dataset, tmp_path, "--max-epochs=1")
    assert cfg.arch.history and cfg.arch.history_table == "item"
    metrics = train(cfg)
    assert 0.0 <= metrics["test/ndcg_at_10"] <= 1.0
    assert all(np.isfinite(x) for x in metrics["train_loss_per_epoch"])
    # full softmax, a history table of its own, no user id, the most recent items, dropout
    full = shrink(
        "two-tower-history-movielens",
        ml_dataset,
        tmp_path,
        "--max-epochs=1",
        "--arch.loss=full_softmax",
        "--arch.history_table=own",
        "--arch.user_id_in_tower=false",
        "--arch.history_max_len=5",
        "--arch.history_dropout=0.2",
    )
    assert 0.0 <= train(full)["test/ndcg_at_10"] <= 1.0


def test_full_softmax_is_cross_entropy_over_the_corpus(ml_dataset: Path) -> None:
    task = history_task(ml_dataset, loss="full_softmax")
    assert task.corpus is not None
    corpus_ids = task.corpus.items.column("item_id")
    torch.manual_seed(0)
    user, items = torch.randn(4, 8), torch.randn(len(corpus_ids), 8)
    ids = torch.as_tensor(corpus_ids[[3, 0, 5, 3]])
    labels = torch.tensor([1.0, 1.0, 0.0, 1.0])  # the negative row takes no part
    logits = user[[0, 1, 3]] @ items.t() / task.temperature
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([3, 0, 3]))
    assert float(task.full_softmax_loss(user, items, ids, labels)) == pytest.approx(float(expected), rel=1e-5)


def test_multinomial_loss_is_the_mean_log_likelihood_of_the_users_history(ml_dataset: Path) -> None:
    task = history_task(ml_dataset, loss="multinomial", history_dropout=0.5, history_pooling="sqrt")
    assert task.corpus is not None and task.history is not None
    assert not task.history.leave_one_out  # the whole history is the input
    hist = history_table(ml_dataset)
    corpus_ids = task.corpus.items.column("item_id").tolist()
    torch.manual_seed(0)
    user, items = torch.randn(2, 8), torch.randn(len(corpus_ids), 8)
    users = torch.tensor([1, 2])
    log_probs = torch.log_softmax(user @ items.t() / task.temperature, dim=1)
    expected = []
    for r in (0, 1):
        cols = [corpus_ids.index(i) for i in hist[int(users[r])] if i in corpus_ids]
        expected.append(-log_probs[r, cols].sum())
    got = task.multinomial_loss(user, items, users)
    assert float(got) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)
    # rows are kept with probability 1 / history length: about one per user per pass over the rows
    train = pd.read_parquet(ml_dataset / "pairs" / "train.parquet")
    rows = torch.as_tensor(train.user_id.to_numpy())
    kept = [len(task.one_row_per_user(rows, torch.ones(len(rows)))) for _ in range(200)]
    assert float(np.mean(kept)) == pytest.approx(len(hist), rel=0.05)
    assert task.one_row_per_user(rows, torch.zeros(len(rows))).tolist() == []
    # inverted dropout: a summed training bag over sqrt(length) is scaled by 1/sqrt(1 - p), evaluation not
    model: Any = task.model
    assert model.bag_scale == pytest.approx(2**0.5)


def test_an_item_tower_without_layers_is_the_item_id_embedding(ml_dataset: Path) -> None:
    ids_only: dict[str, Any] = {"tower_features": "ids", "user_id_in_tower": False, "tower_layers": [8, 8]}
    ids_only["item_tower_layers"] = []
    task = history_task(ml_dataset, **ids_only)
    model: Any = task.model
    assert task.corpus is not None and len(model.item_mlp) == 0
    _, items = tower_inputs(task.corpus.items.slice(0, 3), task.meta)
    embedded = model.embed(torch.zeros(3, 0), task.with_history(items, training=False), "item")
    weights = dict(model.ebc.embedding_bags.items())["t_item_id"].weight
    torch.testing.assert_close(embedded, weights[items["item_id"].values()])
    with pytest.raises(RecsysError, match="user tower gives 4 numbers, the item tower 8"):
        history_task(ml_dataset, **{**ids_only, "tower_layers": [8, 4]})


def test_history_multinomial_trains(ml_dataset: Path, tmp_path: Path) -> None:
    from app.train import train

    flags = ["--max-epochs=1", "--arch.loss=multinomial", "--arch.history_table=own", "--arch.user_id_in_tower=false"]
    flags += ["--arch.history_pooling=sqrt", "--arch.history_dropout=0.5", "--arch.tower_activation=tanh"]
    metrics = train(shrink("two-tower-history-movielens", ml_dataset, tmp_path, *flags, "--arch.tower_layers=[8,8]"))
    assert 0.0 <= metrics["test/ndcg_at_10"] <= 1.0 and np.isfinite(metrics["train_loss_per_epoch"][-1])


def test_history_on_a_dataset_without_histories_is_one_line(
    ml_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "old"
    shutil.copytree(ml_dataset, old)
    meta = json.loads((old / "metadata.json").read_text())
    meta.pop("history")
    meta["corpus"].pop("histories")
    (old / "metadata.json").write_text(json.dumps(meta))
    (old / "histories.parquet").unlink()
    code = main(["train", "--config", "configs/two-tower-history-movielens.yaml", "--data", str(old)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no user histories" in err[0], err


@pytest.mark.cluster
def test_local_and_spark_engines_give_the_same_histories(tmp_path: Path) -> None:
    src = write_ml100k(tmp_path / "ml", ratings_frame(n_users=25, n_items=30, per_user=10))
    local, spark = tmp_path / "local", tmp_path / "spark"
    prepare(tiny_prepare(local, "movielens-100k", source=str(src), split="temporal"))
    prepare(
        tiny_prepare(
            spark, "movielens-100k", source=str(src), split="temporal", engine="spark", spark_master="local[2]"
        )
    )
    ml, ms = read_metadata(local), read_metadata(spark)
    assert ml.history == ms.history and len(history_files(ms)) >= 1
    assert history_table(local) == history_table(spark) and len(history_table(local)) == 25


def group_ratings(users: range, n_groups: int, per_group: int, per_user: int, seed: int) -> pd.DataFrame:
    """Users who each stick to one group of items (a Zipf-like taste within it), in interaction order."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, per_group + 1)
    rows = []
    for u in users:
        g = int(rng.integers(n_groups))
        picked = rng.choice(per_group, size=per_user, replace=False, p=weights / weights.sum())
        for t, i in enumerate(picked):
            rows.append((f"u{u}", f"i{g * per_group + int(i)}", 5.0, 1_000 + t))
    return pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])


def recall_at_10(scores: torch.Tensor, targets: list[set[int]]) -> float:
    top = torch.topk(scores, 10, dim=1).indices.tolist()
    return float(np.mean([len(set(t) & want) / min(10, len(want)) for t, want in zip(top, targets, strict=True)]))


def test_users_unseen_in_training_embed_from_their_items(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import app.train as recipe
    from modules.user_embedding import embed_items, embed_users_from_items, item_vocabulary

    source = tmp_path / "interactions.csv"
    group_ratings(range(200), n_groups=6, per_group=12, per_user=8, seed=0).to_csv(source, index=False)
    data = tmp_path / "data"
    prepare(tiny_prepare(data, "interactions", source=str(source), block_rows=16))
    trained: dict[str, Any] = {}

    def keep_scorer(*args: Any) -> Any:
        exported = export_model(*args)
        if exported is not None:
            trained["scorer"] = exported[0]
        return exported

    export_model = recipe.export_model
    monkeypatch.setattr(recipe, "export_model", keep_scorer)
    flags = ["--max-epochs=6", "--arch.embedding_dim=16", "--arch.tower_layers=[16]", "--optim.dense_lr=0.01"]
    flags += ["--arch.user_id_in_tower=false", "--arch.loss=full_softmax", "--arch.history_table=own"]
    recipe.train(shrink("two-tower-history-movielens", data, tmp_path, *flags))
    model, meta = trained["scorer"].model, read_metadata(data)

    # users held out of training entirely: half of their items in, the other half to find
    held = group_ratings(range(1000, 1040), n_groups=6, per_group=12, per_user=8, seed=1)
    index = item_vocabulary(data, meta)
    items = pd.read_parquet(data / "items.parquet")
    column = {int(i): c for c, i in enumerate(items.item_id)}
    given, rest = [], []
    for _, rows in held.groupby("user", sort=False):
        seq = rows.item.tolist()
        given.append(seq[:4])
        rest.append({column[index[i]] for i in seq[4:] if i in index})
    users = embed_users_from_items(model, meta, index, given)
    scores = users @ embed_items(model, meta, items).t()
    train = pd.read_parquet(data / "pairs" / "train.parquet")
    counts = np.bincount(train.item_id, minlength=int(items.item_id.max()) + 1)[items.item_id.to_numpy()]
    popular = torch.as_tensor(counts, dtype=torch.float32).expand(len(given), -1).clone()
    for row, seq in enumerate(given):
        for i in seq:
            scores[row, column[index[i]]] = popular[row, column[index[i]]] = -float("inf")
    ours, baseline = recall_at_10(scores, rest), recall_at_10(popular, rest)
    assert ours >= 2 * baseline and ours > 0.5, (ours, baseline)
