"""The recommender as an MLflow pyfunc: packaged as state dicts + bundle, registered, loaded back, and
served by a real `mlflow models serve` on 127.0.0.1, answering as the in-process call does."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from test_funnel import CANDIDATES, Runs, candidate_ranker, train_runs

from app.cli import main
from app.recommend import assemble_bundle, load_bundle
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


@pytest.fixture(scope="module")
def served(ml_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Served:
    work = tmp_path_factory.mktemp("serving")
    runs = train_runs(ml_dataset, work, other=False)
    ranker = candidate_ranker(runs, work / "candidates").ranking
    out = []
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
    return Served(runs, *out)


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


def test_packaged_model_is_state_dicts_with_signature_and_pins(served: Served, tmp_path: Path) -> None:
    import mlflow

    runs, uri = served.runs, served.uri
    mlflow.set_tracking_uri(runs.tracking)
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path)))
    spec = yaml.safe_load((local / "MLmodel").read_text())
    assert spec["signature"]["inputs"] and spec["signature"]["outputs"] and spec["signature"]["params"]
    assert (local / "input_example.json").is_file() and (local / "serving_input_example.json").is_file()
    requirements = (local / "requirements.txt").read_text().splitlines()
    assert any(r.startswith("fbgemm-gpu-cpu==") for r in requirements)
    assert any(r.startswith("torchrec==") for r in requirements) and any(
        r.startswith("faiss-cpu==") for r in requirements
    )
    bundle = local / "artifacts" / "bundle"
    for stage in ("retrieval", "ranking"):
        import torch

        state = torch.load(bundle / stage / "state_dict.pt", weights_only=True)  # plain tensors, no classes
        assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    assert (bundle / "index" / "manifest.json").is_file()
    assert (local / "python_model.pkl").stat().st_size < 4096  # the wrapper only: no module, no weights
    assert {p.name for p in (local / "code").iterdir()} >= {"app", "modules", "datamodules", "core"}


@pytest.mark.parametrize("funnel", [False, True], ids=["dlrm", "funnel-dcn-history"])
def test_loaded_pyfunc_answers_as_the_in_process_recommender(served: Served, funnel: bool) -> None:
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
    if funnel:  # the in-process answer is `recommend`'s: the funnel's ranker orders by its probability
        user = frame.user[0]
        assert want["items"][0] == recommender.recommend_users([user], 5, candidates)[0].items


@pytest.mark.cluster
def test_mlflow_models_serve_answers_over_http(served: Served, tmp_path: Path) -> None:
    """The funnel's recommender (a ranker reading the user's history) served as `mlflow models serve` runs it."""
    runs, uri, recommender = served.runs, served.funnel_uri, served.funnel
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": runs.tracking,
        "PYTHONPATH": str(ROOT),
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # mlflow starts `uvicorn` by name: this environment's bin directory must come first on PATH
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    with running_service(cmd, url + "/ping", tmp_path / "serve.log", env, wait_s=240):
        frame = requests_frame(recommender)
        body = {
            "dataframe_records": json.loads(frame.to_json(orient="records")),
            "params": {"candidates": CANDIDATES},
        }
        request = urllib.request.Request(
            url + "/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            predictions = json.loads(r.read())["predictions"]
        want = predict_frame(recommender, frame, candidates=CANDIDATES)
        assert [p["items"] for p in predictions] == want["items"].tolist()
        assert [p["source"] for p in predictions] == want["source"].tolist()
        for p, scores in zip(predictions, want["scores"], strict=True):
            assert p["scores"] == pytest.approx(list(scores), rel=1e-5)
