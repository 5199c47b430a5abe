"""One rule for every command that writes an output path (``--out``): what it may replace, and how
it writes so that nothing is ever half-written.

    from core.output import OutputKind, atomic_output, check_output

    RECS = OutputKind("a recommendations folder", is_dir=True, problem=lambda p: ...)
    check_output(out, RECS, overwrite)              # refuse a bad --out before any work (one line)
    with atomic_output(out, RECS, overwrite) as tmp:
        write(tmp)                                  # a new directory (is_dir) or a file path to create
    # now installed at ``out``; on any error nothing is left at ``out`` nor beside it

The rule (``--out`` is a path typed by a person, and several commands may write at once):

- never ``.``, the current directory or one of its parents (resolved or not), never an empty path;
- the parent folder must exist (nothing is created above the output: a typo stays a typo);
- an existing path is replaced only if it is an output of the same kind (``OutputKind.problem`` says
  why not: a folder of other content, a file where a folder is expected, a device such as
  ``/dev/null``) and only with ``overwrite``; symlinks are replaced, never followed into;
- the output is written into a temporary sibling ``.NAME.tmp-HOST-PID-START-RANDOM`` (START: the
  process's start time, so a reused pid is not mistaken for the writer) and moved into place under an
  exclusive lock on the parent, after checking the target again: an output that appeared meanwhile
  (another writer finished first) fails this command unless ``overwrite``. On Linux the move is one
  ``renameat2`` call (RENAME_NOREPLACE, or RENAME_EXCHANGE to swap with the output it replaces), so no
  moment leaves ``out`` missing or half-replaced, even if the process is killed;
- a second writer of the same output while the first is alive fails at once; the temporaries of a
  killed writer are reclaimed by the next writer of that output;
- every operating-system error (a read-only or pseudo filesystem such as ``/proc``, no permission,
  no space) is one ``RecsysError`` line naming ``--out``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import stat
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from core.errors import RecsysError

_TEMP = re.compile(r"^(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]+$")
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


@dataclass(frozen=True)
class OutputKind:
    """What a command writes at ``--out``: a directory or a file, and how to recognise one it wrote."""

    name: str
    """As in messages: "a prepared dataset", "a vector index", "a Parquet file"."""
    is_dir: bool
    problem: Callable[[Path], str | None]
    """Why an existing path (a directory for ``is_dir`` kinds, else a file) is not of this kind, or None."""


def what_is(path: Path) -> str:
    """A few words on what an existing path is, for messages."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "a broken symlink" if path.is_symlink() else "unreadable"
    for test, words in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISREG, "a file"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return words
    return "not a file"


def has_file(name: str) -> Callable[[Path], str | None]:
    """``OutputKind.problem`` for directory kinds recognised by one file they always hold."""

    def problem(path: Path) -> str | None:
        return None if (path / name).is_file() else f"no {name}"

    return problem


def has_magic(magic: bytes) -> Callable[[Path], str | None]:
    """``OutputKind.problem`` for file kinds recognised by their first bytes (Parquet: ``PAR1``)."""

    def problem(path: Path) -> str | None:
        try:
            with path.open("rb") as f:
                head = f.read(len(magic))
        except OSError as e:
            return f"unreadable: {e.strerror}"
        return None if head == magic else "other content"

    return problem


def _mismatch(path: Path, kind: OutputKind) -> str | None:
    """Why ``path`` (which exists) is not an output of ``kind``, or None."""
    real = path.resolve()
    if kind.is_dir != real.is_dir() or not (real.is_dir() or real.is_file()):
        return what_is(path)
    reason = kind.problem(real)
    return None if reason is None else f"{what_is(path)} ({reason})"


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
    """Remove the temporaries of dead writers of ``parent/name`` (this host's); returns the pids of
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


def check_output(
    out: str | Path, kind: OutputKind, overwrite: bool, flag: str = "--out", keep: str | Path | None = None
) -> Path:
    """Refuse, with one line, an output path the rule above forbids; returns it as an absolute path
    (``keep``: an input that replacing ``out`` must not delete, e.g. ``--source``)."""
    if str(out).strip() == "":
        raise RecsysError(f"{flag}: empty path")
    if str(out).startswith("~"):  # a quoted ~ reaches us as is: a folder named "~" is never what was meant
        raise RecsysError(
            f"{flag} {out}: '~' is not expanded here (it was quoted); write the path out, "
            f"e.g. {flag} {os.path.expanduser(str(out))}"
        )
    target = Path(os.path.abspath(out))  # no symlink resolution: a link is replaced, not its target
    cwd = Path.cwd()
    if any(t == cwd or t in cwd.parents for t in (target, target.resolve())):
        raise RecsysError(f"{flag} {out}: is the current directory or one of its parents; choose a new path")
    parent = target.parent
    if not parent.is_dir():
        missing = "does not exist" if not parent.exists() else f"is {what_is(parent)}, not a folder"
        raise RecsysError(f"{flag} {out}: its parent folder {parent} {missing}; create it first")
    if target.exists() or target.is_symlink():
        mismatch = _mismatch(target, kind)
        if mismatch is not None:
            raise RecsysError(
                f"{flag} {out}: is {mismatch}, not {kind.name}; only {kind.name} is ever replaced there: "
                "remove it yourself or choose another path"
            )
        if not overwrite:
            raise RecsysError(f"{flag} {out}: already exists (pass --overwrite to replace it)")
        if keep is not None and target.resolve() in Path(keep).resolve().parents:
            raise RecsysError(f"{keep}: lies inside {flag} {out}, which --overwrite would delete")
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
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock on a directory (every writer installing into it takes it; so does the
    first writer of a new SQLite tracking store, ``app.tracking.prepare_store``)."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _install(tmp: Path, target: Path, out: str | Path, kind: OutputKind, overwrite: bool, flag: str) -> None:
    """Move the finished ``tmp`` to ``target``; replace an existing output only with ``overwrite``."""
    appeared = RecsysError(
        f"{flag} {out}: appeared while this command ran (another writer finished first); "
        "nothing replaced (pass --overwrite to replace it)"
    )
    with locked(target.parent):
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
        check_output(out, kind, overwrite, flag)  # still an output of this kind
        if _renameat2(tmp, target, _RENAME_EXCHANGE):
            _remove(tmp)  # now holds the replaced output
            return
        old = target.parent / temp_name(target.name, "old")
        target.rename(old)
        tmp.rename(target)
        _remove(old)


@contextlib.contextmanager
def atomic_output(
    out: str | Path, kind: OutputKind, overwrite: bool = False, flag: str = "--out", keep: str | Path | None = None
) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` (an empty directory for directory kinds, a path to create
    for file kinds); install it at ``out`` only when the body succeeds (the rule in the module docstring)."""
    target = check_output(out, kind, overwrite, flag, keep)
    parent = target.parent
    tmp = parent / temp_name(target.name, "tmp")
    try:
        writers = reclaim_temporaries(parent, target.name)
        if writers:
            raise RecsysError(f"{flag} {out}: another recsys process (pid {writers[0]}) is writing it now; wait for it")
        if kind.is_dir:
            tmp.mkdir()
        else:
            tmp.touch(exist_ok=False)
    except OSError as e:
        raise RecsysError(f"{flag} {out}: cannot write in {parent} ({e.strerror or e})") from None
    try:
        try:
            yield tmp
        except OSError as e:
            if e.errno not in WRITE_ERRORS:  # e.g. an input the body could not read: its own error
                raise
            raise RecsysError(f"{flag} {out}: cannot write the output ({os_reason(e)})") from None
        require_written(tmp, kind, out, flag)
        try:
            _install(tmp, target, out, kind, overwrite, flag)
        except OSError as e:
            raise RecsysError(f"{flag} {out}: cannot install the output ({e.strerror or e})") from None
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}
"""What writing an output can run into however it was checked beforehand: no space, a quota, a file
too large, a filesystem gone read-only, a failing disk."""


def os_reason(error: OSError) -> str:
    """The operating system's words for an error (``No space left on device``), with its errno name."""
    name = errno.errorcode.get(error.errno or 0, "")
    text = error.strerror or str(error)
    return f"{text}, {name}" if name else text


def require_written(tmp: Path, kind: OutputKind, out: str | Path, flag: str) -> None:
    """The body wrote what it promised (a file output left empty is a bug, not an output)."""
    if not kind.is_dir and (not tmp.is_file() or tmp.stat().st_size == 0):
        raise RecsysError(f"{flag} {out}: nothing was written")


PARQUET_FILE = OutputKind("a Parquet file", is_dir=False, problem=has_magic(b"PAR1"))
"""A single Parquet file (``recsys recommend --out recs.parquet``)."""
