"""The recommender bundle: what one ``modules.funnel.Recommender`` is loaded from, assembled from runs.

    assemble_bundle(RETRIEVAL_RUN, RANKING_RUN, DEST, tracking_uri, index_dir, store) -> DEST
    load_bundle(DEST) -> Loaded(recommender, titles, runs)

The CLI (``recsys recommend``), the served model (``app.serving``) and every worker of the all-users
engines (``app.batch``) load the same bundle into the same Recommender. Its layout, one directory that
the MLflow pyfunc packages as it is::

    bundle.json            the runs, the index fingerprint, the vector store (URI without secrets and
                           alias) when retrieval reads one, the SHA-256 of every other file (checked on load)
    retrieval/             stage directory of the two-tower run (``app.stages``)
    ranking/               stage directory of the ranking run (optional)
    index/                 the vector index (modules/index.py), fingerprinted with retrieval/'s weights +
                           vocabularies: the retrieval source, unless bundle.json names a store; the item
                           vectors of a history query either way
    titles.parquet         raw item id -> title, when the dataset has titles

The index of a run is refused unless it was built from the same weights and vocabularies, a store's
collection unless it was published from them (``modules.vector_store.MilvusStore.open``), and a
ranking run unless its dataset came from the same source as the retrieval run's (``check_same_source``).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from app.stages import (
    STAGE_VOCAB,
    TITLES,
    check_retrieves,
    download,
    fetch_stage,
    has_artifact,
    load_stage,
    load_train_pairs,
    os_errors,
    read_item_vocabs,
    run_client,
    stage_fingerprint,
    temporary,
)
from core.errors import RecsysError, require

if TYPE_CHECKING:
    from modules.vector_store import MilvusStore, StoreConfig

log = logging.getLogger(__name__)

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = "recsys-recommender-bundle"
BUNDLE_VERSION = 2
"""2: train pairs and histories as memory-mapped CSR arrays (1: Parquet tables read whole)."""
TOKEN_ENV = "RECSYS_MILVUS_TOKEN"
"""The environment variable that holds a Milvus server's token (``user:password`` or an API key)."""
INDEX_ARTIFACT = "index"
DEFAULT_SPEC = "flat"


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


def assemble_bundle(
    retrieval: str,
    ranking: str | None,
    dest: Path,
    tracking_uri: str | None = None,
    index_dir: str | None = None,
    store: StoreConfig | None = None,
) -> Path:
    """Everything a recommender needs, from the runs, in ``dest`` (layout in the module docstring).

    The index is ``index_dir`` when given, else the one logged to the retrieval run by ``recsys index``,
    else an exact index built now; either way it must carry the retrieval stage's fingerprint, and its
    FAISS file must be the structure its manifest names. A file that cannot be written (no space in
    ``dest``'s filesystem) is one line. ``store``: retrieval reads that vector database instead (its
    collection checked now to be the run's: one line if not), recorded without its token.
    """
    if store is not None:
        store.check()
    with os_errors(f"--retrieval {retrieval}", dest):
        return _assemble_bundle(retrieval, ranking, dest, tracking_uri, index_dir, store)


ITEM_ITEM_DIR = "item_item"
"""The bundle's item-item model (``modules.candidate_features.save_item_item``), when its ranker reads it."""


def write_item_item(retrieval_dir: Path, ranking_dir: Path, dest: Path, fingerprint: str) -> None:
    """Fit the item-item model a ranker trained on candidates reads (the spec its ranking data records)
    on the retrieval stage's train pairs and write it to ``dest``: once, here, never at load."""
    from datamodules.schema import read_metadata
    from modules.candidate_features import ITEM_ITEM_FEATURES, Known, fit_item_item, save_item_item
    from modules.funnel import item_item_spec_of

    ranking_meta = read_metadata(ranking_dir)
    names = (ranking_meta.candidates or {}).get("features") or []
    if not set(ITEM_ITEM_FEATURES) & set(names):
        return
    spec = item_item_spec_of(ranking_meta)
    retrieval_meta = read_metadata(retrieval_dir)
    pairs = load_train_pairs(retrieval_dir, retrieval_meta)
    vocab = retrieval_meta.feature(str(retrieval_meta.item_id_feature)).vocab_file
    n_items = len(json.loads((retrieval_dir / STAGE_VOCAB / Path(str(vocab)).name).read_text())) + 1
    save_item_item(fit_item_item(Known(pairs.indptr, pairs.items, pairs.positive), n_items, spec), dest, fingerprint)


def _assemble_bundle(
    retrieval: str,
    ranking: str | None,
    dest: Path,
    tracking_uri: str | None,
    index_dir: str | None,
    store: StoreConfig | None,
) -> Path:
    from modules.index import load_index, read_manifest

    dest.mkdir(parents=True, exist_ok=True)
    stage_dir = fetch_stage(retrieval, tracking_uri, dest / "retrieval", "--retrieval", with_pairs=True)
    check_retrieves(stage_dir, "--retrieval")
    fingerprint = stage_fingerprint(stage_dir)
    if ranking:
        ranking_dir = fetch_stage(ranking, tracking_uri, dest / "ranking", "--ranking", False)
        check_same_source(stage_dir, ranking_dir)
        write_item_item(stage_dir, ranking_dir, dest / ITEM_ITEM_DIR, fingerprint)
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

    recorded = None
    if store is not None:
        recorded = store_record(store)
        dim = int(read_manifest(target)["dim"])
        open_store(recorded, fingerprint, dim, retrieval, store.token)  # one line if not the run's
    manifest = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "retrieval": retrieval,
        "ranking": ranking,
        "fingerprint": fingerprint,
        "store": recorded,
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


def store_record(store: StoreConfig) -> dict[str, Any]:
    """What a bundle records of its store: the URI (a .db path made absolute; never credentials:
    ``StoreConfig.check`` refuses a URI that carries any) and the alias."""
    uri = store.uri.strip()
    if "://" not in uri:
        uri = str(Path(uri).expanduser().resolve())
    return {"uri": uri, "alias": store.alias}


def store_token() -> str:
    """The store's token, from ``RECSYS_MILVUS_TOKEN``: read where a bundle is loaded (the CLI, the served
    model, each batch worker), never written into a bundle, a log or MLflow."""
    import os

    return os.environ.get(TOKEN_ENV, "")


def open_store(recorded: Any, fingerprint: str, dim: int, run: str, token: str | None = None) -> MilvusStore:
    """The bundle's store (``store_record``), its collection checked against the retrieval stage's
    fingerprint and vector dimension."""
    from modules.vector_store import MilvusStore, StoreConfig

    require(
        isinstance(recorded, dict) and isinstance(recorded.get("uri"), str) and isinstance(recorded.get("alias"), str),
        f"{BUNDLE_FILE}: a store entry without uri and alias (package it again)",
    )
    cfg = StoreConfig(recorded["uri"], recorded["alias"], token=store_token() if token is None else token)
    return MilvusStore.open(cfg.check(), fingerprint, dim, run)


def load_bundle(bundle: str | Path) -> Loaded:
    """The ``modules.funnel.Recommender`` of a bundle directory (its index checked against its weights),
    retrieving from the bundle's store when it names one, else from its index."""
    from core.checksums import verify_checksums
    from modules.funnel import Recommender
    from modules.index import load_index
    from modules.item_attributes import item_attributes
    from modules.vector_store import FaissSource, RetrievalSource

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
    source: RetrievalSource
    if runs.get("store") is not None:
        source = open_store(runs["store"], stage_fingerprint(root / "retrieval"), index.dim, runs["retrieval"])
    else:
        vocabs = read_item_vocabs(root / "retrieval", retrieval.meta)
        source = FaissSource(index, attributes=lambda: item_attributes(retrieval, vocabs))
    item_item = None
    if (root / ITEM_ITEM_DIR).is_dir():
        from modules.candidate_features import load_item_item

        fingerprint = stage_fingerprint(root / "retrieval")
        item_item = load_item_item(
            root / ITEM_ITEM_DIR, fingerprint, len(retrieval.item_raw), str(root / ITEM_ITEM_DIR)
        )
    recommender = Recommender(retrieval, index, pairs, ranking, runs["retrieval"], source=source, item_item=item_item)
    titles = None
    if (root / TITLES).is_file():
        table = pd.read_parquet(root / TITLES)
        titles = dict(zip(table["item"].astype(str), table["title"].astype(str), strict=True))
    return Loaded(recommender, titles, runs)
