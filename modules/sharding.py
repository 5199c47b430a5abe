"""A TorchRec-aware Lightning strategy: DistributedModelParallel instead of Lightning's DDP.

Lightning's stock DDP around a TorchRec model would densify embedding updates and wrap the model
twice. Here the strategy shards the LightningModule's ``model`` with a plan from
``EmbeddingShardingPlanner`` (topology from the world size and device kind), with embedding tables
trained by a fused in-backward optimizer; DMP itself data-parallelises the dense part. Checkpoints go
through ``torch.distributed.checkpoint``: every rank writes its own shards.

The same strategy serves one process (CPU or one GPU) and many (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from modules.safe_checkpoint import TRAINER_STATE, dcp_load, load_trainer_state


def sparse_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class FBGEMM's fused kernels implement for ``name``."""
    from torchrec.optim import RowWiseAdagrad

    classes: dict[str, type[torch.optim.Optimizer]] = {
        "rowwise_adagrad": RowWiseAdagrad,
        "adagrad": torch.optim.Adagrad,
        "sgd": torch.optim.SGD,
        "adam": torch.optim.Adam,
    }
    return classes[name]


def shard_model(
    model: nn.Module,
    device: torch.device,
    sparse_optimizer: tuple[type[torch.optim.Optimizer], dict[str, Any]],
    local_world_size: int,
) -> tuple[nn.Module, Any]:
    """Wrap ``model`` (tables on ``meta``) in DistributedModelParallel over the default process group."""
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.sharding_plan import get_default_sharders
    from torchrec.distributed.types import ShardingEnv
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    cls, kwargs = sparse_optimizer
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            apply_optimizer_in_backward(cls, module.parameters(), kwargs)
    pg = dist.group.WORLD
    world = dist.get_world_size()
    topology = Topology(world_size=world, compute_device=device.type, local_world_size=min(local_world_size, world))
    sharders = get_default_sharders()
    plan = EmbeddingShardingPlanner(topology=topology).collective_plan(model, sharders, pg)
    dmp = DistributedModelParallel(
        module=model, device=device, plan=plan, sharders=sharders, env=ShardingEnv.from_process_group(pg)
    )
    return dmp, plan


def table_placement(plan: Any) -> dict[str, list[int]]:
    """table name -> ranks holding a shard of it (from a ShardingPlan)."""
    out: dict[str, list[int]] = {}
    for module_plan in plan.plan.values():
        for table, spec in module_plan.items():
            ranks = set()
            if spec.ranks:
                ranks.update(spec.ranks)
            out[table] = sorted(ranks)
    return out


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """The non-tensor part of a checkpoint directory (epoch, loops, callbacks, MLflow run id), loaded as
    plain data only: a checkpoint from elsewhere must never run code (see ``modules.safe_checkpoint``)."""
    return load_trainer_state(checkpoint)


class TorchRecMixin:
    """Turns a DDP strategy (Lightning's, or a backend's subclass of it such as Ray's) into one whose
    model wrapping is TorchRec's DistributedModelParallel.

    The LightningModule must expose ``model`` (a plain TorchRec module, tables on ``meta``) and
    ``sparse_optimizer()`` -> (optimizer class, kwargs) for the fused embedding update.
    """

    plan: Any = None
    lightning_module: Any
    root_device: torch.device
    num_processes: int
    is_global_zero: bool
    optimizers: Any

    def model_to_device(self) -> None:
        lm: Any = self.lightning_module
        from torchrec.distributed import DistributedModelParallel

        if not isinstance(lm.model, DistributedModelParallel):
            lm.model, self.plan = shard_model(
                lm.model, self.root_device, lm.sparse_optimizer(), self.num_processes or 1
            )
        for name, child in lm.named_children():
            if name != "model":
                child.to(self.root_device)
        # Outside fitting, Lightning's DDPStrategy.setup broadcasts every parameter and buffer of the
        # LightningModule from rank 0 (``_sync_module_states``). The sharded tables differ per rank,
        # so that would overwrite (or, with different shapes, break) them; DMP already synced the
        # dense part when it was built. Exclude everything owned by the DMP model, found by identity
        # so that the check does not depend on how DMP names its sharded modules.
        owned = {id(t) for t in lm.model.parameters()} | {id(t) for t in lm.model.buffers()}
        named = [*lm.named_parameters(), *lm.named_buffers()]
        lm._ddp_params_and_buffers_to_ignore = [n for n, t in named if id(t) in owned or n.startswith("model.")]

    def _setup_model(self, model: nn.Module) -> Any:
        return model  # DMP already data-parallelises the dense part; no second DDP wrapper

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the sharded model and the optimizers must exist before a checkpoint loads

    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        return batch.to(device or self.root_device, non_blocking=True)

    # -- checkpoints: each rank writes and reads its own shards ------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        path = Path(filepath)
        lm: Any = self.lightning_module
        state = {
            "model": checkpoint.pop("state_dict"),
            "optimizers": checkpoint.pop("optimizer_states", []),
            "fused": lm.model.fused_optimizer.state_dict(),
        }
        dcp.save(state, checkpoint_id=str(path))
        if self.is_global_zero:
            torch.save(checkpoint, path / TRAINER_STATE)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(checkpoint_path)
        checkpoint = read_trainer_state(path)
        lm: Any = self.lightning_module
        optimizers = list(self.optimizers)
        for opt in optimizers:
            if hasattr(opt, "init_state"):
                opt.init_state()  # optimizer state is lazy: create it so the loader has targets
        state: dict[str, Any] = {"model": lm.state_dict(), "fused": lm.model.fused_optimizer.state_dict()}
        if optimizers:  # fitting resumes them; testing or evaluating loads the weights only
            state["optimizers"] = [opt.state_dict() for opt in optimizers]
        dcp_load(state, path)  # .metadata and byte items through allow-lists, unlike dcp.load
        lm.model.fused_optimizer.load_state_dict(state["fused"])
        checkpoint["state_dict"] = state["model"]
        checkpoint["optimizer_states"] = state.get("optimizers", [])
        return checkpoint

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        """Nothing to do: ``load_checkpoint`` already loaded the weights in place, shard by shard."""

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            import shutil

            shutil.rmtree(filepath, ignore_errors=True)


class TorchRecStrategy(TorchRecMixin, DDPStrategy):
    """Lightning's DDPStrategy with DistributedModelParallel in place of DDP."""

    strategy_name = "torchrec"


def make_strategy(base: type | None = None, **kwargs: Any) -> Any:
    """The TorchRec strategy on ``base`` (a DDPStrategy subclass; default Lightning's own)."""
    if base is None or base is DDPStrategy:
        return TorchRecStrategy(**kwargs)
    cls = type(f"TorchRec{base.__name__}", (TorchRecMixin, base), {})
    return cls(**kwargs)


def gather_full_state(dmp: nn.Module) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict of a DMP model on rank 0 (None elsewhere); a collective call."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    full: dict[str, torch.Tensor] = {}
    rank = dist.get_rank()
    for key, value in dmp.state_dict().items():
        if isinstance(value, ShardedTensor):
            out = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=out)
            if out is not None:
                full[key] = out
        elif hasattr(value, "full_tensor"):  # DTensor
            full[key] = value.full_tensor().cpu()
        else:
            full[key] = value.detach().cpu()
    return full if rank == 0 else None
