"""``--backend local``: one process, or ``--num-workers N`` processes on this machine.

The processes get torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, ...), so
Lightning sees a torchelastic-style launch and each runs the same ``train(cfg)``; gloo on CPU, one
GPU per process on a GPU host.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import uuid
from typing import Any

from app.config import RunConfig
from core.errors import RecsysError
from cluster.runtime import WorkerRuntime


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


def _worker(rank: int, world: int, port: int, run_id: str, cfg: RunConfig, results: Any) -> None:
    from app.train import train

    os.environ.update(torchrun_env(rank, world, port, run_id))
    metrics = train(cfg, WorkerRuntime(rank=rank, devices=world))
    if rank == 0:
        results.put(metrics)


def launch(cfg: RunConfig) -> dict[str, Any]:
    """Run ``train(cfg)`` here: in this process, or in ``cfg.cluster.num_workers`` spawned ones."""
    from app.train import train

    n = cfg.cluster.num_workers
    if n < 1:
        raise RecsysError(f"--num-workers: must be at least 1, got {n}")
    if n == 1:
        return train(cfg, WorkerRuntime(devices=1))
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    procs = [ctx.Process(target=_worker, args=(r, n, port, run_id, cfg, results)) for r in range(n)]
    for p in procs:
        p.start()
    failed = None
    for r, p in enumerate(procs):
        p.join()
        if p.exitcode != 0 and failed is None:
            failed = (r, p.exitcode)
            for q in procs:  # one rank died: the others would wait on it forever
                if q.is_alive():
                    q.terminate()
    if failed is not None:
        raise RecsysError(f"--backend local: worker rank {failed[0]} exited with code {failed[1]} (see its log above)")
    return results.get()
