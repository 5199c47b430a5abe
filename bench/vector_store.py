"""The vector store against the in-process index: recall@10 against exact search and queries/s, single and
batched, for FAISS in process, Milvus Lite embedded and Milvus Lite served (gRPC on 127.0.0.1), on the
same item vectors in one run.

    .venv/bin/python -m bench.vector_store --work DIR [--items 1000000] [--movielens-run RUN --tracking-uri URI]

Corpora: the item tower's vectors of a MovieLens two-tower run (``--movielens-run``: e.g. the one
``make demo`` trains, in ``sqlite:///mlflow.db``; its user tower's vectors are the queries), and the
planted item factors of the synthetic-retrieval generator at ``--items`` items (its user factors are
the queries). Each engine is built from the same float32 vectors with the same spec (``--spec``, an
IVF by default; exact FAISS is the ground truth), through recsys's own code: ``modules.index`` and
``modules.vector_store`` (publish, then ``MilvusStore.search``). Printed: one Markdown table per corpus
and the machine's load average before and after; docs/VECTOR_STORE.md holds one run's output.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cluster.local import free_port
from modules.index import build_index, parse_spec, resolve_spec, search
from modules.vector_store import Attributes, CollectionInfo, MilvusStore, StoreConfig, collection_name, publish

K = 10


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each query's exact top-K found."""
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found.tolist(), exact.tolist(), strict=True)]))


def rates(search_fn: Any, queries: np.ndarray, single: int, batch: int) -> tuple[np.ndarray, float, float]:
    """(ids of every query, single queries/s over the first ``single``, batched queries/s)."""
    start = time.perf_counter()
    for q in queries[:single]:
        search_fn(q[None, :])
    single_qps = single / (time.perf_counter() - start)
    start = time.perf_counter()
    found = [search_fn(queries[lo : lo + batch]) for lo in range(0, len(queries), batch)]
    batched_qps = len(queries) / (time.perf_counter() - start)
    return np.concatenate(found), single_qps, batched_qps


def milvus(uri: str, vectors: np.ndarray, ids: np.ndarray, spec: Any, tag: str) -> tuple[MilvusStore, float]:
    """The vectors published through ``modules.vector_store.publish``: (store, seconds to build)."""
    import datetime

    cfg = StoreConfig(uri, alias=f"bench_{tag}", keep=1)
    now = datetime.datetime.now(datetime.UTC)
    fingerprint = f"bench{tag}".ljust(16, "0")
    dim = vectors.shape[1]
    info = CollectionInfo(
        collection_name(cfg.alias, "bench", fingerprint, now), "bench", fingerprint, str(spec), "dot", dim, dim, None,
        {}, cfg.alias, now.isoformat(),
    )  # fmt: skip
    start = time.perf_counter()
    publish(cfg, info, vectors, ids, Attributes(ids, {}, {}), spec, progress=True)
    built = time.perf_counter() - start
    return MilvusStore.open(cfg, fingerprint, dim, "bench"), built


def bench_corpus(
    name: str, vectors: np.ndarray, queries: np.ndarray, spec_text: str, args: argparse.Namespace, served: str
) -> list[str]:
    """Rows of the Markdown table for one corpus."""
    ids = np.array([f"i{i}" for i in range(len(vectors))])
    print(f"[{name}] {len(vectors):,} items x {vectors.shape[1]}, {len(queries):,} queries", file=sys.stderr)
    exact = build_index(vectors, ids, "flat")
    truth = search(exact, queries, K)[1]
    spec = resolve_spec(parse_spec(spec_text), len(vectors), vectors.shape[1])
    rows = []
    start = time.perf_counter()
    approx = build_index(vectors, ids, spec, progress=True)
    built = time.perf_counter() - start
    engines: list[tuple[str, Any, float]] = [
        ("FAISS in process, exact (flat)", lambda q: search(exact, q, K)[1], 0.0),
        (f"FAISS in process, {spec}", lambda q: search(approx, q, K)[1], built),
    ]
    work = Path(args.work)
    for label, uri in (("Milvus Lite embedded (.db)", str(work / f"{name}.db")), ("Milvus Lite served", served)):
        store, seconds = milvus(uri, vectors, ids, spec, name.replace("-", "_"))
        engines.append((f"{label}, {spec}", lambda q, s=store: s.search(q, K)[1], seconds))
    for label, fn, seconds in engines:
        found, single, batched = rates(fn, queries, min(args.single, len(queries)), args.batch)
        got, one = recall(found, truth), f"{single:,.0f}" if single >= 10 else f"{single:.2f}"
        rows.append(f"| {name} | {label} | {got:.3f} | {one} | {batched:,.0f} | {seconds:.1f} |")
        print(rows[-1], file=sys.stderr)
    return rows


def movielens_vectors(run: str, tracking_uri: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(item vectors, user vectors) of a two-tower run."""
    from app.stages import fetch_stage, load_stage
    from modules.funnel import item_vectors

    with tempfile.TemporaryDirectory() as tmp:
        stage = load_stage(fetch_stage(run, tracking_uri, Path(tmp) / "stage", "--movielens-run", with_pairs=False))
        _, items = item_vectors(stage)
        users = stage.embed("user", np.arange(1, len(stage.user_vocab) + 1))
    return items, users


def synthetic_vectors(items: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(item factors, user factors) of the synthetic-retrieval generator (``datamodules.synthetic_retrieval``)."""
    from datamodules.config import PrepareConfig, SyntheticConfig
    from datamodules.synthetic_retrieval import RetrievalWorld

    cfg = PrepareConfig(
        dataset="synthetic-retrieval", out="unused", rows=max(items, queries * 40), seed=seed,
        synthetic=SyntheticConfig(items=items, users=queries),
    )  # fmt: skip
    world = RetrievalWorld.create(cfg)
    users = np.concatenate([world.user_block(k).factors for k in range(world.n_blocks)])[:queries]
    return np.ascontiguousarray(world.item_factors, np.float32), np.ascontiguousarray(users, np.float32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], prog="python -m bench.vector_store")
    parser.add_argument("--work", required=True, help="scratch directory (the Milvus data goes here)")
    parser.add_argument("--items", type=int, default=1_000_000, help="synthetic-retrieval items")
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--single", type=int, default=200, help="queries timed one per call")
    parser.add_argument("--batch", type=int, default=1_000, help="queries per batched call")
    parser.add_argument("--spec", default="ivf,flat", help="the approximate index, every engine (recsys spec)")
    parser.add_argument("--movielens-run", default=None, help="a MovieLens two-tower run (skipped when absent)")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    load_before = os.getloadavg()
    port = free_port()
    log = (work / "server.log").open("w")
    cmd = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(work / "served")]
    server = subprocess.Popen(
        [*cmd, "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    rows: list[str] = []
    try:
        time.sleep(3)
        served = f"http://127.0.0.1:{port}"
        if args.movielens_run:
            items, users = movielens_vectors(args.movielens_run, args.tracking_uri)
            pick = np.random.default_rng(args.seed).choice(len(users), min(args.queries, len(users)), replace=False)
            rows += bench_corpus("movielens", items, users[pick], "hnsw32", args, served)
        items, users = synthetic_vectors(args.items, args.queries, args.seed)
        rows += bench_corpus(f"synthetic-{args.items // 1000}k", items, users, args.spec, args, served)
    finally:
        server.terminate()
        server.wait(30)
    print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}; after: ", end="")
    after = os.getloadavg()
    print(f"{after[0]:.2f} {after[1]:.2f} {after[2]:.2f}; {os.cpu_count()} CPUs")
    print("| corpus | engine | recall@10 | single q/s | batched q/s | build s |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
