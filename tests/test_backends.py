"""Backends behind one flag: local processes, Ray Train on a local Ray, Spark TorchDistributor."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import shrink
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from app.cli import main
from app.config import RunConfig
from app.train import run_training
from cluster.config import ClusterConfig
from core.errors import RecsysError

pytestmark = pytest.mark.cluster


def cfg_for(path: Path, tmp: Path, **cluster: object) -> RunConfig:
    """The shipped MovieLens DLRM preset shrunk for CPU, tracked in a SQLite store under ``tmp``."""
    cfg = shrink("dlrm-movielens", path, tmp, "--seed=3", "--experiment=backends", tracking=True)
    return dataclasses.replace(cfg, cluster=ClusterConfig(**cluster))  # type: ignore[arg-type]


@contextlib.contextmanager
def local_ray_session() -> Iterator[None]:
    """A local Ray for one run: a connected Ray driver must not live on while Spark tests fork."""
    import ray

    from cluster.ray_node import LOOPBACK_IP, single_host_mode

    with single_host_mode():  # every server of it on 127.0.0.1, as the Ray a run starts itself
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address=LOOPBACK_IP)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def local_ray() -> Iterator[None]:
    with local_ray_session():
        yield


def _mlflow_runs(tmp: Path) -> list[Run]:
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("backends")
    assert exp is not None
    return list(client.search_runs([exp.experiment_id]))


BACKENDS: dict[str, dict[str, object]] = {
    "local": {},
    "ray": {"backend": "ray"},
    "spark": {"backend": "spark", "spark_local_mode": True},
    "spark-executors": {"backend": "spark", "spark_local_mode": False, "spark_master": "local-cluster[2,1,1024]"},
}
_RUNS: dict[str, tuple[dict[str, Any], Path]] = {}


@pytest.fixture(scope="module")
def backend_run(ml_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``backend_run(name) -> (metrics, tmp)``: the same 2-worker training on one backend, run once per
    module and shared by the test of that backend and ``test_backends_agree``."""

    def run(name: str) -> tuple[dict[str, Any], Path]:
        if name not in _RUNS:
            tmp = tmp_path_factory.mktemp(name)
            cluster = {**BACKENDS[name], "num_workers": 2}
            if name == "ray":
                cluster["storage_path"] = str(tmp / "ray")
                with local_ray_session():
                    _RUNS[name] = (run_training(cfg_for(ml_dataset, tmp, **cluster)), tmp)
            else:
                _RUNS[name] = (run_training(cfg_for(ml_dataset, tmp, **cluster)), tmp)
        return _RUNS[name]

    return run


@pytest.mark.parametrize("name", list(BACKENDS))
def test_two_workers_on_backend(name: str, backend_run: Any) -> None:
    """One MLflow run written by rank 0, tables placed on both ranks."""
    metrics, tmp = backend_run(name)
    assert metrics["world_size"] == 2
    table_ranks: Any = metrics["table_ranks"]
    assert {r for ranks in table_ranks.values() for r in ranks} == {0, 1}
    runs = _mlflow_runs(tmp)
    assert len(runs) == 1 and runs[0].info.run_id == metrics["run_id"]  # one run, written by rank 0
    assert "test/auroc" in runs[0].data.metrics


def test_backends_agree(backend_run: Any) -> None:
    """Same config and seed on 2 workers: test metrics agree within 0.01 AUROC / 0.01 logloss."""
    results = {name: backend_run(name)[0] for name in BACKENDS}
    aurocs = [float(m["test/auroc"]) for m in results.values()]
    loglosses = [float(m["test/logloss"]) for m in results.values()]
    assert max(aurocs) - min(aurocs) < 0.01, results
    assert max(loglosses) - min(loglosses) < 0.01, results


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


def test_relative_paths_on_ray_land_where_the_user_is(
    ml_dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    local_ray: None,
) -> None:
    """`--data data/ml` with Ray workers (whose working directory is Ray's): the data is found, and the
    run and its checkpoints land in ./mlflow.db and ./runs, where the user looks."""
    import shutil

    from conftest import SHRINK

    shutil.copytree(ml_dataset, tmp_path / "data" / "ml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["train", "--model", "dlrm", *SHRINK, "--data", "data/ml", "--backend", "ray", "--num-workers", "2"]
    assert main([*args, "--experiment", "relative"]) == 0, capsys.readouterr().err
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("relative")
    assert exp is not None and len(client.search_runs([exp.experiment_id])) == 1
    assert list((tmp_path / "runs").rglob("trainer.pt"))  # the checkpoints are under ./runs


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_worker_error_comes_back_once_as_one_line(
    backend: str, ml_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import SHRINK

    (tmp_path / "a-file").write_text("not a directory\n")
    args = ["train", "--model", "dlrm", *SHRINK, "--data", str(ml_dataset), "--tracking.enabled=false"]
    args += ["--backend", backend, "--num-workers", "2", "--cluster.max_failures", "0"]
    args += ["--data.cache_dir", str(tmp_path / "a-file"), "--trainer.output_dir", str(tmp_path / "runs")]
    with local_ray_session() if backend == "ray" else contextlib.nullcontext():
        code = main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("recsys: error:")]
    assert code == 2 and len(err) == 1, err
    assert "a-file" in err[0] and "\x1b[" not in err[0], err
