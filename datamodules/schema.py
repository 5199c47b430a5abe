"""``metadata.json``: the contract between a prepared dataset and the models that read it.

Models size their embedding tables from ``SparseFeature.cardinality`` and pick their inputs by
``tower``; nothing about a dataset is hard-coded elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.errors import RecsysError

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
SPLITS = ("train", "val", "test")
OOV_INDEX = 0  # index 0 of every vocabulary is the reserved out-of-vocabulary index
HISTORY_FEATURE = "user_history"
"""The multi-hot feature a model reads a user's train history through (looked up per batch, not stored per row)."""


@dataclass(frozen=True)
class SparseFeature:
    """A categorical feature: raw values map through a train-split vocabulary to [1, cardinality)."""

    name: str
    cardinality: int
    """Vocabulary size + 1: index 0 is out-of-vocabulary."""
    tower: str
    """'user', 'item' or 'context' (ranking datasets have only 'context')."""
    multi_hot: bool = False
    vocab_file: str | None = None
    """Relative path of the vocabulary (JSON list of raw values; position i holds index i+1)."""


@dataclass(frozen=True)
class DenseFeature:
    """A numeric feature, standardised with train-split statistics (missing -> 0)."""

    name: str
    tower: str
    """'user', 'item', 'context', or 'candidate': computed per (user, candidate) by the recommender funnel
    (``modules.candidate_features``) in a ranking dataset built from a retrieval stage's candidates."""
    mean: float
    std: float


@dataclass(frozen=True)
class SplitInfo:
    rows: int
    blocks: int
    label_rate: float


@dataclass(frozen=True)
class DatasetMetadata:
    """Everything a model or loader needs to know about a prepared dataset."""

    dataset: str
    task: str
    """'retrieval' (users, items, interactions) or 'ctr' (a ranking table)."""
    block_rows: int
    dense_features: tuple[DenseFeature, ...]
    sparse_features: tuple[SparseFeature, ...]
    """Single-hot features first, then multi-hot ones (the block layout relies on that order)."""
    label: dict[str, Any]
    splits: dict[str, SplitInfo]
    split_rule: dict[str, Any]
    source: dict[str, Any]
    user_id_feature: str | None = None
    item_id_feature: str | None = None
    corpus: dict[str, Any] = field(default_factory=dict)
    """Retrieval datasets: relative paths of the corpus Parquet files, ``{"users": [...], "items": [...],
    "pairs": {split: [...]}, "histories": [...]}`` (a Spark writer leaves several part files per table)."""
    history: dict[str, Any] = field(default_factory=dict)
    """Retrieval datasets: how the per-user train histories (``corpus["histories"]``) are made and
    looked up (``history_description``); empty for datasets prepared without them."""
    extra: dict[str, Any] = field(default_factory=dict)
    candidates: dict[str, Any] = field(default_factory=dict)
    """Ranking datasets built from a retrieval stage's candidates (``recsys data candidates``): which
    retrieval run and dataset produced them, which run and dataset the funnel serves them with, how
    many candidates per user and how the labels were made (see ``app.candidate_data``); empty otherwise."""
    format_version: int = FORMAT_VERSION

    @property
    def single_hot(self) -> list[SparseFeature]:
        return [f for f in self.sparse_features if not f.multi_hot]

    @property
    def multi_hot(self) -> list[SparseFeature]:
        return [f for f in self.sparse_features if f.multi_hot]

    def feature(self, name: str) -> SparseFeature:
        for f in self.sparse_features:
            if f.name == name:
                return f
        raise RecsysError(f"dataset {self.dataset!r} has no sparse feature {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetMetadata:
        d = dict(d)
        d["dense_features"] = tuple(DenseFeature(**f) for f in d["dense_features"])
        d["sparse_features"] = tuple(SparseFeature(**f) for f in d["sparse_features"])
        d["splits"] = {k: SplitInfo(**v) for k, v in d["splits"].items()}
        return cls(**d)


def default_corpus() -> dict[str, Any]:
    """The corpus layout the local engine writes (and that datasets prepared before the field had)."""
    return {
        "users": ["users.parquet"],
        "items": ["items.parquet"],
        "pairs": {split: [f"pairs/{split}.parquet"] for split in SPLITS},
        "histories": ["histories.parquet"],
    }


def history_description() -> dict[str, Any]:
    """What ``metadata.json: history`` says about the per-user histories of a retrieval dataset."""
    return {
        "feature": HISTORY_FEATURE,
        "user_feature": "user_id",
        "item_feature": "item_id",
        "split": "train",
        "table": "one row per train user: user_id (int64 index), items (list of int64 item_id indices)",
        "order": "oldest first by timestamp (ties by item index); each item once, at its latest interaction",
        "lookup": (
            "per batch by user_id; a training row's own item is masked out of its user's bag (leave-one-out); "
            "val/test rows and corpus users read the whole train history"
        ),
    }


def corpus_files(meta: DatasetMetadata) -> dict[str, Any]:
    """The corpus files of a retrieval dataset, by table."""
    if meta.task != "retrieval":
        raise RecsysError(f"dataset {meta.dataset!r} has no retrieval corpus (task {meta.task})")
    return meta.corpus or default_corpus()


def history_files(meta: DatasetMetadata) -> list[str]:
    """The Parquet files of the per-user train histories of a retrieval dataset."""
    files = corpus_files(meta).get("histories")
    if not meta.history or not files:
        raise RecsysError(
            f"dataset {meta.dataset!r} has no user histories (prepared before they were part of the data "
            "contract); prepare it again"
        )
    return list(files)


def write_metadata(meta: DatasetMetadata, directory: Path) -> None:
    """Write ``metadata.json`` into ``directory``."""
    (directory / METADATA_FILE).write_text(json.dumps(meta.to_dict(), indent=2, sort_keys=True) + "\n")


def read_metadata(directory: str | Path, shown_as: str | None = None) -> DatasetMetadata:
    """Read ``metadata.json`` from a prepared dataset directory (local path; ``shown_as`` names a
    remote dataset's copy in errors)."""
    path = Path(directory) / METADATA_FILE
    shown = f"{shown_as.rstrip('/')}/{METADATA_FILE}" if shown_as else str(path)
    if not path.is_file():
        raise RecsysError(f"{shown}: not a prepared dataset (no {METADATA_FILE}; run `recsys data prepare`)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecsysError(f"{shown}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if raw.get("format_version") != FORMAT_VERSION:
        raise RecsysError(
            f"{shown}: format_version {raw.get('format_version')} is not {FORMAT_VERSION}; prepare it again"
        )
    try:
        return DatasetMetadata.from_dict(raw)
    except (TypeError, KeyError) as e:
        raise RecsysError(f"{shown}: malformed metadata ({e})") from None


def read_vocab(directory: str | Path, feature: SparseFeature) -> list[str]:
    """The raw values of a feature's vocabulary, in index order (index = position + 1)."""
    if feature.vocab_file is None:
        raise RecsysError(f"feature {feature.name!r} has no vocabulary file")
    return list(json.loads((Path(directory) / feature.vocab_file).read_text()))
