"""Backends behind one flag: local processes, Ray Train on a local Ray, Spark TorchDistributor."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from app.cli import main
from app.config import ClusterConfig, DataConfig, ModelConfig, RunConfig, TrackingConfig, TrainerConfig
from core.errors import RecsysError
from cluster.launch import run_training

pytestmark = pytest.mark.cluster


def cfg_for(path: Path, tmp: Path, **cluster: object) -> RunConfig:
    return RunConfig(
        model="dlrm",
        data=DataConfig(path=str(path), batch_size=64),
        arch=ModelConfig(embedding_dim=8, dense_arch=[8], over_arch=[16]),
        trainer=TrainerConfig(max_epochs=2, patience=0, output_dir=str(tmp / "runs"), progress_bar=False, seed=3),
        tracking=TrackingConfig(tracking_uri=f"sqlite:///{tmp}/mlflow.db", experiment="backends"),
        cluster=ClusterConfig(**cluster),  # type: ignore[arg-type]
    )


@pytest.fixture
def local_ray() -> object:
    """A local Ray for one test: a connected Ray driver must not live on while Spark tests fork."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _mlflow_runs(tmp: Path) -> list[Run]:
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("backends")
    assert exp is not None
    return list(client.search_runs([exp.experiment_id]))


RESULTS: dict[str, dict[str, object]] = {}


def _check_run(name: str, metrics: dict[str, object], tmp: Path) -> None:
    assert metrics["world_size"] == 2
    table_ranks: Any = metrics["table_ranks"]
    assert {r for ranks in table_ranks.values() for r in ranks} == {0, 1}
    runs = _mlflow_runs(tmp)
    assert len(runs) == 1 and runs[0].info.run_id == metrics["run_id"]  # one run, written by rank 0
    assert "test/auroc" in runs[0].data.metrics
    RESULTS[name] = metrics


def test_local_two_processes(ml_dataset: Path, tmp_path: Path) -> None:
    _check_run("local", run_training(cfg_for(ml_dataset, tmp_path, num_workers=2)), tmp_path)


def test_ray_two_workers(ml_dataset: Path, tmp_path: Path, local_ray: object) -> None:
    cfg = cfg_for(ml_dataset, tmp_path, backend="ray", num_workers=2, storage_path=str(tmp_path / "ray"))
    _check_run("ray", run_training(cfg), tmp_path)


def test_spark_local_mode(ml_dataset: Path, tmp_path: Path) -> None:
    cfg = cfg_for(ml_dataset, tmp_path, backend="spark", num_workers=2, spark_local_mode=True)
    _check_run("spark", run_training(cfg), tmp_path)


def test_spark_on_executors(ml_dataset: Path, tmp_path: Path) -> None:
    cfg = cfg_for(
        ml_dataset,
        tmp_path,
        backend="spark",
        num_workers=2,
        spark_local_mode=False,
        spark_master="local-cluster[2,1,1024]",
    )
    _check_run("spark-executors", run_training(cfg), tmp_path)


def registered_checkpoints(storage: Path) -> int:
    """Epoch checkpoints Ray has registered (its checkpoint manager's snapshot lists them)."""
    import json

    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            results = json.loads(snapshot.read_text()).get("checkpoint_results") or []
        except (OSError, ValueError):
            return 0  # being written
        return sum(1 for r in results if "epoch" in (r.get("metrics") or {}))
    return 0


def test_ray_worker_killed_mid_run_resumes_from_its_checkpoint(
    ml_dataset: Path, tmp_path: Path, local_ray: object
) -> None:
    """SIGKILL one Ray Train worker once Ray registered a checkpoint: Ray restarts the worker group
    from that checkpoint and the run completes, as one MLflow run, with the metrics of an
    uninterrupted run (within 0.01)."""
    import dataclasses
    import threading

    import psutil

    def config(tmp: Path, **cluster: object) -> RunConfig:
        cfg = cfg_for(ml_dataset, tmp, num_workers=2, **cluster)
        return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, max_epochs=4))

    storage = tmp_path / "ray"
    killed: list[int] = []

    def kill_a_worker_after_a_checkpoint() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if registered_checkpoints(storage) >= 1:
                workers = [
                    p
                    for p in psutil.process_iter(["pid", "cmdline"])
                    if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or [])
                ]
                if workers:
                    victim = max(workers, key=lambda p: p.info["pid"])
                    victim.kill()
                    killed.append(victim.info["pid"])
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker_after_a_checkpoint, daemon=True)
    killer.start()
    faulty = run_training(config(tmp_path, backend="ray", storage_path=str(storage), max_failures=2))
    killer.join(5)
    assert killed, "no Ray Train worker was found to kill"
    assert faulty["epochs"] == 4
    assert len(faulty["train_loss_per_epoch"]) < 4  # the last attempt resumed, it did not start over
    runs = _mlflow_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.run_id == faulty["run_id"]  # still one run
    assert runs[0].info.status == "FINISHED"
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(faulty["run_id"], "val/auroc")
    # every epoch's validation is in the run; an epoch cut short by the kill is logged again at its step
    assert len({m.step for m in history}) == 4

    (tmp_path / "clean").mkdir()
    clean = run_training(config(tmp_path / "clean"))
    # the resumed epochs trained exactly as the uninterrupted run's last epochs did
    assert faulty["train_loss_per_epoch"] == pytest.approx(
        clean["train_loss_per_epoch"][-len(faulty["train_loss_per_epoch"]) :], rel=1e-3
    )
    for key in ("test/auroc", "test/logloss"):
        assert abs(float(faulty[key]) - float(clean[key])) < 0.01, (key, faulty[key], clean[key])


def test_backends_agree(ml_dataset: Path) -> None:
    """Same config and seed on 2 workers: test metrics agree within 0.01 AUROC / 0.01 logloss."""
    if len(RESULTS) < 2:
        pytest.skip("needs the backend runs above in the same session")
    aurocs = [float(m["test/auroc"]) for m in RESULTS.values()]  # type: ignore[arg-type]
    loglosses = [float(m["test/logloss"]) for m in RESULTS.values()]  # type: ignore[arg-type]
    assert max(aurocs) - min(aurocs) < 0.01, RESULTS
    assert max(loglosses) - min(loglosses) < 0.01, RESULTS


def test_unknown_backend(ml_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--model", "dlrm", "--data", str(ml_dataset), "--backend", "slurm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "backend" in err[0] and "slurm" in err[0]


def test_unreachable_ray_address(ml_dataset: Path, tmp_path: Path) -> None:
    cfg = cfg_for(ml_dataset, tmp_path, backend="ray", num_workers=2, ray_address="127.0.0.1:9")
    with pytest.raises(RecsysError, match="unreachable"):
        run_training(cfg)


def test_more_ray_workers_than_cpus(ml_dataset: Path, tmp_path: Path, local_ray: object) -> None:
    cfg = cfg_for(ml_dataset, tmp_path, backend="ray", num_workers=8)
    with pytest.raises(RecsysError, match="needs 8 CPUs"):
        run_training(cfg)


def test_more_spark_workers_than_slots(ml_dataset: Path, tmp_path: Path) -> None:
    cfg = cfg_for(ml_dataset, tmp_path, backend="spark", num_workers=3, spark_local_mode=False, spark_master="local[2]")
    with pytest.raises(RecsysError, match="2 task slots"):
        run_training(cfg)


def test_spark_without_java(ml_dataset: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # the venv, no java
    env.pop("JAVA_HOME", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "train",
            "--model",
            "dlrm",
            "--data",
            str(ml_dataset),
            "--backend",
            "spark",
            "--num-workers",
            "2",
            "--tracking.enabled",
            "false",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "recsys: error: --backend spark: Java not found on PATH (Spark needs Java 17, e.g. openjdk-17-jre-headless)"
    ]
