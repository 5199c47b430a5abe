"""Where a prepared dataset lives: a local directory or any remote StreamingDataset reads
(``s3://``, ``gs://``, ``oci://``, ...). Files of the dataset other than the shards (metadata, corpus)
are fetched with StreamingDataset's own downloader, so every remote it supports works here too."""

from __future__ import annotations

from pathlib import Path

from core.errors import RecsysError

DOWNLOAD_TIMEOUT_S = 120


def is_remote(path: str) -> bool:
    return "://" in path


def fetch_file(root: str, relative: str, cache: Path) -> Path:
    """A local path of ``root/relative``: the file itself when local, else a copy under ``cache``."""
    if not is_remote(root):
        return Path(root) / relative
    from streaming.base.storage import CloudDownloader

    target = cache / relative
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        source = f"{root.rstrip('/')}/{relative}"
        try:
            CloudDownloader.direct_download(source, str(target), DOWNLOAD_TIMEOUT_S)
        except Exception as e:  # the storage backends raise their own types
            raise RecsysError(
                f"{source}: cannot fetch ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
            ) from None
    return target
