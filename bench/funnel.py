"""The funnel recipe on MovieLens-100K against its baselines, in one run (issue 17).

    .venv/bin/python -m bench.funnel                          # prepares data/movielens-100k if missing
    .venv/bin/python -m bench.funnel --data DIR --work WORK   # DIR: any `recsys data prepare` of it, any --seed

``WORK``'s datasets and runs are reused by a later run only when its fingerprint (the prepared data's
split digests and metadata, the split seed, ``--candidates``, ``--label-frac`` and the source of the
code and presets) is the same; otherwise the bench stops with one line (``--rebuild`` starts over).

Protocol (the issue's): label = rating >= 4, per-user random 80/10/10 split (``DIR``'s own split and
seed); anything may learn from train and val, test labels only score. For every user with a liked test
item, 10 recommendations exclude the user's train and val items and are scored by NDCG@10 against the
user's liked test items (liked test items outside the corpus count as misses).

The recipe (README, "The funnel recipe"), each step a library call of the CLI's:

  1. two copies of ``DIR``'s source prepared with the same seed and test split: ``label`` (val-frac
     ``--label-frac``, 0.3: its train split is part of ``DIR``'s train, its val split holds ``DIR``'s
     val and more) and ``refit`` (val-frac 0: train = ``DIR``'s train + val);
  2. the retrieval preset (configs/funnel-retrieval.yaml, 8 epochs) on ``label`` (its best val NDCG@10
     epoch kept) and on ``refit``: the funnel's retrieval stage;
  3. ``recsys data candidates``: the first run's top ``--candidates`` per user, labelled by ``label``'s
     val split (interactions that run did not train on), served with the refit run;
  4. the ranking preset (configs/funnel-ranking.yaml) on those candidates;
  5. the funnel: the refit two-tower retrieves ``--candidates``, the ranker orders them (the served path:
     ``Recommender.recommend_users``); its top 10 go to ``WORK/recommendations.parquet``.

Baselines on the same split: most popular (train + val likes); the retrieval stage alone; LightGBM
LambdaRank (``lightgbm.LGBMRanker(objective="lambdarank")``, groups = users' lists) trained on the same
candidate rows and features (the history bag aside), with the user and item id columns and without
them (each its own grid, searched coordinate-wise on the candidate data's val lists' NDCG@10, applied to
the same test candidates; the funnel is compared with the better of the two); EASE^R with lambda chosen
on ``DIR``'s val (fitted on train) and refitted on train + val. Prints the markdown table and writes
``WORK/funnel.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from app.bundle import assemble_bundle, load_bundle
from app.candidate_data import CandidatesConfig, build_candidates
from app.cli import load_run_config
from app.train import run_training
from bench.baselines import (
    Dimension,
    Tabular,
    coordinate_search,
    ease_scores,
    interaction_matrix,
    lightgbm_frame,
    load_tabular,
    typed,
)
from datamodules.config import PrepareConfig
from datamodules.prepare import prepare
from datamodules.schema import DatasetMetadata, read_metadata

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
K = 10
RETRIEVAL_PRESET = "funnel-retrieval"
RANKING_PRESET = "funnel-ranking"
DEFAULT_DATA = ROOT / "data" / "movielens-100k"


# -- data -----------------------------------------------------------------------------------------------


def raw_pairs(path: Path, split: str) -> pd.DataFrame:
    """(user, item, label) of a split in raw ids (through the dataset's vocabularies; "" = unknown)."""
    users = np.array(["", *json.loads((path / "vocab" / "user_id.json").read_text())], dtype=object)
    items = np.array(["", *json.loads((path / "vocab" / "item_id.json").read_text())], dtype=object)
    pairs = pd.read_parquet(path / "pairs" / f"{split}.parquet")
    return pd.DataFrame(
        {
            "user": users[pairs.user_id.to_numpy()],
            "item": items[pairs.item_id.to_numpy()],
            "label": pairs.label.to_numpy(np.float32),
        }
    )


def liked_sets(pairs: pd.DataFrame) -> dict[str, set[str]]:
    liked = pairs[pairs.label > 0.5]
    return {str(u): set(map(str, g)) for u, g in liked.groupby("user").item}


def prepare_default(path: Path) -> Path:
    """The README's movielens-100k (``recsys data prepare --dataset movielens-100k``), when missing."""
    from datamodules.download import movielens_100k_source

    if not (path / "metadata.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        prepare(PrepareConfig(dataset="movielens-100k", source=movielens_100k_source(), out=str(path)))
    return path


def derived(data: Path, meta: DatasetMetadata, val_frac: float, out: Path) -> Path:
    """``data``'s source prepared again with its seed, label and test split, another val fraction."""
    if (out / "metadata.json").is_file():
        return out
    rule = meta.split_rule
    require_random = rule.get("rule") == "random"
    if not require_random:
        raise SystemExit(f"{data}: the recipe needs a per-user random split (this one is {rule.get('rule')})")
    prepare(
        PrepareConfig(
            dataset=meta.dataset,
            source=str(meta.source["path"]),
            out=str(out),
            seed=int(rule["seed"]),
            val_frac=val_frac,
            test_frac=float(rule["test_frac"]),
            label_threshold=float(meta.label.get("threshold", 4.0)),
            rows=meta.source.get("rows_cap"),
            overwrite=True,
        )
    )
    return out


def same_test(a: Path, b: Path) -> None:
    """The derived copies must keep ``DIR``'s test split (modulo items unknown to one of the vocabularies)."""

    def keys(path: Path) -> set[tuple[str, str]]:
        t = raw_pairs(path, "test")
        return {(u, i) for u, i in zip(t.user, t.item, strict=True) if u and i}

    ka, kb = keys(a), keys(b)
    differ = len(ka ^ kb)
    if differ > 0.01 * len(ka):
        raise SystemExit(f"{b}: its test split is not {a}'s ({differ} pairs differ)")


# -- training --------------------------------------------------------------------------------------------


def train_preset(preset: str, data: Path, work: Path, uri: str, name: str, *flags: str) -> dict[str, Any]:
    """Train a shipped preset on ``data`` tracked in ``uri``; returns the run's metrics (``run_id``, ``epochs``)."""
    args = [
        f"--data={data}",
        f"--tracking-uri={uri}",
        "--experiment=funnel-bench",
        f"--run-name={name}",
        f"--trainer.output_dir={work / 'runs'}",
        "--trainer.progress_bar=false",
        *flags,
    ]
    return run_training(load_run_config(CONFIGS / f"{preset}.yaml", args))


def best_epochs(uri: str, run_id: str, metric: str = "val/ndcg_at_10") -> int:
    """1 + the epoch of the best value of ``metric`` in a run (what a refit trains for)."""
    from mlflow.tracking import MlflowClient

    history = sorted(MlflowClient(uri).get_metric_history(run_id, metric), key=lambda m: m.step)
    if not history:
        raise SystemExit(f"run {run_id}: no {metric} history")
    return int(np.argmax([m.value for m in history])) + 1


CACHED = (
    "label",
    "refit",
    "candidates",
    "runs",
    "bundle",
    "mlflow.db",
    "runs.json",
    "lgb-cache-train",
    "lgb-cache-val",
)
"""What ``setup`` leaves in ``--work`` (removed by ``--rebuild``)."""
CODE = ("core", "app", "modules", "datamodules", "cluster")
"""The packages whose source the cached runs depend on (with the presets and this file)."""


def code_digest() -> str:
    """SHA-256 of the project's source files that made the runs (the packages, the presets, this file)."""
    digest = hashlib.sha256()
    files = sorted(p for name in CODE for p in (ROOT / name).rglob("*.py"))
    files += [CONFIGS / f"{RETRIEVAL_PRESET}.yaml", CONFIGS / f"{RANKING_PRESET}.yaml", Path(__file__)]
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def data_digest(data: Path, meta: DatasetMetadata) -> str:
    """What identifies the prepared dataset: its splits' digests (shard hashes) and its metadata."""
    from datamodules.integrity import read_split_index, split_digest

    digests = {split: split_digest(read_split_index(str(data), split)) for split in ("train", "val", "test")}
    body = json.dumps({"splits": digests, "metadata": (data / "metadata.json").read_text()}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def work_fingerprint(data: Path, meta: DatasetMetadata, candidates: int, label_frac: float) -> str:
    parts = {
        "data": data_digest(data, meta),
        "seed": meta.split_rule.get("seed"),
        "candidates": candidates,
        "label_frac": label_frac,
        "code": code_digest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest() + "|" + json.dumps(parts)


def stale_reason(runs: Mapping[str, Any], data: Path, fingerprint: str) -> str:
    """Which of the fingerprint's parts differ from the cached runs' (a cache of an older bench: all)."""
    try:
        before = json.loads(str(runs.get("fingerprint", "")).split("|", 1)[1])
    except (IndexError, ValueError):
        return f"made by an older bench for {runs.get('data', 'unknown data')}"
    now = json.loads(fingerprint.split("|", 1)[1])
    differ = [k for k in now if before.get(k) != now[k]]
    return "differ: " + ", ".join(differ) if differ else "unknown"


def setup(
    work: Path, data: Path | None = None, candidates: int = 100, label_frac: float = 0.3, rebuild: bool = False
) -> tuple[Path, str, dict[str, Any]]:
    """The recipe's datasets and runs under ``work`` (reused from ``work/runs.json`` only when its
    fingerprint is this run's: same data, split seed, settings and code; else refused, or with
    ``rebuild`` removed and made again):
    returns (the dataset, the tracking URI, the runs: ``retrieval`` = the funnel's retrieval stage,
    ``ranking`` = its ranker, ``labelling`` = the run whose candidates the ranker learned from)."""
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_default(DEFAULT_DATA) if data is None else data
    uri = f"sqlite:///{work.resolve()}/mlflow.db"
    saved = work / "runs.json"
    meta = read_metadata(data)
    fingerprint = work_fingerprint(data, meta, candidates, label_frac)
    if saved.is_file():
        runs = json.loads(saved.read_text())
        if runs.get("fingerprint") == fingerprint:
            print(f"{work}: reusing its runs (same data, split seed, settings and code: {fingerprint[:12]})")
            return data, uri, runs
        if not rebuild:
            raise SystemExit(
                f"--work {work}: its runs were made for other data, split seed, settings or code "
                f"({stale_reason(runs, data, fingerprint)}); pass a new --work, or --rebuild to start over there"
            )
    for name in CACHED:  # a killed or older run's pieces are never reused without their fingerprint
        target = work / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    timings: dict[str, float] = {}
    started = time.time()
    label = derived(data, meta, label_frac, work / "label") if label_frac != meta.split_rule["val_frac"] else data
    refit = derived(data, meta, 0.0, work / "refit")
    for copy in (label, refit):
        same_test(data, copy)
    timings["prepare"] = time.time() - started
    started = time.time()
    first = train_preset(RETRIEVAL_PRESET, label, work, uri, "retrieval-label")
    epochs = best_epochs(uri, first["run_id"])
    timings["retrieval (label split)"] = time.time() - started
    started = time.time()
    second = train_preset(RETRIEVAL_PRESET, refit, work, uri, "retrieval-refit")
    timings["retrieval (refit)"] = time.time() - started
    started = time.time()
    out = work / "candidates"
    build_candidates(
        CandidatesConfig(
            retrieval=first["run_id"],
            data=str(label),
            out=str(out),
            candidates=candidates,
            serving_retrieval=second["run_id"],
            tracking_uri=uri,
            overwrite=True,
        )
    )
    timings["candidates"] = time.time() - started
    started = time.time()
    ranker = train_preset(RANKING_PRESET, out, work, uri, "ranking")
    timings["ranking"] = time.time() - started
    runs = {
        "fingerprint": fingerprint,
        "data": str(data.resolve()),
        "label": str(label),
        "refit": str(refit),
        "candidates": str(out),
        "labelling": first["run_id"],
        "retrieval": second["run_id"],
        "labelling_best_epoch": epochs,
        "ranking": ranker["run_id"],
        "ranking_epochs": ranker["epochs"],
        "seconds": timings,
    }
    saved.write_text(json.dumps(runs, indent=1))
    return data, uri, runs


# -- evaluation ------------------------------------------------------------------------------------------


def ndcg(ranked: Mapping[str, Sequence[str]], relevant: Mapping[str, set[str]], k: int = K) -> float:
    """Mean NDCG@k over the users of ``relevant`` (every relevant item counts, ranked or not)."""
    discounts = [1.0 / math.log2(r + 2) for r in range(k)]
    total = 0.0
    for user, rel in relevant.items():
        hits = sum(discounts[r] for r, item in enumerate(list(ranked.get(user, []))[:k]) if item in rel)
        total += hits / sum(discounts[: min(k, len(rel))])
    return total / len(relevant)


def most_popular(known: pd.DataFrame, users: Sequence[str]) -> dict[str, list[str]]:
    """The most liked known items (ties by id), each user's known items left out."""
    counts = known[known.label > 0.5].item.value_counts()
    order = sorted(counts.index, key=lambda i: (-counts[i], str(i)))
    seen = known.groupby("user").item.apply(set).to_dict()
    out = {}
    for u in users:
        mine = seen.get(u, set())
        out[u] = [i for i in order if i not in mine][:K]
    return out


def ease_baseline(data: Path, refit: Path, relevant: Mapping[str, set[str]]) -> dict[str, Any]:
    """EASE^R: lambda chosen on ``data``'s val (fitted on its train), then refitted on train + val."""

    def run(fit: pd.DataFrame, exclude: pd.DataFrame, users: Sequence[str], lam: float) -> dict[str, list[str]]:
        user_ids = {u: i for i, u in enumerate(sorted(set(fit.user)))}
        items = np.array(sorted(set(fit.item)), dtype=object)
        item_ids = {x: i for i, x in enumerate(items)}
        pairs = pd.DataFrame(
            {"user_id": fit.user.map(user_ids), "item_id": fit.item.map(item_ids), "label": fit.label.to_numpy()}
        )
        scores = ease_scores(interaction_matrix(pairs, len(user_ids), len(items)), lam)
        seen = exclude.groupby("user").item.apply(set).to_dict()
        out = {}
        for u in users:
            if u not in user_ids:
                continue
            row = scores[user_ids[u]].copy()
            row[[item_ids[i] for i in seen.get(u, ()) if i in item_ids]] = -np.inf
            out[u] = items[np.argsort(-row, kind="stable")[:K]].tolist()
        return out

    train, val = raw_pairs(data, "train"), raw_pairs(data, "val")
    val_relevant = liked_sets(val)
    grid = (Dimension("lam", (50.0, 100.0, 200.0, 400.0, 800.0, 1600.0), lower=1.0),)
    search = coordinate_search(
        lambda p: (ndcg(run(train, train, list(val_relevant), p["lam"]), val_relevant), {}), grid
    )
    lam = float(search.best["lam"])
    known = raw_pairs(refit, "train")
    test = ndcg(run(known, known, list(relevant), lam), relevant)
    profile = {f"{v:g}": round(s, 4) for v, s in search.profile["lam"]}
    return {"lambda": lam, "val_profile": profile, "edge": search.edges["lam"], "test": test}


def funnel_lists(rec: Any, users: Sequence[str], candidates: int, ranked: bool = True) -> dict[str, list[str]]:
    """Top 10 of the served path (``Recommender.recommend_users``), reranked or in retrieval order."""
    saved = rec.ranking, rec.features
    if not ranked:
        rec.ranking, rec.features = None, None
    try:
        out = rec.recommend_users(list(users), k=K, candidates=candidates)
    finally:
        rec.ranking, rec.features = saved
    return {u: r.items for u, r in zip(users, out, strict=True)}


def lightgbm_frame_of(meta: DatasetMetadata, dense: Any, kjt: Any, labels: np.ndarray) -> pd.DataFrame:
    """LightGBM's table (bench.baselines.lightgbm_frame) of rows given as model inputs."""
    import scipy.sparse as sp

    single = [f for f in meta.sparse_features if not f.multi_hot]
    multi = []
    for f in meta.sparse_features:
        if f.multi_hot:
            jt = kjt[f.name]
            rows = np.repeat(np.arange(len(labels)), jt.lengths().numpy())
            ones = np.ones(len(rows), np.float32)
            multi.append(sp.csr_matrix((ones, (rows, jt.values().numpy())), shape=(len(labels), f.cardinality)))
    categorical = np.stack([kjt[f.name].values().numpy() for f in single], axis=1)
    return lightgbm_frame(Tabular(dense.numpy(), categorical, multi, labels), meta)


ID_COLUMNS = ("user_id", "item_id")


def lightgbm_rerank(
    rec: Any, candidates_dir: Path, work: Path, users: Sequence[str], n: int, ids: bool = True
) -> dict[str, Any]:
    """LightGBM LambdaRank on the candidate rows: grid on the val lists' NDCG@10, then the test lists.
    ``ids``: whether the user and item id columns are features (both variants are run: the baseline is
    the better of the two)."""
    import lightgbm as lgb

    from modules.funnel import Candidates, model_inputs

    meta = read_metadata(candidates_dir)
    dropped = () if ids else ID_COLUMNS
    cats = [f.name for f in meta.sparse_features if not f.multi_hot and f.name not in dropped]

    def columns(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.drop(columns=[c for c in dropped if c in frame.columns])

    def grouped(split: str) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
        tab = load_tabular(candidates_dir, split, work / f"lgb-cache-{split}")
        frame = lightgbm_frame(tab, meta)
        order = np.argsort(frame.user_id.to_numpy(), kind="stable")
        frame, labels = frame.iloc[order].reset_index(drop=True), tab.labels[order]
        return columns(frame), labels, frame.groupby("user_id", sort=False).size().to_numpy()

    train, val = grouped("train"), grouped("val")
    grid = (
        Dimension("num_leaves", (7, 15, 31, 63), integer=True, lower=2, upper=255),
        Dimension("learning_rate", (0.02, 0.05, 0.1), lower=0.005, upper=0.5),
        Dimension("min_child_samples", (20, 50, 100, 200), integer=True, lower=1, upper=5000),
    )

    def fit(params: Mapping[str, Any]) -> Any:
        model = lgb.LGBMRanker(
            objective="lambdarank", n_estimators=2000, verbosity=-1, n_jobs=1, random_state=0, **params
        )
        model.fit(
            train[0],
            train[1],
            group=train[2],
            eval_X=(val[0],),
            eval_y=(val[1],),
            eval_group=[val[2]],
            eval_at=[K],
            categorical_feature=cats,
            callbacks=[lgb.early_stopping(100, verbose=False)],
        )
        return model

    def objective(params: Mapping[str, float]) -> tuple[float, dict[str, float]]:
        model = fit(typed(grid, params))
        return float(model.best_score_["valid_0"][f"ndcg@{K}"]), {"trees": float(model.best_iteration_)}

    search = coordinate_search(objective, grid, {"num_leaves": 15, "learning_rate": 0.05, "min_child_samples": 50})
    params = typed(grid, search.best)
    model = fit(params)
    stage = rec.ranking
    lists: dict[str, list[str]] = {}
    for lo in range(0, len(users), 256):
        part = list(users[lo : lo + 256])
        idx = rec.retrieval.user_index(part)
        found = rec.candidates(rec.retrieval.embed("user", idx), [rec.seen.get(int(u), set()) for u in idx], n)
        u, i, candidate, _ = rec.ranking_rows(part, Candidates(found.ids, found.scores))
        dense, kjt = model_inputs(
            stage.meta, len(u), [(stage.users, torch_tensor(u)), (stage.items, torch_tensor(i))], candidate
        )
        scores = model.predict(columns(lightgbm_frame_of(stage.meta, dense, kjt, np.zeros(len(u), np.float32))))
        scores = np.where(found.ids != "", scores.reshape(found.ids.shape), -np.inf)
        for r, user in enumerate(part):
            lists[user] = found.ids[r][np.argsort(-scores[r], kind="stable")[:K]].tolist()
    return {
        "params": {**params, "trees": int(model.best_iteration_)},
        "val_ndcg_in_lists": search.best_score,
        "profile": {k: {f"{v:g}": round(s, 4) for v, s in prof} for k, prof in search.profile.items()},
        "edges": search.edges,
        "lists": lists,
    }


def torch_tensor(values: np.ndarray) -> Any:
    import torch

    return torch.as_tensor(values)


def evaluate(data: Path, uri: str, runs: dict[str, Any], work: Path, candidates: int) -> dict[str, Any]:
    """Every row of the table on ``data``'s test split; writes WORK/recommendations.parquet."""
    test = raw_pairs(data, "test")
    relevant = liked_sets(test)
    users = sorted(relevant, key=lambda u: (len(u), u))
    known = pd.concat([raw_pairs(data, "train"), raw_pairs(data, "val")], ignore_index=True)
    rec = load_bundle(assemble_bundle(runs["retrieval"], runs["ranking"], work / "bundle", uri)).recommender
    out: dict[str, Any] = {"users": len(users), "candidates": candidates, "rows": {}}
    timings: dict[str, float] = {}
    started = time.time()
    funnel = funnel_lists(rec, users, candidates)
    timings["funnel"] = time.time() - started
    rows = [{"user": u, "rank": r + 1, "item": item} for u in users for r, item in enumerate(funnel[u])]
    pd.DataFrame(rows, columns=["user", "rank", "item"]).to_parquet(work / "recommendations.parquet", index=False)
    out["rows"]["most popular (train + val likes)"] = ndcg(most_popular(known, users), relevant)
    out["rows"]["retrieval alone (two-tower refitted on train + val)"] = ndcg(
        funnel_lists(rec, users, candidates, ranked=False), relevant
    )
    out["rows"]["funnel (two-tower + ranker on its candidates)"] = ndcg(funnel, relevant)
    out["lightgbm"] = {}
    for variant, ids in (("with the id columns", True), ("without the id columns", False)):
        started = time.time()
        lgb_result = lightgbm_rerank(rec, Path(runs["candidates"]), work, users, candidates, ids=ids)
        timings[f"lightgbm {variant}"] = time.time() - started
        row = f"LightGBM LambdaRank rerank, {variant} (same candidates and features)"
        out["rows"][row] = ndcg(lgb_result.pop("lists"), relevant)
        out["lightgbm"][variant] = lgb_result
    started = time.time()
    ease = ease_baseline(data, Path(runs["refit"]), relevant)
    timings["ease"] = time.time() - started
    out["rows"][f"EASE^R refit on train + val (lambda {ease['lambda']:g}, chosen on val)"] = ease["test"]
    out["ease"] = ease
    out["seconds"] = timings
    return out


def log_comparison(uri: str, data: Path, result: dict[str, Any]) -> str:
    """The comparison as a run of its own in the bench's experiment: each row's NDCG@10 as a metric, the
    table as ``comparison.md``, a bar chart (``figures/funnel_ndcg_at_10.png``), the test split it was
    scored on as a dataset input and the runs it compared as tags. Returns the run id."""
    import re

    import mlflow

    from app import figures
    from app.tracking import TAG, dataset_inputs
    from datamodules.integrity import read_split_index, split_digest

    meta = read_metadata(data)
    table = "| order | NDCG@10 |\n| --- | ---: |\n" + "".join(
        f"| {name} | {value:.4f} |\n" for name, value in result["rows"].items()
    )
    short = {name: name.split(" (")[0] for name in result["rows"]}
    runs = result["runs"]
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("funnel-bench")
    with mlflow.start_run(run_name="comparison") as run:
        mlflow.set_tags(
            {
                f"{TAG}bench": "funnel",
                f"{TAG}dataset": meta.dataset,
                f"{TAG}funnel.retrieval_run": runs["retrieval"],
                f"{TAG}funnel.labelling_run": runs["labelling"],
                f"{TAG}funnel.ranking_run": runs["ranking"],
                "mlflow.note.content": f"bench/funnel.py on {data} (split seed {result['seed']}):\n\n{table}",
            }
        )
        mlflow.log_params({"data": str(data), "candidates": result["candidates"], "split_seed": result["seed"]})
        mlflow.log_metrics(
            {"ndcg_at_10/" + re.sub(r"[^0-9A-Za-z_./ -]", "", short[n]): v for n, v in result["rows"].items()}
        )
        digest = split_digest(read_split_index(str(data), "test"))
        mlflow.MlflowClient(uri).log_inputs(run.info.run_id, datasets=dataset_inputs(str(data), meta, {"test": digest}))
        mlflow.log_text(table, "comparison.md")
        fig = figures.bar_figure(
            {short[n]: v for n, v in result["rows"].items()},
            "NDCG@10 (test split)",
            f"{meta.dataset}, split seed {result['seed']}: {result['users']} users",
        )
        try:
            mlflow.log_figure(fig, "figures/funnel_ndcg_at_10.png")
        finally:
            figures.close(fig)
        return str(run.info.run_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=None, help="a prepared MovieLens-100K (default: data/movielens-100k)"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/recsys-funnel"), help="datasets, runs, MLflow store")
    parser.add_argument("--candidates", type=int, default=100, help="candidates per user handed to the ranker")
    parser.add_argument(
        "--label-frac", type=float, default=0.3, help="val fraction of the copy whose val labels the candidates"
    )
    parser.add_argument(
        "--rebuild", action="store_true", help="remove --work's runs made for other data, seed or code, and redo them"
    )
    args = parser.parse_args()
    started = time.time()
    data, uri, runs = setup(args.work, args.data, args.candidates, args.label_frac, args.rebuild)
    result = evaluate(data, uri, runs, args.work, args.candidates)
    result["runs"] = runs
    result["seed"] = read_metadata(data).split_rule.get("seed")
    result["total_seconds"] = time.time() - started
    result["comparison_run"] = log_comparison(uri, data, result)
    (args.work / "funnel.json").write_text(json.dumps(result, indent=1, default=str))
    print(
        f"\nsplit seed {result['seed']}: {result['users']} users with a liked test item, {args.candidates} candidates"
    )
    print("\n| order | NDCG@10 |\n| --- | ---: |")
    for name, value in result["rows"].items():
        print(f"| {name} | {value:.4f} |")
    print(f"\nrecommendations: {args.work / 'recommendations.parquet'}; {result['total_seconds']:.0f} s in all")
    print(f"MLflow run {result['comparison_run']} (table and chart): mlflow ui --backend-store-uri {uri}")


if __name__ == "__main__":
    main()
