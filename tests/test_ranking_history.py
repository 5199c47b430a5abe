"""Ranking models reading the user's train history (issue 10): ``user_history`` is one more
multi-hot field of DLRM/DCN/DeepFM, looked up per batch; a training row's own item is masked out of
its bag whatever its label, and val/test rows read the train history only."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from conftest import shrink, shrunk_flags
from test_history import bags, history_table
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from app.cli import main
from app.evaluate import evaluate
from app.train import train
from core.errors import RecsysError
from datamodules.config import DataConfig
from datamodules.corpus import load_histories
from datamodules.schema import HISTORY_FEATURE, read_metadata
from datamodules.streaming import StreamingDataModule
from modules.config import ModelConfig, OptimConfig
from modules.registry import TaskInputs, model_kind
from modules.tasks import RankingTask


def ranking_task(path: Path, **arch: object) -> RankingTask:
    meta = read_metadata(path)
    cfg = ModelConfig(**{"embedding_dim": 8, "dense_arch": [8], "over_arch": [8], "history": True, **arch})  # type: ignore[arg-type]
    kind = model_kind("dlrm")
    inputs = TaskInputs(optim=OptimConfig(), arch=cfg, meta=meta, histories=load_histories(path, meta))
    task: RankingTask = kind.build_task(kind.build_model(meta, cfg, "cpu"), inputs)
    return task


def test_a_ranking_training_row_never_sees_its_own_item_and_eval_rows_read_the_train_history(
    ml_dataset: Path, tmp_path: Path
) -> None:
    task = ranking_task(ml_dataset)
    hist = history_table(ml_dataset)
    dm = StreamingDataModule(DataConfig(path=str(ml_dataset), batch_size=64, shuffle=False, cache_dir=str(tmp_path)))
    masked = {0: 0, 1: 0}  # rows whose own item was in the stored history, by label
    for batch in dm.train_dataloader():
        kjt = batch.sparse_features
        users, items = kjt["user_id"].values().tolist(), kjt["item_id"].values().tolist()
        labels = batch.labels.long().tolist()
        for u, i, y, bag in zip(users, items, labels, bags(task.with_history(kjt, training=True)), strict=True):
            assert bag == [x for x in hist[u] if x != i]  # the own item masked, nothing else removed
            masked[y] += i in hist[u]
    assert masked[0] > 0 and masked[1] > 0  # the history holds every train interaction, whatever its label
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        for batch in loader:
            kjt = batch.sparse_features
            for u, bag in zip(
                kjt["user_id"].values().tolist(), bags(task.with_history(kjt, training=False)), strict=True
            ):
                assert bag == hist.get(u, [])
    dm.teardown()


@pytest.mark.parametrize(("model", "table"), [("dlrm", "item"), ("dcn", "own"), ("deepfm", "own")])
def test_ranking_models_with_history_train_and_evaluate(
    ml_dataset: Path, tmp_path: Path, model: str, table: str
) -> None:
    flags = ["--max-epochs=1", f"--model={model}", "--arch.history=true", f"--arch.history_table={table}"]
    cfg = shrink("dlrm-movielens", ml_dataset, tmp_path, *flags, "--arch.history_dropout=0.2")
    metrics = train(cfg)
    assert 0.0 <= metrics["test/auroc"] <= 1.0 and np.isfinite(metrics["train_loss_per_epoch"][-1])
    if model == "dlrm":  # `recsys evaluate` rebuilds the lookup: the same bags, the same AUC
        again = evaluate(cfg, metrics["best_checkpoint"], "test")
        assert again["test/auroc"] == pytest.approx(metrics["test/auroc"], abs=1e-6)


def test_dlrm_with_history_through_the_cli(ml_dataset: Path, tmp_path: Path) -> None:
    flags = [*shrunk_flags(tmp_path, ml_dataset), "--max-epochs=1", "--arch.history=true"]
    assert main(["train", "--config", "configs/dlrm-movielens.yaml", *flags]) == 0


def test_ranking_history_tables_and_refusals(ml_dataset: Path) -> None:
    meta = read_metadata(ml_dataset)
    own = ModelConfig(embedding_dim=8, history=True)
    dlrm = model_kind("dlrm").build_model(meta, own, "cpu")
    ebc = next(m for m in dlrm.modules() if isinstance(m, EmbeddingBagCollection))
    tables = {c.name: c for c in ebc.embedding_bag_configs()}
    assert tables[f"t_{HISTORY_FEATURE}"].num_embeddings == meta.feature("item_id").cardinality
    with pytest.raises(RecsysError, match="mean-pooled"):
        model_kind("dcn").build_model(meta, dataclasses.replace(own, history_pooling="sum"), "cpu")
    with pytest.raises(RecsysError, match="no user histories"):
        model_kind("deepfm").build_model(dataclasses.replace(meta, history={}), own, "cpu")
