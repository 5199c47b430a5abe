"""The MLflow run of `recsys train`, read back with MlflowClient from a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app.cli import main
from cluster.local import free_port
from core.services import running_service
from datamodules.config import DataConfig
from datamodules.streaming import StreamingDataModule

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--workers",
        "1",
    ]
    url = f"http://127.0.0.1:{port}"
    with running_service(cmd, url + "/health", root / "server.log", wait_s=120):
        yield url


def test_train_logs_a_complete_run(
    mlflow_server: str, ml_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    code = main(
        [
            "train",
            "--model",
            "two-tower",
            "--data",
            str(ml_dataset),
            "--batch-size",
            "64",
            "--max-epochs",
            "2",
            "--tracking-uri",
            mlflow_server,
            "--experiment",
            "test-run-contents",
            "--arch.embedding_dim",
            "8",
            "--trainer.patience",
            "0",
            "--trainer.progress_bar",
            "false",
            "--trainer.output_dir",
            str(tmp_path / "runs"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("test-run-contents")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1  # one run per training
    run = runs[0]
    assert run.info.run_id in out
    params = run.data.params
    assert params["model"] == "two-tower" and params["arch.embedding_dim"] == "8"
    assert params["data.path"] == str(ml_dataset) and "optim.sparse" in params
    for key in ("val/auroc", "val/logloss", "val/ndcg_at_10", "val/recall_at_10", "train/loss_epoch"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 2, key  # one value per epoch
    for key in ("test/auroc", "test/logloss", "test/ndcg_at_10", "test/recall_at_10"):
        assert key in run.data.metrics
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "dataset", "checkpoints"} <= top
    assert (
        run.outputs is not None and len(run.outputs.model_outputs) == 1
    )  # MLflow 3 logs the packaged model as a LoggedModel of the run
    # the data contract and the vocabularies (what serving maps raw ids through)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "dataset")} == {
        "dataset/metadata.json",
        "dataset/vocab",
    }
    best = client.list_artifacts(run.info.run_id, "checkpoints/best")
    assert any(a.path.endswith("trainer.pt") for a in best) and any(a.path.endswith(".distcp") for a in best)

    mlflow.set_tracking_uri(mlflow_server)
    scorer = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    dm = StreamingDataModule(DataConfig(path=str(ml_dataset), batch_size=64, cache_dir=str(tmp_path / "c")))
    batch = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        p = scorer(batch.dense_features, batch.sparse_features)
    assert p.shape == (64,) and bool(((p >= 0) & (p <= 1)).all())
    dm.teardown()

    # `recsys evaluate --run-id` reproduces the test metrics from the logged config and checkpoint
    assert main(["evaluate", "--run-id", run.info.run_id, "--tracking-uri", mlflow_server]) == 0
    table = capsys.readouterr().out
    auroc = float(next(line.split()[1] for line in table.splitlines() if line.startswith("test/auroc")))
    assert auroc == pytest.approx(run.data.metrics["test/auroc"], abs=1e-4)
