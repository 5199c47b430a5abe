"""Issue 24, inference: an index file of another structure under a rewritten manifest, a run whose
dataset was prepared again in place, a full disk at every write, registry names, control characters in
ids, empty and exhausted histories, and request bodies the scoring server cannot read: each one line.

One tiny two-tower run on a private copy of the MovieLens fixture serves every test here."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import shrink, tiny_prepare

from app.cli import main
from core.checksums import sha256_file

ESC, BEL = "\x1b", "\x07"


@dataclasses.dataclass
class Env:
    tracking: str
    run: str
    data: Path
    work: Path
    flat: Path
    """`recsys index --index flat --out` of the run."""
    hnsw: Path
    """`recsys index --index hnsw8 --out` of the run."""


@pytest.fixture(scope="module")
def env(ml_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Env:
    from app.train import run_training

    work = tmp_path_factory.mktemp("issue24-inference")
    data = work / "data"
    shutil.copytree(ml_dataset, data)  # a copy: one test prepares it again in place (and puts it back)
    run = str(run_training(shrink("two-tower-movielens", data, work, "--max-epochs=1", tracking=True))["run_id"])
    made = Env(f"sqlite:///{work}/mlflow.db", run, data, work, work / "flat", work / "hnsw")
    for spec, out in (("flat", made.flat), ("hnsw8", made.hnsw)):
        assert (
            main(["index", "--run-id", run, "--index", spec, "--out", str(out), "--tracking-uri", made.tracking]) == 0
        )
    return made


def cli(capsys: pytest.CaptureFixture[str], env: Env, *args: str) -> tuple[int, str, str]:
    code = main([*args, "--tracking-uri", env.tracking])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("recsys: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- 1. an index file of another structure under a manifest whose hash was rewritten ------------------


def swapped(src: Path, dst: Path, into: Path) -> Path:
    """``dst`` with ``src``'s FAISS file and the manifest's hash of it rewritten to match."""
    shutil.copytree(dst, into)
    shutil.copy(src / "index.faiss", into / "index.faiss")
    manifest = json.loads((into / "manifest.json").read_text())
    manifest["files"]["index.faiss"] = sha256_file(into / "index.faiss")
    (into / "manifest.json").write_text(json.dumps(manifest))
    return into


@pytest.mark.parametrize("case", ["hnsw under flat", "flat under hnsw"])
def test_an_index_file_of_another_structure_is_refused_in_one_line(
    env: Env, case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """HNSW under a flat manifest was searched as if it were exact; flat under HNSW was a traceback
    (could not set parameter efSearch) in recommend, package --index and recommend --all-users --index."""
    src, dst = (env.hnsw, env.flat) if case == "hnsw under flat" else (env.flat, env.hnsw)
    index = swapped(src, dst, tmp_path / "index")
    expected = "holds a FAISS Flat index" if src == env.flat else "holds a FAISS HNSW8 index"
    commands = [
        ["recommend", "--retrieval", env.run, "--user", "1", "--index", str(index)],
        ["package", "--retrieval", env.run, "--index", str(index)],
        ["recommend", "--retrieval", env.run, "--all-users", "--index", str(index), "--out", str(tmp_path / "all")],
    ]
    for args in commands:
        code, _, err = cli(capsys, env, *args)
        assert code == 2 and expected in one_line(err) and "rebuild it" in one_line(err), (args, err)


@pytest.mark.parametrize(
    ("built", "manifest", "found"),
    [
        ("ivf8,flat", "ivf16,flat", "FAISS IVF8,Flat"),
        ("ivf8,sq8", "ivf8,flat", "FAISS IVF8,SQ8"),
        ("ivf8,pq4x4", "ivf8,pq8x4", "FAISS IVF8,PQ4x4"),
        ("ivf8,pq8x4fs,rflat", "ivf8,pq8x4fs", "FAISS IVF8,PQ8x4fs,RFlat"),
        ("hnsw16", "hnsw32", "FAISS HNSW16"),
        ("hnsw16:ef_construction=80", "hnsw16", "ef_construction=80"),
    ],
)
def test_the_index_loader_checks_the_faiss_structure_and_parameters(
    built: str, manifest: str, found: str, tmp_path: Path
) -> None:
    """Module level, each structure's parameters: IVF lists, coding, PQ sub-quantisers, refinement, HNSW M
    and ef_construction (cosine vectors: no sphere coordinate, so the PQ counts are the spec's)."""
    import numpy as np

    from core.errors import RecsysError
    from modules.index import build_index, load_index, save_index

    vectors = np.random.default_rng(0).normal(size=(1000, 16)).astype(np.float32)
    ids = np.arange(len(vectors))
    save_index(build_index(vectors, ids, built, "cosine"), tmp_path / "built", "fp")
    save_index(build_index(vectors, ids, manifest, "cosine"), tmp_path / "manifest", "fp")
    index = swapped(tmp_path / "built", tmp_path / "manifest", tmp_path / "index")
    with pytest.raises(RecsysError) as excinfo:
        load_index(index, "fp")
    assert found in str(excinfo.value) and "rebuild it" in str(excinfo.value) and "\n" not in str(excinfo.value)


# -- 2. the run's dataset prepared again in place ---------------------------------------------------


@contextlib.contextmanager
def prepared_again(data: Path, **changes: Any) -> Iterator[None]:
    """``data`` prepared again from its source (with ``changes``) in its place; put back afterwards."""
    from datamodules.prepare import prepare

    meta = json.loads((data / "metadata.json").read_text())
    fresh, kept = data.parent / "fresh", data.parent / "kept"
    prepare(tiny_prepare(fresh, meta["dataset"], source=meta["source"]["path"], block_rows=16, **changes))
    data.rename(kept)
    fresh.rename(data)
    try:
        yield
    finally:
        shutil.rmtree(data)
        kept.rename(data)


def test_a_dataset_prepared_again_with_the_same_vocabularies_is_refused(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another split of the same source (same vocabularies): recommend read the new train pairs and
    answered with other items, exit 0."""
    args = ["recommend", "--retrieval", env.run, "--user", "1", "--index", str(env.flat)]
    code, before, err = cli(capsys, env, *args)
    assert code == 0, err
    vocab = {p.name: p.read_bytes() for p in (env.data / "vocab").glob("*.json")}
    with prepared_again(env.data, seed=5):
        assert {p.name: p.read_bytes() for p in (env.data / "vocab").glob("*.json")} == vocab  # same vocabularies
        code, out, err = cli(capsys, env, *args)
        assert code == 2, out
        line = one_line(err)
        assert f"dataset {env.data} was prepared again since the run trained" in line and "split_rule" in line
        # the train shards alone replaced (metadata.json kept): the digest the run logged tells
        (env.data / "metadata.json").write_bytes((env.data.parent / "kept" / "metadata.json").read_bytes())
        code, out, err = cli(capsys, env, *args)
        assert code == 2 and f"the train split of dataset {env.data} changed since the run trained" in one_line(err)
    code, after, err = cli(capsys, env, *args)
    assert code == 0 and after == before, err  # the same dataset again: served as before


def test_a_train_pairs_file_replaced_alone_is_refused_when_the_run_logged_its_hash(
    env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The metadata and shards kept, pairs/train.parquet rewritten: only a hash logged at training time
    (``dataset/files.json``, written here as app/tracking.py would) can tell."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from core.checksums import checksums

    read_later = ["pairs/train.parquet", "histories.parquet", "users.parquet", "items.parquet"]
    listing = tmp_path / "logged" / "files.json"  # app.stages.DATASET_FILES_ARTIFACT: dataset/files.json
    listing.parent.mkdir()
    listing.write_text(json.dumps({"files": checksums(env.data, read_later)}))
    MlflowClient(env.tracking).log_artifact(env.run, str(listing), "dataset")
    args = ["recommend", "--retrieval", env.run, "--user", "1", "--index", str(env.flat)]
    assert cli(capsys, env, *args)[0] == 0
    pairs = env.data / "pairs" / "train.parquet"
    kept = pairs.read_bytes()
    try:
        pd.read_parquet(pairs).iloc[::2].to_parquet(pairs, index=False)  # half the train pairs
        code, _, err = cli(capsys, env, *args)
        assert code == 2 and f"{pairs} changed since the run trained" in one_line(err)
    finally:
        pairs.write_bytes(kept)
    assert cli(capsys, env, *args)[0] == 0


# -- 3. no space left at every write --------------------------------------------------------------


def no_space(*_: Any, **__: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_no_space_at_recommend_out_and_index_out_is_one_line(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import pandas as pd

    import modules.index as index_module

    real = pd.DataFrame.to_parquet

    def to_parquet(self: pd.DataFrame, path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(str(path)).name.startswith(".recs.parquet"):  # --out's temporary sibling only
            no_space()
        return real(self, path, *args, **kwargs)

    with monkeypatch.context() as m:  # recommend --out: after the work, at the Parquet write
        m.setattr(pd.DataFrame, "to_parquet", to_parquet)
        out = tmp_path / "recs.parquet"
        code, _, err = cli(capsys, env, "recommend", "--retrieval", env.run, "--user", "1", "--out", str(out))
        assert code == 2 and f"--out {out}" in one_line(err) and "No space left" in one_line(err)
        assert not out.exists() and list(tmp_path.iterdir()) == []

    def faiss_full(*_: Any) -> None:  # what FAISS raises on a full disk: RuntimeError, several lines
        raise RuntimeError("Error in void faiss::write_index\nwrite error in index.faiss: (No space left on device)")

    faiss = index_module.import_faiss()
    with monkeypatch.context() as m:  # index: the FAISS file, written in a temporary directory
        m.setattr(faiss, "write_index", faiss_full)
        code, _, err = cli(capsys, env, "index", "--run-id", env.run, "--out", str(tmp_path / "index"))
        assert code == 2 and "cannot write the vector index" in one_line(err) and "No space left" in one_line(err)
    import pyarrow.parquet as pq

    write_table = pq.write_table

    def vectors_full(table: Any, where: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(str(where)).name == "vectors.parquet":
            no_space()
        return write_table(table, where, *args, **kwargs)

    with monkeypatch.context() as m:  # index: the vectors (pyarrow) in the temporary directory
        m.setattr(pq, "write_table", vectors_full)
        code, _, err = cli(capsys, env, "index", "--run-id", env.run)
        assert code == 2 and "cannot write the vector index" in one_line(err) and "ENOSPC" in one_line(err)
    assert not (tmp_path / "index").exists()


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only), unmounted afterwards."""
    where = tmp_path / "small"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def fill(disk: Path) -> None:
    with contextlib.suppress(OSError):
        (disk / "ballast").write_bytes(b"\0" * (2 << 20))


def test_a_full_temporary_directory_is_one_line(
    env: Env, full_disk: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stages, bundles and indexes are assembled in temporary directories before anything reaches --out:
    a full one was a traceback (pyarrow's OSError, FAISS's RuntimeError) or misread as a missing artifact."""
    import tempfile

    fill(full_disk)
    monkeypatch.setattr(tempfile, "tempdir", str(full_disk))
    for args in (
        ["recommend", "--retrieval", env.run, "--user", "1"],
        ["index", "--run-id", env.run],
        ["package", "--retrieval", env.run],
    ):
        code, _, err = cli(capsys, env, *args)
        assert code == 2 and "No space left on device" in one_line(err), (args, err)


def test_a_full_disk_at_index_out_is_one_line(
    env: Env, full_disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = full_disk / "index"
    fill(full_disk)
    code, _, err = cli(capsys, env, "index", "--run-id", env.run, "--out", str(out))
    assert code == 2 and f"--out {out}" in one_line(err) and "No space left" in one_line(err)
    assert sorted(p.name for p in full_disk.iterdir()) == ["ballast"]


# -- 4. registry names ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil/x", "", " ", "a:b", "50%", "bell\x07"])
def test_a_bad_register_name_is_refused_before_anything_is_logged(
    env: Env, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env.tracking)
    experiment = client.get_run(env.run).info.experiment_id
    runs_before = len(client.search_runs([experiment]))
    code, _, err = cli(capsys, env, "package", "--retrieval", env.run, "--register", name)
    assert code == 2 and "--register" in one_line(err), err
    assert BEL not in err
    assert len(client.search_runs([experiment])) == runs_before  # nothing logged, no FAILED run


# -- 5. control characters in ids ----------------------------------------------------------------


def test_control_characters_in_ids_never_reach_the_terminal(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    user = f"{ESC}[2J{ESC}]0;owned{BEL}"
    code, out, err = cli(capsys, env, "recommend", "--retrieval", env.run, "--user", user, "--index", str(env.flat))
    assert code == 0, err
    assert ESC not in out + err and BEL not in out + err
    assert "\\x1b[2J" in err and "unknown user" in err  # the warning names the id, escaped
    code, out, err = cli(
        capsys, env, "recommend", "--retrieval", env.run, "--history", f"1,{ESC}[31mred{BEL}", "--index", str(env.flat)
    )
    assert code == 0, err
    assert ESC not in out + err and BEL not in out + err and "\\x1b[31mred\\x07" in err
    code, _, err = cli(capsys, env, "recommend", "--retrieval", f"{ESC}[31m", "--user", "1")
    assert code == 2 and ESC not in err and "\\x1b[31m" in one_line(err)


# -- 6. empty and exhausted histories ---------------------------------------------------------------


@pytest.mark.parametrize("history", ["", ",", " , ,"])
def test_a_history_naming_no_item_is_refused(env: Env, history: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, env, "recommend", "--retrieval", env.run, "--history", history)
    assert code == 2 and "names no item" in one_line(err) and out == "", (out, err)


def test_a_history_that_covers_the_catalogue_says_so(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    """Every indexed item in the history (and 10,000 ids in all): a bare ``Empty DataFrame`` was printed."""
    vocab = json.loads((env.data / "vocab" / "item_id.json").read_text())
    history = [str(i) for i in vocab] + [f"nope{i}" for i in range(10_000 - len(vocab))]
    code, out, err = cli(
        capsys, env, "recommend", "--retrieval", env.run, "--history", ",".join(history), "--index", str(env.flat)
    )
    assert code == 0, err
    assert "Empty DataFrame" not in out
    assert out.startswith("no recommendations for --history:") and "every item the index holds" in out, out


# -- 7. request bodies the scoring server cannot read ---------------------------------------------


class Scoring:
    """MLflow's own scoring app (``scoring_server.init``, as ``mlflow models serve`` builds it) over the
    packaged model, called in process through ASGI: no server process to start."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def post(self, body: bytes | dict[str, Any]) -> tuple[int, dict[str, Any]]:
        import asyncio

        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": data, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/invocations",
            "raw_path": b"/invocations",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 5001),
        }
        asyncio.run(self.app(scope, receive, send))
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        answer = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return status, json.loads(answer)


@pytest.fixture(scope="module")
def scoring(env: Env) -> Iterator[Scoring]:
    import os
    import re

    import mlflow
    from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
    from mlflow.pyfunc import scoring_server

    from app.serving import package

    printed = package(env.run, index_dir=str(env.flat), tracking_uri=env.tracking)
    found = re.search(r"\((\S+)\); serve it", printed)
    assert found, printed
    mlflow.set_tracking_uri(env.tracking)
    parse = scoring_server._parse_json_data
    flag = _MLFLOW_IS_IN_SERVING_ENVIRONMENT.name
    saved = os.environ.get(flag)
    model = mlflow.pyfunc.load_model(found.group(1))  # as in the server: scoring_server imported first
    try:
        yield Scoring(scoring_server.init(model))
    finally:
        scoring_server._parse_json_data = parse
        if saved is None:
            os.environ.pop(flag, None)
        else:
            os.environ[flag] = saved


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"", "the request body is empty"),
        (b"   \n", "the request body is empty"),
        (b"not json " * 350_000, "the request body is not JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "a JSON list, not an object"),
        (b"{}", "needs exactly one of dataframe_records"),
    ],
)
def test_an_unreadable_request_body_gets_one_short_line(scoring: Scoring, body: bytes, problem: str) -> None:
    """MLflow answered these with a message of several lines quoting the whole body (3 MB came back)."""
    status, answer = scoring.post(body)
    message = answer["message"]
    assert status == 400 and problem in message and "\n" not in message and len(message) < 300, message[:500]


def test_a_bad_candidates_param_gets_one_short_line(scoring: Scoring) -> None:
    """MLflow's parameter check runs inside predict, whose refusals the server rewrote to quote the whole
    input table (``Failed to predict data '...'``)."""
    rows = [{"user": str(i)} for i in range(2000)]
    for params, problem in (({"candidates": "abc"}, 'got "abc"'), ({"candidates": 5.5}, "got 5.5"), (7, "params must")):
        status, answer = scoring.post({"dataframe_records": rows, "params": params})
        message = answer["message"]
        assert status == 400 and problem in message and "\n" not in message and len(message) < 300, message[:300]


def test_the_guarded_server_still_answers(scoring: Scoring) -> None:
    body = {"dataframe_records": [{"user": "1", "k": 3}, {"history": "1,2"}], "params": {"candidates": 20}}
    status, answer = scoring.post(body)
    assert status == 200, answer
    rows = answer["predictions"]
    assert len(rows) == 2 and len(rows[0]["items"]) == 3
    status, answer = scoring.post({"dataframe_records": [{"user": "1", "k": 0}]})
    assert status == 400 and "k must be a whole number" in answer["message"]
