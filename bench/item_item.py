"""Choose the funnel's item-item signal on validation, and time its build (issue 22).

    .venv/bin/python -m bench.item_item --data data/movielens-100k
    .venv/bin/python -m bench.item_item --data DIR --ranks 256 --lambdas 400 --build-only   # build cost only

For each rank x lambda of ``--ranks`` / ``--lambdas``, the funnel's item-item model
(``modules.candidate_features.fit_low_rank_ease``: EASE^R on a low-rank Gram) is fitted on ``DIR``'s
train likes with the funnel's own function and scored as a recommender on ``DIR``'s val split: every
user with a liked val item gets the 10 items of largest score from their train likes, their train items
excluded, scored by NDCG@10 against their liked val items. Test is never read. Beside each: the build's
wall time and the process's peak RSS after it. The alternatives the issue named are scored the same
way for reference (``--no-reference`` skips them): ``implicit``'s item-item neighbourhoods (BM25,
cosine, TF-IDF, K neighbours) and the dense EASE^R the model replaced (``bench.baselines``).

Writes ``--out`` (JSON lines, one per spec) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from modules.candidate_features import ItemItemSpec, Known, fit_low_rank_ease, user_item_matrix

K = 10
NEIGHBOURS = (25, 50, 100, 200, 400)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def load(data: Path) -> tuple[Known, pd.DataFrame, int]:
    """Train pairs as a CSR by user index, the val pairs, and the item vocabulary size + 1."""
    items = len(json.loads((data / "vocab" / "item_id.json").read_text())) + 1
    users = len(json.loads((data / "vocab" / "user_id.json").read_text())) + 1
    train = pd.read_parquet(data / "pairs" / "train.parquet")
    val = pd.read_parquet(data / "pairs" / "val.parquet")
    return Known.from_pairs(train.user_id, train.item_id, train.label, users), val, items


def val_ndcg(scores_of: Any, known: Known, val: pd.DataFrame, n_items: int, block: int = 2048) -> float:
    """Mean NDCG@10 over users with a liked val item; ``scores_of(x)``: dense scores of a users x items
    CSR of their train likes."""
    liked = val[val.label > 0.5]
    users = np.unique(liked.user_id.to_numpy(np.int64))
    relevant = liked.groupby("user_id").item_id.apply(lambda s: set(s.tolist())).to_dict()
    discounts = 1.0 / np.log2(np.arange(2, K + 2))
    total = 0.0
    for lo in range(0, len(users), block):
        rows = users[lo : lo + block]
        sub = known.take(rows)
        x = user_item_matrix(sub.indptr, sub.items, sub.positive, n_items)
        scores = np.asarray(scores_of(x), np.float32)
        seen = user_item_matrix(sub.indptr, sub.items, None, n_items)
        scores[seen.nonzero()] = -np.inf
        scores[:, 0] = -np.inf
        top = np.argpartition(-scores, K, axis=1)[:, :K]
        order = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1)
        for u, ranked in zip(rows.tolist(), order, strict=True):
            rel = relevant[u]
            hits = sum(discounts[r] for r, item in enumerate(ranked.tolist()) if item in rel)
            total += hits / discounts[: min(K, len(rel))].sum()
    return total / max(len(users), 1)


def low_rank_scorer(model: Any) -> Any:
    """Dense scores of a block of users from a ``LowRankEase``: x - (x V diag(coef) V^T + x / lam) / diag."""
    v, coef, diag = np.asarray(model.vectors), np.asarray(model.coef), np.asarray(model.diag)

    def scores(x: Any) -> np.ndarray:
        dense = x.toarray()
        return dense - ((np.asarray(x @ v) * coef) @ v.T + dense / model.lam) / diag[None, :]

    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/movielens-100k"))
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[200.0, 400.0, 800.0])
    parser.add_argument("--no-reference", action="store_true", help="skip implicit's k-NN and the dense EASE^R")
    parser.add_argument("--out", type=Path, default=None, help="JSON lines (default: none)")
    parser.add_argument("--build-only", action="store_true", help="fit and time the models, score nothing")
    args = parser.parse_args(argv)
    known, val, n_items = load(args.data)
    rows: list[dict[str, Any]] = []
    print(f"{args.data}: {known.rows - 1} users, {n_items - 1} items, {len(known.items)} train pairs")
    likes = user_item_matrix(known.indptr, known.items, known.positive, n_items)

    def record(name: str, score: float, built: float, size: int) -> None:
        rows.append({"model": name, "val_ndcg@10": round(score, 4), "build_s": round(built, 2), "stored_floats": size})
        rows[-1]["peak_rss_gb"] = round(peak_rss_gb(), 2)
        print(json.dumps(rows[-1]), flush=True)

    for rank in args.ranks:
        for lam in args.lambdas:
            started = time.perf_counter()
            model = fit_low_rank_ease(likes, ItemItemSpec(rank, lam))
            built = time.perf_counter() - started
            score = math.nan if args.build_only else val_ndcg(low_rank_scorer(model), known, val, n_items)
            record(f"low-rank EASE^R rank {rank}, lambda {lam:g}", score, built, model.vectors.size + 2 * n_items)
    if not args.no_reference and not args.build_only:
        from implicit.nearest_neighbours import BM25Recommender, CosineRecommender, TFIDFRecommender

        from bench.baselines import ease_weights

        for name, kind in (("BM25", BM25Recommender), ("cosine", CosineRecommender), ("TF-IDF", TFIDFRecommender)):
            for k in NEIGHBOURS:
                started = time.perf_counter()
                knn = kind(K=k, num_threads=0)
                knn.fit(likes, show_progress=False)
                w = knn.similarity.tocsr()
                w.setdiag(0.0)
                built = time.perf_counter() - started
                score = val_ndcg(lambda x, w=w: (x @ w).toarray(), known, val, n_items)
                record(f"implicit item-item {name}, K {k}", score, built, int(w.nnz) * 2)
        for lam in args.lambdas:
            started = time.perf_counter()
            b = ease_weights(likes, lam)
            built = time.perf_counter() - started
            record(f"dense EASE^R lambda {lam:g}", val_ndcg(lambda x, b=b: x @ b, known, val, n_items), built, b.size)
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("\n| item-item model | val NDCG@10 | build s | stored floats |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['val_ndcg@10']:.4f} | {r['build_s']:.2f} | {r['stored_floats']:,} |")


if __name__ == "__main__":
    main()
