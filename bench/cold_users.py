"""Users held out of training entirely, embedded from part of their history (issue 10), on MovieLens-100K.

    .venv/bin/python -m bench.cold_users [--split-seed 0] [--held-frac 0.1] [--work DIR]

A share of the users (``--held-frac``, drawn with ``--split-seed``) is removed from the source before
preparation, so no interaction of theirs reaches train, val or the vocabulary of users. The history
two-tower (``configs/two-tower-history-movielens.yaml`` with ``--arch.user_id_in_tower false``: a
user is their history and side features, so a new user embeds like a trained one) trains on the rest
with early stopping on val NDCG@10. Each held-out user then gives a random half of their items to
``modules.user_embedding.embed_users_from_items``; Recall@10 is measured on the other half over the
whole item corpus, the given items excluded. Beside it: most-popular (train counts) and EASE^R fitted
on the training users and applied to the given items (EASE^R scores a new user from their items
natively), with lambda chosen on the same training users' validation carve-out.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import app.train as recipe
from app.cli import load_run_config
from app.config import RunConfig
from bench.baselines import ease_weights, interaction_matrix, retrieval_metrics
from cluster.runtime import WorkerRuntime
from datamodules.config import PrepareConfig
from datamodules.download import movielens_100k_source
from datamodules.prepare import prepare
from datamodules.schema import read_metadata
from modules.user_embedding import embed_items, embed_users_from_items, item_vocabulary

K = 10
PRESET = Path(__file__).parent.parent / "configs" / "two-tower-history-movielens.yaml"
LAMBDAS = [50.0, 100.0, 200.0, 400.0, 800.0, 1600.0]


def held_out_source(work: Path, frac: float, seed: int) -> tuple[Path, pd.DataFrame]:
    """A copy of the MovieLens-100K source without the held-out users, and their interactions."""
    src = Path(movielens_100k_source())
    inter = pd.read_csv(src / "ml-100k.inter", sep="\t", dtype=str)
    users = np.sort(inter["user_id:token"].unique())
    rng = np.random.default_rng(seed)
    held = set(rng.choice(users, size=max(1, round(len(users) * frac)), replace=False))
    out = work / "source"
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "ml-100k.inter":
            shutil.copy(f, out / f.name)
    is_held = inter["user_id:token"].isin(held)
    inter[~is_held].to_csv(out / "ml-100k.inter", sep="\t", index=False)
    return out, inter[is_held]


def recall(scores: torch.Tensor, targets: list[set[int]]) -> float:
    """Recall@K of each row's top K columns against its target columns (K capped by the target size)."""
    top = torch.topk(scores, K, dim=1).indices.tolist()
    return float(np.mean([len(set(t) & want) / min(K, len(want)) for t, want in zip(top, targets, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--held-frac", type=float, default=0.1)
    parser.add_argument("--work", type=str, default=None)
    parser.add_argument("--flag", action="append", default=[], help="an extra training flag (repeatable)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="recsys-cold-"))
    source, held = held_out_source(work, args.held_frac, args.split_seed)
    data = work / "data"
    prepare(
        PrepareConfig(
            dataset="movielens-100k",
            source=str(source),
            out=str(data),
            val_frac=0.1,
            test_frac=0.0,
            label_threshold=0.0,
            seed=args.split_seed,
            overwrite=True,
        )
    )
    meta = read_metadata(data)

    # the trained plain model: train() exports it for serving; keep what it exports (bench only)
    trained: dict[str, Any] = {}
    export = recipe.export_model

    def keep(cfg: RunConfig, task: Any, meta: Any) -> tuple[Any, dict[str, Any]] | None:
        out = export(cfg, task, meta)
        if out is not None:
            trained["model"] = out[0].model
        return out

    recipe.export_model = keep
    flags = [f"--data={data}", f"--trainer.output_dir={work / 'runs'}", "--tracking.enabled=false"]
    flags += ["--trainer.progress_bar=false", f"--trainer.monitor=val/ndcg_at_{K}", "--trainer.patience=3"]
    flags += ["--arch.user_id_in_tower=false", "--max-epochs=15", *args.flag]
    recipe.train(load_run_config(PRESET, flags), WorkerRuntime())
    model = trained["model"]

    index = item_vocabulary(data, meta)
    items = pd.read_parquet(data / "items.parquet")
    column = {int(i): c for c, i in enumerate(items.item_id)}
    rng = np.random.default_rng(args.split_seed)
    given: list[list[str]] = []
    rest: list[set[int]] = []
    for _, rows in held.groupby("user_id:token", sort=True):
        seq = [i for i in rows["item_id:token"].tolist() if i in index]
        if len(seq) < 4:
            continue
        seq = list(rng.permutation(seq))
        half = len(seq) // 2
        given.append(seq[:half])
        rest.append({column[index[i]] for i in seq[half:]})
    given_cols = [[column[index[i]] for i in g] for g in given]

    ours = embed_users_from_items(model, meta, index, given) @ embed_items(model, meta, items).t()
    train = pd.read_parquet(data / "pairs" / "train.parquet")
    counts = np.bincount(train.item_id, minlength=int(items.item_id.max()) + 1)[items.item_id.to_numpy()]
    popular = torch.as_tensor(counts, dtype=torch.float32).expand(len(given), -1).clone()

    # EASE^R on the training users, lambda chosen on their validation carve-out, applied to the given items
    n_users, n_items = meta.feature("user_id").cardinality, meta.feature("item_id").cardinality
    x = interaction_matrix(train, n_users, n_items)
    val = pd.read_parquet(data / "pairs" / "val.parquet")
    corpus = sorted(int(i) for i in items.item_id)
    by_lambda = {}
    for lam in LAMBDAS:
        by_lambda[lam] = retrieval_metrics(np.asarray(x @ ease_weights(x, lam)), corpus, train, val)[f"ndcg@{K}"]
    lam = max(by_lambda, key=by_lambda.__getitem__)
    b = ease_weights(x, lam)[np.ix_(items.item_id.to_numpy(), items.item_id.to_numpy())]
    bags = np.zeros((len(given), len(items)), np.float32)
    for r, cols in enumerate(given_cols):
        bags[r, cols] = 1.0
    ease = torch.as_tensor(bags @ b)

    for r, cols in enumerate(given_cols):
        for s in (ours, popular, ease):
            s[r, cols] = -float("inf")
    rows = [("history two-tower (user from items)", recall(ours, rest)), ("most-popular", recall(popular, rest))]
    profile = ", ".join(f"{k:g}: {v:.4f}" for k, v in by_lambda.items())
    rows.append((f"EASE^R (lambda {lam:g}; val NDCG@{K} by lambda {profile})", recall(ease, rest)))
    print(
        f"\n{len(given)} held-out users (split seed {args.split_seed}), half their items given, Recall@{K} on the rest"
    )
    print(f"\n| scorer | Recall@{K} |\n| --- | ---: |")
    for name, value in rows:
        print(f"| {name} | {value:.4f} |")
    print(f"\nratio to most-popular: {rows[0][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()
