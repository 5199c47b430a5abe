"""``recsys data download``: obtain public datasets without committing them.

MovieLens-100K may not be redistributed, so it is never part of this repository. Offline-friendly
path: the ``recbole==1.2.1`` wheel on PyPI carries the atomic files (``ml-100k.inter/.user/.item``);
it is fetched with ``pip download --no-deps`` and read with ``zipfile`` (never installed: it pins an
ancient Ray). When PyPI cannot be reached, the GroupLens zip is tried.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from core.errors import RecsysError
from datamodules.sources import (
    DEFAULT_CACHE,
    MOVIELENS_100K_URL,
    SETS2019_URL,
    default_movielens_dir,
    download,
)

RECBOLE_WHEEL = "recbole==1.2.1"
RECBOLE_PREFIX = "recbole/dataset_example/ml-100k/"


def download_dataset(name: str, dest: str | None = None) -> str:
    """Fetch ``name`` into ``dest`` (default: the cache) and return a line saying where it is."""
    if name == "movielens-100k":
        target = Path(dest) if dest else default_movielens_dir()
        if (target / "ml-100k.inter").exists() or (target / "u.data").exists():
            return f"movielens-100k already in {target}"
        how = fetch_movielens_100k(target)
        return f"movielens-100k ({how}) -> {target}"
    if name == "sets2019":
        target = Path(dest) if dest else DEFAULT_CACHE / "downloads"
        path = download(SETS2019_URL, target / "learning-from-sets-2019.zip")
        return f"sets2019 -> {path}"
    raise RecsysError(f"download: unknown dataset {name!r} (choose from movielens-100k, sets2019)")


def movielens_100k_source() -> str:
    """The cached MovieLens-100K directory, downloaded on first use (what the benches read)."""
    target = default_movielens_dir()
    if not target.exists():
        download_dataset("movielens-100k")
    return str(target)


def fetch_movielens_100k(target: Path) -> str:
    """Extract the RecBole atomic files from the wheel; fall back to GroupLens."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-q",
                "-d",
                tmp,
                RECBOLE_WHEEL,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if proc.returncode == 0 and wheels:
            extract_recbole_ml100k(wheels[0], target)
            return f"RecBole atomic files from the {RECBOLE_WHEEL} wheel"
    zip_path = download(MOVIELENS_100K_URL, DEFAULT_CACHE / "downloads" / "ml-100k.zip")
    partial = target.with_name(target.name + ".part")
    shutil.rmtree(partial, ignore_errors=True)
    with zipfile.ZipFile(zip_path) as z:
        for member in ("u.data", "u.user", "u.item"):
            partial.mkdir(parents=True, exist_ok=True)
            (partial / member).write_bytes(z.read(f"ml-100k/{member}"))
    partial.rename(target)
    return "GroupLens ml-100k.zip"


def extract_recbole_ml100k(wheel: Path, target: Path) -> None:
    """Copy ``ml-100k.{inter,user,item}`` out of a recbole wheel into ``target`` (atomically)."""
    partial = target.with_name(target.name + ".part")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        with zipfile.ZipFile(wheel) as z:
            for ext in ("inter", "user", "item"):
                (partial / f"ml-100k.{ext}").write_bytes(z.read(f"{RECBOLE_PREFIX}ml-100k.{ext}"))
    except (KeyError, zipfile.BadZipFile) as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise RecsysError(f"{wheel}: no MovieLens-100K atomic files inside ({e})") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(target)
