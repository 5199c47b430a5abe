"""One signal policy for every command: killed by SIGINT, SIGTERM or SIGHUP, ``recsys`` exits with
128 + the signal's number and one line, its child processes and workers are gone, and the MLflow run
of a training ends KILLED with an end time. Real processes, real signals, tiny data; each test waits
for a known event (a training's first logged metric, a request reaching the tracking server) before
it sends the signal."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from conftest import CONFIGS, shrunk_flags

from core.output import locked

ROOT = Path(__file__).parent.parent


@dataclass
class Killed:
    code: int
    stderr: list[str]
    """What the command wrote on stderr after the signal was sent."""
    descendants: list[psutil.Process] = field(default_factory=list)

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr if line.startswith("recsys:")]


def run_and_kill(
    argv: list[str], ready: Callable[[], bool], signum: int, cwd: Path, wait_s: float = 240, group: bool = False
) -> Killed:
    """Run ``recsys ARGV``; once ``ready()`` holds, send ``signum`` to it alone (as ``kill PID`` or a
    scheduler does), or with ``group`` to its whole process group (as a terminal's hang-up or Ctrl-C
    does), and wait for it to exit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", *argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group: nothing of it survives the test unnoticed
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in proc.stderr), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        deadline = time.monotonic() + wait_s
        while not ready():
            assert proc.poll() is None, f"exited before it was ready ({proc.returncode}):\n" + "\n".join(lines)
            assert time.monotonic() < deadline, "never ready:\n" + "\n".join(lines)
            time.sleep(0.2)
        descendants = psutil.Process(proc.pid).children(recursive=True)
        before = len(lines)
        if group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        code = proc.wait(120)
        reader.join(10)
        return Killed(code, lines[before:], descendants)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def gone(processes: list[psutil.Process], within_s: float = 30) -> list[psutil.Process]:
    """Those of ``processes`` still running after ``within_s`` (zombies count as gone)."""
    deadline = time.monotonic() + within_s
    while True:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def assert_one_line(killed: Killed, signum: int) -> None:
    name = signal.Signals(signum).name
    text = "\n".join(killed.stderr)
    assert killed.code == 128 + signum, text
    assert killed.error_lines() == [f"recsys: interrupted ({name})"], text
    assert "Traceback" not in text and "Fatal Python error" not in text and "SIGABRT" not in text, text


def first_metric_logged(uri: str) -> Callable[[], bool]:
    """True once a run of the store has logged a training metric: the fit loop is running."""
    from mlflow.tracking import MlflowClient

    def ready() -> bool:
        # under the lock the command creates a new SQLite store with (app.tracking.prepare_store): two
        # clients creating one store at once race in its migration
        with locked(Path(uri.removeprefix("sqlite:///")).parent):
            client = MlflowClient(uri)
            try:
                runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            except Exception:  # the store is being created by the command
                return False
        return any("train/loss_step" in r.data.metrics for r in runs)

    return ready


def killed_run(uri: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED" and run.info.end_time, run.info


def train_argv(tmp: Path, data: Path, *flags: str) -> list[str]:
    uri = f"sqlite:///{tmp}/mlflow.db"
    return [
        "train",
        "--config",
        str(CONFIGS / "dlrm-movielens.yaml"),
        *shrunk_flags(tmp, data),
        "--tracking.enabled=true",
        f"--tracking-uri={uri}",
        "--max-epochs=200",
        *flags,
    ]


@pytest.mark.parametrize(
    ("signum", "workers"), [(signal.SIGTERM, 1), (signal.SIGHUP, 2)], ids=["SIGTERM-1-process", "SIGHUP-2-processes"]
)
def test_a_killed_local_training_exits_128_plus_signal_and_its_run_is_killed(
    signum: int, workers: int, ml_dataset: Path, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = train_argv(tmp_path, ml_dataset, f"--num-workers={workers}")
    killed = run_and_kill(argv, first_metric_logged(uri), signum, tmp_path)
    assert_one_line(killed, signum)
    assert not gone(killed.descendants), "worker processes outlived the command"
    killed_run(uri)


@pytest.mark.slow
def test_a_terminal_hangup_of_a_two_process_training_is_one_line(ml_dataset: Path, tmp_path: Path) -> None:
    """SIGHUP to the whole process group (a closed terminal): the workers are in groups of their own and
    stopped by the launcher; multiprocessing's resource tracker outlives the hang-up (it printed a
    ``KeyError`` traceback per shared-memory name a worker unregistered after it was restarted)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = train_argv(tmp_path, ml_dataset, "--num-workers=2")
    killed = run_and_kill(argv, first_metric_logged(uri), signal.SIGHUP, tmp_path, group=True)
    assert_one_line(killed, signal.SIGHUP)
    assert not gone(killed.descendants), "worker processes outlived the command"
    killed_run(uri)


@pytest.mark.cluster
def test_a_terminal_signal_to_a_spark_training_is_one_line(ml_dataset: Path, tmp_path: Path) -> None:
    """SIGTERM to the whole process group of a Spark training (TorchDistributor, 2 processes): the
    JVM, in that group, dies at once, and py4j logged a traceback for each command it could no longer
    send; now the command's one line alone."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = train_argv(tmp_path, ml_dataset, "--backend=spark", "--num-workers=2")
    killed = run_and_kill(argv, first_metric_logged(uri), signal.SIGTERM, tmp_path, group=True)
    assert_one_line(killed, signal.SIGTERM)
    assert not [line for line in killed.stderr if "ERROR" in line], killed.stderr
    # the run's end status is not asserted: the training processes die of the same signal, and whether
    # their failure or the signal reaches the launcher first decides FAILED or KILLED (a known race)


def test_a_signal_while_the_interpreter_exits_after_the_work_is_one_line(ml_dataset: Path, tmp_path: Path) -> None:
    """The command's work is done and printed; a SIGTERM while Python shuts down (here held open by an
    exit handler, as torch's and MLflow's teardown hold it) is still 143 and one line, not a silent -15."""
    script = (
        "import atexit, sys, time\n"
        "atexit.register(time.sleep, 60)\n"
        f"sys.argv = ['recsys', 'data', 'summary', {str(ml_dataset)!r}]\n"
        "from app.cli import main\n"
        "sys.exit(main())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the summary's first line: the work is done, shutdown has begun
        assert first.startswith("dataset"), first
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines() == ["recsys: interrupted (SIGTERM)"], err


@pytest.mark.cluster
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_killed_ray_training_stops_its_workers_and_its_local_ray(
    signum: int, ml_dataset: Path, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = train_argv(
        tmp_path, ml_dataset, "--backend=ray", "--num-workers=2", f"--cluster.storage_path={tmp_path / 'ray'}"
    )
    killed = run_and_kill(argv, first_metric_logged(uri), signum, tmp_path)
    assert_one_line(killed, signum)
    assert not gone(killed.descendants), "Ray processes outlived the command"
    killed_run(uri)


@pytest.fixture
def silent_server() -> Iterator[tuple[str, threading.Event]]:
    """An HTTP address on 127.0.0.1 that accepts connections and never answers: a command talking to
    it is busy for as long as the test likes. The event is set at the first connection."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    connected = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)
            connected.set()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", connected
    finally:
        server.close()
        for conn in held:
            conn.close()


@pytest.mark.parametrize(
    ("command", "signum"),
    [
        (["index", "--run-id", "0123abcd"], signal.SIGTERM),
        (["recommend", "--retrieval", "0123abcd", "--user", "1"], signal.SIGINT),
    ],
    ids=["index-SIGTERM", "recommend-SIGINT"],
)
def test_an_interrupted_index_or_recommend_exits_128_plus_signal_with_one_line(
    command: list[str], signum: int, silent_server: tuple[str, threading.Event], tmp_path: Path
) -> None:
    url, connected = silent_server
    killed = run_and_kill([*command, "--tracking-uri", url], connected.is_set, signum, tmp_path)
    assert_one_line(killed, signum)
