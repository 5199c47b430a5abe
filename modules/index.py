"""Vector index over item embeddings (FAISS, inner product): build, search with exclusions, save, load.

An index SPEC is what users type on the command line: a structure, then optional ``:name=value``
parameters (case-insensitive)::

    spec      := structure [":" param ("," param)*]
    structure := "flat"                                     exact search
               | "hnsw" M                                   HNSW graph, M links per node
               | "ivf" [NLIST] "," coding ["," "rflat"]     inverted lists (NLIST omitted: chosen from
                                                            the corpus size); rflat re-scores the
                                                            candidates of a compressed coding exactly
    coding    := "flat" | "sq8" | "pq" M ["x" BITS] ["fs"]  product quantiser of M sub-vectors with
                                                            BITS-bit codes (fs: 4-bit fast scan)
    param     := hnsw: ef_search (64), ef_construction (40); ivf: nprobe (32, at most nlist);
                 rflat: k_factor (8: re-score k_factor x k candidates); hnsw, ivf: sphere (1, or 0)

    flat    hnsw32:ef_search=128    ivf1024,flat:nprobe=16    ivf1024,pq32x4fs,rflat:nprobe=32,k_factor=4

The metric is always inner product, the two-tower's score: ``cosine`` vectors (and queries) are
L2-normalised first. FAISS positions 0..n-1 are the labels; the raw item ids live beside them.

``dot`` vectors have unequal norms, which HNSW's graph and IVF's k-means handle badly: lists probed
by their centroid's direction miss long vectors elsewhere, and a graph built on raw inner products
links everything to the longest vectors. With ``sphere=1`` (the default for hnsw and ivf) each dot
vector gets one more coordinate, sqrt(R² - |x|²) with R the corpus's largest norm, and each query a
0 there: every indexed vector has norm R and every inner product is unchanged (Bachrach et al.,
RecSys 2014). On 1M trained 64-d two-tower item vectors (docs/INDEX_BENCH.md) it took IVF4096 from
recall@10 0.57 to 0.96 at nprobe 32 and HNSW32 from 0.91 to 0.98 at ef_search 128. It is not free for
HNSW: when norms spread widely (the longest many times the typical one) most vectors sit near one
pole of the sphere, far from every query, and the graph search suffers (4000 test vectors with
log-normal norms, sigma 0.7: recall 0.98 without, 0.78 with, at ef_search 64); ``sphere=0`` turns it
off. A pq<M> coding gets one more sub-quantiser for that coordinate (padded with zeros to the
sub-vector width), so M still divides dim.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from core.checksums import checksums, verify_checksums
from core.errors import RecsysError, require
from core.output import OutputKind, os_reason

Similarity = Literal["dot", "cosine"]
SIMILARITIES: tuple[str, ...] = ("dot", "cosine")

MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
VECTORS_FILE = "vectors.parquet"
FORMAT = "recsys-vector-index"
FORMAT_VERSION = 2
"""2: the manifest lists each file's SHA-256 (``files``), checked before the index is read."""

MIN_POINTS_PER_CENTROID = 39
"""k-means training points per centroid below which FAISS warns that its clustering is unreliable."""
TRAIN_POINTS_PER_LIST = 64
"""IVF: k-means trains on at most this many sampled vectors per list (FAISS's own cap is 256 per list,
four times the k-means work: minutes for 4096 lists on 2 cores)."""
PROGRESS_MIN_ITEMS = 200_000
"""build_index shows a progress bar from this many vectors on (unless told otherwise)."""

STRUCTURE_HELP = "expected flat, hnsw<M>, or ivf[<nlist>],<flat|sq8|pq<M>[x<bits>][fs]>[,rflat]"
DEFAULTS = {"ef_construction": 40, "ef_search": 64, "nprobe": 32, "k_factor": 8, "sphere": 1}
PARAM_ORDER = ("ef_construction", "ef_search", "nprobe", "k_factor", "sphere")
BUILD_PARAMS = frozenset({"ef_construction", "sphere"})
SWITCHES = frozenset({"sphere"})  # 0 or 1; every other parameter is a positive integer
# faiss.ParameterSpace names of the search parameters
FAISS_PARAMS = {"ef_search": "efSearch", "nprobe": "nprobe", "k_factor": "k_factor_rf"}


@dataclass(frozen=True)
class IndexSpec:
    """A parsed index spec; ``str(spec)`` is its canonical form, with every parameter spelled out."""

    kind: Literal["flat", "hnsw", "ivf"]
    hnsw_m: int = 0
    nlist: int | None = None
    """ivf: number of inverted lists; None until chosen from the corpus size by build_index."""
    coding: Literal["flat", "sq8", "pq"] = "flat"
    pq_m: int = 0
    pq_bits: int = 8
    fast_scan: bool = False
    refine: bool = False
    params: tuple[tuple[str, int], ...] = ()
    """Every parameter that applies to this structure (defaults filled in), in PARAM_ORDER."""

    def param(self, name: str) -> int:
        return dict(self.params)[name]

    def structure(self) -> str:
        if self.kind == "flat":
            return "flat"
        if self.kind == "hnsw":
            return f"hnsw{self.hnsw_m}"
        coding = self.coding if self.coding != "pq" else f"pq{self.pq_m}x{self.pq_bits}{'fs' if self.fast_scan else ''}"
        return f"ivf{self.nlist or ''},{coding}{',rflat' if self.refine else ''}"

    def factory(self, sphere: bool = False) -> str:
        """The ``faiss.index_factory`` string (an ivf spec needs its nlist resolved); ``sphere``: the
        vectors carry the extra sphere coordinate, and a pq coding one more sub-quantiser for it."""
        if self.kind == "flat":
            return "Flat"
        if self.kind == "hnsw":
            return f"HNSW{self.hnsw_m}"
        require(self.nlist is not None, f"index spec {str(self)!r}: nlist not resolved")
        pq_m = self.pq_m + 1 if sphere else self.pq_m
        coding = {"flat": "Flat", "sq8": "SQ8"}.get(self.coding) or (
            f"PQ{pq_m}x{self.pq_bits}{'fs' if self.fast_scan else ''}"
        )
        return f"IVF{self.nlist},{coding}{',RFlat' if self.refine else ''}"

    def extra_dims(self, similarity: str, dim: int) -> int:
        """Coordinates added to each vector for the sphere transform (0: none; see the module docstring)."""
        if similarity != "dot" or self.kind == "flat" or not self.param("sphere"):
            return 0
        return dim // self.pq_m if self.coding == "pq" else 1

    def __str__(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in self.params)
        return f"{self.structure()}:{params}" if params else self.structure()


def allowed_params(kind: str, refine: bool) -> tuple[str, ...]:
    """The parameter names a structure takes."""
    names = {"flat": (), "hnsw": ("ef_construction", "ef_search", "sphere"), "ivf": ("nprobe", "sphere")}[kind]
    return names + (("k_factor",) if refine else ())


def parse_params(text: str, spec: str, allowed: Sequence[str]) -> dict[str, int]:
    """``name=value,...`` -> {name: value}; values are positive integers."""
    out: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not value:
            raise RecsysError(f"index spec {spec!r}: parameter {item!r} is not name=value")
        if name not in allowed:
            takes = ", ".join(allowed) if allowed else "no parameters"
            raise RecsysError(f"index spec {spec!r}: unknown parameter {name!r} (this index takes {takes})")
        if name in out:
            raise RecsysError(f"index spec {spec!r}: parameter {name!r} given twice")
        if name in SWITCHES and value not in ("0", "1"):
            raise RecsysError(f"index spec {spec!r}: {name}={value} must be 0 or 1")
        if name not in SWITCHES and (not re.fullmatch(r"[0-9]+", value) or int(value) < 1):
            raise RecsysError(f"index spec {spec!r}: {name}={value} must be a positive integer")
        out[name] = int(value)
    return out


def parse_spec(text: str) -> IndexSpec:
    """Parse an index spec (grammar in the module docstring); a bad one raises a one-line RecsysError."""
    require(isinstance(text, str) and text.strip() != "", f"index spec {text!r}: empty ({STRUCTURE_HELP})")
    spec = text.strip().lower()
    structure, _, param_text = spec.partition(":")
    parts = [p.strip() for p in structure.split(",")]
    if "" in parts:
        raise RecsysError(f"index spec {text!r}: empty component ({STRUCTURE_HELP})")
    kind: Literal["flat", "hnsw", "ivf"]
    fields: dict[str, Any] = {}
    if parts == ["flat"]:
        kind = "flat"
    elif parts[0] == "hnsw":
        raise RecsysError(f"index spec {text!r}: hnsw needs its M (links per node), e.g. hnsw32 ({STRUCTURE_HELP})")
    elif m := re.fullmatch(r"hnsw([0-9]+)", parts[0]):
        kind = "hnsw"
        fields["hnsw_m"] = int(m.group(1))
        require(2 <= fields["hnsw_m"] <= 256, f"index spec {text!r}: hnsw M must be between 2 and 256")
        require(len(parts) == 1, f"index spec {text!r}: hnsw takes no coding ({STRUCTURE_HELP})")
    elif m := re.fullmatch(r"ivf([0-9]*)", parts[0]):
        kind = "ivf"
        if m.group(1):
            fields["nlist"] = int(m.group(1))
            require(fields["nlist"] >= 1, f"index spec {text!r}: ivf needs at least 1 list")
        require(len(parts) in (2, 3), f"index spec {text!r}: ivf needs a coding ({STRUCTURE_HELP})")
        coding = parts[1]
        if coding in ("flat", "sq8"):
            fields["coding"] = coding
        elif pq := re.fullmatch(r"pq([0-9]+)(?:x([0-9]+))?(fs)?", coding):
            fast = pq.group(3) is not None
            bits = int(pq.group(2)) if pq.group(2) else (4 if fast else 8)
            fields.update(coding="pq", pq_m=int(pq.group(1)), pq_bits=bits, fast_scan=fast)
            require(fields["pq_m"] >= 1, f"index spec {text!r}: pq needs at least 1 sub-vector")
            require(1 <= bits <= 16, f"index spec {text!r}: pq codes must have 1 to 16 bits")
            require(not fast or bits == 4, f"index spec {text!r}: fast scan (fs) needs 4-bit codes (pq<M>x4fs)")
        else:
            raise RecsysError(f"index spec {text!r}: unknown ivf coding {coding!r} ({STRUCTURE_HELP})")
        if len(parts) == 3:
            require(parts[2] == "rflat", f"index spec {text!r}: unknown component {parts[2]!r} ({STRUCTURE_HELP})")
            require(
                fields["coding"] != "flat",
                f"index spec {text!r}: rflat re-scores a compressed coding (pq, sq8); ivf…,flat is already exact",
            )
            fields["refine"] = True
    else:
        raise RecsysError(f"index spec {text!r}: unknown structure {parts[0]!r} ({STRUCTURE_HELP})")
    allowed = allowed_params(kind, fields.get("refine", False))
    given = parse_params(param_text, text, allowed)
    nlist = fields.get("nlist")
    if nlist is not None and given.get("nprobe", 0) > nlist:
        raise RecsysError(f"index spec {text!r}: nprobe={given['nprobe']} exceeds the {nlist} lists")
    defaults = {**DEFAULTS, "nprobe": min(DEFAULTS["nprobe"], nlist or DEFAULTS["nprobe"])}
    params = tuple((n, given.get(n, defaults[n])) for n in PARAM_ORDER if n in allowed)
    return IndexSpec(kind=kind, params=params, **fields)


def auto_nlist(count: int) -> int:
    """IVF lists for ``count`` vectors: the power of two nearest 4·sqrt(count), capped by the training minimum."""
    target = round(math.log2(max(1.0, 4 * math.sqrt(count))))
    cap = math.floor(math.log2(max(1, count // MIN_POINTS_PER_CENTROID)))
    return int(2 ** min(target, cap))


def resolve_spec(spec: IndexSpec, count: int, dim: int, typed: str | None = None) -> IndexSpec:
    """Fix what depends on the corpus (nlist) and refuse what it cannot train (errors name ``typed``)."""
    name = typed if typed is not None else str(spec)
    if spec.kind != "ivf":
        return spec
    nlist = spec.nlist
    if nlist is None:
        nlist = auto_nlist(count)
        params = tuple((k, min(v, nlist) if k == "nprobe" else v) for k, v in spec.params)
        spec = replace(spec, nlist=nlist, params=params)
    need = nlist * MIN_POINTS_PER_CENTROID
    if count < need:
        raise RecsysError(
            f"index spec {name!r}: {nlist} lists need at least {need} vectors to train "
            f"({MIN_POINTS_PER_CENTROID} per list), the corpus has {count}; "
            f"use ivf{auto_nlist(count)} or leave nlist out (ivf,…) to choose it from the corpus size"
        )
    if spec.coding == "pq":
        require(
            dim % spec.pq_m == 0,
            f"index spec {name!r}: pq{spec.pq_m} needs the dimension ({dim}) to be a multiple of {spec.pq_m}",
        )
        need = (2**spec.pq_bits) * MIN_POINTS_PER_CENTROID
        require(
            count >= need,
            f"index spec {name!r}: {spec.pq_bits}-bit pq codes need at least {need} vectors to train, "
            f"the corpus has {count}",
        )
    return spec


@dataclass
class VectorIndex:
    """A built FAISS index with the raw ids and vectors it was built from (labels are row positions)."""

    faiss_index: Any
    """The ``faiss.Index`` (inner-product metric)."""
    ids: np.ndarray
    """Raw item ids: int64 (non-negative) or str, unique; ``ids[label]`` is FAISS label's item."""
    vectors: np.ndarray
    """float32 (count, dim), the vectors searched (L2-normalised when ``similarity`` is cosine); FAISS
    holds them with the sphere coordinates appended when ``sphere_radius`` is set."""
    spec: IndexSpec
    similarity: Similarity
    sphere_radius: float | None = None
    """R of the sphere transform (None: vectors indexed as they are); FAISS's dimension is then larger."""
    _positions: dict[Any, int] | None = field(default=None, repr=False, compare=False)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def count(self) -> int:
        return int(self.vectors.shape[0])

    def positions(self) -> dict[Any, int]:
        """Raw id -> label (built on first use)."""
        if self._positions is None:
            self._positions = {v: i for i, v in enumerate(self.ids.tolist())}
        return self._positions


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a declared dependency
        raise RecsysError("the vector index needs faiss: pip install 'faiss-cpu>=1.15,<1.16'") from e
    return faiss


def as_matrix(values: Any, name: str, dim: int | None = None) -> np.ndarray:
    """A C-contiguous float32 (n, dim) array of finite values."""
    x = np.ascontiguousarray(np.asarray(values, dtype=np.float32))
    require(x.ndim == 2, f"{name}: expected a 2-D array (rows, dim), got shape {x.shape}")
    require(x.shape[1] >= 1, f"{name}: vectors have no dimensions")
    require(dim is None or x.shape[1] == dim, f"{name}: dimension {x.shape[1]}, the index has {dim}")
    require(bool(np.isfinite(x).all()), f"{name}: contains NaN or infinite values")
    return x


def as_ids(ids: Any, count: int) -> np.ndarray:
    """Raw ids as a unique int64 (non-negative) or str array of length ``count``."""
    arr = np.asarray(ids)
    require(arr.ndim == 1, f"ids: expected one id per vector, got shape {arr.shape}")
    require(len(arr) == count, f"ids: {len(arr)} ids for {count} vectors")
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.int64)
        require(count == 0 or int(arr.min()) >= 0, "ids: integer ids must be non-negative")
    elif arr.dtype.kind == "U" or (arr.dtype.kind == "O" and all(isinstance(v, str) for v in arr.tolist())):
        arr = arr.astype(str)
        require(bool((np.char.str_len(arr) > 0).all()), "ids: empty string id")
    else:
        raise RecsysError(f"ids: expected integers or strings, got {arr.dtype}")
    unique, counts = np.unique(arr, return_counts=True)
    if len(unique) != count:
        raise RecsysError(f"ids: {count - len(unique)} duplicates, e.g. {unique[counts > 1][0]!r}")
    return arr


def normalise(x: np.ndarray) -> np.ndarray:
    """Row-wise L2-normalised copy (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def to_sphere(x: np.ndarray, radius: float, extra: int) -> np.ndarray:
    """``[x, sqrt(radius² - |x|²), 0...]``: ``extra`` more coordinates, every row of norm ``radius``."""
    out = np.zeros((len(x), x.shape[1] + extra), dtype=np.float32)
    out[:, : x.shape[1]] = x
    out[:, x.shape[1]] = np.sqrt(np.maximum(radius**2 - np.einsum("ij,ij->i", x, x), 0.0))
    return out


def pad_queries(q: np.ndarray, extra: int) -> np.ndarray:
    """Queries with zeros in the sphere coordinates: their inner products are unchanged."""
    return q if extra == 0 else np.ascontiguousarray(np.pad(q, ((0, 0), (0, extra))), dtype=np.float32)


def apply_search_params(faiss_index: Any, spec: IndexSpec) -> None:
    """Set the spec's search parameters on the FAISS index through ``faiss.ParameterSpace``."""
    space = import_faiss().ParameterSpace()
    for name, value in spec.params:
        if name in FAISS_PARAMS:
            space.set_index_parameter(faiss_index, FAISS_PARAMS[name], value)


def build_index(
    vectors: Any,
    ids: Any,
    spec: str | IndexSpec,
    similarity: Similarity = "dot",
    *,
    progress: bool | None = None,
    batch_size: int = 65_536,
    seed: int = 0,
) -> VectorIndex:
    """Index ``vectors`` (n, dim) under raw ``ids`` with the structure ``spec`` (inner product)."""
    faiss = import_faiss()
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    require(similarity in SIMILARITIES, f"similarity {similarity!r}: expected one of {', '.join(SIMILARITIES)}")
    x = as_matrix(vectors, "vectors")
    count, dim = x.shape
    require(count >= 1, "vectors: the corpus is empty")
    raw_ids = as_ids(ids, count)
    if similarity == "cosine":
        x = normalise(x)
    parsed = resolve_spec(parsed, count, dim, spec if isinstance(spec, str) else None)
    extra = parsed.extra_dims(similarity, dim)
    radius = float(np.sqrt(np.einsum("ij,ij->i", x, x).max())) if extra else None

    def indexed(rows: np.ndarray) -> np.ndarray:
        return to_sphere(rows, radius, extra) if radius is not None else np.ascontiguousarray(rows)

    index = faiss.index_factory(dim + extra, parsed.factory(sphere=extra > 0), faiss.METRIC_INNER_PRODUCT)
    if parsed.kind == "hnsw":
        index.hnsw.efConstruction = parsed.param("ef_construction")
    if not index.is_trained:
        # k-means cost grows with the sample: TRAIN_POINTS_PER_LIST vectors per list (and enough for
        # the pq codebooks), not FAISS's 256 per list.
        lists = parsed.nlist or 1
        want = max(lists * TRAIN_POINTS_PER_LIST, (2**parsed.pq_bits) * 256 if parsed.coding == "pq" else 0)
        sample = x if count <= want else x[np.sort(np.random.default_rng(seed).choice(count, want, replace=False))]
        index.train(indexed(sample))
    from tqdm.auto import tqdm

    show = progress if progress is not None else count >= PROGRESS_MIN_ITEMS
    with tqdm(total=count, desc=f"index {parsed}", unit="vec", disable=not show) as bar:
        for lo in range(0, count, batch_size):  # transformed batch by batch: no second copy of the corpus
            index.add(indexed(x[lo : lo + batch_size]))
            bar.update(min(batch_size, count - lo))
    apply_search_params(index, parsed)
    return VectorIndex(index, raw_ids, x, parsed, similarity, radius)


def set_search_params(index: VectorIndex, params: str | Mapping[str, int]) -> None:
    """Change search parameters in place, e.g. ``"ef_search=256"`` or ``{"nprobe": 32}``."""
    spec_text = f"{index.spec.structure()}:{params}" if isinstance(params, str) else str(index.spec)
    allowed = [n for n in allowed_params(index.spec.kind, index.spec.refine) if n not in BUILD_PARAMS]
    if isinstance(params, str):
        given = parse_params(params, spec_text, allowed)
    else:
        given = parse_params(",".join(f"{k}={v}" for k, v in params.items()), spec_text, allowed)
    if index.spec.nlist is not None and given.get("nprobe", 0) > index.spec.nlist:
        raise RecsysError(f"index spec {spec_text!r}: nprobe={given['nprobe']} exceeds the {index.spec.nlist} lists")
    merged = tuple((k, given.get(k, v)) for k, v in index.spec.params)
    index.spec = replace(index.spec, params=merged)
    apply_search_params(index.faiss_index, index.spec)


def search(
    index: VectorIndex,
    queries: Any,
    k: int,
    exclude: Sequence[Collection[Any]] | None = None,
    *,
    batch_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, raw ids), best first, of each query row; ``exclude[i]``: ids never returned for query i.

    Rows the index cannot fill (an approximate index may find fewer than ``k`` candidates once the
    exclusions are removed) end with score ``-inf`` and id ``-1`` (int ids) or ``""`` (str ids).
    """
    q = as_matrix(queries, "queries", index.dim)
    require(1 <= k <= index.count, f"k={k}: must be between 1 and the index's {index.count} items")
    require(batch_size >= 1, f"batch_size={batch_size}: must be positive")
    if index.similarity == "cosine":
        q = normalise(q)
    q = pad_queries(q, index.faiss_index.d - index.dim)
    n = len(q)
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    labels = np.full((n, k), -1, dtype=np.int64)
    if exclude is None:
        for lo in range(0, n, batch_size):
            d, i = index.faiss_index.search(q[lo : lo + batch_size], k)
            scores[lo : lo + batch_size], labels[lo : lo + batch_size] = d, i
    else:
        # Over-fetch and filter, not faiss's IDSelector: a selector applies to a whole search call,
        # so per-query exclusion sets would cost one FAISS call per query and lose the parallelism
        # across a batch (and HNSW still walks the excluded nodes). Fetching k + |exclusions| is
        # enough for an exact index (at most |exclusions| fetched items can be excluded); queries go
        # in batches sorted by exclusion size so one heavy user does not inflate a whole batch's fetch.
        require(len(exclude) == n, f"exclude: {len(exclude)} sets for {n} queries")
        positions = index.positions()
        banned = [np.fromiter((positions[i] for i in e if i in positions), dtype=np.int64) for e in exclude]
        sizes = np.array([len(b) for b in banned], dtype=np.int64)
        order = np.argsort(sizes, kind="stable")
        for lo in range(0, n, batch_size):
            rows = order[lo : lo + batch_size]
            fetch = int(min(k + sizes[rows].max(), index.count))
            d, i = index.faiss_index.search(q[rows], fetch)
            for j, r in enumerate(rows):
                keep = np.flatnonzero((i[j] >= 0) & ~np.isin(i[j], banned[r]))[:k]
                scores[r, : len(keep)], labels[r, : len(keep)] = d[j, keep], i[j, keep]
    missing = labels < 0
    scores[missing] = -np.inf
    ids = index.ids[np.where(missing, 0, labels)]
    if missing.any():
        ids[missing] = -1 if index.ids.dtype.kind == "i" else ""
    return scores, ids


def fingerprint_files(paths: Iterable[str | Path]) -> str:
    """SHA-256 over the names and contents of files (e.g. model weights and vocabularies), in order."""
    h = hashlib.sha256()
    for path in map(Path, paths):
        require(path.is_file(), f"fingerprint: {path} is not a file")
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def save_index(index: VectorIndex, directory: str | Path, fingerprint: str) -> Path:
    """Write the FAISS index, the vectors (Parquet: ``item``, ``vector`` list<float>) and the manifest (last).

    A write that fails (no space, a read-only or failing disk) is one RecsysError line naming the
    directory: FAISS raises RuntimeError and pyarrow its own errors, which no caller would recognise."""
    import pyarrow as pa

    require(isinstance(fingerprint, str) and fingerprint != "", "fingerprint: must be a non-empty string")
    out = Path(directory)
    try:
        return _write_index(index, out, fingerprint)
    except OSError as e:
        raise RecsysError(f"{out}: cannot write the vector index ({os_reason(e)})") from None
    except (RuntimeError, pa.ArrowException) as e:  # FAISS's message spans lines; its last one says why
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise RecsysError(f"{out}: cannot write the vector index ({reason})") from None


def _write_index(index: VectorIndex, out: Path, fingerprint: str) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    faiss = import_faiss()
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # a half-written directory has no manifest
    faiss.write_index(index.faiss_index, str(out / INDEX_FILE))
    values = pa.array(index.vectors.reshape(-1))
    if len(values) < 2**31:  # list<float>; past 2^31 values the offsets need large_list<float>
        vectors = pa.ListArray.from_arrays(pa.array(np.arange(0, len(values) + 1, index.dim, dtype=np.int32)), values)
    else:
        vectors = pa.LargeListArray.from_arrays(pa.array(np.arange(0, len(values) + 1, index.dim)), values)
    table = pa.table({"item": pa.array(index.ids), "vector": vectors})
    pq.write_table(table, out / VECTORS_FILE)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "spec": str(index.spec),
        "similarity": index.similarity,
        "metric": "inner_product",
        "vectors_normalized": index.similarity == "cosine",
        "dim": index.dim,
        "count": index.count,
        "indexed_dim": int(index.faiss_index.d),
        "sphere_radius": index.sphere_radius,
        "id_type": "int64" if index.ids.dtype.kind == "i" else "string",
        "fingerprint": fingerprint,
        "faiss_version": faiss.__version__,
        "files": checksums(out, [INDEX_FILE, VECTORS_FILE]),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _index_problem(path: Path) -> str | None:
    if not (path / MANIFEST_FILE).is_file():
        return f"no {MANIFEST_FILE}"
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return f"no readable {MANIFEST_FILE}"
    return None if isinstance(manifest, dict) and manifest.get("format") == FORMAT else f"no {FORMAT} manifest"


INDEX_OUTPUT = OutputKind("a vector index", is_dir=True, problem=_index_problem)
"""What ``recsys index --out`` may replace (with ``--overwrite``): a directory ``save_index`` wrote."""


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a saved index directory."""
    path = Path(directory) / MANIFEST_FILE
    require(path.is_file(), f"{directory}: not a vector index (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecsysError(f"{path}: not valid JSON ({e})") from None
    require(
        isinstance(manifest, dict) and manifest.get("format") == FORMAT,
        f"{path}: not a {FORMAT} manifest",
    )
    if manifest.get("version") != FORMAT_VERSION:
        hint = " (no file hashes): rebuild it with recsys index" if manifest.get("version") == 1 else ""
        raise RecsysError(f"{path}: format version {manifest.get('version')}, this code reads {FORMAT_VERSION}{hint}")
    return manifest


def load_index(directory: str | Path, expected_fingerprint: str) -> VectorIndex:
    """Load a saved index; refuse it unless it was built for ``expected_fingerprint``."""
    import pyarrow.parquet as pq

    faiss = import_faiss()
    root = Path(directory)
    manifest = read_manifest(root)
    if manifest.get("fingerprint") != expected_fingerprint:
        raise RecsysError(
            f"vector index {root} was built for fingerprint {manifest.get('fingerprint')}, "
            f"expected {expected_fingerprint}: rebuild it for this model"
        )
    files = manifest.get("files")
    require(
        isinstance(files, dict) and set(files) == {INDEX_FILE, VECTORS_FILE},
        f"{root / MANIFEST_FILE}: must list exactly {INDEX_FILE} and {VECTORS_FILE} with their hashes",
    )
    # every byte read below is the one the index was built with: another run's files, shuffled or
    # truncated Parquet rows are refused here instead of answering with other items
    verify_checksums(root, files, MANIFEST_FILE)
    try:
        spec = parse_spec(manifest["spec"])
        count, dim, indexed_dim = int(manifest["count"]), int(manifest["dim"]), int(manifest["indexed_dim"])
        similarity: Similarity = manifest["similarity"]
        id_type, radius = manifest["id_type"], manifest["sphere_radius"]
    except (KeyError, TypeError, ValueError) as e:
        raise RecsysError(f"{root / MANIFEST_FILE}: incomplete manifest ({type(e).__name__}: {e})") from None
    require(similarity in SIMILARITIES, f"{root}: unknown similarity {similarity!r} in the manifest")
    try:
        index = faiss.read_index(str(root / INDEX_FILE))
    except RuntimeError as e:  # FAISS's message spans lines; its last one says what went wrong
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise RecsysError(f"{root / INDEX_FILE}: unreadable FAISS index ({reason})") from None
    require(
        index.ntotal == count and index.d == indexed_dim,
        f"{root}: the FAISS index ({index.ntotal} x {index.d}) does not match its manifest ({count} x {indexed_dim})",
    )
    # The file's own structure, not only its hash: a manifest whose hash was rewritten over another
    # structure's file would search an HNSW graph as if it were exact, or fail deep in FAISS.
    expected = spec.factory(sphere=indexed_dim > dim)
    found, metrics = faiss_structure(index)
    if found != expected:
        raise RecsysError(
            f"{root / INDEX_FILE}: holds a FAISS {found} index, its manifest says {spec.structure()} "
            f"(FAISS {expected}): the files do not belong together; rebuild it with recsys index"
        )
    if spec.kind == "hnsw" and int(faiss.downcast_index(index).hnsw.efConstruction) != spec.param("ef_construction"):
        raise RecsysError(
            f"{root / INDEX_FILE}: an HNSW graph built with ef_construction="
            f"{faiss.downcast_index(index).hnsw.efConstruction}, its manifest says {spec}: the files do not "
            "belong together; rebuild it with recsys index"
        )
    if any(m != faiss.METRIC_INNER_PRODUCT for m in metrics):
        raise RecsysError(
            f"{root / INDEX_FILE}: the FAISS index does not use inner product; rebuild it with recsys index"
        )
    import pyarrow as pa

    try:
        table = pq.read_table(root / VECTORS_FILE, columns=["item", "vector"])
    except (pa.ArrowException, OSError) as e:
        raise RecsysError(f"{root / VECTORS_FILE}: unreadable ({(str(e).strip().splitlines() or [''])[0]})") from None
    require(table.num_rows == count, f"{root}: {table.num_rows} vectors in Parquet, the manifest says {count}")
    column = table.column("vector").combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    lengths = np.diff(column.offsets.to_numpy())
    require(bool((lengths == dim).all()), f"{root}: Parquet vectors are not all of dimension {dim}")
    ids = table.column("item").to_numpy()
    ids = ids.astype(np.int64) if id_type == "int64" else ids.astype(str)
    vectors = np.ascontiguousarray(values.reshape(count, dim), dtype=np.float32)
    loaded = VectorIndex(index, ids, vectors, spec, similarity, radius)
    try:
        apply_search_params(index, spec)
    except RuntimeError as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise RecsysError(f"{root}: the manifest's search parameters do not apply to the index ({reason})") from None
    return loaded


def faiss_structure(index: Any) -> tuple[str, list[int]]:
    """What a FAISS index is, as the ``faiss.index_factory`` string ``IndexSpec.factory`` gives (``Flat``,
    ``HNSW32``, ``IVF64,PQ8x4fs,RFlat``; another kind of index: its class name), and the metric of each
    part of it."""
    faiss = import_faiss()
    idx = faiss.downcast_index(index)
    metrics = [int(idx.metric_type)]
    refine = ""
    if isinstance(idx, faiss.IndexRefine):
        exact = faiss.downcast_index(idx.refine_index)
        if not isinstance(exact, faiss.IndexFlat):
            return f"{type(idx).__name__} over {type(exact).__name__}", metrics
        refine, idx = ",RFlat", faiss.downcast_index(idx.base_index)
        metrics += [int(exact.metric_type), int(idx.metric_type)]
    if not refine and isinstance(idx, faiss.IndexFlat):
        return "Flat", metrics
    if not refine and isinstance(idx, faiss.IndexHNSWFlat):
        return f"HNSW{idx.hnsw.nb_neighbors(1)}", metrics
    if isinstance(idx, faiss.IndexIVFFlat):
        coding = "Flat"
    elif isinstance(idx, faiss.IndexIVFScalarQuantizer) and idx.sq.qtype == faiss.ScalarQuantizer.QT_8bit:
        coding = "SQ8"
    elif isinstance(idx, faiss.IndexIVFPQFastScan):
        coding = f"PQ{idx.M}x{idx.nbits}fs"
    elif isinstance(idx, faiss.IndexIVFPQ) and type(idx) is faiss.IndexIVFPQ:
        coding = f"PQ{idx.pq.M}x{idx.pq.nbits}"
    else:
        return type(idx).__name__ + (" (refined)" if refine else ""), metrics
    return f"IVF{idx.nlist},{coding}{refine}", metrics
