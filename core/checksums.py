"""One integrity check for every artifact directory: the SHA-256 of each file, listed in the
directory's manifest when it is written and compared before any file is read back.

    files = checksums(directory)                    # {"index.faiss": "ab12...", "retrieval/vocab/x.json": ...}
    manifest["files"] = files                       # written last, beside them
    verify_checksums(directory, files, "manifest.json")   # on load: one RecsysError line per problem

A file truncated, replaced by another run's, reordered (shuffled Parquet rows) or missing is refused
with one line naming it, instead of being read into other items or a deep library traceback. The
manifest itself is not covered (it holds the hashes); ``exact`` also refuses files it does not list.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from core.errors import RecsysError

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path, exclude: Iterable[str]) -> list[str]:
    skip = set(exclude)
    names = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())
    return sorted(n for n in names if n not in skip)


def checksums(root: Path, names: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> dict[str, str]:
    """Relative path (posix) -> SHA-256 of ``names`` under ``root`` (default: every file, ``exclude`` left out)."""
    listed = sorted(names) if names is not None else _files(root, exclude)
    return {name: sha256_file(root / name) for name in listed}


def verify_checksums(
    root: Path, expected: Any, manifest: str, exact: bool = False, exclude: Iterable[str] = ()
) -> None:
    """Refuse (one line) unless every file ``expected`` (a mapping) lists is under ``root`` with that SHA-256
    (``exact``: and no other file, ``exclude`` aside); ``manifest`` names the list in messages."""
    if not isinstance(expected, Mapping) or not expected:
        raise RecsysError(f"{root / manifest}: lists no file hashes (written by an older recsys?): rebuild it")
    for name, digest in expected.items():
        path = root / name
        if not isinstance(name, str) or ".." in Path(name).parts or Path(name).is_absolute():
            raise RecsysError(f"{root / manifest}: lists a path outside its directory ({name!r})")
        if not path.is_file():
            raise RecsysError(f"{path}: missing (listed in {manifest})")
        if sha256_file(path) != digest:
            raise RecsysError(
                f"{path}: its SHA-256 differs from the one in {manifest} (changed, truncated or another "
                "artifact's file): rebuild it"
            )
    if exact:
        extra = [n for n in _files(root, exclude) if n not in expected]
        if extra:
            raise RecsysError(f"{root / extra[0]}: not listed in {manifest} (a file added after it was written)")
