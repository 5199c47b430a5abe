"""``recsys index --store``: a run's item vectors published to a vector database; items added or removed
without training again.

    recsys index --run-id RUN --store ./items.db [--index hnsw32] [--alias recsys_items] [--keep 2]
    RECSYS_MILVUS_TOKEN=user:password recsys index --run-id RUN --store http://HOST:19530
    recsys index --run-id RUN --store URI --add-items new_items.csv
    recsys index --run-id RUN --store URI --remove-items ID,ID,...

A publish embeds every item of the run's corpus with its item tower (a progress bar), writes them with
their raw attributes into a new collection named after the run and its fingerprint, indexes and loads
it, and only then moves the alias to it (``modules.vector_store.publish``). The run records the store
(URI without secrets), the collection and the alias as tags, never the token. ``--add-items`` reads a
CSV of new items (``item`` + the item side features, raw values; multi-hot values ``a|b``) and upserts
their vectors into the collection the alias points at; ``--remove-items`` deletes ids from it.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.stages import (
    check_retrieves,
    fetch_stage,
    load_stage,
    os_errors,
    read_item_vocabs,
    run_client,
    stage_fingerprint,
    temporary,
)
from core.errors import RecsysError, printable, require
from modules.vector_store import StoreConfig

STORE_TAGS = ("recsys.store.uri", "recsys.store.alias", "recsys.store.collection")
DELAY_ENV = "RECSYS_STORE_BATCH_DELAY_S"
"""Test hook: seconds to wait after each batch written (so that a test can kill a publish midway)."""


def publish_run(
    run_id: str,
    spec: str,
    store: StoreConfig,
    tracking_uri: str | None = None,
    add_items: str | None = None,
    remove_items: str | None = None,
) -> str:
    """``recsys index --store``: publish the run's items, or add / remove items (see the module docstring);
    returns a one-line summary."""
    from modules.index import parse_spec
    from modules.vector_store import connect, milvus_index

    require(
        add_items is None or remove_items is None, "index: pass --add-items or --remove-items, not both in one call"
    )
    parsed = parse_spec(spec)
    if add_items is None and remove_items is None:
        milvus_index(parsed)  # a spec Milvus has no equivalent for fails before any download
    if add_items is not None:
        require(Path(add_items).is_file(), f"--add-items {add_items}: no such file")
    connect(store.check())  # an unreachable store or a refused token fails before any download
    client = run_client(run_id, tracking_uri, "--run-id")
    with os_errors(f"--run-id {run_id}", tempfile.gettempdir()), temporary() as tmp:
        stage_dir = fetch_stage(run_id, tracking_uri, tmp / "stage", "--run-id", with_pairs=False)
        check_retrieves(stage_dir, "--run-id")
        if add_items is not None:
            return add_run_items(run_id, stage_dir, store, add_items)
        if remove_items is not None:
            return remove_run_items(run_id, stage_dir, store, remove_items)
        name, count, dropped = publish_stage(run_id, stage_dir, spec, store)
    record(client, run_id, store, name)
    pruned = f"; dropped {len(dropped)} older collection(s)" if dropped else ""
    return (
        f"published {count} items to {store.shown()} as collection {name}; alias {store.alias} points at it"
        f"{pruned}; recorded on run {run_id}"
    )


def publish_stage(run_id: str, stage_dir: Path, spec: str, store: StoreConfig) -> tuple[str, int, list[str]]:
    """Embed the stage's items and publish them: (collection, items, collections dropped)."""
    from modules.funnel import item_vectors
    from modules.index import normalise, parse_spec, resolve_spec
    from modules.item_attributes import item_attributes
    from modules.vector_store import CollectionInfo, collection_name, publish

    stage = load_stage(stage_dir)
    ids, vectors = item_vectors(stage, progress=True)
    attributes = item_attributes(stage, read_item_vocabs(stage_dir, stage.meta))
    resolved = resolve_spec(parse_spec(spec), len(ids), vectors.shape[1], spec)
    similarity = stage.arch.similarity
    extra = resolved.extra_dims(similarity, vectors.shape[1])
    x = normalise(vectors) if similarity == "cosine" else vectors
    radius = float(np.sqrt(np.einsum("ij,ij->i", x, x).max())) if extra else None
    fingerprint = stage_fingerprint(stage_dir)
    now = datetime.datetime.now(datetime.UTC)
    info = CollectionInfo(
        name=collection_name(store.alias, run_id, fingerprint, now),
        run=run_id,
        fingerprint=fingerprint,
        spec=str(resolved),
        similarity=similarity,
        dim=int(vectors.shape[1]),
        indexed_dim=int(vectors.shape[1]) + extra,
        sphere_radius=radius,
        kinds=attributes.kinds,
        alias=store.alias,
        created=now.isoformat(),
    )
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    name, dropped = publish(
        store, info, vectors, ids, attributes, resolved, True, (lambda: time.sleep(delay)) if delay else None
    )
    return name, len(ids), dropped


def record(client: Any, run_id: str, store: StoreConfig, collection: str) -> None:
    """Tag the run with where its items were published (the URI without secrets); one line if refused."""
    from mlflow.exceptions import MlflowException

    uri = store.shown() if "://" in store.uri else str(Path(store.uri).expanduser().resolve())
    try:
        for key, value in zip(STORE_TAGS, (uri, store.alias, collection), strict=True):
            client.set_tag(run_id, key, value)
    except MlflowException as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RecsysError(f"--run-id {run_id}: published, but cannot tag the run ({first})") from None


def opened(run_id: str, stage_dir: Path, store: StoreConfig) -> Any:
    """The collection behind the alias, checked to be this run's."""
    from modules.vector_store import MilvusStore

    stage = load_stage(stage_dir)
    dim = int(stage.embed("item", np.zeros(0, np.int64)).shape[1])
    return stage, MilvusStore.open(store, stage_fingerprint(stage_dir), dim, run_id)


def add_run_items(run_id: str, stage_dir: Path, store: StoreConfig, path: str) -> str:
    """``--add-items FILE``: new items embedded from their side features and upserted."""
    import pandas as pd

    from modules.item_attributes import new_items
    from modules.vector_store import upsert_items

    shown = f"--add-items {path}"
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise RecsysError(f"{shown}: unreadable ({(str(e).splitlines() or [''])[0]})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    stage, store_ = opened(run_id, stage_dir, store)
    items = new_items(stage, read_item_vocabs(stage_dir, stage.meta), frame, shown)
    upsert_items(store_, items.ids, items.vectors, items.attributes)
    return printable(
        f"added {len(items.ids)} item(s) to collection {store_.info.name} ({store.shown()}, alias {store.alias}), "
        "embedded from their side features by the run's item tower"
    )


def remove_run_items(run_id: str, stage_dir: Path, store: StoreConfig, ids: str) -> str:
    """``--remove-items ID,ID,...``: delete those items from the collection the alias points at."""
    from modules.vector_store import delete_items

    wanted = [i.strip() for i in ids.split(",") if i.strip()]
    require(len(wanted) > 0, f"--remove-items {ids!r}: names no item (raw item ids, comma-separated)")
    _, store_ = opened(run_id, stage_dir, store)
    found = delete_items(store_, wanted)
    return printable(
        f"removed {found} of {len(wanted)} item(s) from collection {store_.info.name} (alias {store.alias})"
    )
