"""A training run as a *stage directory*: what the recommender commands read of a run.

    fetch_stage(RUN, tracking_uri, DEST, flag, with_pairs)   -> DEST (below)
    load_stage(DEST)                                         -> modules.funnel.Stage

A stage directory holds the run's config, dataset metadata and vocabularies, the model's weights (the
run's ``model_state/state_dict.pt``, read with ``weights_only=True`` and kept as ``weights.safetensors``:
no pickle), its dataset's user/item feature tables and, for a retrieval stage of a bundle, its train
pairs by user (``train/``) and the users' histories (``histories/``) as CSR arrays, memory-mapped on load.

A run's dataset is read again when its stage is assembled (train pairs, histories, user and item
tables): it is refused unless it is still the dataset the run trained on (``check_dataset_unchanged``).
Every file these functions write fails with one line (``os_errors``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from app.tracking import STATE_DICT_ARTIFACT, existing_store
from core.errors import RecsysError, printable, require
from core.output import WRITE_ERRORS, os_reason

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


@contextlib.contextmanager
def temporary() -> Iterator[Path]:
    """A private temporary directory, for what a command assembles before it is used or installed."""
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def read_item_vocabs(stage_dir: Path, meta: Any) -> dict[str, list[str]]:
    """The raw values of the item tower's categorical features (not the id), by feature name."""
    out: dict[str, list[str]] = {}
    for f in meta.sparse_features:
        if f.tower == "item" and f.name != meta.item_id_feature and f.vocab_file is not None:
            path = stage_dir / STAGE_VOCAB / Path(str(f.vocab_file)).name
            require(path.is_file(), f"{stage_dir}: no vocabulary of {f.name} ({path.name})")
            out[f.name] = [str(v) for v in json.loads(path.read_text())]
    return out
