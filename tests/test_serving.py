"""The recommender as an MLflow pyfunc: packaged as state dicts + bundle, registered, loaded back, and
served by a real `mlflow models serve` on 127.0.0.1, answering as the in-process call does."""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from test_funnel import Runs, train_runs

from app.cli import main
from app.recommend import assemble_bundle, load_bundle
from app.serving import predict_frame
from cluster.local import free_port
from core.services import running_service

ROOT = Path(__file__).resolve().parent.parent
NAME = "recommender-test"


@pytest.fixture(scope="module")
def served(ml_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Runs, str, Any]:
    """Two tiny runs packaged with `recsys package --register`; the model URI and the in-process recommender."""
    work = tmp_path_factory.mktemp("serving")
    runs = train_runs(ml_dataset, work, other=False)
    code = main(
        [
            *("package", "--retrieval", runs.retrieval, "--ranking", runs.ranking),
            *("--register", NAME, "--tracking-uri", runs.tracking),
        ]
    )
    assert code == 0
    local = load_bundle(assemble_bundle(runs.retrieval, runs.ranking, work / "bundle", runs.tracking))
    return runs, f"models:/{NAME}/1", local.recommender


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


def test_packaged_model_is_state_dicts_with_signature_and_pins(served: tuple[Runs, str, Any], tmp_path: Path) -> None:
    import mlflow

    runs, uri, _ = served
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


def test_loaded_pyfunc_answers_as_the_in_process_recommender(served: tuple[Runs, str, Any]) -> None:
    import mlflow

    runs, uri, recommender = served
    mlflow.set_tracking_uri(runs.tracking)
    model = mlflow.pyfunc.load_model(uri)
    frame = requests_frame(recommender)
    got = model.predict(frame, params={"candidates": 30})
    want = predict_frame(recommender, frame, candidates=30)
    assert got["items"].tolist() == want["items"].tolist()
    assert got["source"].tolist() == ["model", "model", "popular", "model", "popular"]
    assert [len(x) for x in got["items"]] == [5, 3, 4, 6, 2]
    for a, b in zip(got["scores"], want["scores"], strict=True):
        assert list(a) == pytest.approx(list(b), rel=1e-5)


@pytest.mark.cluster
def test_mlflow_models_serve_answers_over_http(served: tuple[Runs, str, Any], tmp_path: Path) -> None:
    runs, uri, recommender = served
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
            "params": {"candidates": 30},
        }
        request = urllib.request.Request(
            url + "/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            predictions = json.loads(r.read())["predictions"]
        want = predict_frame(recommender, frame, candidates=30)
        assert [p["items"] for p in predictions] == want["items"].tolist()
        assert [p["source"] for p in predictions] == want["source"].tolist()
        for p, scores in zip(predictions, want["scores"], strict=True):
            assert p["scores"] == pytest.approx(list(scores), rel=1e-5)
