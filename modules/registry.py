"""The model kinds: each declares its model builder, training task, scorer, default monitored metric
and the dataset task it needs. Nothing else compares kind names; adding a model is one entry here.

Builders import their heavy dependencies when called, so that reading the registry (the CLI's choices,
validation) stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.errors import RecsysError
from datamodules.schema import DatasetMetadata
from modules.config import ModelConfig, OptimConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

    from datamodules.corpus import RetrievalCorpus
    from datamodules.histories import UserHistories


@dataclass(frozen=True)
class TaskInputs:
    """What a training task needs beside its model."""

    optim: OptimConfig
    arch: ModelConfig
    meta: DatasetMetadata
    corpus: RetrievalCorpus | None = None
    histories: UserHistories | None = None
    """The users' train histories when ``arch.history`` asks for them (the corpus's, for kinds that load it)."""
    k: int = 10
    eval_batch: int = 4096
    eval_users: int = 0
    """Retrieval kinds: evaluate a seeded sample of this many users (0: all)."""
    eval_seed: int = 0
    eval_block_bytes: int = 256 * 1024**2
    """Retrieval kinds: memory of one block of users x items scores in the full-corpus evaluation."""


@dataclass(frozen=True)
class ModelKind:
    """One model kind of ``--model``."""

    name: str
    build_model: Callable[[DatasetMetadata, ModelConfig, str | torch.device], nn.Module]
    """The plain TorchRec model, sized from the dataset's metadata, tables on the given device."""
    build_task: Callable[[nn.Module, TaskInputs], Any]
    """The LightningModule that trains it (loss, metrics, optimizers)."""
    build_scorer: Callable[[nn.Module, ModelConfig], nn.Module]
    """The plain scoring module packaged into MLflow: (dense, sparse) -> probability."""
    monitor: Callable[[int], str]
    """Default validation metric to monitor, given the cut-off K."""
    dataset_task: str | None = None
    """The task a dataset must have (``retrieval``: users, items and a corpus); None: any."""
    embed: Callable[[nn.Module, torch.Tensor, Any, str], torch.Tensor] | None = None
    """Retrieval kinds: ``(model, dense, sparse KJT, tower) -> embeddings`` of the ``user`` or ``item``
    tower (what the vector index and its queries are made of); None: the kind cannot retrieve."""

    @property
    def retrieves(self) -> bool:
        """Whether the kind can be the retrieval stage of a recommender (user and item towers)."""
        return self.embed is not None

    def metrics(self, k: int) -> tuple[str, ...]:
        """The metrics a run of this kind logs (what --trainer.monitor may name)."""
        evaluated = ["auroc", "logloss"]
        if self.dataset_task == "retrieval":
            evaluated += [f"recall_at_{k}", f"ndcg_at_{k}"]
        else:  # within the candidate lists of ranking data built by `recsys data candidates`
            evaluated += [f"ndcg_at_{k}"]
        return ("train/loss_epoch", *(f"val/{m}" for m in evaluated))

    @property
    def needs_corpus(self) -> bool:
        return self.dataset_task == "retrieval"

    def check_dataset(self, meta: DatasetMetadata) -> None:
        """Refuse a dataset this kind cannot train on, with one line."""
        if self.dataset_task is not None and meta.task != self.dataset_task:
            raise RecsysError(
                f"--model {self.name}: dataset {meta.dataset!r} has no users/items (task {meta.task}); "
                f"use one of {', '.join(k.name for k in KINDS.values() if k.dataset_task is None)}"
            )


def _two_tower(meta: DatasetMetadata, cfg: ModelConfig, device: str | torch.device) -> nn.Module:
    from modules.models import build_two_tower

    return build_two_tower(meta, cfg, device)


def _dlrm(meta: DatasetMetadata, cfg: ModelConfig, device: str | torch.device) -> nn.Module:
    from modules.models import build_dlrm

    return build_dlrm(meta, cfg, device)


def _dcn(meta: DatasetMetadata, cfg: ModelConfig, device: str | torch.device) -> nn.Module:
    from modules.models import build_dcn

    return build_dcn(meta, cfg, device)


def _deepfm(meta: DatasetMetadata, cfg: ModelConfig, device: str | torch.device) -> nn.Module:
    from modules.models import build_deepfm

    return build_deepfm(meta, cfg, device)


def _retrieval_task(model: nn.Module, inputs: TaskInputs) -> Any:
    from modules.tasks import RetrievalTask

    return RetrievalTask(
        model,
        inputs.optim,
        inputs.arch,
        inputs.meta,
        inputs.corpus,
        inputs.k,
        inputs.eval_batch,
        eval_users=inputs.eval_users,
        eval_seed=inputs.eval_seed,
        eval_block_bytes=inputs.eval_block_bytes,
    )


def _ranking_task(model: nn.Module, inputs: TaskInputs) -> Any:
    from modules.tasks import HistoryFeature, RankingTask

    history = HistoryFeature.of(inputs.arch, inputs.meta, inputs.histories)
    # candidate lists (recsys data candidates): rows grouped by user, scored per list
    lists = (inputs.meta.user_id_feature or "user_id") if inputs.meta.candidates else None
    return RankingTask(model, inputs.optim, history, lists, inputs.arch.loss == "softmax", inputs.k)


def _pair_scorer(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    from modules.scoring import PairScorer

    return PairScorer(model, cfg.temperature)


def _ranking_scorer(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    from modules.scoring import RankingScorer

    return RankingScorer(model)


def _tower_embed(model: nn.Module, dense: torch.Tensor, sparse: Any, tower: str) -> torch.Tensor:
    return model.embed(dense, sparse, tower)  # type: ignore[operator]


def _auroc(k: int) -> str:
    return "val/auroc"


def _ndcg(k: int) -> str:
    return f"val/ndcg_at_{k}"


KINDS: dict[str, ModelKind] = {
    kind.name: kind
    for kind in (
        ModelKind(
            "two-tower", _two_tower, _retrieval_task, _pair_scorer, _ndcg, dataset_task="retrieval", embed=_tower_embed
        ),
        ModelKind("dlrm", _dlrm, _ranking_task, _ranking_scorer, _auroc),
        ModelKind("dcn", _dcn, _ranking_task, _ranking_scorer, _auroc),
        ModelKind("deepfm", _deepfm, _ranking_task, _ranking_scorer, _auroc),
    )
}
MODELS = tuple(KINDS)


def model_kind(name: str) -> ModelKind:
    """The kind ``--model`` names; an unknown name is one line listing the choices."""
    if name not in KINDS:
        raise RecsysError(f"--model: unknown model {name!r} (choose from {', '.join(KINDS)})")
    return KINDS[name]
