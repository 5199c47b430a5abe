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

import functools
import gc
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cluster.batch import PartitionJob, PartitionTask, check_batch_cluster, map_partitions
from cluster.config import ClusterConfig
from core.errors import RecsysError, require

log = logging.getLogger(__name__)

CANDIDATE_BLOCK = 2048
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
    block_users: int = CANDIDATE_BLOCK
    """Users whose candidates and features are computed at once: a worker's unit of work (--backend)
    and the memory of one (about users x --candidates x 40 floats)."""
    tracking_uri: str | None = None
    overwrite: bool = False
    """Replace an existing output directory (a prepared dataset only)."""


def check_config(cfg: CandidatesConfig) -> list[str]:
    """Refuse bad flags before any work; returns the candidate features to write."""
    from modules.candidate_features import FEATURES, ITEM_ITEM_FEATURES, item_item_spec

    require(cfg.candidates >= 1, f"--candidates: must be at least 1, got {cfg.candidates}")
    require(cfg.block_users >= 1, f"--block-users: must be at least 1, got {cfg.block_users}")
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
    from app.stages import download, read_stage_config, run_client

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


def build_candidates(cfg: CandidatesConfig, cluster: ClusterConfig | None = None) -> Any:
    """Write the ranking dataset of ``cfg`` (atomically) and return its metadata; ``cluster``: where the
    users' blocks are computed (``--backend``, ``--num-workers``; default this process). Every engine
    and ``--block-users`` writes the same dataset."""
    from app.bundle import assemble_bundle, load_bundle
    from app.stages import fetch_stage, load_stage, load_train_pairs
    from datamodules.output import atomic_output, check_output
    from datamodules.schema import read_metadata

    names = check_config(cfg)
    refuse_own_inputs(cfg)
    data = Path(cfg.data)
    meta = read_metadata(data)
    require(meta.task == "retrieval", f"--data {cfg.data}: has no users and items (task {meta.task})")
    check_output(Path(cfg.out), cfg.overwrite)
    cluster = cluster if cluster is not None else ClusterConfig()
    check_batch_cluster(cluster)
    # the bundle the workers load: beside --out for Ray and Spark (whose workers may be other machines,
    # sharing that filesystem), the system's temporary directory for this machine's own processes
    beside = Path(os.path.abspath(cfg.out)).parent
    shared = beside if cluster.backend != "local" and beside.is_dir() else None
    with tempfile.TemporaryDirectory(prefix=".candidates-", dir=shared) as tmp:
        bundle = assemble_bundle(cfg.retrieval, None, Path(tmp) / "bundle", cfg.tracking_uri)
        rec = load_bundle(bundle).recommender
        known = load_train_pairs(bundle / "retrieval", rec.retrieval.meta)  # memory-mapped CSR
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
            refuse_test_leak(stage, load_train_pairs(stage_dir, stage.meta), rec.retrieval, data, meta)
        with atomic_output(Path(cfg.out), cfg.overwrite) as out:
            job = CandidateJob(cfg, names, bundle, cluster)
            return write_candidates(job, rec, known, local, meta, data, out, (serving, serving_fingerprint))


def local_fingerprint(data: Path, meta: Any) -> str:
    from datamodules.schema import read_vocab
    from modules.funnel import dataset_fingerprint

    users = read_vocab(data, meta.feature(meta.user_id_feature or "user_id"))
    items = read_vocab(data, meta.feature(meta.item_id_feature or "item_id"))
    return str(dataset_fingerprint(meta, [str(u) for u in users], [str(i) for i in items]))


def load_stage_tables(data: Path, meta: Any) -> dict[str, Any]:
    """The small corpus tables of a local prepared dataset (users, items, the val pairs that label the
    candidates), and the files of the histories (copied through, never held whole)."""
    from datamodules.corpus import read_parquet
    from datamodules.schema import corpus_files

    files = corpus_files(meta)
    root = str(data)
    tables: dict[str, Any] = {name: read_parquet(root, files[name], None) for name in ("users", "items")}
    tables["val"] = read_parquet(root, files["pairs"]["val"], None)
    if meta.history:
        tables["histories"] = [data / rel for rel in files["histories"]]
    return tables


def copy_parquet(sources: list[Path], dest: Path) -> None:
    """One Parquet file of ``sources``' rows, streamed in record batches (a table of every user's history
    is never held whole)."""
    import pyarrow.parquet as pq

    writer = None
    try:
        for source in sources:
            for batch in pq.ParquetFile(source).iter_batches(batch_size=65536):
                if writer is None:
                    writer = pq.ParquetWriter(dest, batch.schema)
                writer.write_batch(batch)
    finally:
        if writer is not None:
            writer.close()


def refuse_test_leak(serving: Any, serving_train: Any, retrieval: Any, data: Path, meta: Any) -> None:
    """One line if the serving run's train split (its ``TrainPairs`` CSR) holds any of --data's test
    interactions. The test pairs are mapped into the serving run's indices and both sides compared as
    sorted int64 keys (user x items + item): no Python object per pair."""
    from datamodules.corpus import read_parquet
    from datamodules.schema import corpus_files

    test = read_parquet(str(data), corpus_files(meta)["pairs"]["test"], None)
    user_raw = np.array(["", *retrieval.user_vocab], dtype=object)[test.user_id.to_numpy(np.int64)]
    users = serving.user_index(user_raw.tolist())
    items = serving.item_index(retrieval.item_raw[test.item_id.to_numpy(np.int64)].tolist())
    width = np.int64(len(serving.item_raw))
    present = (users > 0) & (items > 0)  # a pair the serving run cannot know is no leak
    test_keys = users[present] * width + items[present]
    indptr = np.asarray(serving_train.indptr, np.int64)
    owners = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
    trained = np.sort(owners * width + np.asarray(serving_train.items, np.int64))
    at = np.minimum(np.searchsorted(trained, test_keys), max(len(trained) - 1, 0))
    leaked = int((trained[at] == test_keys).sum()) if len(trained) else 0
    if leaked:
        raise RecsysError(
            f"--serving-retrieval: its run trained on {leaked} test interaction(s) of --data {data}; "
            "refit it on a dataset with the same test split (recsys data prepare --val-frac 0, same --seed)"
        )


@dataclass(frozen=True)
class CandidateJob:
    """What the first pass needs besides the data: the settings, the candidate features to write, the
    retrieval stage's bundle (the workers load it) and where the blocks are computed."""

    cfg: CandidatesConfig
    names: list[str]
    bundle: Path
    cluster: ClusterConfig

    @property
    def block(self) -> int:
        return self.cfg.block_users


IN_PROCESS: dict[str, tuple[Any, Any]] = {}
"""Bundle path -> the driver's loaded Recommender and train pairs while its blocks run: a worker in the driver's own
process (``--backend local --num-workers 1``) uses it instead of loading the bundle a second time
(0.9 GB at the 10M rung)."""

SPILL_ARRAYS = "users.npz"
"""The first pass's shared inputs in the spill directory: the users in list order, their val flags and
the liked val pairs' keys."""


def block_name(block: int) -> str:
    return f"block-{block:06d}.npz"


def block_writer(
    bundle: str, spill: str, names: list[str], n: int, item_item: bool, block: int
) -> Callable[[int, list[str]], int]:
    """The function a worker runs on its blocks (``keys``: block numbers), with the bundle and the
    item-item model (fitted once by the driver, read here) loaded once: each block's users get
    their candidates, features and labels, spilled to ``block-NNNNNN.npz`` (written under a temporary
    name, then renamed). Returns the candidate rows written."""
    from app.bundle import load_bundle
    from app.stages import load_train_pairs
    from modules.candidate_features import CandidateFeatures, Known, load_item_item

    if bundle in IN_PROCESS:
        rec, train = IN_PROCESS[bundle]
    else:
        rec = load_bundle(Path(bundle)).recommender
        train = load_train_pairs(Path(bundle) / "retrieval", rec.retrieval.meta)
    stage = rec.retrieval
    n_items = len(stage.item_raw)
    model = (
        # read into memory, not mapped: the spill directory goes when the command ends, whatever holds this
        load_item_item(Path(spill) / "item_item", stage_fingerprint_of(stage), n_items, "the spilled model", False)
        if item_item
        else None
    )
    known = Known(train.indptr, train.items, train.positive)
    features = CandidateFeatures(known, n_items, stage.item_index(rec.index.ids.tolist()), rec.index.vectors, model)
    with np.load(Path(spill) / SPILL_ARRAYS) as arrays:
        ordered, in_val, positives = arrays["users"], arrays["val"], arrays["positives"]

    def write(_: int, blocks: list[str]) -> int:
        rows = 0
        for key in blocks:
            lo = int(key) * block
            users = ordered[lo : lo + block]
            found = rec.candidates(stage.embed("user", users), [rec.seen.get(int(u), set()) for u in users], n)
            cand = stage.item_index(found.ids.reshape(-1).tolist()).reshape(found.ids.shape)
            computed = features.compute(cand, found.scores, features.rows_of(users))
            values = np.stack([computed[name] for name in names], axis=2)  # (users, n, features)
            keys = users[:, None] * n_items + cand
            at = np.minimum(np.searchsorted(positives, keys), len(positives) - 1)
            labels = ((positives[at] == keys) & (cand > 0)).astype(np.float32)
            path = Path(spill) / block_name(int(key))
            part = path.with_name(f".{path.stem}.{os.getpid()}.npz")
            np.savez(part, users=users, cand=cand, values=values, labels=labels, val=in_val[lo : lo + block])
            os.replace(part, path)
            rows += int((cand > 0).sum())
        return rows

    return write


def write_candidates(
    job: CandidateJob,
    rec: Any,
    train: Any,
    tables: dict[str, Any],
    meta: Any,
    data: Path,
    out: Path,
    serving: tuple[str, str],
) -> Any:
    """Retrieve, label, encode and write the candidate rows into ``out``; returns the metadata.

    Streams: users go through in blocks of ``--block-users`` in the lists' final (seeded) order. A
    first pass retrieves each block's candidates, computes their features and labels and spills them to
    ``.npz`` files beside ``out``; it runs on the blocks as partitions of ``cluster.batch`` (this process,
    ``--num-workers`` local processes, Ray or Spark workers: ``--backend``), each worker loading the bundle
    and the item-item model once. The driver then sums the train rows' statistics block by block and
    encodes each block with them, appending its lists to the split's shards and pairs in block order
    (so every engine writes the same dataset). Memory: one block, the train pairs' CSR (memory-mapped
    from the bundle), the val pairs, the user and item tables."""
    import dataclasses

    from datamodules.encoding import VOCAB_DIR
    from datamodules.schema import DenseFeature, default_corpus, write_metadata
    from modules.candidate_features import (
        CANDIDATE_TOWER,
        ITEM_ITEM_FEATURES,
        Known,
        fit_item_item,
        item_item_spec,
        save_item_item,
    )
    from modules.funnel import progress_bar

    cfg, names = job.cfg, job.names
    stage = rec.retrieval
    spec = item_item_spec(cfg.item_item_rank, cfg.item_item_lambda) if set(ITEM_ITEM_FEATURES) & set(names) else None
    n_items = len(stage.item_raw)
    val = tables["val"]
    liked = val[val.label.to_numpy() > 0.5]
    present = np.unique(liked.user_id.to_numpy(np.int64))
    present = present[present > 0]
    raw_users = np.asarray(stage.user_vocab, dtype=object)[present - 1].astype(str)
    by_id = np.lexsort((raw_users, np.char.str_len(raw_users)))
    idx, raw_users = present[by_id], raw_users[by_id]
    m = len(idx)
    require(m > 0, f"--data {data}: no user with a liked val item that the retrieval run knows")
    positives = np.unique(liked.user_id.to_numpy(np.int64) * n_items + liked.item_id.to_numpy(np.int64))
    n = min(cfg.candidates, rec.index.count)
    in_val = user_split(raw_users.tolist(), cfg.val_users, cfg.seed, cfg.val_fold)
    # one MDS block per user's list, in retrieval order; the lists in a seeded random order (the loader
    # shuffles blocks, so a batch holds whole lists: what listwise training and per-list NDCG need)
    order = np.random.default_rng(cfg.seed).permutation(m)
    sums = np.zeros((3, len(names)), np.float64)  # train rows: count, sum, sum of squares
    totals = {"train": 0.0, "val": 0.0}
    with tempfile.TemporaryDirectory(prefix=".candidates-spill-", dir=out.parent) as spill_dir:
        spill = Path(spill_dir)
        if spec is not None:  # fitted once here, read by every worker
            known = Known(train.indptr, train.items, train.positive)
            save_item_item(fit_item_item(known, n_items, spec), spill / "item_item", stage_fingerprint_of(stage))
        np.savez(spill / SPILL_ARRAYS, users=idx[order], val=in_val[order], positives=positives)
        n_blocks = -(-m // job.block)
        blocks = [spill / block_name(b) for b in range(n_blocks)]
        worker = functools.partial(block_writer, str(job.bundle), str(spill), names, n, spec is not None, job.block)
        batch = PartitionJob(key=f"candidates#{spill}", factory=worker, threads=job.cluster.cpus_per_worker)
        tasks = [PartitionTask(b, [str(b)]) for b in range(n_blocks)]
        bar = progress_bar(m, True, desc="candidates", unit="user")
        IN_PROCESS[str(job.bundle)] = (rec, train)
        results = map_partitions(batch, tasks, job.cluster)
        try:
            for result in results:
                if result.error:
                    raise RecsysError(f"--backend {job.cluster.backend}: block {result.partition}: {result.error}")
                if bar is not None:
                    bar.update(min(job.block, m - result.partition * job.block))
        finally:
            close = getattr(results, "close", None)
            if close is not None:  # stopped early: the engine's workers stop, and forget what they loaded
                close()
            IN_PROCESS.pop(str(job.bundle), None)
            gc.collect()  # an in-process worker's memory-mapped item-item model, unmapped before its files go
            if bar is not None:
                bar.close()
        missing = [b for b, path in enumerate(blocks) if not path.is_file()]
        require(not missing, f"--backend {job.cluster.backend}: blocks {missing[:5]} were not written")
        for path in blocks:  # the train rows' statistics, block by block
            with np.load(path) as block:
                values, labels, cand, block_val = block["values"], block["labels"], block["cand"], block["val"]
            train_rows = (cand > 0) & ~block_val[:, None]
            chosen = values[train_rows].astype(np.float64)
            sums += [np.full(len(names), len(chosen)), chosen.sum(axis=0), (chosen**2).sum(axis=0)]
            totals["train"] += float(labels[train_rows].sum())
            totals["val"] += float(labels[(cand > 0) & block_val[:, None]].sum())
        refuse_lists_without_positives(cfg, totals, int(in_val.sum()), m - int(in_val.sum()), n)
        dense = list(meta.dense_features)
        count = max(sums[0][0], 1.0) if len(names) else 1.0
        for j, name in enumerate(names):
            mean = sums[1][j] / count
            std = float(np.sqrt(max(sums[2][j] / count - mean**2, 0.0)))
            dense.append(
                DenseFeature(name, CANDIDATE_TOWER, float(mean), std if std > 1e-6 * max(1.0, abs(mean)) else 1.0)
            )
        out_meta = dataclasses.replace(
            meta,
            block_rows=int(n),
            dense_features=tuple(dense),
            label={
                "name": "label",
                "definition": f"{meta.label.get('definition', 'label')} in the val split of the retrieval "
                "run's dataset",
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
        splits, positives_total = write_splits(out, out_meta, names, blocks, tables)
    if "histories" in tables:
        copy_parquet(tables["histories"], out / "histories.parquet")
    for name in ("users", "items"):
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
        int(positives_total),
        int((~in_val).sum()),
        int(in_val.sum()),
    )
    return out_meta


def write_splits(
    out: Path, meta: Any, names: list[str], blocks: list[Path], tables: dict[str, Any]
) -> tuple[dict[str, Any], float]:
    """Encode the spilled blocks with ``meta``'s statistics and append their lists to the train and val
    splits' shards and pairs files (the test split stays empty); returns the splits and the positives."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from datamodules.encoding import SplitWriter
    from datamodules.schema import SPLITS
    from modules.funnel import FeatureTable, model_inputs

    user_table, item_table = FeatureTable(tables["users"], meta, "user"), FeatureTable(tables["items"], meta, "item")
    (out / "pairs").mkdir()
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("label", pa.float32())])
    writers = {split: SplitWriter(out / split, len(meta.multi_hot)) for split in SPLITS}
    pairs = {split: pq.ParquetWriter(out / "pairs" / f"{split}.parquet", schema) for split in SPLITS}
    total = 0.0
    try:
        for path in blocks:
            with np.load(path) as block:
                users, cand, values = block["users"], block["cand"], block["values"]
                labels, in_val = block["labels"], block["val"]
            for split in ("train", "val"):
                mine = in_val if split == "val" else ~in_val
                if not mine.any():
                    continue
                valid = cand[mine] > 0
                sizes = valid.sum(axis=1)
                sizes = sizes[sizes > 0]
                u = np.repeat(users[mine], cand.shape[1]).reshape(-1, cand.shape[1])[valid]
                i, y = cand[mine][valid], labels[mine][valid]
                raw = {name: values[mine][valid][:, j] for j, name in enumerate(names)}
                dense_x, kjt = model_inputs(
                    meta, len(u), [(user_table, torch.as_tensor(u)), (item_table, torch.as_tensor(i))], raw
                )
                enc = block_columns(meta, dense_x, kjt, y)
                append_lists(writers[split], enc, sizes)
                pairs[split].write_table(
                    pa.table({"user_id": u.astype(np.int64), "item_id": i.astype(np.int64), "label": y}, schema=schema)
                )
                total += float(y.sum())
    except BaseException:
        for writer in writers.values():
            writer.__exit__(RuntimeError)
        raise
    finally:
        for table in pairs.values():
            table.close()
    for writer in writers.values():
        writer.__exit__(None)
    return {split: writer.info() for split, writer in writers.items()}, total


def refuse_lists_without_positives(
    cfg: CandidatesConfig, totals: dict[str, float], val_users: int, train_users: int, n: int
) -> None:
    """One line, before anything is written, when the train or the val users' lists hold no liked item:
    a ranker would learn nothing from them, or train a whole epoch and fail on its val metric."""
    remedies = {
        "train": ("learn from", "raise --candidates"),
        "val": ("validate on", "raise --candidates or choose other val users (--val-users, --val-fold, --seed)"),
    }
    for split, users in (("train", train_users), ("val", val_users)):
        if users and not totals[split]:
            purpose, remedy = remedies[split]
            raise RecsysError(
                f"--candidates {cfg.candidates}: the {users} {split} users' lists of {n} candidates hold no item "
                f"they liked in --data's val split (nothing to {purpose}); {remedy}"
            )


def append_lists(writer: Any, enc: dict[str, Any], sizes: np.ndarray) -> None:
    """Append encoded rows to an open ``SplitWriter`` as MDS blocks of ``sizes`` rows each (one list a block)."""
    from datamodules.blocks import encode_block

    ends = np.cumsum(sizes)
    offsets = [np.r_[0, np.cumsum(lengths, dtype=np.int64)] for _, lengths in enc["multi"]]
    for lo, hi in zip(ends - sizes, ends, strict=True):
        multi = [
            (values[off[lo] : off[hi]], lengths[lo:hi])
            for (values, lengths), off in zip(enc["multi"], offsets, strict=True)
        ]
        writer.write(encode_block(enc["dense"][lo:hi], enc["sparse"][lo:hi], enc["label"][lo:hi], multi))


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
