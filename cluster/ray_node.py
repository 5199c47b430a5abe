"""How the Ray nodes a run starts or joins are exposed: loopback binding and the token file.

Ray 2.60 binds a node's gRPC servers (GCS, raylet and object manager, core workers, dashboard agent) to
127.0.0.1 only when the node's IP is exactly ``127.0.0.1`` (the GCS server is built with
``listen_to_localhost_only = node_ip_address == "127.0.0.1"``), and to all interfaces otherwise. Its
Python side, though, rewrites a loopback node IP or cluster address into the machine's routable IP
(``ray._private.services.resolve_ip_for_localhost``) unless Ray runs in its single-host mode,
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (the default on macOS and Windows): ``ray.init(_node_ip_address=
"127.0.0.1")`` and ``ray start --head --node-ip-address 127.0.0.1`` alone still listen on ``*``. So the
local Ray started for a run, and a driver joining a cluster at a loopback address, run in that mode.
In it ``ray start --address`` refuses to add a node, so a cluster of several machines (or of nodes
started with ``ray start`` on one) listens on its node IPs' interfaces: protect it with token
authentication and a private network.

Ray's token auth (``RAY_AUTH_MODE=token``, on by default for a new local ``ray.init`` in 2.60) reads
the token from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``; Ray writes that
file with the process umask (usually world-readable), so it is kept at 0600 here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

SINGLE_HOST_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
LOOPBACK_IP = "127.0.0.1"


def is_loopback(address: str) -> bool:
    """Whether a Ray address (``host:port``, ``ray://host:port``, ``http://host:port``) names this host's loopback."""
    target = address.split("://", 1)[-1].rstrip("/")
    host = target.rsplit(":", 1)[0] if target.count(":") == 1 or target.startswith("[") else target
    return host.strip("[]") in LOOPBACK_HOSTS


@contextlib.contextmanager
def single_host_mode() -> Iterator[None]:
    """Ray's single-host mode while a node is started or joined: a loopback node IP stays 127.0.0.1, so
    every server of the node binds loopback; processes started meanwhile (GCS, raylet, agents, and the
    workers the raylet starts later) inherit it through the environment."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(SINGLE_HOST_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_HOST_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # Ray reads the variable at import, which may be past
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(SINGLE_HOST_ENV, None)
        else:
            os.environ[SINGLE_HOST_ENV] = saved_env


def token_path() -> Path:
    """Where Ray reads its token file: ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def private_token(create: bool = False) -> Path | None:
    """Keep the Ray token file readable by its owner only (0600); with ``create`` (a new local cluster
    is about to start with token auth), write a new token that way when there is none, instead of
    letting Ray write one with the umask. Returns the file, or None when there is none to use."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None  # the token is in the environment, not on disk
    path = token_path()
    if not path.exists():
        if not create or os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
            return None
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process wrote it meanwhile: tighten that one below
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes: 256 bits, hex
            return path
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        try:
            path.chmod(0o600)
            log.info("made the Ray token file %s private (mode %o -> 600)", path, mode)
        except PermissionError:  # not ours to change: say so, the cluster still works
            log.warning("the Ray token file %s is readable by others (mode %o); chmod 600 it", path, mode)
    return path


TOKEN_HINT = (
    "set RAY_AUTH_MODE=token and the cluster's token (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)"
)


def check_token(address: str, timeout_s: float = 10.0) -> None:
    """Refuse, with one line and at once, a cluster (its GCS at ``host:port``) that rejects this
    client's token: ``ray.init`` would retry for about 30 s, printing an InvalidAuthToken line each
    second, then fail with a traceback. One GCS call (``GetClusterId``, the first one ``ray.init``
    makes) on a channel built by Ray's own ``init_grpc_channel``, which adds the token exactly as Ray
    will; anything but a refused token is left to ``ray.init`` to report."""
    import grpc
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    from ray.exceptions import AuthenticationError

    from core.errors import RecsysError

    channel = init_grpc_channel(address)
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)  # type: ignore[attr-defined]
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNAUTHENTICATED:
            detail = " ".join(str(e.details() or "token refused").split())
            refused = f"--ray-address {address}: the Ray cluster refused this client ({detail}); {TOKEN_HINT}"
            raise RecsysError(refused) from None
    except AuthenticationError:  # RAY_AUTH_MODE=token here, and no token to send
        missing = f"--ray-address {address}: token authentication is on but no token found; {TOKEN_HINT}"
        raise RecsysError(missing) from None
    finally:
        channel.close()
