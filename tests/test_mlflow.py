"""The MLflow run of `recsys train`, read back with MlflowClient from a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from app.cli import main
from app.tracking import preset_description
from cluster.local import free_port
from core.services import running_service
from datamodules.config import DataConfig
from datamodules.streaming import StreamingDataModule

pytestmark = pytest.mark.cluster
PRESET = Path(__file__).parent.parent / "configs" / "funnel-retrieval.yaml"


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
            "--config",  # the demo's retrieval preset, as the demo trains it (scripts/demo.sh)
            str(PRESET),
            "--data",
            str(ml_dataset),
            "--arch.uniform_negatives",
            "16",
            "--tag",
            "team=search",
            "--tag=ticket=RS-1",
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
        "dataset/files.json",  # the SHA-256 of the files a stage of the run reads from the dataset later
    }
    logged = client.download_artifacts(run.info.run_id, "dataset/files.json", str(tmp_path))
    files = json.loads(Path(logged).read_text())
    assert set(files["files"]) == {"users.parquet", "items.parquet", "histories.parquet", "pairs/train.parquet"}
    best = client.list_artifacts(run.info.run_id, "checkpoints/best")
    assert any(a.path.endswith("trainer.pt") for a in best) and any(a.path.endswith(".distcp") for a in best)

    # what the run's page and the runs table show: dataset inputs, tags, a description, the figures
    check_run_reads_well(client, run, ml_dataset, "two-tower", "funnel-retrieval.yaml")
    assert run.data.tags["team"] == "search" and run.data.tags["ticket"] == "RS-1"
    assert run.data.tags["mlflow.note.content"] == preset_description(PRESET)
    assert run.data.tags["mlflow.note.content"].startswith("The funnel's retrieval stage")
    for name in ("test/ndcg_at_k", "test/recall_at_k"):
        curve = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        assert [m.step for m in curve] == list(range(1, 101)), name
        if name == "test/recall_at_k":  # recall never falls as K grows
            assert all(a.value <= b.value + 1e-12 for a, b in itertools.pairwise(curve))
        at_k = curve[9].value  # K = 10, the run's cut-off: the same figure as test/NAME_at_10
        assert at_k == pytest.approx(run.data.metrics[name.replace("_at_k", "_at_10")], abs=1e-6)  # float32 there
    assert "figures/recall_ndcg_at_k.png" in {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    # the runs table filters on them, as a user would search the demo's runs
    assert run.inputs is not None
    digest = run.inputs.dataset_inputs[0].dataset.digest
    capsys.readouterr()
    assert main(["data", "summary", str(ml_dataset)]) == 0  # where a user reads their dataset's digests
    assert f"digest {digest}" in capsys.readouterr().out
    mlflow.set_tracking_uri(mlflow_server)
    found = mlflow.search_runs(
        experiment_names=["test-run-contents"], filter_string="tags.recsys.model = 'two-tower'", output_format="list"
    )
    assert [r.info.run_id for r in found] == [run.info.run_id]
    found = mlflow.search_runs(search_all_experiments=True, filter_string=f"dataset.digest = '{digest}'")
    assert list(found["run_id"]) == [run.info.run_id]

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


def check_run_reads_well(client: Any, run: Any, data: Path, model: str, preset: str) -> None:
    """One dataset input per split (contexts training/validation/test) whose digest is the split's own,
    and recsys's tags."""
    from datamodules.integrity import read_split_index, split_digest
    from datamodules.schema import read_metadata

    meta = read_metadata(data)
    inputs = {
        next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in run.inputs.dataset_inputs
    }
    assert sorted(inputs) == ["test", "training", "validation"]
    for split, context in (("train", "training"), ("val", "validation"), ("test", "test")):
        dataset = inputs[context]
        assert dataset.digest == split_digest(read_split_index(str(data), split))
        assert dataset.name == f"{meta.dataset}/{split}" and str(data) in dataset.source
        columns = {c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]}
        assert columns >= {f.name for f in meta.sparse_features}
    tags = run.data.tags
    assert tags["recsys.model"] == model and tags["recsys.backend"] == "local" and tags["recsys.world_size"] == "1"
    assert tags["recsys.dataset"] == meta.dataset and tags["recsys.dataset_path"] == str(data)
    assert tags["recsys.dataset_kind"] == ("retrieval" if meta.task == "retrieval" else "ranking")
    assert tags["recsys.preset"] == preset and tags["recsys.version"] == "0.1.0"
    assert len(tags["recsys.git_commit"].removesuffix("-dirty")) == 40


def test_a_ranking_run_logs_its_inputs_tags_and_score_figures(ctr_dataset: Path, tmp_path: Path) -> None:
    """A DLRM run from a preset: the same dataset inputs and tags, and the test split's calibration curve
    and score histogram (positives vs negatives) as PNGs."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    preset = tmp_path / "my-dlrm.yaml"
    preset.write_text("# A DLRM for the tests.\n#   recsys train --config my-dlrm.yaml\nmodel: dlrm\n")
    code = main(
        [
            "train",
            "--config",
            str(preset),
            "--data",
            str(ctr_dataset),
            "--tracking-uri",
            uri,
            "--max-epochs",
            "1",
            "--batch-size",
            "256",
            "--arch.embedding_dim",
            "8",
            "--trainer.progress_bar",
            "false",
            "--trainer.output_dir",
            str(tmp_path / "runs"),
        ]
    )
    assert code == 0
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("recsys")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    check_run_reads_well(client, run, ctr_dataset, "dlrm", "my-dlrm.yaml")
    assert run.data.tags["recsys.model_kind"] == "ranking"
    assert run.data.tags["mlflow.note.content"] == "A DLRM for the tests.\n`recsys train --config my-dlrm.yaml`"
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert figures == {"figures/calibration.png", "figures/score_histogram.png"}
    png = Path(client.download_artifacts(run.info.run_id, "figures/calibration.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("flag", "error"),
    [
        (["--tag", "team"], "--tag team: expected KEY=VALUE"),
        (["--tag", "=x"], "--tag =x: expected KEY=VALUE"),
        (["--tag", "recsys.model=x"], "are set by recsys and MLflow"),
        (["--tag"], "--tag: expected KEY=VALUE"),
    ],
)
def test_a_bad_tag_is_one_line(
    flag: list[str], error: str, ctr_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", "--model", "dlrm", "--data", str(ctr_dataset), *flag])
    err = capsys.readouterr().err
    assert code == 2 and error in err and len(err.strip().splitlines()) == 1, err


def test_the_funnel_bench_logs_its_comparison_to_a_run_of_its_own(ml_dataset: Path, tmp_path: Path) -> None:
    """bench/funnel.py's table as a run: each row's NDCG@10, the table, a bar chart, the scored test split
    and the runs it compared (the figures themselves: a made-up result, the bench's own numbers are slow)."""
    from mlflow.tracking import MlflowClient

    from bench.funnel import log_comparison
    from datamodules.integrity import read_split_index, split_digest

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rows = {"most popular (train + val likes)": 0.1, "funnel (two-tower + ranker on its candidates)": 0.3}
    runs = {"retrieval": "r1", "labelling": "r0", "ranking": "r2"}
    result = {"rows": rows, "runs": runs, "seed": 0, "users": 12, "candidates": 100}
    run_id = log_comparison(uri, ml_dataset, result)
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.metrics == {"ndcg_at_10/most popular": 0.1, "ndcg_at_10/funnel": 0.3}
    assert run.data.tags["recsys.funnel.ranking_run"] == "r2" and "| funnel" in run.data.tags["mlflow.note.content"]
    assert run.inputs is not None
    (test_input,) = run.inputs.dataset_inputs
    assert test_input.dataset.digest == split_digest(read_split_index(str(ml_dataset), "test"))
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(run_id)}
    assert {"comparison.md", "figures"} <= artifacts
    assert [a.path for a in MlflowClient(uri).list_artifacts(run_id, "figures")] == ["figures/funnel_ndcg_at_10.png"]
