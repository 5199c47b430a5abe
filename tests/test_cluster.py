"""Clusters for real on one machine, and what they expose: a local Ray for a run listens on loopback
only, the Ray token file stays private, a two-node Ray cluster on 127.0.0.1 trains with a worker on
each node, and a Spark standalone master and worker (Spark's own classes) train on executors."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import CONFIGS, shrunk_flags

from cluster.local import free_port
from cluster.ray_node import SINGLE_HOST_ENV, is_loopback, private_token

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
LOOPBACK_IPS = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def user_env(home: Path, **extra: str) -> dict[str, str]:
    """A fresh user's environment (no Ray/Spark settings of ours) with HOME at ``home`` and this
    checkout first on the path of every process the services start."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SPARK_", "PYSPARK_", "MASTER_"))}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return {**env, **extra}


def tree(*roots: int) -> set[int]:
    """The processes ``roots`` and all their descendants still alive."""
    pids: set[int] = set()
    for pid in roots:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            pids |= {proc.pid, *(c.pid for c in proc.children(recursive=True))}
    return pids


def listening(pids: set[int]) -> list[tuple[str, int, str]]:
    """(ip, port, process name) of every TCP socket ``pids`` listen on."""
    out = []
    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids and c.laddr:
            with contextlib.suppress(psutil.Error):
                ip, port = c.laddr[0], c.laddr[1]
                out.append((ip, port, psutil.Process(c.pid).name()))
    return out


def assert_loopback_only(pids: set[int]) -> None:
    sockets = listening(pids)
    assert sockets, "the services listen on nothing?"
    exposed = [s for s in sockets if s[0] not in LOOPBACK_IPS]
    assert not exposed, f"listening beyond loopback: {exposed}"


def wait_for_port(port: int, proc: subprocess.Popen[str], seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds}s")


@contextlib.contextmanager
def services() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes started in sessions of their own, stopped with everything they started (SIGTERM, then
    SIGKILL) however the test ends."""
    procs: list[subprocess.Popen[str]] = []
    try:
        yield procs
    finally:
        pids = tree(*(p.pid for p in procs))
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        _, alive = psutil.wait_procs([psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)], timeout=20)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def start(procs: list[subprocess.Popen[str]], cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    out = log.open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    procs.append(proc)
    return proc


def recsys(env: dict[str, str], *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def train_dlrm_one_epoch(
    env: dict[str, str], dataset: Path, tmp_path: Path, *cluster_flags: str
) -> tuple[subprocess.CompletedProcess[str], str]:
    """``recsys train`` of the shrunk synthetic-ctr DLRM for one epoch with ``cluster_flags``, tracked in a
    sqlite store under ``tmp_path``: the process and the store's URI."""
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    flags = [f for f in shrunk_flags(tmp_path, dataset, tracking=True) if not f.startswith("--max-epochs")]
    config = str(CONFIGS / "dlrm-synthetic-ctr.yaml")
    return recsys(env, "train", "--config", config, *flags, "--max-epochs=1", *cluster_flags), tracking


def finished_run(tracking: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    (run,) = runs
    assert run.info.status == "FINISHED" and "test/auroc" in run.data.metrics
    return dict(run.data.params)


# -- token file -------------------------------------------------------------------------------------


def test_ray_token_file_is_kept_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(key, raising=False)
    token = tmp_path / ".ray" / "auth_token"
    assert private_token() is None and not token.exists()  # reading never creates one

    created = private_token(create=True)  # a new local Ray is about to start: the token is written 0600
    assert created == token and stat.S_IMODE(token.stat().st_mode) == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text())

    token.chmod(0o644)  # as `ray get-auth-token --generate` leaves it with the usual umask
    assert private_token() == token and stat.S_IMODE(token.stat().st_mode) == 0o600

    other = tmp_path / "elsewhere" / "token"
    other.parent.mkdir()
    other.write_text("x" * 64)
    other.chmod(0o640)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(other))
    assert private_token() == other and stat.S_IMODE(other.stat().st_mode) == 0o600


def test_documented_token_command_writes_a_private_file(tmp_path: Path) -> None:
    """README: ``(umask 077 && ray get-auth-token --generate)``."""
    subprocess.run(
        ["bash", "-c", "umask 077 && ray get-auth-token --generate"],
        env=user_env(tmp_path),
        check=True,
        capture_output=True,
        timeout=120,
    )
    token = tmp_path / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700


def test_loopback_addresses() -> None:
    for address in ("127.0.0.1:6379", "localhost:6379", "ray://127.0.0.1:10001", "[::1]:6379", "http://127.0.0.1:8265"):
        assert is_loopback(address), address
    for address in ("10.0.0.5:6379", "head:6379", "ray://10.1.2.3:10001", "192.0.2.2"):
        assert not is_loopback(address), address


# -- the local Ray a run starts ---------------------------------------------------------------------

LOCAL_RAY = """
import json, os, psutil
import ray  # imported before the run starts Ray, as in a process that imported it earlier
from cluster.config import ClusterConfig
from cluster.ray_train import connect

connect(ClusterConfig(backend="ray", num_workers=2))

@ray.remote
def where():
    return os.getpid()

ray.get([where.remote() for _ in range(2)])  # core workers run, each with its gRPC server
me = psutil.Process()
pids = [me.pid, *(c.pid for c in me.children(recursive=True))]
print("PIDS " + json.dumps(pids), flush=True)
input()  # the test looks at the sockets, then lets go
ray.shutdown()
"""


@pytest.mark.cluster
def test_local_ray_for_a_run_listens_on_loopback_only(tmp_path: Path) -> None:
    """GCS, raylet, object manager, agents, driver and workers of the Ray that ``--backend ray`` starts:
    not one listening socket beyond 127.0.0.1; the token Ray's default token auth needs is 0600."""
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCAL_RAY],
        env=user_env(tmp_path),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    with services() as procs:
        procs.append(proc)
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line.startswith("PIDS "), line + (proc.stderr.read() if proc.stderr else "")
        pids = set(json.loads(line[5:]))
        names = {name for _, _, name in listening(pids)}
        assert {"gcs_server", "raylet"} <= names, names
        assert_loopback_only(pids)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(60) == 0
    token = tmp_path / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600


# -- the processes of --backend local ---------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_training_listens_on_loopback_only(backend: str, ctr_wide_dataset: Path, tmp_path: Path) -> None:
    """``recsys train --backend local|ray --num-workers 2`` (what ``ss -ltn`` would show): every socket
    the run's processes listen on, watched while it trains (Ray's servers and workers, rank 0's
    rendezvous store, gloo's pairs), is on 127.0.0.1. Without ``core.rendezvous`` torch has the store
    listen on every interface, under both backends."""
    flags = [f for f in shrunk_flags(tmp_path, ctr_wide_dataset) if not f.startswith("--max-epochs")]
    cmd = [str(BIN / "recsys"), "train", "--config", str(CONFIGS / "dlrm-synthetic-ctr.yaml"), *flags]
    cmd += ["--max-epochs=2", "--num-workers=2", f"--backend={backend}", f"--cluster.storage_path={tmp_path / 'ray'}"]
    proc = subprocess.Popen(
        cmd, env=user_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    seen: set[tuple[str, int, str]] = set()
    with services() as procs:
        procs.append(proc)
        while proc.poll() is None:
            seen |= set(listening(tree(proc.pid)))
            time.sleep(0.2)
        output = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, output[-4000:]
    assert len({port for _, port, _ in seen}) >= 2, seen  # the store and the gloo pairs were seen
    exposed = [s for s in seen if s[0] not in LOOPBACK_IPS]
    assert not exposed, f"listening beyond loopback: {exposed}"


# -- a two-node Ray cluster on 127.0.0.1 ------------------------------------------------------------

SECOND_NODE = """
import signal, sys, time
from ray._private.node import Node
from ray._private.parameter import RayParams

gcs, temp_dir, agent_port = sys.argv[1], sys.argv[2], int(sys.argv[3])
params = RayParams(
    gcs_address=gcs, node_ip_address="127.0.0.1", num_cpus=1, num_gpus=0, resources={"second_node": 1},
    temp_dir=temp_dir, object_store_memory=150 * 1024**2, node_manager_port=0, include_log_monitor=True,
    dashboard_agent_listen_port=agent_port,
)
node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exit through atexit: Node stops its processes
print("node", node.node_id, flush=True)
while True:
    time.sleep(3600)
"""

NODES = """
import json, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.monotonic() + 120
while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
    time.sleep(0.5)
print(json.dumps([{"id": n["NodeID"], "ip": n["NodeManagerAddress"], "resources": n["Resources"]}
                  for n in ray.nodes() if n["Alive"]]))
"""


@pytest.fixture
def ray_two_nodes(tmp_path: Path) -> Iterator[dict[str, object]]:
    """A Ray head (``ray start --head``, 1 CPU + ``head_node``) and a second node (1 CPU + ``second_node``)
    on 127.0.0.1, token auth on, every server on loopback.

    The head runs as the README says (single-host mode keeps 127.0.0.1). Ray 2.60's ``ray start
    --address`` refuses to add a node in that mode and, outside it, rewrites 127.0.0.1 into the host's
    routable IP (then everything listens on all interfaces), so the second node is started the way
    ``ray start --address`` starts one, through Ray's ``Node`` with its node IP fixed to 127.0.0.1."""
    home = tmp_path / "home"
    home.mkdir()
    env = user_env(home, RAY_AUTH_MODE="token", RAY_DEDUP_LOGS="0", **{SINGLE_HOST_ENV: "0"})
    token = ["bash", "-c", "umask 077 && ray get-auth-token --generate"]
    subprocess.run(token, env=env, check=True, capture_output=True, timeout=120)
    # Ray's socket paths under --temp-dir must fit AF_UNIX's 107 bytes: pytest's tmp_path is too deep
    short = tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp", ignore_cleanup_errors=True)
    temp_dir, gcs_port = Path(short.name), free_port()
    head = [
        *(str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1"),
        *("--port", str(gcs_port), "--include-dashboard", "false", "--dashboard-host", "127.0.0.1"),
        *("--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port())),
        *("--num-cpus", "1", "--resources", '{"head_node": 1}', "--object-store-memory", str(150 * 1024**2)),
        *("--temp-dir", str(temp_dir), "--disable-usage-stats"),
    ]
    address = f"127.0.0.1:{gcs_port}"
    with short, services() as procs:
        start(procs, head, env, tmp_path / "head.log")
        wait_for_port(gcs_port, procs[0])
        second = [sys.executable, "-c", SECOND_NODE, address, str(temp_dir), str(free_port())]
        start(procs, second, env, tmp_path / "node.log")
        nodes = json.loads(
            subprocess.run(
                [sys.executable, "-c", NODES, address], env=env, capture_output=True, text=True, timeout=180, check=True
            ).stdout.splitlines()[-1]
        )
        assert len(nodes) == 2, (nodes, (tmp_path / "node.log").read_text()[-2000:])
        yield {"address": address, "env": env, "nodes": nodes, "pids": tree(*(p.pid for p in procs))}


@pytest.mark.cluster
def test_ray_two_nodes_train_with_a_worker_on_each(
    ray_two_nodes: dict[str, object], ctr_wide_dataset: Path, tmp_path: Path
) -> None:
    """``recsys train --backend ray --ray-address 127.0.0.1:PORT --num-workers 2`` on a head and a second
    node of one CPU each: one worker per node, checkpoints on the storage both nodes share."""
    nodes: list[dict[str, object]] = ray_two_nodes["nodes"]  # type: ignore[assignment]
    assert {n["ip"] for n in nodes} == {"127.0.0.1"}
    assert_loopback_only(ray_two_nodes["pids"])  # type: ignore[arg-type]

    shared = tmp_path / "shared"
    proc, tracking = train_dlrm_one_epoch(
        ray_two_nodes["env"],  # type: ignore[arg-type]
        ctr_wide_dataset,
        tmp_path,
        "--backend=ray",
        f"--ray-address={ray_two_nodes['address']}",
        "--num-workers=2",
        f"--cluster.storage_path={shared}",
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    placed = dict(re.findall(r"\[rank (\d)\] runs on Ray node ([0-9a-f]+)", output))
    assert set(placed) == {"0", "1"}, output[-4000:]
    assert set(placed.values()) == {n["id"] for n in nodes}  # one worker on each node
    assert finished_run(tracking)["cluster.backend"] == "ray"
    reported = list(shared.rglob("checkpoint.ckpt"))
    assert reported, sorted(str(p) for p in shared.rglob("*"))[:50]  # the epoch checkpoint, on the shared path


# -- a Spark standalone master and worker -----------------------------------------------------------


@pytest.fixture
def spark_standalone(tmp_path: Path) -> Iterator[dict[str, object]]:
    """``spark-class org.apache.spark.deploy.master.Master`` and ``...worker.Worker`` (2 cores, 2g) from
    pyspark's own distribution, both on 127.0.0.1, the master's REST submission server off."""
    import pyspark

    spark_home = Path(pyspark.__file__).parent
    env = user_env(
        tmp_path,
        SPARK_HOME=str(spark_home),
        SPARK_LOCAL_IP="127.0.0.1",
        SPARK_LOG_DIR=str(tmp_path / "spark-logs"),
        SPARK_MASTER_OPTS="-Dspark.master.rest.enabled=false",
        PYSPARK_PYTHON=sys.executable,
    )
    port = free_port()
    master = [str(spark_home / "bin" / "spark-class"), "org.apache.spark.deploy.master.Master"]
    master += ["--host", "127.0.0.1", "--port", str(port), "--webui-port", str(free_port())]
    worker = [
        str(spark_home / "bin" / "spark-class"),
        "org.apache.spark.deploy.worker.Worker",
        f"spark://127.0.0.1:{port}",
    ]
    worker += ["--cores", "2", "--memory", "2g", "--host", "127.0.0.1", "--webui-port", str(free_port())]
    worker += ["--work-dir", str(tmp_path / "spark-work")]
    with services() as procs:
        start(procs, master, env, tmp_path / "master.log")
        wait_for_port(port, procs[0])
        start(procs, worker, env, tmp_path / "worker.log")
        deadline = time.monotonic() + 90
        while "Registering worker" not in (tmp_path / "master.log").read_text():
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-2000:]
            time.sleep(0.5)
        yield {"url": f"spark://127.0.0.1:{port}", "env": env, "pids": tree(*(p.pid for p in procs)), "logs": tmp_path}


@pytest.mark.cluster
def test_spark_standalone_trains_on_executors(
    spark_standalone: dict[str, object], ctr_wide_dataset: Path, tmp_path: Path
) -> None:
    """``recsys train --backend spark --spark-master spark://127.0.0.1:PORT`` with barrier tasks on the
    worker's executors (not on the driver)."""
    assert_loopback_only(spark_standalone["pids"])  # type: ignore[arg-type]
    proc, tracking = train_dlrm_one_epoch(
        spark_standalone["env"],  # type: ignore[arg-type]
        ctr_wide_dataset,
        tmp_path,
        "--backend=spark",
        f"--spark-master={spark_standalone['url']}",
        "--num-workers=2",
        "--cluster.spark_local_mode=false",
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    params = finished_run(tracking)
    assert params["cluster.backend"] == "spark" and params["cluster.spark_local_mode"] == "False"
    logs: Path = spark_standalone["logs"]  # type: ignore[assignment]
    launched = re.findall(r"Asked to launch executor (app-\S+) for (recsys-\S+)", (logs / "worker.log").read_text())
    assert launched and launched[0][1].startswith("recsys-dlrm")  # the run's processes ran on the worker's executor
