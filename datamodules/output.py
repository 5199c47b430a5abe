"""Where ``recsys data prepare`` writes: a temporary sibling of ``--out``, moved into place at the end.

Guards, because ``--out`` is a path typed by a person and several prepares may run at once:

- ``--overwrite`` replaces only a prepared dataset (a directory holding ``metadata.json``), and never
  the current directory or one of its parents; anything else is refused with one line.
- The temporary directory is named ``.NAME.tmp-HOST-PID-START-RANDOM`` (START: the process's start
  time, so that a reused pid is not mistaken for the writer). A second prepare of the same output
  while the first is alive fails at once; the leftovers of a killed one (``tmp`` and the ``old``
  copy of a replaced dataset) are reclaimed by the next prepare next to it.
- The move into place happens under an exclusive lock on the parent directory, after checking the
  target again: an output that appeared meanwhile (another writer finished first) fails this prepare
  unless ``--overwrite``. On Linux the move is one ``renameat2`` call (RENAME_NOREPLACE, or
  RENAME_EXCHANGE to swap with the dataset it replaces), so no moment leaves ``--out`` missing or
  half-replaced, even if the process is killed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from core.errors import RecsysError
from datamodules.schema import METADATA_FILE

_TEMP = re.compile(r"^(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]+$")
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _start_time(pid: int) -> int | None:
    """The start time of a running process (1/100 s), None when no such process runs."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return round(proc.create_time() * 100)
    except psutil.NoSuchProcess:
        return None


def temp_name(name: str, kind: str) -> str:
    """``.NAME.KIND-HOST-PID-START-RANDOM`` for this process (KIND: tmp or old)."""
    pid = os.getpid()
    return f".{name}.{kind}-{_host()}-{pid}-{_start_time(pid)}-{uuid.uuid4().hex[:8]}"


def reclaim_temporaries(parent: Path, name: str) -> list[int]:
    """Remove the temporaries of dead prepares of ``parent/name`` (this host's); returns the pids of
    live processes still writing it."""
    live: list[int] = []
    host = _host()
    for kind in ("tmp", "old"):
        prefix = f".{name}.{kind}-"
        for path in parent.iterdir():
            m = _TEMP.match(path.name[len(prefix) :]) if path.name.startswith(prefix) else None
            if m is None or m["host"] != host:
                continue  # not ours, or another machine's (its pids mean nothing here)
            if _start_time(int(m["pid"])) == int(m["start"]):
                if kind == "tmp":
                    live.append(int(m["pid"]))
                continue
            _remove(path)
    return live


def _require_dataset(target: Path, out: Path) -> None:
    if not (target.is_dir() and (target / METADATA_FILE).is_file()):
        raise RecsysError(
            f"{out}: not a prepared dataset (no {METADATA_FILE}); --overwrite replaces only a dataset "
            "directory: remove it yourself or choose another --out"
        )


def check_output(out: Path, overwrite: bool, source: str | None = None) -> Path:
    """Refuse an ``--out`` that prepare must not write (``source``: the input, which replacing ``out``
    must not delete); returns it as an absolute path."""
    target = Path(os.path.abspath(out))  # no symlink resolution: a link is replaced, not its target
    cwd = Path.cwd()
    if any(t == cwd or t in cwd.parents for t in (target, target.resolve())):
        raise RecsysError(f"--out {out}: is the current directory or one of its parents; choose a new directory")
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise RecsysError(f"{out}: output already exists (pass --overwrite to replace it)")
        _require_dataset(target, out)
        if source and target.resolve() in Path(source).resolve().parents:
            raise RecsysError(f"--source {source}: lies inside --out {out}, which --overwrite would delete")
    return target


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2``; False where the C library or the filesystem lacks it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock on a directory (every prepare writing into it takes it to install)."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _install(tmp: Path, target: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``target``; replace an existing dataset only with ``overwrite``."""
    appeared = RecsysError(
        f"{out}: appeared while this prepare ran (another writer finished first); "
        "nothing replaced (pass --overwrite to replace it)"
    )
    with _locked(target.parent):
        if not (target.exists() or target.is_symlink()):
            try:
                if _renameat2(tmp, target, _RENAME_NOREPLACE):
                    return
            except FileExistsError:
                raise appeared from None
            tmp.rename(target)
            return
        if not overwrite:
            raise appeared
        _require_dataset(target, out)
        if _renameat2(tmp, target, _RENAME_EXCHANGE):
            _remove(tmp)  # now holds the replaced dataset
            return
        old = target.parent / temp_name(target.name, "old")
        target.rename(old)
        tmp.rename(target)
        _remove(old)


@contextlib.contextmanager
def atomic_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; move it to ``out`` only when the body succeeds."""
    from datamodules.integrity import record_shard_hashes

    target = check_output(out, overwrite)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    writers = reclaim_temporaries(parent, target.name)
    if writers:
        raise RecsysError(
            f"{out}: another `recsys data prepare` (pid {writers[0]}) is writing it now; wait for it to finish"
        )
    tmp = parent / temp_name(target.name, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        record_shard_hashes(tmp)  # every engine's shards, checked when the dataset is opened
        _install(tmp, target, out, overwrite)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
