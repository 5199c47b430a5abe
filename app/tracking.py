"""MLflow tracking of a training run: the store, the run (created, or continued on resume), its
parameters, artifacts and the packaged model. Rank 0 alone writes; the other ranks get no tracker."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from app.config import RunConfig
from core.errors import RecsysError

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
STATE_DICT_ARTIFACT = "model_state/state_dict.pt"
"""The unsharded model's weights as a plain state dict (``torch.load(..., weights_only=True)``)."""


def resolve_tracking_uri(uri: str | None) -> str:
    """The tracking URI in force: the flag, else $MLFLOW_TRACKING_URI, else a SQLite file here
    (a relative SQLite path is made absolute, so that workers elsewhere write the same file)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


TRACKING_SCHEMES = ("", "file", "http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks")
SQLITE_HEADER = b"SQLite format 3\x00"


def check_tracking_uri(uri: str) -> None:
    """Fail fast when the tracking store cannot work (before any training starts): an unknown scheme,
    an unreachable server, a SQLite path that is a directory, not a database, or in no directory."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if scheme not in TRACKING_SCHEMES:
        known = ", ".join(s for s in TRACKING_SCHEMES if s)
        raise RecsysError(f"--tracking-uri {uri}: unknown scheme {scheme!r} (MLflow takes {known} or a path)")
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                r.read()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RecsysError(f"--tracking-uri {uri}: MLflow server unreachable ({reason})") from None
    elif uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.parent.is_dir():
            raise RecsysError(f"--tracking-uri {uri}: directory {path.parent} does not exist")
        if path.is_dir():
            raise RecsysError(f"--tracking-uri {uri}: {path} is a directory, not a SQLite database file")
        if path.is_file() and path.stat().st_size > 0:
            with open(path, "rb") as f:
                if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                    raise RecsysError(f"--tracking-uri {uri}: {path} is not a SQLite database")


def prepare_store(uri: str) -> None:
    """Create the tracking store once, in the launching process, before workers race to migrate it. A
    new SQLite store is created under a lock on its folder: two trainings started together into one new
    file would otherwise both create its tables, and one fail (``table ... already exists``)."""
    from mlflow.tracking import MlflowClient

    from core.output import locked

    if uri.startswith("sqlite:///"):
        with locked(Path(uri[len("sqlite:///") :]).parent):
            MlflowClient(uri).search_experiments(max_results=1)
    else:
        MlflowClient(uri).search_experiments(max_results=1)


def existing_store(flag: str | None) -> str:
    """The tracking URI of a command that reads runs (``--tracking-uri``, else as ``resolve_tracking_uri``):
    it must name a store that exists. MLflow would create a missing SQLite file, empty, and then report
    every run as not found; a path that holds no store is one line instead."""
    uri = resolve_tracking_uri(flag)
    check_tracking_uri(uri)
    path: Path | None = None
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_file() or path.stat().st_size == 0:
            raise RecsysError(
                f"--tracking-uri {uri}: no tracking store at {path} (nothing was tracked there); pass the store "
                "the run was trained into"
            )
    elif "://" not in uri or uri.startswith("file:"):
        path = Path(uri.removeprefix("file://").removeprefix("file:"))
        if not path.is_dir():
            raise RecsysError(f"--tracking-uri {uri}: no tracking store at {path}; pass the store the run was made in")
    return uri


def open_run(cfg: RunConfig) -> str:
    """Create the MLflow run of a training, in the launching process: whatever stops the training
    (an error, a signal, a worker that dies), this process outlives the workers and ends the run."""
    from mlflow.tracking import MlflowClient
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    client = MlflowClient(resolve_tracking_uri(cfg.tracking.tracking_uri))
    name = cfg.tracking.experiment
    experiment = client.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise RecsysError(f"--experiment {name}: deleted in this tracking store (restore it or choose another name)")
    experiment_id = experiment.experiment_id if experiment is not None else create_experiment(client, name)
    tags = resolve_tags({MLFLOW_RUN_NAME: cfg.tracking.run_name} if cfg.tracking.run_name else {})
    return str(client.create_run(experiment_id, tags=tags).info.run_id)


def create_experiment(client: Any, name: str) -> str:
    """A new experiment's id; the existing one's when a run started at the same time created it first."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.create_experiment(name))
    except MlflowException:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


def end_run(uri: str, run_id: str, status: str) -> None:
    """End a run that did not finish with ``status`` (FAILED or KILLED) and an end time, now."""
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).set_terminated(run_id, status)


def new_run_name(model: str) -> str:
    """A distinct default run name (MLflow's own is drawn from the seeded RNG: every run got the same)."""
    return f"{model}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> dotted keys (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def previous_run_id(uri: str, checkpoint: str | None) -> str | None:
    """The MLflow run a checkpoint was written by, when it is in this tracking store: resuming
    continues that run (one run per training, also across a Ray restart)."""
    if not checkpoint:
        return None
    from modules.callbacks import RunIdInCheckpoint
    from modules.sharding import read_trainer_state

    run_id = read_trainer_state(checkpoint).get(RunIdInCheckpoint.KEY)
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).get_run(run_id)
    except MlflowException:
        return None  # another store: start a new run
    return str(run_id)


RESUMED_TAG = "recsys.resumed_from"
FAILED_RESUME_TAG = "recsys.failed_resume"


@dataclasses.dataclass(frozen=True)
class RunState:
    """What a resume may change in the run it continues: its status, end time and resume tag."""

    run_id: str
    status: str
    end_time: int | None
    resumed_from: str | None

    @classmethod
    def of_checkpoint(cls, uri: str, checkpoint: str | None) -> RunState | None:
        """The state of the run a checkpoint would continue (None: it starts a new run)."""
        run_id = previous_run_id(uri, checkpoint)
        if run_id is None:
            return None
        from mlflow.tracking import MlflowClient

        run = MlflowClient(uri).get_run(run_id)
        return cls(run_id, run.info.status, run.info.end_time, run.data.tags.get(RESUMED_TAG))

    def restore(self, uri: str, why: str, status: str = "FAILED") -> None:
        """Put the run back as it was before a resume that failed (a FINISHED run stays FINISHED, not
        FAILED: the training it records did finish), noting the failed attempt in a tag. A run that had
        not ended (a training killed without warning) ends now as ``status``: nothing trains it."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        if self.status in ("FINISHED", "FAILED", "KILLED"):
            client.set_terminated(self.run_id, self.status, end_time=self.end_time)
        else:
            client.set_terminated(self.run_id, status)
        if self.resumed_from is None:
            if RESUMED_TAG in client.get_run(self.run_id).data.tags:
                client.delete_tag(self.run_id, RESUMED_TAG)
        else:
            client.set_tag(self.run_id, RESUMED_TAG, self.resumed_from)
        client.set_tag(self.run_id, FAILED_RESUME_TAG, why[:4000])


TAG = "recsys."
"""recsys's own run tags: ``recsys.model``, ``recsys.dataset``, ... (the runs table filters on them)."""
DESCRIPTION_TAG = "mlflow.note.content"
"""Where MLflow keeps a run's description (its page shows it; ``mlflow.search_runs`` reads it as a tag)."""


def parse_tags(values: list[str]) -> dict[str, str]:
    """``--tag KEY=VALUE`` flags -> a dict; a malformed or reserved key is one line."""
    tags: dict[str, str] = {}
    for value in values:
        key, eq, text = value.partition("=")
        key = key.strip()
        if not eq or not key:
            raise RecsysError(f"--tag {value}: expected KEY=VALUE (e.g. --tag team=search)")
        if key.startswith((TAG, "mlflow.")):
            raise RecsysError(f"--tag {value}: keys starting with {TAG!r} or 'mlflow.' are set by recsys and MLflow")
        if len(key) > 250 or len(text) > 5000:
            raise RecsysError(f"--tag {value[:40]}...: MLflow takes keys up to 250 and values up to 5000 characters")
        tags[key] = text
    return tags


def preset_description(path: str | Path) -> str | None:
    """The leading comment of a YAML preset as Markdown (None without one): its prose as paragraphs,
    its indented command lines as code."""
    lines: list[str] = []
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:].removeprefix(" ")
        lines.append(f"`{body.strip()}`  " if body.startswith((" ", "\t")) and body.strip() else body)
    return "\n".join(lines).strip() or None


def recsys_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("recsys")
    except PackageNotFoundError:
        return "unknown"


def git_commit() -> str:
    """The commit of the recsys source tree that runs ("unknown" outside a git checkout), with ``-dirty``
    when it has uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def dataset_kind(meta: Any) -> str:
    """retrieval (users, items, interactions), ranking (a table of labelled rows) or candidates (a
    funnel's ranking data, built from a retrieval run's candidates)."""
    if meta.candidates:
        return "candidates"
    return "retrieval" if meta.task == "retrieval" else "ranking"


def run_tags(cfg: RunConfig, world_size: int, meta: Any) -> dict[str, str]:
    """Every tag recsys sets on a training run: the model and what it ran on, the dataset, the preset,
    the code, the funnel runs a candidates dataset came from; then the user's ``--tag``s."""
    from modules.registry import model_kind

    tags = {
        f"{TAG}model": cfg.model,
        f"{TAG}model_kind": "retrieval" if model_kind(cfg.model).retrieves else "ranking",
        f"{TAG}backend": cfg.cluster.backend,
        f"{TAG}world_size": str(world_size),
        f"{TAG}dataset": meta.dataset,
        f"{TAG}dataset_kind": dataset_kind(meta),
        f"{TAG}dataset_path": public_uri(cfg.data.path),
        f"{TAG}preset": Path(cfg.tracking.preset).name if cfg.tracking.preset else "none",
        f"{TAG}version": recsys_version(),
        f"{TAG}git_commit": git_commit(),
    }
    if meta.candidates:
        tags[f"{TAG}candidates.retrieval_run"] = str(meta.candidates.get("retrieval_run"))
        tags[f"{TAG}candidates.serving_run"] = str(meta.candidates.get("serving_run"))
        tags[f"{TAG}candidates.data"] = public_uri(str(meta.candidates.get("data")))
    if cfg.tracking.description:
        tags[DESCRIPTION_TAG] = cfg.tracking.description
    return {**tags, **cfg.tracking.tags}


def public_uri(uri: str) -> str:
    """A path or URI as it may be shown: without user, password or query string (which may carry a
    token)."""
    from urllib.parse import urlsplit, urlunsplit

    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}
"""The ``mlflow.data.context`` of each split's dataset input."""


def dataset_input(uri: str, name: str, digest: str, meta: Any, context: str) -> Any:
    """One MLflow dataset input: ``name``, ``digest``, its source (``uri`` without secrets) and its
    schema (the metadata's features and label)."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec
    from mlflow.types.schema import Array
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    columns: list[ColSpec | TensorSpec] = [ColSpec(DataType.float, f.name) for f in meta.dense_features]
    for f in meta.sparse_features:
        columns.append(ColSpec(Array(DataType.long) if f.multi_hot else DataType.long, f.name))
    columns.append(ColSpec(DataType.float, str(meta.label.get("name", "label"))))
    from mlflow.exceptions import MlflowException

    shown = public_uri(uri)
    try:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": each of them names the path
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(shown)
    except MlflowException:  # a store MLflow has no source type for (oci://, hf://, ...): shown as its URI
        source = uri_source(shown)
    dataset = MetaDataset(source=source, name=name, digest=digest, schema=Schema(columns))  # type: ignore[abstract]
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


def uri_source(uri: str) -> Any:
    """An MLflow dataset source that only names ``uri`` (source type ``uri``)."""
    from mlflow.data.dataset_source import DatasetSource

    class UriSource(DatasetSource):
        def __init__(self, location: str) -> None:
            self.uri = location

        @staticmethod
        def _get_source_type() -> str:
            return "uri"

        def load(self, **kwargs: Any) -> str:
            return self.uri

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source: Any) -> UriSource:
            return cls(str(raw_source))

        def to_dict(self) -> dict[str, Any]:
            return {"uri": self.uri}

        @classmethod
        def from_dict(cls, source_dict: dict[Any, Any]) -> UriSource:
            return cls(str(source_dict["uri"]))

    return UriSource(uri)


def dataset_inputs(uri: str, meta: Any, digests: dict[str, str]) -> list[Any]:
    """The dataset inputs of a run trained on the prepared dataset at ``uri``: one per split that has
    rows (context training, validation, test; name ``DATASET/SPLIT``), and for candidates data the train
    split of the dataset they were drawn from (context ``candidates-source``: the same digest as the
    retrieval run's training input, so a search by it finds both)."""
    inputs = [
        dataset_input(uri, f"{meta.dataset}/{split}", digests[split], meta, context)
        for split, context in SPLIT_CONTEXTS.items()
        if split in digests and meta.splits[split].rows
    ]
    source = str(meta.candidates.get("data") or "")
    if source:
        from datamodules.integrity import read_split_index, split_digest
        from datamodules.schema import read_metadata

        try:
            origin = read_metadata(source)
            digest = split_digest(read_split_index(source, "train"))
        except RecsysError as e:
            log.info("the candidates' source dataset is not linked: %s", e)
        else:
            inputs.append(dataset_input(source, f"{origin.dataset}/train", digest, origin, "candidates-source"))
    return inputs


def download_checkpoint(artifact: str, uri: str, dest: Path) -> str:
    """``runs:/RUN_ID/checkpoints/last`` (or ``.../best``) downloaded under ``dest``: the local directory."""
    import shutil

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    run_id, _, path = artifact[len("runs:/") :].partition("/")
    if not run_id or not path:
        raise RecsysError(f"--resume-from {artifact}: expected runs:/RUN_ID/checkpoints/last (or /best)")
    target = dest / f"{run_id}-{path.strip('/').replace('/', '-')}"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    try:
        local = MlflowClient(uri).download_artifacts(run_id, path.strip("/"), str(target))
    except MlflowException as e:
        raise RecsysError(f"--resume-from {artifact}: {str(e).splitlines()[0]}") from None
    return str(local)


def read_later(data: Path) -> dict[str, str]:
    """SHA-256 of the files of a local dataset that inference reads from its path after the training
    (the train pairs, the histories, the user and item tables; ``app.stages.check_dataset_unchanged``
    compares them): relative path -> hash, for those that exist."""
    from core.checksums import checksums
    from datamodules.schema import default_corpus, read_metadata

    meta = read_metadata(data)
    corpus = meta.corpus or (default_corpus() if meta.task == "retrieval" else {})
    names = [*corpus.get("users", []), *corpus.get("items", []), *corpus.get("histories", [])]
    names += (corpus.get("pairs") or {}).get("train", [])
    return checksums(data, [n for n in names if (data / n).is_file()])


class Tracker:
    """The MLflow run of a training (rank 0): a Lightning logger plus what is published at the end."""

    def __init__(self, cfg: RunConfig, resume_from: str | None, run_id: str | None = None) -> None:
        """``run_id``: the run the launcher opened (``open_run``); None: a run of its own (or the run a
        checkpoint of this store was written by)."""
        from lightning.pytorch.loggers import MLFlowLogger

        self.cfg = cfg
        self.uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
        self.resume_from = resume_from
        self.continued = previous_run_id(self.uri, resume_from)
        self.logger = MLFlowLogger(
            experiment_name=cfg.tracking.experiment,
            run_name=cfg.tracking.run_name,
            tracking_uri=self.uri,
            log_model=False,
            run_id=run_id or self.continued,
        )

    @property
    def run_id(self) -> str:
        return str(self.logger.run_id)

    def describe(self, world_size: int, meta: Any, digests: dict[str, str]) -> None:
        """What the runs table shows and filters on: the tags of ``run_tags`` (a description among
        them) and one dataset input per split (``dataset_inputs``); a continued run gets them again."""
        from mlflow.entities import RunTag

        client = self.logger.experiment
        tags = run_tags(self.cfg, world_size, meta)
        client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
        client.log_inputs(self.run_id, datasets=dataset_inputs(self.cfg.data.path, meta, digests))

    def log_figures(self, data: dict[str, Any], k: int) -> None:
        """The test stage's figures (``app.figures``): a retrieval run's Recall@K and NDCG@K at every K
        (metrics ``test/recall_at_k`` and ``test/ndcg_at_k`` with step K, and their PNG), a ranking run's
        calibration curve and score histogram (PNGs); nothing when the run had no test split."""
        from mlflow.entities import Metric

        from app import figures

        client, run_id = self.logger.experiment, self.run_id
        drawn: list[tuple[Any, str]] = []
        if "recall_at_k" in data:
            now = int(time.time() * 1000)
            history = [
                Metric(f"test/{name}_at_k", float(value), now, step)
                for name in ("recall", "ndcg")
                for step, value in enumerate(data[f"{name}_at_k"], start=1)
            ]
            for lo in range(0, len(history), 1000):  # MLflow's batch limit
                client.log_batch(run_id, metrics=history[lo : lo + 1000], synchronous=True)
            title = f"{self.cfg.model} on {Path(self.cfg.data.path).name}, test split (run's K: {k})"
            drawn.append((figures.at_k_figure(data["recall_at_k"], data["ndcg_at_k"], title), "recall_ndcg_at_k.png"))
        if "scores" in data and sum(data["scores"]["positives"]) + sum(data["scores"]["negatives"]) > 0:
            title = f"{self.cfg.model} on {Path(self.cfg.data.path).name}: test split"
            drawn.append((figures.calibration_figure(data["scores"], title), "calibration.png"))
            drawn.append((figures.score_histogram_figure(data["scores"], title), "score_histogram.png"))
        for fig, name in drawn:
            try:
                client.log_figure(run_id, fig, f"figures/{name}")
            finally:
                figures.close(fig)

    def log_params(self, world_size: int) -> None:
        """The configuration as dotted params, with the global batch (params are immutable: a
        continued run gets a tag instead)."""
        if self.continued:
            self.logger.experiment.set_tag(self.run_id, RESUMED_TAG, self.resume_from)
            return
        params = flatten(dataclasses.asdict(self.cfg))
        params.pop("tracking.description", None)  # the run's description, not a parameter
        params["world_size"] = world_size
        params["data.global_batch_size"] = self.cfg.data.batch_size * world_size
        self.logger.log_hyperparams(params)

    def log_text(self, text: str, name: str) -> None:
        """A text artifact of the run (e.g. the sharding plan)."""
        self.logger.experiment.log_text(self.run_id, text, name)

    def publish(self, best_path: str, last_path: str, scorer: Any, state: dict[str, Any] | None = None) -> None:
        """Config, dataset metadata and vocabularies, the best and the last epoch's checkpoints, the
        model's plain state dict and the packaged model into the run."""
        import mlflow

        cfg, client, run_id = self.cfg, self.logger.experiment, self.run_id
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.yaml").write_text(config_yaml(cfg))
            client.log_artifact(run_id, str(Path(tmp) / "config.yaml"))
            if state is not None:
                import torch

                weights = Path(tmp) / Path(STATE_DICT_ARTIFACT).name
                torch.save(state, weights)
                client.log_artifact(run_id, str(weights), str(Path(STATE_DICT_ARTIFACT).parent))
        if "://" not in cfg.data.path:
            client.log_artifact(run_id, str(Path(cfg.data.path) / "metadata.json"), "dataset")
            files = read_later(Path(cfg.data.path))
            if files:  # what a stage of this run reads from the dataset later: refused there if changed
                client.log_dict(run_id, {"files": files}, "dataset/files.json")
            if (Path(cfg.data.path) / "vocab").is_dir():
                client.log_artifacts(run_id, str(Path(cfg.data.path) / "vocab"), "dataset/vocab")
        if best_path:
            client.log_artifacts(run_id, best_path, "checkpoints/best")
        if last_path:  # what `--resume-from runs:/RUN_ID/checkpoints/last` continues from
            client.log_artifacts(run_id, last_path, "checkpoints/last")
        if scorer is not None:
            mlflow.set_tracking_uri(self.uri)
            with mlflow.start_run(run_id=run_id):
                # pickle, not the default pt2 graph: a KeyedJaggedTensor input does not trace from an example
                mlflow.pytorch.log_model(scorer, name="model", serialization_format="pickle")
                mlflow.log_text(json.dumps({"model": cfg.model, "dataset": cfg.data.path}), "model_info.json")
