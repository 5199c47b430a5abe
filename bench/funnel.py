"""Funnel quality on MovieLens-100K: retrieval alone vs retrieval + rerank, in one run.

    .venv/bin/python bench/funnel.py                      # prepare, train both presets, evaluate (~10 min, 2 cores)
    .venv/bin/python bench/funnel.py --work DIR           # reuse DIR's dataset and runs when present

One prepared dataset (label = rating >= 4, per-user random 80/10/10 split) serves both stages, so they
see the same train/test split: the two-tower preset (configs/two-tower-movielens.yaml) learns from
the liked train pairs, the DLRM preset (configs/dlrm-movielens.yaml) from every rated train pair. For
each test user with at least one liked test item, the exact index returns N candidates (the user's
train items excluded); the top 10 are then taken

  retrieval    in the index's order (cosine similarity),
  rerank       by the DLRM's probability of a like,
  joint        by retrieval logit (similarity / temperature) + log of the DLRM probability (what
               `recsys recommend --ranking` orders by: Recommender.joint),

and scored against the user's liked test items (NDCG@10, Recall@10; liked items unseen in train
count as misses). Candidate Recall@N says how many liked test items survive the retrieval stage.
Writes a Recall@K-vs-K plot of the stages (docs/funnel_recall.png by default), logs it with the
figures to an MLflow run, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from app.cli import load_run_config
from app.recommend import assemble_bundle, load_bundle
from app.train import run_training
from datamodules.config import PrepareConfig
from datamodules.download import movielens_100k_source
from datamodules.prepare import prepare

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
K = 10
CUTS = (10, 20, 50, 100, 200, 500)


def train_preset(preset: str, data: Path, work: Path, uri: str, epochs: int | None) -> str:
    """Train a shipped preset on ``data`` (``epochs``: at most that many, else the preset's), tracked
    in ``uri``; returns the MLflow run id."""
    flags = [
        *([f"--max-epochs={epochs}"] if epochs else []),
        f"--data={data}",
        f"--tracking-uri={uri}",
        "--experiment=funnel-bench",
        f"--run-name={preset}",
        f"--trainer.output_dir={work / 'runs'}",
        "--trainer.progress_bar=false",
    ]
    return str(run_training(load_run_config(CONFIGS / f"{preset}.yaml", flags))["run_id"])


def setup(work: Path, epochs: tuple[int | None, int | None] = (None, None)) -> tuple[Path, str, dict[str, str]]:
    """The prepared dataset and the two runs (reused from ``work/runs.json`` when present)."""
    data = work / "ml-funnel"
    uri = f"sqlite:///{work}/mlflow.db"
    saved = work / "runs.json"
    if saved.is_file() and data.is_dir():
        return data, uri, json.loads(saved.read_text())
    prepare(PrepareConfig(dataset="movielens-100k", source=movielens_100k_source(), out=str(data), overwrite=True))
    runs = {
        "retrieval": train_preset("two-tower-movielens", data, work, uri, epochs[0]),
        "ranking": train_preset("dlrm-movielens", data, work, uri, epochs[1]),
    }
    saved.write_text(json.dumps(runs))
    return data, uri, runs


def metrics_at(ranked: list[list[str]], relevant: list[set[str]], extra: list[int], k: int) -> tuple[float, float]:
    """Mean Recall@k and NDCG@k (``extra[i]``: relevant items of user i that cannot be ranked)."""
    discounts = [1.0 / math.log2(r + 2) for r in range(k)]
    recall = ndcg = 0.0
    for row, rel, unseen in zip(ranked, relevant, extra, strict=True):
        n_rel = len(rel) + unseen
        hits = [1.0 if i in rel else 0.0 for i in row[:k]]
        recall += sum(hits) / n_rel
        ndcg += sum(h * d for h, d in zip(hits, discounts, strict=False)) / sum(discounts[: min(k, n_rel)])
    return recall / len(ranked), ndcg / len(ranked)


def evaluate(bundle_dir: Path, data: Path, candidates: int) -> dict[str, Any]:
    """The three orderings of each test user's candidates, scored against the liked test items."""
    rec = load_bundle(bundle_dir).recommender
    stage = rec.retrieval
    test = pd.read_parquet(data / "pairs" / "test.parquet")
    liked = test[(test.label > 0.5) & (test.user_id > 0)]
    users = sorted(int(u) for u in liked.user_id.unique())
    in_corpus = set(rec.index.ids.tolist())
    relevant, extra = [], []
    for _, group in liked.groupby("user_id"):
        raw = {stage.item_vocab[i - 1] if i > 0 else "" for i in group.item_id}
        relevant.append(raw & in_corpus)
        extra.append(len(group) - len(raw & in_corpus))
    user_raw = [stage.user_vocab[u - 1] for u in users]
    queries = stage.embed("user", np.asarray(users, np.int64))
    found = rec.candidates(queries, [rec.seen.get(u, set()) for u in users], max(candidates, max(CUTS)))
    probabilities = rec.rank(user_raw, found)
    n = min(candidates, found.ids.shape[1])
    pool = found.ids[:, :n]
    orders = {
        "retrieval": np.arange(n)[None, :].repeat(len(users), 0),
        "rerank": np.argsort(-probabilities[:, :n], axis=1, kind="stable"),
        "joint": np.argsort(-rec.joint(found, probabilities)[:, :n], axis=1, kind="stable"),
    }
    out: dict[str, Any] = {"users": len(users), "candidates": n, "stages": {}}
    for name, order in orders.items():
        ranked = [pool[r, order[r]].tolist() for r in range(len(users))]
        curve = {k: metrics_at(ranked, relevant, extra, k)[0] for k in range(1, n + 1)}
        recall, ndcg = metrics_at(ranked, relevant, extra, K)
        out["stages"][name] = {"recall@10": recall, "ndcg@10": ndcg, "recall_curve": curve}
    full = [found.ids[r].tolist() for r in range(len(users))]
    out["candidate_recall"] = {c: metrics_at(full, relevant, extra, c)[0] for c in CUTS if c <= found.ids.shape[1]}
    return out


def plot(result: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[funnel] matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5))
    labels = {
        "retrieval": "retrieval alone (two-tower, exact index)",
        "rerank": "retrieval + rerank by DLRM probability",
        "joint": "retrieval + rerank by retrieval logit + log DLRM probability",
    }
    for name, stage in result["stages"].items():
        ks = sorted(int(k) for k in stage["recall_curve"])
        ax.plot(ks, [stage["recall_curve"][k] for k in ks], label=labels[name])
    ax.axvline(K, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("K (items shown, of the retrieval stage's candidates)")
    ax.set_ylabel("Recall@K of liked test items")
    ax.set_title(f"MovieLens-100K funnel: {result['users']} test users, {result['candidates']} candidates")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"[funnel] plot written to {path}")
    return path


def log_to_mlflow(uri: str, runs: dict[str, str], result: dict[str, Any], picture: Path | None) -> str:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("funnel-bench")
    with mlflow.start_run(run_name="funnel-quality") as run:
        mlflow.log_params({"retrieval_run": runs["retrieval"], "ranking_run": runs["ranking"], **{"k": K}})
        for name, stage in result["stages"].items():
            mlflow.log_metric(f"{name}/ndcg_at_10", stage["ndcg@10"])
            mlflow.log_metric(f"{name}/recall_at_10", stage["recall@10"])
        for cut, value in result["candidate_recall"].items():
            mlflow.log_metric(f"candidates/recall_at_{cut}", value)
        if picture is not None:
            mlflow.log_artifact(str(picture), "plots")
        return str(run.info.run_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=str, default=None, help="working directory (dataset, runs, MLflow store)")
    parser.add_argument("--candidates", type=int, default=200, help="N: candidates handed to the ranking stage")
    parser.add_argument("--plot", type=Path, default=Path("docs/funnel_recall.png"))
    parser.add_argument("--retrieval-epochs", type=int, default=None, help="cap the two-tower preset's epochs")
    parser.add_argument("--ranking-epochs", type=int, default=None, help="cap the DLRM preset's epochs")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="recsys-funnel-"))
    work.mkdir(parents=True, exist_ok=True)
    data, uri, runs = setup(work, (args.retrieval_epochs, args.ranking_epochs))
    bundle = assemble_bundle(runs["retrieval"], runs["ranking"], work / "bundle", uri)
    result = evaluate(bundle, data, args.candidates)
    picture = plot(result, args.plot)
    run_id = log_to_mlflow(uri, runs, result, picture)
    (args.plot.with_suffix(".json")).write_text(json.dumps(result, indent=1))
    users, n = result["users"], result["candidates"]
    print(f"\n{users} test users with a liked test item; {n} candidates; MLflow run {run_id}")
    print("\n| stage | Recall@10 | NDCG@10 |\n| --- | ---: | ---: |")
    for name, stage in result["stages"].items():
        print(f"| {name} | {stage['recall@10']:.4f} | {stage['ndcg@10']:.4f} |")
    print("\n| candidates N | Recall@N |\n| ---: | ---: |")
    for cut, value in result["candidate_recall"].items():
        print(f"| {cut} | {value:.4f} |")


if __name__ == "__main__":
    main()
