"""From trained runs to recommendations: ``recsys index`` and ``recsys recommend``.

    recsys index --run-id RUN [--index flat] [--out DIR]
    recsys recommend --retrieval RUN [--ranking RUN] --user 196 [--k 10] [--candidates 200]
    recsys recommend --retrieval RUN --users users.txt --out recs.parquet
    recsys recommend --retrieval RUN --history 50,181,100

A run is turned into a *stage directory*: its config, dataset metadata and vocabularies, the model's
weights (the run's ``model_state/state_dict.pt``, read with ``weights_only=True`` and kept as
``weights.safetensors``: no pickle) and its dataset's user/item feature tables. A *bundle* is what a
recommender needs, in one directory that the MLflow pyfunc packages as it is::

    bundle.json            the runs, the index fingerprint, the SHA-256 of every other file (checked on load)
    retrieval/             stage directory of the two-tower run (+ train/: its train pairs by user as CSR
                           arrays, for the seen items, popularity and candidate features; + histories/: the
                           users' train histories as CSR arrays), the arrays memory-mapped on load
    ranking/               stage directory of the ranking run (optional)
    index/                 the vector index (modules/index.py), fingerprinted with retrieval/'s weights + vocabularies
    titles.parquet         raw item id -> title, when the dataset has titles

The index of a run is refused unless it was built from the same weights and vocabularies, and a
ranking run unless its dataset came from the same source as the retrieval run's (``check_same_source``).
A run's dataset is read again when its stage is assembled (train pairs, histories, user and item
tables): it is refused unless it is still the dataset the run trained on (``check_dataset_unchanged``).
Outputs (``index --out``, ``recommend --out``) follow ``core.output``'s rule; every other file these
commands write (stages, bundles, indexes in temporary directories) fails with one line too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from app.tracking import STATE_DICT_ARTIFACT, existing_store
from core.errors import RecsysError, printable, require
from core.output import PARQUET_FILE, WRITE_ERRORS, atomic_output, check_output, os_reason

log = logging.getLogger(__name__)

STAGE_CONFIG = "config.yaml"
STAGE_WEIGHTS = "weights.safetensors"
STAGE_META = "metadata.json"
STAGE_VOCAB = "vocab"
TRAIN_PAIRS = "train"
"""Stage subdirectory of the train pairs: ``pairs.{indptr,items,positive}.npy`` + ``item_positives.npy``."""
HISTORIES = "histories"
"""Stage subdirectory of the histories: ``offsets.npy`` + ``values.npy`` (``datamodules.histories``)."""
TITLES = "titles.parquet"
TITLES_IN_DATASET = "item_titles.parquet"
BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = "recsys-recommender-bundle"
BUNDLE_VERSION = 2
"""2: train pairs and histories as memory-mapped CSR arrays (1: Parquet tables read whole)."""
INDEX_ARTIFACT = "index"
DEFAULT_SPEC = "flat"
DATASET_FILES_ARTIFACT = "dataset/files.json"
"""``{"files": {path relative to the dataset: SHA-256}}`` of the dataset files a stage reads later (train
pairs, histories, user and item tables), logged by a training run on a local dataset: when a run has
one, each file is checked against it before it is read (``check_dataset_unchanged``)."""


# -- a run as a stage directory ---------------------------------------------------------------------


@contextlib.contextmanager
def os_errors(who: str, where: str | Path) -> Iterator[None]:
    """An OSError in the body as one RecsysError line starting with ``who``: a write that failed (no
    space, a quota, a read-only or failing disk) names ``where`` the body writes; any other (a file gone,
    no permission) the system's reason and the file."""
    try:
        yield
    except OSError as e:
        file = f": {e.filename}" if getattr(e, "filename", None) else ""
        if e.errno in WRITE_ERRORS:
            raise RecsysError(f"{who}: cannot write in {where} ({os_reason(e)})") from None
        raise RecsysError(f"{who}: {os_reason(e)}{file}") from None


def download(client: Any, run_id: str, path: str, dest: Path, flag: str) -> Path:
    """One artifact of a run, or a one-line error naming it."""
    from mlflow.exceptions import MlflowException

    try:
        return Path(client.download_artifacts(run_id, path, str(dest)))
    except OSError as e:
        if e.errno in WRITE_ERRORS:
            raise RecsysError(f"{flag} {run_id}: cannot download {path} into {dest} ({os_reason(e)})") from None
        raise RecsysError(f"{flag} {run_id}: no {path} in the run ({os_reason(e)})") from None
    except MlflowException as e:
        # MLflow reports a download it could not write (a full disk) as a missing artifact: look
        full = unwritable(dest)
        if full is not None:
            raise RecsysError(f"{flag} {run_id}: cannot download {path} into {dest} ({os_reason(full)})") from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RecsysError(f"{flag} {run_id}: no {path} in the run ({first})") from None


def unwritable(directory: Path) -> OSError | None:
    """Why nothing can be written in ``directory`` (no space, read-only, ...), or None when a small file can."""
    import os

    try:
        with tempfile.TemporaryFile(dir=directory) as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e
    return None


def has_artifact(client: Any, run_id: str, path: str) -> bool:
    parent = str(Path(path).parent) if "/" in path else None
    return any(a.path == path for a in client.list_artifacts(run_id, parent))


def run_client(run_id: str, tracking_uri: str | None, flag: str) -> Any:
    """An MlflowClient on the store, after checking that the run exists there."""
    import os

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file otherwise
    client = MlflowClient(existing_store(tracking_uri))
    try:
        client.get_run(run_id)
    except MlflowException as e:
        raise RecsysError(printable(f"{flag} {run_id}: {str(e).splitlines()[0]}")) from None
    return client


def read_stage_config(path: Path, shown_as: str) -> dict[str, Any]:
    """A run's ``config.yaml`` as plain data (YAML without tags), checked to be a run config."""
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RecsysError(f"{shown_as}: not a plain YAML run config ({reason})") from None
    data, arch = (cfg.get("data"), cfg.get("arch") or {}) if isinstance(cfg, dict) else (None, None)
    if not (
        isinstance(cfg, dict)
        and isinstance(cfg.get("model"), str)
        and isinstance(data, dict)
        and isinstance(data.get("path"), str)
        and isinstance(arch, dict)
    ):
        raise RecsysError(f"{shown_as}: not a recsys run config (needs model, data.path and an arch mapping)")
    return cfg


def check_dataset_unchanged(
    client: Any, run_id: str, data_path: str, logged_meta: Path, work: Path, flag: str
) -> dict[str, Any]:
    """Refuse, with one line naming the dataset, a run whose dataset is no longer the one it trained on:
    a stage reads the train pairs, histories and user/item tables from the dataset's path, and a dataset
    prepared again there (other data, another split, even with the same vocabularies) would answer with
    other users' items. Compared: the dataset's ``metadata.json`` with the copy the run logged
    (``dataset/metadata.json``: source, split, row counts, features) and its train split's digest
    (``datamodules.integrity.split_digest``: the shards' names, sizes and hashes) with the digest the run
    logged for its training dataset input (runs that logged none: the metadata alone), and when the run
    logged ``DATASET_FILES_ARTIFACT``, each file it lists with its SHA-256. Returns what was checked,
    recorded in the stage's ``run.json``."""
    import hashlib

    from core.checksums import sha256_file
    from datamodules.integrity import read_split_index, split_digest
    from datamodules.schema import METADATA_FILE
    from datamodules.storage import fetch_file

    try:
        current = fetch_file(data_path, METADATA_FILE, work / "dataset-now").read_bytes()
    except OSError as e:
        raise RecsysError(
            f"{flag} {run_id}: cannot read its dataset {data_path}/{METADATA_FILE} ({os_reason(e)}); "
            "the run's stage reads its train pairs and tables from there"
        ) from None
    logged = logged_meta.read_bytes()
    if current != logged:
        try:
            now, then = json.loads(current), json.loads(logged)
            differ = sorted(k for k in {*now, *then} if now.get(k) != then.get(k)) if isinstance(now, dict) else []
        except ValueError:
            differ = []
        shown = f": {', '.join(differ[:4])}" if differ else ""
        raise RecsysError(
            f"{flag} {run_id}: dataset {data_path} was prepared again since the run trained (its {METADATA_FILE} "
            f"differs{shown}); train again on it, or prepare the run's data again as it was"
        )
    digest = split_digest(read_split_index(data_path, "train", work / "split-index"))
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = getattr(client.get_run(run_id).inputs, "dataset_inputs", None) or []
    trained = {
        d.dataset.digest
        for d in inputs
        if any(t.key == MLFLOW_DATASET_CONTEXT and t.value == "training" for t in (d.tags or []))
    }
    if trained and digest not in trained:
        raise RecsysError(
            f"{flag} {run_id}: the train split of dataset {data_path} changed since the run trained (digest "
            f"{digest}, the run logged {sorted(trained)[0]}); train again on it"
        )
    checked: dict[str, Any] = {"metadata_sha256": hashlib.sha256(current).hexdigest(), "train_digest": digest}
    if "://" in data_path or not has_artifact(client, run_id, DATASET_FILES_ARTIFACT):
        return checked
    try:
        listed = json.loads(download(client, run_id, DATASET_FILES_ARTIFACT, work, flag).read_text())["files"]
        require(isinstance(listed, dict) and all(isinstance(v, str) for v in listed.values()), "not a mapping")
    except (ValueError, KeyError, TypeError, RecsysError) as e:
        raise RecsysError(f"{flag} {run_id}: {DATASET_FILES_ARTIFACT} of the run is unreadable ({e})") from None
    for name, sha in sorted(listed.items()):
        path = Path(data_path) / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise RecsysError(f"{flag} {run_id}: {DATASET_FILES_ARTIFACT} lists a path outside the dataset ({name!r})")
        if not path.is_file() or sha256_file(path) != sha:
            state = "is gone" if not path.is_file() else "changed"
            raise RecsysError(
                f"{flag} {run_id}: {path} {state} since the run trained on it; train again on the dataset"
            )
    return {**checked, "files": listed}


def fetch_stage(run_id: str, tracking_uri: str | None, dest: Path, flag: str, with_pairs: bool) -> Path:
    """Write the stage directory of a training run into ``dest`` (see the module docstring)."""
    with os_errors(f"{flag} {run_id}", dest):
        return _fetch_stage(run_id, tracking_uri, dest, flag, with_pairs)


def _fetch_stage(run_id: str, tracking_uri: str | None, dest: Path, flag: str, with_pairs: bool) -> Path:
    from datamodules.corpus import read_parquet
    from datamodules.schema import corpus_files, read_metadata
    from datamodules.storage import fetch_file
    from modules.safe_checkpoint import load_state_dict_file, save_weights

    client = run_client(run_id, tracking_uri, flag)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not has_artifact(client, run_id, STATE_DICT_ARTIFACT):
            raise RecsysError(
                f"{flag} {run_id}: the run has no {STATE_DICT_ARTIFACT} (trained before runs logged their weights "
                "as a state dict, or not finished): train it again"
            )
        config = download(client, run_id, "config.yaml", work, flag)
        cfg = read_stage_config(config, f"{flag} {run_id}: config.yaml")
        shutil.copy(config, dest / STAGE_CONFIG)
        weights = download(client, run_id, STATE_DICT_ARTIFACT, work, flag)
        try:  # plain tensors only (a crafted pickle is refused, never run), kept as safetensors
            save_weights(load_state_dict_file(weights), dest / STAGE_WEIGHTS)
        except RecsysError as e:
            raise RecsysError(f"{flag} {run_id}: {str(e).replace(str(weights), STATE_DICT_ARTIFACT)}") from None
        shutil.copy(download(client, run_id, "dataset/metadata.json", work, flag), dest / STAGE_META)
        data_path = str(cfg["data"]["path"])
        checked = check_dataset_unchanged(client, run_id, data_path, dest / STAGE_META, work, flag)
        meta = read_metadata(dest, shown_as=f"run {run_id}: dataset")
        if meta.task != "retrieval":
            raise RecsysError(
                f"{flag} {run_id}: its dataset {meta.dataset!r} has no users and items (task {meta.task}); "
                "a recommender stage needs a dataset prepared from interactions"
            )
        vocab = dest / STAGE_VOCAB
        vocab.mkdir(exist_ok=True)
        logged = has_artifact(client, run_id, "dataset/vocab")
        if logged:
            for f in Path(download(client, run_id, "dataset/vocab", work, flag)).glob("*.json"):
                shutil.copy(f, vocab / f.name)
        for feature in meta.sparse_features:
            if feature.vocab_file is None:
                continue
            name = Path(feature.vocab_file).name
            try:
                current = fetch_file(data_path, feature.vocab_file, work / "dataset").read_bytes()
            except OSError as e:
                if logged:
                    continue  # the run's own copy is enough
                raise RecsysError(f"{flag} {run_id}: cannot read the {feature.name} vocabulary ({e})") from None
            if not logged:
                (vocab / name).write_bytes(current)
            elif current != (vocab / name).read_bytes():
                raise RecsysError(
                    f"{flag} {run_id}: dataset {data_path} was prepared again since the run trained "
                    f"(its {feature.name} vocabulary differs); train again on it"
                )
        files = corpus_files(meta)
        for table in ("users", "items"):
            read_parquet(data_path, files[table], work / "corpus").to_parquet(dest / f"{table}.parquet")
        if with_pairs:
            write_train_pairs(data_path, files["pairs"]["train"], meta, dest / TRAIN_PAIRS, work / "corpus")
        if (with_pairs or (cfg.get("arch") or {}).get("history")) and meta.history:  # what a funnel knows of users
            write_histories(data_path, files["histories"], meta, dest / HISTORIES, work / "corpus")
        try:
            titles = fetch_file(data_path, TITLES_IN_DATASET, work / "titles")
            if titles.is_file():
                shutil.copy(titles, dest / TITLES)
        except RecsysError:
            pass  # a dataset without titles: ids only
    run = {"run_id": run_id, "model": cfg["model"], "dataset": data_path, "dataset_checked": checked}
    (dest / "run.json").write_text(json.dumps(run))
    return dest


def id_bounds(meta: Any) -> tuple[int, int]:
    """(users, items) cardinalities of a retrieval dataset's id features (index 0 = unknown included)."""
    return (
        meta.feature(str(meta.user_id_feature or "user_id")).cardinality,
        meta.feature(str(meta.item_id_feature or "item_id")).cardinality,
    )


def write_train_pairs(data_path: str, files: list[str], meta: Any, out: Path, work: Path) -> None:
    """The train split's pairs as CSR arrays by user (``modules.funnel.TrainPairs``), streamed from its
    Parquet files one record batch at a time (memory O(users + batch), whatever the number of pairs)."""
    from datamodules.corpus import write_csr

    n_users, n_items = id_bounds(meta)
    out.mkdir(parents=True, exist_ok=True)
    positives = np.zeros(n_items, dtype=np.int64)
    write_csr(data_path, files, n_users, n_items, out / "pairs", work, positives, flags=True)
    np.save(out / "item_positives.npy", positives)


def write_histories(data_path: str, files: list[str], meta: Any, out: Path, work: Path) -> None:
    """The users' train histories as CSR arrays (``datamodules.histories.UserHistories``), streamed."""
    from datamodules.corpus import write_history_csr

    n_users, n_items = id_bounds(meta)
    out.mkdir(parents=True, exist_ok=True)
    write_history_csr(data_path, files, n_users, n_items, out)
    shutil.rmtree(out / "fetched", ignore_errors=True)  # remote files it copied to read


def load_train_pairs(stage_dir: Path, meta: Any) -> Any:
    """``modules.funnel.TrainPairs`` of a stage directory, memory-mapped and checked (one line if not)."""
    from datamodules.corpus import checked_array, checked_csr
    from modules.funnel import TrainPairs

    where = stage_dir / TRAIN_PAIRS
    shown = str(where)
    require(where.is_dir(), f"{stage_dir}: no {TRAIN_PAIRS}/ (train pairs): package the bundle again")
    n_users, n_items = id_bounds(meta)
    indptr, items = checked_csr(where / "pairs.indptr.npy", where / "pairs.items.npy", n_users, n_items, shown)
    positive = checked_array(where / "pairs.positive.npy", "b", f"{shown}/pairs.positive.npy")
    require(len(positive) == len(items), f"{shown}/pairs.positive.npy: {len(positive)} flags for {len(items)} pairs")
    counts = checked_array(where / "item_positives.npy", "iu", f"{shown}/item_positives.npy")
    require(len(counts) == n_items, f"{shown}/item_positives.npy: {len(counts)} counts for {n_items} items")
    return TrainPairs(indptr, items, positive, counts)


def load_histories_dir(stage_dir: Path, meta: Any) -> Any:
    """``datamodules.histories.UserHistories`` of a stage directory (None without one), memory-mapped."""
    import torch

    from datamodules.corpus import checked_csr
    from datamodules.histories import UserHistories

    where = stage_dir / HISTORIES
    if not where.is_dir():
        return None
    n_users, n_items = id_bounds(meta)
    offsets, values = checked_csr(where / "offsets.npy", where / "values.npy", n_users, n_items, str(where))
    return UserHistories(torch.from_numpy(offsets.astype(np.int64, copy=False)), torch.from_numpy(values))


def check_retrieves(stage_dir: Path, flag: str) -> None:
    """Refuse, with one line, a run whose model kind has no user and item towers."""
    from modules.registry import model_kind

    run = json.loads((stage_dir / "run.json").read_text())
    if not model_kind(run["model"]).retrieves:
        raise RecsysError(
            f"{flag} {run['run_id']}: a {run['model']} model cannot retrieve (no user and item towers); "
            "pass a two-tower run"
        )


def stage_fingerprint(stage_dir: Path) -> str:
    """What an index is bound to: the stage's weights and every vocabulary file."""
    from modules.index import fingerprint_files

    return fingerprint_files([stage_dir / STAGE_WEIGHTS, *sorted((stage_dir / STAGE_VOCAB).glob("*.json"))])


def load_stage(stage_dir: Path, like: Any = None) -> Any:
    """The ``modules.funnel.Stage`` of a stage directory: the model rebuilt through the registry from
    the config and dataset metadata, its weights read from safetensors (no pickle). ``like``: a stage
    loaded before, whose vocabularies (and their lookups) are reused where this stage's are equal:
    2.5M user ids cost ~0.3 GB a copy."""
    from datamodules.schema import read_metadata
    from modules.config import ModelConfig
    from modules.funnel import FeatureTable, Stage
    from modules.registry import model_kind
    from modules.safe_checkpoint import load_weights_into

    cfg = read_stage_config(stage_dir / STAGE_CONFIG, str(stage_dir / STAGE_CONFIG))
    kind = model_kind(str(cfg["model"]))
    try:
        arch = ModelConfig(**cfg["arch"])
    except (TypeError, ValueError) as e:
        raise RecsysError(f"{stage_dir / STAGE_CONFIG}: bad architecture options ({e})") from None
    meta = read_metadata(stage_dir)
    model = kind.build_model(meta, arch, "cpu")
    load_weights_into(model, stage_dir / STAGE_WEIGHTS)
    vocab_of: dict[str, list[str]] = {}
    for key in (meta.user_id_feature, meta.item_id_feature):
        require(key is not None, f"{stage_dir}: dataset {meta.dataset!r} has no user/item id features")
        vocab_file = meta.feature(str(key)).vocab_file
        require(vocab_file is not None, f"{stage_dir}: feature {key!r} has no vocabulary")
        vocab = [str(v) for v in json.loads((stage_dir / STAGE_VOCAB / Path(str(vocab_file)).name).read_text())]
        if like is not None:
            known = like.user_vocab if key == meta.user_id_feature else like.item_vocab
            vocab = known if known == vocab else vocab
        vocab_of[str(key)] = vocab
    return Stage(
        kind=kind,
        arch=arch,
        meta=meta,
        model=model.eval(),
        user_vocab=vocab_of[str(meta.user_id_feature)],
        item_vocab=vocab_of[str(meta.item_id_feature)],
        users=FeatureTable(pd.read_parquet(stage_dir / "users.parquet"), meta, "user"),
        items=FeatureTable(pd.read_parquet(stage_dir / "items.parquet"), meta, "item"),
        histories=load_histories_dir(stage_dir, meta),
        like=like,
    )


# -- recsys index -----------------------------------------------------------------------------------


def build_item_index(stage_dir: Path, spec: str, out: Path, progress: bool = True) -> Any:
    """Item vectors of every corpus item from the stage's item tower, indexed (metric = the model's
    similarity) and saved into ``out`` with the stage's fingerprint; returns the VectorIndex."""
    from modules.funnel import item_vectors
    from modules.index import build_index, parse_spec, save_index

    parsed = parse_spec(spec)  # a bad spec fails before any work
    stage = load_stage(stage_dir)
    require(
        stage.kind.retrieves, f"--run-id: a {stage.kind.name} model has no item tower to index (use a two-tower run)"
    )
    ids, vectors = item_vectors(stage, progress=progress)
    index = build_index(vectors, ids, parsed, similarity=stage.arch.similarity, progress=progress)
    save_index(index, out, stage_fingerprint(stage_dir))
    return index


def index_run(
    run_id: str,
    spec: str = DEFAULT_SPEC,
    out: str | None = None,
    tracking_uri: str | None = None,
    overwrite: bool = False,
) -> str:
    """``recsys index``: build the run's item index in a private temporary directory, log that directory
    (and nothing else) to the run as ``index/``, and install a copy at ``out`` if given (``core.output``'s
    rule: a new path, or an index replaced with ``overwrite``); returns a one-line summary."""
    from modules.index import INDEX_OUTPUT, parse_spec

    parse_spec(spec)  # a bad spec or --out fails before any download
    if out:
        check_output(out, INDEX_OUTPUT, overwrite)
    client = run_client(run_id, tracking_uri, "--run-id")
    with os_errors(f"--run-id {run_id}", tempfile.gettempdir()), temporary() as tmp:
        stage_dir = fetch_stage(run_id, tracking_uri, tmp / "stage", "--run-id", with_pairs=False)
        check_retrieves(stage_dir, "--run-id")
        built = tmp / INDEX_ARTIFACT
        index = build_item_index(stage_dir, spec, built)
        if out:
            with atomic_output(out, INDEX_OUTPUT, overwrite) as target:
                for f in built.iterdir():
                    shutil.copy(f, target / f.name)
                log_index(client, run_id, built)
        else:
            log_index(client, run_id, built)
    where = f" -> {out}" if out else ""
    summary = f"indexed {index.count} items ({index.spec}, {index.similarity}, dim {index.dim}){where}"
    return f"{summary}; logged to run {run_id} as {INDEX_ARTIFACT}/"


@contextlib.contextmanager
def temporary() -> Iterator[Path]:
    """A private temporary directory, for what a command assembles before it is used or installed."""
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def log_index(client: Any, run_id: str, built: Path) -> None:
    """Log an index directory to the run as ``index/`` (one line if the artifact store refuses it)."""
    from mlflow.exceptions import MlflowException

    try:
        client.log_artifacts(run_id, str(built), INDEX_ARTIFACT)
    except (OSError, MlflowException) as e:
        reason = os_reason(e) if isinstance(e, OSError) else (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RecsysError(f"--run-id {run_id}: cannot log the index to the run ({reason})") from None


# -- bundles and recommend --------------------------------------------------------------------------


def assemble_bundle(
    retrieval: str, ranking: str | None, dest: Path, tracking_uri: str | None = None, index_dir: str | None = None
) -> Path:
    """Everything a recommender needs, from the runs, in ``dest`` (layout in the module docstring).

    The index is ``index_dir`` when given, else the one logged to the retrieval run by ``recsys index``,
    else an exact index built now; either way it must carry the retrieval stage's fingerprint, and its
    FAISS file must be the structure its manifest names. A file that cannot be written (no space in
    ``dest``'s filesystem) is one line.
    """
    with os_errors(f"--retrieval {retrieval}", dest):
        return _assemble_bundle(retrieval, ranking, dest, tracking_uri, index_dir)


def _assemble_bundle(
    retrieval: str, ranking: str | None, dest: Path, tracking_uri: str | None, index_dir: str | None
) -> Path:
    from modules.index import load_index

    dest.mkdir(parents=True, exist_ok=True)
    stage_dir = fetch_stage(retrieval, tracking_uri, dest / "retrieval", "--retrieval", with_pairs=True)
    check_retrieves(stage_dir, "--retrieval")
    fingerprint = stage_fingerprint(stage_dir)
    if ranking:
        check_same_source(stage_dir, fetch_stage(ranking, tracking_uri, dest / "ranking", "--ranking", False))
    if (stage_dir / TITLES).exists():
        shutil.move(str(stage_dir / TITLES), dest / TITLES)
    target = dest / INDEX_ARTIFACT
    if index_dir:
        require(Path(index_dir).is_dir(), f"--index {index_dir}: no such index directory")
        load_index(index_dir, fingerprint)  # refuses an index of other weights or vocabularies, with one line
        shutil.copytree(index_dir, target, dirs_exist_ok=True)
    else:
        client = run_client(retrieval, tracking_uri, "--retrieval")
        if has_artifact(client, retrieval, f"{INDEX_ARTIFACT}/manifest.json"):
            with temporary() as tmp:
                logged = download(client, retrieval, INDEX_ARTIFACT, tmp, "--retrieval")
                load_index(logged, fingerprint)
                shutil.copytree(logged, target, dirs_exist_ok=True)
        else:
            log.info(
                "run %s has no logged index (recsys index --run-id %s): building an exact one", retrieval, retrieval
            )
            build_item_index(stage_dir, DEFAULT_SPEC, target, progress=False)
    from core.checksums import checksums

    manifest = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "retrieval": retrieval,
        "ranking": ranking,
        "fingerprint": fingerprint,
        "files": checksums(dest, exclude=[BUNDLE_FILE]),
    }
    (dest / BUNDLE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return dest


def source_identity(meta: Any) -> dict[str, Any]:
    """What identifies the data a dataset was prepared from: its name and source (the file's SHA-256,
    or a generator's parameters), without what a differently prepared copy may change (where the file
    lay, a row cap; split, seed and label threshold are not part of the source)."""
    source = {k: v for k, v in (meta.source or {}).items() if k not in ("path", "rows_cap")}
    return {"dataset": meta.dataset, **source}


def check_same_source(retrieval_dir: Path, ranking_dir: Path) -> None:
    """Refuse (one line) a ranking run whose dataset came from another source than the retrieval run's:
    it would score items by other ids' meanings. Differently prepared copies of one source pass."""
    from datamodules.schema import read_metadata

    runs = [json.loads((d / "run.json").read_text())["run_id"] for d in (retrieval_dir, ranking_dir)]
    a, b = (source_identity(read_metadata(d)) for d in (retrieval_dir, ranking_dir))
    if a != b:
        differ = sorted(k for k in {*a, *b} if a.get(k) != b.get(k))
        shown = "; ".join(f"{k} {str(a.get(k))[:16]} vs {str(b.get(k))[:16]}" for k in differ[:2])
        raise RecsysError(
            f"--ranking {runs[1]}: trained on another dataset than --retrieval {runs[0]} ({shown}); "
            "pass a ranking run trained on (a copy of) the retrieval run's source data"
        )


@dataclass
class Loaded:
    """A recommender read from a bundle, with the item titles when the dataset had them."""

    recommender: Any
    titles: dict[str, str] | None
    runs: dict[str, Any]


def load_bundle(bundle: str | Path) -> Loaded:
    """The ``modules.funnel.Recommender`` of a bundle directory (its index checked against its weights)."""
    from core.checksums import verify_checksums
    from modules.funnel import Recommender
    from modules.index import load_index

    root = Path(bundle)
    require((root / BUNDLE_FILE).is_file(), f"{root}: not a recommender bundle (no {BUNDLE_FILE})")
    try:
        runs = json.loads((root / BUNDLE_FILE).read_text())
    except (ValueError, OSError) as e:
        raise RecsysError(f"{root / BUNDLE_FILE}: unreadable ({e})") from None
    require(
        isinstance(runs, dict) and runs.get("format") == BUNDLE_FORMAT and runs.get("version") == BUNDLE_VERSION,
        f"{root / BUNDLE_FILE}: not a {BUNDLE_FORMAT} version {BUNDLE_VERSION} manifest (package it again)",
    )
    verify_checksums(root, runs.get("files"), BUNDLE_FILE, exact=True, exclude=[BUNDLE_FILE])
    retrieval = load_stage(root / "retrieval")
    index = load_index(root / INDEX_ARTIFACT, stage_fingerprint(root / "retrieval"))
    pairs = load_train_pairs(root / "retrieval", retrieval.meta)
    ranking = load_stage(root / "ranking", like=retrieval) if (root / "ranking").is_dir() else None
    recommender = Recommender(retrieval, index, pairs, ranking, runs["retrieval"])
    titles = None
    if (root / TITLES).is_file():
        table = pd.read_parquet(root / TITLES)
        titles = dict(zip(table["item"].astype(str), table["title"].astype(str), strict=True))
    return Loaded(recommender, titles, runs)


def read_users_file(path: str) -> list[str]:
    """Raw user ids from a text file (one a line), a CSV or a Parquet file.

    Parquet: column ``user``, else the first. CSV: a first row is a header only when one of its cells
    is exactly ``user`` (that column is read); otherwise every row is data and the ids are the first
    column, so a file of bare ids loses none (a header-guessing reader would take the first id for a
    column name). Ids are read as text, as written ("007" stays "007", "NA" is an id).
    """
    p = Path(path)
    require(p.is_file(), f"--users {path}: no such file")
    try:
        if p.suffix == ".parquet":
            frame = pd.read_parquet(p)
            require(len(frame.columns) > 0, f"--users {path}: no columns")
            column = "user" if "user" in frame.columns else frame.columns[0]
            return [str(u) for u in frame[column].dropna().tolist()]
        if p.suffix == ".csv":
            frame = pd.read_csv(p, dtype=str, header=None, keep_default_na=False, skip_blank_lines=True)
            if len(frame) == 0:
                return []
            header = [str(v).strip() for v in frame.iloc[0].tolist()]
            column = header.index("user") if "user" in header else 0
            values = frame.iloc[1 if "user" in header else 0 :, column]
            return [u.strip() for u in values.tolist() if u.strip()]
        return [line.strip() for line in p.read_text().splitlines() if line.strip()]
    except pd.errors.EmptyDataError:
        return []
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise RecsysError(f"--users {path}: unreadable ({str(e).splitlines()[0]})") from None


def recommend(
    retrieval: str,
    ranking: str | None,
    users: list[str] | None,
    users_file: str | None,
    history: str | None,
    k: int = 10,
    candidates: int = 200,
    out: str | None = None,
    index_dir: str | None = None,
    tracking_uri: str | None = None,
    overwrite: bool = False,
) -> str:
    """``recsys recommend``: what the command prints (a table, or where the Parquet file went: ``out``
    follows ``core.output``'s rule, a new file or, with ``overwrite``, a Parquet file replaced). A query
    left with no recommendation (every item the index holds excluded as seen) is said so, never an
    empty table; ids are printed with their control characters escaped."""
    from modules.funnel import check_sizes, describe

    given = [name for name, v in (("--user", users), ("--users", users_file), ("--history", history)) if v is not None]
    require(len(given) == 1, "recommend: pass exactly one of --user, --users FILE or --history ITEM,ITEM,...")
    check_sizes(k, candidates)
    items = [] if history is None else [i.strip() for i in history.split(",") if i.strip()]
    require(
        history is None or len(items) > 0,
        f"--history {repr(history)[:40]}: names no item (raw item ids, comma-separated, e.g. --history 50,181,100)",
    )
    if out:
        check_output(out, PARQUET_FILE, overwrite)  # before any download or model
    with os_errors("recommend", tempfile.gettempdir()), temporary() as tmp:
        loaded = load_bundle(assemble_bundle(retrieval, ranking, tmp / "bundle", tracking_uri, index_dir))
    rec = loaded.recommender
    if history is not None:
        queries = ["history"]
        results = rec.recommend_histories([items], k, candidates)
        left = [("--history", rec.nothing_left(history=items))] if not results[0].items else []
    else:
        queries = users if users is not None else read_users_file(str(users_file))
        require(len(queries) > 0, f"{given[0]}: no user ids given")
        results = rec.recommend_users(queries, k, candidates, progress=out is not None and len(queries) > 1)
        left = [(f"user {q}", rec.nothing_left(user=q)) for q, r in zip(queries, results, strict=True) if not r.items]
    rows = [{"user": q, **row} for q, r in zip(queries, results, strict=True) for row in describe(r, loaded.titles)]
    table = pd.DataFrame(
        rows, columns=["user", "rank", "item", "score", "source", *(["title"] if loaded.titles else [])]
    )
    if not out and table.empty:
        return printable("\n".join(f"no recommendations for {who}: {why}" for who, why in left))
    for who, why in left[:5]:
        log.warning("no recommendations for %s: %s", printable(who), why)
    if len(left) > 5:
        log.warning("... and %d more queries without recommendations", len(left) - 5)
    if out:
        with atomic_output(out, PARQUET_FILE, overwrite) as tmp_file:
            write_parquet(table, tmp_file, f"--out {out}")
        return f"{len(queries)} quer{'y' if len(queries) == 1 else 'ies'}, {len(table)} recommendations -> {out}"
    return printable(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def write_parquet(table: pd.DataFrame, path: Path, shown: str) -> None:
    """``table`` as a Parquet file; pyarrow's own (non-OS) errors as one line (an OSError, e.g. no space,
    is ``atomic_output``'s to report)."""
    import pyarrow as pa

    try:
        table.to_parquet(path, index=False)
    except pa.ArrowException as e:
        if isinstance(e, OSError):
            raise
        raise RecsysError(
            f"{shown}: cannot write the Parquet file ({(str(e).strip().splitlines() or [''])[0]})"
        ) from None
