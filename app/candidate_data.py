"""``recsys data candidates``: the ranking data of a funnel, made from its own retrieval stage's candidates.

    recsys data candidates --retrieval RUN --data DIR --out DIR2 [--candidates 100] [--serving-retrieval RUN2]

``RUN`` is a two-tower run trained on the train split of the prepared dataset ``DIR``. For every user
with a liked item in ``DIR``'s val split, the run retrieves its top ``--candidates`` items (the user's
train items excluded, as the funnel excludes them), and each candidate is labelled 1 if the user liked
it in val, 0 otherwise: the labels come from interactions the retriever did not train on, never from
the pairs it learned from (and never from test). Each row carries the candidate features of
``modules.candidate_features`` (retrieval score, gap and rank, popularity, history similarities, the
item-item score), computed from what the funnel knew then (``DIR``'s train split), plus the user's and
the item's features; ``histories.parquet`` (the train histories) comes along for rankers that read the
user's history. The users are split into the ranking data's train and val splits (``--val-users``);
its test split is empty.

The result is a prepared dataset in the usual contract (MDS block shards, ``metadata.json``, the same
vocabularies as ``DIR``), so ``recsys train`` trains DLRM, DCN or DeepFM on it on every backend.
``metadata.json: candidates`` records the retrieval run and dataset that produced it and the one the
funnel will serve with: ``--serving-retrieval RUN2`` (default ``RUN``), e.g. the same recipe refitted
on train + val (a dataset prepared with ``--val-frac 0``, whose test split is the same). The funnel
refuses, in one line, a ranking run trained on it behind any other retrieval run or dataset, and this
step refuses a serving run that trained on ``DIR``'s test interactions.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.errors import RecsysError, require

log = logging.getLogger(__name__)

CANDIDATE_BLOCK = 1024
"""Users whose candidates and features are computed at once."""


@dataclass(frozen=True)
class CandidatesConfig:
    """``recsys data candidates``: a ranking dataset from a retrieval run's candidates."""

    retrieval: str
    """MLflow run of the two-tower trained on --data's train split: it produces the candidates."""
    data: str
    """The prepared dataset that run trained on (its val split labels the candidates)."""
    out: str
    """Output directory (built in a temporary sibling and renamed when complete)."""
    candidates: int = 100
    """Candidates per user: what the retrieval stage hands to the ranker (serve with the same number)."""
    serving_retrieval: str | None = None
    """The two-tower run the funnel will serve this ranker with (default: --retrieval), e.g. the same
    recipe trained on train + val."""
    val_users: float = 0.2
    """Share of the users whose candidate lists form the ranking data's val split (early stopping)."""
    val_fold: int = 0
    """Which share of the users is val: fold F takes the users whose seeded hash lies in
    [F x --val-users, (F + 1) x --val-users), so folds 0..1/val_users-1 partition the users."""
    item_item_rank: int = 256
    """Rank of the item-item model (EASE^R on a low-rank Gram, modules.candidate_features) behind the
    item-item candidate features; 0 leaves those features out."""
    item_item_lambda: float = 400.0
    """The item-item model's EASE^R lambda."""
    features: list[str] | None = None
    """The candidate features to keep (default: all of modules.candidate_features.FEATURES)."""
    seed: int = 0
    """Seeds the user split and the order of the lists."""
    tracking_uri: str | None = None
    overwrite: bool = False
    """Replace an existing output directory (a prepared dataset only)."""


def check_config(cfg: CandidatesConfig) -> list[str]:
    """Refuse bad flags before any work; returns the candidate features to write."""
    from modules.candidate_features import FEATURES, ITEM_ITEM_FEATURES, item_item_spec

    require(cfg.candidates >= 1, f"--candidates: must be at least 1, got {cfg.candidates}")
    require(0 <= cfg.val_users < 1, f"--val-users: must be in [0, 1), got {cfg.val_users}")
    require(
        cfg.val_fold >= 0 and (cfg.val_fold + 1) * cfg.val_users <= 1 + 1e-9,
        f"--val-fold: {cfg.val_fold} x --val-users {cfg.val_users} is past the last user",
    )
    item_item = item_item_spec(cfg.item_item_rank, cfg.item_item_lambda)
    names = list(cfg.features) if cfg.features is not None else list(FEATURES)
    unknown = [n for n in names if n not in FEATURES]
    require(not unknown, f"--features: unknown {', '.join(unknown)} (choose from {', '.join(FEATURES)})")
    require(len(names) > 0, "--features: at least one candidate feature")
    twice = sorted({n for n in names if names.count(n) > 1}, key=names.index)
    require(not twice, f"--features: {', '.join(twice)} given more than once (each feature is one column)")
    if item_item is None:
        if cfg.features is not None:  # asked for by name: never silently left out
            dropped = [n for n in names if n in ITEM_ITEM_FEATURES]
            require(
                not dropped,
                f"--features: {', '.join(dropped)} need(s) the item-item model, which --item-item-rank 0 "
                "leaves out; pass --item-item-rank > 0 or drop them from --features",
            )
        names = [n for n in names if n not in ITEM_ITEM_FEATURES]
    return names


def refuse_own_inputs(cfg: CandidatesConfig) -> None:
    """One line, before any work, if --out is, contains or lies inside one of this command's inputs:
    --data, or the dataset a --retrieval / --serving-retrieval run trained on (its config's data.path)."""
    from datamodules.output import refuse_inputs

    refuse_inputs(cfg.out, [(f"--data {cfg.data}", cfg.data)])  # before asking the tracking store anything
    runs = [("--retrieval", cfg.retrieval)]
    if cfg.serving_retrieval and cfg.serving_retrieval != cfg.retrieval:
        runs.append(("--serving-retrieval", cfg.serving_retrieval))
    for flag, run_id in runs:
        path = run_dataset(run_id, cfg.tracking_uri, flag)
        refuse_inputs(cfg.out, [(f"the dataset of {flag} {run_id} ({path})", path)])


def run_dataset(run_id: str, tracking_uri: str | None, flag: str) -> str:
    """The dataset path a training run read (its config's ``data.path``, what ``fetch_stage`` reads)."""
    from app.recommend import download, read_stage_config, run_client

    client = run_client(run_id, tracking_uri, flag)
    with tempfile.TemporaryDirectory() as tmp:
        config = download(client, run_id, "config.yaml", Path(tmp), flag)
        return str(read_stage_config(config, f"{flag} {run_id}: config.yaml")["data"]["path"])


def stage_fingerprint_of(stage: Any) -> str:
    from modules.funnel import dataset_fingerprint

    return str(dataset_fingerprint(stage.meta, stage.user_vocab, stage.item_vocab))


def user_split(users: list[str], share: float, seed: int, fold: int = 0) -> np.ndarray:
    """True for the users of the val split: a seeded hash of the raw id in [fold x share, (fold+1) x share)
    (stable per user, so the folds partition the users)."""
    keys = [int.from_bytes(hashlib.sha256(f"{seed}:{u}".encode()).digest()[:8], "big") / 2**64 for u in users]
    return np.array([fold * share <= k < (fold + 1) * share for k in keys], dtype=bool)


def build_candidates(cfg: CandidatesConfig) -> Any:
    """Write the ranking dataset of ``cfg`` (atomically) and return its metadata."""
    from app.recommend import assemble_bundle, fetch_stage, load_bundle, load_stage, load_train_pairs
    from datamodules.output import atomic_output, check_output
    from datamodules.schema import read_metadata

    names = check_config(cfg)
    refuse_own_inputs(cfg)
    data = Path(cfg.data)
    meta = read_metadata(data)
    require(meta.task == "retrieval", f"--data {cfg.data}: has no users and items (task {meta.task})")
    check_output(Path(cfg.out), cfg.overwrite)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_bundle(assemble_bundle(cfg.retrieval, None, Path(tmp) / "bundle", cfg.tracking_uri))
        rec = loaded.recommender
        local = load_stage_tables(data, meta)
        fingerprint = stage_fingerprint_of(rec.retrieval)
        require(
            fingerprint == local_fingerprint(data, meta),
            f"--retrieval {cfg.retrieval}: trained on another dataset than --data {cfg.data} "
            "(its split or vocabularies differ); pass the dataset the run trained on",
        )
        serving, serving_fingerprint = cfg.retrieval, fingerprint
        if cfg.serving_retrieval and cfg.serving_retrieval != cfg.retrieval:
            serving = cfg.serving_retrieval
            stage_dir = fetch_stage(serving, cfg.tracking_uri, Path(tmp) / "serving", "--serving-retrieval", True)
            stage = load_stage(stage_dir)
            require(stage.kind.retrieves, f"--serving-retrieval {serving}: a {stage.kind.name} model cannot retrieve")
            serving_fingerprint = stage_fingerprint_of(stage)
            refuse_test_leak(stage, load_train_pairs(stage_dir, stage.meta).frame(), rec.retrieval, data, meta)
        with atomic_output(Path(cfg.out), cfg.overwrite) as out:
            return write_candidates(cfg, names, rec, local, meta, data, out, (serving, serving_fingerprint))


def local_fingerprint(data: Path, meta: Any) -> str:
    from datamodules.schema import read_vocab
    from modules.funnel import dataset_fingerprint

    users = read_vocab(data, meta.feature(meta.user_id_feature or "user_id"))
    items = read_vocab(data, meta.feature(meta.item_id_feature or "item_id"))
    return str(dataset_fingerprint(meta, [str(u) for u in users], [str(i) for i in items]))


def load_stage_tables(data: Path, meta: Any) -> dict[str, pd.DataFrame]:
    """The corpus tables of a local prepared dataset."""
    from datamodules.corpus import read_parquet
    from datamodules.schema import SPLITS, corpus_files

    files = corpus_files(meta)
    root = str(data)
    tables = {name: read_parquet(root, files[name], None) for name in ("users", "items")}
    for split in SPLITS:
        tables[split] = read_parquet(root, files["pairs"][split], None)
    if meta.history:
        tables["histories"] = read_parquet(root, files["histories"], None)
    return tables


def refuse_test_leak(serving: Any, serving_train: pd.DataFrame, retrieval: Any, data: Path, meta: Any) -> None:
    """One line if the serving run's train split holds any of --data's test interactions."""
    from datamodules.corpus import read_parquet
    from datamodules.schema import corpus_files
    from modules.funnel import raw_pairs

    test = raw_pairs(read_parquet(str(data), corpus_files(meta)["pairs"]["test"], None), retrieval)
    trained = raw_pairs(serving_train, serving)
    keys = set(zip(trained.user, trained.item, strict=True))
    leaked = sum((u, i) in keys for u, i in zip(test.user, test.item, strict=True) if u and i)
    if leaked:
        raise RecsysError(
            f"--serving-retrieval: its run trained on {leaked} test interaction(s) of --data {data}; "
            "refit it on a dataset with the same test split (recsys data prepare --val-frac 0, same --seed)"
        )


def write_candidates(
    cfg: CandidatesConfig,
    names: list[str],
    rec: Any,
    tables: dict[str, pd.DataFrame],
    meta: Any,
    data: Path,
    out: Path,
    serving: tuple[str, str],
) -> Any:
    """Retrieve, label, encode and write the candidate rows into ``out``; returns the metadata."""
    import dataclasses

    import torch

    from datamodules.encoding import VOCAB_DIR
    from datamodules.schema import SPLITS, DenseFeature, SplitInfo, default_corpus, write_metadata
    from modules.candidate_features import (
        CANDIDATE_TOWER,
        ITEM_ITEM_FEATURES,
        CandidateFeatures,
        Known,
        fit_item_item,
        item_item_spec,
    )
    from modules.funnel import FeatureTable, model_inputs, progress_bar

    stage = rec.retrieval
    spec = item_item_spec(cfg.item_item_rank, cfg.item_item_lambda) if set(ITEM_ITEM_FEATURES) & set(names) else None
    train = tables["train"]
    n_items = len(stage.item_raw)
    known = Known.from_pairs(train.user_id, train.item_id, train.label, len(stage.user_vocab) + 1)
    item_item = fit_item_item(known, n_items, spec) if spec is not None else None
    features = CandidateFeatures(known, n_items, stage.item_index(rec.index.ids.tolist()), rec.index.vectors, item_item)
    val = tables["val"]
    liked = val[val.label.to_numpy() > 0.5]
    present = np.unique(liked.user_id.to_numpy(np.int64))
    present = present[present > 0]
    users = sorted((stage.user_vocab[u - 1] for u in present.tolist()), key=lambda u: (len(u), u))
    require(len(users) > 0, f"--data {data}: no user with a liked val item that the retrieval run knows")
    positives = np.unique(liked.user_id.to_numpy(np.int64) * n_items + liked.item_id.to_numpy(np.int64))
    idx = stage.user_index(users)
    width = min(cfg.candidates, rec.index.count)
    m, n = len(users), width
    ids = np.empty((m, n), dtype=object)
    values = {name: np.zeros((m, n), np.float32) for name in names}
    labels2 = np.zeros((m, n), np.float32)
    bar = progress_bar(m, True, desc="candidates", unit="user")
    for lo in range(0, m, CANDIDATE_BLOCK):
        block = slice(lo, min(lo + CANDIDATE_BLOCK, m))
        found = rec.candidates(stage.embed("user", idx[block]), [rec.seen.get(int(u), set()) for u in idx[block]], n)
        cand = stage.item_index(found.ids.reshape(-1).tolist()).reshape(found.ids.shape)
        computed = features.compute(cand, found.scores, features.rows_of(idx[block]))
        for name in names:
            values[name][block] = computed[name]
        ids[block] = found.ids
        keys = idx[block][:, None] * n_items + cand
        at = np.minimum(np.searchsorted(positives, keys), len(positives) - 1)
        labels2[block] = (positives[at] == keys) & (cand > 0)
        if bar is not None:
            bar.update(block.stop - block.start)
    if bar is not None:
        bar.close()
    keep = (ids != "").reshape(-1)
    row_user = np.repeat(np.asarray(users, dtype=object), n)[keep]
    row_item = ids.reshape(-1)[keep]
    raw = {name: values[name].reshape(-1)[keep] for name in names}
    labels = labels2.reshape(-1)[keep]
    in_val = user_split(users, cfg.val_users, cfg.seed, cfg.val_fold)
    row_val = np.repeat(in_val, n)[keep]
    refuse_lists_without_positives(cfg, labels, row_val, int(in_val.sum()), len(users) - int(in_val.sum()), n)
    # one MDS block per user's list, in retrieval order; the lists in a seeded random order (the loader
    # shuffles blocks, so a batch holds whole lists: what listwise training and per-list NDCG need)
    row_query = np.repeat(np.arange(m), n)[keep]
    place = np.empty(m, np.int64)
    place[np.random.default_rng(cfg.seed).permutation(m)] = np.arange(m)
    order = np.argsort(place[row_query], kind="stable")

    train_rows = ~row_val
    dense = list(meta.dense_features)
    for name in names:
        column = raw[name][train_rows] if train_rows.any() else raw[name]
        std = float(column.std())
        dense.append(DenseFeature(name, CANDIDATE_TOWER, float(column.mean()), std if std > 1e-12 else 1.0))
    out_meta = dataclasses.replace(
        meta,
        block_rows=int(n),
        dense_features=tuple(dense),
        label={
            "name": "label",
            "definition": f"{meta.label.get('definition', 'label')} in the val split of the retrieval run's dataset",
        },
        split_rule={
            "rule": "candidates",
            "per": "user",
            "val_users": cfg.val_users,
            "val_fold": cfg.val_fold,
            "seed": cfg.seed,
        },
        corpus=default_corpus(),
        candidates={
            "retrieval_run": cfg.retrieval,
            "retrieval_dataset": stage_fingerprint_of(stage),
            "data": str(data.resolve()),
            "serving_run": serving[0],
            "serving_dataset": serving[1],
            "candidates": int(n),
            "labels": "liked in the val split of --data (interactions the retrieval run did not train on)",
            "exclude": "the user's train items",
            "item_item": spec.record() if spec is not None else None,
            "features": names,
            "users": {"train": int((~in_val).sum()), "val": int(in_val.sum())},
        },
    )
    user_table, item_table = (
        FeatureTable(tables["users"], out_meta, "user"),
        FeatureTable(tables["items"], out_meta, "item"),
    )
    u_idx = stage.user_index(list(row_user))
    i_idx = stage.item_index(list(row_item))
    splits: dict[str, SplitInfo] = {}
    (out / "pairs").mkdir()
    for split in SPLITS:
        rows = order[(row_val if split == "val" else ~row_val)[order]] if split != "test" else order[:0]
        dense_x, kjt = model_inputs(
            out_meta,
            len(rows),
            [(user_table, torch.as_tensor(u_idx[rows])), (item_table, torch.as_tensor(i_idx[rows]))],
            {name: raw[name][rows] for name in names},
        )
        enc = block_columns(out_meta, dense_x, kjt, labels[rows])
        sizes = list_sizes(row_query[rows])
        splits[split] = write_lists(enc, sizes, out / split, len(out_meta.multi_hot))
        pd.DataFrame({"user_id": u_idx[rows], "item_id": i_idx[rows], "label": labels[rows]}).to_parquet(
            out / "pairs" / f"{split}.parquet"
        )
    for name in ("users", "items", "histories"):
        if name in tables:
            tables[name].to_parquet(out / f"{name}.parquet")
    # file by file: shutil.copytree would wrap a write error (no space) in shutil.Error, without its errno
    (out / VOCAB_DIR).mkdir()
    for vocab in sorted(f for f in (data / VOCAB_DIR).iterdir() if f.is_file()):
        shutil.copyfile(vocab, out / VOCAB_DIR / vocab.name)
    if (data / "item_titles.parquet").is_file():
        shutil.copyfile(data / "item_titles.parquet", out / "item_titles.parquet")
    out_meta = dataclasses.replace(out_meta, splits=splits)
    write_metadata(out_meta, out)
    log.info(
        "candidates: %d users x %d candidates, %d positives (%d train / %d val users)",
        m,
        n,
        int(labels.sum()),
        int((~in_val).sum()),
        int(in_val.sum()),
    )
    return out_meta


def refuse_lists_without_positives(
    cfg: CandidatesConfig, labels: np.ndarray, row_val: np.ndarray, val_users: int, train_users: int, n: int
) -> None:
    """One line, before anything is written, when the train or the val users' lists hold no liked item:
    a ranker would learn nothing from them, or train a whole epoch and fail on its val metric."""
    remedies = {
        "train": ("learn from", "raise --candidates"),
        "val": ("validate on", "raise --candidates or choose other val users (--val-users, --val-fold, --seed)"),
    }
    for split, rows, users in (("train", ~row_val, train_users), ("val", row_val, val_users)):
        if rows.any() and not labels[rows].any():
            purpose, remedy = remedies[split]
            raise RecsysError(
                f"--candidates {cfg.candidates}: the {users} {split} users' lists of {n} candidates hold no item "
                f"they liked in --data's val split (nothing to {purpose}); {remedy}"
            )


def list_sizes(queries: np.ndarray) -> np.ndarray:
    """Lengths of the runs of equal values in ``queries`` (rows grouped by list), in order."""
    if len(queries) == 0:
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, queries[1:] != queries[:-1]])
    return np.diff(np.r_[starts, len(queries)])


def write_lists(enc: dict[str, Any], sizes: np.ndarray, directory: Path, num_multi: int) -> Any:
    """Write encoded rows as MDS blocks of ``sizes`` rows each (one candidate list per block)."""
    from datamodules.blocks import encode_block
    from datamodules.encoding import SplitWriter

    ends = np.cumsum(sizes)
    offsets = [np.r_[0, np.cumsum(lengths, dtype=np.int64)] for _, lengths in enc["multi"]]
    with SplitWriter(directory, num_multi) as writer:
        for lo, hi in zip(ends - sizes, ends, strict=True):
            multi = [
                (values[off[lo] : off[hi]], lengths[lo:hi])
                for (values, lengths), off in zip(enc["multi"], offsets, strict=True)
            ]
            writer.write(encode_block(enc["dense"][lo:hi], enc["sparse"][lo:hi], enc["label"][lo:hi], multi))
    return writer.info()


def block_columns(meta: Any, dense: Any, kjt: Any, labels: np.ndarray) -> dict[str, Any]:
    """The encoded columns ``datamodules.encoding.write_split`` writes, from model inputs (dense, KJT)."""
    single = [kjt[f.name].values().numpy() for f in meta.single_hot]
    n = len(labels)
    return {
        "dense": dense.numpy().astype(np.float32),
        "sparse": np.stack(single, axis=1).astype(np.int64) if single else np.zeros((n, 0), np.int64),
        "multi": [
            (kjt[f.name].values().numpy(), kjt[f.name].lengths().numpy().astype(np.int32)) for f in meta.multi_hot
        ],
        "label": labels.astype(np.float32),
    }


def summarize_candidates(meta: Any, out: str) -> str:
    """What ``recsys data candidates`` prints."""
    from datamodules.prepare import summarize

    spec = meta.candidates
    lines = [summarize(meta, out), f"candidates   {spec['candidates']} per user from run {spec['retrieval_run']}"]
    lines.append(f"serve with   retrieval run {spec['serving_run']}")
    lines.append(f"features     {', '.join(spec['features'])}")
    return "\n".join(lines)
