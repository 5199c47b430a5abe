"""Embedding tables larger than one worker: a per-worker memory budget fed to the sharding planner."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SHRINK, tiny_prepare
from mlflow.tracking import MlflowClient

from app.cli import main
from datamodules.config import SyntheticConfig
from datamodules.prepare import prepare
from datamodules.schema import read_metadata


@pytest.fixture(scope="module")
def big_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic-ctr set with one ~4,900-row feature: at dim 256 its table is about 5 MiB."""
    out = tmp_path_factory.mktemp("big") / "data"
    synthetic = SyntheticConfig(num_dense=2, num_sparse=2, cardinalities=[5, 6000], zipf=0.3, chunk_rows=30000)
    prepare(tiny_prepare(out, "synthetic-ctr", rows=60000, block_rows=64, synthetic=synthetic))
    assert read_metadata(out).feature("C2").cardinality > 4000
    return out


def args(data: Path, tmp: Path, *extra: str) -> list[str]:
    flags = [*SHRINK, "--arch.embedding_dim=256", "--max-epochs=1", "--trainer.output_dir", str(tmp / "runs")]
    return ["train", "--model", "dlrm", "--data", str(data), *flags, "--cluster.memory_per_worker", "3MB", *extra]


def test_one_worker_refuses_a_table_larger_than_its_budget(
    big_table: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args(big_table, tmp_path, "--tracking.enabled=false")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "t_C2" in err[0] and "3.0 MiB per worker" in err[0], err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_two_workers_train_it_sharded_and_the_plan_is_in_mlflow(
    big_table: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code = main(args(big_table, tmp_path, "--num-workers", "2", "--tracking-uri", uri, "--experiment", "big"))
    captured = capfd.readouterr()  # the workers' lines: their processes write to the terminal
    assert code == 0, captured.err
    plan = [line for line in captured.err.splitlines() if "t_C2" in line]
    assert plan and ("column_wise" in plan[0] or "row_wise" in plan[0]) and "0: " in plan[0] and "1: " in plan[0]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("big")
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    text = Path(client.download_artifacts(run.info.run_id, "sharding_plan.txt", str(tmp_path))).read_text()
    assert "t_C2" in text and "bytes per rank" in text
