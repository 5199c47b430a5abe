"""Thin LightningModules: loss, metrics and optimizers around a plain TorchRec model.

The model arrives as an argument (tables on ``meta``); ``TorchRecStrategy`` shards it. Embedding
tables are updated by the fused in-backward optimizer from ``sparse_optimizer()``; the dense
parameters by the optimizer returned from ``configure_optimizers()``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import numpy as np
import pyarrow as pa
import torch
import torchmetrics
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from core.errors import RecsysError
from datamodules.corpus import RetrievalCorpus, tower_inputs
from datamodules.histories import UserHistories, single_ids, with_feature
from datamodules.schema import HISTORY_FEATURE, DatasetMetadata
from modules.config import ModelConfig, OptimConfig
from modules.evaluation import CURVE_CUTOFFS, ScoreHistogram, block_curve_sums, block_users, item_columns
from modules.evaluation import corpus_metrics as corpus_metrics  # where the benches import it from
from modules.sharding import sparse_optimizer_class

log = logging.getLogger(__name__)
EVAL_BLOCK_BYTES = 256 * 1024**2

DENSE_OPTIMIZERS: dict[str, Any] = {
    "adam": torch.optim.Adam,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}


class HistoryFeature:
    """Appends each row's user train history (``user_history``) to a batch's KJT, looked up by user id.

    Training rows leave their own item out of the bag (leave-one-out: a masked lookup, the item being
    predicted is never an input; unless ``--arch.history_leave_one_out false``) and get history
    dropout; evaluation rows read the whole train history. Rows without a user get an empty bag.
    """

    def __init__(self, histories: UserHistories, arch: ModelConfig, meta: DatasetMetadata) -> None:
        self.histories = histories
        self.user_key = meta.user_id_feature or "user_id"
        self.item_key = meta.item_id_feature or "item_id"
        self.max_len, self.dropout = arch.history_max_len, arch.history_dropout
        self.leave_one_out = arch.history_leave_one_out and arch.loss != "multinomial"
        self._on: dict[torch.device, UserHistories] = {}

    @classmethod
    def of(cls, arch: ModelConfig, meta: DatasetMetadata, histories: UserHistories | None) -> HistoryFeature | None:
        """The feature ``--arch.history`` asks for (None without it); a dataset without histories is one line."""
        if not arch.history:
            return None
        if histories is None:
            raise RecsysError("--arch.history true: the dataset has no user histories; prepare it again")
        return cls(histories, arch, meta)

    def on(self, device: torch.device) -> UserHistories:
        """The histories on ``device`` (copied there once)."""
        if device not in self._on:
            self._on[device] = self.histories.to(device)
        return self._on[device]

    def __call__(self, kjt: KeyedJaggedTensor, training: bool) -> KeyedJaggedTensor:
        users = single_ids(kjt, self.user_key)
        exclude = single_ids(kjt, self.item_key) if training and self.leave_one_out else None
        dropout = self.dropout if training else 0.0
        values, lengths = self.on(users.device).lookup(users, exclude, self.max_len, dropout)
        return with_feature(kjt, HISTORY_FEATURE, values, lengths)


class RecTask(L.LightningModule):
    """Shared parts: optimizers, AUROC/logloss on every split, device transfer of ``Batch``, the user
    history appended to batches when the model reads it."""

    def __init__(self, model: nn.Module, optim: OptimConfig, history: HistoryFeature | None = None) -> None:
        super().__init__()
        self.model = model
        self.optim = optim
        self.history = history
        self.metrics = nn.ModuleDict(
            {
                split: nn.ModuleDict(
                    {
                        "auroc": torchmetrics.classification.BinaryAUROC(),
                        "logloss": torchmetrics.MeanMetric(),
                        "label_rate": torchmetrics.MeanMetric(),
                    }
                )
                for split in ("val", "test")
            }
        )
        self.figure_data: dict[str, Any] = {}
        """What the test stage leaves for the run's figures (``app.figures``): Recall/NDCG at every K of a
        retrieval run, the score histogram of a ranking run; filled on every rank, drawn by rank 0."""

    def sparse_optimizer(self) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        kwargs: dict[str, Any] = {"lr": self.optim.sparse_lr}
        if self.optim.sparse == "adam":
            kwargs["eps"] = 1e-8
        return sparse_optimizer_class(self.optim.sparse), kwargs

    def configure_optimizers(self) -> Any:
        from torchrec.optim.keyed import KeyedOptimizerWrapper
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        cls = DENSE_OPTIMIZERS[self.optim.dense]
        dense = dict(in_backward_optimizer_filter(self.model.named_parameters()))
        return KeyedOptimizerWrapper(
            dense, lambda p: cls(p, lr=self.optim.dense_lr, weight_decay=self.optim.weight_decay)
        )

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch.to(device, non_blocking=True)

    def with_history(self, kjt: KeyedJaggedTensor, training: bool) -> KeyedJaggedTensor:
        """``kjt`` with each row's user history appended (``HistoryFeature``); unchanged without history."""
        return kjt if self.history is None else self.history(kjt, training)

    def logits(self, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def _score(self, batch: Any, split: str) -> None:
        self._update(self.logits(batch), batch, split)

    def _update(self, logits: torch.Tensor, batch: Any, split: str) -> None:
        labels = batch.labels
        m: Any = self.metrics[split]
        m["auroc"].update(torch.sigmoid(logits), labels.long())
        m["logloss"].update(nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none"))
        m["label_rate"].update(labels)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._score(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._score(batch, "test")

    def _log_split(self, split: str) -> None:
        metrics: Any = self.metrics[split]
        rate = float(metrics["label_rate"].compute())  # a collective on several ranks: every rank computes it
        for name, metric in metrics.items():
            # AUROC is undefined when every label is the same (e.g. retrieval data of positives only)
            if name == "label_rate" or (name == "auroc" and rate in (0.0, 1.0)):
                metric.reset()
                continue
            self.log(f"{split}/{name}", metric.compute(), sync_dist=False)
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_split("val")

    def on_test_epoch_end(self) -> None:
        self._log_split("test")


class RankingTask(RecTask):
    """Binary classification of the label with BCE on the model's logit (DLRM, DCN, DeepFM); with
    ``history`` the model also reads the user's train history, the row's own item left out in training.

    On ranking data made of whole candidate lists (``recsys data candidates``: one MDS block per user's
    list), ``lists`` names the feature that groups a batch's rows into lists (the user id): then
    NDCG@K within each list is logged as ``{split}/ndcg_at_K``, and ``listwise`` trains with a softmax
    over each list instead of BCE (each liked row against the whole list, averaged per list)."""

    def __init__(
        self,
        model: nn.Module,
        optim: OptimConfig,
        history: HistoryFeature | None = None,
        lists: str | None = None,
        listwise: bool = False,
        k: int = 10,
    ) -> None:
        super().__init__(model, optim, history)
        if listwise and lists is None:
            raise RecsysError(
                "--arch.loss softmax: a ranking model learns listwise only from the candidate lists of "
                "recsys data candidates"
            )
        self.lists, self.listwise, self.k = lists, listwise, k
        self.test_scores = ScoreHistogram()
        if lists is not None:
            for split in ("val", "test"):
                split_metrics: Any = self.metrics[split]
                split_metrics[f"ndcg_at_{k}"] = torchmetrics.MeanMetric()

    def logits(self, batch: Any, training: bool = False) -> torch.Tensor:
        return self.model(batch.dense_features, self.with_history(batch.sparse_features, training)).squeeze(-1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        logits = self.logits(batch, training=True)
        if self.listwise and self.lists is not None:
            loss = listwise_loss(logits, batch.labels, single_ids(batch.sparse_features, self.lists))
        else:
            loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch.labels))
        return loss

    def _update(self, logits: torch.Tensor, batch: Any, split: str) -> None:
        super()._update(logits, batch, split)
        if split == "test":
            self.test_scores.update(torch.sigmoid(logits), batch.labels)
        if self.lists is not None:
            total, lists = list_ndcg(logits, batch.labels, single_ids(batch.sparse_features, self.lists), self.k)
            if lists:
                split_metrics: Any = self.metrics[split]
                split_metrics[f"ndcg_at_{self.k}"].update(total / lists, weight=lists)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self.figure_data["scores"] = self.test_scores.compute()  # a collective on several ranks
        self.test_scores.reset()


def list_groups(groups: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Each row's list number (0..G-1) and the number of lists G."""
    _, inverse = torch.unique(groups, return_inverse=True)
    return inverse, int(inverse.max()) + 1 if len(inverse) else 0


def listwise_loss(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy within lists: minus the mean, over each list's liked rows, of their log
    softmax over the list, averaged over the lists with a liked row (ListNet's loss with the labels,
    normalised, as the target distribution)."""
    g, count = list_groups(groups)
    peak = torch.full((count,), -torch.inf, device=logits.device).scatter_reduce(0, g, logits.detach(), "amax")
    shifted = logits - peak[g]
    norm = torch.zeros(count, device=logits.device, dtype=logits.dtype).index_add_(0, g, shifted.exp())
    log_softmax = shifted - norm.log()[g]
    liked = (labels > 0.5).to(logits.dtype)
    per_list = torch.zeros(count, device=logits.device, dtype=logits.dtype).index_add_(0, g, liked)
    with_liked = per_list > 0
    if not bool(with_liked.any()):
        return logits.sum() * 0.0  # keeps every rank's backward in step
    loss = -(log_softmax * liked / per_list.clamp(min=1)[g]).sum()
    return loss / with_liked.sum()


def list_ndcg(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, k: int) -> tuple[float, int]:
    """(sum over lists of NDCG@k of the lists ordered by ``logits``, number of lists with a liked row);
    the ideal order puts a list's liked rows first (liked items outside the list are not counted)."""
    g, count = list_groups(groups)
    if count == 0:
        return 0.0, 0
    by_score = torch.argsort(-logits.detach(), stable=True)
    order = by_score[torch.argsort(g[by_score], stable=True)]  # rows by list, best first within each
    sizes = torch.bincount(g, minlength=count)
    starts = torch.cumsum(sizes, 0) - sizes
    position = torch.arange(len(order), device=logits.device) - starts[g[order]]
    discount = 1.0 / torch.log2(position.to(torch.float64) + 2.0)
    liked = (labels[order] > 0.5).to(torch.float64)
    top = (position < k).to(torch.float64)
    dcg = torch.zeros(count, dtype=torch.float64, device=logits.device).index_add_(0, g[order], liked * discount * top)
    n_liked = torch.zeros(count, dtype=torch.float64, device=logits.device).index_add_(0, g, (labels > 0.5).double())
    ideal_table = torch.cumsum(1.0 / torch.log2(torch.arange(k, dtype=torch.float64, device=logits.device) + 2.0), 0)
    has = n_liked > 0
    ideal = ideal_table[(n_liked.clamp(min=1, max=k) - 1).long()]
    return float((dcg[has] / ideal[has]).sum()), int(has.sum())


# -- retrieval ---------------------------------------------------------------------------------------


def select_rows(kjt: KeyedJaggedTensor, rows: torch.Tensor) -> KeyedJaggedTensor:
    """The KJT of rows ``rows`` (indices into the batch) of ``kjt``, every key kept."""
    values, lengths = [], []
    for jt in kjt.to_dict().values():
        offsets = jt.offsets()
        ln = jt.lengths()[rows]
        starts = offsets[rows]
        within = torch.arange(int(ln.sum()), device=ln.device) - torch.repeat_interleave(torch.cumsum(ln, 0) - ln, ln)
        values.append(jt.values()[torch.repeat_interleave(starts, ln) + within])
        lengths.append(ln)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=kjt.keys(), values=torch.cat(values), lengths=torch.cat(lengths).to(torch.int32)
    )


def append_rows(first: KeyedJaggedTensor, second: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """The rows of ``first`` followed by those of ``second`` (same keys, in ``first``'s order)."""
    a, b = first.to_dict(), second.to_dict()
    keys = first.keys()
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.cat([t for k in keys for t in (a[k].values(), b[k].values())]),
        lengths=torch.cat([t.to(torch.int32) for k in keys for t in (a[k].lengths(), b[k].lengths())]),
    )


class RetrievalTask(RecTask):
    """Two-tower training (BCE, in-batch / mixed sampled softmax with log-Q, or full softmax over the
    corpus), the user's train history appended per batch when the model reads it, and full-corpus
    evaluation streamed over blocks of users (``retrieval_metrics``, ``modules.evaluation``)."""

    def __init__(
        self,
        model: nn.Module,
        optim: OptimConfig,
        arch: ModelConfig,
        meta: DatasetMetadata,
        corpus: RetrievalCorpus | None = None,
        k: int = 10,
        eval_batch: int = 4096,
        eval_users: int = 0,
        eval_seed: int = 0,
        eval_block_bytes: int = EVAL_BLOCK_BYTES,
    ) -> None:
        super().__init__(model, optim, HistoryFeature.of(arch, meta, corpus.histories if corpus is not None else None))
        self.loss_kind = arch.loss
        self.logq = arch.logq_correction
        self.temperature = arch.temperature
        self.meta = meta
        self.corpus = corpus
        self.k = k
        self.eval_batch = eval_batch
        self.eval_users, self.eval_seed, self.eval_block_bytes = eval_users, eval_seed, eval_block_bytes
        self._columns: torch.Tensor | None = None
        self._announced: set[str] = set()
        self.item_key = meta.item_id_feature or "item_id"
        self.register_buffer(
            "item_log_q", corpus.item_log_q if corpus is not None else torch.zeros(1), persistent=False
        )
        self.user_key = meta.user_id_feature or "user_id"
        self.num_uniform = arch.uniform_negatives if corpus is not None and arch.loss == "softmax" else 0
        self.negative_pool: tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor] | None = None
        self.whole_corpus = arch.loss in ("full_softmax", "multinomial")
        if self.num_uniform or self.whole_corpus:
            if corpus is None:
                raise RecsysError(f"--arch.loss {arch.loss}: needs the dataset's item corpus")
            dense, kjt = tower_inputs(corpus.items.table, meta)
            ids = torch.as_tensor(corpus.items.column(self.item_key).astype(np.int64))
            self.negative_pool = (dense, kjt, ids)
            # full softmax: the column of every item id among the corpus items (-1: not in the corpus)
            column = torch.full((meta.feature(self.item_key).cardinality,), -1, dtype=torch.long)
            column[ids] = torch.arange(len(ids))
            self.register_buffer("item_column", column, persistent=False)

    def logits(self, batch: Any) -> torch.Tensor:
        user, item = self.model(batch.dense_features, self.with_history(batch.sparse_features, training=False))
        return (user * item).sum(-1) / self.temperature

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.loss_kind == "bce":
            user, item = self.model(batch.dense_features, self.with_history(batch.sparse_features, training=True))
            logits = (user * item).sum(-1) / self.temperature
            loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        else:
            dense, kjt, n = batch.dense_features, batch.sparse_features, len(batch.labels)
            if self.loss_kind == "multinomial":
                users = single_ids(kjt, self.user_key)
                rows = self.one_row_per_user(users, batch.labels)
                dense, kjt, users, n = dense[rows], select_rows(kjt, rows), users[rows], len(rows)
            neg_ids = None
            if self.negative_pool is not None:
                pool_dense, pool_kjt, pool_ids = self.negative_pool
                if self.whole_corpus:
                    neg_dense, neg_kjt, neg_ids = pool_dense, pool_kjt, pool_ids
                else:
                    pick = torch.randint(len(pool_ids), (self.num_uniform,))
                    neg_dense, neg_kjt, neg_ids = pool_dense[pick], select_rows(pool_kjt, pick), pool_ids[pick]
                dense = torch.cat([dense, neg_dense.to(dense.device)])
                kjt = append_rows(kjt, neg_kjt.to(dense.device))
                neg_ids = neg_ids.to(dense.device)
            user, item = self.model(dense, self.with_history(kjt, training=True))
            item_ids = batch.sparse_features[self.item_key].values()
            if self.loss_kind == "full_softmax":
                loss = self.full_softmax_loss(user[:n], item[n:], item_ids, batch.labels)
            elif self.loss_kind == "multinomial":
                loss = self.multinomial_loss(user[:n], item[n:], users)
            else:
                negatives = None if neg_ids is None else (item[n:], neg_ids, len(self.negative_pool[2]))  # type: ignore[index]
                loss = self.softmax_loss(user[:n], item[:n], item_ids, batch.labels, negatives)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch.labels))
        return loss

    def softmax_loss(
        self,
        user: torch.Tensor,
        item: torch.Tensor,
        item_ids: torch.Tensor,
        labels: torch.Tensor,
        negatives: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    ) -> torch.Tensor:
        """Sampled softmax of each positive pair against the batch's other positive items and, with
        ``negatives`` (embeddings, ids, corpus size), items drawn uniformly from the corpus.

        Each candidate's logit is corrected by log of its expected count among the candidates: P q(i)
        for in-batch candidates (P positives, q = share of train positives), plus M / N with M
        uniform draws from N corpus items (the mixture of Yang et al. 2020). Candidates with the
        row's own item (other rows with the same item, uniform draws of it) are masked out.
        """
        pos = labels > 0.5
        if int(pos.sum()) < 2:
            zero = (user.sum() + item.sum()) * 0.0  # keeps every rank's backward in step
            return zero if negatives is None else zero + negatives[0].sum() * 0.0
        u, v, ids = user[pos], item[pos], item_ids[pos]
        eye = torch.eye(len(ids), dtype=torch.bool, device=u.device)
        mask = (ids.unsqueeze(0) == ids.unsqueeze(1)) & ~eye
        cand, cand_ids = v, ids
        if negatives is not None:
            neg, neg_ids, _ = negatives
            cand, cand_ids = torch.cat([v, neg]), torch.cat([ids, neg_ids])
            mask = torch.cat([mask, ids.unsqueeze(1) == neg_ids.unsqueeze(0)], dim=1)
        logits = u @ cand.t() / self.temperature
        if self.logq:
            log_q: torch.Tensor = self.item_log_q  # type: ignore[assignment]
            count = len(ids) * log_q[cand_ids].exp()
            if negatives is not None:
                count = count + len(negatives[1]) / negatives[2]
            logits = logits - count.log().unsqueeze(0)
        logits = logits.masked_fill(mask, -1e9)
        return nn.functional.cross_entropy(logits, torch.arange(len(ids), device=logits.device))

    def full_softmax_loss(
        self, user: torch.Tensor, corpus: torch.Tensor, item_ids: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Softmax of each positive row over every corpus item (``corpus``: the item tower's output for
        all of them, in corpus order): exact, so neither sampling nor a log-Q correction."""
        pos = labels > 0.5
        column: torch.Tensor = self.item_column  # type: ignore[assignment]
        target = column[item_ids[pos]]
        known = target >= 0
        if not bool(known.any()):
            return (user.sum() + corpus.sum()) * 0.0  # keeps every rank's backward in step
        logits = user[pos][known] @ corpus.t() / self.temperature
        return nn.functional.cross_entropy(logits, target[known])

    def user_histories_on(self, device: torch.device) -> UserHistories:
        assert self.history is not None
        return self.history.on(device)

    def one_row_per_user(self, users: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Indices of the positive rows kept for the multinomial loss: each with probability 1 / its
        user's history length, so that an epoch visits every user once in expectation (Mult-DAE's
        pass over users) rather than once per interaction; at least one row."""
        histories = self.user_histories_on(users.device)
        safe = users.long().clamp(0, histories.num_users - 1)
        length = (histories.offsets[safe + 1] - histories.offsets[safe]).clamp(min=1)
        keep = (labels > 0.5) & (torch.rand(len(users), device=users.device) * length < 1.0)
        rows = keep.nonzero().squeeze(1)
        return rows if len(rows) else (labels > 0.5).nonzero().squeeze(1)[:1]

    def multinomial_loss(self, user: torch.Tensor, corpus: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        """Mean over rows of the negative log-likelihood, under a softmax over every corpus item, of
        all the items in the row's user's train history, summed over them (Mult-DAE's multinomial
        likelihood: a user with more items weighs more)."""
        values, lengths = self.user_histories_on(users.device).lookup(users)
        column: torch.Tensor = self.item_column  # type: ignore[assignment]
        target = column[values]
        row = torch.repeat_interleave(torch.arange(len(lengths), device=user.device), lengths.long())
        known = target >= 0
        if not bool(known.any()):
            return (user.sum() + corpus.sum()) * 0.0  # keeps every rank's backward in step
        log_probs = torch.log_softmax(user @ corpus.t() / self.temperature, dim=1)
        return -log_probs[row[known], target[known]].sum() / len(users)

    # -- full-corpus evaluation ----------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, rows: pa.Table, tower: int) -> torch.Tensor:
        """Embeddings of rows of users.parquet / items.parquet (0 = user tower, 1 = item tower), in
        batches of ``eval_batch`` rows; on the model's device."""
        out = []
        for lo in range(0, max(rows.num_rows, 1), self.eval_batch):
            dense, kjt = tower_inputs(rows.slice(lo, self.eval_batch), self.meta)
            kjt = self.with_history(kjt.to(self.device), training=False)
            out.append(self.model(dense.to(self.device), kjt)[tower].float())
        return torch.cat(out)[: rows.num_rows]

    def evaluated_users(self, split: str) -> tuple[np.ndarray, int]:
        """The user ids ``split`` is evaluated on (ascending) and how many have a positive there:
        all of them, or with ``--trainer.eval_users N`` a sample of N drawn with the run's seed (the
        same users every epoch)."""
        assert self.corpus is not None
        c = self.corpus
        users = c.targets[split].users()
        users = users[(users > 0) & (c.user_rows[users] >= 0)]
        total = len(users)
        if 0 < self.eval_users < total:
            rng = np.random.default_rng([self.eval_seed, 1 if split == "val" else 2])
            users = np.sort(rng.choice(users, size=self.eval_users, replace=False))
        return users, total

    @torch.no_grad()
    def item_vectors(self) -> torch.Tensor:
        """Every corpus item through the item tower (corpus order). With several processes each embeds
        an equal share (the last padded), so that every process runs the same number of forward passes
        (the sharded tables' collectives stay in step), and the shares are gathered."""
        assert self.corpus is not None
        items = self.corpus.items
        rank, world = process_group()
        share = -(-len(items) // world)
        positions = np.arange(rank * share, (rank + 1) * share)
        vectors = self.embed(items.take(np.where(positions < len(items), positions, 0)), 1)
        if world > 1:
            parts = [torch.empty_like(vectors) for _ in range(world)]
            torch.distributed.all_gather(parts, vectors.contiguous())
            vectors = torch.cat(parts)
        return vectors[: len(items)]

    @torch.no_grad()
    def retrieval_metrics(self, split: str) -> dict[str, float]:
        """Recall@K and NDCG@K over the full item corpus, items a user had in train excluded (the
        definitions: ``modules.evaluation``), plus how many users they average over and how long they
        took. Streamed: each process scores its share of the users in blocks of ``block x items``
        scores (``eval_block_bytes``), and the sums are all-reduced. Every process must call it."""
        assert self.corpus is not None
        started = time.perf_counter()
        c = self.corpus
        users, total = self.evaluated_users(split)
        if not total:
            return {}
        if self.global_rank == 0 and split not in self._announced and len(users) < total:
            log.info(
                "%s: Recall@%d and NDCG@%d over a seeded sample of %d of %d users (--trainer.eval_users)",
                split,
                self.k,
                self.k,
                len(users),
                total,
            )
        self._announced.add(split)
        if self._columns is None:
            self._columns = item_columns(c.items.column(self.item_key), c.item_log_q.shape[0])
        items = self.item_vectors()
        rank, world = process_group()
        share = -(-len(users) // world)
        mine = users[rank * share : (rank + 1) * share]
        block = min(max(share, 1), block_users(len(c.items), self.eval_block_bytes))
        # the test split also gets the curve at every K up to CURVE_CUTOFFS, from the same top-K per row
        cutoffs = max(self.k, CURVE_CUTOFFS) if split == "test" else self.k
        sums = torch.zeros(2 * cutoffs + 1, dtype=torch.float64)  # recall at 1..K, NDCG at 1..K, users
        for lo in range(0, share, block):
            picked = mine[lo : lo + block]
            # every process embeds min(block, share - lo) users here, padded with a real one
            padded = np.r_[picked, np.full(min(block, share - lo) - len(picked), users[0])]
            vectors = self.embed(c.users.take(c.user_rows[padded]), 0)[: len(picked)]
            if len(picked):
                scores = vectors @ items.t()
                recall, ndcg = block_curve_sums(
                    scores, c.train.gather(picked), c.targets[split].gather(picked), self._columns, cutoffs
                )
                sums += torch.cat([recall, ndcg, torch.tensor([len(picked)], dtype=torch.float64)])
        if world > 1:
            sums = sums.to(self.device)
            torch.distributed.all_reduce(sums)
            sums = sums.cpu()
        count = float(sums[-1])
        recall_at, ndcg_at = sums[:cutoffs] / count, sums[cutoffs:-1] / count
        if split == "test":
            self.figure_data["recall_at_k"] = recall_at.tolist()
            self.figure_data["ndcg_at_k"] = ndcg_at.tolist()
        return {
            f"{split}/recall_at_{self.k}": float(recall_at[self.k - 1]),
            f"{split}/ndcg_at_{self.k}": float(ndcg_at[self.k - 1]),
            f"{split}/eval_users": float(len(users)),
            f"{split}/eval_users_total": float(total),
            f"{split}/eval_seconds": time.perf_counter() - started,
        }

    def _log_split(self, split: str) -> None:
        super()._log_split(split)
        if self.corpus is not None and not self.trainer.sanity_checking:
            for name, value in self.retrieval_metrics(split).items():
                self.log(name, value, sync_dist=False)


def process_group() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
