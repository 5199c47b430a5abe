"""Ranking with the user's history (issue 10): DLRM on the movielens-ranking protocol, with and without
the ``user_history`` multi-hot feature.

    .venv/bin/python bench/ranking_history.py --split-seed 0 [--variant NAME ...]          # choose on val
    .venv/bin/python bench/ranking_history.py --split-seed 1 --variant chosen --test       # then test

The data is ``bench/baselines.py``'s ``prepare_ranking`` (label rating >= 4, per-user random
80/10/10, ``--split-seed`` seeds it); the tuned LightGBM of docs/BASELINES.md is the bar. Each variant
is ``configs/dlrm-movielens.yaml`` plus its flags, trained with early stopping on val AUC; the table
shows the best val AUC and its epoch, and with ``--test`` the test AUC of that epoch's checkpoint
(look at it only for the recipe chosen on val). Results go to docs/HISTORY.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from app.cli import load_run_config
from app.train import train
from bench.baselines import prepare_ranking
from cluster.runtime import WorkerRuntime

PRESET = Path(__file__).parent.parent / "configs" / "dlrm-movielens.yaml"
# The preset before issue 10 (spelled out so that the variants do not move with the preset).
BASE = [
    "--batch-size=512",
    "--arch.embedding_dim=64",
    "--arch.dense_arch=[64]",
    "--arch.over_arch=[128,64]",
    "--arch.history=false",
    "--optim.sparse_lr=0.02",
    "--optim.dense_lr=0.001",
    "--max-epochs=10",
]
HISTORY = [*BASE, "--arch.history=true"]
VARIANTS: dict[str, list[str]] = {
    "chosen": [],  # the preset as it is now
    "no-history": BASE,
    "history-own": [*HISTORY, "--arch.history_table=own"],
    "history-item": [*HISTORY, "--arch.history_table=item"],
    "history-own-dropout0.3": [*HISTORY, "--arch.history_table=own", "--arch.history_dropout=0.3"],
    "history-item-dropout0.3": [*HISTORY, "--arch.history_table=item", "--arch.history_dropout=0.3"],
    "history-own-dim32": [*HISTORY, "--arch.history_table=own", "--arch.embedding_dim=32"],
    "history-own-max50": [*HISTORY, "--arch.history_table=own", "--arch.history_max_len=50"],
    "no-history-dim32": [*BASE, "--arch.embedding_dim=32"],
    "history-item-dim32": [*HISTORY, "--arch.history_table=item", "--arch.embedding_dim=32"],
    "no-history-dim16": [*BASE, "--arch.embedding_dim=16"],
    "history-own-dim16": [*HISTORY, "--arch.history_table=own", "--arch.embedding_dim=16"],
    "no-history-lr0.01": [*BASE, "--optim.sparse_lr=0.01"],
    "history-own-lr0.01": [*HISTORY, "--arch.history_table=own", "--optim.sparse_lr=0.01"],
}


class ValCurve(Callback):
    """Val AUC after every epoch (the sanity check left out)."""

    def __init__(self) -> None:
        self.auc: list[float] = []

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking and "val/auroc" in trainer.callback_metrics:
            self.auc.append(float(trainer.callback_metrics["val/auroc"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--variant", choices=list(VARIANTS), action="append")
    parser.add_argument("--test", action="store_true", help="also report test AUC (the chosen recipe only)")
    parser.add_argument("--work", type=str, default=None)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="recsys-ranking-history-"))
    path = work / f"ml-ranking-{args.split_seed}"
    if not (path / "metadata.json").exists():
        prepare_ranking(path, args.split_seed)
    rows = []
    for name in args.variant or list(VARIANTS):
        flags = [
            f"--data={path}",
            f"--trainer.output_dir={work / 'runs' / f'{args.split_seed}-{name}'}",
            "--tracking.enabled=false",
            "--trainer.progress_bar=false",
            *VARIANTS[name],
        ]
        curve = ValCurve()
        m = train(load_run_config(PRESET, flags), WorkerRuntime(callbacks=[curve]))
        best = max(range(len(curve.auc)), key=lambda e: curve.auc[e])
        row: tuple[Any, ...] = (name, args.split_seed, best, curve.auc[best])
        if args.test:
            row = (*row, m["test/auroc"])
        rows.append(row)
        print(f"[ranking-history] {row} val curve {[round(a, 4) for a in curve.auc]}", flush=True)
    test = " test AUC |" if args.test else ""
    print(f"\n| variant | split seed | best epoch | val AUC |{test}\n| --- | --- | --- | ---: |{' ---: |' * args.test}")
    for r in rows:
        print("| " + " | ".join(f"{x:.4f}" if isinstance(x, float) else str(x) for x in r) + " |")


if __name__ == "__main__":
    main()
