"""``recsys recommend --all-users``: every user of the retrieval run's vocabulary through the funnel, on
an engine, into partitioned Parquet.

    recsys recommend --retrieval RUN [--ranking RUN] --all-users --out DIR [--k 10] [--candidates 200]
                     [--backend local|ray|spark] [--num-workers N] [--partitions P] [--overwrite]

The driver assembles one bundle (``app.bundle.assemble_bundle``) into ``DIR/_bundle`` and splits the
users into P partitions (``crc32(utf-8 user id) mod P``, users in vocabulary order within one); the
backend (``cluster.batch``) runs the partitions on its workers, each of which loads the bundle once
(``app.bundle.load_bundle``: the one ``modules.funnel.Recommender``) and calls
``Recommender.recommend_users`` on its partitions. What DIR holds::

    part-00000.parquet ...  one file per partition: user, rank, item, score, source (raw ids; the same
                            rows as the single-process ``recommend``), written under a temporary name and
                            linked into place when complete, never replacing a finished one; its Parquet
                            key-value metadata (``recsys.all_users``) records the settings it was written
                            with, its partition, the partition count, its users and its rows
    _manifest.json          the settings (runs, k, candidates, index), the partitioning, the bundle's
                            SHA-256, every run of the command on this DIR, and whether the output is complete
    _bundle/                the bundle the workers load (kept until the output is complete, so that a
                            resumed run uses the same one)

A rerun into the same DIR resumes: a part file is kept only when its footer reads, its row count is the
one recorded in it and its settings record equals this run's settings; every other one (missing,
truncated, of other settings) is done again, and the output is complete when every partition's file
is. The bundle is reused only when it verifies (``bundle.json``'s SHA-256 recorded in the manifest, every
file's checksum, the same runs); otherwise it is assembled again. A rerun with other settings is refused
unless ``--overwrite`` (which always starts over, the bundle included); so is a DIR without a manifest
whose part files do not all prove to be of this run's settings. Everything is checked, and the bundle
assembled, before anything in DIR changes: a refused run leaves DIR as it was (and a DIR it created is
removed). Names that start with ``_`` or ``.`` are skipped by Parquet readers (pyarrow, Spark, DuckDB), so
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
from core.output import WRITE_ERRORS, OutputKind, check_output, os_reason
from modules.vector_store import StoreConfig

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
BUNDLE_DIR = "_bundle"
FORMAT = "recsys-all-users"
FORMAT_VERSION = 2
"""2: every part file records its settings (``STAMP_KEY``), the manifest the bundle's SHA-256."""
STAMP_KEY = b"recsys.all_users"
"""The key of a part file's settings record in its Parquet key-value metadata (JSON)."""
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
    store: StoreConfig | None = None
    """Retrieve from this vector database (the slower path: every worker's queries go to it)."""
    filter: str | None = None
    """Only items this expression over the items' attributes accepts (``modules.vector_store``)."""

    def settings(self) -> dict[str, Any]:
        """What the output depends on (a rerun with other settings is refused)."""
        return {
            "retrieval": self.retrieval,
            "ranking": self.ranking,
            "k": self.k,
            "candidates": self.candidates,
            "index": str(Path(self.index).resolve()) if self.index else None,
            **({"store": self.store.shown(), "alias": self.store.alias} if self.store else {}),
            **({"filter": self.filter} if self.filter else {}),
        }


def all_users_config(ns: Any, cluster: ClusterConfig, store: StoreConfig | None = None) -> AllUsersConfig:
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
        store=store,
        filter=getattr(ns, "filter", None),
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
    holding anything else. An existing --all-users directory is resumed (its files decide), so the
    rule's "only with --overwrite" does not apply here. Returns it as an absolute path."""
    return check_output(out, ALL_USERS_OUTPUT, overwrite=True)


def read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RecsysError(
            f"{path}: unreadable ({first_line(e)}); pass --overwrite to start over, or another --out"
        ) from None
    require(
        isinstance(manifest, dict) and manifest.get("format") == FORMAT and isinstance(manifest.get("settings"), dict),
        f"{path}: not an --all-users manifest; pass --overwrite to start over, or another --out",
    )
    return manifest


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest in one rename (a kill never leaves half of it, a full disk no temporary)."""
    tmp = out / f"._manifest.{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, out / MANIFEST)
    finally:
        tmp.unlink(missing_ok=True)


def differences(recorded: Any, wanted: dict[str, Any]) -> list[str]:
    recorded = recorded if isinstance(recorded, dict) else {}
    return [f"{key} {recorded.get(key)!r} -> {value!r}" for key, value in wanted.items() if recorded.get(key) != value]


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def clear(out: Path, but: str = "") -> None:
    """Remove what this command wrote into DIR (``--overwrite``), ``but`` one entry (the new bundle)."""
    for entry in out.iterdir():
        if ours(entry.name) and entry.name != but:
            remove(entry)


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


def first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def os_problem(shown: str, out: Path, error: OSError) -> str:
    """An operating-system error of the command as one line: naming --out when it is DIR's (or a write
    that no check could foresee: no space, a quota, a read-only filesystem), else the path it names."""
    reason = " ".join(os_reason(error).split())
    where = str(error.filename) if error.filename else ""
    if error.errno in WRITE_ERRORS:
        return f"--out {shown}: cannot write the output ({reason})"
    if where and not (where == str(out) or where.startswith(f"{out}{os.sep}")):
        return f"{where}: {reason}"
    return f"--out {shown}: {reason}" + (f" ({where})" if where else "")


# -- part files and the bundle -----------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """A part file found in DIR: the settings record it carries (``STAMP_KEY``), and why it cannot be
    counted as finished by itself (None when it can)."""

    name: str
    stamp: dict[str, Any] | None
    problem: str | None


def read_part(path: Path, partition: int) -> Part:
    """A part file checked by itself: its footer readable, its settings record there, and the row count
    it recorded when it was written equal to the footer's (a truncated file is never counted)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
    except (OSError, ValueError, pa.ArrowException) as e:
        return Part(path.name, None, f"is unreadable ({first_line(e)})")
    raw = (meta.metadata or {}).get(STAMP_KEY)
    try:
        stamp = json.loads(raw) if raw is not None else None
    except ValueError:
        stamp = None
    if not isinstance(stamp, dict) or stamp.get("format") != FORMAT:
        return Part(path.name, None, "carries no --all-users settings record (an older recsys or another program)")
    if stamp.get("partition") != partition:
        return Part(path.name, stamp, f"records partition {stamp.get('partition')!r}")
    if stamp.get("rows") != meta.num_rows:
        return Part(path.name, stamp, f"holds {meta.num_rows} rows where {stamp.get('rows')!r} were written")
    return Part(path.name, stamp, None)


def survey(out: Path) -> dict[int, Part]:
    """Every part file in DIR, checked by itself."""
    found = {}
    for entry in sorted(out.iterdir()):
        m = PART.match(entry.name)
        if m:
            found[int(m[1])] = read_part(entry, int(m[1]))
    return found


def stamp_differences(stamp: dict[str, Any], wanted: dict[str, Any], partitions: int | None) -> list[str]:
    """How the settings a part file was written with differ from this run's (and from ``partitions``)."""
    changed = differences(stamp.get("settings"), wanted)
    if partitions is not None and stamp.get("partitions") != partitions:
        changed.append(f"partitions {stamp.get('partitions')!r} -> {partitions}")
    return changed


def bundle_problem(bundle: Path, recorded: Any, cfg: AllUsersConfig) -> str | None:
    """Why ``DIR/_bundle`` cannot be reused: missing, not the one the manifest records (``bundle.json``'s
    SHA-256), of other runs, or a file that fails the bundle's own checksums (``load_bundle``'s check)."""
    from app.bundle import BUNDLE_FILE, BUNDLE_FORMAT, BUNDLE_VERSION
    from core.checksums import sha256_file, verify_checksums

    if not (bundle / BUNDLE_FILE).is_file():
        return "missing" if not bundle.exists() else f"no {BUNDLE_FILE}"
    if not isinstance(recorded, str) or sha256_file(bundle / BUNDLE_FILE) != recorded:
        return f"its {BUNDLE_FILE} is not the one {MANIFEST} records"
    try:
        runs = json.loads((bundle / BUNDLE_FILE).read_text())
    except ValueError as e:
        return f"{BUNDLE_FILE} unreadable ({first_line(e)})"
    if not isinstance(runs, dict) or (runs.get("format"), runs.get("version")) != (BUNDLE_FORMAT, BUNDLE_VERSION):
        return f"not a {BUNDLE_FORMAT} version {BUNDLE_VERSION}"
    if (runs.get("retrieval"), runs.get("ranking")) != (cfg.retrieval, cfg.ranking):
        return "of other runs"
    try:
        verify_checksums(bundle, runs.get("files"), BUNDLE_FILE, exact=True, exclude=[BUNDLE_FILE])
    except RecsysError as e:
        return str(e)
    return None


def assemble(cfg: AllUsersConfig, out: Path) -> Path:
    """The bundle, assembled into a temporary directory of DIR (removed on any failure); what refuses
    a run (an unknown run, a ranking model as --retrieval, a bad --index) refuses it here, before DIR
    changes."""
    from safetensors import SafetensorError

    from app.bundle import assemble_bundle

    tmp = out / f".bundle.tmp-{uuid.uuid4().hex[:8]}"
    try:
        assemble_bundle(cfg.retrieval, cfg.ranking, tmp, cfg.tracking_uri, cfg.index, cfg.store)
    except SafetensorError as e:  # the weights written through safetensors: its I/O errors (a full disk)
        shutil.rmtree(tmp, ignore_errors=True)
        raise RecsysError(f"--out {cfg.out}: cannot write the bundle ({first_line(e)})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


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
    from app.stages import STAGE_VOCAB
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
    first writer wins), and no reader ever sees half of one. A full disk is one line naming the file."""
    import pyarrow.parquet as pq

    final = out / part_name(partition)
    tmp = out / f".{part_name(partition)}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        try:
            pq.write_table(table, tmp)
        except OSError as e:
            if e.errno not in WRITE_ERRORS:
                raise
            raise RecsysError(f"{final}: cannot write it ({os_reason(e)})") from None
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


def stamped(table: Any, stamp: dict[str, Any], partition: int, users: int) -> Any:
    """The table with its settings record (``STAMP_KEY``) in its schema's key-value metadata, which
    Parquet keeps in the file's footer."""
    record = {**stamp, "partition": partition, "users": users, "rows": int(table.num_rows)}
    return table.replace_schema_metadata({STAMP_KEY: json.dumps(record, sort_keys=True)})


def partition_writer(
    bundle: str,
    out: str,
    k: int,
    candidates: int,
    delay_s: float = 0.0,
    stamp: dict[str, Any] | None = None,
    filter: str | None = None,
) -> Callable[[int, list[str]], int]:
    """The function a worker runs on each of its partitions, with the bundle loaded once; ``stamp``: the
    settings record every part file carries."""
    from app.bundle import load_bundle

    recommender = load_bundle(bundle).recommender
    target = Path(out)

    def write(partition: int, users: list[str]) -> int:
        if delay_s:
            time.sleep(delay_s)
        table = recommendations_table(users, recommender.recommend_users(users, k, candidates, filter=filter))
        write_partition(stamped(table, stamp or {}, partition, len(users)), target, partition)
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


@dataclass
class Plan:
    """What a run finds in DIR: its manifest (None when there is none, or with --overwrite), the
    partition count when known, the part files it keeps (partition -> settings record) and those it
    removes before the work (unreadable, truncated, of other settings, beyond the partition count)."""

    manifest: dict[str, Any] | None
    partitions: int | None
    keep: dict[int, dict[str, Any]]
    drop: list[str]

    def complete(self) -> bool:
        return self.partitions is not None and set(self.keep) == set(range(self.partitions))


def other_settings(cfg: AllUsersConfig, changed: list[str], where: str = "") -> RecsysError:
    return RecsysError(
        f"--out {cfg.out}: holds --all-users output of other settings ({'; '.join(changed)}{where}); "
        "pass --overwrite to replace it, or another --out"
    )


def plan_output(cfg: AllUsersConfig, out: Path) -> Plan:
    """Read DIR and decide what a run keeps, or refuse (one line) a DIR that is not provably this run's
    output: a manifest of other settings, or no manifest and a part file that does not prove itself of
    these settings. With --overwrite nothing is kept."""
    if cfg.overwrite:
        return Plan(None, cfg.partitions, {}, [])
    wanted = cfg.settings()
    manifest = read_manifest(out)
    found = survey(out)
    if manifest is not None:
        changed = differences(manifest["settings"], wanted)
        recorded = manifest.get("partitions")
        if cfg.partitions is not None and recorded is not None and recorded != cfg.partitions:
            changed.append(f"partitions {recorded} -> {cfg.partitions}")
        if changed:
            raise other_settings(cfg, changed)
        partitions = recorded if isinstance(recorded, int) and recorded >= 1 else cfg.partitions
    else:  # nothing but the part files themselves says whose they are: each must show it
        counts: set[Any] = set()
        for part in found.values():
            if part.stamp is None or part.problem is not None:
                raise RecsysError(
                    f"--out {cfg.out}: {part.name} {part.problem} and there is no {MANIFEST}: it cannot be shown "
                    "to be output of these settings; pass --overwrite to start over, or another --out"
                )
            changed = stamp_differences(part.stamp, wanted, cfg.partitions)
            if changed:
                raise other_settings(cfg, changed, f": {part.name}, and no {MANIFEST}")
            counts.add(part.stamp.get("partitions"))
        if len(counts) > 1:
            raise RecsysError(
                f"--out {cfg.out}: holds part files of {len(counts)} different partition counts and no {MANIFEST}; "
                "pass --overwrite to start over, or another --out"
            )
        partitions = cfg.partitions if cfg.partitions is not None else (counts.pop() if counts else None)
    keep: dict[int, dict[str, Any]] = {}
    drop: list[str] = []
    for partition, part in found.items():
        if (
            part.stamp is not None
            and part.problem is None
            and partitions is not None
            and partition < partitions
            and not stamp_differences(part.stamp, wanted, partitions)
        ):
            keep[partition] = part.stamp
        else:
            log.info("%s: %s %s: written again", cfg.out, part.name, part.problem or "is of other settings")
            drop.append(part.name)
    return Plan(manifest, partitions, keep, drop)


def new_manifest(cfg: AllUsersConfig, earlier: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "settings": cfg.settings(),
        "partitions": None,
        "partitioning": PARTITIONING,
        "columns": ["user", "rank", "item", "score", "source"],
        "users": None,
        "bundle_sha256": None,
        "complete": False,
        "runs": list((earlier or {}).get("runs") or []),
    }


@dataclass
class Attempt:
    """How far a run got: whether the engine started on the partitions (after that DIR is kept, to
    resume; before, a DIR this run created is removed on failure)."""

    started: bool = False


def recommend_all_users(cfg: AllUsersConfig) -> str:
    """``recsys recommend --all-users``: write (or finish) DIR; returns a one-line summary. Every
    operating-system error (a full disk, a pseudo filesystem such as /proc) is one line."""
    from modules.funnel import check_sizes

    check_sizes(cfg.k, cfg.candidates)
    require(cfg.partitions is None or cfg.partitions >= 1, f"--partitions: must be at least 1, got {cfg.partitions}")
    check_batch_cluster(cfg.cluster)
    out = check_out_dir(cfg.out)
    attempt = Attempt()
    try:
        try:
            out.mkdir()
            created = True
        except FileExistsError:
            created = False
        except OSError as e:
            raise RecsysError(f"--out {cfg.out}: cannot create the folder ({os_reason(e)})") from None
        with locked(out):
            try:
                return write_all_users(cfg, out, attempt)
            except BaseException:
                if created and not attempt.started:  # refused or failed before any work: nothing left
                    shutil.rmtree(out, ignore_errors=True)
                raise
    except OSError as e:
        raise RecsysError(os_problem(cfg.out, out, e)) from None


def write_all_users(cfg: AllUsersConfig, out: Path, attempt: Attempt) -> str:
    """Under DIR's lock: keep what is provably this run's, check everything and assemble the bundle
    before DIR changes, then write every partition not kept."""
    plan = plan_output(cfg, out)
    if plan.complete():
        return already_complete(cfg, out, plan)
    remove_temporaries(out)
    bundle = out / BUNDLE_DIR
    problem = "--overwrite" if cfg.overwrite else None
    if problem is None:
        recorded = plan.manifest.get("bundle_sha256") if plan.manifest is not None else None
        problem = bundle_problem(bundle, recorded, cfg)
        if problem != "missing":
            log.warning("%s: %s; assembling it again", bundle, problem)
    fresh = assemble(cfg, out) if problem is not None else None
    installed = False
    try:
        users = bundle_users(fresh or bundle)
        require(len(users) > 0, f"--retrieval {cfg.retrieval}: the run's user vocabulary is empty")
        partitions = int(plan.partitions or default_partitions(len(users)))
        parts = split_users(users, partitions)
        for partition, stamp in list(plan.keep.items()):  # the users its partition has now, or done again
            if stamp.get("users") != len(parts[partition]):
                plan.drop.append(part_name(partition))
                del plan.keep[partition]
        # -- everything checked: DIR changes from here on
        if cfg.overwrite:
            clear(out, but=fresh.name if fresh else "")
        for name in plan.drop:
            remove(out / name)
        if fresh is not None:
            if bundle.exists() or bundle.is_symlink():
                remove(bundle)
            os.replace(fresh, bundle)
            installed = True
        from app.bundle import BUNDLE_FILE
        from core.checksums import sha256_file

        manifest = new_manifest(cfg, plan.manifest)
        manifest.update(partitions=partitions, users=len(users), bundle_sha256=sha256_file(bundle / BUNDLE_FILE))
        write_manifest(out, manifest)
    except BaseException:
        if fresh is not None and fresh.exists():
            shutil.rmtree(fresh, ignore_errors=True)
        if installed and not (out / MANIFEST).is_file():
            shutil.rmtree(bundle, ignore_errors=True)
        raise
    attempt.started = True
    return run_partitions(cfg, out, manifest, parts, set(plan.keep))


def already_complete(cfg: AllUsersConfig, out: Path, plan: Plan) -> str:
    """Every partition's file is there and valid: finish the bookkeeping (a run killed after its last
    file, strays of other settings), write nothing else."""
    partitions = int(plan.partitions or 0)
    users = sum(int(s.get("users") or 0) for s in plan.keep.values())
    rows = sum(int(s.get("rows") or 0) for s in plan.keep.values())
    manifest = plan.manifest
    if manifest is None or not manifest.get("complete") or plan.drop or manifest.get("rows") != rows:
        for name in plan.drop:
            remove(out / name)
        remove_temporaries(out)
        manifest = new_manifest(cfg, manifest) if manifest is None else manifest
        manifest.update(partitions=partitions, users=users, rows=rows, complete=True)
        write_manifest(out, manifest)
    if (out / BUNDLE_DIR).exists():
        shutil.rmtree(out / BUNDLE_DIR, ignore_errors=True)
    return f"{cfg.out}: already complete ({users} users in {partitions} partitions)"


def run_partitions(
    cfg: AllUsersConfig, out: Path, manifest: dict[str, Any], parts: list[list[str]], kept: set[int]
) -> str:
    """Write every partition not kept, then check every partition's file before calling DIR complete."""
    bundle = out / BUNDLE_DIR
    partitions, wanted = len(parts), cfg.settings()
    tasks = [PartitionTask(p, parts[p]) for p in range(partitions) if p not in kept]
    run: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "backend": cfg.cluster.backend,
        "num_workers": cfg.cluster.num_workers,
        "partitions_kept": len(kept),
        "partitions_written": 0,
    }
    manifest["runs"].append(run)
    write_manifest(out, manifest)

    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    stamp = {"format": FORMAT, "version": FORMAT_VERSION, "settings": wanted, "partitions": partitions}
    job = PartitionJob(
        key=f"{bundle}#{manifest['bundle_sha256']}",
        factory=functools.partial(
            partition_writer, str(bundle), str(out), cfg.k, cfg.candidates, delay, stamp, cfg.filter
        ),
        threads=cfg.cluster.cpus_per_worker,
    )
    if kept:
        log.info("%s: %d of %d partitions finished earlier, kept", cfg.out, len(kept), partitions)
    progress = Progress(out, {t.partition: len(t.keys) for t in tasks}, sum(map(len, parts)), cfg.progress)
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
        with contextlib.suppress(OSError):  # a full disk: the error on its way out says so
            write_manifest(out, manifest)
    rows, bad = 0, []
    for p in range(partitions):  # complete when every file is there and valid, whatever the engine said
        path = out / part_name(p)
        part = read_part(path, p) if path.is_file() else Part(path.name, None, "missing")
        if part.problem is not None or part.stamp is None or stamp_differences(part.stamp, wanted, partitions):
            bad.append(p)
        else:
            rows += int(part.stamp["rows"])
    require(not bad, f"--backend {cfg.cluster.backend}: partitions {bad[:5]} were not written")
    manifest.update(complete=True, rows=rows)
    write_manifest(out, manifest)
    shutil.rmtree(bundle, ignore_errors=True)
    users = sum(map(len, parts))
    note = f", {len(kept)} kept from an earlier run" if kept else ""
    return f"{users} users, {rows} recommendations in {partitions} partitions{note} -> {cfg.out}"
