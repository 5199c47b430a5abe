"""synthetic-ctr: a ranking table with a known ground truth (synthetic-retrieval, the retrieval set,
lives in ``datamodules.synthetic_retrieval``).

The DLRM/Criteo layout (13 dense + 26 sparse by default); labels are drawn from a
planted logistic model with first-order effects and factorised pairwise interactions, carried mostly
by the Zipf-popular ids of each feature (an id's effect decays with its popularity rank), and ids
seen fewer than ``MIN_ID_COUNT`` times in train map to the out-of-vocabulary index. The expected AUC
and logloss of the planted probabilities on the test split (the best any model can do) go into the
metadata. Generation is chunked and seeded per chunk: two passes (vocabulary, then writing) with
memory that depends on the chunk size and cardinalities, never on the row count.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import require
from datamodules.blocks import encode_block
from datamodules.config import PrepareConfig
from datamodules.encoding import SplitWriter, finish_dataset, sparse_feature
from datamodules.schema import SPLITS, DatasetMetadata, DenseFeature

log = logging.getLogger(__name__)

# -- synthetic-ctr ----------------------------------------------------------------------------------


SIGNAL_RANKS = 20
"""synthetic-ctr: popularity rank at which an id's planted effect has halved."""
MIN_ID_COUNT = 5
"""synthetic-ctr: ids seen fewer times in train share the out-of-vocabulary index 0, as in the usual
Criteo preprocessing (a row's one-off ids would otherwise let a model memorise it)."""


def default_cardinalities(n: int) -> list[int]:
    """Log-spaced cardinalities from 10 to 100000."""
    if n == 1:
        return [1000]
    return [round(10 ** (1 + 4 * i / (n - 1))) for i in range(n)]


@dataclass
class PlantedCtr:
    """The planted logistic model of synthetic-ctr."""

    cards: list[int]
    multi: int
    max_hot: int
    zipf: float
    dense_w: np.ndarray
    bias: float
    effects: list[np.ndarray]
    factors: list[np.ndarray]
    cdfs: list[np.ndarray]
    perms: list[np.ndarray]

    @classmethod
    def create(cls, cfg: PrepareConfig) -> PlantedCtr:
        s = cfg.synthetic
        cards = list(s.cardinalities) if s.cardinalities is not None else default_cardinalities(s.num_sparse)
        require(
            len(cards) == s.num_sparse,
            f"--synthetic.cardinalities: {len(cards)} values for --synthetic.num_sparse {s.num_sparse}",
        )
        require(all(c >= 2 for c in cards), "--synthetic.cardinalities: each must be at least 2")
        require(0 <= s.multi_hot <= s.num_sparse, "--synthetic.multi_hot: must be between 0 and num_sparse")
        require(s.num_dense >= 0 and s.num_sparse >= 1, "--synthetic.num_sparse: at least one sparse feature")
        rng = np.random.default_rng([cfg.seed, 1 << 30])
        effects, factors, cdfs, perms = [], [], [], []
        for c in cards:
            # As in real logs, the signal sits in the popular ids: an id's effect and factors shrink
            # as 1 / (1 + rank / SIGNAL_RANKS) with its popularity rank (and with the cardinality),
            # so the long tail of rare ids, which no training set pins down, carries little of it.
            scale = 0.5 / np.sqrt(1 + np.log10(c))
            perm = rng.permutation(c)
            decay = np.empty(c, np.float32)
            decay[perm] = 1.0 / (1.0 + np.arange(c) / SIGNAL_RANKS)  # indexed by raw id; perm: rank -> raw id
            effects.append((rng.normal(0, scale, c) * decay).astype(np.float32))
            factors.append((rng.normal(0, 0.12, (c, 4)) * decay[:, None]).astype(np.float32))
            p = 1.0 / np.arange(1, c + 1) ** s.zipf
            cdfs.append(np.cumsum(p / p.sum()))
            perms.append(perm)
        dense_w = rng.normal(0, 0.3, s.num_dense).astype(np.float32)
        return cls(cards, s.multi_hot, s.max_hot, s.zipf, dense_w, -1.0, effects, factors, cdfs, perms)

    def generate(self, seed: int, chunk: int, m: int) -> dict[str, Any]:
        """Rows of one chunk: dense, raw ids (values, lengths) per feature, probability and label."""
        rng = np.random.default_rng([seed, chunk])
        dense = rng.normal(size=(m, len(self.dense_w))).astype(np.float32)
        logit = self.bias + dense @ self.dense_w
        zsum = np.zeros((m, 4), np.float32)
        zsq = np.zeros(m, np.float32)
        ids = []
        n_single = len(self.cards) - self.multi
        for f, c in enumerate(self.cards):
            lengths = np.ones(m, np.int32) if f < n_single else rng.integers(1, self.max_hot + 1, m).astype(np.int32)
            ranks = np.minimum(np.searchsorted(self.cdfs[f], rng.random(int(lengths.sum()))), c - 1)
            raw = self.perms[f][ranks]
            if f < n_single:
                e, z = self.effects[f][raw], self.factors[f][raw]
            else:
                row = np.repeat(np.arange(m), lengths)
                e = np.bincount(row, self.effects[f][raw], m) / lengths
                z = np.stack([np.bincount(row, self.factors[f][raw, k], m) for k in range(4)], 1) / lengths[:, None]
            logit += e
            zsum += z
            zsq += (z * z).sum(1)
            ids.append((raw.astype(np.int64), lengths))
        logit += 0.5 * ((zsum * zsum).sum(1) - zsq)
        prob = 1 / (1 + np.exp(-logit))
        label = (rng.random(m) < prob).astype(np.float32)
        return {"dense": dense, "ids": ids, "prob": prob, "label": label, "u": rng.random(m)}


def split_codes(cfg: PrepareConfig, chunk_start: int, rows: int, u: np.ndarray) -> np.ndarray:
    """Split per row: random (seeded per row) or temporal (row order is time)."""
    if cfg.split == "temporal":
        pos = (chunk_start + np.arange(len(u))) / rows
        return np.where(pos >= 1 - cfg.test_frac, 2, np.where(pos >= 1 - cfg.test_frac - cfg.val_frac, 1, 0))
    return np.where(u < cfg.test_frac, 2, np.where(u < cfg.test_frac + cfg.val_frac, 1, 0))


class WeightedAuc:
    """Expected AUC of the true probabilities (rows count as positive with weight p), by histogram."""

    def __init__(self, bins: int = 1 << 16) -> None:
        self.pos = np.zeros(bins)
        self.neg = np.zeros(bins)
        self.entropy = 0.0
        self.n = 0

    def update(self, p: np.ndarray) -> None:
        b = np.minimum((p * len(self.pos)).astype(np.int64), len(self.pos) - 1)
        self.pos += np.bincount(b, p, len(self.pos))
        self.neg += np.bincount(b, 1 - p, len(self.neg))
        q = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-12)
        self.entropy += float(-(q * np.log(q) + (1 - q) * np.log(1 - q)).sum())
        self.n += len(p)

    def auc(self) -> float:
        below = np.cumsum(self.neg) - self.neg
        return float((self.pos * (below + 0.5 * self.neg)).sum() / (self.pos.sum() * self.neg.sum()))


def prepare_synthetic_ctr(cfg: PrepareConfig, tmp: Path) -> DatasetMetadata:
    """Generate and write synthetic-ctr in two chunked passes (vocabulary, then shards)."""
    from tqdm import tqdm

    started = time.time()
    rows = cfg.rows or 100_000
    model = PlantedCtr.create(cfg)
    chunk_rows = cfg.synthetic.chunk_rows
    chunks = [(i, lo, min(chunk_rows, rows - lo)) for i, lo in enumerate(range(0, rows, chunk_rows))]
    n_dense, cards = len(model.dense_w), model.cards
    train_counts = [np.zeros(c, np.int64) for c in cards]
    dsum, dsq, dn = np.zeros(n_dense), np.zeros(n_dense), 0
    for i, lo, m in tqdm(chunks, desc="vocabulary", unit="chunk", disable=len(chunks) < 4):
        g = model.generate(cfg.seed, i, m)
        train = split_codes(cfg, lo, rows, g["u"]) == 0
        for f, (values, lengths) in enumerate(g["ids"]):
            train_counts[f] += np.bincount(values[np.repeat(train, lengths)], minlength=len(train_counts[f]))
        x = g["dense"][train].astype(np.float64)
        dsum += x.sum(0)
        dsq += (x * x).sum(0)
        dn += len(x)
    mean = dsum / max(dn, 1)
    std = np.sqrt(np.maximum(dsq / max(dn, 1) - mean**2, 0))
    std[std == 0] = 1.0
    seen = [n >= MIN_ID_COUNT for n in train_counts]
    maps = [np.where(s, np.cumsum(s), 0).astype(np.int64) for s in seen]  # raw id -> index (0 = OOV)
    n_single = len(cards) - model.multi
    writers = {name: SplitWriter(tmp / name, model.multi) for name in SPLITS}
    best = WeightedAuc()
    with contextlib.ExitStack() as stack:
        for w in writers.values():
            stack.enter_context(w)  # each finished when the block succeeds, abandoned when it fails
        for i, lo, m in tqdm(chunks, desc="write", unit="chunk", disable=len(chunks) < 4):
            g = model.generate(cfg.seed, i, m)
            code = split_codes(cfg, lo, rows, g["u"])
            dense = ((g["dense"] - mean) / std).astype(np.float32)
            single = np.zeros((m, n_single), np.int64)
            for f in range(n_single):
                single[:, f] = maps[f][g["ids"][f][0]]
            for c, name in enumerate(SPLITS):
                sel = np.flatnonzero(code == c)
                if name == "test":
                    best.update(g["prob"][sel])
                multi = []
                for f in range(n_single, len(cards)):
                    values, lengths = g["ids"][f]
                    keep = np.repeat(code == c, lengths)
                    multi.append((maps[f][values[keep]], lengths[sel]))
                offs = [np.r_[0, np.cumsum(ln, dtype=np.int64)] for _, ln in multi]
                for b in range(0, len(sel), cfg.block_rows):
                    e = min(b + cfg.block_rows, len(sel))
                    rows_b = sel[b:e]
                    writers[name].write(
                        encode_block(
                            dense[rows_b],
                            single[rows_b],
                            g["label"][rows_b],
                            [(v[o[b] : o[e]], ln[b:e]) for (v, ln), o in zip(multi, offs, strict=True)],
                        )
                    )
    vocabs = {f"C{f + 1}": [str(v) for v in np.flatnonzero(s)] for f, s in enumerate(seen)}
    sparse = [sparse_feature(name, vocab, "context", f >= n_single) for f, (name, vocab) in enumerate(vocabs.items())]
    splits = {name: w.info() for name, w in writers.items()}
    rule: dict[str, Any] = {
        "rule": cfg.split,
        "seed": cfg.seed,
        "engine": "local",
        "per": "row",
        "val_frac": cfg.val_frac,
        "test_frac": cfg.test_frac,
    }
    meta = DatasetMetadata(
        dataset="synthetic-ctr",
        task="ctr",
        block_rows=cfg.block_rows,
        dense_features=tuple(
            DenseFeature(f"I{j + 1}", "context", float(mean[j]), float(std[j])) for j in range(n_dense)
        ),
        sparse_features=tuple(sparse),
        label={"name": "label", "definition": "Bernoulli(sigmoid(planted logit))"},
        splits=splits,
        split_rule=rule,
        source={
            "generator": "synthetic-ctr",
            "seed": cfg.seed,
            "rows": rows,
            "raw_cardinalities": cards,
            "multi_hot": model.multi,
            "max_hot": model.max_hot,
            "zipf": model.zipf,
        },
        extra={
            "planted_test_auc": round(best.auc(), 6),
            "planted_test_logloss": round(best.entropy / max(best.n, 1), 6),
        },
    )
    finish_dataset(meta, vocabs, tmp)
    log.info(
        "prepared synthetic-ctr: %s rows in %.1fs; planted optimum test AUC %.4f",
        f"{rows:,}",
        time.time() - started,
        meta.extra["planted_test_auc"],
    )
    return meta
