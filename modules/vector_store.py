"""Retrieval sources behind one interface: the FAISS index in process, and a Milvus collection.

    source.search(queries, k, exclude, filter) -> (scores, raw ids)     best first, per query row

``FaissSource`` wraps the bundle's ``modules.index.VectorIndex``; ``MilvusStore`` is a collection of a
Milvus deployment reached through a stable alias: Milvus Lite embedded (``STORE.db``, a data
directory served by a thread of this process), Milvus Lite's gRPC server, Milvus Standalone or
Distributed (``http(s)://host:port``), one client path for all of them (pymilvus). The
``modules.funnel.Recommender`` holds one source and never asks which.

Both exclude a query's seen items the same way (over-fetch ``k`` + the exclusions, drop them), and
both take a ``filter``: a Milvus boolean expression over the items' attributes (``item_year >= 1995 and
ARRAY_CONTAINS(item_genres, "Comedy")``). The store evaluates it inside the search; the FAISS source
applies it after (the disallowed items join the exclusions), compiled by Milvus Lite's own filter
grammar, so an exact index and a flat collection return the same items.

A published collection (``publish``) holds per item: ``item`` (raw id, the primary key), ``vector``
(the item tower's, L2-normalised for cosine; with the sphere coordinates of ``modules.index`` for an
HNSW/IVF spec of a ``dot`` model), ``origin`` (``train``, or ``added`` by ``recsys index --add-items``)
and one scalar field per item attribute of the dataset (a categorical feature's raw value, a
multi-hot feature's values as an array, a dense feature's raw number). Its properties record what it
was built from (run, fingerprint of weights + vocabularies, spec, similarity, dims): a reader refuses a
collection of another run. The alias is moved to a collection only once it is built, indexed and
loaded, in one call, so readers never see a half-built one.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import re
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from core.errors import RecsysError, require
from modules.index import IndexSpec, VectorIndex, normalise, pad_queries, search, to_sphere

log = logging.getLogger(__name__)

STORE_FORMAT = "recsys-items"
STORE_VERSION = 1
DEFAULT_ALIAS = "recsys_items"
DEFAULT_KEEP = 2
ID_FIELD, VECTOR_FIELD, ORIGIN_FIELD = "item", "vector", "origin"
TRAINED, ADDED = "train", "added"
MAX_ID_LENGTH = 512
MAX_VALUE_LENGTH = 1024
INFO_PROPERTY, COMPLETE_PROPERTY = "recsys.collection", "recsys.complete"
"""Collection properties: what it was built from (JSON), and set once it is built, indexed and loaded."""
MAX_TOPK = 16_384
"""Milvus's ceiling on one search's limit (and on queries per call)."""
INSERT_ROWS = 10_000
QUERY_ROWS = 1_024
CONNECT_TIMEOUT_S = 10.0
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,199}$")


# -- the interface ----------------------------------------------------------------------------------


class RetrievalSource(Protocol):
    """What the recommender retrieves from: top-k raw ids of the query vectors."""

    @property
    def count(self) -> int:
        """Items the source holds."""
        ...

    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[Collection[Any]] | None = None, filter: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, raw ids), (queries, k), best first; rows it cannot fill end with ``-inf`` / ``""``."""
        ...

    def check_filter(self, filter: str) -> None:
        """Refuse, with one line naming ``--filter``, an expression the source cannot evaluate."""
        ...


# -- item attributes --------------------------------------------------------------------------------

AttributeKind = Literal["string", "strings", "number"]


@dataclass(frozen=True)
class Attributes:
    """The items' scalar attributes in raw values: ``kinds`` (name -> string, strings or number) and
    ``columns`` (name -> one value per item of ``ids``)."""

    ids: np.ndarray
    kinds: dict[str, AttributeKind]
    columns: dict[str, list[Any]]

    def table(self) -> Any:
        """A pyarrow table (``item`` + every attribute) for the filter evaluator."""
        import pyarrow as pa

        arrays = {ID_FIELD: pa.array(self.ids.astype(str).tolist(), pa.string())}
        for name, kind in self.kinds.items():
            typ = {"string": pa.string(), "strings": pa.list_(pa.string()), "number": pa.float64()}[kind]
            arrays[name] = pa.array(self.columns[name], typ)
        return pa.table(arrays)


def compile_filter(expression: str, kinds: dict[str, AttributeKind]) -> Any:
    """Milvus Lite's compiled form of a filter over ``item`` and the attributes; one line if it does not parse
    or names another field."""
    from milvus_lite.schema.types import CollectionSchema, DataType, FieldSchema
    from milvus_lite.search.filter import FilterError
    from milvus_lite.search.filter import compile_filter as compile_milvus

    types = {"string": DataType.VARCHAR, "number": DataType.DOUBLE}
    fields = [FieldSchema(ID_FIELD, DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH)]
    for name, kind in kinds.items():
        if kind == "strings":
            fields.append(FieldSchema(name, DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=4096))
        else:
            fields.append(FieldSchema(name, types[kind], max_length=MAX_VALUE_LENGTH if kind == "string" else None))
    fields.append(FieldSchema(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=2))
    try:
        return compile_milvus(expression, CollectionSchema(fields))
    except FilterError as e:
        names = ", ".join([ID_FIELD, *kinds]) or ID_FIELD
        raise RecsysError(f"--filter {expression!r}: {first_line(e)} (fields: {names})") from None


# -- FAISS in process -------------------------------------------------------------------------------


@dataclass
class FaissSource:
    """The bundle's FAISS index; ``attributes`` (built on first use) for filters, applied after search."""

    index: VectorIndex
    attributes: Callable[[], Attributes] | None = None
    _masks: dict[str, frozenset[Any]] = field(default_factory=dict, repr=False)

    @property
    def count(self) -> int:
        return self.index.count

    @functools.cached_property
    def _attributes(self) -> Attributes:
        require(self.attributes is not None, "--filter: this recommender has no item attributes to filter on")
        assert self.attributes is not None
        return self.attributes()

    def check_filter(self, filter: str) -> None:
        self.disallowed(filter)

    def disallowed(self, filter: str) -> frozenset[Any]:
        """The raw ids of the index that ``filter`` leaves out (cached per expression)."""
        if filter not in self._masks:
            from milvus_lite.search.filter import evaluate_mask

            attributes = self._attributes
            compiled = compile_filter(filter, attributes.kinds)
            try:
                mask = np.asarray(evaluate_mask(compiled, attributes.table()), dtype=bool)
            except Exception as e:  # the evaluator's own errors (a type it cannot compare): one line
                raise RecsysError(f"--filter {filter!r}: {first_line(e)}") from None
            allowed = set(attributes.ids[mask].astype(str).tolist())
            self._masks[filter] = frozenset(i for i in self.index.ids.tolist() if str(i) not in allowed)
        return self._masks[filter]

    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[Collection[Any]] | None = None, filter: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        if filter:
            out = self.disallowed(filter)
            exclude = [out] * len(queries) if exclude is None else [set(e) | out for e in exclude]
        return search(self.index, queries, k, exclude=exclude)


# -- Milvus -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreConfig:
    """``--store URI [--alias NAME] [--keep N]``: where the item vectors are published and read."""

    uri: str
    """``PATH.db`` (Milvus Lite embedded: a data directory of this process) or ``http(s)://host:port``."""
    alias: str = DEFAULT_ALIAS
    """The stable name readers search; ``recsys index --store`` moves it to each new collection."""
    keep: int = DEFAULT_KEEP
    """Collections of this alias kept after a publish, the one it points at included (roll-back)."""
    token: str = field(default="", repr=False)
    """From the environment (``RECSYS_MILVUS_TOKEN``), never shown, logged or recorded."""

    def shown(self) -> str:
        """The URI as it may be shown and recorded: no user, password or query string."""
        return public_uri(self.uri)

    def check(self) -> StoreConfig:
        """Refuse a malformed ``--store``, ``--alias`` or ``--keep`` with one line (before any work)."""
        from pathlib import Path
        from urllib.parse import urlsplit

        uri = self.uri.strip()
        if uri.endswith(".db") and "://" not in uri:
            parent = Path(uri).expanduser().resolve().parent
            require(parent.is_dir(), f"--store {uri}: its folder {parent} does not exist")
            require(
                not Path(uri).exists() or Path(uri).is_dir(),
                f"--store {uri}: exists and is not a Milvus Lite data directory",
            )
        else:
            parts = urlsplit(uri)
            require(
                parts.scheme in ("http", "https") and bool(parts.hostname),
                f"--store {self.shown()}: expected PATH.db (Milvus Lite) or http(s)://HOST:PORT (a Milvus server)",
            )
            require(
                not (parts.username or parts.password or parts.query),
                f"--store {self.shown()}: put no credentials in the URI; set RECSYS_MILVUS_TOKEN instead",
            )
        require(bool(NAME.match(self.alias)), f"--alias {self.alias!r}: letters, digits and _ only, not first a digit")
        require(self.keep >= 1, f"--keep {self.keep}: must be at least 1 (the collection the alias points at)")
        return self


def public_uri(uri: str) -> str:
    """A store URI without user, password or query string (which may carry a token)."""
    from urllib.parse import urlsplit, urlunsplit

    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    netloc = f"{parts.hostname or ''}:{parts.port}" if parts.port else (parts.hostname or "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def first_line(error: BaseException) -> str:
    """An exception's message as one line (pymilvus's carry ``<MilvusException: (code=..., message=...)>``)."""
    message = getattr(error, "message", None) or str(error)
    return (str(message).strip().splitlines() or [type(error).__name__])[0]


@contextlib.contextmanager
def milvus_errors(what: str) -> Iterator[None]:
    """pymilvus's and grpc's exceptions in the body as one RecsysError line starting with ``what``."""
    from pymilvus.exceptions import MilvusException

    try:
        yield
    except RecsysError:
        raise
    except MilvusException as e:
        raise RecsysError(f"{what}: {first_line(e)}") from None
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        raise RecsysError(f"{what}: {first_line(e)}") from None


def connect(cfg: StoreConfig) -> Any:
    """A ``pymilvus.MilvusClient`` on the store, its connection checked (one line if unreachable or refused)."""
    for name in ("milvus_lite", "pymilvus"):  # their own tracebacks on a failed start go nowhere
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        from pymilvus import MilvusClient
    except ImportError:  # pragma: no cover - a declared dependency
        raise RecsysError(
            "--store needs pymilvus and milvus-lite: pip install pymilvus==3.0.2 milvus-lite==3.2.2"
        ) from None
    cfg.check()
    uri = cfg.uri.strip()
    where = f"--store {cfg.shown()}"
    try:
        with milvus_errors(f"{where}: cannot connect"):
            client = MilvusClient(uri=uri, token=cfg.token, timeout=CONNECT_TIMEOUT_S)
            client.list_collections()  # a server that refuses the token says so here
    except RecsysError as e:
        text = str(e)
        if uri.endswith(".db") and "Open local milvus failed" in text:
            text = (
                f"{where}: cannot open the Milvus Lite data directory (another process may hold it: a .db "
                "is used by one process at a time; serve it with python -m milvus_lite server)"
            )
        elif any(w in text.lower() for w in ("auth", "token", "credential", "permission")) or listening(uri):
            # a server that answers TCP but not the client: Milvus with authentication on, a wrong token
            text = f"{where}: the server refused the token in RECSYS_MILVUS_TOKEN ({text.split(': ', 2)[-1]})"
        raise RecsysError(text) from None
    return client


def listening(uri: str) -> bool:
    """Whether something accepts TCP connections at a server URI's host and port."""
    import socket
    from urllib.parse import urlsplit

    if uri.endswith(".db"):
        return False
    parts = urlsplit(uri)
    try:
        with socket.create_connection((parts.hostname or "", parts.port or 19530), timeout=2):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class CollectionInfo:
    """What a published collection was built from (its ``INFO_PROPERTY``)."""

    name: str
    run: str
    fingerprint: str
    spec: str
    similarity: str
    dim: int
    indexed_dim: int
    sphere_radius: float | None
    kinds: dict[str, AttributeKind]
    alias: str
    created: str

    def describe(self) -> str:
        record = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "run": self.run,
            "fingerprint": self.fingerprint,
            "spec": self.spec,
            "similarity": self.similarity,
            "dim": self.dim,
            "indexed_dim": self.indexed_dim,
            "sphere_radius": self.sphere_radius,
            "attributes": self.kinds,
            "alias": self.alias,
            "created": self.created,
        }
        return json.dumps(record, sort_keys=True, separators=(",", ":"))

    @classmethod
    def read(cls, name: str, description: str) -> CollectionInfo | None:
        """The info of a recsys collection, or None for any other collection."""
        try:
            d = json.loads(description)
            if not isinstance(d, dict) or (d.get("format"), d.get("version")) != (STORE_FORMAT, STORE_VERSION):
                return None
            return cls(
                name,
                str(d["run"]),
                str(d["fingerprint"]),
                str(d["spec"]),
                str(d["similarity"]),
                int(d["dim"]),
                int(d["indexed_dim"]),
                None if d["sphere_radius"] is None else float(d["sphere_radius"]),
                dict(d["attributes"]),
                str(d["alias"]),
                str(d["created"]),
            )
        except (ValueError, KeyError, TypeError):
            return None


def collection_info(client: Any, name: str) -> CollectionInfo | None:
    """The info of a collection recsys published (None for any other collection)."""
    properties = client.describe_collection(name).get("properties") or {}
    return CollectionInfo.read(name, str(properties.get(INFO_PROPERTY) or ""))


def complete(client: Any, name: str) -> bool:
    return str((client.describe_collection(name).get("properties") or {}).get(COMPLETE_PROPERTY)) == "1"


def aliased(client: Any, cfg: StoreConfig) -> str | None:
    """The collection ``cfg.alias`` points at, or None when there is no such alias."""
    if cfg.alias not in set(client.list_aliases().get("aliases", [])):
        return None
    return str(client.describe_alias(cfg.alias)["collection_name"])


def milvus_index(spec: IndexSpec) -> tuple[str, dict[str, int], dict[str, int]]:
    """(Milvus index type, build params, search params) of an index spec; one line where Milvus has none."""
    typed = f"--index {spec}"
    if spec.kind == "flat":
        return "FLAT", {}, {}
    if spec.kind == "hnsw":
        build = {"M": spec.hnsw_m, "efConstruction": spec.param("ef_construction")}
        return "HNSW", build, {"ef": spec.param("ef_search")}
    require(not spec.refine, f"{typed}: Milvus has no exact re-scoring stage (rflat); drop ,rflat or use hnsw/ivf,flat")
    require(not spec.fast_scan, f"{typed}: Milvus has no 4-bit fast-scan PQ (fs); use ivf,pq<M>x<bits> or ivf,sq8")
    index_type = {"flat": "IVF_FLAT", "sq8": "IVF_SQ8", "pq": "IVF_PQ"}[spec.coding]
    build = {"nlist": spec.nlist or 0} | ({"m": spec.pq_m, "nbits": spec.pq_bits} if spec.coding == "pq" else {})
    return index_type, build, {"nprobe": spec.param("nprobe")}


def collection_name(alias: str, run: str, fingerprint: str, now: datetime.datetime) -> str:
    """``ALIAS_RUN_FINGERPRINT_TIME``: named after the run and the index fingerprint, distinct per build."""
    safe_run = re.sub(r"[^A-Za-z0-9]", "", run)[:12] or "run"
    return f"{alias}_{safe_run}_{fingerprint[:12]}_{now.strftime('%Y%m%d%H%M%S%f')}"[:255]


def create_collection(client: Any, info: CollectionInfo, index: tuple[str, dict[str, int], dict[str, int]]) -> None:
    """An empty collection with the item fields, its vector index and its info property (not yet loaded)."""
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field(ID_FIELD, DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH)
    schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=info.indexed_dim)
    schema.add_field(ORIGIN_FIELD, DataType.VARCHAR, max_length=16)
    for name, kind in info.kinds.items():
        if kind == "string":
            schema.add_field(name, DataType.VARCHAR, max_length=MAX_VALUE_LENGTH)
        elif kind == "strings":
            schema.add_field(
                name, DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=4096, max_length=MAX_VALUE_LENGTH
            )
        else:
            schema.add_field(name, DataType.DOUBLE)
    params = client.prepare_index_params()
    index_type, build, _ = index
    params.add_index(VECTOR_FIELD, index_type=index_type, metric_type="IP", params=build)
    client.create_collection(info.name, schema=schema, index_params=params, properties={INFO_PROPERTY: info.describe()})


def stored_vectors(vectors: np.ndarray, info: CollectionInfo) -> np.ndarray:
    """The vectors as the collection holds them (normalised for cosine; on the sphere when it has one)."""
    x = normalise(vectors) if info.similarity == "cosine" else np.ascontiguousarray(vectors, np.float32)
    extra = info.indexed_dim - info.dim
    return to_sphere(x, info.sphere_radius, extra) if info.sphere_radius is not None and extra else x


def rows_of(ids: np.ndarray, vectors: np.ndarray, attributes: Attributes, lo: int, hi: int, origin: str) -> list[dict]:
    """Insert rows ``lo:hi`` of the items."""
    rows = []
    for j in range(lo, hi):
        row: dict[str, Any] = {ID_FIELD: str(ids[j]), VECTOR_FIELD: vectors[j].tolist(), ORIGIN_FIELD: origin}
        for name in attributes.kinds:
            row[name] = attributes.columns[name][j]
        rows.append(row)
    return rows


def insert_items(
    client: Any,
    name: str,
    ids: np.ndarray,
    vectors: np.ndarray,
    attributes: Attributes,
    origin: str,
    progress: bool,
    upsert: bool = False,
    on_batch: Callable[[], None] | None = None,
) -> None:
    """Write the items in batches of ``INSERT_ROWS`` with a progress bar (a corpus larger than memory
    streams: one batch of rows at a time)."""
    from tqdm.auto import tqdm

    write = client.upsert if upsert else client.insert
    with tqdm(total=len(ids), desc=f"store {name}", unit="item", disable=not progress) as bar:
        for lo in range(0, len(ids), INSERT_ROWS):
            hi = min(lo + INSERT_ROWS, len(ids))
            write(name, rows_of(ids, vectors, attributes, lo, hi, origin))
            bar.update(hi - lo)
            if on_batch is not None:
                on_batch()


def ours(client: Any, alias: str) -> list[CollectionInfo]:
    """The recsys collections published under ``alias``, oldest first."""
    found = []
    for name in client.list_collections():
        info = collection_info(client, name)
        if info is not None and info.alias == alias:
            found.append(info)
    return sorted(found, key=lambda i: (i.created, i.name))


def prune(client: Any, cfg: StoreConfig) -> list[str]:
    """Drop this alias's collections beyond the newest ``cfg.keep`` (the aliased one always kept), and any
    left half-built by a killed publish; returns the names dropped."""
    current = aliased(client, cfg)
    older = [i.name for i in ours(client, cfg.alias) if i.name != current]
    broken = [n for n in older if not complete(client, n)]
    older = [n for n in older if n not in broken]
    keep = set(older[len(older) - (cfg.keep - 1) :]) if cfg.keep > 1 else set()
    dropped = broken + [n for n in older if n not in keep]
    for name in dropped:
        client.drop_collection(name)
    return dropped


def swap_alias(client: Any, cfg: StoreConfig, name: str) -> None:
    """Point the alias at ``name`` in one call (create it the first time)."""
    if aliased(client, cfg) is None:
        client.create_alias(collection_name=name, alias=cfg.alias)
    else:
        client.alter_alias(collection_name=name, alias=cfg.alias)


def check_alias_is_ours(client: Any, cfg: StoreConfig) -> None:
    """Refuse to move or read an alias that points at a collection recsys did not publish."""
    current = aliased(client, cfg)
    if current is not None and collection_info(client, current) is None:
        raise RecsysError(
            f"--alias {cfg.alias}: points at collection {current}, which recsys index did not publish; "
            "pass another --alias"
        )


@dataclass
class MilvusStore:
    """A published collection read through its alias (see the module docstring)."""

    client: Any
    cfg: StoreConfig
    info: CollectionInfo
    search_params: dict[str, int]

    @classmethod
    def open(cls, cfg: StoreConfig, fingerprint: str, dim: int, run: str) -> MilvusStore:
        """The collection ``cfg.alias`` points at, refused (one line) unless recsys published it for the
        retrieval run of ``fingerprint`` (its weights and vocabularies) and vector dimension ``dim``."""
        from modules.index import parse_spec

        client = connect(cfg)
        where = f"--store {cfg.shown()}"
        with milvus_errors(where):
            name = aliased(client, cfg)
            require(
                name is not None,
                f"{where}: no alias {cfg.alias} (publish the run first: recsys index --run-id {run} --store URI)",
            )
            assert name is not None
            check_alias_is_ours(client, cfg)
            info = collection_info(client, name)
            assert info is not None
            require(
                info.dim == dim,
                f"{where}: alias {cfg.alias} points at {name}, of dimension {info.dim}; the run's vectors have {dim}",
            )
            require(
                info.fingerprint == fingerprint,
                f"{where}: alias {cfg.alias} points at {name}, published from run {info.run} (fingerprint "
                f"{info.fingerprint[:12]}), not from --retrieval {run} ({fingerprint[:12]}): "
                f"run recsys index --run-id {run} --store URI",
            )
            client.load_collection(cfg.alias)
            _, _, search_params = milvus_index(parse_spec(info.spec))
        return cls(client, cfg, info, search_params)

    @functools.cached_property
    def count(self) -> int:
        with milvus_errors(f"--store {self.cfg.shown()}"):
            rows = self.client.query(self.cfg.alias, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def check_filter(self, filter: str) -> None:
        with milvus_errors(f"--filter {filter!r}"):
            self.client.query(self.cfg.alias, filter=filter, output_fields=[ID_FIELD], limit=1)

    def queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(np.asarray(queries, np.float32))
        require(q.ndim == 2 and q.shape[1] == self.info.dim, f"queries: expected (n, {self.info.dim})")
        q = normalise(q) if self.info.similarity == "cosine" else q
        return pad_queries(q, self.info.indexed_dim - self.info.dim)

    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[Collection[Any]] | None = None, filter: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        q = self.queries(queries)
        n = len(q)
        require(k >= 1, f"k={k}: must be at least 1")
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        ids = np.full((n, k), "", dtype=object)
        sizes = np.array([len(e) for e in exclude] if exclude is not None else [0] * n, dtype=np.int64)
        order = np.argsort(sizes, kind="stable")  # batches of like exclusion sizes, as the FAISS index does
        for lo in range(0, n, QUERY_ROWS):
            rows = order[lo : lo + QUERY_ROWS]
            fetch = int(min(k + (sizes[rows].max() if len(rows) else 0), MAX_TOPK))
            params = dict(self.search_params)
            if "ef" in params:
                params["ef"] = max(params["ef"], fetch)
            with milvus_errors(f"--filter {filter!r}" if filter else f"--store {self.cfg.shown()}"):
                hits = self.client.search(
                    self.cfg.alias,
                    data=q[rows].tolist(),
                    limit=fetch,
                    filter=filter or "",
                    anns_field=VECTOR_FIELD,
                    output_fields=[],
                    search_params={"metric_type": "IP", "params": params},
                )
            for r, found in zip(rows, hits, strict=True):
                banned = exclude[r] if exclude is not None else ()
                kept = [(str(h.id), float(h.distance)) for h in found if str(h.id) not in banned][:k]
                for j, (item, score) in enumerate(kept):
                    ids[r, j], scores[r, j] = item, score
        return scores, ids.astype(str)


def publish(
    cfg: StoreConfig,
    info: CollectionInfo,
    vectors: np.ndarray,
    ids: np.ndarray,
    attributes: Attributes,
    spec: IndexSpec,
    progress: bool = True,
    on_batch: Callable[[], None] | None = None,
) -> tuple[str, list[str]]:
    """Write the items into the new collection ``info.name``, index and load it, then point the alias at
    it and drop the collections beyond ``cfg.keep``; returns (the collection, the collections dropped).
    Until the alias moves, readers keep the collection it pointed at: a publish that fails or is killed
    leaves it there (the half-built collection is dropped by the next publish)."""
    index = milvus_index(spec)  # a spec Milvus has no equivalent for fails before any write
    client = connect(cfg)
    where = f"--store {cfg.shown()}"
    with milvus_errors(where):
        check_alias_is_ours(client, cfg)
        create_collection(client, info, index)
        insert_items(
            client, info.name, ids, stored_vectors(vectors, info), attributes, TRAINED, progress, False, on_batch
        )
        client.flush(info.name)
        client.load_collection(info.name)
        client.alter_collection_properties(info.name, properties={COMPLETE_PROPERTY: "1"})
        swap_alias(client, cfg, info.name)
        dropped = prune(client, cfg)
    return info.name, dropped


def open_for_update(cfg: StoreConfig, fingerprint: str, dim: int, run: str) -> MilvusStore:
    """The collection behind the alias, for ``--add-items`` / ``--remove-items`` (same checks as a reader)."""
    return MilvusStore.open(cfg, fingerprint, dim, run)


def upsert_items(store: MilvusStore, ids: np.ndarray, vectors: np.ndarray, attributes: Attributes) -> None:
    """Add (or replace) items in the collection the alias points at, marked ``added``."""
    with milvus_errors(f"--store {store.cfg.shown()}"):
        insert_items(
            store.client, store.info.name, ids, stored_vectors(vectors, store.info), attributes, ADDED, False, True
        )
        store.client.flush(store.info.name)


def delete_items(store: MilvusStore, ids: Sequence[str]) -> int:
    """Delete items by raw id from the collection the alias points at; returns how many were there."""
    with milvus_errors(f"--store {store.cfg.shown()}"):
        present = store.client.get(store.info.name, ids=list(ids), output_fields=[ID_FIELD])
        store.client.delete(store.info.name, ids=list(ids))
        store.client.flush(store.info.name)
    return len(present)
