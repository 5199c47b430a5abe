"""DLRM training throughput: our stack against plain PyTorch and against a hand-written TorchRec loop.

    .venv/bin/python -m bench.train_throughput              # 400k rows of synthetic-ctr, batch 4096
    .venv/bin/python -m bench.train_throughput --rows 100000 --steps 20

Three ways to train the same DLRM on the same batches from the same StreamingDataModule:
  recsys train      Lightning + TorchRecStrategy (DistributedModelParallel, fused in-backward
                    row-wise Adagrad for the tables, Adam for the dense part)
  plain PyTorch     the unsharded model (nn.EmbeddingBag tables) and a hand-written loop with
                    torch.optim.Adagrad on the tables (dense gradients) and Adam on the rest
  TorchRec by hand  the sharded model and the fused optimizer, in a hand-written loop
Prints samples/s of each and the ratios, measured in the same run (first steps are warm-up).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from app.config import RunConfig, TrackingConfig, TrainerConfig
from app.train import build_task, train
from cluster.local import free_port, torchrun_env
from cluster.runtime import WorkerRuntime
from datamodules.config import DataConfig, PrepareConfig
from datamodules.prepare import prepare
from datamodules.schema import read_metadata
from datamodules.streaming import StreamingDataModule
from modules.config import ModelConfig, OptimConfig
from modules.registry import model_kind
from modules.sharding import shard_model

WARMUP = 5


class StepTimer(L.Callback):
    """Samples/s over training steps after the warm-up."""

    def __init__(self) -> None:
        self.start = 0.0
        self.samples = 0
        self.steps = 0
        self.rate = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.steps == WARMUP:
            self.start = time.perf_counter()
        if self.steps >= WARMUP:
            self.samples += len(batch.labels)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.steps += 1
        if self.steps > WARMUP:
            self.rate = self.samples / (time.perf_counter() - self.start)


def config(path: Path, work: Path, batch: int, steps: int) -> RunConfig:
    return RunConfig(
        model="dlrm",
        data=DataConfig(path=str(path), batch_size=batch, cache_dir=str(work / "cache")),
        arch=ModelConfig(embedding_dim=16, dense_arch=[64], over_arch=[128, 64]),
        optim=OptimConfig(sparse="adagrad", sparse_lr=0.05, dense_lr=1e-3),
        trainer=TrainerConfig(
            max_epochs=1,
            max_steps=steps + WARMUP,
            patience=0,
            output_dir=str(work / "runs"),
            progress_bar=False,
            limit_val_batches=1,
        ),
        tracking=TrackingConfig(enabled=False),
    )


def hand_loop(cfg: RunConfig, model: torch.nn.Module, optimizers: list[Any], steps: int) -> float:
    dm = StreamingDataModule(cfg.data)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    samples, start = 0, 0.0
    for i, batch in enumerate(dm.train_dataloader()):
        if i == WARMUP:
            start = time.perf_counter()
        if i >= WARMUP + steps:
            break
        loss = loss_fn(model(batch.dense_features, batch.sparse_features).squeeze(-1), batch.labels)
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
        if i >= WARMUP:
            samples += len(batch.labels)
    dm.teardown()
    return samples / (time.perf_counter() - start)


def plain_pytorch(cfg: RunConfig, steps: int) -> float:
    """The unsharded model: tables are nn.EmbeddingBag; Adagrad on them, Adam on the rest."""
    torch.manual_seed(0)
    model = model_kind("dlrm").build_model(read_metadata(cfg.data.path), cfg.arch, "cpu")
    tables = [p for n, p in model.named_parameters() if "embedding_bags" in n]
    dense = [p for n, p in model.named_parameters() if "embedding_bags" not in n]
    opts = [torch.optim.Adagrad(tables, lr=cfg.optim.sparse_lr), torch.optim.Adam(dense, lr=cfg.optim.dense_lr)]
    return hand_loop(cfg, model, opts, steps)


def torchrec_by_hand(cfg: RunConfig, steps: int) -> float:
    """DistributedModelParallel with the fused optimizer, without Lightning."""
    if not torch.distributed.is_initialized():
        os.environ.update(torchrun_env(0, 1, free_port(), "bench"))
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    data = StreamingDataModule(cfg.data)
    task = build_task(cfg, data)
    task.model, _ = shard_model(task.model, torch.device("cpu"), task.sparse_optimizer(), 1)
    rate = hand_loop(cfg, task.model, [task.configure_optimizers()], steps)
    torch.distributed.destroy_process_group()
    return rate


def ours(cfg: RunConfig) -> float:
    timer = StepTimer()
    train(cfg, WorkerRuntime(callbacks=[timer]))
    return timer.rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recsys-throughput-"))
    try:
        path = work / "ctr"
        prepare(PrepareConfig(dataset="synthetic-ctr", out=str(path), rows=args.rows))
        cfg = config(path, work, args.batch, args.steps)
        plain = plain_pytorch(cfg, args.steps)
        by_hand = torchrec_by_hand(cfg, args.steps)
        stack = ours(cfg)
        print(f"\n{'training loop':<44}{'samples/s':>12}{'vs plain':>10}{'vs by hand':>12}")
        for name, rate in (
            ("plain PyTorch (nn.EmbeddingBag, Adagrad+Adam)", plain),
            ("TorchRec by hand (DMP, fused optimizer)", by_hand),
            ("recsys train (Lightning + TorchRec)", stack),
        ):
            print(f"{name:<44}{rate:>12,.0f}{rate / plain:>10.2f}{rate / by_hand:>12.2f}")
        print(f"\nLightning overhead over the hand-written TorchRec loop: {100 * (1 - stack / by_hand):.1f}%")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
