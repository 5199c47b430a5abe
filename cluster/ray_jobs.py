"""``recsys submit``: run a recsys command as a Ray job on a running cluster (Ray Job SDK).

The same as ``ray job submit --address URL --working-dir DIR -- recsys ARGS``, plus what the
SDK lets us do better: check the address and the token before uploading anything, stream the job's
logs, and exit with the job's status (0 when it succeeded, 1 when it failed or was stopped). Stopped
itself (Ctrl-C), it detaches: the job keeps running, and the line says how to stop it.

Ray's job server runs arbitrary code, so the documented setup uses Ray's token authentication:
``RAY_AUTH_MODE=token`` and the cluster's token (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN_PATH`` or
``RAY_AUTH_TOKEN``) in the environment of both ``ray start`` and the submitter; the SDK adds the
token to every request by itself. The token file is kept private (0600, ``cluster.ray_node``).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cluster.ray_node import private_token
from core.errors import RecsysError
from core.signals import Interrupted, interruption

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
COMMANDS = ("train", "evaluate", "data")  # what may follow ``--``


def job_address(address: str | None) -> str:
    """``--address``, else ``RAY_ADDRESS`` when it is a dashboard URL, else the local default."""
    if address:
        return address.rstrip("/")
    env = os.environ.get("RAY_ADDRESS", "")
    return env.rstrip("/") if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS


def check_job_server(address: str) -> None:
    """Fail with one line unless a Ray dashboard answers at ``address`` (before any upload)."""
    if not address.startswith(("http://", "https://")):
        raise RecsysError(f"--address {address}: expected the dashboard URL, e.g. {DEFAULT_ADDRESS}")
    try:
        with urllib.request.urlopen(f"{address}/api/version", timeout=5):
            pass
    except urllib.error.HTTPError:
        return  # something answers (e.g. 401 without a token): the SDK reports what exactly
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise RecsysError(f"--address {address}: no Ray job server there ({reason})") from None


def entrypoint(command: list[str]) -> str:
    """The shell command the job runs: ``recsys`` with ``command``."""
    if not command:
        raise RecsysError("submit: nothing to run; put the recsys command after --, e.g. -- train --backend ray ...")
    if command[0] not in COMMANDS:
        raise RecsysError(f"submit: {command[0]!r} is not a recsys command (one of {', '.join(COMMANDS)})")
    return shlex.join(["recsys", *command])


def submit(
    command: list[str],
    address: str | None = None,
    working_dir: str | None = ".",
    wait: bool = True,
    out: Any = None,
) -> int:
    """Submit ``recsys COMMAND`` as a Ray job; with ``wait``, stream its logs and return 0 on success."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = out or sys.stdout
    url = job_address(address)
    run = entrypoint(command)
    runtime_env: dict[str, Any] = {}
    if working_dir:
        path = Path(working_dir)
        if not path.is_dir():
            raise RecsysError(f"--working-dir {working_dir}: not a directory")
        runtime_env["working_dir"] = str(path.resolve())
    check_job_server(url)
    private_token()  # the SDK reads it: not for other users' eyes
    quiet_sdk_logs()
    try:
        client = JobSubmissionClient(url)
        job_id = client.submit_job(entrypoint=run, runtime_env=runtime_env or None)
    except AuthenticationError as e:
        first = " ".join(str(e).split()).split(". ")[0].rstrip(".")
        raise RecsysError(
            f"--address {url}: the job server refused the request ({first}); set RAY_AUTH_MODE=token "
            "and the cluster's token (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)"
        ) from None
    except (RuntimeError, ConnectionError, ValueError) as e:  # the SDK's errors for a bad server answer
        raise RecsysError(f"--address {url}: {' '.join(str(e).split())[:300]}") from None
    print(f"recsys: submitted Ray job {job_id} to {url}: {run}", file=out, flush=True)
    if not wait:
        print(f"recsys: follow it with: ray job logs --address {url} --follow {job_id}", file=out, flush=True)
        return 0

    async def follow() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(follow())
    except KeyboardInterrupt as e:  # this process stops following; the job is the cluster's
        stop = interruption(e) or Interrupted(signal.SIGINT)
        note = f"detached, the job keeps running (ray job stop --address {url} {job_id})"
        raise Interrupted(stop.signum, note) from None
    info = client.get_job_info(job_id)
    if info.status == JobStatus.SUCCEEDED:
        print(f"recsys: Ray job {job_id} succeeded", file=out, flush=True)
        return 0
    message = " ".join((info.message or "").split()).split(", last available logs")[0][:300]
    raise JobFailed(f"Ray job {job_id} {info.status.value.lower()}: {message}")


def quiet_sdk_logs() -> None:
    """Keep the SDK's per-file packaging chatter (``Ignoring upload ... .gitignore``) off the terminal."""
    import logging

    for name in (
        "ray._private.runtime_env.packaging",
        "ray._private.runtime_env.working_dir",
        "ray.dashboard.modules.dashboard_sdk",
        "ray.dashboard.modules.job.sdk",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)


class JobFailed(RecsysError):
    """The job ran and did not succeed (exit status 1, not 2: the submission itself was fine)."""

    exit_code = 1
