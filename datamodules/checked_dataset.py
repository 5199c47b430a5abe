"""StreamingDataset whose shard failures are raised as one RecsysError line naming the shard.

A module of its own (importing ``streaming`` at the top) so that the class is importable by name:
DataLoader workers started with ``spawn`` unpickle the dataset. See ``datamodules.integrity``.
"""

from __future__ import annotations

import os
from typing import Any

from streaming import StreamingDataset
from streaming.base.dataset import _ShardState

from core.errors import RecsysError
from datamodules.integrity import ShardError, describe_shard_failure


class CheckedStreamingDataset(StreamingDataset):
    """StreamingDataset that keeps the errors of its download threads and raises them from
    ``__iter__`` (streaming itself only logs them and ends the epoch early)."""

    _thread_error: BaseException | None = None

    def _shard_location(self, shard_id: int) -> str:
        stream = self.streams[self.stream_per_shard[shard_id]]
        raw_info, zip_info = self.shards[shard_id].file_pairs[0]
        base = stream.remote or stream.local
        return os.path.join(base, stream.split or "", (zip_info or raw_info).basename)

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as e:
            # streaming leaves the shard PREPARING in the state array that all ranks and workers of
            # this node share: the others would wait for it forever. Back to REMOTE, they try (and
            # fail) themselves.
            with self._cache_filelock:
                if self._shard_states[shard_id] == _ShardState.PREPARING:
                    self._shard_states[shard_id] = _ShardState.REMOTE
            raise ShardError(describe_shard_failure(self._shard_location(shard_id), e)) from e

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        if self._thread_error is not None:
            raise self._thread_error
        try:
            return super().get_item(sample_id, retry)
        except RecsysError:
            raise
        except Exception as e:
            shard_id, _ = self.spanner[sample_id]
            raise ShardError(describe_shard_failure(self._shard_location(shard_id), e)) from e

    # streaming's end of epoch waits until two of its loops have reported their exit; a thread that
    # died of an exception never reports, so report for it (else the epoch's end waits forever)
    def _prepare_thread(self, it: Any) -> None:
        try:
            super()._prepare_thread(it)
        except BaseException:
            it.on_exit()
            raise

    def _ready_thread(self, it: Any) -> None:
        try:
            super()._ready_thread(it)
        except BaseException:
            it.on_exit()
            raise

    def on_exception(self, future: Any) -> None:
        # streaming re-raises here, inside a Future callback, where it is only logged; keep the
        # error for __iter__ instead, and stop the other threads as streaming does
        error = future.exception()
        if error is not None:
            if self._thread_error is None:
                self._thread_error = error
            self._event.set()

    def __iter__(self) -> Any:
        try:
            yield from super().__iter__()
        except RuntimeError:
            if self._thread_error is None:
                raise
        if self._thread_error is not None:  # the sample loop stopped early because a thread failed
            raise self._thread_error
