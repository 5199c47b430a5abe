"""Ray jobs against a real head started with ``ray start --head`` on 127.0.0.1 with token auth:
``ray job submit -- recsys train --backend ray`` and ``recsys submit``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.entities import Run

from app.cli import main
from cluster.local import free_port
from cluster.ray_node import SINGLE_HOST_ENV

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parent.parent
BIN = str(Path(sys.executable).parent)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Ray head on 127.0.0.1 whose job server requires the token from ``ray get-auth-token --generate``.

    The token is generated into a temporary HOME (``--generate`` writes ``~/.ray/auth_token``) and handed
    to the head and the clients with RAY_AUTH_TOKEN_PATH, so the test leaves the real home alone.
    """
    home = tmp_path_factory.mktemp("ray-home")
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"  # the job runs this venv's `recsys`
    subprocess.run(  # as the README says: the token file private from the start
        ["bash", "-c", f"umask 077 && {BIN}/ray get-auth-token --generate"],
        env={**base, "HOME": str(home)},
        check=True,
        capture_output=True,
        timeout=60,
    )
    token = home / ".ray" / "auth_token"
    assert token.stat().st_size > 0
    assert token.stat().st_mode & 0o777 == 0o600
    # single-host mode keeps --node-ip-address 127.0.0.1 as it is: GCS, raylet and agents on loopback only
    env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), SINGLE_HOST_ENV: "0"}
    dashboard, gcs = free_port(), free_port()
    start = [
        f"{BIN}/ray",
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        "--port",
        str(gcs),
        "--dashboard-port",
        str(dashboard),
        "--ray-client-server-port",
        str(free_port()),
        "--num-cpus",
        "2",
        "--object-store-memory",
        str(300 * 1024**2),
        "--disable-usage-stats",
    ]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield {"url": f"http://127.0.0.1:{dashboard}", "gcs": f"127.0.0.1:{gcs}", **env}
    finally:
        subprocess.run([f"{BIN}/ray", "stop", "--force"], env=env, capture_output=True, timeout=120, check=False)


def train_args(data: Path, tmp: Path) -> list[str]:
    return [
        "train",
        "--backend",
        "ray",
        "--num-workers",
        "2",
        "--model",
        "dlrm",
        "--data",
        str(data),
        "--max-epochs",
        "1",
        "--arch.embedding_dim",
        "8",
        "--trainer.progress_bar",
        "false",
        "--tracking-uri",
        f"sqlite:///{tmp}/mlflow.db",
        "--cluster.storage_path",
        str(tmp / "ray"),
    ]


def finished_runs(tmp: Path) -> list[Run]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return [r for r in runs if r.info.status == "FINISHED" and "test/auroc" in r.data.metrics]


def test_ray_job_submit_trains_on_the_head(ray_head: dict[str, str], ctr_wide_dataset: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in ray_head.items() if k not in ("url", "gcs")}
    cmd = [f"{BIN}/ray", "job", "submit", "--address", ray_head["url"], "--working-dir", str(ROOT), "--"]
    proc = subprocess.run(
        [*cmd, "recsys", *train_args(ctr_wide_dataset, tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    (run,) = finished_runs(tmp_path)  # the job left one finished MLflow run with its test metrics
    assert run.data.params["cluster.backend"] == "ray"


def test_job_server_requires_the_token(ray_head: dict[str, str], tmp_path: Path) -> None:
    env = {k: v for k, v in ray_head.items() if k not in ("url", "gcs", "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token there
    proc = subprocess.run(
        [f"{BIN}/ray", "job", "list", "--address", ray_head["url"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert "token" in (proc.stdout + proc.stderr).lower()


def recsys_submit(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``recsys submit ...`` as a user runs it: a fresh process (Ray's SDK loads the token once per process)."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "submit", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_recsys_submit_streams_logs_and_exits_with_the_job_status(
    ray_head: dict[str, str], ctr_wide_dataset: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in ray_head.items() if k not in ("url", "gcs")}
    submit = ["--address", ray_head["url"], "--working-dir", str(ROOT), "--"]

    proc = recsys_submit(env, *submit, *train_args(ctr_wide_dataset, tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "test/auroc" in proc.stdout and "succeeded" in proc.stdout  # the job's own output came through
    assert len(finished_runs(tmp_path)) == 1

    # a job that fails exits 1 with one line naming the job and its exit code, after its logs
    proc = recsys_submit(env, *submit, "train", "--model", "dlrm", "--data", str(tmp_path / "missing"))
    assert proc.returncode == 1
    assert "no such dataset directory" in proc.stdout
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "failed" in err[0] and "exit code 2" in err[0], proc.stderr

    # without the token the submission is refused before anything runs
    env = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token there
    proc = recsys_submit(env, *submit, "train", "--data", "x")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "refused" in err[0] and "token" in err[0], proc.stderr


def test_recsys_submit_bad_address(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "--address", f"http://127.0.0.1:{free_port()}", "--", "train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no Ray job server" in err[0]
    assert main(["submit", "--address", "http://127.0.0.1:1", "--", "fit"]) == 2
    assert "not a recsys command" in capsys.readouterr().err


@pytest.mark.parametrize("token", ["none", "wrong"])
def test_training_on_a_cluster_that_refuses_the_token_is_one_line(
    token: str, ray_head: dict[str, str], ctr_wide_dataset: Path, tmp_path: Path
) -> None:
    """Without the cluster's token, or with another one, `recsys train --ray-address` stops with one line
    before Ray's ~30 s of InvalidAuthToken retries and its traceback."""
    env = {k: v for k, v in ray_head.items() if k not in ("url", "gcs", "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token there
    if token == "wrong":
        env["RAY_AUTH_TOKEN"] = "0" * 64
    else:
        env.pop("RAY_AUTH_MODE")
    args = ["-m", "app.cli", *train_args(ctr_wide_dataset, tmp_path), "--ray-address", ray_head["gcs"]]
    proc = subprocess.run(
        [sys.executable, *args, "--tracking.enabled=false"],
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-3000:]
    assert "the Ray cluster refused this client (InvalidAuthToken" in err[0] and "RAY_AUTH_MODE=token" in err[0]
