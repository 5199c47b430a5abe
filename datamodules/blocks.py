"""The block layout of the MDS shards and the vectorised collate that turns blocks into a ``Batch``.

One MDS sample holds a *block* of up to ``block_rows`` consecutive rows, each column stored as the raw
bytes of a numpy array. Reading one sample per row costs a Python round trip per row (~8k rows/s
here); a block amortises it (hundreds of thousands of rows/s). Rows are shuffled before they are cut
into blocks and StreamingDataset shuffles the blocks across shards every epoch, so a batch mixes
``batch_size / block_rows`` blocks drawn at random from the whole split. Row order *inside* a batch
is irrelevant to a (sum/mean) loss, so it is left as stored.

Columns of a block (n rows, D dense, S single-hot, M multi-hot features):
  n                int     number of rows
  dense            float32 [n, D]
  sparse           int64   [n, S]   vocabulary indices
  label            float32 [n]
  mv{i} / ml{i}    int64 values / int32 lengths of multi-hot feature i
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from core.errors import RecsysError
from datamodules.schema import DatasetMetadata

# KeyedJaggedTensor construction calls torch.fx's is_fx_tracing(), which logs a deprecation warning
# meant for torch.export users once per process (and so once per loader worker): not ours to act on.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def mds_columns(num_multi_hot: int) -> dict[str, str]:
    """MDS column encodings of a block."""
    cols = {"n": "int", "dense": "bytes", "sparse": "bytes", "label": "bytes"}
    for i in range(num_multi_hot):
        cols[f"mv{i}"] = "bytes"
        cols[f"ml{i}"] = "bytes"
    return cols


def encode_block(
    dense: np.ndarray,
    sparse: np.ndarray,
    label: np.ndarray,
    multi: Sequence[tuple[np.ndarray, np.ndarray]] = (),
) -> dict[str, Any]:
    """One MDS sample from the columns of ``n`` rows (multi: (values, lengths) per multi-hot feature)."""
    n = int(label.shape[0])
    sample: dict[str, Any] = {
        "n": n,
        "dense": np.ascontiguousarray(dense, dtype=np.float32).tobytes(),
        "sparse": np.ascontiguousarray(sparse, dtype=np.int64).tobytes(),
        "label": np.ascontiguousarray(label, dtype=np.float32).tobytes(),
    }
    for i, (values, lengths) in enumerate(multi):
        sample[f"mv{i}"] = np.ascontiguousarray(values, dtype=np.int64).tobytes()
        sample[f"ml{i}"] = np.ascontiguousarray(lengths, dtype=np.int32).tobytes()
    return sample


class BlockCollate:
    """Collate a list of blocks into one ``torchrec.datasets.utils.Batch`` with tensor operations only.

    The KJT is built from whole columns: values are the single-hot index matrix transposed (feature
    major) followed by each multi-hot feature's values; lengths are ones for single-hot features and
    the stored lengths for multi-hot ones. Index 0 (out-of-vocabulary) is an ordinary id.
    """

    def __init__(self, meta: DatasetMetadata, source: str = "the dataset") -> None:
        self.keys = [f.name for f in meta.single_hot] + [f.name for f in meta.multi_hot]
        self.num_dense = len(meta.dense_features)
        self.num_single = len(meta.single_hot)
        self.num_multi = len(meta.multi_hot)
        self._ones = torch.ones(0, dtype=torch.int32)
        self.source = source
        self.cardinalities = [f.cardinality for f in meta.single_hot] + [f.cardinality for f in meta.multi_hot]

    def __call__(self, samples: list[dict[str, Any]]) -> Any:
        from torchrec.datasets.utils import Batch
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        n = sum(int(s["n"]) for s in samples)
        dense = _cat_bytes([s["dense"] for s in samples], np.float32).view(n, self.num_dense)
        sparse = _cat_bytes([s["sparse"] for s in samples], np.int64).view(n, self.num_single)
        label = _cat_bytes([s["label"] for s in samples], np.float32)
        multi = [
            (
                _cat_bytes([s[f"mv{i}"] for s in samples], np.int64),
                _cat_bytes([s[f"ml{i}"] for s in samples], np.int32),
            )
            for i in range(self.num_multi)
        ]
        if len(self._ones) < n * self.num_single:
            self._ones = torch.ones(n * self.num_single, dtype=torch.int32)
        values = _cat([sparse.t().reshape(-1), *[v for v, _ in multi]])
        self.check_ids(values, n, [v for v, _ in multi])
        lengths = _cat([self._ones[: n * self.num_single], *[ln for _, ln in multi]])
        # Per-key lengths are known here, so the KJT needs no pass over `lengths` to find them.
        per_key = [n] * self.num_single + [len(v) for v, _ in multi]
        kjt = KeyedJaggedTensor(keys=self.keys, values=values, lengths=lengths, stride=n, length_per_key=per_key)
        return Batch(dense_features=dense, sparse_features=kjt, labels=label)

    def check_ids(self, values: torch.Tensor, n: int, multi: list[torch.Tensor]) -> None:
        """Every index below its table's size (metadata.json's cardinality): an embedding lookup past
        the end is not an error in fbgemm's CPU kernels, so a metadata.json that does not describe these
        shards would train silently wrong. A min and max per feature over the feature-major KJT values,
        in numpy (single-threaded: torch's threaded reductions stall on a busy host); about 1% of the
        collate's time."""
        if not n:
            return
        single = values[: n * self.num_single].numpy().reshape(self.num_single, n)
        top = [*single.max(axis=1).tolist(), *(int(v.max()) if v.numel() else 0 for v in multi)]
        low = [*single.min(axis=1).tolist(), *(int(v.min()) if v.numel() else 0 for v in multi)]
        for j, card in enumerate(self.cardinalities):
            if top[j] >= card or low[j] < 0:
                raise RecsysError(
                    f"{self.source}/metadata.json: feature {self.keys[j]!r} has cardinality {card} but its "
                    f"shards hold index {top[j] if low[j] >= 0 else low[j]}; the metadata does not describe "
                    "these shards (prepare the dataset again)"
                )


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    # torch.cat of a single tensor still copies it; with single-hot features only there is one part.
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _cat_bytes(chunks: list[bytes], dtype: type) -> torch.Tensor:
    # One copy: join the raw bytes, then view them as a tensor.
    buf = b"".join(chunks)
    if not buf:
        return torch.empty(0, dtype=torch.from_numpy(np.empty(0, dtype=dtype)).dtype)
    return torch.from_numpy(np.frombuffer(bytearray(buf), dtype=dtype))
