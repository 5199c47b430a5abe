"""The ``torch.distributed`` rendezvous store on loopback.

torch 2.14's ``TCPStore`` server listens on every interface whatever host it is given; it only takes
a pre-opened socket (``master_listen_fd``) as an alternative. When every rank runs on this host, the
store's server is bound here to the loopback address and handed over; a ``multi_tenant`` server is
also what a later ``TCPStore`` on the same port in the same process reuses (how the Ray backend's
process group ends up on it).
"""

from __future__ import annotations

import ipaddress
import socket
from datetime import timedelta
from typing import Any

_HOSTED: list[Any] = []  # servers kept alive for the process's lifetime (the process group reuses them)


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_store(
    host: str, port: int, world_size: int, is_master: bool, timeout: timedelta, multi_tenant: bool = False
) -> Any:
    """A ``TCPStore`` for ``host:port`` (a loopback address); on the master its server listens on
    ``host`` only."""
    import torch.distributed as dist

    if not is_master:
        return dist.TCPStore(host, port, world_size, False, timeout=timeout)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # A group of one has no one to tell its port: the kernel's choice at bind time cannot be taken by
    # another process between a port's pick and its bind (Lightning picks one and lets it go).
    sock.bind((host, 0 if world_size == 1 and not multi_tenant else port))
    sock.listen(128)
    return dist.TCPStore(
        host,
        int(sock.getsockname()[1]),
        world_size,
        True,
        timeout=timeout,
        wait_for_workers=False,
        multi_tenant=multi_tenant,
        master_listen_fd=sock.detach(),
    )


def host_loopback_store(host: str, port: int, world_size: int, timeout_s: float = 1800) -> None:
    """Start, in this process, the multi-tenant store server a later ``init_process_group`` on
    ``host:port`` will reuse rather than bind every interface."""
    _HOSTED.append(loopback_store(host, port, world_size, True, timedelta(seconds=timeout_s), multi_tenant=True))
