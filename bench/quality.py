"""Model quality next to simple baselines, on the same splits, in one run.

    .venv/bin/python -m bench.quality            # all sections (about 20 minutes on 2 cores)
    .venv/bin/python -m bench.quality --only movielens-retrieval

Sections:
  movielens-retrieval  every rating an interaction, per-user random 75/25 split, full-corpus ranking
                       with train items excluded: two-tower vs most-popular vs tuned ALS (implicit)
  movielens-ranking    label rating >= 4, per-user random 80/10/10: DLRM vs logistic regression
  synthetic-ctr        DLRM vs the planted model's optimal AUC (2M rows by default)
  synthetic-retrieval  two-tower vs most-popular vs the planted scorer (log popularity + 2 affinity),
                       and what the data can reveal: the planted items with each user inferred from
                       their train interactions (``inferred_user_scores``)
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from app.config import RunConfig, TrackingConfig, TrainerConfig
from app.train import train
from datamodules.config import DataConfig, PrepareConfig
from datamodules.download import movielens_100k_source
from datamodules.prepare import prepare
from datamodules.schema import read_metadata
from datamodules.streaming import StreamingDataModule
from modules.config import ModelConfig, OptimConfig
from modules.tasks import corpus_metrics

K = 10
ROWS: list[tuple[str, str, str, float]] = []  # section, model, metric, value


def report(section: str, model: str, metric: str, value: float) -> None:
    ROWS.append((section, model, metric, value))
    print(f"[quality] {section:<22} {model:<28} {metric:<14} {value:.4f}", flush=True)


def run(
    model: str,
    path: Path,
    work: Path,
    arch: ModelConfig,
    optim: OptimConfig,
    epochs: int,
    batch: int,
    monitor: str | None = None,
) -> dict[str, Any]:
    cfg = RunConfig(
        model=model,
        data=DataConfig(path=str(path), batch_size=batch),
        arch=arch,
        optim=optim,
        trainer=TrainerConfig(
            max_epochs=epochs,
            patience=2 if monitor is None else 0,
            monitor=monitor,
            output_dir=str(work / "runs"),
            progress_bar=False,
            k=K,
        ),
        tracking=TrackingConfig(enabled=False),
    )
    return train(cfg)


def pairs(path: Path, split: str) -> pd.DataFrame:
    return pd.read_parquet(path / "pairs" / f"{split}.parquet")


def interaction_matrix(frame: pd.DataFrame, n_users: int, n_items: int) -> sp.csr_matrix:
    pos = frame[frame.label > 0.5]
    data = np.ones(len(pos), dtype=np.float32)
    return sp.csr_matrix((data, (pos.user_id, pos.item_id)), shape=(n_users, n_items))


def eval_scores(
    scores: torch.Tensor, users: list[int], items: list[int], train_pairs: pd.DataFrame, target: pd.DataFrame
) -> tuple[float, float]:
    return corpus_metrics(scores, users, items, train_pairs, target, K)


def target_users(target: pd.DataFrame) -> list[int]:
    return sorted(int(u) for u in target[(target.label > 0.5) & (target.user_id > 0)].user_id.unique())


def popularity_scores(train_pairs: pd.DataFrame, users: list[int], items: list[int]) -> torch.Tensor:
    counts = np.bincount(train_pairs[train_pairs.label > 0.5].item_id, minlength=max(items) + 1)
    return torch.as_tensor(counts[items], dtype=torch.float32).expand(len(users), -1).clone()


def als_scores(
    train_pairs: pd.DataFrame,
    users: list[int],
    items: list[int],
    n_users: int,
    n_items: int,
    factors: int,
    reg: float,
    alpha: float,
    iterations: int = 15,
) -> torch.Tensor:
    from implicit.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(
        factors=factors, regularization=reg, alpha=alpha, iterations=iterations, random_state=0
    )
    model.fit(interaction_matrix(train_pairs, n_users, n_items), show_progress=False)
    uf, itf = np.asarray(model.user_factors), np.asarray(model.item_factors)
    return torch.as_tensor(uf[users] @ itf[items].T)


def tuned_als(train_pairs: pd.DataFrame, n_users: int, n_items: int, items: list[int]) -> dict[str, float]:
    """Grid-search ALS on a validation split carved from train (10% of each user's interactions)."""
    rng = np.random.default_rng(0)
    holdout = rng.random(len(train_pairs)) < 0.1
    fit, val = train_pairs[~holdout], train_pairs[holdout]
    users = target_users(val)
    best: tuple[float, dict[str, float]] = (-1.0, {})
    for factors, reg, alpha in itertools.product((32, 64, 128), (0.01, 0.1, 1.0), (1.0, 5.0, 20.0)):
        s = als_scores(fit, users, items, n_users, n_items, factors, reg, alpha)
        ndcg = eval_scores(s, users, items, fit, val)[1]
        if ndcg > best[0]:
            best = (ndcg, {"factors": factors, "reg": reg, "alpha": alpha})
    return best[1]


def movielens_retrieval(work: Path) -> None:
    path = work / "ml-retrieval"
    prepare(
        PrepareConfig(
            dataset="movielens-100k",
            source=movielens_100k_source(),
            out=str(path),
            val_frac=0.0,
            test_frac=0.25,
            label_threshold=0.0,
            overwrite=True,
        )
    )
    meta = read_metadata(path)
    tr, te = pairs(path, "train"), pairs(path, "test")
    items = sorted(int(i) for i in pd.read_parquet(path / "items.parquet").item_id)
    users = target_users(te)
    n_users, n_items = meta.feature("user_id").cardinality, meta.feature("item_id").cardinality
    section = "movielens-retrieval"
    pop = eval_scores(popularity_scores(tr, users, items), users, items, tr, te)
    report(section, "most-popular", f"recall@{K}", pop[0])
    report(section, "most-popular", f"ndcg@{K}", pop[1])
    params = tuned_als(tr, n_users, n_items, items)
    als = eval_scores(
        als_scores(tr, users, items, n_users, n_items, int(params["factors"]), params["reg"], params["alpha"]),
        users,
        items,
        tr,
        te,
    )
    report(section, f"ALS (implicit) {params}", f"recall@{K}", als[0])
    report(section, f"ALS (implicit) {params}", f"ndcg@{K}", als[1])
    m = run(
        "two-tower",
        path,
        work,
        ModelConfig(
            embedding_dim=64,
            tower_layers=[64],
            similarity="cosine",
            temperature=0.2,
            loss="softmax",
            uniform_negatives=512,
        ),
        OptimConfig(sparse_lr=0.05, dense_lr=1e-3),
        epochs=12,
        batch=1024,
        monitor="train/loss_epoch",
    )
    report(section, "two-tower (mixed negatives, log-Q)", f"recall@{K}", m[f"test/recall_at_{K}"])
    report(section, "two-tower (mixed negatives, log-Q)", f"ndcg@{K}", m[f"test/ndcg_at_{K}"])


def features_matrix(path: Path, split: str, cache: Path) -> tuple[sp.csr_matrix, np.ndarray]:
    """One-hot sparse features (multi-hot averaged) and dense features of every row of a split."""
    meta = read_metadata(path)
    dm = StreamingDataModule(
        DataConfig(path=str(path), batch_size=meta.block_rows * 8, shuffle=False, cache_dir=str(cache))
    )
    loader = {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[split]()
    blocks, labels = [], []
    for b in loader:
        n = len(b.labels)
        parts = [sp.csr_matrix(b.dense_features.numpy())]
        for f in meta.sparse_features:
            jt = b.sparse_features[f.name]
            lengths = jt.lengths().numpy()
            rows = np.repeat(np.arange(n), lengths)
            weights = 1.0 / np.maximum(lengths[rows], 1)
            parts.append(sp.csr_matrix((weights, (rows, jt.values().numpy())), shape=(n, f.cardinality)))
        blocks.append(sp.hstack(parts).tocsr())
        labels.append(b.labels.numpy())
    dm.teardown()
    return sp.vstack(blocks).tocsr(), np.concatenate(labels)


def movielens_ranking(work: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    path = work / "ml-ranking"
    prepare(PrepareConfig(dataset="movielens-100k", source=movielens_100k_source(), out=str(path), overwrite=True))
    section = "movielens-ranking"
    xtr, ytr = features_matrix(path, "train", work / "c1")
    xva, yva = features_matrix(path, "val", work / "c2")
    xte, yte = features_matrix(path, "test", work / "c3")
    best = max(
        (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
        key=lambda c: roc_auc_score(yva, LogisticRegression(C=c, max_iter=2000).fit(xtr, ytr).decision_function(xva)),
    )
    lr = LogisticRegression(C=best, max_iter=2000).fit(xtr, ytr)
    report(section, f"logistic regression (C={best})", "test AUC", roc_auc_score(yte, lr.decision_function(xte)))
    m = run(
        "dlrm",
        path,
        work,
        ModelConfig(embedding_dim=64, dense_arch=[64], over_arch=[128, 64]),
        OptimConfig(sparse_lr=0.02, dense_lr=1e-3),
        epochs=10,
        batch=512,
    )
    report(section, "DLRM", "test AUC", m["test/auroc"])


def synthetic_ctr(work: Path, rows: int) -> None:
    path = work / "ctr"
    meta = prepare(PrepareConfig(dataset="synthetic-ctr", out=str(path), rows=rows, overwrite=True))
    section = "synthetic-ctr"
    report(section, "planted model (optimum)", "test AUC", meta.extra["planted_test_auc"])
    m = run(
        "dlrm",
        path,
        work,
        ModelConfig(embedding_dim=16, dense_arch=[64], over_arch=[128, 64]),
        OptimConfig(sparse_lr=0.05, dense_lr=2e-3),
        epochs=4,
        batch=4096,
    )
    report(section, "DLRM", "test AUC", m["test/auroc"])


def inferred_user_scores(
    n_users: int,
    item_factors: np.ndarray,
    log_pop: np.ndarray,
    train_users: np.ndarray,
    train_items: np.ndarray,
    users: list[int],
    items: list[int],
    samples: int = 64,
) -> torch.Tensor:
    """The planted scorer with each user's factors *inferred from their train interactions*.

    The planted scorer knows every user's true factors, which no model trained on the data can: a
    user has a few dozen interactions to reveal 8 factors from. This reference gives the items away
    (their true factors and popularity) and infers each user as a Bayesian would under the planted
    model: pick probability softmax over the corpus of 2 * affinity + log popularity, the standard
    normal prior the generator draws factors from; MAP by Adam, then a Laplace approximation of the
    posterior (prior + picks x 4 x the factor covariance under the softmax), and the score of an item
    is the log of its pick probability averaged over ``samples`` posterior draws. Every train
    interaction counts as a pick (the generator picks first, then draws the label). Rows and columns
    are vocabulary indices (``n_users`` the user table's size; ``item_factors[i]`` those of item index
    i, row 0 unused); ``log_pop`` is -1e9 outside the corpus. Written out here (not a library) because
    it is this generator's own likelihood.
    """
    d = item_factors.shape[1]
    v = torch.as_tensor(item_factors / np.sqrt(d), dtype=torch.float32)
    lp = torch.as_tensor(log_pop, dtype=torch.float32)
    picked_u, picked_i = torch.as_tensor(train_users), torch.as_tensor(train_items)
    u = torch.zeros(n_users, d, requires_grad=True)
    opt = torch.optim.Adam([u], lr=0.05)
    for _ in range(300):
        logz = torch.logsumexp(2 * u @ v.T + lp, 1)
        nll = -(2 * (u[picked_u] * v[picked_i]).sum(1) - logz[picked_u]).sum() + 0.5 * (u**2).sum()
        opt.zero_grad()
        nll.backward()
        opt.step()
    g = torch.Generator().manual_seed(0)
    n = torch.bincount(picked_u, minlength=n_users).float()
    out = torch.zeros(len(users), len(items))
    cols = torch.as_tensor(items)
    with torch.no_grad():
        for lo in range(0, len(users), 250):
            rows = torch.as_tensor(users[lo : lo + 250])
            mu = u[rows]
            p = torch.softmax(2 * mu @ v.T + lp, 1)
            m1 = p @ v
            cov = torch.einsum("bi,id,ie->bde", p, v, v) - m1[:, :, None] * m1[:, None, :]
            chol = torch.linalg.cholesky(torch.linalg.inv(torch.eye(d) + 4 * n[rows][:, None, None] * cov))
            acc = torch.zeros(len(rows), len(items))
            for _ in range(samples):
                draw = mu + (chol @ torch.randn(len(rows), d, 1, generator=g)).squeeze(2)
                acc += torch.softmax(2 * draw @ v.T + lp, 1)[:, cols]
            out[lo : lo + 250] = torch.log(acc / samples + 1e-30)
    return out


def synthetic_retrieval(work: Path, rows: int) -> None:
    path = work / "sr"
    prepare(PrepareConfig(dataset="synthetic-retrieval", out=str(path), rows=rows, overwrite=True))
    meta = read_metadata(path)
    truth = np.load(path / "ground_truth.npz")
    tr, te = pairs(path, "train"), pairs(path, "test")
    items = sorted(int(i) for i in pd.read_parquet(path / "items.parquet").item_id)
    users = target_users(te)
    section = "synthetic-retrieval"
    # raw id i is row i of the planted factors; map vocabulary indices back to raw ids
    from datamodules.schema import read_vocab

    raw_user = np.array([int(x) for x in read_vocab(path, meta.feature("user_id"))])
    raw_item = np.array([int(x) for x in read_vocab(path, meta.feature("item_id"))])
    uf, itf = truth["user_factors"][raw_user[np.array(users) - 1]], truth["item_factors"][raw_item[np.array(items) - 1]]
    d = uf.shape[1]
    planted = 2.0 * (uf @ itf.T) / np.sqrt(d) + np.log(truth["item_popularity"][raw_item[np.array(items) - 1]])
    # the items' planted factors and popularity by vocabulary index (row 0: out of vocabulary)
    n_items = meta.feature("item_id").cardinality
    item_factors = np.zeros((n_items, d), np.float32)
    item_factors[1:] = truth["item_factors"][raw_item]
    log_pop = np.full(n_items, -1e9)
    log_pop[items] = np.log(truth["item_popularity"][raw_item[np.array(items) - 1]])
    inferred = inferred_user_scores(
        meta.feature("user_id").cardinality,
        item_factors,
        log_pop,
        tr.user_id.to_numpy(),
        tr.item_id.to_numpy(),
        users,
        items,
    )
    for name, scores in (
        ("most-popular", popularity_scores(tr, users, items)),
        ("planted scorer (true user factors)", torch.as_tensor(planted, dtype=torch.float32)),
        ("planted items, users inferred from their train interactions", inferred),
    ):
        r = eval_scores(scores, users, items, tr, te)
        report(section, name, f"recall@{K}", r[0])
        report(section, name, f"ndcg@{K}", r[1])
    m = run(
        "two-tower",
        path,
        work,
        ModelConfig(embedding_dim=32, tower_layers=[64, 32], similarity="dot", temperature=1.0, loss="softmax"),
        OptimConfig(sparse_lr=0.05, dense_lr=2e-3),
        epochs=6,
        batch=2048,
        monitor="train/loss_epoch",
    )
    report(section, "two-tower (softmax, log-Q)", f"recall@{K}", m[f"test/recall_at_{K}"])
    report(section, "two-tower (softmax, log-Q)", f"ndcg@{K}", m[f"test/ndcg_at_{K}"])


SECTIONS = {
    "movielens-retrieval": lambda w, a: movielens_retrieval(w),
    "movielens-ranking": lambda w, a: movielens_ranking(w),
    "synthetic-ctr": lambda w, a: synthetic_ctr(w, a.ctr_rows),
    "synthetic-retrieval": lambda w, a: synthetic_retrieval(w, a.retrieval_rows),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(SECTIONS), action="append")
    parser.add_argument("--ctr-rows", type=int, default=2_000_000)
    parser.add_argument("--retrieval-rows", type=int, default=200_000)
    parser.add_argument("--work", type=str, default=None)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="recsys-quality-"))
    for name in args.only or list(SECTIONS):
        SECTIONS[name](work, args)
    print("\n| section | model | metric | value |\n| --- | --- | --- | ---: |")
    for section, model, metric, value in ROWS:
        print(f"| {section} | {model} | {metric} | {value:.4f} |")


if __name__ == "__main__":
    main()
