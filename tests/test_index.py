"""The vector index: exact search equals brute force, HNSW recall, cosine, exclusions, save/load, bad input."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from core.checksums import sha256_file
from core.errors import RecsysError
from modules.index import (
    INDEX_FILE,
    MANIFEST_FILE,
    VECTORS_FILE,
    Similarity,
    VectorIndex,
    build_index,
    fingerprint_files,
    load_index,
    parse_spec,
    save_index,
    search,
    set_search_params,
)

DIM = 32
K = 10


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread() -> Iterator[None]:
    """Tiny indexes: one thread beats an OpenMP team that waits on a busy shared machine (5 s vs 60 s)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def tower(inputs: np.ndarray) -> np.ndarray:
    """A fixed random 2-layer MLP (the same for items and queries): structured, not uniform, vectors."""
    rng = np.random.default_rng(1234)
    w1 = rng.normal(size=(inputs.shape[1], 64)) / np.sqrt(inputs.shape[1])
    w2 = rng.normal(size=(64, DIM)) / 8
    return (np.tanh(inputs @ w1) @ w2).astype(np.float32)


def clustered(n: int, seed: int, clusters: int = 24, width: int = 16) -> np.ndarray:
    """The tower applied to inputs drawn around a few cluster centres (of uneven size)."""
    centres = np.random.default_rng(99).normal(size=(clusters, width)) * 2.5
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.ones(clusters))
    inputs = centres[rng.choice(clusters, n, p=weights)] + rng.normal(size=(n, width))
    return tower(inputs)


@pytest.fixture(scope="module")
def corpus() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4000 item vectors with string ids, and 300 queries from the same generator."""
    items = clustered(4000, seed=0)
    ids = np.array([f"item-{i}" for i in range(len(items))])
    return items, ids, clustered(300, seed=1)


def brute_force(items: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ items.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, top, axis=1), top


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found.tolist(), exact.tolist(), strict=True)]))


def one_line_error(excinfo: pytest.ExceptionInfo[RecsysError]) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def test_flat_equals_brute_force(corpus: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    items, ids, queries = corpus
    index = build_index(items, ids, "flat")
    scores, found = search(index, queries, K)
    want_scores, want = brute_force(items, queries, K + 1)
    np.testing.assert_allclose(scores, want_scores[:, :K], rtol=1e-5, atol=1e-5)
    untied = (want_scores[:, K - 1] - want_scores[:, K]) > 1e-5  # rows whose K-th item is not a tie
    assert untied.mean() > 0.9
    assert (found[untied] == ids[want[untied, :K]]).all()


@pytest.mark.parametrize(
    ("spec", "floor"),
    [("hnsw32", 0.95), ("ivf,flat:nprobe=8", 0.95), ("ivf,pq16x4fs,rflat:nprobe=8,k_factor=8", 0.9)],
)
def test_approximate_recall(corpus: tuple[np.ndarray, np.ndarray, np.ndarray], spec: str, floor: float) -> None:
    items, ids, queries = corpus
    exact = search(build_index(items, ids, "flat"), queries, K)[1]
    approx = search(build_index(items, ids, spec), queries, K)[1]
    assert recall(approx, exact) >= floor


@pytest.mark.parametrize("spec", ["hnsw16:ef_search=256", "ivf,flat", "ivf,pq16x4fs,rflat"])
def test_dot_vectors_are_searched_on_a_sphere(corpus: tuple[np.ndarray, np.ndarray, np.ndarray], spec: str) -> None:
    """Unequal norms: the extra coordinate puts every vector on one sphere; scores stay the dot products."""
    items, ids, queries = corpus
    items = items * np.random.default_rng(4).lognormal(0.0, 0.3, size=(len(items), 1)).astype(np.float32)
    index = build_index(items, ids, spec, "dot")
    extra = 2 if "pq16" in spec else 1  # pq16 over 32 dims: one more 2-wide sub-vector
    assert index.faiss_index.d == DIM + extra
    assert index.sphere_radius == pytest.approx(float(np.linalg.norm(items, axis=1).max()), rel=1e-6)
    scores, found = search(index, queries, K)
    position = {v: i for i, v in enumerate(ids.tolist())}
    rows = np.array([[position[i] for i in row] for row in found.tolist()])
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, items[rows]), rtol=1e-4, atol=1e-4)
    assert recall(found, search(build_index(items, ids, "flat"), queries, K)[1]) >= 0.95
    assert build_index(items, ids, spec, "cosine").faiss_index.d == DIM  # unit vectors: no transform
    assert build_index(items, ids, f"{spec}{',' if ':' in spec else ':'}sphere=0").faiss_index.d == DIM
    assert build_index(items, ids, "flat", "dot").faiss_index.d == DIM  # exact: no transform


def test_ivf_lists_follow_a_small_corpus(corpus: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    items, ids, _ = corpus
    index = build_index(items, ids, "ivf,flat:nprobe=64")
    assert index.spec.nlist == 64 and str(index.spec) == "ivf64,flat:nprobe=64,sphere=1"
    small = build_index(items[:500], ids[:500], "ivf,flat:nprobe=64")  # 500 // 39 = 12 lists at most
    assert small.spec.nlist == 8 and small.spec.param("nprobe") == 8
    with pytest.raises(RecsysError) as excinfo:
        build_index(items, ids, "ivf1024,flat")
    assert "index spec 'ivf1024,flat': 1024 lists" in one_line_error(excinfo) and "4000" in str(excinfo.value)


def test_cosine_normalises_vectors_and_queries(corpus: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    items, ids, queries = corpus
    scale = np.random.default_rng(3).uniform(0.1, 10.0, size=(len(items), 1)).astype(np.float32)
    index = build_index(items * scale, ids, "flat", "cosine")
    np.testing.assert_allclose(np.linalg.norm(index.vectors, axis=1), 1.0, rtol=1e-5)
    scores, found = search(index, queries * 7.0, K)
    unit = items / np.linalg.norm(items, axis=1, keepdims=True)
    want_scores, _ = brute_force(unit, queries / np.linalg.norm(queries, axis=1, keepdims=True), K)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    assert (scores <= 1.0 + 1e-5).all()
    # the unscaled corpus gives the same neighbours: norms no longer matter
    assert recall(search(build_index(items, ids, "flat", "cosine"), queries, K)[1], found) > 0.99
    # while the dot product does depend on them
    assert recall(search(build_index(items * scale, ids, "flat", "dot"), queries, K)[1], found) < 0.9


@pytest.mark.parametrize("spec", ["flat", "hnsw16", "ivf,flat:nprobe=8"])
def test_exclusion(corpus: tuple[np.ndarray, np.ndarray, np.ndarray], spec: str) -> None:
    items, ids, queries = corpus
    index = build_index(items, ids, spec)
    _, unfiltered = search(index, queries, K)
    rng = np.random.default_rng(5)
    # each query bans its own current top 5 plus a few random items; the sizes differ per query, and
    # ids outside the index are ignored
    exclude = [
        {*row[:5].tolist(), *ids[rng.choice(len(ids), rng.integers(0, 40))].tolist(), "not-an-item"}
        for row in unfiltered
    ]
    exclude[0] = set()
    scores, found = search(index, queries, K, exclude=exclude, batch_size=64)
    assert np.isfinite(scores).all() and (found != "").all()  # still K results each
    for row, banned in zip(found.tolist(), exclude, strict=True):
        assert not set(row) & banned and len(set(row)) == K
    assert (found[0] == unfiltered[0]).all()
    if spec == "flat":
        masked = queries @ items.T
        position = {v: i for i, v in enumerate(ids.tolist())}
        for r, banned in enumerate(exclude):
            masked[r, [position[i] for i in banned if i in position]] = -np.inf
        np.testing.assert_allclose(scores, -np.sort(-masked, axis=1)[:, :K], rtol=1e-5, atol=1e-5)


def test_exclusion_pads_when_the_corpus_runs_out() -> None:
    items = clustered(20, seed=2)
    index = build_index(items, np.arange(100, 120), "flat")
    scores, found = search(index, items[:2], 5, exclude=[set(range(100, 117)), set()])
    assert found.dtype == np.int64
    assert sorted(found[0, :3].tolist()) == [117, 118, 119] and (found[0, 3:] == -1).all()
    assert np.isinf(scores[0, 3:]).all() and np.isfinite(scores[1]).all()


def test_save_load_round_trip(tmp_path: Path, corpus: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    items, ids, queries = corpus
    cases: list[tuple[str, np.ndarray, Similarity]] = [
        ("hnsw16:ef_search=32", ids, "cosine"),
        ("ivf,pq8x4fs,rflat:nprobe=4,k_factor=2", np.arange(len(ids)), "dot"),
    ]
    for spec, item_ids, similarity in cases:
        index = build_index(items, item_ids, spec, similarity)
        directory = save_index(index, tmp_path / spec.split(":")[0], fingerprint="weights-abc")
        assert sorted(p.name for p in directory.iterdir()) == sorted([INDEX_FILE, MANIFEST_FILE, VECTORS_FILE])
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        assert manifest["spec"] == str(index.spec) and manifest["similarity"] == similarity
        assert manifest["indexed_dim"] == index.faiss_index.d and manifest["sphere_radius"] == index.sphere_radius
        assert (manifest["dim"], manifest["count"], manifest["fingerprint"]) == (DIM, len(items), "weights-abc")
        table = pq.read_table(directory / VECTORS_FILE)
        assert table.column_names == ["item", "vector"] and str(table.schema.field("vector").type) in {
            "list<element: float>",
            "list<item: float>",
        }
        np.testing.assert_array_equal(np.array(table.column("vector").to_pylist(), dtype=np.float32), index.vectors)
        loaded = load_index(directory, "weights-abc")
        assert loaded.spec == index.spec and loaded.similarity == similarity
        assert loaded.ids.dtype == item_ids.dtype and (loaded.ids == item_ids).all()
        for a, b in zip(search(index, queries, K), search(loaded, queries, K), strict=True):
            np.testing.assert_array_equal(a, b)


def test_fingerprint_mismatch_is_refused(tmp_path: Path, corpus: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    items, ids, _ = corpus
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights v1")
    built_for = fingerprint_files([weights])
    save_index(build_index(items, ids, "flat"), tmp_path / "index", built_for)
    weights.write_bytes(b"weights v2")
    with pytest.raises(RecsysError) as excinfo:
        load_index(tmp_path / "index", fingerprint_files([weights]))
    assert "rebuild" in one_line_error(excinfo)
    with pytest.raises(RecsysError) as excinfo:
        load_index(tmp_path / "nothing-here", "x")
    assert "no manifest.json" in one_line_error(excinfo)
    (tmp_path / "index" / INDEX_FILE).write_bytes(b"not an index")
    with pytest.raises(RecsysError) as excinfo:
        load_index(tmp_path / "index", built_for)
    assert "SHA-256 differs" in one_line_error(excinfo)
    manifest = json.loads((tmp_path / "index" / MANIFEST_FILE).read_text())  # a manifest that vouches for it
    manifest["files"][INDEX_FILE] = sha256_file(tmp_path / "index" / INDEX_FILE)
    (tmp_path / "index" / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(RecsysError) as excinfo:
        load_index(tmp_path / "index", built_for)
    assert "unreadable FAISS index" in one_line_error(excinfo)


def _shuffle_rows(index: Path, other: Path) -> None:
    table = pq.read_table(index / VECTORS_FILE)
    pq.write_table(table.take(np.random.default_rng(0).permutation(table.num_rows)), index / VECTORS_FILE)


def _other_runs_files(index: Path, other: Path) -> None:
    for name in (INDEX_FILE, VECTORS_FILE):
        shutil.copy(other / name, index / name)


def _truncate_vectors(index: Path, other: Path) -> None:
    data = (index / VECTORS_FILE).read_bytes()
    (index / VECTORS_FILE).write_bytes(data[: len(data) // 2])


def _delete_vectors(index: Path, other: Path) -> None:
    (index / VECTORS_FILE).unlink()


def _manifest_version_1(index: Path, other: Path) -> None:
    manifest = json.loads((index / MANIFEST_FILE).read_text())
    manifest.update(version=1, files={"index": INDEX_FILE, "vectors": VECTORS_FILE})
    (index / MANIFEST_FILE).write_text(json.dumps(manifest))


TAMPERED = {
    "shuffled vector rows": (_shuffle_rows, "vectors.parquet: its SHA-256 differs"),
    "another index's files under this manifest": (_other_runs_files, "index.faiss: its SHA-256 differs"),
    "truncated vectors.parquet": (_truncate_vectors, "vectors.parquet: its SHA-256 differs"),
    "missing vectors.parquet": (_delete_vectors, "vectors.parquet: missing"),
    "an index written before file hashes": (_manifest_version_1, "rebuild it with recsys index"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_every_index_file_is_checked_against_its_manifest(
    case: str, tmp_path: Path, corpus: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    """An index directory is read only if each file has the SHA-256 its manifest lists: reordered,
    swapped or truncated files were accepted (and answered with other items) or crashed in pyarrow."""
    items, ids, _ = corpus
    index, other = tmp_path / "index", tmp_path / "other"
    save_index(build_index(items, ids, "flat"), index, "model-a")
    save_index(build_index(items[::-1].copy(), ids[::-1].copy(), "flat"), other, "model-b")  # same size, other order
    assert load_index(index, "model-a").count == len(items)
    tamper, message = TAMPERED[case]
    tamper(index, other)
    with pytest.raises(RecsysError) as excinfo:
        load_index(index, "model-a")
    assert message in one_line_error(excinfo)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("", "empty"),
        ("lsh", "unknown structure"),
        ("hnsw", "needs its M"),
        ("hnsw32,flat", "no coding"),
        ("ivf1024", "needs a coding"),
        ("ivf1024,opq", "unknown ivf coding"),
        ("ivf1024,flat,rflat", "already exact"),
        ("ivf1024,pq32x8fs", "4-bit"),
        ("ivf16,flat:nprobe=32", "exceeds"),
        ("flat:ef_search=10", "no parameters"),
        ("hnsw32:nprobe=4", "unknown parameter"),
        ("hnsw32:ef_search=-1", "positive integer"),
        ("hnsw32:ef_search=1.5", "positive integer"),
        ("hnsw32:ef_search", "name=value"),
        ("ivf64,sq8:k_factor=4", "unknown parameter"),
        ("hnsw32:ef_search=8,ef_search=16", "twice"),
        ("hnsw32:sphere=2", "0 or 1"),
        ("flat:sphere=1", "no parameters"),
    ],
)
def test_bad_specs_are_refused(spec: str, problem: str) -> None:
    with pytest.raises(RecsysError) as excinfo:
        parse_spec(spec)
    message = one_line_error(excinfo)
    assert f"index spec {spec!r}" in message and problem in message


def test_spec_canonical_form() -> None:
    assert str(parse_spec("HNSW32")) == "hnsw32:ef_construction=40,ef_search=64,sphere=1"
    assert str(parse_spec("ivf16,sq8,rflat:sphere=0")) == "ivf16,sq8,rflat:nprobe=16,k_factor=8,sphere=0"
    spec = parse_spec("ivf1024,pq32x4fs,rflat:nprobe=32,k_factor=4")
    assert spec.factory() == "IVF1024,PQ32x4fs,RFlat" and parse_spec(str(spec)) == spec


def test_corpus_dependent_specs_are_refused(corpus: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    items, ids, _ = corpus
    for spec, problem in [("ivf,pq5", "multiple of 5"), ("ivf,pq8x8", "need at least 9984 vectors")]:
        with pytest.raises(RecsysError) as excinfo:
            build_index(items, ids, spec)
        assert problem in one_line_error(excinfo)


def test_search_params_change_in_place(corpus: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    items, ids, _ = corpus
    index = build_index(items, ids, "hnsw16:ef_search=16")
    set_search_params(index, "ef_search=200")
    assert index.faiss_index.hnsw.efSearch == 200 and index.spec.param("ef_search") == 200
    with pytest.raises(RecsysError) as excinfo:
        set_search_params(index, "ef_construction=80")
    one_line_error(excinfo)
    ivf = build_index(items, ids, "ivf,sq8,rflat")
    set_search_params(ivf, {"nprobe": 3, "k_factor": 7})
    assert ivf.faiss_index.k_factor == 7 and str(ivf.spec) == "ivf64,sq8,rflat:nprobe=3,k_factor=7,sphere=1"


@pytest.mark.parametrize(
    ("vectors", "ids", "problem"),
    [
        (np.zeros((3, 4)), ["a", "b", "a"], "duplicates"),
        (np.zeros((3, 4)), ["a", "b"], "2 ids for 3 vectors"),
        (np.full((2, 4), np.nan), [1, 2], "NaN"),
        (np.zeros(4), [1], "2-D"),
        (np.zeros((2, 4)), [-1, 2], "non-negative"),
        (np.zeros((2, 4)), [1.5, 2.5], "integers or strings"),
    ],
)
def test_bad_inputs_are_refused(vectors: np.ndarray, ids: list[object], problem: str) -> None:
    with pytest.raises(RecsysError) as excinfo:
        build_index(vectors, ids, "flat")
    assert problem in one_line_error(excinfo)


def test_bad_queries_are_refused(corpus: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    items, ids, queries = corpus
    index: VectorIndex = build_index(items, ids, "flat", "cosine")
    for q, k, problem in [(queries[:, :8], K, "dimension 8"), (queries, 0, "k=0"), (queries, 10**6, "k=1000000")]:
        with pytest.raises(RecsysError) as excinfo:
            search(index, q, k)
        assert problem in one_line_error(excinfo)
    with pytest.raises(RecsysError) as excinfo:
        search(index, queries, K, exclude=[set()])
    assert "1 sets for 300 queries" in one_line_error(excinfo)
