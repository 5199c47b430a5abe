"""Models, the TorchRec strategy, sharded training over gloo, checkpoint/resume, configs, bad configs."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import shrink

from app.cli import load_run_config, main
from app.config import RunConfig
from app.train import run_training
from cluster.config import ClusterConfig
from datamodules.config import DataConfig
from datamodules.schema import read_metadata
from datamodules.streaming import StreamingDataModule
from modules.config import ModelConfig, OptimConfig
from modules.registry import MODELS, model_kind

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
PRESET = {"dlrm": "dlrm-synthetic-ctr", "two-tower": "two-tower-movielens"}


def run_cfg(path: Path, model: str, tmp: Path, *flags: str, **trainer: Any) -> RunConfig:
    """The shipped preset of ``model`` shrunk for CPU, with flags and trainer overrides."""
    return shrink(PRESET[model], path, tmp, *flags, *[f"--trainer.{k}={v}" for k, v in trainer.items()])


def build_model(kind: str, meta: Any, arch: ModelConfig, device: str) -> torch.nn.Module:
    return model_kind(kind).build_model(meta, arch, device)


@pytest.mark.parametrize("kind", MODELS)
def test_model_output_shapes(kind: str, ml_dataset: Path, ctr_dataset: Path, tmp_path: Path) -> None:
    path = ml_dataset if kind == "two-tower" else ctr_dataset
    meta = read_metadata(path)
    dm = StreamingDataModule(DataConfig(path=str(path), batch_size=64, cache_dir=str(tmp_path)))
    batch = next(iter(dm.train_dataloader()))
    model = build_model(kind, meta, ModelConfig(embedding_dim=8, tower_layers=[16, 12]), device="cpu")
    out = model(batch.dense_features, batch.sparse_features)
    if kind == "two-tower":
        assert out[0].shape == out[1].shape == (64, 12)
    else:
        assert out.shape == (64, 1)
    meta_model = build_model(kind, meta, ModelConfig(embedding_dim=8), device="meta")
    tables = {n: p.shape for n, p in meta_model.named_parameters() if "embedding_bags" in n}
    assert sorted(s[0] for s in tables.values()) == sorted(f.cardinality for f in meta.sparse_features)
    dm.teardown()


def _parity_worker(path: str, out: str) -> None:
    """Five steps by hand and five through Trainer.fit from the same initial weights and batches."""
    import os

    import lightning as L
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from app.resolve import complete_defaults
    from app.train import build_task
    from cluster.local import free_port, torchrun_env
    from modules.sharding import TorchRecStrategy, shard_model

    os.environ.update(torchrun_env(0, 1, free_port(), "parity"))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    cfg = complete_defaults(run_cfg(Path(path), "dlrm", Path(out)))
    data = StreamingDataModule(dataclasses.replace(cfg.data, cache_dir=out + "/meta"))

    def batches() -> list[Any]:
        dm = StreamingDataModule(dataclasses.replace(cfg.data, cache_dir=out + f"/c{len(os.listdir(out))}"))
        it = iter(dm.train_dataloader())
        return [next(it) for _ in range(5)]

    torch.manual_seed(0)
    manual = build_task(cfg, data)
    manual.model, _ = shard_model(manual.model, torch.device("cpu"), manual.sparse_optimizer(), 1)
    initial = {
        k: (v.local_shards()[0].tensor if isinstance(v, ShardedTensor) else v).clone()
        for k, v in manual.model.state_dict().items()
    }
    opt = manual.configure_optimizers()
    for b in batches():
        loss = torch.nn.functional.binary_cross_entropy_with_logits(manual.logits(b), b.labels)
        loss.backward()
        opt.step()
        opt.zero_grad()

    class LoadInitial(L.Callback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            with torch.no_grad():
                for k, v in pl_module.model.state_dict().items():
                    (v.local_shards()[0].tensor if isinstance(v, ShardedTensor) else v).copy_(initial[k])

    task = build_task(cfg, data)
    dm = StreamingDataModule(dataclasses.replace(cfg.data, cache_dir=out + "/lightning"))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=TorchRecStrategy(process_group_backend="gloo"),
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        callbacks=[LoadInitial()],
        num_sanity_val_steps=0,
    )
    trainer.fit(task, datamodule=dm)
    a, b = manual.model.state_dict(), task.model.state_dict()
    diffs = {}
    for k in a:
        x = a[k].local_shards()[0].tensor if isinstance(a[k], ShardedTensor) else a[k]
        y = b[k].local_shards()[0].tensor if isinstance(b[k], ShardedTensor) else b[k]
        diffs[k] = float((x - y).abs().max())
    changed = sum(
        1
        for k in a
        if not torch.allclose(initial[k], a[k].local_shards()[0].tensor if isinstance(a[k], ShardedTensor) else a[k])
    )
    torch.save({"diffs": diffs, "changed": changed, "total": len(a)}, out + "/parity.pt")


def test_lightning_matches_a_manual_loop(ctr_dataset: Path, tmp_path: Path) -> None:
    p = mp.get_context("spawn").Process(target=_parity_worker, args=(str(ctr_dataset), str(tmp_path)))
    p.start()
    p.join(300)
    assert p.exitcode == 0
    result = torch.load(tmp_path / "parity.pt")
    assert result["changed"] >= result["total"] // 2  # the steps really trained
    assert max(result["diffs"].values()) < 1e-5, result["diffs"]


def test_sharded_training_on_two_processes(ctr_wide_dataset: Path, tmp_path: Path) -> None:
    cfg = dataclasses.replace(
        run_cfg(ctr_wide_dataset, "dlrm", tmp_path, max_epochs=3), cluster=ClusterConfig(num_workers=2)
    )
    metrics = run_training(cfg)
    assert metrics["world_size"] == 2
    ranks = {r for placed in metrics["table_ranks"].values() for r in placed}
    assert ranks == {0, 1}, metrics["table_ranks"]  # the planner put tables on both ranks
    losses = metrics["train_loss_per_epoch"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert 0.0 < metrics["test/auroc"] <= 1.0
    # The 2-rank test metrics are those of the checkpoint scored whole in one process: testing did not
    # overwrite one rank's table shards with another's (Lightning syncs module states outside fit).
    p = mp.get_context("spawn").Process(target=_evaluate_worker, args=(cfg, metrics["best_checkpoint"], str(tmp_path)))
    p.start()
    p.join(300)
    assert p.exitcode == 0
    single = torch.load(tmp_path / "evaluated.pt")
    for key in ("test/auroc", "test/logloss"):
        assert single[key] == pytest.approx(metrics[key], abs=1e-5), key


def _evaluate_worker(cfg: RunConfig, checkpoint: str, out: str) -> None:
    import os

    from app.evaluate import evaluate
    from cluster.local import free_port

    # a training run earlier in the pytest process (in-process, one device) left Lightning's
    # MASTER_PORT in the environment, with its store still listening there
    os.environ["MASTER_PORT"] = str(free_port())

    single = dataclasses.replace(cfg, cluster=ClusterConfig(num_workers=1))
    torch.save(evaluate(single, checkpoint), out + "/evaluated.pt")


def test_checkpoint_resume_on_two_processes_continues_the_run(ml_dataset: Path, tmp_path: Path) -> None:
    # pointwise BCE: uniform negatives would draw from an RNG state the checkpoint does not hold
    bce = ("--arch.loss=bce", "--arch.uniform_negatives=0")
    launch = run_training
    two = ClusterConfig(num_workers=2)
    full_cfg = dataclasses.replace(
        run_cfg(ml_dataset, "two-tower", tmp_path / "a", *bce, max_epochs=2, monitor="train/loss_epoch"), cluster=two
    )
    full = launch(full_cfg)
    first = launch(
        dataclasses.replace(
            run_cfg(ml_dataset, "two-tower", tmp_path / "b", *bce, max_epochs=1, monitor="train/loss_epoch"),
            cluster=two,
        )
    )
    resumed = launch(
        dataclasses.replace(
            run_cfg(
                ml_dataset,
                "two-tower",
                tmp_path / "c",
                *bce,
                max_epochs=2,
                monitor="train/loss_epoch",
                resume_from=first["best_checkpoint"],
            ),
            cluster=two,
        )
    )
    assert resumed["epochs"] == 2 and len(resumed["train_loss_per_epoch"]) == 1
    assert resumed["train_loss_per_epoch"][0] == pytest.approx(full["train_loss_per_epoch"][1], rel=1e-3)
    for key in ("test/auroc", "test/logloss", "test/ndcg_at_10"):
        assert resumed[key] == pytest.approx(full[key], abs=2e-3), key
    # the full-corpus metrics of 2 ranks (each scoring half the users through the sharded towers, sums
    # all-reduced) are those of the same checkpoint evaluated in one process
    args = (full_cfg, full["best_checkpoint"], str(tmp_path))
    p = mp.get_context("spawn").Process(target=_evaluate_worker, args=args)
    p.start()
    p.join(300)
    assert p.exitcode == 0
    single = torch.load(tmp_path / "evaluated.pt")
    for key in ("test/recall_at_10", "test/ndcg_at_10", "test/eval_users"):
        assert single[key] == pytest.approx(full[key], abs=1e-6), key


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_configs_load_and_validate(config: Path, ml_dataset: Path, ctr_dataset: Path) -> None:
    from app.resolve import resolve_run
    from app.train import build_task

    cfg = load_run_config(config)
    data = ml_dataset if model_kind(cfg.model).needs_corpus or "movielens" in config.stem else ctr_dataset
    extra = []
    if config.stem == "funnel-ranking":  # it trains on candidate lists (test_funnel.py); here: MovieLens pairs
        data, extra = ml_dataset, ["--trainer.monitor", "val/auroc", "--data.batch_size", "32"]
    cfg = resolve_run(load_run_config(config, ["--data", str(data), "--tracking.enabled", "false", *extra]))
    dm = StreamingDataModule(cfg.data)
    task = build_task(cfg, dm)
    assert task.model is not None and cfg.model in MODELS
    dm.teardown()


BAD_CONFIGS = {
    "unknown model": (["--model", "gpt"], "unknown model 'gpt'"),
    "unknown loss": (["--model", "two-tower", "--arch.loss", "hinge"], "arch.loss"),
    "features do not match": (["--model", "two-tower", "--data", "{ctr}"], "has no users/items"),
    "missing dataset": (["--model", "dlrm", "--data", "{missing}"], "no such dataset directory"),
    "unreachable tracking": (["--model", "dlrm", "--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
    "unknown key": (["--model", "dlrm", "--arch.bogus", "1"], "bogus"),
    "negative sample count": (["--model", "two-tower", "--arch.uniform_negatives", "-1"], "uniform_negatives"),
    "negative eval users": (["--model", "two-tower", "--trainer.eval_users", "-1"], "--trainer.eval_users"),
    "eval block not a size": (["--model", "two-tower", "--trainer.eval_block_memory", "lots"], "eval_block_memory"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configuration_fails_before_training(
    case: str, ml_dataset: Path, ctr_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args, message = BAD_CONFIGS[case]
    args = [a.format(ctr=ctr_dataset, missing=tmp_path / "nope") for a in args]
    if "--data" not in args:
        args += ["--data", str(ml_dataset)]
    code = main(["train", *args, "--trainer.output_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "runs").exists()


def test_kjt_row_selection_and_append() -> None:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from modules.tasks import append_rows, select_rows

    # key a: rows [1], [2, 3], []; key b: rows [4], [5], [6, 7, 8]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"], values=torch.arange(1, 9), lengths=torch.tensor([1, 2, 0, 1, 1, 3], dtype=torch.int32)
    )
    picked = select_rows(kjt, torch.tensor([2, 1, 1]))
    assert [t.tolist() for t in picked.to_dict()["a"].to_dense()] == [[], [2, 3], [2, 3]]
    assert [t.tolist() for t in picked.to_dict()["b"].to_dense()] == [[6, 7, 8], [5], [5]]
    both = append_rows(kjt, picked).to_dict()
    assert [t.tolist() for t in both["a"].to_dense()] == [[1], [2, 3], [], [], [2, 3], [2, 3]]
    assert [t.tolist() for t in both["b"].to_dense()] == [[4], [5], [6, 7, 8], [6, 7, 8], [5], [5]]


def test_mixed_negatives_loss_matches_in_batch_softmax_without_extra_negatives(ml_dataset: Path) -> None:
    from datamodules.corpus import RetrievalCorpus
    from modules.tasks import RetrievalTask

    meta = read_metadata(ml_dataset)
    arch = ModelConfig(embedding_dim=8, tower_layers=[8], loss="softmax", temperature=0.5, uniform_negatives=4)
    model = build_model("two-tower", meta, arch, device="cpu")
    task = RetrievalTask(model, OptimConfig(), arch, meta, RetrievalCorpus.load(ml_dataset, meta))
    torch.manual_seed(0)
    user, item = torch.randn(5, 8), torch.randn(5, 8)
    ids, labels = torch.tensor([3, 4, 3, 7, 9]), torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    item_log_q: torch.Tensor = task.item_log_q  # type: ignore[assignment]
    plain = task.softmax_loss(user, item, ids, labels)
    # by hand: positives 0..3, row 0 and row 2 share item 3 (masked), log-Q of the 4 in-batch candidates
    log_q = item_log_q[ids[:4]]
    logits = user[:4] @ item[:4].t() / 0.5 - log_q.unsqueeze(0)
    logits[0, 2] = logits[2, 0] = -1e9
    assert plain == pytest.approx(float(torch.nn.functional.cross_entropy(logits, torch.arange(4))), rel=1e-5)
    # uniform negatives: extra columns; a draw of the row's own item is masked; mixture correction
    neg, neg_ids, n = torch.randn(2, 8), torch.tensor([4, 11]), 50
    mixed = task.softmax_loss(user, item, ids, labels, (neg, neg_ids, n))
    cand_ids = torch.cat([ids[:4], neg_ids])
    count = 4 * item_log_q[cand_ids].exp() + 2 / n
    logits = user[:4] @ torch.cat([item[:4], neg]).t() / 0.5 - count.log().unsqueeze(0)
    logits[0, 2] = logits[2, 0] = logits[1, 4] = -1e9
    assert mixed == pytest.approx(float(torch.nn.functional.cross_entropy(logits, torch.arange(4))), rel=1e-5)


def test_two_tower_trains_with_mixed_negatives_and_ids_only(ml_dataset: Path, tmp_path: Path) -> None:
    from app.train import train

    cfg = run_cfg(ml_dataset, "two-tower", tmp_path, max_epochs=1)
    arch = dataclasses.replace(cfg.arch, loss="softmax", uniform_negatives=16, tower_features="ids")
    metrics = train(dataclasses.replace(cfg, arch=arch))
    assert 0.0 <= metrics["test/ndcg_at_10"] <= 1.0
    assert all(torch.isfinite(torch.tensor(x)) for x in metrics["train_loss_per_epoch"])
