"""``--backend local``: one process, or ``--num-workers N`` processes on this machine.

The processes get torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, ...), so
Lightning sees a torchelastic-style launch and each runs the same function; gloo on CPU, one GPU per
process on a GPU host. A worker's error comes back to this process as one line.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import uuid
from typing import Any

from cluster.config import ClusterConfig
from cluster.launch import local_accelerator, one_line
from cluster.runtime import WorkerFn, WorkerRuntime
from core.errors import RecsysError

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def _worker(fn: WorkerFn, payload: Any, runtime: WorkerRuntime, port: int, run_id: str, results: Any) -> None:
    os.environ.update(torchrun_env(runtime.rank, runtime.world_size, port, run_id))
    try:
        metrics = fn(payload, runtime)
    except BaseException as e:  # report it to the launcher once, as one line
        if not isinstance(e, RecsysError | KeyboardInterrupt):  # not a user error: the trace with --verbose
            log.debug("worker rank %d failed", runtime.rank, exc_info=True)
        results.put(("error", runtime.rank, one_line(e)))
        raise SystemExit(2) from None
    if runtime.rank == 0:
        results.put(("ok", 0, metrics))


def launch(fn: WorkerFn, payload: Any, cluster: ClusterConfig, name: str) -> dict[str, Any]:
    """Run ``fn`` here: in this process, or in ``cluster.num_workers`` spawned ones."""
    n = cluster.num_workers
    accelerator = local_accelerator(cluster.accelerator)
    if n == 1:
        return fn(payload, WorkerRuntime(devices=1, accelerator=accelerator))
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
        for p in procs:  # one rank failed (or we were interrupted): the others would wait on it forever
            if (error is not None or outcome is None) and p.is_alive():
                p.terminate()
            p.join()
    if error is not None:
        raise RecsysError(error)
    assert outcome is not None
    return outcome
