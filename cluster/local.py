"""``--backend local``: one process, or ``--num-workers N`` processes on this machine.

The processes get torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, ...), so
Lightning sees a torchelastic-style launch and each runs the same function; gloo on CPU, one GPU per
process on a GPU host. A worker's error comes back to this process as one line.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import random
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from cluster.config import ClusterConfig
from cluster.launch import local_accelerator, one_line
from cluster.runtime import WorkerFn, WorkerRuntime
from core.errors import RecsysError
from core.signals import detach_worker, interruption, stop_signals

log = logging.getLogger(__name__)


EPHEMERAL_PORTS = (32768, 60999)
"""Linux's default ``ip_local_port_range``: the kernel hands these out to every ``bind(0)`` and
outgoing connection on the machine."""


def free_port() -> int:
    """A loopback port free now, for a rendezvous the workers reach later: drawn below the ephemeral
    range when one is free there, so that no other process's ``bind(0)`` or connection takes it in
    the meantime (a port the kernel picked would be handed out again at once)."""
    low, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(64):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return EPHEMERAL_PORTS


def torchrun_env(rank: int, world: int, port: int, run_id: str) -> dict[str, str]:
    """The environment torchrun gives a worker on a single node."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "GROUP_RANK": "0",
        "NODE_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "TORCHELASTIC_RUN_ID": run_id,
    }


STOP_GRACE_S = 10.0
"""How long stopped workers get to unwind (release the data cache, leave their process group) before
they are killed."""


def _worker(fn: WorkerFn, payload: Any, runtime: WorkerRuntime, port: int, run_id: str, results: Any) -> None:
    detach_worker()  # the terminal's signals reach the launcher, which stops the workers in order
    os.environ.update(torchrun_env(runtime.rank, runtime.world_size, port, run_id))
    with stop_signals():  # the launcher's terminate() (or the terminal's Ctrl-C) unwinds this worker
        try:
            metrics = fn(payload, runtime)
        except BaseException as e:
            stop = interruption(e)
            if stop is not None:  # stopped by the launcher, or with it: nothing to report
                raise SystemExit(stop.exit_code) from None
            if not isinstance(e, RecsysError):  # not a user error: the trace with --verbose
                log.debug("worker rank %d failed", runtime.rank, exc_info=True)
            results.put(("error", runtime.rank, one_line(e)))  # to the launcher once, as one line
            raise SystemExit(2) from None
    if runtime.rank == 0:
        results.put(("ok", 0, metrics))


def _in_process(fn: WorkerFn, payload: Any, runtime: WorkerRuntime) -> dict[str, Any]:
    """One worker in this process; its error comes back as one line, as a spawned worker's does."""
    try:
        return fn(payload, runtime)
    except RecsysError:
        raise
    except Exception as e:
        log.debug("worker rank 0 failed", exc_info=True)  # the trace with --verbose
        raise RecsysError(f"worker rank 0: {one_line(e)}") from None


def launch(fn: WorkerFn, payload: Any, cluster: ClusterConfig, name: str) -> dict[str, Any]:
    """Run ``fn`` here: in this process, or in ``cluster.num_workers`` spawned ones (each in a process
    group of its own, stopped by this one: ``core.signals.detach_worker``)."""
    n = cluster.num_workers
    accelerator = local_accelerator(cluster.accelerator)
    if n == 1:
        return _in_process(fn, payload, WorkerRuntime(devices=1, accelerator=accelerator))
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    procs = [
        ctx.Process(
            target=_worker,
            args=(
                fn,
                payload,
                WorkerRuntime(rank=r, world_size=n, devices=n, accelerator=accelerator),
                port,
                run_id,
                results,
            ),
        )
        for r in range(n)
    ]
    for p in procs:
        p.start()
    outcome: dict[str, Any] | None = None
    error: str | None = None
    try:
        while outcome is None and error is None:
            if not results.empty():
                kind, rank, value = results.get()
                if kind == "error":
                    error = f"worker rank {rank}: {value}"
                else:
                    outcome = value
            elif any(p.exitcode not in (None, 0) for p in procs) and results.empty():
                bad = next(p for p in procs if p.exitcode not in (None, 0))
                error = f"worker rank {procs.index(bad)} exited with code {bad.exitcode}"
            elif all(p.exitcode is not None for p in procs) and results.empty():
                error = "the workers exited without a result"
            else:
                for p in procs:
                    p.join(0.2)
    finally:
        stop(procs, error is not None or outcome is None)
    if error is not None:
        raise RecsysError(error)
    assert outcome is not None
    return outcome


def stop(procs: list[Any], failed: bool) -> None:
    """Wait for the workers; when one failed or this launcher was interrupted, stop the others first
    (they would wait on it forever): SIGTERM, ``STOP_GRACE_S`` to unwind, then SIGKILL."""
    if failed:
        for p in procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
    for p in procs:
        p.join()
