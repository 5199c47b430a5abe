"""The vector database (issue 23): `recsys index --store` publishes a run's item vectors to Milvus (Milvus
Lite embedded, and Milvus Lite's gRPC server started here on 127.0.0.1, the client path a Milvus cluster
takes), `recommend` / `package` / `--all-users` retrieve from it with the same items as the FAISS index,
`--filter`, `--add-items` / `--remove-items`, the alias swap under a killed publish, and the refusals
(one line each, no token anywhere)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import shrink, tiny_prepare
from test_funnel import Runs, one_line, train_runs

from app.cli import main
from cluster.local import free_port

pytestmark = pytest.mark.slow  # trains three tiny runs and starts Milvus Lite servers (CI runs it: -m "")
ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-token-xyz"
USERS = ["1", "2", "3", "5", "8", "13"]


@dataclass
class Stores:
    runs: Runs
    db: str
    """Milvus Lite embedded: a .db data directory (opened by this process)."""
    http: str
    """Milvus Lite's gRPC server on 127.0.0.1, started by the fixture."""
    work: Path


SERVER = """
import base64, sys
from concurrent import futures
import grpc
from pymilvus.grpc_gen import milvus_pb2_grpc
from milvus_lite.adapter.grpc.servicer import MilvusServicer
from milvus_lite.db import MilvusLite

data, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]

class Auth(grpc.ServerInterceptor):  # what a Milvus server with authentication on does to a wrong token
    def intercept_service(self, continuation, details):
        got = dict(details.invocation_metadata).get("authorization", "")
        if token and got != base64.b64encode(token.encode()).decode():
            def deny(request, context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "auth check failure, please check token")
            return grpc.unary_unary_rpc_method_handler(deny)
        return continuation(details)

server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[Auth()] if token else [])
milvus_pb2_grpc.add_MilvusServiceServicer_to_server(MilvusServicer(MilvusLite(data)), server)
server.add_insecure_port(f"127.0.0.1:{port}")
server.start()
server.wait_for_termination()
"""


def start_server(data: Path, log: Path, token: str = "") -> tuple[subprocess.Popen[bytes], str]:
    """A Milvus Lite gRPC server on 127.0.0.1 (``python -m milvus_lite server --host 127.0.0.1``; with
    ``token``, the same servicer behind an authentication check)."""
    port = free_port()
    if token:
        cmd = [sys.executable, "-c", SERVER, str(data), str(port), token]
    else:
        cmd = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data), "--host", "127.0.0.1"]
        cmd += ["--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-2000:]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"milvus-lite server did not listen: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def stores(ml_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stores]:
    work = tmp_path_factory.mktemp("store")
    runs = train_runs(ml_dataset, work, other=False)
    proc, url = start_server(work / "served", work / "server.log")
    try:
        yield Stores(runs, str(work / "items.db"), url, work)
    finally:
        stop(proc)


def cli(capsys: pytest.CaptureFixture[str], runs: Runs, *args: str) -> tuple[int, str, str]:
    code = main([*args, "--tracking-uri", runs.tracking])
    out, err = capsys.readouterr()
    return code, out, err


def table(out: str) -> pd.DataFrame:
    """The printed recommendation table as rows (user, rank, item, score, source)."""
    rows = [line.split() for line in out.strip().splitlines()[1:]]
    return pd.DataFrame([r[:5] for r in rows], columns=["user", "rank", "item", "score", "source"])


def client(uri: str) -> Any:
    from pymilvus import MilvusClient

    return MilvusClient(uri=uri)


def test_published_store_recommends_the_same_items_as_the_flat_index(
    stores: Stores, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Embedded and served: `index --store` then `recommend --store` gives the FAISS index's items; the
    run records the store without its token."""
    runs = stores.runs
    monkeypatch.setenv("RECSYS_MILVUS_TOKEN", TOKEN)  # Milvus Lite takes any token: it must show nowhere
    base = ["recommend", "--retrieval", runs.retrieval, "--ranking", runs.ranking, "--user", *USERS, "--k", "10"]
    code, out, err = cli(capsys, runs, *base)
    assert code == 0, err
    flat = table(out)
    for uri in (stores.db, stores.http):
        code, out, err = cli(capsys, runs, "index", "--run-id", runs.retrieval, "--store", uri)
        assert code == 0, err
        assert "alias recsys_items points at it" in out and TOKEN not in out + err
        code, out, err = cli(capsys, runs, *base, "--store", uri)
        assert code == 0, err
        got = table(out)
        assert got.source.eq("model").all() and len(got) == 10 * len(USERS)
        assert got[["user", "rank", "item"]].equals(flat[["user", "rank", "item"]]), (uri, got, flat)
        np.testing.assert_allclose(got.score.astype(float), flat.score.astype(float), atol=1e-3)
    from mlflow.tracking import MlflowClient

    run = MlflowClient(runs.tracking).get_run(runs.retrieval)
    assert run.data.tags["recsys.store.uri"] == stores.http  # the last publish
    assert run.data.tags["recsys.store.alias"] == "recsys_items"
    assert run.data.tags["recsys.store.collection"].startswith("recsys_items_")
    recorded = " ".join(f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items())
    assert TOKEN not in recorded


def test_filter_gives_the_same_items_in_the_store_and_after_faiss(
    stores: Stores, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = stores.runs
    assert cli(capsys, runs, "index", "--run-id", runs.retrieval, "--store", stores.http)[0] == 0
    from app.bundle import assemble_bundle, load_bundle
    from app.stages import read_item_vocabs
    from modules.item_attributes import item_attributes

    loaded = load_bundle(assemble_bundle(runs.retrieval, None, stores.work / "bundle-filter", runs.tracking))
    rec = loaded.recommender
    attrs = item_attributes(
        rec.retrieval, read_item_vocabs(stores.work / "bundle-filter" / "retrieval", rec.retrieval.meta)
    )
    years = np.asarray(attrs.columns["item_year"])
    cut = float(np.median(years))
    genre = pd.Series([g for gs in attrs.columns["item_genres"] for g in gs]).value_counts().index[0]
    expression = f'item_year >= {cut} and ARRAY_CONTAINS(item_genres, "{genre}")'
    allowed = {
        i for i, y, g in zip(attrs.ids, years, attrs.columns["item_genres"], strict=True) if y >= cut and genre in g
    }
    base = ["recommend", "--retrieval", runs.retrieval, "--user", *USERS, "--k", "5", "--filter", expression]
    code, out, err = cli(capsys, runs, *base)
    assert code == 0, err
    faiss = table(out)
    code, out, err = cli(capsys, runs, *base, "--store", stores.http)
    assert code == 0, err
    store = table(out)
    assert len(faiss) > 0 and set(faiss.item) <= allowed and faiss.source.eq("model").all()
    assert store[["user", "rank", "item"]].equals(faiss[["user", "rank", "item"]])


def test_package_and_all_users_with_the_store_answer_with_the_same_items(
    stores: Stores, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import mlflow

    from app.serving import predict_frame

    runs = stores.runs
    assert cli(capsys, runs, "index", "--run-id", runs.retrieval, "--store", stores.http)[0] == 0
    code, out, err = cli(
        capsys, runs, "package", "--retrieval", runs.retrieval, "--ranking", runs.ranking, "--store", stores.http
    )
    assert code == 0, err
    uri = out.split("(")[1].split(")")[0]
    mlflow.set_tracking_uri(runs.tracking)
    model = mlflow.pyfunc.load_model(uri)  # the served model's own load_context: it opens the store
    request = pd.DataFrame({"user": USERS[:3], "k": [10, 10, 10]})
    served = model.predict(request, params={"candidates": 200})
    from app.bundle import assemble_bundle, load_bundle

    local = load_bundle(assemble_bundle(runs.retrieval, runs.ranking, tmp_path / "bundle", runs.tracking))
    assert type(local.recommender.source).__name__ == "FaissSource"
    faiss = predict_frame(local.recommender, request, 200, time.monotonic() + 60)
    assert [list(x) for x in served["items"]] == [list(x) for x in faiss["items"]]
    # the batch engine's workers retrieve from it too
    outs = {}
    for name, extra in (("faiss", []), ("store", ["--store", stores.http])):
        out_dir = tmp_path / name
        args = ["recommend", "--retrieval", runs.retrieval, "--all-users", "--out", str(out_dir), *extra]
        code, out, err = cli(capsys, runs, *args)
        assert code == 0, err
        outs[name] = pd.read_parquet(out_dir).sort_values(["user", "rank"]).reset_index(drop=True)
    assert outs["store"][["user", "rank", "item"]].equals(outs["faiss"][["user", "rank", "item"]])


def test_killed_publish_leaves_the_alias_and_keep_prunes(stores: Stores, capsys: pytest.CaptureFixture[str]) -> None:
    runs = stores.runs
    args = ["index", "--run-id", runs.retrieval, "--store", stores.http, "--alias", "killed", "--keep", "2"]
    assert cli(capsys, runs, *args)[0] == 0
    milvus = client(stores.http)
    before = milvus.describe_alias("killed")["collection_name"]
    names = set(milvus.list_collections())
    env = {**os.environ, "RECSYS_STORE_BATCH_DELAY_S": "120", "PYTHONPATH": str(ROOT)}
    cmd = [str(Path(sys.executable).parent / "recsys"), *args, "--tracking-uri", runs.tracking]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not set(milvus.list_collections()) - names:  # the new collection is being written
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.3)
        time.sleep(1.0)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    half = (set(milvus.list_collections()) - names).pop()
    assert milvus.describe_alias("killed")["collection_name"] == before  # readers still get the old collection
    code, out, err = cli(
        capsys,
        runs,
        "recommend",
        "--retrieval",
        runs.retrieval,
        "--user",
        "1",
        "--store",
        stores.http,
        "--alias",
        "killed",
    )
    assert code == 0 and table(out).source.eq("model").all(), err
    assert cli(capsys, runs, *args)[0] == 0  # re-running completes, and drops the half-built one
    after = milvus.describe_alias("killed")["collection_name"]
    left = {n for n in milvus.list_collections() if n.startswith("killed_")}
    assert after not in (before, half) and half not in left and left == {before, after}
    assert cli(capsys, runs, *args[:-1], "1")[0] == 0  # --keep 1: only the aliased one stays
    assert {n for n in milvus.list_collections() if n.startswith("killed_")} == {
        milvus.describe_alias("killed")["collection_name"]
    }


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """A tiny two-tower trained on synthetic-retrieval (planted factors; item side features: category,
    tags, year)."""
    from app.train import run_training
    from datamodules.prepare import prepare

    work = tmp_path_factory.mktemp("planted")
    data = work / "data"
    prepare(tiny_prepare(data, "synthetic-retrieval", rows=3000))
    cfg = shrink("two-tower-synthetic", data, work, "--max-epochs=3", tracking=True)
    run = str(run_training(cfg)["run_id"])
    return Runs(f"sqlite:///{work}/mlflow.db", run, "", "", data, work)


def test_added_item_is_recommended_to_the_user_closest_to_it(
    planted: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new item from its side features only (embedded with the id out of vocabulary) is returned by
    `recommend --store` to the user whose query vector scores it highest against their own top 10."""
    from app.bundle import assemble_bundle, load_bundle
    from app.stages import read_item_vocabs
    from modules.item_attributes import new_items

    store = str(tmp_path / "planted.db")
    assert cli(capsys, planted, "index", "--run-id", planted.retrieval, "--store", store)[0] == 0
    rec = load_bundle(assemble_bundle(planted.retrieval, None, tmp_path / "bundle", planted.tracking)).recommender
    vocabs = read_item_vocabs(tmp_path / "bundle" / "retrieval", rec.retrieval.meta)
    # candidate new items: the side features (category, tags, year: drawn from the planted factors) of
    # every trained item, under new ids; the one some user's query vector is closest to is added
    from modules.item_attributes import item_attributes

    attrs = item_attributes(rec.retrieval, vocabs)
    options = pd.DataFrame(
        {
            "item": [f"new-{i}" for i in attrs.ids],
            "item_category": attrs.columns["item_category"],
            "item_tags": ["|".join(t) for t in attrs.columns["item_tags"]],
            "item_year": [str(y) for y in attrs.columns["item_year"]],
        }
    )
    vectors = new_items(rec.retrieval, vocabs, options, "options").vectors
    users = rec.retrieval.user_vocab
    queries = rec.retrieval.embed("user", rec.retrieval.user_index(users))
    found = rec.candidates(queries, [rec.seen.get(int(u)) for u in rec.retrieval.user_index(users)], 10)
    if rec.retrieval.arch.similarity == "cosine":
        from modules.index import normalise

        queries, vectors = normalise(queries), normalise(vectors)
    margin = queries @ vectors.T - found.scores[:, -1:]  # (users, options): above the user's own 10th
    u, o = np.unravel_index(int(np.argmax(margin)), margin.shape)
    assert margin[u, o] > 0
    user = users[int(u)]
    new = options.iloc[[int(o)]].assign(item="new-item")
    path = tmp_path / "new.csv"
    new.to_csv(path, index=False)
    code, out, err = cli(
        capsys, planted, "index", "--run-id", planted.retrieval, "--store", store, "--add-items", str(path)
    )
    assert code == 0, err
    args = ["recommend", "--retrieval", planted.retrieval, "--user", user, "--store", store, "--k", "10"]
    code, out, err = cli(capsys, planted, *args)
    assert code == 0 and "new-item" in table(out).item.tolist(), out + err
    milvus = client(store)
    origin = milvus.query("recsys_items", filter='item == "new-item"', output_fields=["origin"])
    assert origin[0]["origin"] == "added"
    code, out, err = cli(
        capsys, planted, "index", "--run-id", planted.retrieval, "--store", store, "--remove-items", "new-item"
    )
    assert code == 0 and "removed 1 of 1" in out, err
    code, out, err = cli(capsys, planted, *args)
    assert code == 0 and "new-item" not in out
    # features that do not fit the run's schema: one line each, nothing written
    for frame, says in (
        (new.assign(colour="red"), "unknown column(s) colour"),
        (new.drop(columns=["item_tags"]), "missing column(s) item_tags"),
        (new.assign(item_category="no-such-category"), "is not in the run's vocabulary"),
        (new.assign(item_year="soon"), "is not a finite number"),
        (new.assign(item=rec.retrieval.item_vocab[0]), "is one the run trained on"),
    ):
        frame.to_csv(path, index=False)
        code, out, err = cli(
            capsys, planted, "index", "--run-id", planted.retrieval, "--store", store, "--add-items", str(path)
        )
        assert code != 0 and says in one_line(err), err
    milvus.close()


def test_bad_inputs_are_one_line_each(
    stores: Stores, planted: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = stores.runs
    recommend = ["recommend", "--retrieval", runs.retrieval, "--user", "1"]
    index = ["index", "--run-id", runs.retrieval]
    # a collection of another run (and its dimension) behind the alias
    other = str(tmp_path / "other.db")
    assert cli(capsys, planted, "index", "--run-id", planted.retrieval, "--store", other)[0] == 0
    # an alias pointing at a collection recsys did not publish
    from pymilvus import DataType

    milvus = client(stores.http)
    schema = milvus.create_schema(auto_id=False)
    schema.add_field("pk", DataType.INT64, is_primary=True)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
    params = milvus.prepare_index_params()
    params.add_index("v", index_type="FLAT", metric_type="L2")
    if "someone_elses" not in milvus.list_collections():
        milvus.create_collection("someone_elses", schema=schema, index_params=params)
        milvus.create_alias(collection_name="someone_elses", alias="theirs")
    assert cli(capsys, runs, *index, "--store", stores.http)[0] == 0
    token_proc, token_url = start_server(tmp_path / "auth", tmp_path / "auth.log", token="right-token")
    dead = f"http://127.0.0.1:{free_port()}"
    try:
        monkeypatch.setenv("RECSYS_MILVUS_TOKEN", TOKEN)
        cases = [
            ([*recommend, "--store", dead], "cannot connect"),
            ([*index, "--store", dead], "cannot connect"),
            ([*index, "--store", token_url], "refused the token"),
            ([*recommend, "--store", other], f"published from run {planted.retrieval}"),
            ([*index, "--store", stores.http, "--alias", "theirs"], "which recsys index did not publish"),
            ([*recommend, "--store", stores.http, "--alias", "theirs"], "which recsys index did not publish"),
            ([*recommend, "--store", stores.http, "--alias", "nothing_here"], "no alias nothing_here"),
            ([*recommend, "--store", stores.http, "--filter", "item_year >>= 3"], "--filter"),
            ([*recommend, "--filter", "item_year >>= 3"], "--filter"),
            ([*recommend, "--filter", "colour == 'red'"], "--filter"),
            ([*recommend, "--store", "ftp://host/x"], "expected PATH.db"),
            ([*recommend, "--store", "http://user:pw@127.0.0.1:1"], "put no credentials in the URI"),
            ([*index, "--store", stores.http, "--keep", "0"], "--keep 0"),
            ([*index, "--store", stores.http, "--alias", "1bad-name"], "--alias"),
            ([*index, "--store", stores.http, "--index", "ivf,pq8x4fs,rflat"], "rflat"),
            ([*index, "--add-items", "x.csv"], "pass --store URI"),
            ([*recommend, "--alias", "x"], "go with --store"),
            ([*index, "--store", str(tmp_path / "no" / "such.db")], "does not exist"),
        ]
        for args, says in cases:
            code, out, err = cli(capsys, runs, *args)
            line = one_line(err)
            assert code != 0 and says in line, (args, err)
            assert TOKEN not in out + err and "right-token" not in out + err
    finally:
        stop(token_proc)
    assert milvus.describe_alias("recsys_items")["collection_name"].startswith("recsys_items_")  # untouched
    milvus.close()
