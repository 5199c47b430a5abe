"""The validation search behind the funnel recipe's choices (issue 17; docs/FUNNEL.md, "How it was chosen").

    .venv/bin/python -m bench.funnel_search --work WORK                      # WORK of a bench/funnel.py run
    .venv/bin/python -m bench.funnel_search --work WORK --only lightgbm --candidates 50 200

Everything here is validation: the candidate lists of ``bench/funnel.py``'s labelling run (its top N per
user, labelled by the labelling copy's val split), split by user into 5 folds (``recsys data candidates
--val-fold F``, 20% of the users each); a ranker trains on the other 80% and is scored on the fold's
lists. Reported per variant: NDCG@10 within the lists (what early stopping and LightGBM's ``eval_at``
see) for each fold and their mean, and for LightGBM also NDCG@10 over all of each val user's liked
items (so that different N compare). Test data is never read. Each result is appended as one JSON line
to ``--log`` (docs/funnel_search.jsonl keeps the rounds that chose the shipped recipe).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from app.candidate_data import CandidatesConfig, build_candidates
from bench.funnel import RANKING_PRESET, liked_sets, raw_pairs, train_preset

FOLDS = 5
RANKERS: dict[str, list[str]] = {
    # configs/funnel-ranking.yaml plus these flags (the preset: DCN, history, dim 64, and since round 2
    # without the user and item id tables; rounds 1-2 ran the others on the preset with the ids)
    "dcn-history-dim64-no-ids": [],
    "dcn-history-dim64": ["--arch.drop_features=[]"],
    "dcn-history-dim32": ["--arch.embedding_dim=32"],
    "dcn-history-sparse-lr-0.005": ["--arch.embedding_dim=32", "--optim.sparse_lr=0.005"],
    "dcn-no-history": ["--arch.history=false"],
    "deepfm-history": ["--model=deepfm", "--arch.embedding_dim=32"],
    "dlrm-history": ["--model=dlrm"],
    "dcn-history-listwise": ["--arch.loss=softmax"],
}
LIGHTGBM: dict[str, dict[str, Any]] = {
    "no-ids": {"drop": ["user_id", "item_id"]},
    "with-ids": {"drop": []},
    "no-ids-no-list-ranks": {"drop": ["user_id", "item_id", "item_item_rank", "popularity_rank"]},
    "no-ids-no-item-item": {"drop": ["user_id", "item_id", "item_item_score", "item_item_gap", "item_item_rank"]},
}
LIGHTGBM_PARAMS: dict[str, Any] = {"num_leaves": 15, "learning_rate": 0.05, "min_child_samples": 50}


def folds(runs: Mapping[str, Any], work: Path, n: int, uri: str) -> list[Path]:
    """The candidate lists of the labelling run, once per fold of val users (built when missing)."""
    out = []
    for fold in range(FOLDS):
        path = work / f"search-n{n}-fold{fold}"
        if not (path / "metadata.json").is_file():
            build_candidates(
                CandidatesConfig(
                    retrieval=runs["labelling"],
                    data=runs["label"],
                    out=str(path),
                    candidates=n,
                    serving_retrieval=runs["retrieval"],
                    val_users=1 / FOLDS,
                    val_fold=fold,
                    tracking_uri=uri,
                    overwrite=True,
                )
            )
        out.append(path)
    return out


def lightgbm_fold(path: Path, drop: list[str], relevant: Mapping[str, set[str]]) -> tuple[float, float]:
    """(NDCG@10 within the val lists, NDCG@10 over the val users' liked items) of LightGBM LambdaRank."""
    import lightgbm as lgb

    from bench.baselines import lightgbm_frame, load_tabular
    from datamodules.schema import read_metadata

    meta = read_metadata(path)

    def grouped(split: str) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
        tab = load_tabular(path, split, path.parent / f"cache-{path.name}-{split}-{time.time_ns()}")
        frame = lightgbm_frame(tab, meta)
        order = np.argsort(frame.user_id.to_numpy(), kind="stable")
        frame, labels = frame.iloc[order].reset_index(drop=True), tab.labels[order]
        return frame, labels, frame.groupby("user_id", sort=False).size().to_numpy()

    train, val = grouped("train"), grouped("val")
    columns = [c for c in train[0].columns if c not in drop]
    categorical = [f.name for f in meta.sparse_features if not f.multi_hot and f.name in columns]
    model = lgb.LGBMRanker(
        objective="lambdarank", n_estimators=2000, verbosity=-1, n_jobs=1, random_state=0, **LIGHTGBM_PARAMS
    )
    model.fit(
        train[0][columns],
        train[1],
        group=train[2],
        eval_X=(val[0][columns],),
        eval_y=(val[1],),
        eval_group=[val[2]],
        eval_at=[10],
        categorical_feature=categorical or "auto",
        callbacks=[lgb.early_stopping(100, verbose=False)],
    )
    users = np.array(["", *json.loads((path / "vocab" / "user_id.json").read_text())], dtype=object)
    items = np.array(["", *json.loads((path / "vocab" / "item_id.json").read_text())], dtype=object)
    scored = pd.DataFrame(
        {
            "user": users[val[0].user_id.to_numpy()],
            "item": items[val[0].item_id.to_numpy()],
            "score": model.predict(val[0][columns]),
        }
    ).sort_values(["user", "score"], ascending=[True, False])
    discounts = [1.0 / math.log2(r + 2) for r in range(10)]
    total = count = 0.0
    for user, group in scored.groupby("user"):
        rel = relevant.get(str(user))
        if rel:
            hits = sum(discounts[r] for r, item in enumerate(group.item.tolist()[:10]) if item in rel)
            total, count = total + hits / sum(discounts[: min(10, len(rel))]), count + 1
    return float(model.best_score_["valid_0"]["ndcg@10"]), total / count


def ranker_fold(path: Path, flags: list[str], work: Path, uri: str, name: str) -> tuple[float, int]:
    """(best val NDCG@10 within the lists, its epoch) of the ranking preset plus ``flags`` on one fold."""
    from mlflow.tracking import MlflowClient

    run = train_preset(RANKING_PRESET, path, work, uri, name, *flags)
    history = sorted(MlflowClient(uri).get_metric_history(run["run_id"], "val/ndcg_at_10"), key=lambda m: m.step)
    values = [m.value for m in history]
    return max(values), int(np.argmax(values)) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="the WORK directory of a bench/funnel.py run")
    parser.add_argument("--only", choices=("rankers", "lightgbm"), default=None)
    parser.add_argument("--variants", nargs="*", default=None, help="names of RANKERS / LIGHTGBM to run")
    parser.add_argument("--candidates", type=int, nargs="*", default=[100], help="N: lightgbm runs at each")
    parser.add_argument("--log", type=Path, default=Path("docs/funnel_search.jsonl"))
    args = parser.parse_args()
    runs = json.loads((args.work / "runs.json").read_text())
    uri = f"sqlite:///{args.work.resolve()}/mlflow.db"
    relevant = liked_sets(raw_pairs(Path(runs["label"]), "val"))

    def log(row: dict[str, Any]) -> None:
        row = {"work": str(args.work), **row}
        with args.log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    if args.only != "rankers":
        for n in args.candidates:
            paths = folds(runs, args.work, n, uri)
            for name, spec in LIGHTGBM.items():
                if args.variants and name not in args.variants:
                    continue
                scores = [lightgbm_fold(p, spec["drop"], relevant) for p in paths]
                in_list, full = [round(s[0], 4) for s in scores], [round(s[1], 4) for s in scores]
                means = {"in_list_mean": round(float(np.mean(in_list)), 4), "full_mean": round(float(np.mean(full)), 4)}
                log({"ranker": "lightgbm", "variant": name, "candidates": n, "in_list": in_list, "full": full, **means})
    if args.only != "lightgbm":
        paths = folds(runs, args.work, 100, uri)
        for name, flags in RANKERS.items():
            if args.variants and name not in args.variants:
                continue
            scores = [ranker_fold(p, flags, args.work, uri, f"search-{name}-f{i}") for i, p in enumerate(paths)]
            in_list = [round(s[0], 4) for s in scores]
            mean = round(float(np.mean(in_list)), 4)
            epochs = [s[1] for s in scores]
            log(
                {
                    "ranker": "nn",
                    "variant": name,
                    "flags": flags,
                    "in_list": in_list,
                    "best_epochs": epochs,
                    "in_list_mean": mean,
                }
            )


if __name__ == "__main__":
    main()
