"""Ranking with the user's history (issue 10): DLRM on the movielens-ranking protocol, with and without
the ``user_history`` multi-hot feature.

    .venv/bin/python -m bench.ranking_history --split-seed 0 [--variant NAME ...] [--seeds 3]     # choose on val
    .venv/bin/python -m bench.ranking_history --split-seed 1 --variant history-own-dim32 --seeds 3 --test

The data is ``bench/baselines.py``'s ``prepare_ranking`` (label rating >= 4, per-user random
80/10/10, ``--split-seed`` seeds it); the tuned LightGBM of docs/BASELINES.md is the bar. Each variant
is ``configs/dlrm-movielens.yaml`` plus its flags, trained with early stopping on val AUC; the table
shows the best val AUC and its epoch, and with ``--test`` the test AUC of that epoch's checkpoint
(look at it only for the recipe chosen on val); ``--seeds N`` trains each variant with N weight
seeds and reports the mean AUCs (differences of 0.002 are within one seed's noise). Results go to docs/HISTORY.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from statistics import mean
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
    "preset": [],  # configs/dlrm-movielens.yaml as it is now
    "no-history": BASE,
    "history-own": [*HISTORY, "--arch.history_table=own"],
    "history-item": [*HISTORY, "--arch.history_table=item"],
    "history-own-dropout0.3": [*HISTORY, "--arch.history_table=own", "--arch.history_dropout=0.3"],
    "history-item-dropout0.3": [*HISTORY, "--arch.history_table=item", "--arch.history_dropout=0.3"],
    # the val-best on split seed 0 (the mean of 3 weight seeds), by a margin within the noise
    "history-own-dim32": [*HISTORY, "--arch.history_table=own", "--arch.embedding_dim=32"],
    "history-own-max50": [*HISTORY, "--arch.history_table=own", "--arch.history_max_len=50"],
    "dcn-no-history": [*BASE, "--model=dcn"],
    "dcn-no-history-dim32": [*BASE, "--model=dcn", "--arch.embedding_dim=32"],
    # the val-best DCN on both split seeds: configs/dcn-history-movielens.yaml
    "dcn-history-own-dim32": [*HISTORY, "--model=dcn", "--arch.history_table=own", "--arch.embedding_dim=32"],
    "deepfm-no-history": [*BASE, "--model=deepfm"],
    "deepfm-history-own-dim32": [*HISTORY, "--model=deepfm", "--arch.history_table=own", "--arch.embedding_dim=32"],
    "no-history-dim32": [*BASE, "--arch.embedding_dim=32"],
    "history-item-dim32": [*HISTORY, "--arch.history_table=item", "--arch.embedding_dim=32"],
    "no-history-dim16": [*BASE, "--arch.embedding_dim=16"],
    "history-own-dim16": [*HISTORY, "--arch.history_table=own", "--arch.embedding_dim=16"],
    "no-history-lr0.01": [*BASE, "--optim.sparse_lr=0.01"],
    "history-own-lr0.01": [*HISTORY, "--arch.history_table=own", "--optim.sparse_lr=0.01"],
}


class ValCurve(Callback):
    """Val AUC after every epoch (the sanity check left out). Read in ``on_validation_end``: a
    callback's ``on_validation_epoch_end`` runs before the task's, which logs the epoch's metrics."""

    def __init__(self) -> None:
        self.auc: list[float] = []

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking and "val/auroc" in trainer.callback_metrics:
            self.auc.append(float(trainer.callback_metrics["val/auroc"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--variant", choices=list(VARIANTS), action="append")
    parser.add_argument("--test", action="store_true", help="also report test AUC (the chosen recipe only)")
    parser.add_argument(
        "--seeds", type=int, default=1, help="weight seeds (--trainer.seed 0..N-1); AUCs are their mean"
    )
    parser.add_argument("--work", type=str, default=None)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="recsys-ranking-history-"))
    path = work / f"ml-ranking-{args.split_seed}"
    if not (path / "metadata.json").exists():
        prepare_ranking(path, args.split_seed)
    rows = []
    tag = "-test" if args.test else ""  # runs of their own: a checkpoint directory is never reused
    for name in args.variant or list(VARIANTS):
        runs = []
        for seed in range(args.seeds):
            flags = [
                f"--data={path}",
                f"--trainer.output_dir={work / 'runs' / f'{args.split_seed}-{name}-{seed}{tag}'}",
                "--tracking.enabled=false",
                "--trainer.progress_bar=false",
                f"--trainer.seed={seed}",
                *VARIANTS[name],
            ]
            curve = ValCurve()
            m = train(load_run_config(PRESET, flags), WorkerRuntime(callbacks=[curve]))
            best = max(range(len(curve.auc)), key=lambda e: curve.auc[e])
            runs.append((best, curve.auc[best], m.get("test/auroc", float("nan"))))
            shown = f", test AUC {runs[-1][2]:.4f}" if args.test else ""
            print(
                f"[ranking-history] {name} seed {seed}: val curve {[round(a, 4) for a in curve.auc]}{shown}", flush=True
            )
        row: tuple[Any, ...] = (name, args.split_seed, ",".join(str(r[0]) for r in runs), mean(r[1] for r in runs))
        if args.test:
            row = (*row, mean(r[2] for r in runs))
        rows.append(row)
        print(f"[ranking-history] {row}", flush=True)
    test = " test AUC |" if args.test else ""
    print(f"\n| variant | split seed | best epoch per weight seed | val AUC |{test}")
    print(f"| --- | --- | --- | ---: |{' ---: |' * args.test}")
    for r in rows:
        print("| " + " | ".join(f"{x:.4f}" if isinstance(x, float) else str(x) for x in r) + " |")


if __name__ == "__main__":
    main()
