"""A LightningDataModule over the MDS block shards of a prepared dataset, yielding TorchRec ``Batch``es.

Each split is a ``StreamingDataset`` whose samples are blocks of rows (see ``datamodules.blocks``). The
dataset is read from ``DataConfig.path`` (local directory or any remote StreamingDataset supports)
into a cache directory of its own, so two DataModules never share one (StreamingDataset refuses a
reused cache); ranks of one run agree on it through the process group.

Rank partitioning, seeded shuffling and mid-epoch resumption are StreamingDataset's: each rank reads
a disjoint part of every epoch, and ``state_dict()`` / ``load_state_dict()`` continue an epoch where
it stopped.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import lightning as L

from core.errors import RecsysError
from datamodules.blocks import BlockCollate
from datamodules.config import DataConfig
from datamodules.corpus import RetrievalCorpus, load_histories
from datamodules.histories import UserHistories
from datamodules.integrity import check_split, one_line, read_split_index, split_digest
from datamodules.schema import METADATA_FILE, DatasetMetadata, read_metadata
from datamodules.storage import fetch_file, is_remote


def fetch_metadata(path: str, cache: Path) -> DatasetMetadata:
    """Read ``metadata.json`` of a local or remote prepared dataset."""
    if not is_remote(path):
        return read_metadata(path)
    return read_metadata(fetch_file(path, METADATA_FILE, cache).parent, shown_as=path)


SHM_DIR = Path("/dev/shm")
SHM_NAME = re.compile(r"^(\d{6})_[a-z_]+$")  # StreamingDataset's segments: <prefix>_<name>


def clean_stale_shared_memory() -> list[str]:
    """Unlink StreamingDataset shared memory that no live process maps; returns what was removed.

    streaming's own ``clean_stale_shared_memory()`` unlinks every segment from prefix 0 upwards,
    including those of datasets still alive in this or another process, and stops at the first gap,
    so it both breaks live readers and misses leaks. Here a prefix is stale only when none of its
    segments appears in any process's memory map (Linux ``/proc``); elsewhere the library's is used.
    """
    if not SHM_DIR.is_dir() or not Path("/proc/self/maps").exists():
        from streaming.base.util import clean_stale_shared_memory as library_clean

        library_clean()
        return []
    groups: dict[str, list[str]] = {}
    for p in SHM_DIR.iterdir():
        if m := SHM_NAME.match(p.name):
            groups.setdefault(m.group(1), []).append(p.name)
    if not groups:
        return []
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if "/dev/shm/" in line:
                mapped.add(line.rsplit("/dev/shm/", 1)[1].split(" ")[0])
    removed = []
    for names in groups.values():
        if not mapped.intersection(names):
            for name in names:
                with contextlib.suppress(OSError):
                    (SHM_DIR / name).unlink()
                    removed.append(name)
    return removed


def blocks_per_batch(rows: int, block_rows: int, flag: str) -> int:
    """Batch size in MDS samples; the row count must be a whole number of blocks."""
    if rows <= 0 or rows % block_rows:
        raise RecsysError(f"{flag}: {rows} is not a positive multiple of the dataset's block_rows {block_rows}")
    return rows // block_rows


def _loader_class() -> type:
    from streaming import StreamingDataLoader

    class BlockLoader(StreamingDataLoader):
        """StreamingDataLoader that counts MDS samples (blocks), not rows, for its resume state, and
        whose state after a completed epoch points at the start of the next one (the stock state
        would count the padded epoch length and refuse to resume)."""

        epoch_done = False

        def _get_batch_size(self, batch: Any) -> int:
            return int(self.batch_size or 1)

        def __iter__(self) -> Any:
            # Lightning stops after len(loader) batches without exhausting the iterator, so the
            # epoch counts as done once its last batch has been handed out.
            self.epoch_done = False
            total = len(self)
            try:
                for i, batch in enumerate(super().__iter__()):
                    if i + 1 >= total:
                        self.epoch_done = True
                    yield batch
            except RecsysError as e:  # from a worker process, re-raised with its traceback in the message
                raise type(e)(one_line(e)) from None
            self.epoch_done = True

        def state_dict(self) -> dict[str, Any] | None:
            state = super().state_dict()
            if state is not None and self.epoch_done:
                state = {**state, "epoch": state["epoch"] + 1, "sample_in_epoch": 0}
            return state

    return BlockLoader


class StreamingDataModule(L.LightningDataModule):
    """Train/val/test loaders of ``Batch(dense_features, sparse_features KJT, labels)``."""

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self._own_cache = cfg.cache_dir is None
        self.cache_root = Path(cfg.cache_dir or tempfile.gettempdir()) / "recsys-streaming"
        self._token = uuid.uuid4().hex[:12]
        self._files_cache = self.cache_root / f"meta-{self._token}"  # metadata and corpus of a remote dataset
        self.meta = fetch_metadata(cfg.path, self._files_cache)
        self.seed = 0 if cfg.seed is None else cfg.seed
        # every shard listed is there with its size, before any training starts; per split, the hash
        # algorithm StreamingDataset validates each shard with as it reads it (None: no hashes recorded)
        indexes = {split: read_split_index(cfg.path, split, self._files_cache) for split in self.meta.splits}
        self._validate_hash = {split: check_split(cfg.path, split, index) for split, index in indexes.items()}
        self.digests = {split: split_digest(index) for split, index in indexes.items()}
        """Each split's digest (``datamodules.integrity.split_digest``): what MLflow shows of the dataset."""
        self.train_blocks = blocks_per_batch(cfg.batch_size, self.meta.block_rows, "--data.batch_size")
        self.eval_blocks = blocks_per_batch(
            cfg.eval_batch_size or cfg.batch_size, self.meta.block_rows, "--data.eval_batch_size"
        )
        self._datasets: dict[str, Any] = {}
        self._train_loader: Any = None
        self._resume: dict[str, Any] | None = None

    # -- Lightning hooks -------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Remove shared memory left by a crashed run (Lightning runs this once per node)."""
        clean_stale_shared_memory()

    def setup(self, stage: str | None = None) -> None:
        """Agree on one cache token across the ranks of a run (all local ranks must share the cache)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box = [self._token]
            dist.broadcast_object_list(box, src=0)
            self._token = str(box[0])

    def train_dataloader(self) -> Any:
        loader = self._loader("train", shuffle=self.cfg.shuffle, blocks=self.train_blocks)
        if self._resume is not None:
            loader.load_state_dict(self._resume)
            self._resume = None
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> Any:
        if self.meta.splits["val"].rows == 0:
            return []  # a dataset prepared with --val-frac 0: Lightning skips validation
        return self._loader("val", shuffle=False, blocks=self.eval_blocks)

    def test_dataloader(self) -> Any:
        return self._loader("test", shuffle=False, blocks=self.eval_blocks)

    def corpus(self) -> RetrievalCorpus:
        """The retrieval corpus (users, items, pairs) of the dataset, local or remote, memory-mapped from
        the arrays the processes of this machine build once under ``<cache root>/corpus`` and keep for
        later runs (``datamodules.corpus``)."""
        return RetrievalCorpus.load(self.cfg.path, self.meta, self.cache_root / "corpus")

    def histories(self) -> UserHistories:
        """The users' train histories of the dataset (``histories.parquet``), local or remote, memory-mapped
        like the corpus."""
        return load_histories(self.cfg.path, self.meta, self.cache_root / "corpus")

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position in its epoch (StreamingDataset's resumption state)."""
        if self._train_loader is None:
            return {}
        return {"train": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = state_dict.get("train")

    def teardown(self, stage: str | None = None) -> None:
        self._datasets.clear()
        if self._own_cache:
            shutil.rmtree(self.cache_root / self._token, ignore_errors=True)
            shutil.rmtree(self._files_cache, ignore_errors=True)

    # -- building --------------------------------------------------------------------------------

    def dataset(self, split: str, shuffle: bool = False, blocks: int | None = None) -> Any:
        """The StreamingDataset of one split (created once per DataModule); a missing or corrupted shard
        raises a RecsysError naming it (``datamodules.integrity``)."""
        from datamodules.checked_dataset import CheckedStreamingDataset

        if split not in self.meta.splits:
            raise RecsysError(f"{self.cfg.path}: no split {split!r} (has {', '.join(self.meta.splits)})")
        if split not in self._datasets:
            from streaming.base.world import World

            world = World.detect()
            remote = f"{self.cfg.path.rstrip('/')}/{split}"
            self._datasets[split] = CheckedStreamingDataset(
                remote=remote if is_remote(remote) else str(Path(remote).resolve()),
                local=str(self.cache_root / self._token / f"node{world.node}" / split),
                shuffle=shuffle,
                shuffle_seed=self.seed,
                shuffle_algo="py1e",
                batch_size=blocks or self.train_blocks,
                allow_unsafe_types=False,
                validate_hash=self._validate_hash.get(split),
            )
        return self._datasets[split]

    def _loader(self, split: str, shuffle: bool, blocks: int) -> Any:
        collate = BlockCollate(self.meta, self.cfg.path.rstrip("/"))
        return _loader_class()(
            self.dataset(split, shuffle, blocks),
            batch_size=blocks,
            collate_fn=collate,
            num_workers=self.cfg.loader_workers,
            persistent_workers=False,
            drop_last=False,
        )
