"""Missing or corrupted shards fail the run, naming the shard, instead of shrinking an epoch.

StreamingDataset downloads and decompresses shards in background threads. When one fails (a shard
deleted, bytes overwritten), the thread's exception is raised in a ``Future`` done-callback, where
``concurrent.futures`` only logs it; the callback also sets an event on which the sample iterator
silently stops. The epoch then ends early, or empty, and training carries on (and exits 0). So:

- ``record_shard_hashes``: at prepare time, every shard's xxh64 goes into its split's ``index.json``
  (the ``hashes`` field StreamingDataset's ``validate_hash`` reads), for every preparation engine.
- ``check_split``: when a dataset is opened, every shard listed in a split's ``index.json`` must
  exist with its listed size (local datasets; a stat per shard), and the split's hash algorithm is
  returned so that StreamingDataset validates each shard as it copies it into the cache.
- ``datamodules.checked_dataset.CheckedStreamingDataset``: a StreamingDataset whose thread errors
  are kept, not logged, and raised by ``__iter__`` as one RecsysError line naming the shard.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from core.errors import RecsysError

HASH_ALGO = "xxh64"  # several GB/s: validating a shard costs little next to decompressing it
INDEX_FILE = "index.json"
_CHUNK = 1 << 22


class ShardError(RecsysError):
    """A shard of a prepared dataset is missing or corrupted."""


def file_hash(path: Path, algo: str = HASH_ALGO) -> str:
    """Hex digest of a file, as ``streaming.base.hashing.get_hash`` computes it over the bytes."""
    import xxhash

    h = getattr(xxhash, algo)()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return str(h.hexdigest())


def shard_files(index: dict[str, Any]) -> list[dict[str, Any]]:
    """The file info (basename, bytes, hashes) of every shard file in an MDS index that is stored:
    the compressed file when the shard is compressed, else the raw one."""
    return [shard.get("zip_data") or shard["raw_data"] for shard in index.get("shards", [])]


def record_shard_hashes(directory: Path) -> None:
    """Add the xxh64 of every shard file to each ``*/index.json`` under a prepared ``directory``."""
    for index_path in sorted(directory.glob(f"*/{INDEX_FILE}")):
        index = json.loads(index_path.read_text())
        for shard in index.get("shards", []):
            info = shard.get("zip_data") or shard["raw_data"]
            info["hashes"] = {**(info.get("hashes") or {}), HASH_ALGO: file_hash(index_path.parent / info["basename"])}
            shard["hashes"] = sorted({*(shard.get("hashes") or []), HASH_ALGO})
        tmp = index_path.with_name(INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(index, sort_keys=True))
        tmp.replace(index_path)


def read_split_index(path: str, split: str, cache: Path | None = None) -> dict[str, Any]:
    """The ``index.json`` of one split of a local or remote prepared dataset (a remote one is
    downloaded into ``cache``, default a new temporary directory)."""
    where = f"{path.rstrip('/')}/{split}/{INDEX_FILE}"
    if "://" in path:
        from streaming.base.storage import CloudDownloader

        cache = cache or Path(tempfile.mkdtemp(prefix="recsys-index-"))
        local = cache / f"{split}-{INDEX_FILE}"
        cache.mkdir(parents=True, exist_ok=True)
        try:
            CloudDownloader.direct_download(where, str(local), 60)
        except Exception as e:  # the storage backends raise their own types
            raise ShardError(f"{where}: cannot read the split's shard index ({str(e).splitlines()[0]})") from None
        source = local
    else:
        source = Path(path) / split / INDEX_FILE
        if not source.is_file():
            raise ShardError(f"{where}: missing; the dataset is incomplete (prepare it again)")
    try:
        index = json.loads(source.read_text())
        shard_files(index)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ShardError(f"{where}: not a valid shard index ({type(e).__name__}: {e})") from None
    return dict(index)


def split_digest(index: dict[str, Any]) -> str:
    """The digest of one split: 16 hex digits of the SHA-256 over its shards' names, sizes and xxh64
    hashes in the order ``index.json`` lists them (what MLflow shows as the dataset's digest). Equal for
    equal shards; a split without recorded hashes digests its names and sizes alone."""
    import hashlib

    h = hashlib.sha256()
    for info in shard_files(index):
        h.update(f"{info['basename']}\t{info['bytes']}\t{(info.get('hashes') or {}).get(HASH_ALGO, '')}\n".encode())
    return h.hexdigest()[:16]


def check_split(path: str, split: str, index: dict[str, Any]) -> str | None:
    """Fail unless every shard of a local split exists with its listed size; returns the hash
    algorithm to validate shards with (None for datasets prepared before hashes were recorded)."""
    files = shard_files(index)
    if "://" not in path:
        for info in files:
            shard = Path(path) / split / info["basename"]
            try:
                size = shard.stat().st_size
            except FileNotFoundError:
                raise ShardError(f"{shard}: shard missing (listed in {split}/{INDEX_FILE})") from None
            if size != info["bytes"]:
                raise ShardError(
                    f"{shard}: shard has {size} bytes, {split}/{INDEX_FILE} lists {info['bytes']} "
                    "(truncated or replaced; prepare the dataset again)"
                )
    if files and all(HASH_ALGO in (info.get("hashes") or {}) for info in files):
        return HASH_ALGO
    return None


def check_dataset(path: str, splits: Iterable[str], cache: Path | None = None) -> dict[str, str | None]:
    """``check_split`` for every split of a prepared dataset: split -> hash algorithm to validate with.
    ``cache`` receives the index files of a remote dataset."""
    return {split: check_split(path, split, read_split_index(path, split, cache)) for split in splits}


def describe_shard_failure(location: str, error: BaseException) -> str:
    """One line: which shard, and what went wrong with it."""
    text = (str(error).strip().splitlines() or [""])[0]
    if isinstance(error, FileNotFoundError) or "not found" in text.lower():  # local, or a remote store's error
        return f"{location}: shard missing ({text})"
    if text.startswith("Checksum failure"):
        return f"{location}: shard corrupted (its {HASH_ALGO} does not match {INDEX_FILE}; prepare the dataset again)"
    return f"{location}: shard unreadable ({type(error).__name__}: {text})"


def one_line(error: RecsysError) -> str:
    """The message of a RecsysError, also when a DataLoader worker re-raised it with its traceback
    ("Caught ShardError in DataLoader worker process 0. Original Traceback ...: <message>")."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    name = type(error).__name__
    for prefix in (f"{type(error).__module__}.{name}: ", f"{name}: "):
        if prefix in last:
            return last.split(prefix, 1)[1]
    return last
