"""Loader throughput: the streaming DataModule against slicing the same rows from in-memory tensors.

    .venv/bin/python -m bench.loader                 # 1M rows of synthetic-ctr, batch 4096
    .venv/bin/python -m bench.loader --rows 200000   # quicker

Prints rows/s of each and the ratio to the in-memory baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from datamodules.config import DataConfig, PrepareConfig
from datamodules.prepare import prepare
from datamodules.streaming import StreamingDataModule


def in_memory_rows_per_s(dm: StreamingDataModule, batch: int) -> float:
    """Load every train row into tensors, then time slicing batches and building the same Batch."""
    from torchrec.datasets.utils import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    parts = list(dm.train_dataloader())
    dense = torch.cat([b.dense_features for b in parts])
    labels = torch.cat([b.labels for b in parts])
    keys = parts[0].sparse_features.keys()
    sparse = torch.cat([b.sparse_features.values().view(len(keys), -1).t() for b in parts])
    n = len(labels)
    perm = torch.randperm(n)
    start = time.perf_counter()
    for lo in range(0, n, batch):
        idx = perm[lo : lo + batch]
        s = sparse[idx]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=keys, values=s.t().reshape(-1), lengths=torch.ones(s.numel(), dtype=torch.int32)
        )
        Batch(dense_features=dense[idx], sparse_features=kjt, labels=labels[idx])
    return n / (time.perf_counter() - start)


def datamodule_rows_per_s(path: Path, batch: int, workers: int, cache: Path) -> float:
    dm = StreamingDataModule(DataConfig(path=str(path), batch_size=batch, loader_workers=workers, cache_dir=str(cache)))
    loader = dm.train_dataloader()
    n = 0
    start = time.perf_counter()
    for b in loader:
        n += len(b.labels)
    seconds = time.perf_counter() - start
    dm.teardown()
    return n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--data", type=str, default=None, help="reuse a prepared synthetic-ctr directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recsys-bench-"))
    try:
        path = Path(args.data) if args.data else work / "ctr"
        if not args.data:
            prepare(PrepareConfig(dataset="synthetic-ctr", out=str(path), rows=args.rows))
        # one untimed pass warms the shard cache, so every timed pass reads the same local files
        datamodule_rows_per_s(path, args.batch, 0, work / "cache-warm")
        base = in_memory_rows_per_s(
            StreamingDataModule(
                DataConfig(path=str(path), batch_size=args.batch, shuffle=False, cache_dir=str(work / "cache-mem"))
            ),
            args.batch,
        )
        print(f"{'loader':<34}{'rows/s':>14}{'vs in-memory':>14}")
        print(f"{'in-memory tensors (baseline)':<34}{base:>14,.0f}{1.0:>14.2f}")
        for workers in (0, 2):
            rate = datamodule_rows_per_s(path, args.batch, workers, work / f"cache-{workers}")
            print(f"{f'StreamingDataModule, {workers} workers':<34}{rate:>14,.0f}{rate / base:>14.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
