"""The recommender as an MLflow pyfunc: logged as code with safetensors weights + a checked bundle (no
pickle anywhere), registered, loaded back, and served by a real `mlflow models serve` on 127.0.0.1:
answering as the in-process call does, answering the README's example, refusing bad requests with a
one-line 4xx, and stopping a request that runs past its deadline."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from test_funnel import CANDIDATES, Runs, candidate_ranker, train_runs

from app.bundle import assemble_bundle, load_bundle
from app.cli import main
from app.serving import predict_frame
from cluster.local import free_port
from core.services import running_service

ROOT = Path(__file__).resolve().parent.parent
NAME = "recommender-test"
FUNNEL_NAME = "recommender-funnel-test"


@dataclasses.dataclass
class Served:
    """Two recommenders packaged with `recsys package --register`: the two-tower + DLRM (trained on
    rated pairs) and the funnel's (a DCN reading the user's history, trained on the two-tower's
    candidates); their model URIs and the in-process recommenders."""

    runs: Runs
    uri: str
    recommender: Any
    funnel_uri: str
    funnel: Any
    funnel_ranking: str


TIMEOUT_S = 2
"""MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT of the test server: a request stops at 0.9 x this."""
MAX_ROWS, MAX_CANDIDATES = 10_000, 2_000
"""The documented request limits (README, app/serving.py)."""


@pytest.fixture(scope="module")
def served(ml_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Served:
    work = tmp_path_factory.mktemp("serving")
    runs = train_runs(ml_dataset, work, other=False)
    ranker = candidate_ranker(runs, work / "candidates").ranking
    out: list[Any] = []
    for name, ranking in ((NAME, runs.ranking), (FUNNEL_NAME, ranker)):
        code = main(
            [
                *("package", "--retrieval", runs.retrieval, "--ranking", ranking),
                *("--register", name, "--tracking-uri", runs.tracking),
            ]
        )
        assert code == 0
        local = load_bundle(assemble_bundle(runs.retrieval, ranking, work / f"bundle-{name}", runs.tracking))
        out += [f"models:/{name}/1", local.recommender]
    return Served(runs, out[0], out[1], out[2], out[3], ranker)


def requests_frame(recommender: Any) -> pd.DataFrame:
    users = recommender.retrieval.user_vocab
    items = recommender.retrieval.item_vocab
    return pd.DataFrame(
        {
            "user": [users[0], users[1], "no-such-user", None, None],
            "history": [None, None, None, ",".join(items[:3]) + ",zzz", ""],
            "k": [5, 3, 4, 6, 2],
        }
    )


def local_model(served: Served, dest: Path) -> Path:
    import mlflow

    runs, uri = served.runs, served.uri
    mlflow.set_tracking_uri(runs.tracking)
    return Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dest)))


def pickles_in(directory: Path) -> list[str]:
    """Files under ``directory`` that are pickles, or archives holding one (torch's .pt zips)."""
    import zipfile

    found = []
    for path in directory.rglob("*"):
        if not path.is_file():
            continue
        head = path.read_bytes()[:4]
        if (
            path.suffix in (".pkl", ".pickle", ".pt", ".pth", ".ckpt")
            or head[:1] == b"\x80"
            or (head == b"PK\x03\x04" and any(n.endswith(".pkl") for n in zipfile.ZipFile(path).namelist()))
        ):
            found.append(str(path.relative_to(directory)))
    return found


def test_packaged_model_is_code_and_safetensors_with_signature_and_pins(served: Served, tmp_path: Path) -> None:
    local = local_model(served, tmp_path)
    spec = yaml.safe_load((local / "MLmodel").read_text())
    assert spec["signature"]["outputs"] and spec["signature"]["params"]
    assert spec["flavors"]["python_function"]["model_code_path"].endswith("pyfunc_model.py")  # models from code
    assert (local / "input_example.json").is_file() and (local / "serving_input_example.json").is_file()
    requirements = (local / "requirements.txt").read_text().splitlines()
    assert any(r.startswith("fbgemm-gpu-cpu==") for r in requirements)
    assert any(r.startswith("torchrec==") for r in requirements) and any(
        r.startswith("faiss-cpu==") for r in requirements
    )
    assert any(r.startswith("safetensors==") for r in requirements)
    bundle = local / "artifacts" / "bundle"
    from safetensors.torch import load_file

    for stage in ("retrieval", "ranking"):
        assert load_file(bundle / stage / "weights.safetensors")  # plain tensors
    assert (bundle / "index" / "manifest.json").is_file()
    assert not (local / "python_model.pkl").exists()
    assert pickles_in(local) == []  # README: nothing pickled is loaded
    assert {p.name for p in (local / "code").iterdir()} >= {"app", "modules", "datamodules", "core"}


class Payload:
    """Unpickling this creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_in_the_model_never_runs(served: Served, tmp_path: Path) -> None:
    """A copy of the packaged model whose python_model.pkl (what a cloudpickled PythonModel loads) is
    a payload: loading it, as `mlflow models serve` does, must not run it; a payload in place of the
    weights is refused by the bundle's checksums."""
    import mlflow

    from core.errors import RecsysError

    marker = tmp_path / "PWNED"
    copy = tmp_path / "copy"
    shutil.copytree(local_model(served, tmp_path / "model"), copy)
    (copy / "python_model.pkl").write_bytes(pickle.dumps(Payload(marker)))
    model = mlflow.pyfunc.load_model(str(copy))
    assert not marker.exists(), "loading the model ran the pickle"
    frame = requests_frame(served.recommender)
    assert len(model.predict(frame, params={"candidates": 30})) == len(frame)
    assert not marker.exists()

    weights = copy / "artifacts" / "bundle" / "retrieval" / "weights.safetensors"
    weights.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises((RecsysError, Exception)) as err:
        mlflow.pyfunc.load_model(str(copy))
    assert "weights.safetensors: its SHA-256 differs" in str(err.value)
    assert not marker.exists(), "loading the model ran the pickle"


@pytest.mark.parametrize("funnel", [False, True], ids=["dlrm", "funnel-dcn-history"])
def test_loaded_pyfunc_answers_as_the_in_process_recommender(served: Served, funnel: bool, tmp_path: Path) -> None:
    """With a ranker of rated pairs, and with the funnel's (candidate features, the user's history)."""
    import mlflow

    uri, recommender = (served.funnel_uri, served.funnel) if funnel else (served.uri, served.recommender)
    mlflow.set_tracking_uri(served.runs.tracking)
    model = mlflow.pyfunc.load_model(uri)
    frame = requests_frame(recommender)
    candidates = CANDIDATES if funnel else 30
    got = model.predict(frame, params={"candidates": candidates})
    want = predict_frame(recommender, frame, candidates=candidates)
    assert got["items"].tolist() == want["items"].tolist()
    assert got["source"].tolist() == ["model", "model", "popular", "model", "popular"]
    assert [len(x) for x in got["items"]] == [5, 3, 4, 6, 2]
    for a, b in zip(got["scores"], want["scores"], strict=True):
        assert list(a) == pytest.approx(list(b), rel=1e-5)
    # and `recsys recommend` (its own bundle, the same runs) gives the served list for a user
    ranking = served.funnel_ranking if funnel else served.runs.ranking
    recs = tmp_path / "recs.parquet"
    args = ["recommend", "--retrieval", served.runs.retrieval, "--ranking", ranking, "--user", str(frame.user[0])]
    args += ["--k", "5", "--candidates", str(candidates), "--out", str(recs), "--tracking-uri", served.runs.tracking]
    assert main(args) == 0
    assert pd.read_parquet(recs).sort_values("rank").item.tolist() == list(got["items"][0])


@pytest.fixture(scope="module")
def server(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any, Path]]:
    """`mlflow models serve` of the funnel's packaged model (a ranker of the two-tower's candidates reading
    the user's history) on 127.0.0.1: (URL, process, log file)."""
    runs, uri = served.runs, served.funnel_uri
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": runs.tracking,
        "PYTHONPATH": str(ROOT),
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": str(TIMEOUT_S),
        # mlflow starts `uvicorn` by name: this environment's bin directory must come first on PATH
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with running_service(cmd, url + "/ping", log, env, wait_s=240) as proc:
        yield url, proc, log


def post(url: str, body: bytes | dict[str, Any], timeout: float = 60) -> tuple[int, str]:
    """POST /invocations: (status, response body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + "/invocations", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.cluster
def test_mlflow_models_serve_answers_over_http(served: Served, server: tuple[str, Any, Path]) -> None:
    """The funnel's recommender over HTTP answers as in process (and so as `recommend`, test_funnel.py)."""
    recommender = served.funnel
    frame = requests_frame(recommender)
    body = {"dataframe_records": json.loads(frame.to_json(orient="records")), "params": {"candidates": CANDIDATES}}
    status, text = post(server[0], body)
    assert status == 200, text
    predictions = json.loads(text)["predictions"]
    want = predict_frame(recommender, frame, candidates=CANDIDATES)
    assert [p["items"] for p in predictions] == want["items"].tolist()
    assert [p["source"] for p in predictions] == want["source"].tolist()
    for p, scores in zip(predictions, want["scores"], strict=True):
        assert p["scores"] == pytest.approx(list(scores), rel=1e-5)


def readme_example() -> bytes:
    """The request body of the README's curl example, verbatim."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"curl -s 127\.0\.0\.1:5001/invocations[^\n]*(?:\\\n[^\n]*)*?-d '([^']*)'", readme)
    assert found, "README: no curl example of /invocations"
    return found.group(1).encode()


@pytest.mark.cluster
def test_the_readme_example_is_answered(server: tuple[str, Any, Path]) -> None:
    body = readme_example()
    status, text = post(server[0], body)
    assert status == 200, text
    predictions = json.loads(text)["predictions"]
    rows = json.loads(body)["dataframe_records"]
    assert len(predictions) == len(rows) == 2
    assert [len(p["items"]) for p in predictions] == [r.get("k", 10) for r in rows]
    assert {p["source"] for p in predictions} <= {"model", "popular"}


def records(*rows: dict[str, Any], **params: Any) -> dict[str, Any]:
    return {"dataframe_records": list(rows), **({"params": params} if params else {})}


BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    ("k 0", records({"user": "1", "k": 0}), "row 0: k must be a whole number from 1 to"),
    ("k -1", records({"user": "1", "k": -1}), "row 0: k must be a whole number"),
    ("k 2.5", records({"user": "1", "k": 2.5}), "row 0: k must be a whole number"),
    ("k x", records({"user": "1"}, {"user": "2", "k": "x"}), "row 1: k must be a whole number"),
    ("k true", records({"user": "1", "k": True}), "k must be a whole number"),
    ("candidates 0", records({"user": "1"}, candidates=0), "candidates must be a whole number from 1 to 2000"),
    ("candidates -1", records({"user": "1"}, candidates=-1), "candidates must be a whole number"),
    ("candidates too many", records({"user": "1"}, candidates=MAX_CANDIDATES + 1), "candidates must be"),
    ("unknown field", records({"user": "1", "userid": "2"}), "unknown field(s) 'userid'"),
    ("user and history", records({"user": "1", "history": "1,2"}), "row 0: give a user or a history, not both"),
    ("neither", records({"user": "1"}, {"k": 3}), "row 1: needs a user or a history"),
    ("float user", records({"user": 1.5}), "row 0: user must be a raw id as a string"),
    ("history of objects", records({"history": [{"a": 1}]}), "history item must be a raw id"),
    ("too many rows", records(*[{"user": "1"}] * (MAX_ROWS + 1)), f"at most {MAX_ROWS}"),
]


@pytest.mark.cluster
def test_bad_requests_get_a_one_line_4xx_without_a_stack_trace(server: tuple[str, Any, Path]) -> None:
    for case, body, reason in BAD_REQUESTS:
        status, text = post(server[0], body)
        assert 400 <= status < 500, (case, status, text)
        answer = json.loads(text)
        assert set(answer) <= {"error_code", "message", "sqlstate", "error_class"}, (case, answer)  # no stack_trace
        assert "Traceback" not in text and "\n" not in answer["message"], (case, answer)
        assert reason in answer["message"], (case, answer)
    # a candidates that is no number never reaches the model: MLflow's parameter check refuses it
    # (400, no stack trace, but MLflow's own message, which quotes the input)
    for bad in ("x", 2.5):
        status, text = post(server[0], records({"user": "1"}, candidates=bad))
        assert status == 400 and "stack_trace" not in json.loads(text) and "candidates" in text, text


def server_cpu_s(proc: Any) -> float:
    """CPU seconds used so far by the server and its workers."""
    import psutil

    root = psutil.Process(proc.pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


@pytest.mark.cluster
def test_a_request_past_its_deadline_stops_using_the_cpu(served: Served, server: tuple[str, Any, Path]) -> None:
    """Requests that outlive the server's timeout are answered 504 and their work stops: before, the
    server answered 504 at its timeout while the worker thread kept computing."""
    url, proc, log = server
    items = served.funnel.retrieval.item_vocab
    body = json.dumps(
        records(*[{"history": ",".join(items[: 1 + i % 40])} for i in range(MAX_ROWS)], candidates=MAX_CANDIDATES)
    ).encode()
    answers: list[tuple[int, str]] = []
    threads = [threading.Thread(target=lambda: answers.append(post(url, body, timeout=600))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [status for status, _ in answers] == [504] * len(threads), answers
    time.sleep(0.5)
    before = server_cpu_s(proc)
    time.sleep(4)
    assert server_cpu_s(proc) - before < 0.5, "the server kept computing after answering 504"
    # our deadline stopped them (the client may get the server's own 504 first when the machine is busy)
    assert log.read_text().count("ran past its deadline") == len(threads), log.read_text()[-2000:]
    status, _ = post(url, records({"user": "1"}))  # and still serves
    assert status == 200
