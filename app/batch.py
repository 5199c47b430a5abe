"""``recsys recommend --all-users``: every user of the retrieval run's vocabulary through the funnel, on
an engine, into partitioned Parquet.

    recsys recommend --retrieval RUN [--ranking RUN] --all-users --out DIR [--k 10] [--candidates 200]
                     [--backend local|ray|spark] [--num-workers N] [--partitions P] [--overwrite]

The driver assembles one bundle (``app.recommend.assemble_bundle``) into ``DIR/_bundle`` and splits the
users into P partitions (``crc32(utf-8 user id) mod P``, users in vocabulary order within one); the
backend (``cluster.batch``) runs the partitions on its workers, each of which loads the bundle once
(``app.recommend.load_bundle``: the one ``modules.funnel.Recommender``) and calls
``Recommender.recommend_users`` on its partitions. What DIR holds::

    part-00000.parquet ...  one file per partition: user, rank, item, score, source (raw ids; the same
                            rows as the single-process ``recommend``), written under a temporary name and
                            linked into place when complete, never replacing a finished one
    _manifest.json          the settings (runs, k, candidates, index), the partitioning, every run of
                            the command on this DIR, and whether the output is complete
    _bundle/                the bundle the workers load (kept until the output is complete, so that a
                            resumed run uses the same one)

A rerun into the same DIR resumes: finished partitions are kept, the others (and the temporary files of
a killed run) done again. A rerun with other settings is refused unless ``--overwrite``. Names that
start with ``_`` or ``.`` are skipped by Parquet readers (pyarrow, Spark, DuckDB), so
``pyarrow.parquet.read_table(DIR)`` reads the recommendations only.

A user with fewer than k items left to recommend (not in their train history) gets fewer rows, as in
the single-process ``recommend``; no fallback fills them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import shutil
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.batch import PartitionJob, PartitionTask, check_batch_cluster, map_partitions
from cluster.config import ClusterConfig
from core.errors import RecsysError, require
from core.output import OutputKind, check_output

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
BUNDLE_DIR = "_bundle"
FORMAT = "recsys-all-users"
FORMAT_VERSION = 1
PARTITION_USERS = 50_000
"""Users per partition by default (at least ``MIN_PARTITIONS`` partitions)."""
MIN_PARTITIONS = 16
PARTITIONING = "crc32(utf-8 user id) mod partitions"
PART = re.compile(r"^part-(\d{5,})\.parquet$")
TEMPORARY_PREFIXES = (".part-", ".bundle.tmp-", "._manifest.")
DELAY_ENV = "RECSYS_BATCH_PARTITION_DELAY_S"
"""Test hook: seconds each partition waits before its work (so that a test can kill a run midway)."""


@dataclass(frozen=True)
class AllUsersConfig:
    """``recsys recommend --all-users``."""

    retrieval: str
    out: str
    ranking: str | None = None
    k: int = 10
    candidates: int = 200
    partitions: int | None = None
    """Output partitions (files); default: one per 50k users, at least 16 (fewer users: one each)."""
    overwrite: bool = False
    index: str | None = None
    tracking_uri: str | None = None
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    progress: bool = True

    def settings(self) -> dict[str, Any]:
        """What the output depends on (a rerun with other settings is refused)."""
        return {
            "retrieval": self.retrieval,
            "ranking": self.ranking,
            "k": self.k,
            "candidates": self.candidates,
            "index": str(Path(self.index).resolve()) if self.index else None,
        }


def all_users_config(ns: Any, cluster: ClusterConfig) -> AllUsersConfig:
    """The config of ``recsys recommend --all-users`` from its parsed flags (``--out`` is a directory)."""
    given = [name for name, v in (("--user", ns.user), ("--users", ns.users), ("--history", ns.history)) if v]
    require(not given, f"recommend --all-users: takes no {given[0] if given else ''} (it recommends to every user)")
    require(bool(ns.out), "recommend --all-users: --out DIR is required (a directory of Parquet files)")
    return AllUsersConfig(
        retrieval=ns.retrieval,
        ranking=ns.ranking,
        out=ns.out,
        k=ns.k,
        candidates=ns.candidates,
        partitions=ns.partitions,
        overwrite=ns.overwrite,
        index=ns.index,
        tracking_uri=ns.tracking_uri,
        cluster=cluster,
    )


# -- the output directory ----------------------------------------------------------------------------


def part_name(partition: int) -> str:
    return f"part-{partition:05d}.parquet"


def ours(name: str) -> bool:
    """An entry this command writes into DIR."""
    return name in (MANIFEST, BUNDLE_DIR) or bool(PART.match(name)) or name.startswith(TEMPORARY_PREFIXES)


def foreign_entries(path: Path) -> str | None:
    """``OutputKind.problem`` of an --all-users directory: None when it holds only what this command writes."""
    others = sorted(e.name for e in path.iterdir() if not ours(e.name))
    return f"holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}" if others else None


ALL_USERS_OUTPUT = OutputKind("an --all-users output directory", is_dir=True, problem=foreign_entries)


def check_out_dir(out: str) -> Path:
    """Refuse, by the shared output rule (``core.output``), an ``--out`` that is not this command's to
    write: the current directory or a parent of it, a missing parent folder, a file or device, a folder
    holding anything else. An existing --all-users directory is resumed (its manifest decides), so the
    rule's "only with --overwrite" does not apply here. Returns it as an absolute path."""
    return check_output(out, ALL_USERS_OUTPUT, overwrite=True)


def read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RecsysError(f"{path}: unreadable ({e}); remove the directory or pass another --out") from None
    require(
        isinstance(manifest, dict) and manifest.get("format") == FORMAT,
        f"{path}: not an --all-users manifest; choose another --out",
    )
    return manifest


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest in one rename (a kill never leaves half of it)."""
    tmp = out / f"._manifest.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)


def differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return [f"{key} {recorded.get(key)!r} -> {value!r}" for key, value in wanted.items() if recorded.get(key) != value]


def clear(out: Path) -> None:
    """Remove what this command wrote into DIR (``--overwrite``)."""
    for entry in out.iterdir():
        if ours(entry.name):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def remove_temporaries(out: Path) -> None:
    """The temporary files of a killed run (the directory lock says none is running)."""
    for entry in out.iterdir():
        if entry.name.startswith(TEMPORARY_PREFIXES):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """One run at a time per DIR (an advisory lock on it, released when the process ends, killed too)."""
    import fcntl

    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RecsysError(f"--out {out}: another recsys recommend --all-users is writing it now") from None
        yield
    finally:
        os.close(fd)


# -- partitions --------------------------------------------------------------------------------------


def default_partitions(users: int) -> int:
    return max(1, min(users, max(MIN_PARTITIONS, math.ceil(users / PARTITION_USERS))))


def partition_of(user: str, partitions: int) -> int:
    """The partition of a raw user id: stable across processes, machines and runs."""
    return zlib.crc32(user.encode("utf-8")) % partitions


def split_users(users: Sequence[str], partitions: int) -> list[list[str]]:
    """The users of each partition, in vocabulary order."""
    parts: list[list[str]] = [[] for _ in range(partitions)]
    for user in users:
        parts[partition_of(user, partitions)].append(user)
    return parts


def bundle_users(bundle: Path) -> list[str]:
    """Raw ids of every user of the bundle's retrieval vocabulary."""
    from app.recommend import STAGE_VOCAB
    from datamodules.schema import read_metadata

    stage = bundle / "retrieval"
    meta = read_metadata(stage)
    require(meta.user_id_feature is not None, f"{stage}: dataset {meta.dataset!r} has no user id feature")
    vocab_file = meta.feature(str(meta.user_id_feature)).vocab_file
    require(vocab_file is not None, f"{stage}: feature {meta.user_id_feature!r} has no vocabulary")
    return [str(u) for u in json.loads((stage / STAGE_VOCAB / Path(str(vocab_file)).name).read_text())]


# -- in a worker -------------------------------------------------------------------------------------


def write_partition(table: Any, out: Path, partition: int) -> None:
    """Write under a temporary name, then link it into place: a finished file is never replaced (the
    first writer wins), and no reader ever sees half of one."""
    import pyarrow.parquet as pq

    final = out / part_name(partition)
    tmp = out / f".{part_name(partition)}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    pq.write_table(table, tmp)
    try:
        os.link(tmp, final)
    except FileExistsError:
        pass  # another worker (a retried task) finished it first: same rows
    except OSError:  # a filesystem without hard links
        if not final.exists():
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def recommendations_table(users: Sequence[str], results: Sequence[Any]) -> Any:
    """The rows of ``recommend`` (user, rank, item, score, source) for each user's Recommendation."""
    import numpy as np
    import pyarrow as pa

    counts = np.fromiter((len(r.items) for r in results), np.int64, len(results))
    rank = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts) + 1
    return pa.table(
        {
            "user": pa.array(np.repeat(np.asarray(users, dtype=object), counts), pa.string()),
            "rank": pa.array(rank, pa.int64()),
            "item": pa.array([i for r in results for i in r.items], pa.string()),
            "score": pa.array([s for r in results for s in r.scores], pa.float64()),
            "source": pa.array(np.repeat(np.asarray([r.source for r in results], dtype=object), counts), pa.string()),
        }
    )


def partition_writer(
    bundle: str, out: str, k: int, candidates: int, delay_s: float = 0.0
) -> Callable[[int, list[str]], int]:
    """The function a worker runs on each of its partitions, with the bundle loaded once."""
    from app.recommend import load_bundle

    recommender = load_bundle(bundle).recommender
    target = Path(out)

    def write(partition: int, users: list[str]) -> int:
        if delay_s:
            time.sleep(delay_s)
        table = recommendations_table(users, recommender.recommend_users(users, k, candidates))
        write_partition(table, target, partition)
        return int(table.num_rows)

    return write


# -- the driver --------------------------------------------------------------------------------------


class Progress:
    """One bar of users for every engine, moved by the partitions' files as they appear (Spark returns
    its results only at the end) and by the results that come back."""

    def __init__(self, out: Path, todo: dict[int, int], total: int, enabled: bool) -> None:
        self.out, self.pending, self.lock = out, dict(todo), threading.Lock()
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=total - sum(todo.values()), unit="user", desc="all users")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def done(self, partition: int) -> None:
        with self.lock:
            users = self.pending.pop(partition, None)
            if users is not None and self.bar is not None:
                self.bar.update(users)

    def watch(self) -> None:
        while not self.stop.wait(0.5):
            with self.lock:
                pending = list(self.pending)
            for partition in pending:
                if (self.out / part_name(partition)).exists():
                    self.done(partition)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        if self.bar is not None:
            self.bar.close()


def recommend_all_users(cfg: AllUsersConfig) -> str:
    """``recsys recommend --all-users``: write (or finish) DIR; returns a one-line summary."""
    from modules.funnel import check_sizes

    check_sizes(cfg.k, cfg.candidates)
    require(cfg.partitions is None or cfg.partitions >= 1, f"--partitions: must be at least 1, got {cfg.partitions}")
    check_batch_cluster(cfg.cluster)
    out = check_out_dir(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with locked(out):
        manifest = read_manifest(out)
        wanted = cfg.settings()
        if manifest is not None:
            changed = differences(manifest["settings"], wanted)
            recorded = manifest.get("partitions")
            if cfg.partitions is not None and recorded is not None and recorded != cfg.partitions:
                changed.append(f"partitions {recorded} -> {cfg.partitions}")
            if changed and not cfg.overwrite:
                raise RecsysError(
                    f"--out {cfg.out}: holds --all-users output of other settings ({'; '.join(changed)}); "
                    "pass --overwrite to replace it, or another --out"
                )
            if changed:
                clear(out)
                manifest = None
        if manifest is not None and manifest.get("complete"):
            return f"{cfg.out}: already complete ({manifest['users']} users in {manifest['partitions']} partitions)"
        remove_temporaries(out)
        if manifest is None:
            manifest = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "settings": wanted,
                "partitions": cfg.partitions,
                "partitioning": PARTITIONING,
                "columns": ["user", "rank", "item", "score", "source"],
                "users": None,
                "complete": False,
                "runs": [],
            }
            write_manifest(out, manifest)
        return run_partitions(cfg, out, manifest)


def run_partitions(cfg: AllUsersConfig, out: Path, manifest: dict[str, Any]) -> str:
    """Assemble the bundle (once per DIR), then write every partition not yet written."""
    import pyarrow.parquet as pq

    from app.recommend import assemble_bundle

    bundle = out / BUNDLE_DIR
    if not bundle.is_dir():
        tmp = out / f".bundle.tmp-{uuid.uuid4().hex[:8]}"
        try:
            assemble_bundle(cfg.retrieval, cfg.ranking, tmp, cfg.tracking_uri, cfg.index)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.replace(tmp, bundle)
        manifest["bundle_id"] = uuid.uuid4().hex
    users = bundle_users(bundle)
    require(len(users) > 0, f"--retrieval {cfg.retrieval}: the run's user vocabulary is empty")
    partitions = int(manifest.get("partitions") or cfg.partitions or default_partitions(len(users)))
    manifest.update(partitions=partitions, users=len(users))
    parts = split_users(users, partitions)
    finished = {p for p in range(partitions) if (out / part_name(p)).exists()}
    tasks = [PartitionTask(p, parts[p]) for p in range(partitions) if p not in finished]
    run: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "backend": cfg.cluster.backend,
        "num_workers": cfg.cluster.num_workers,
        "partitions_kept": len(finished),
        "partitions_written": 0,
    }
    manifest["runs"].append(run)
    write_manifest(out, manifest)

    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    job = PartitionJob(
        key=f"{bundle}#{manifest.get('bundle_id', '')}",
        factory=functools.partial(partition_writer, str(bundle), str(out), cfg.k, cfg.candidates, delay),
        threads=cfg.cluster.cpus_per_worker,
    )
    if finished:
        log.info("%s: %d of %d partitions finished earlier, kept", cfg.out, len(finished), partitions)
    progress = Progress(out, {t.partition: len(t.keys) for t in tasks}, len(users), cfg.progress)
    loads: dict[int, int] = {}  # worker process -> how many times it loaded the bundle
    seconds = cpu_seconds = 0.0
    peak_rss = 0
    try:
        for result in map_partitions(job, tasks, cfg.cluster):
            if result.error:
                raise RecsysError(f"--backend {cfg.cluster.backend}: partition {result.partition}: {result.error}")
            progress.done(result.partition)
            run["partitions_written"] += 1
            loads[result.pid] = max(loads.get(result.pid, 0), result.loads)
            seconds += result.seconds
            cpu_seconds += result.cpu_seconds
            peak_rss = max(peak_rss, result.peak_rss)
    finally:
        progress.close()
        run.update(
            finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            worker_processes=len(loads),
            bundle_loads=sum(loads.values()),
            partition_seconds=round(seconds, 3),  # in the workers, summed over the partitions
            partition_cpu_seconds=round(cpu_seconds, 3),
            worker_peak_rss=peak_rss,  # the largest of the workers' peak resident memory, bytes
        )
        write_manifest(out, manifest)
    missing = [p for p in range(partitions) if not (out / part_name(p)).exists()]
    require(not missing, f"--backend {cfg.cluster.backend}: partitions {missing[:5]} were not written")
    rows = sum(pq.read_metadata(out / part_name(p)).num_rows for p in range(partitions))
    manifest.update(complete=True, rows=rows)
    write_manifest(out, manifest)
    shutil.rmtree(bundle, ignore_errors=True)
    kept = f", {len(finished)} kept from an earlier run" if finished else ""
    return f"{len(users)} users, {rows} recommendations in {partitions} partitions{kept} -> {cfg.out}"
